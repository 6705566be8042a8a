"""Whatever a session's code starts, loops or allocates, the session recovers and nothing of it
outlives the session."""

from __future__ import annotations

import asyncio
import time

import psutil

from tests.hostile.harness import Service, execute, new_session
from tests.support import container_cmdlines

ESCAPE = """
import subprocess
# Double fork, new session: out of the kernel's process group and off its process tree.
subprocess.Popen(['sh', '-c', 'setsid sh -c "sleep {mark} & sleep {mark}.5" &'],
                 start_new_session=True)
"""


def _sleepers(service: Service, mark: str) -> list:
    """Processes running `sleep MARK...`, wherever the backend runs them (in a container: as
    the container sees them, gVisor's processes not being the host's)."""
    if service.backend == "docker":
        return [
            line
            for container in service.containers()
            for line in container_cmdlines(container)
            if line.startswith(f"sleep {mark}")
        ]
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline[:1] == ["sleep"] and cmdline[-1].startswith(mark):
            found.append(proc)
    return found


async def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)


async def test_a_fork_bomb_leaves_a_working_session(hostile):
    async with hostile.client() as c:
        sid = await new_session(c)
        bomb = await execute(
            c, sid, "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass", 5
        )
        assert bomb["status"] in ("timeout", "died", "error"), bomb
        shell = await execute(c, sid, "import os\nos.system(':(){ :|:& };:')", 5)
        assert shell["status"] in ("ok", "timeout", "died", "error"), shell
        after = await execute(c, sid, "1 + 1", timeout=60)
        assert after["status"] == "ok", after
        assert after["results"][0]["data"]["text/plain"] == "2"


async def test_escaped_children_die_with_their_session(hostile):
    async with hostile.client() as c:
        for ending in ("delete", "restart"):
            mark = f"31{int(time.time() * 1000) % 10**6}"
            sid = await new_session(c)
            assert (await execute(c, sid, ESCAPE.format(mark=mark)))["status"] == "ok"
            await _wait(lambda m=mark: len(_sleepers(hostile, m)) == 2, 30, "sleepers started")
            if ending == "delete":
                assert (await c.delete(f"/v1/sessions/{sid}")).status_code == 204
            else:
                assert (await c.post(f"/v1/sessions/{sid}/restart")).status_code == 200
            await _wait(
                lambda m=mark: not _sleepers(hostile, m), 30, f"sleepers outlived the {ending}"
            )


async def test_an_endless_loop_meets_its_deadline_and_keeps_state(hostile):
    async with hostile.client() as c:
        sid = await new_session(c)
        await execute(c, sid, "kept = 7")
        started = time.monotonic()
        looped = await execute(c, sid, "while True: pass", timeout=1)
        assert time.monotonic() - started < 2.5
        assert looped["status"] == "timeout" and looped["kernel_restarted"] is False
        assert (await execute(c, sid, "kept"))["results"][0]["data"]["text/plain"] == "7"


async def test_a_memory_bomb_is_reported_and_the_session_goes_on(hostile):
    async with hostile.client() as c:
        sid = await new_session(c)
        bomb = await execute(c, sid, "x = bytearray(4 * 1024**3)")
        assert bomb["status"] in ("error", "died"), bomb
        if bomb["status"] == "error":
            assert bomb["error"]["name"] == "MemoryError"
        after = await execute(c, sid, "print('alive')", timeout=60)
        assert after["status"] == "ok" and after["stdout"] == "alive\n"
