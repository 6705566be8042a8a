"""Kernels forked from a warm template (local backend, root service with bwrap): the same
kernels as spawned ones (protocol, interrupts, displays and plots), as isolated from each
other, the template holding nothing of any session, and a dead template replaced while
kernels are spawned meanwhile, with no process left behind.

Real kernels throughout; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path

import psutil
import pytest

from kernelbox_server.sandbox.backends.local import LocalBackend, LocalKernel
from kernelbox_server.sandbox.backends.local_forked import ForkedKernel
from kernelbox_server.sandbox.files import FileIO, FileLimits
from kernelbox_server.sandbox.pool import KernelPool
from kernelbox_server.sandbox.session import KernelSession, SessionOptions
from kernelbox_server.sandbox.workdirs import Workdirs

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("bwrap") is None,
    reason="forked kernels need a root service with bwrap",
)


@pytest.fixture
async def forking():
    backend = LocalBackend(kernels="forked")
    assert await backend.template.ready() is not None, backend.template.last_error
    yield backend
    ours = _template_tree(backend)
    await backend.close()
    await _until(lambda: not any(map(_running, ours)), 10, "template processes left behind")


async def _until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


def _template_tree(backend: LocalBackend) -> set[int]:
    """The pids of this backend's template sandbox and all it forked (other backends of the
    test session, test_engine's or a served one's, have templates of their own)."""
    handle = backend.template.handle
    if handle is None:
        return set()
    root = psutil.Process(handle.pid)
    return {root.pid, *(p.pid for p in root.children(recursive=True))}


def _template_pid(backend: LocalBackend) -> int:
    """The template's own process (not bwrap's, whose command line names the script too, nor
    a fork): the oldest python with its script."""
    handle = backend.template.handle
    assert handle is not None
    tree = psutil.Process(handle.pid).children(recursive=True)
    ours = [
        p
        for p in tree
        if os.path.basename(p.exe()).startswith("python")
        and any("kernel_template_boot.py" in a for a in p.cmdline())
    ]
    return min(ours, key=lambda p: (p.create_time(), p.pid)).pid


async def _session(backend: LocalBackend, tmp_path: Path, name: str) -> KernelSession:
    workdir = tmp_path / name
    workdir.mkdir()
    os.chmod(tmp_path, 0o755)
    return await KernelSession.start(backend, workdir, options=SessionOptions())


async def _run(session: KernelSession, code: str, timeout: float = 30):
    result = await session.execute(code, timeout, None)
    assert result.error is None, result.error
    return result


def _mount_of(path: Path) -> tuple[str, str] | None:
    """(filesystem type, its options) of the mount at `path`, or None."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(path):
                after = fields.index("-")
                return fields[after + 1], fields[after + 3]
    return None


async def test_a_throwaway_kernels_directory_is_a_bounded_tmpfs_left_by_nothing(forking, tmp_path):
    """A one-shot kernel's working directory (KernelPool.fresh, as /run_jupyter uses) is a
    tmpfs of the disk limit, not an ext4 image: the limit holds, and its removal leaves
    neither a mount nor a directory."""
    disk = 16 * 1024**2
    workdirs = Workdirs(tmp_path / "data", FileIO(), disk_bytes=disk, mount="always")
    pool = KernelPool(forking, workdirs, min_idle=0)
    warm = await pool.fresh()
    workspace = workdirs.workspace(warm.workdir, warm.id, FileLimits())
    workspace.adopt(warm.kernel.proc)
    session = KernelSession(forking, warm.kernel, workspace, options=SessionOptions())
    try:
        fstype, options = _mount_of(warm.workdir)
        assert fstype == "tmpfs" and f"size={disk // 1024}k" in options, options
        assert not (warm.workdir.parent / "disk.img").exists()
        result = await session.execute(
            "with open('fill', 'wb') as f:\n    f.write(b'x' * (32 * 1024**2))", 30, None
        )
        assert result.status == "error", result
        assert "No space left" in result.error.value or result.error.name == (
            "DiskQuotaExceeded"
        ), result.error
    finally:
        await session.close()
        await workspace.remove()
        await pool.close()
        await workdirs.close()
    assert _mount_of(warm.workdir) is None
    assert not warm.workdir.parent.exists()


async def test_a_forked_kernel_is_a_full_kernel(forking, tmp_path):
    started = time.monotonic()
    session = await _session(forking, tmp_path, "a")
    took = time.monotonic() - started
    try:
        assert isinstance(session.kernel.proc, ForkedKernel)
        assert took < 5, took
        result = await _run(session, "x = 40\nprint('hi')\nx + 2")
        assert result.stdout == "hi\n"
        assert result.results[0].data["text/plain"] == "42"
        assert (await _run(session, "x")).results[0].data["text/plain"] == "40"  # state kept
        # the preload and inline plots, as in a spawned kernel
        plot = await _run(session, "plt.plot([1, 2, 3]); plt.show()")
        assert plot.images, plot
        shown = await _run(
            session, "from IPython.display import display, HTML\ndisplay(HTML('<b>x</b>'))"
        )
        assert any("text/html" in r.data for r in shown.results), shown
        # an interrupt stops a busy cell, and the kernel goes on
        running = asyncio.ensure_future(
            session.execute("import time\nwhile True: time.sleep(0.01)", 60, None)
        )
        await asyncio.sleep(1.0)
        assert await session.interrupt()
        interrupted = await asyncio.wait_for(running, 30)
        assert interrupted.error is not None and interrupted.error.name == "KeyboardInterrupt"
        assert (await _run(session, "x + 1")).results[0].data["text/plain"] == "41"
        # each kernel draws its own random numbers (numpy's state is not the template's)
        other = await _session(forking, tmp_path, "b")
        try:
            draws = [
                (await _run(s, "np.random.rand()")).results[0].data["text/plain"]
                for s in (session, other)
            ]
            assert draws[0] != draws[1]
        finally:
            await other.close()
    finally:
        await session.close()


PROBE = """
import json, os, socket, errno
def attempt(fn):
    try:
        fn(); return "allowed"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, repr(exc))
open("/tmp/mine", "w").write("secret")
listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen()
status = {l.split(":")[0]: l.split()[1:] for l in open("/proc/self/status")}
print(json.dumps({
    "uid": os.getuid(), "pid": os.getpid(),
    "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "port": listener.getsockname()[1], "cwd": os.getcwd(),
    "tmp": sorted(os.listdir("/tmp")), "cap_eff": int(status["CapEff"][0], 16),
    "ipc": os.readlink("/proc/self/ns/ipc"), "net": os.readlink("/proc/self/ns/net"),
    "mnt": os.readlink("/proc/self/ns/mnt"),
}))
"""


async def test_two_forked_sessions_are_isolated_from_each_other(forking, tmp_path):
    a = await _session(forking, tmp_path, "a")
    b = await _session(forking, tmp_path, "b")
    try:
        seen = [json.loads((await _run(s, PROBE)).stdout) for s in (a, b)]
        assert seen[0]["uid"] != seen[1]["uid"]
        assert 0 not in (seen[0]["uid"], seen[1]["uid"])
        assert seen[0]["cap_eff"] == seen[1]["cap_eff"] == 0
        for s in seen:
            assert s["cwd"] == "/home/sandbox/work"
            assert s["tmp"] == ["ipython", "matplotlib", "mine"] or "mine" in s["tmp"]
            assert len(s["pids"]) <= 3, s["pids"]  # its PID 1, the kernel, this cell's nothing
        for key in ("ipc", "net", "mnt"):
            assert seen[0][key] != seen[1][key], key
        host_pid_a = a.kernel.proc.init_pid
        (tmp_path / "a" / "only-a").write_text("a's")
        attempts = json.loads(
            (
                await _run(
                    b,
                    PROBE.split("open(")[0]
                    + f"""
import signal
print(json.dumps({{
    "a_file": attempt(lambda: open("/proc/{host_pid_a}/root/home/sandbox/work/only-a")),
    "a_dir": os.path.exists("only-a"),
    "signal_a": attempt(lambda: os.kill({host_pid_a}, signal.SIGKILL)),
    "connect_a": attempt(lambda: socket.create_connection(("127.0.0.1", {seen[0]["port"]}), 2)),
    "template_socket": os.path.exists("/run/kernelbox/kt.sock"),
    "shm": sorted(os.listdir("/dev/shm")),
}}))
""",
                )
            ).stdout
        )
        assert attempts["a_file"] != "allowed"
        assert attempts["a_dir"] is False
        assert attempts["signal_a"] == "ESRCH"  # not even visible
        assert attempts["connect_a"] == "ECONNREFUSED"  # its own loopback, nobody there
        assert attempts["template_socket"] is False
        assert (await _run(a, "print(open('only-a').read())")).stdout == "a's\n"
        assert a.kernel.alive
    finally:
        await a.close()
        await b.close()


def _memory_holds(pid: int, needle: bytes) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        regions = [line.split() for line in f]
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for region in regions:
            start, end = (int(x, 16) for x in region[0].split("-"))
            if "r" not in region[1] or (len(region) > 5 and region[5] in ("[vvar]", "[vsyscall]")):
                continue
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    return True
            except OSError:
                continue
    return False


async def test_the_template_holds_nothing_of_a_session(forking, tmp_path):
    session = await _session(forking, tmp_path, "a")
    try:
        secret = os.urandom(16).hex()
        await _run(session, f"secret = '{secret}'\nopen('s.txt', 'w').write(secret)")
        template = _template_pid(forking)
        key = session.kernel.proc.connection_info["key"]
        assert not await asyncio.to_thread(_memory_holds, template, secret.encode())
        assert not await asyncio.to_thread(_memory_holds, template, key.encode())
        environ = Path(f"/proc/{template}/environ").read_bytes()
        assert b"KERNELBOX_RUN_AS" not in environ
    finally:
        await session.close()


async def test_a_dead_template_is_replaced_and_kernels_are_spawned_meanwhile(forking, tmp_path):
    before = await _session(forking, tmp_path, "before")
    try:
        first = forking.template.handle
        psutil.Process(_template_pid(forking)).kill()
        # its kernels die with it (they live in its PID namespace): the session says so
        await asyncio.wait_for(before.kernel.proc.wait(), 30)
        await _until(lambda: first._proc.returncode is not None, 30, "template's sandbox gone")
        # the next start replaces it; until it serves, kernels are spawned
        meanwhile = await _session(forking, tmp_path, "meanwhile")
        try:
            assert isinstance(meanwhile.kernel.proc, LocalKernel)
            assert (await _run(meanwhile, "1 + 1")).results[0].data["text/plain"] == "2"
        finally:
            await meanwhile.close()
        assert await forking.template.ready() is not None
        assert forking.template.handle is not first
        assert forking.template.restarts == 1
        after = await _session(forking, tmp_path, "after")
        try:
            assert isinstance(after.kernel.proc, ForkedKernel)
            assert (await _run(after, "2 + 2")).results[0].data["text/plain"] == "4"
        finally:
            await after.close()
    finally:
        await before.close()


async def test_no_process_is_left_behind(tmp_path):
    backend = LocalBackend(kernels="forked")
    assert await backend.template.ready() is not None, backend.template.last_error
    sessions = [await _session(backend, tmp_path, f"s{i}") for i in range(3)]
    await _run(
        sessions[0],
        "import subprocess\np = subprocess.Popen(['sleep', '1000'], start_new_session=True)",
    )
    pids = [s.kernel.proc.init_pid for s in sessions]
    await sessions[1].close()
    await _until(lambda: not psutil.pid_exists(pids[1]), 10, "a closed session's PID 1 gone")
    ours = _template_tree(backend)
    await backend.close()
    await _until(lambda: not any(map(_running, ours)), 10, "template processes left behind")
    await _until(lambda: not any(_running(p) for p in pids), 10, "forked kernels left behind")


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def env_under_tmp():
    """This test's Python environment, seen at a path under /tmp (a bind mount)."""
    import subprocess
    import sys
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="kb-venv-", dir="/tmp")) / "env"
    path.mkdir()
    subprocess.run(["mount", "--bind", sys.prefix, str(path)], check=True)
    yield path
    subprocess.run(["umount", str(path)], check=True)
    shutil.rmtree(path.parent)


async def test_a_python_environment_under_tmp_is_still_there_in_a_fork(tmp_path, env_under_tmp):
    """A fork mounts a fresh /tmp (and /mnt, /data) over the template's: an environment that
    lives there (a clone under /tmp, a venv on /data) is bound back, read-only."""
    backend = LocalBackend(kernels="forked", python=str(env_under_tmp / "bin" / "python"))
    try:
        assert await backend.template.ready() is not None, backend.template.last_error
        session = await _session(backend, tmp_path, "a")
        try:
            assert isinstance(session.kernel.proc, ForkedKernel)
            probe = (
                "import sys, numpy, os\n"
                "print(sys.prefix, os.access(sys.prefix, os.W_OK), os.access('/tmp', os.W_OK))"
            )
            assert (await _run(session, probe)).stdout == f"{env_under_tmp} False True\n"
        finally:
            await session.close()
    finally:
        await backend.close()
