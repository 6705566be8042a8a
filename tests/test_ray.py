"""The Ray mode on real Ray clusters on this machine: one node, and three (tests/ray_cluster.py).

Two fronts (real `kernelbox serve` processes) over each; the tests talk to them over HTTP, and
to the hosts directly through the Python API, as RL code in the cluster would. The same suite
runs on both clusters. Node loss adds a node, lets sessions land on it, and removes it (its
raylet killed): on one node and on three alike.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

ray = pytest.importorskip("ray", reason="the Ray mode needs the `ray` extra")
from kernelbox_server.service.cluster.engine import RayEngine, open_ray_engine  # noqa: E402
from kernelbox_server.service.cluster.host import host_name  # noqa: E402
from kernelbox_server.service.settings import Settings  # noqa: E402
from tests.ray_cluster import (  # noqa: E402
    KEY_B,
    NODE,
    RayDeployment,
    create,
    ray_deployment,
    run,
    wait_for,
)


@pytest.fixture(scope="module", params=[1, 3], ids=["one node", "three nodes"])
def deployment(request) -> Iterator[RayDeployment]:
    with ray_deployment(request.param) as deployment:
        yield deployment


@pytest.fixture
async def kernels(deployment) -> AsyncIterator[RayEngine]:
    """The Python API, in this process (a driver of the cluster, as an RL trainer is)."""
    async with open_ray_engine(Settings(cluster="ray")) as engine:
        yield engine


async def host_counts(kernels: RayEngine) -> dict[str, int]:
    return await kernels.directory.counts.remote()


# -- routing ---------------------------------------------------------------------------------


async def test_new_sessions_spread_evenly_over_the_hosts(deployment, kernels):
    hosts = await kernels.directory.live_hosts.remote()
    assert len(hosts) == deployment.nodes
    before = await host_counts(kernels)
    with deployment.fronts[0].client() as client:
        ids = [create(client) for _ in range(2 * deployment.nodes)]
        try:
            after = await host_counts(kernels)
            added = [after.get(h, 0) - before.get(h, 0) for h in hosts]
            assert sum(added) == len(ids)
            # Most room first: equal hosts that started equal end equal.
            assert max(after.get(h, 0) for h in hosts) - min(after.get(h, 0) for h in hosts) <= 1
        finally:
            for sid in ids:
                assert client.delete(f"/v1/sessions/{sid}").status_code == 204


async def test_any_front_serves_any_session_with_its_variables(deployment):
    a, b = deployment.fronts[0].client(), deployment.fronts[1].client()
    with a, b:
        sid = create(a)
        assert run(a, sid, "x = 20")["status"] == "ok"
        assert run(b, sid, "x += 1\nprint(x)")["stdout"] == "21\n"
        assert run(a, sid, "print(x * 2)")["stdout"] == "42\n"
        assert b.get(f"/v1/sessions/{sid}").json()["execution_count"] == 3
        assert sid in [s["id"] for s in b.get("/v1/sessions").json()]
        assert b.delete(f"/v1/sessions/{sid}").status_code == 204
        assert a.get(f"/v1/sessions/{sid}").status_code == 404


async def test_another_key_gets_404_on_every_front(deployment):
    with deployment.fronts[0].client() as a, deployment.fronts[1].client(KEY_B) as b:
        sid = create(a)
        try:
            assert b.get(f"/v1/sessions/{sid}").status_code == 404
            response = b.post(f"/v1/sessions/{sid}/execute", json={"code": "1"})
            assert response.status_code == 404
            assert sid not in [s["id"] for s in b.get("/v1/sessions").json()]
        finally:
            a.delete(f"/v1/sessions/{sid}")


async def test_a_stream_carries_output_as_it_arrives(deployment):
    code = "import time\nprint('first', flush=True)\ntime.sleep(1.5)\nprint('second')"
    with deployment.fronts[1].client() as client:
        sid = create(client)
        try:
            events = []
            started = time.monotonic()
            with client.stream(
                "POST", f"/v1/sessions/{sid}/execute", json={"code": code, "stream": True}
            ) as response:
                kind = None
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        kind = line.split(":", 1)[1].strip()
                    elif line.startswith("data:"):
                        data = json.loads(line.split(":", 1)[1])
                        events.append((kind, data, time.monotonic() - started))
            assert events[0][:2] == ("stdout", {"text": "first\n"})
            assert events[-1][0] == "end" and events[-1][1]["stdout"] == "first\nsecond\n"
            # The first line came through the hop before the sleep ended.
            assert events[-1][2] - events[0][2] >= 1.0
        finally:
            client.delete(f"/v1/sessions/{sid}")


async def test_files_and_the_notebook_come_from_the_sessions_host(deployment):
    with deployment.fronts[0].client() as a, deployment.fronts[1].client() as b:
        sid = create(a)
        try:
            assert (
                a.put(f"/v1/sessions/{sid}/files/in/data.csv", content=b"x\n1\n2\n").status_code
                == 201
            )
            out = run(
                b,
                sid,
                "import pandas as pd\nprint(pd.read_csv('in/data.csv').x.sum())\n"
                "open('out.txt', 'w').write('made here')",
            )
            assert out["stdout"] == "3\n"
            listed = {f["path"]: f["size"] for f in b.get(f"/v1/sessions/{sid}/files").json()}
            assert listed["in/data.csv"] == 6 and listed["out.txt"] == 9
            assert a.get(f"/v1/sessions/{sid}/files/out.txt").content == b"made here"
            assert b.delete(f"/v1/sessions/{sid}/files/out.txt").status_code == 204
            assert a.get(f"/v1/sessions/{sid}/files/out.txt").status_code == 404
            assert a.get(f"/v1/sessions/{sid}/files/../x").status_code in (400, 404)
            notebook = b.get(f"/v1/sessions/{sid}/notebook").json()
            assert "read_csv" in "".join(notebook["cells"][0]["source"])
        finally:
            a.delete(f"/v1/sessions/{sid}")


async def test_one_shot_runs_go_to_a_host(deployment):
    with deployment.fronts[0].client() as client:
        response = client.post("/v1/execute", json={"code": "print(6 * 7)"})
        assert response.status_code == 200 and response.json()["stdout"] == "42\n"
        response = client.post("/run_code", json={"code": "print('rc')", "language": "python"})
        assert response.status_code == 200, response.text
        assert response.json()["run_result"]["stdout"] == "rc\n"
        response = client.post("/run_jupyter", json={"cells": ["a = 2", "print(a + 1)"]})
        assert response.status_code == 200, response.text
        assert response.json()["cells"][1]["stdout"] == "3\n"


def test_readiness_reports_every_host(deployment):
    report = httpx.get(f"{deployment.fronts[0].url}/readyz", timeout=30).json()
    assert len([h for h in report["hosts"].values() if h.get("ready")]) == deployment.nodes
    metrics = httpx.get(f"{deployment.fronts[1].url}/metrics", timeout=30).text
    assert "kernelbox_pool_idle_kernels" in metrics


# -- the Python API --------------------------------------------------------------------------


async def test_python_api_gives_the_same_executions_without_http(deployment, kernels):
    session = await kernels.create("rollout")
    try:
        direct = await kernels.execute(session.id, "rollout", "y = 6 * 7\nprint(y)\ny")
        assert direct.status == "ok" and direct.stdout == "42\n"
        assert direct.results[0].data["text/plain"] == "42"
        # The same session through HTTP does not exist for another owner (the key's id).
        with deployment.fronts[0].client() as client:
            assert client.get(f"/v1/sessions/{session.id}").status_code == 404
            sid = create(client)
            over_http = run(client, sid, "y = 6 * 7\nprint(y)\ny")
            client.delete(f"/v1/sessions/{sid}")
        assert over_http["stdout"] == direct.stdout and over_http["status"] == direct.status
        assert over_http["results"][0]["data"] == direct.results[0].data
        # A host's own actor handle, for code that wants Ray's ObjectRefs.
        where = await kernels.directory.locate.remote(session.id)
        again = await kernels.host(where.host).call.remote("execute", session.id, "rollout", "y")
        assert again.results[0].data["text/plain"] == "42"
        assert await kernels.list("rollout") == [await kernels.get(session.id, "rollout")]
    finally:
        await kernels.delete(session.id, "rollout")


# -- failures --------------------------------------------------------------------------------


async def test_a_front_that_dies_loses_nothing(deployment):
    doomed = deployment.start_front()
    with doomed.client() as client:
        sid = create(client)
        assert run(client, sid, "kept = 'still here'")["status"] == "ok"
    doomed.stop(signal.SIGKILL)
    with deployment.fronts[0].client() as other:
        assert run(other, sid, "print(kept)")["stdout"] == "still here\n"
        assert other.get(f"/v1/sessions/{sid}").json()["status"] == "idle"
        assert other.delete(f"/v1/sessions/{sid}").status_code == 204


async def test_a_host_that_dies_on_a_live_node_comes_back_with_its_sessions_files(
    deployment, kernels
):
    with deployment.fronts[0].client() as client, deployment.fronts[1].client() as other:
        sid = create(client)
        run(client, sid, "x = 1\nopen('kept.txt', 'w').write('on disk')")
        name = (await kernels.directory.locate.remote(sid)).host
        ray.kill(kernels.host(name))  # the host's process (and its kernels); the node lives on
        # Lost until a front's next round starts a host on that node again, which restores
        # the node's sessions from its data directory.
        wait_for(
            lambda: client.get(f"/v1/sessions/{sid}").json()["status"] not in ("lost",),
            120,
            "the session back on a new host",
        )
        again = run(other, sid, "print(open('kept.txt').read())")
        assert again["stdout"] == "on disk\n" and again["kernel_restarted"] is True
        assert run(client, sid, "x")["error"]["name"] == "NameError"
        assert client.delete(f"/v1/sessions/{sid}").status_code == 204


async def test_a_lost_node_takes_only_its_own_sessions(deployment, kernels):
    with deployment.fronts[0].client() as client:
        # Two a host: the new node's host is then the emptiest for two sessions in a row.
        survivors = [create(client) for _ in range(2 * deployment.nodes)]
        for i, sid in enumerate(survivors):
            run(client, sid, f"mine = {i}")
        node = deployment.cluster.add_node(**NODE)
        deployment.cluster.wait_for_nodes()
        doomed_host = host_name(node.node_id)
        # A front starts a host on a node that joins (within a round of ensure_hosts).
        wait_for(
            lambda: doomed_host in ray.get(kernels.directory.live_hosts.remote()),
            120,
            "a host on the new node",
        )
        # The new host has the most room: the next sessions go there.
        doomed = [create(client) for _ in range(2)]
        where = {sid: ray.get(kernels.directory.locate.remote(sid)).host for sid in doomed}
        assert set(where.values()) == {doomed_host}
        for sid in doomed:
            run(client, sid, "gone = True")

        deployment.cluster.remove_node(node)  # its raylet and everything on it killed
        # Ray's control store finds the node dead within its health-check period; until
        # then a call to its host may answer 503 (unreachable, retry).
        wait_for(
            lambda: doomed_host not in ray.get(kernels.directory.live_hosts.remote()),
            60,
            "the lost node's host counted lost",
        )

        for sid in doomed:
            lost = run(client, sid, "print(gone)")
            assert lost["status"] == "died"
            assert "machine running this session was lost" in lost["error"]["value"]
            assert client.get(f"/v1/sessions/{sid}").json()["status"] == "lost"
            assert client.post(f"/v1/sessions/{sid}/restart").status_code == 410
        with deployment.fronts[1].client() as other:
            for i, sid in enumerate(survivors):
                assert run(other, sid, "print(mine)")["stdout"] == f"{i}\n"
            fresh = [create(other) for _ in range(3)]
            placed = {ray.get(kernels.directory.locate.remote(s)).host for s in fresh}
            assert doomed_host not in placed
            # Ready again once the live host's pool has a warm kernel (the creates took it).
            wait_for(lambda: other.get("/readyz").status_code == 200, 120, "ready again")
            for sid in doomed:
                assert other.delete(f"/v1/sessions/{sid}").status_code == 204
                assert other.get(f"/v1/sessions/{sid}").status_code == 404
            for sid in survivors + fresh:
                assert other.delete(f"/v1/sessions/{sid}").status_code == 204
