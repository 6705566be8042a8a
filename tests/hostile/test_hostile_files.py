"""What a session leaves in its working directory never stalls, floods or fools the host."""

from __future__ import annotations

import asyncio
import os
import stat
import time

from tests.hostile.harness import BYSTANDER, execute, new_session

DEEP_TREE = """
import os
top = os.open('.', os.O_RDONLY)
for _ in range(1500):
    os.mkdir('d')
    os.chdir('d')
open('bottom.txt', 'w').write('deep')
os.fchdir(top)
"""


async def test_a_fifo_in_fetch_files_answers_at_once(hostile):
    async with hostile.client() as c:
        started = time.monotonic()
        answer = await c.post(
            "/run_jupyter",
            json={"cells": ["import os; os.mkfifo('pipe')"], "fetch_files": ["pipe"]},
        )
        assert time.monotonic() - started < 30
    body = answer.json()
    assert answer.status_code == 200 and body["status"] == "Success", body
    assert "pipe" not in body["files"]
    # (Under gVisor a FIFO made by code stays inside the sandbox: the host finds no file.)
    assert "not a regular file" in body["message"] or hostile.gvisor, body["message"]


async def test_fifos_through_the_file_routes_fail_alone(hostile):
    async with hostile.client() as c, hostile.client(BYSTANDER) as bystander:
        sid = await new_session(c)
        made = await execute(c, sid, "import os\nfor i in range(8): os.mkfifo(f'p{i}')")
        assert made["status"] == "ok", made
        # gVisor keeps a FIFO made by code inside the sandbox: the host sees no file there.
        on_host = not hostile.gvisor
        if on_host:
            assert stat.S_ISFIFO(os.lstat(hostile.workdir_of(sid) / "p0").st_mode)
        reads = [c.get(f"/v1/sessions/{sid}/files/p{i}") for i in range(8)]
        writes = [c.put(f"/v1/sessions/{sid}/files/p{i}", content=b"x") for i in range(2)]
        answers = await asyncio.wait_for(asyncio.gather(*reads, *writes), 30)
        assert [a.status_code for a in answers] == [404] * 8 + ([400] if on_host else [201]) * 2
        # Another session's files are reached as ever, and the FIFOs took nothing with them.
        up = await bystander.put(f"/v1/sessions/{hostile.bystander}/files/note.txt", content=b"hi")
        assert up.status_code == 201
        down = await bystander.get(f"/v1/sessions/{hostile.bystander}/files/note.txt")
        assert down.content == b"hi"
        listed = await c.get(f"/v1/sessions/{sid}/files")
        uploaded = [] if on_host else ["p0", "p1"]  # gVisor: the uploads made regular files
        assert listed.status_code == 200 and [f["path"] for f in listed.json()] == uploaded


async def test_a_deep_tree_is_listed_and_deleted_and_frees_its_slot(hostile):
    async with hostile.client() as c:
        for _ in range(3):
            sid = await new_session(c)
            made = await execute(c, sid, DEEP_TREE, timeout=60)
            assert made["status"] == "ok", made
            listed = await c.get(f"/v1/sessions/{sid}/files")
            assert listed.status_code == 200
            assert listed.headers.get("X-Kernelbox-Truncated") == "true"
            assert (await c.delete(f"/v1/sessions/{sid}")).status_code == 204
        # Every slot of the key's share is free again.
        sids = [await new_session(c) for _ in range(6)]
        assert (await c.post("/v1/sessions", json={})).status_code == 429
        for sid in sids:
            assert (await c.delete(f"/v1/sessions/{sid}")).status_code == 204


async def test_links_and_climbing_paths_are_refused(hostile):
    async with hostile.client() as c:
        sid = await new_session(c)
        code = (
            "import os\nos.symlink('/etc/passwd', 'link')\nos.symlink('/etc', 'outputs')\n"
            "os.mkdir('real')\nos.symlink('../..', 'real/up')"
        )
        assert (await execute(c, sid, code))["status"] == "ok"
        base = f"/v1/sessions/{sid}/files"
        for path in ("link", "outputs/passwd", "real/up/etc/passwd", "..%2F..%2Fetc%2Fpasswd"):
            got = await c.get(f"{base}/{path}")
            assert got.status_code in (400, 404), (path, got.status_code)
            assert "root:" not in got.text
        put = await c.put(f"{base}/outputs/planted.txt", content=b"x")
        assert put.status_code == 400
        # A plot is saved next to the link, never through it.
        plot = await execute(c, sid, "plt.plot([1, 2]); plt.show()")
        assert plot["images"] == [] and any("could not be saved" in n for n in plot["notes"])


async def test_fetch_files_are_bounded_per_file_and_per_answer(hostile):
    cell = (
        "import os\n"
        "for name, size in [('huge', 150 * 2**20), ('a', 30 * 2**20), ('b', 30 * 2**20), "
        "('c', 30 * 2**20)]:\n"
        "    with open(name, 'wb') as f: f.truncate(size)\n"  # sparse: no disk used
    )
    async with hostile.client() as c:
        answer = await c.post(
            "/run_jupyter", json={"cells": [cell], "fetch_files": ["huge", "a", "b", "c"]}
        )
    body = answer.json()
    assert body["status"] == "Success", body["message"]
    assert "huge" not in body["files"] and len(body["files"]) == 2, list(body["files"])
    assert "over the" in body["message"] and "left out" in body["message"]


async def test_the_disk_limit_holds_for_background_writers_and_repeated_writes(hostile):
    writer = """
import threading, os
def fill():
    chunk = b'x' * 2**20
    with open('background.bin', 'wb') as f:
        for _ in range(512):
            try:
                f.write(chunk); f.flush()
            except OSError:
                return
threading.Thread(target=fill, daemon=True).start()
"""
    async with hostile.client() as c:
        sid = await new_session(c)
        assert (await execute(c, sid, writer))["status"] == "ok"
        await asyncio.sleep(5)
        for i in range(4):
            await execute(c, sid, f"open('more-{i}.bin', 'wb').write(b'y' * 30 * 2**20)")
        files = (await c.get(f"/v1/sessions/{sid}/files")).json()
        total = sum(f["size"] for f in files)
        assert total <= 70 * 2**20, f"{total} bytes on a 64 MiB disk"
        # The session still works, and says what happened to it, if anything.
        after = await execute(c, sid, "print('still here')")
        assert after["status"] == "ok" and "still here" in after["stdout"], after
        assert (await c.delete(f"/v1/sessions/{sid}")).status_code == 204
