"""One key takes at most its own share: its load never makes another key's request fail."""

from __future__ import annotations

import asyncio
from datetime import datetime

from tests.hostile.harness import BYSTANDER, new_session


async def test_one_key_cannot_take_every_slot(hostile):
    async with hostile.client() as c, hostile.client(BYSTANDER) as other:
        held = []
        while (created := await c.post("/v1/sessions", json={})).status_code == 201:
            held.append(created.json()["id"])
            assert len(held) <= 12, "no per-key limit"
        assert created.status_code == 429 and "Retry-After" in created.headers
        assert len(held) == 6, "a key's share of 12 slots among 2 keys"
        # The other key is not locked out, neither for sessions nor one-shot runs.
        sid = await new_session(other)
        ran = await other.post("/v1/execute", json={"code": "print(1)"})
        assert ran.status_code == 200 and ran.json()["stdout"] == "1\n"
        assert (await other.delete(f"/v1/sessions/{sid}")).status_code == 204


async def test_one_shot_runs_of_one_key_are_bounded(hostile):
    slow = {"code": "import time; time.sleep(4)", "timeout": 20}
    async with hostile.client() as c, hostile.client(BYSTANDER) as other:
        runs = [asyncio.create_task(c.post("/v1/execute", json=slow)) for _ in range(4)]
        await asyncio.sleep(1.5)  # the four are under way (each takes a kernel for 4 s)
        extra = await c.post("/run_code", json={"code": "print(1)", "language": "python"})
        assert extra.status_code == 200 and extra.json()["status"] == "SandboxError"
        assert "one-shot runs" in extra.json()["message"]
        mine = await other.post("/run_code", json={"code": "print(2)", "language": "python"})
        assert mine.json()["run_result"]["stdout"] == "2\n"
        assert all(r.status_code == 200 for r in await asyncio.gather(*runs))


async def test_idle_timeouts_are_capped_and_implicit_sessions_short(hostile):
    async with hostile.client() as c:
        long = (await c.post("/v1/sessions", json={"idle_timeout": 86400})).json()
        life = datetime.fromisoformat(long["expires_at"]) - datetime.fromisoformat(
            long["last_used_at"]
        )
        assert life.total_seconds() <= 3600
        called = await c.post("/v1/tools/code_interpreter", json={"arguments": {"code": "z = 1"}})
        info = (await c.get(f"/v1/sessions/{called.json()['session_id']}")).json()
        life = datetime.fromisoformat(info["expires_at"]) - datetime.fromisoformat(
            info["last_used_at"]
        )
        assert life.total_seconds() <= 300
