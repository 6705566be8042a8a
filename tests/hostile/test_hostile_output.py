"""What a kernel sends back is bounded on the host, before the host holds it."""

from __future__ import annotations

import json

from tests.hostile.harness import execute, new_session

# Around the kernel's own caps: straight onto its IOPub socket, as hostile code can.
RAW_DISPLAY = """
k = get_ipython().kernel
for i in range({n}):
    k.session.send(k.iopub_socket, 'display_data',
                   {{'data': {{'text/plain': 'x' * {size}}}, 'metadata': {{}}}},
                   parent=k.get_parent('shell'))
print('sent')
"""


async def test_display_payloads_past_the_budget_are_dropped_undecoded(hostile):
    async with hostile.client() as c:
        sid = await new_session(c)
        response = await c.post(
            f"/v1/sessions/{sid}/execute",
            json={"code": RAW_DISPLAY.format(n=10, size=10_000_000), "timeout": 60},
        )
        assert response.status_code == 200
        assert len(response.content) < 20 * 2**20, len(response.content)
        execution = response.json()
        assert execution["status"] == "ok", execution["error"]
        assert execution["truncated"] is True
        assert any("dropped" in note for note in execution["notes"]), execution["notes"]
        # The session goes on, variables and all.
        assert (await execute(c, sid, "y = 5\nprint(y)"))["stdout"] == "5\n"


async def test_publish_display_data_is_capped_in_the_kernel(hostile):
    code = (
        "from IPython.display import publish_display_data\n"
        "for i in range(10): publish_display_data({'text/plain': 'x' * 60_000_000})"
    )
    async with hostile.client() as c:
        sid = await new_session(c)
        response = await c.post(f"/v1/sessions/{sid}/execute", json={"code": code, "timeout": 120})
        assert len(response.content) < 20 * 2**20
        execution = response.json()
        assert execution["status"] == "ok" and len(execution["results"]) == 10, execution["error"]
        assert "characters truncated" in execution["results"][0]["data"]["text/plain"]


async def test_a_message_over_the_size_limit_replaces_the_kernel(hostile):
    async with hostile.client() as c:
        sid = await new_session(c)
        assert (await execute(c, sid, "kept = 1"))["status"] == "ok"
        big = await execute(c, sid, RAW_DISPLAY.format(n=1, size=40_000_000), timeout=60)
        assert big["status"] == "died" and big["kernel_restarted"] is True, big
        assert "over the 16777216-byte limit" in big["error"]["value"], big["error"]
        after = await execute(c, sid, "1 + 1")
        assert after["status"] == "ok" and after["results"][0]["data"]["text/plain"] == "2"


async def test_a_message_of_countless_parts_is_refused_as_it_arrives(hostile):
    """libzmq would assemble all of it before handing over the first part; the host reads
    the parts as they come and refuses the message at its 33rd."""
    code = (
        "k = get_ipython().kernel\n"
        "part = b'x' * 2**20\n"
        "k.session.send(k.iopub_socket, 'display_data', {'data': {}, 'metadata': {}},\n"
        "               parent=k.get_parent('shell'), buffers=[part] * 400)\n"
        "import time; time.sleep(2)"
    )
    async with hostile.client() as c:
        sid = await new_session(c)
        bomb = await execute(c, sid, code, timeout=60)
        assert bomb["status"] == "died", bomb
        assert "more than 32 parts" in bomb["error"]["value"], bomb["error"]
        after = await execute(c, sid, "1 + 1", timeout=60)
        assert after["status"] == "ok"


async def test_print_floods_keep_head_and_tail(hostile):
    async with hostile.client() as c:
        sid = await new_session(c)
        flood = await execute(
            c,
            sid,
            "import time\nprint('x' * 10**8)\nend = time.time() + 3\n"
            "while time.time() < end: print('y' * 1000)\nprint('the end')",
            timeout=60,
        )
        assert flood["status"] == "ok" and flood["truncated"] is True
        assert "characters truncated" in flood["stdout"]
        assert flood["stdout"].rstrip().endswith("the end")
        assert len(json.dumps(flood)) < 2 * 2**20


async def test_binary_and_invalid_unicode_output(hostile):
    async with hostile.client() as c:
        sid = await new_session(c)
        out = await execute(
            c,
            sid,
            "import os, sys\nsys.stdout.flush()\nos.write(1, bytes(range(256)))\n"
            "print('lone \\udcff surrogate')\nprint('\\x00 nul')",
        )
        assert out["status"] in ("ok", "error"), out
        assert "\ufffd" in out["stdout"]
