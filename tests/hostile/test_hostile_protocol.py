"""A kernel that stops speaking the protocol properly is replaced, and the session says so."""

from __future__ import annotations

import asyncio

from tests.hostile.harness import execute, new_session

# Frames straight onto the kernel's IOPub socket, parented to the running request.
RAW_FRAMES = """
import json
k = get_ipython().kernel
parent = json.dumps(k.get_parent('shell')['header'], default=str).encode()
k.iopub_socket.send_multipart({frames})
import time; time.sleep(1)
"""


async def _replaced(c, sid: str, code: str, why: str) -> None:
    """Running `code` ends the kernel (`died`, saying `why`); the next execution works."""
    await execute(c, sid, "kept = 1")
    broken = await execute(c, sid, code)
    assert broken["status"] == "died" and broken["kernel_restarted"] is True, broken
    assert why in broken["error"]["value"], broken["error"]
    after = await execute(c, sid, "'kept' in dir()", timeout=60)
    assert after["status"] == "ok" and after["results"][0]["data"]["text/plain"] == "False"


async def test_unparsable_messages_replace_the_kernel(hostile):
    async with hostile.client() as c:
        sid = await new_session(c)
        garbage = "[b'<IDS|MSG>', b'sig', b'{not json', parent, b'{}', b'{}']"
        await _replaced(c, sid, RAW_FRAMES.format(frames=garbage), "not JSON")
        header = "json.dumps({'msg_type': 'stream', 'msg_id': 'x'}).encode()"
        unsigned = f"[b'<IDS|MSG>', b'bad', {header}, parent, b'{{}}', b'{{}}']"
        await _replaced(c, sid, RAW_FRAMES.format(frames=unsigned), "invalid signature")


async def test_messages_with_wrong_fields_replace_the_kernel(hostile):
    code = (
        "k = get_ipython().kernel\n"
        "k.session.send(k.iopub_socket, 'stream', {'name': 'stdout', 'text': 123},"
        " parent=k.get_parent('shell'))\nimport time; time.sleep(1)"
    )
    async with hostile.client() as c:
        sid = await new_session(c)
        await _replaced(c, sid, code, "not a string")


async def test_a_silent_output_channel_replaces_the_kernel(hostile):
    async with hostile.client() as c:
        sid = await new_session(c)
        mute = "k = get_ipython().kernel\nk.iopub_socket.send_multipart = lambda *a, **kw: None"
        muted = await execute(c, sid, mute)
        # The muting cell's own last messages may already be muted (they leave through the
        # IO thread): then it is the one that finds the channel silent, else the next.
        silent = muted if muted["status"] == "died" else await execute(c, sid, "1 + 1")
        assert silent["status"] == "died", silent
        assert "output channel went silent" in silent["error"]["value"]
        after = await execute(c, sid, "1 + 1", timeout=60)
        assert after["status"] == "ok" and after["results"][0]["data"]["text/plain"] == "2"


async def test_sys_stdout_none_does_not_break_the_session(hostile):
    async with hostile.client() as c:
        sid = await new_session(c)
        await execute(c, sid, "import sys\nkept = 3\nsys.stdout = None\nsys.stderr = None")
        after = await execute(c, sid, "print('back')\nkept")
        assert after["status"] == "ok" and after["stdout"] == "back\n", after
        assert after["results"][0]["data"]["text/plain"] == "3"


async def test_late_output_of_a_thread_stays_out_of_the_next_result(hostile):
    async with hostile.client() as c:
        sid = await new_session(c)
        await execute(
            c,
            sid,
            "import threading, time\n"
            "threading.Thread(target=lambda: (time.sleep(1), print('LATE')), daemon=True).start()",
        )
        await asyncio.sleep(0.3)
        nxt = await execute(c, sid, "import time\ntime.sleep(2)\nprint('mine')")
        assert nxt["stdout"] == "mine\n", nxt
