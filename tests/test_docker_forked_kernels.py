"""The Docker backend's throwaway kernels (/run_jupyter's), forked in a kernel-template
container: full kernels (protocol, interrupts, inline plots), each its own uid that cannot
read or signal another, no container of their own, and nothing left when they end: no
process of their uid, no file in the shared /tmp, no socket or working directory on the host.

Real containers and kernels throughout; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from kernelbox_server.sandbox.backends.docker_forked import ForkedDockerKernel
from kernelbox_server.sandbox.files import FileIO, FileLimits
from kernelbox_server.sandbox.pool import KernelPool
from kernelbox_server.sandbox.session import KernelSession, SessionOptions
from kernelbox_server.sandbox.workdirs import Workdirs
from tests.support import make_backend

pytestmark = pytest.mark.docker


@pytest.fixture
async def oneshots(tmp_path):
    """(backend, a function that starts one throwaway session as /run_jupyter does)."""
    backend = make_backend("docker")
    workdirs = Workdirs(tmp_path / "data", FileIO(), disk_bytes=64 * 1024**2, mount="auto")
    pool = KernelPool(backend, workdirs, min_idle=0)
    sessions: list[KernelSession] = []

    async def start() -> KernelSession:
        warm = await pool.fresh()
        workspace = workdirs.workspace(warm.workdir, warm.id, FileLimits())
        workspace.adopt(warm.kernel.proc)
        session = KernelSession(backend, warm.kernel, workspace, options=SessionOptions())
        sessions.append(session)
        return session

    try:
        yield backend, start
    finally:
        for session in sessions:
            await session.close()
            await session.workspace.remove()
        await pool.close()
        await workdirs.close()
        await backend.close()
    assert not backend.containers(), "containers left behind"
    assert backend.oneshot_dir is not None and not backend.oneshot_dir.exists()


async def _run(session: KernelSession, code: str, timeout: float = 60):
    result = await session.execute(code, timeout, None)
    assert result.error is None, (result.error, result.stderr)
    return result


async def _json(session: KernelSession, code: str):
    return json.loads((await _run(session, code)).stdout.strip().splitlines()[-1])


async def _until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.1)


WHO = "import json, os\nprint(json.dumps([os.getuid(), os.getpid(), os.getcwd()]))"


async def test_throwaway_kernels_are_forked_full_kernels_kept_apart(oneshots):
    backend, start = oneshots
    first, second = await asyncio.gather(start(), start())
    for session in (first, second):
        assert isinstance(session.kernel.proc, ForkedDockerKernel)
    # One container for both: the kernel template's.
    assert len(backend.containers()) == 1
    (uid_a, pid_a, cwd_a), (uid_b, _pid_b, cwd_b) = [await _json(s, WHO) for s in (first, second)]
    assert uid_a != uid_b and min(uid_a, uid_b) >= 1_000_000, (uid_a, uid_b)
    assert cwd_a != cwd_b

    # The limits and privileges of a kernel container's kernel, per kernel.
    # (no_new_privs through prctl: gVisor's /proc/self/status has no NoNewPrivs line)
    limits = await _json(
        first,
        "import ctypes, json, os, resource\n"
        "status = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines()"
        " if ':\\t' in l)\n"
        "print(json.dumps([resource.getrlimit(resource.RLIMIT_AS)[0],"
        " resource.getrlimit(resource.RLIMIT_NPROC)[0], os.nice(0), status['CapEff'].strip(),"
        " ctypes.CDLL(None).prctl(39, 0, 0, 0, 0)]))",
    )
    lim = backend.config.limits
    assert limits == [lim.memory_bytes, lim.pids, lim.nice, "0000000000000000", 1], limits

    # Files the service writes are the kernel's; what the kernel writes, the service reads.
    await first.workspace.write("given.txt", b"from the host")
    assert (await _run(first, "print(open('given.txt').read())")).stdout == "from the host\n"
    await _run(first, "open('made.txt', 'w').write('by the kernel'); open('/tmp/a-left', 'w')")
    assert await first.workspace.read("made.txt") == b"by the kernel"

    # The other cannot read the first's files, nor signal it.
    probe = f"""
import json, os, signal
out = []
for attempt in (lambda: os.listdir({cwd_a!r}), lambda: open({cwd_a!r} + '/made.txt').read(),
                lambda: os.kill({pid_a}, signal.SIGKILL)):
    try:
        attempt()
        out.append('allowed')
    except OSError as exc:
        out.append(type(exc).__name__)
print(json.dumps(out))
"""
    assert await _json(second, probe) == ["PermissionError"] * 3

    # An interrupt stops the cell, not the kernel; plots come back inline.
    timed_out = await second.execute("import time\ntime.sleep(60)", 2, None)
    assert timed_out.status == "timeout", timed_out
    plot = await _run(second, "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()")
    assert [i.mime for i in plot.images] == ["image/png"], plot

    # Ended, the first leaves nothing: no process of its uid, no file in the shared /tmp,
    # no socket directory or working directory on the host.
    proc = first.kernel.proc
    assert isinstance(proc, ForkedDockerKernel)
    runtime_dir, workdir = proc.runtime_dir, proc.workdir
    await first.close()
    await first.workspace.remove()
    assert not runtime_dir.exists() and not workdir.exists()
    left = (
        "import json, os\n"
        f"uids = [os.stat(f'/proc/{{p}}').st_uid for p in os.listdir('/proc') if p.isdigit()]\n"
        f"print(json.dumps([{uid_a} in uids, os.path.exists('/tmp/a-left')]))"
    )

    async def swept() -> bool:
        return await _json(second, left) == [False, False]

    await _until(swept, 30, "the first kernel's processes and /tmp files swept")


async def test_a_kernel_that_dies_says_so_and_the_template_serves_the_next(oneshots):
    backend, start = oneshots
    session = await start()
    died = await session.execute(
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", 30, None
    )
    assert died.status == "died", died
    assert "signal 9" in (died.error.value if died.error else ""), died
    again = await start()
    assert isinstance(again.kernel.proc, ForkedDockerKernel)
    assert (await _run(again, "print(6 * 7)")).stdout == "42\n"
    assert len(backend.containers()) == 1


async def test_a_dead_kernel_template_is_replaced_and_its_kernels_end_with_it(oneshots):
    backend, start = oneshots
    session = await start()
    forker = backend._forker
    assert forker is not None and forker.template is not None
    old = forker.template.proc
    old.container.kill()  # as an OOM kill of the whole container would
    died = await session.execute("print(1)", 30, None)
    assert died.status == "died", died

    await session.close()  # its restart, if it came first, replaced the template
    again = await start()
    assert isinstance(again.kernel.proc, ForkedDockerKernel)
    assert forker.template.proc is not old
    assert (await _run(again, "print('after')")).stdout == "after\n"
    assert [c.id for c in backend.containers()] == [forker.template.proc.container_id]
