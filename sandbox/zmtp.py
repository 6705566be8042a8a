"""The host's end of a kernel's ZMQ sockets, speaking ZMTP 3.0 itself, within bounds.

libzmq assembles a whole multipart message in memory before it hands over the first part, and
bounds only each part's size, never their number: a kernel can make a host that reads it with
libzmq hold gigabytes with one message (the same part sent a thousand times costs the kernel
nothing). So the host reads the wire itself: frame by frame from a unix socket, deciding from
each frame's size, before reading its body, whether to read it or to skip it, with at most a
chunk of a skipped body in memory. The kernel keeps its ordinary libzmq sockets.

Only what the host needs: the client side of ZMTP 3.0 (RFC 23) with the NULL mechanism, over
IPC, for a DEALER (to the kernel's ROUTER shell) and a SUB (to its PUB IOPub) that subscribes
to everything. The peer may speak 3.1; announcing 3.0 makes libzmq take our subscription as a
message and send no heartbeats.
"""

from __future__ import annotations

import asyncio
import struct

# Greeting: signature (0xFF, 8 bytes of padding, 0x7F), version 3.0, mechanism NULL padded to
# 20 bytes, as-server 0, 31 bytes of filler.
GREETING = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + bytes(32)
_MORE, _LONG, _COMMAND = 0x01, 0x02, 0x04
_SKIP_CHUNK = 64 * 1024
# The peer's READY command names its socket type; ours must go with it.
PEERS = {b"DEALER": {b"ROUTER"}, b"SUB": {b"PUB", b"XPUB"}}


class ZmtpError(ConnectionError):
    """The peer broke ZMTP (or the limits we read it within)."""


def _command(name: bytes, properties: dict[bytes, bytes]) -> bytes:
    body = bytes([len(name)]) + name
    for key, value in properties.items():
        body += bytes([len(key)]) + key + struct.pack("!I", len(value)) + value
    return _header(_COMMAND, len(body)) + body


def _header(flags: int, size: int) -> bytes:
    if size < 256:
        return bytes([flags, size])
    return bytes([flags | _LONG]) + struct.pack("!Q", size)


def encode(frames: list[bytes]) -> bytes:
    """One message: its frames, each but the last flagged MORE."""
    last = len(frames) - 1
    return b"".join(_header(_MORE if i < last else 0, len(f)) + f for i, f in enumerate(frames))


class Socket:
    """One connected socket: write whole messages; read frame headers, then each body or skip
    it. `max_frame` bounds every frame the peer may send (a larger one is a ZmtpError)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_frame: int
    ) -> None:
        self._reader, self._writer, self.max_frame = reader, writer, max_frame

    @classmethod
    async def connect(cls, path: str, socket_type: bytes, max_frame: int) -> Socket:
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            writer.write(GREETING + _command(b"READY", {b"Socket-Type": socket_type}))
            greeting = await reader.readexactly(64)
            if greeting[0] != 0xFF or greeting[9] != 0x7F or greeting[10] < 3:
                raise ZmtpError("the peer does not speak ZMTP 3")
            if greeting[12:32].rstrip(b"\x00") != b"NULL":
                raise ZmtpError("the peer wants a security mechanism")
            sock = cls(reader, writer, max_frame=1024)
            _, command, size = await sock.next_frame()
            body = await sock.body(size) if command else b""
            if not command or not body.startswith(b"\x05READY"):
                raise ZmtpError("the peer did not send READY")
            peer = _properties(body[6:]).get(b"Socket-Type")
            if peer not in PEERS[socket_type]:
                raise ZmtpError(f"a {socket_type.decode()} cannot talk to a {peer!r} socket")
            sock.max_frame = max_frame
            if socket_type == b"SUB":
                sock.send([b"\x01"])  # subscribe to every topic (ZMTP 3.0 style)
            return sock
        except BaseException:
            writer.close()
            raise

    def send(self, frames: list[bytes]) -> None:
        self._writer.write(encode(frames))

    async def next_frame(self) -> tuple[bool, bool, int]:
        """(more frames follow, it is a command, body size) of the next frame."""
        flags = (await self._reader.readexactly(1))[0]
        if flags & _LONG:
            (size,) = struct.unpack("!Q", await self._reader.readexactly(8))
        else:
            size = (await self._reader.readexactly(1))[0]
        if size > self.max_frame:
            raise ZmtpError(f"a frame of {size} bytes, over the {self.max_frame}-byte limit")
        return bool(flags & _MORE), bool(flags & _COMMAND), size

    async def body(self, size: int) -> bytes:
        return await self._reader.readexactly(size)

    async def skip(self, size: int) -> None:
        """Read past a body, a chunk at a time, letting others run between chunks."""
        while size > 0:
            chunk = min(size, _SKIP_CHUNK)
            await self._reader.readexactly(chunk)
            size -= chunk
            if size:
                await asyncio.sleep(0)

    def close(self) -> None:
        self._writer.close()


def _properties(data: bytes) -> dict[bytes, bytes]:
    """ZMTP metadata: name-size (1 byte), name, value-size (4 bytes), value; repeated."""
    out, pos = {}, 0
    while pos < len(data):
        n = data[pos]
        name = data[pos + 1 : pos + 1 + n]
        pos += 1 + n
        if pos + 4 > len(data):
            raise ZmtpError("a malformed READY command")
        (size,) = struct.unpack_from("!I", data, pos)
        out[name] = data[pos + 4 : pos + 4 + size]
        pos += 4 + size
    return out
