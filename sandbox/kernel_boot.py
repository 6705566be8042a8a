"""Kernel entry point: runs *inside* the sandbox, before and around ipykernel.

Standalone on purpose (stdlib + ipykernel only): the Docker image copies this one file, so it
must not import the rest of the engine. Usage:

    python kernel_boot.py -f /path/to/connection.json

Configuration comes from environment variables, removed from the environment once read:
    KERNELBOX_RUN_AS        "uid:gid" (local sandbox of a root service): become them first
                            thing, then enter a user namespace of one's own, with no capability
    KERNELBOX_MPL_CACHE     a prebuilt matplotlib cache, copied into MPLCONFIGDIR (writable)
    KERNELBOX_RLIMITS       JSON {"AS": bytes, "FSIZE": bytes, "NOFILE": n, "CORE": 0, ...}
    KERNELBOX_UNSHARE_NET   "1": move into a private network namespace (no interfaces)
    KERNELBOX_OUTPUT_CAP    characters per stream per execution sent before only the tail is kept
    KERNELBOX_IMAGE_CAP     bytes (decoded) of one image in a display; larger ones are replaced
    KERNELBOX_UMASK         octal umask for everything the kernel creates (sockets included)
    KERNELBOX_NICE          added niceness: user code yields the CPU to the service itself
    KERNELBOX_PARENT_PID    die with this process (the service), however it ends
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import sys
import threading

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)


def _log(message: str) -> None:
    print(f"kernelbox-boot: {message}", file=sys.stderr, flush=True)


def check_libc(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _pop_env(name: str, default: str = "") -> str:
    return os.environ.pop(name, default)


def apply_rlimits(spec: dict[str, int]) -> None:
    import resource

    for name, value in spec.items():
        which = getattr(resource, f"RLIMIT_{name}")
        _soft, hard = resource.getrlimit(which)
        new_hard = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (min(value, new_hard), new_hard))


def die_with_parent(parent_pid: int) -> None:
    """A service killed with SIGKILL cannot stop its kernels; the kernel stops itself."""
    PR_SET_PDEATHSIG = 1
    _libc.prctl(PR_SET_PDEATHSIG, 9)  # SIGKILL when the parent goes
    if os.getppid() != parent_pid:  # it went before we asked
        os._exit(1)


def own_user_namespace(flags: int = 0) -> None:
    """Enter a new user namespace (with the other namespaces `flags` name), our uid and gid
    mapped to themselves (the one mapping an unprivileged process may write). Every capability
    is ours in it, over nothing outside it."""
    uid, gid = os.getuid(), os.getgid()  # inside, before the maps, we are nobody
    check_libc(_libc.unshare(CLONE_NEWUSER | flags), "unshare")
    for name, text in (
        ("setgroups", "deny"),
        ("uid_map", f"{uid} {uid} 1"),
        ("gid_map", f"{gid} {gid} 1"),
    ):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def become(uid: int, gid: int) -> None:
    """Root becomes `uid` and `gid` for good, without supplementary groups; its capabilities
    go with root (the bounding set stays, useless: no_new_privs, set by bwrap, forbids a
    set-uid or file-capability exec to regain one)."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    # A uid change makes a process non-dumpable: its /proc/self files would belong to root, so
    # it could not write its own uid_map nor list its fds. Other uids still cannot trace it.
    check_libc(_libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in ("effective", "permitted", "inheritable")]


def drop_capabilities() -> None:
    """No capability left, for good: the bounding set emptied, then every set cleared."""
    cap = 0
    while _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
        cap += 1
    if ctypes.get_errno() != 22:  # EINVAL: past the last capability, all dropped
        check_libc(-1, f"prctl(PR_CAPBSET_DROP, {cap})")
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    check_libc(_libc.capset(ctypes.byref(header), (_CapData * 2)()), "capset")


def enter_sandbox(run_as: str) -> None:
    """Local sandbox of a root service (bwrap as root, left with CAP_SETUID and CAP_SETGID):
    become the session's uid and gid, then a user namespace of our own, with no capability
    (CapEff and the bounding set empty) and process limits counted in it alone."""
    uid, gid = (int(part) for part in run_as.split(":"))
    become(uid, gid)
    try:
        own_user_namespace()
    except OSError as exc:  # no unprivileged user namespaces: CapEff is 0 all the same
        _log(f"no user namespace of our own ({exc}); going on without")
        return
    drop_capabilities()


def seed_matplotlib_cache(prebuilt: str) -> None:
    """matplotlib uses only a writable MPLCONFIGDIR: a private copy of the font cache built
    once, so no kernel spends a second scanning fonts and none can change another's."""
    target = os.environ.get("MPLCONFIGDIR")
    if target:
        try:
            shutil.copytree(prebuilt, target, dirs_exist_ok=True)
        except OSError as exc:
            _log(f"matplotlib cache not copied ({exc}); it will be built")


SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def loopback_up() -> None:
    """Bring `lo` of our network namespace up (a new namespace has it down): code that serves
    and connects on 127.0.0.1 or ::1 works, and nothing else is reachable. Needs
    CAP_NET_ADMIN over the namespace (ours in a user namespace we made with it)."""
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, struct.pack("16sh22x", b"lo", 0))
        flags = struct.unpack("16sh22x", ifreq)[1]
        if not flags & IFF_UP:
            fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sh22x", b"lo", flags | IFF_UP))


def unshare_network() -> bool:
    """Leave the host's network: afterwards only a loopback exists, brought up here.

    Root can unshare directly; other users first need a user namespace that maps them to
    themselves. Returns False (and says why) where the OS does not allow either.
    """
    if _libc.unshare(CLONE_NEWNET) != 0:
        host_network = os.readlink("/proc/self/ns/net")
        try:
            own_user_namespace(CLONE_NEWNET)
        except OSError as exc:
            if os.readlink("/proc/self/ns/net") == host_network:
                _log(f"network namespace not available ({exc}); network stays reachable")
                return False
            _log(f"user namespace made but id maps not written: {exc}")
            return True
    try:
        loopback_up()
    except OSError as exc:
        _log(f"loopback stays down: {exc}")
    return True


class StreamBudget:
    """Per execution and stream: pass the first `cap` characters, then keep only a tail.

    Wraps the write of ipykernel's OutStreams (print, sys.stdout, and fd 1/2 output that
    ipykernel captures all end there), so a single `print('x' * 10**8)` or an endless print
    loop never puts more than about `cap` characters per stream on the wire. The tail and the
    number of characters dropped are sent when the cell ends (metadata `kernelbox_dropped`),
    so the host can place the truncation marker exactly. (OutStream hooks would be simpler,
    but they are thread-local and output is flushed from ipykernel's IO thread.)
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.tail_cap = max(cap // 2, 1)
        self.parent_id: str | None = None
        self.sent: dict[str, int] = {}
        self.tail: dict[str, str] = {}
        self.dropped: dict[str, int] = {}
        self.lock = threading.Lock()

    def take(self, name: str, parent_id: str | None, text: str) -> str:
        """The part of `text` that may be sent now; the rest goes to the tail."""
        with self.lock:
            if parent_id != self.parent_id:
                self.parent_id = parent_id
                self.sent, self.tail, self.dropped = {}, {}, {}
            sent = self.sent.get(name, 0)
            room = max(self.cap - sent, 0)
            if len(text) <= room:
                self.sent[name] = sent + len(text)
                return text
            head, rest = text[:room], text[room:]
            self.sent[name] = sent + len(head)
            tail = self.tail.get(name, "") + rest
            if len(tail) > self.tail_cap:
                self.dropped[name] = self.dropped.get(name, 0) + len(tail) - self.tail_cap
                tail = tail[-self.tail_cap :]
            self.tail[name] = tail
            return head

    def install(self, stream) -> None:
        original = stream.write

        def write(text: str) -> int:
            if not isinstance(text, str):
                return original(text)  # let ipykernel raise its own TypeError
            allowed = self.take(stream.name, stream.parent_header.get("msg_id"), text)
            if allowed:
                original(allowed)
            return len(text)

        stream.write = write

    def pending(self) -> list[tuple[str, str, int]]:
        with self.lock:
            out = [(n, t, self.dropped.get(n, 0)) for n, t in self.tail.items() if t]
            self.tail, self.dropped = {}, {}
            return out


def drain_fd_pipes(streams, timeout: float = 0.25) -> None:
    """Wait, up to `timeout` seconds, until what code wrote to fd 1 and 2 (os.write, C
    libraries, subprocesses) has been read. ipykernel moves those fds onto pipes that a
    thread of its own reads into the streams: without this, what is still in a pipe when a
    cell ends (up to a pipe's worth after one large write) goes out after the cell, and is
    lost to it."""
    import fcntl
    import termios
    import time

    deadline = time.monotonic() + timeout
    pending = bytearray(4)
    for stream in streams:
        fid = getattr(stream, "_fid", None)  # ipykernel's read end of the pipe, if it watches
        if fid is None:
            continue
        waited = False
        while time.monotonic() < deadline:
            try:
                fcntl.ioctl(fid, termios.FIONREAD, pending)
            except OSError:
                break
            if int.from_bytes(pending, sys.byteorder) == 0:
                break
            waited = True
            time.sleep(0.001)
        if waited:  # the last read is made; let its thread hand it to the stream
            time.sleep(0.005)


def _cap_text(value: str, cap: int) -> str:
    if len(value) <= cap:
        return value
    half = cap // 2
    return f"{value[:half]}...[{len(value) - 2 * half} characters truncated]...{value[-half:]}"


def _cap_bundle(data: dict, text_cap: int, image_cap: int) -> dict:
    """A MIME bundle with no image over `image_cap` bytes and no text over `text_cap`."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for mime, value in list(data.items()):
        if not isinstance(value, str):
            continue
        if mime in ("image/png", "image/jpeg"):
            if len(value) * 3 // 4 > image_cap:
                del data[mime]
                data["text/plain"] = (
                    f"[image of about {len(value) * 3 // 4} bytes dropped: "
                    f"larger than the {image_cap}-byte limit]"
                )
        else:
            data[mime] = _cap_text(value, text_cap if mime != "image/svg+xml" else image_cap)
    return data


def install_display_caps(shell, text_cap: int, image_cap: int) -> None:
    """Bound what one display or result can carry before it leaves the kernel: what the
    formatter makes (results, `display(obj)`) and what is published raw
    (`publish_display_data`, `display(..., raw=True)`). Honest code then never meets the
    host's own limits, which are what actually bound a kernel that goes around these."""
    formatter = shell.display_formatter
    original_format = formatter.format

    def format(obj, include=None, exclude=None):
        data, metadata = original_format(obj, include=include, exclude=exclude)
        return _cap_bundle(data, text_cap, image_cap), metadata

    formatter.format = format
    publisher = shell.display_pub
    original_publish = publisher.publish

    def publish(data, *args, **kwargs):
        return original_publish(_cap_bundle(data, text_cap, image_cap), *args, **kwargs)

    publisher.publish = publish


class _NoOutputHistory(dict):
    """In place of IPython's `history_manager.outputs`: IPython 9 keeps every output of every
    cell there (each write to stdout and stderr, every image's base64) for `%notebook`, so a
    kernel that prints in a loop runs out of memory within seconds, and a long session holds
    all it ever showed. Here each cell's list is a new one that nothing keeps."""

    def __getitem__(self, key):
        return []

    def __contains__(self, key) -> bool:
        return False


def keep_streams_usable(shell, out, err) -> None:
    """A cell that sets `sys.stdout = None` (or anything without write/flush) would break
    every later cell inside IPython itself: each request starts with working streams again
    (before ipykernel tells the streams which request they now print for)."""
    original_set_parent = shell.set_parent

    def set_parent(*args, **kwargs):
        for name, stream in (("stdout", out), ("stderr", err)):
            current = getattr(sys, name)
            if not all(callable(getattr(current, a, None)) for a in ("write", "flush")):
                setattr(sys, name, stream)
        return original_set_parent(*args, **kwargs)

    shell.set_parent = set_parent


def threads_keep_their_cell(out, err, display_pub) -> None:
    """Output of a thread goes to the cell that started it, not to whichever cell runs when
    it prints: a background thread's late output is then dropped by the host (its cell is
    over) instead of landing in the next cell's result."""
    original_start = threading.Thread.start

    def start(self, *args, **kwargs):
        parents = [(s, s.parent_header) for s in (out, err, display_pub)]
        original_run = self.run

        def run():
            for stream, parent in parents:
                stream.set_thread_parent(parent)
            original_run()

        self.run = run
        return original_start(self, *args, **kwargs)

    threading.Thread.start = start


def _no_input(*_args, **_kwargs):
    raise NotImplementedError(
        "input() is disabled: this code runs with nobody to type an answer. "
        "Put the data in the code instead."
    )


def preload(shell) -> None:
    """What every session starts with: the data stack, inline plots, short tracebacks."""
    shell.InteractiveTB.set_mode("Minimal")  # %xmode Minimal, without its announcement
    shell.run_line_magic("matplotlib", "inline")
    shell.ex(
        "import json, math, os, re\n"
        "import numpy as np\n"
        "import pandas as pd\n"
        "import matplotlib\n"
        "import matplotlib.pyplot as plt\n"
    )
    # numpy 2 prints scalars as `np.int64(2)`; models read (and were trained on) `2`.
    shell.ex("np.set_printoptions(legacy='1.25') if np.__version__ >= '2' else None")
    _use_cjk_fallback_fonts()
    shell.user_ns["input"] = _no_input
    # Hide the preloaded names from %who / %whos, as IPython does for its own.
    shell.user_ns_hidden.update({k: shell.user_ns[k] for k in ("input",)})


def _use_cjk_fallback_fonts() -> None:
    """Let Chinese/Japanese/Korean labels render where such a font is installed."""
    from matplotlib import font_manager, rcParams

    wanted = ("Noto Sans CJK SC", "Noto Sans CJK JP", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei")
    present = {f.name for f in font_manager.fontManager.ttflist}
    found = [name for name in wanted if name in present]
    if found:
        # A list of families gives per-glyph fallback: Latin from the default sans-serif font,
        # CJK from the first of `found` that has the glyph.
        rcParams["font.family"] = ["sans-serif", *found]
        rcParams["axes.unicode_minus"] = False


#: what harden() reads, each popped from the environment (see the module's docstring)
BOOT_VARS = (
    "KERNELBOX_RUN_AS",
    "KERNELBOX_MPL_CACHE",
    "KERNELBOX_RLIMITS",
    "KERNELBOX_UNSHARE_NET",
    "KERNELBOX_OUTPUT_CAP",
    "KERNELBOX_IMAGE_CAP",
    "KERNELBOX_UMASK",
    "KERNELBOX_NICE",
    "KERNELBOX_PARENT_PID",
)


def harden() -> dict[str, int]:
    """Per-kernel isolation, from the KERNELBOX_* variables (removed once read): the uid and
    user namespace, death with the parent, niceness, umask, a network namespace, rlimits.
    Returns what run_kernel needs (the output caps). Run by a spawned kernel first thing, and
    by a kernel forked from a template (kernel_template_boot.py) once its mounts are made."""
    cfg = {name: _pop_env(name) for name in BOOT_VARS}
    if cfg["KERNELBOX_RUN_AS"]:
        enter_sandbox(cfg["KERNELBOX_RUN_AS"])
    if cfg["KERNELBOX_MPL_CACHE"]:
        seed_matplotlib_cache(cfg["KERNELBOX_MPL_CACHE"])
    if cfg["KERNELBOX_PARENT_PID"]:
        die_with_parent(int(cfg["KERNELBOX_PARENT_PID"]))
    if cfg["KERNELBOX_NICE"]:
        os.nice(int(cfg["KERNELBOX_NICE"]))
    if cfg["KERNELBOX_UMASK"]:
        os.umask(int(cfg["KERNELBOX_UMASK"], 8))
    if cfg["KERNELBOX_UNSHARE_NET"] == "1":
        unshare_network()
        if cfg["KERNELBOX_RUN_AS"]:  # the user namespace it took for that gave every capability
            drop_capabilities()
    rlimits = json.loads(cfg["KERNELBOX_RLIMITS"] or "{}")
    if rlimits:
        apply_rlimits(rlimits)
    return {
        "output_cap": int(cfg["KERNELBOX_OUTPUT_CAP"] or 200_000),
        "image_cap": int(cfg["KERNELBOX_IMAGE_CAP"] or 8 * 1024**2),
    }


# What a kernel template (kernel_template_boot.py, forkserver_boot.py --kernels) imports once,
# so a forked kernel's start is only its own set-up. Whatever ipykernel and
# IPython import lazily while a kernel initializes is on this list too.
KERNEL_PRELOAD = (
    "ipykernel.kernelapp",
    "ipykernel.ipkernel",
    "ipykernel.zmqshell",
    "ipykernel.iostream",
    "ipykernel.heartbeat",
    "ipykernel.control",
    "ipykernel.comm",
    "ipykernel.eventloops",
    "ipykernel.debugger",  # debugpy: a fifth of a second, in every kernel's initialize
    "IPython.core.interactiveshell",
    "IPython.core.completerlib",
    "IPython.core.debugger",
    "IPython.core.magic_arguments",
    "IPython.core.magics",
    "IPython.core.magics.execution",
    "IPython.core.magics.pylab",
    "IPython.core.magics.ast_mod",
    "IPython.core.oinspect",
    "IPython.extensions.storemagic",
    "IPython.utils.module_paths",
    "IPython.utils.wildcard",
    "tornado.gen",
    "tornado.locks",
    "tornado.queues",
    "tornado.platform.asyncio",
    "pdb",
    "pydoc",
    "faulthandler",
    "encodings.idna",
    "http.server",
    "xmlrpc.server",
    "xmlrpc.client",
    "mimetypes",
    "IPython.core.completer",
    "IPython.core.history",
    "IPython.core.pylabtools",
    "jupyter_client.session",
    "matplotlib_inline.backend_inline",
    "numpy",
    "pandas",
    "matplotlib",
    "matplotlib.pyplot",
    "matplotlib.backends.backend_agg",
    "PIL.Image",
    "PIL.PngImagePlugin",
    "json",
    "math",
    "re",
    "sqlite3",
    "cloudpickle",
)


# No banner, no "to connect another client" chatter; Ctrl-C interrupts the cell. History in
# memory: IPython's sqlite file costs a thread and a write per cell, and nothing reads it back
# (a session's history is kept by the service).
APP_FLAGS = ("--IPKernelApp.quiet=True", "--HistoryManager.hist_file=:memory:")
_configured: tuple[list[str], str] | None = None  # (argv parsed, module files listed)


def configure_app(argv: list[str]) -> None:
    """Parse the kernel app's command line and list the modules' files, ahead of
    run_kernel(argv). A kernel template does it once before it forks: both are the same for
    every kernel it forks, and in a fork they cost about 17 ms of copy-on-write faults (the
    parse walks every configurable class; ipykernel lists sys.modules for its debugger)."""
    global _configured
    from ipykernel.kernelapp import IPKernelApp

    IPKernelApp.instance().parse_command_line([*argv, *APP_FLAGS])
    files = [m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)]
    # One string: a forked kernel splits it into objects of its own, touching no page of
    # the template's but that one.
    _configured = (list(argv), "\0".join(files))


class _SysListingFiles:
    """`sys` for ipykernel.ipkernel while its kernel is built: `modules` is one stand-in per
    file configure_app listed (all IPythonKernel.__init__ reads of them), the rest is sys."""

    def __init__(self, files: str) -> None:
        from types import SimpleNamespace

        self.modules = {path: SimpleNamespace(__file__=path) for path in files.split("\0")}

    def __getattr__(self, name: str):
        return getattr(sys, name)


def run_kernel(argv: list[str], caps: dict[str, int]) -> None:
    """Start ipykernel (this process becomes the kernel; returns when it ends) with the
    output caps, display caps and the rest of what every session gets."""
    import ipykernel.ipkernel
    from ipykernel.kernelapp import IPKernelApp

    output_cap, image_cap = caps["output_cap"], caps["image_cap"]
    if _configured is None or _configured[0] != argv:
        configure_app(argv)
    assert _configured is not None
    app = IPKernelApp.instance()
    app.parse_command_line = lambda argv=None: None  # configure_app did
    ipykernel.ipkernel.sys = _SysListingFiles(_configured[1])  # type: ignore[assignment]
    try:
        app.initialize([])
    finally:
        ipykernel.ipkernel.sys = sys
    shell = app.shell

    out, err = sys.stdout, sys.stderr
    budget = StreamBudget(output_cap)
    for stream in (out, err):
        budget.install(stream)

    def flush_tails(*_args) -> None:
        drain_fd_pipes((out, err))
        out.flush()
        err.flush()
        parent = app.kernel.get_parent("shell")
        for name, text, dropped in budget.pending():
            app.session.send(
                app.iopub_socket,
                "stream",
                {"name": name, "text": text},
                parent=parent,
                metadata={"kernelbox_dropped": dropped},
            )

    shell.events.register("post_run_cell", flush_tails)
    # A child the code forked (and did not end) would return into this kernel's loop and
    # share its sockets with it: a second kernel answering on the same channels.
    kernel_pid = os.getpid()
    shell.events.register(
        "post_run_cell", lambda *_: os._exit(0) if os.getpid() != kernel_pid else None
    )
    install_display_caps(shell, output_cap, image_cap)
    if hasattr(shell.history_manager, "outputs"):
        shell.history_manager.outputs = _NoOutputHistory()
    keep_streams_usable(shell, out, err)
    threads_keep_their_cell(out, err, shell.display_pub)
    app.kernel._no_raw_input = _no_input  # input() with allow_stdin=False
    preload(shell)
    app.start()


def main(argv: list[str]) -> None:
    run_kernel(argv, harden())


if __name__ == "__main__":
    main(sys.argv[1:])
