"""Turning the kernel's IOPub messages for one execution into an `Execution`.

Memory is bounded whatever the code prints: the connection decodes output only while it fits
the execution's byte budget (kernel.Budget); per stream, the first half of the cap is kept as
the head and the rest as a sliding tail; what falls out of the middle is counted, never held.
The order in which outputs arrived is kept (`Execution.outputs`) so renderings can interleave
streams, results and the error as the kernel produced them.

The kernel is untrusted: a message whose fields are not what the protocol says raises
`ProtocolError` (the session then replaces the kernel), and images are written through
the session's `Workspace` (off the event loop, never through a link).
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass, field
from typing import Any

from kernelbox_wire.models import ErrorInfo, Execution, ExecutionStatus, Image, OutputRef, Result
from kernelbox_wire.text import clean_text, collapse_cr, strip_ansi, truncation_marker

from .kernel import Budget, ProtocolError
from .workspace import Workspace

log = logging.getLogger(__name__)

IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpg", "image/svg+xml": "svg"}


@dataclass
class ImageNamer:
    """Numbers images across a whole session: fig-001, fig-002, ... (names the code took
    already are skipped when the image is written)."""

    next_number: int = 1

    def take(self) -> int:
        n = self.next_number
        self.next_number += 1
        return n


@dataclass
class _Item:
    kind: str  # "stream" | "marker" | "result" | "error"
    name: str | None = None  # stream name
    text: str = ""
    index: int | None = None


@dataclass
class _StreamState:
    kept: int = 0
    dropped: int = 0
    marker: _Item | None = None


@dataclass
class CaptureLimits:
    max_chars: int = 200_000  # per stream
    max_results: int = 100
    max_images: int = 50
    max_image_bytes: int = 8 * 1024**2
    # Bytes of output (streams, results, images, the error, as sent) one execution may bring
    # into the host; the rest is dropped before it is decoded.
    max_execution_bytes: int = 16 * 1024**2
    max_traceback_chars: int = 50_000


@dataclass
class OutputCapture:
    workspace: Workspace
    namer: ImageNamer
    limits: CaptureLimits = field(default_factory=CaptureLimits)

    def __post_init__(self) -> None:
        self._items: list[_Item] = []
        self._streams: dict[str, _StreamState] = {}
        self._results: list[Result] = []
        self._images: list[Image] = []
        self._error: ErrorInfo | None = None
        self._clear_pending = False
        self.truncated = False
        self.notes: list[str] = []

    # -- feeding ---------------------------------------------------------------------------

    async def feed(self, msg: dict) -> tuple[str, dict] | None:
        """Take one IOPub message of this execution; return the event to stream, if any.
        Raises ProtocolError for a message no kernel speaking the protocol sends."""
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            dropped = msg["metadata"].get("kernelbox_dropped", 0)
            name = "stdout" if content.get("name") == "stdout" else "stderr"
            text = _text(content.get("text", ""), "stream text")
            if not isinstance(dropped, int) or dropped < 0:
                raise ProtocolError("a stream with a bad kernelbox_dropped count")
            self.stream(name, text, dropped)
            return (name, {"text": text}) if text else None
        if kind in ("execute_result", "display_data"):
            data = content.get("data", {})
            if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
                raise ProtocolError(f"a {kind} whose data is not a MIME bundle")
            if await self.result(kind, data):
                return "result", self._results[-1].model_dump()
            return None
        if kind == "error":
            self.take_error(content)
            assert self._error is not None
            return "error", self._error.model_dump()
        if kind == "clear_output":
            self.clear(wait=bool(content.get("wait")))
        return None

    def take_error(self, content: dict[str, Any]) -> None:
        """An `error` message's (or an error reply's) ename, evalue and traceback."""
        traceback = content.get("traceback", [])
        if not isinstance(traceback, list) or not all(isinstance(t, str) for t in traceback):
            raise ProtocolError("an error whose traceback is not a list of strings")
        lines, left = [], self.limits.max_traceback_chars
        for line in traceback:
            if left <= 0:
                lines.append(truncation_marker(sum(map(len, traceback)) - sum(map(len, lines))))
                self._note("a traceback over the limit was cut")
                break
            lines.append(line[:left])
            left -= len(line)
        self.error(
            _text(content.get("ename", ""), "error name")[:1000],
            _text(content.get("evalue", ""), "error value")[: self.limits.max_traceback_chars],
            lines,
        )

    @property
    def has_error(self) -> bool:
        return self._error is not None

    def note_lost_output(self) -> None:
        self._note("some output was lost on the way from the kernel (a message was dropped)")

    def note_budget(self, budget: Budget) -> None:
        if budget.dropped:
            self._note(
                f"output over {self.limits.max_execution_bytes} bytes for one execution was "
                f"dropped ({budget.dropped} bytes)"
            )

    def note(self, text: str) -> None:
        """Tell the caller something about this execution without marking it truncated."""
        if text not in self.notes:
            self.notes.append(text)

    def stream(self, name: str, text: str, dropped: int = 0) -> None:
        """`name` is "stdout" or "stderr" and `text` already cleaned (see feed)."""
        self._apply_pending_clear()
        state = self._streams.setdefault(name, _StreamState())
        last = self._items[-1] if self._items else None
        if last is not None and last.kind == "stream" and last.name == name:
            before = len(last.text)
            last.text = collapse_cr(last.text + text)
            state.kept += len(last.text) - before
        else:
            item = _Item("stream", name, collapse_cr(text))
            self._items.append(item)
            state.kept += len(item.text)
        if dropped:
            self._drop(name, state, dropped)
        if state.kept > self.limits.max_chars:
            self._evict(name, state)

    async def result(self, kind: str, data: dict) -> bool:
        self._apply_pending_clear()
        if len(self._results) >= self.limits.max_results:
            self._note(f"more than {self.limits.max_results} results; the rest were dropped")
            return False
        data = {k: (clean_text(v) if isinstance(v, str) else v) for k, v in data.items()}
        saved = await self._save_images(data)
        self._results.append(Result(type=kind, data=data, images=saved))
        self._items.append(_Item("result", index=len(self._results) - 1))
        return True

    def error(self, name: str, value: str, traceback: list[str]) -> None:
        self._apply_pending_clear()
        self._error = ErrorInfo(
            name=clean_text(strip_ansi(name)),
            value=clean_text(strip_ansi(value)),
            traceback=[clean_text(strip_ansi(t)) for t in traceback],
        )
        self._items = [i for i in self._items if i.kind != "error"]
        self._items.append(_Item("error"))

    def clear(self, wait: bool) -> None:
        if wait:
            self._clear_pending = True
            return
        # Clearing drops what was shown; image files already written stay on disk.
        self._items, self._results, self._images = [], [], []
        self._streams, self._error = {}, None

    def replace_error(self, error: ErrorInfo) -> None:
        """Put the engine's own error (deadline, dead kernel) in place of the kernel's."""
        self.error(error.name, error.value, error.traceback)

    # -- result ----------------------------------------------------------------------------

    def build(
        self,
        status: ExecutionStatus,
        *,
        execution_count: int | None,
        duration_ms: float,
        kernel_restarted: bool = False,
    ) -> Execution:
        outputs: list[OutputRef] = []
        stdout: list[str] = []
        stderr: list[str] = []
        for item in self._items:
            if item.kind in ("stream", "marker"):
                text = item.text.rstrip("\r") if item.kind == "stream" else item.text
                if item.kind == "marker":
                    text = truncation_marker(self._streams[item.name].dropped)
                (stdout if item.name == "stdout" else stderr).append(text)
                if outputs and outputs[-1].type == "stream" and outputs[-1].name == item.name:
                    outputs[-1].text = (outputs[-1].text or "") + text
                elif text:
                    outputs.append(OutputRef(type="stream", name=item.name, text=text))
            elif item.kind == "result":
                outputs.append(OutputRef(type="result", index=item.index))
            elif item.kind == "error":
                outputs.append(OutputRef(type="error"))
        return Execution(
            status=status,
            execution_count=execution_count,
            stdout="".join(stdout),
            stderr="".join(stderr),
            results=self._results,
            error=self._error,
            images=self._images,
            duration_ms=round(duration_ms, 3),
            truncated=self.truncated,
            kernel_restarted=kernel_restarted,
            outputs=outputs,
            notes=self.notes,
        )

    # -- internals -------------------------------------------------------------------------

    def _note(self, note: str) -> None:
        self.truncated = True
        if note not in self.notes:
            self.notes.append(note)

    def _apply_pending_clear(self) -> None:
        if self._clear_pending:
            self._clear_pending = False
            self.clear(wait=False)

    def _ensure_marker(self, name: str, state: _StreamState) -> _Item:
        """Split the stream at head size and put the marker there (once)."""
        if state.marker is not None:
            return state.marker
        head_room = self.limits.max_chars // 2
        for pos, item in enumerate(self._items):
            if item.kind != "stream" or item.name != name:
                continue
            if len(item.text) <= head_room:
                head_room -= len(item.text)
                continue
            rest = _Item("stream", name, item.text[head_room:])
            item.text = item.text[:head_room]
            state.marker = _Item("marker", name)
            self._items[pos + 1 : pos + 1] = [state.marker, rest]
            break
        else:  # everything fits in the head: the marker goes at the end
            state.marker = _Item("marker", name)
            self._items.append(state.marker)
        self.truncated = True
        return state.marker

    def _drop(self, name: str, state: _StreamState, n: int) -> None:
        self._ensure_marker(name, state)
        state.dropped += n

    def _evict(self, name: str, state: _StreamState) -> None:
        """Drop the oldest tail characters of a stream until it fits the cap again."""
        marker = self._ensure_marker(name, state)
        excess = state.kept - self.limits.max_chars
        pos = self._items.index(marker) + 1
        while excess > 0 and pos < len(self._items):
            item = self._items[pos]
            if item.kind != "stream" or item.name != name:
                pos += 1
                continue
            cut = min(excess, len(item.text))
            item.text = item.text[cut:]
            excess -= cut
            state.kept -= cut
            state.dropped += cut
            if not item.text and item is not self._items[-1]:
                del self._items[pos]
            else:
                pos += 1

    async def _save_images(self, data: dict) -> list[str]:
        wanted = [m for m in IMAGE_TYPES if isinstance(data.get(m), str)]
        if not wanted:
            return []
        if len(self._images) >= self.limits.max_images:
            self._note(f"more than {self.limits.max_images} images; the rest were not saved")
            return []
        number = self.namer.take()
        saved = []
        for mime in wanted:
            raw = data[mime]
            # Sized before decoding: base64 is four characters for three bytes.
            if len(raw) // 4 * 3 > self.limits.max_image_bytes:
                self._note(f"an image over {self.limits.max_image_bytes} bytes was not saved")
                continue
            try:
                blob = raw.encode() if mime == "image/svg+xml" else base64.b64decode(raw)
            except (binascii.Error, ValueError):
                self._note(f"an {mime} image was not valid base64 and was not saved")
                continue
            path = await self._write_image(number, IMAGE_TYPES[mime], blob)
            if path:
                saved.append(path)
                self._images.append(Image(path=path, url=path, mime=mime))
        return saved

    async def _write_image(self, number: int, ext: str, blob: bytes) -> str | None:
        for _ in range(100):  # skip numbers the code already used for its own files
            path = f"outputs/fig-{number:03d}.{ext}"
            try:
                await self.workspace.write(path, blob, exclusive=True)
                return path
            except FileExistsError:
                number = self.namer.take()
            except (OSError, ValueError) as exc:  # UnsafePath, FileTooLarge, a full disk
                log.warning("could not save image %s: %s", path, exc)
                self._note(f"an image could not be saved: {exc}")
                return None
        self._note("an image could not be saved: its names were all taken")
        return None


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"a {what} that is not a string")
    return clean_text(value)
