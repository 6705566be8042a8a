"""The HTTP service against a real uvicorn on loopback, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime

import httpx
import psutil
import pytest

from tests.server import running_server


@pytest.fixture(scope="module")
def server():
    with running_server(min_idle=2, max_sessions=48) as srv:
        yield srv


@pytest.fixture
async def client(server):
    async with server.client() as c:
        yield c


@pytest.fixture
async def session_id(client):
    created = await client.post("/v1/sessions", json={})
    sid = created.json()["id"]
    yield sid
    await client.delete(f"/v1/sessions/{sid}")


# -- the contract, field by field ------------------------------------------------------------


async def test_session_contract(client):
    created = await client.post(
        "/v1/sessions", json={"idle_timeout": 120, "metadata": {"user": "alice"}}
    )
    assert created.status_code == 201
    body = created.json()
    assert set(body) == {
        "id",
        "status",
        "created_at",
        "last_used_at",
        "expires_at",
        "execution_count",
        "metadata",
    }
    assert body["status"] == "idle"
    assert body["execution_count"] == 0
    assert body["metadata"] == {"user": "alice"}
    created_at = datetime.fromisoformat(body["created_at"])
    expires_at = datetime.fromisoformat(body["expires_at"])
    assert 119 <= (expires_at - created_at).total_seconds() <= 121
    sid = body["id"]

    assert (await client.get(f"/v1/sessions/{sid}")).json()["id"] == sid
    assert sid in [s["id"] for s in (await client.get("/v1/sessions")).json()]
    await client.post(f"/v1/sessions/{sid}/execute", json={"code": "1"})
    assert (await client.get(f"/v1/sessions/{sid}")).json()["execution_count"] == 1

    deleted = await client.delete(f"/v1/sessions/{sid}")
    assert deleted.status_code == 204
    gone = await client.get(f"/v1/sessions/{sid}")
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "not_found"


async def test_session_env_reaches_the_code_and_survives_a_restart(client):
    created = await client.post("/v1/sessions", json={"env": {"MY_SETTING": "on"}})
    sid = created.json()["id"]
    code = {"code": "import os\nos.environ.get('MY_SETTING')"}
    try:
        first = await client.post(f"/v1/sessions/{sid}/execute", json=code)
        assert first.json()["results"][0]["data"]["text/plain"] == "'on'"
        assert first.json()["execution_count"] == 1  # setting it up ran no visible cell
        await client.post(f"/v1/sessions/{sid}/restart")
        again = await client.post(f"/v1/sessions/{sid}/execute", json=code)
        assert again.json()["results"][0]["data"]["text/plain"] == "'on'"
    finally:
        await client.delete(f"/v1/sessions/{sid}")


async def test_execution_contract(client, session_id):
    response = await client.post(
        f"/v1/sessions/{session_id}/execute",
        json={
            "code": "import sys\nprint('out')\nprint('err', file=sys.stderr)\n6 * 7",
            "format": "qwen",
        },
    )
    assert response.status_code == 200
    body = response.json()
    for field in (
        "status",
        "execution_count",
        "stdout",
        "stderr",
        "results",
        "error",
        "images",
        "duration_ms",
        "truncated",
        "kernel_restarted",
        "text",
    ):
        assert field in body, field
    assert body["status"] == "ok"
    assert body["execution_count"] == 1
    assert body["stdout"] == "out\n"
    assert body["stderr"] == "err\n"
    assert body["results"] == [
        {"type": "execute_result", "data": {"text/plain": "42"}, "images": []}
    ]
    assert body["error"] is None
    assert body["images"] == []
    assert body["duration_ms"] > 0
    assert body["truncated"] is False
    assert body["kernel_restarted"] is False
    assert body["text"] == (
        "stdout:\n\n```\nout\n\n```\n\nstderr:\n\n```\nerr\n\n```\n\nexecute_result:\n\n```\n42\n```"
    )
    error = (await client.post(f"/v1/sessions/{session_id}/execute", json={"code": "1/0"})).json()
    assert error["status"] == "error"
    assert error["error"] == {
        "name": "ZeroDivisionError",
        "value": "division by zero",
        "traceback": ["ZeroDivisionError: division by zero\n"],
    }
    assert error["text"] is None


async def test_timeout_through_http_keeps_variables(client, session_id):
    await client.post(f"/v1/sessions/{session_id}/execute", json={"code": "kept = 3"})
    started = time.monotonic()
    body = (
        await client.post(
            f"/v1/sessions/{session_id}/execute",
            json={"code": "while True: pass", "timeout": 1, "format": "qwen"},
        )
    ).json()
    assert time.monotonic() - started < 1.5
    assert body["status"] == "timeout"
    assert body["text"] == "error:\n\n```\nTimeout: Code execution exceeded the time limit.\n```"
    again = await client.post(f"/v1/sessions/{session_id}/execute", json={"code": "kept"})
    assert again.json()["results"][0]["data"]["text/plain"] == "3"


async def test_plot_is_served_from_the_files_route(client, session_id):
    body = (
        await client.post(
            f"/v1/sessions/{session_id}/execute",
            json={"code": "plt.plot([1, 2]); plt.show()", "format": "qwen"},
        )
    ).json()
    image = body["images"][0]
    assert image["path"] == "outputs/fig-001.png"
    assert image["url"].endswith(f"/v1/sessions/{session_id}/files/outputs/fig-001.png")
    assert body["text"] == f"![fig-001]({image['url']})"
    png = await client.get(image["url"])
    assert png.status_code == 200
    assert png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG")


# -- tool endpoint ---------------------------------------------------------------------------


async def test_tools_schema(client):
    tools = (await client.get("/v1/tools")).json()
    assert tools[0]["type"] == "function"
    fn = tools[0]["function"]
    assert fn["name"] == "code_interpreter"
    assert fn["parameters"]["required"] == ["code"]
    assert fn["parameters"]["properties"]["code"]["type"] == "string"


async def test_tool_endpoint_keeps_state_through_the_returned_session(client):
    first = await client.post(
        "/v1/tools/code_interpreter",
        json={"arguments": json.dumps({"code": "x = 1"}), "tool_call_id": "call_1"},
    )
    assert first.status_code == 200
    sid = first.json()["session_id"]
    assert first.json()["message"] == {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": "Finished execution.",
    }
    second = await client.post(
        "/v1/tools/code_interpreter",
        json={"session_id": sid, "arguments": {"code": "x"}, "tool_call_id": "call_2"},
    )
    assert second.json()["session_id"] == sid
    assert second.json()["message"]["content"] == "execute_result:\n\n```\n1\n```"
    envelope = await client.post(
        "/v1/tools/code_interpreter",
        json={"session_id": sid, "arguments": {"code": "print(x)"}, "format": "tool_response"},
    )
    assert (
        envelope.json()["message"] == "<tool_response>\nstdout:\n\n```\n1\n\n```\n</tool_response>"
    )
    bad = await client.post(
        "/v1/tools/code_interpreter", json={"session_id": sid, "arguments": '{"code": '}
    )
    assert bad.status_code == 200
    assert "not valid JSON" in bad.json()["message"]["content"]
    await client.delete(f"/v1/sessions/{sid}")


# -- streaming -------------------------------------------------------------------------------


async def test_streaming_delivers_stdout_before_the_sleep_ends(client, session_id):
    code = "import time\nprint('first', flush=True)\ntime.sleep(1)\nprint('second')"
    events = []
    started = time.monotonic()
    async with client.stream(
        "POST", f"/v1/sessions/{session_id}/execute", json={"code": code, "stream": True}
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append(
                    (event, json.loads(line.split(":", 1)[1]), time.monotonic() - started)
                )
    kinds = [e[0] for e in events]
    assert kinds[0] == "stdout" and events[0][1] == {"text": "first\n"}
    assert events[0][2] < 0.8, "the first chunk waited for the sleep"
    assert kinds[-1] == "end"
    assert events[-1][1]["stdout"] == "first\nsecond\n"
    assert events[-1][2] >= 1.0


async def test_streaming_via_accept_header_and_error_event(client, session_id):
    async with client.stream(
        "POST",
        f"/v1/sessions/{session_id}/execute",
        json={"code": "print('a')\n1/0"},
        headers={"Accept": "text/event-stream"},
    ) as response:
        body = (await response.aread()).decode()
    assert "event: stdout" in body
    assert "event: error" in body
    assert body.rstrip().split("\n")[-2] == "event: end"


# -- isolation under load --------------------------------------------------------------------


async def test_32_sessions_50_interleaved_executes_see_only_their_own_state(client):
    ids = []
    for _ in range(32):
        response = await client.post("/v1/sessions", json={})
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    try:
        for i, sid in enumerate(ids):
            await client.post(
                f"/v1/sessions/{sid}/execute", json={"code": f"mine = {i}\ntotal = 0"}
            )

        async def worker(i: int, sid: str) -> None:
            for step in range(50):
                code = f"total += {step}\nprint(mine, {step}, total)"
                body = (
                    await client.post(f"/v1/sessions/{sid}/execute", json={"code": code})
                ).json()
                assert body["status"] == "ok", body
                assert body["stdout"] == f"{i} {step} {step * (step + 1) // 2}\n"

        await asyncio.gather(*(worker(i, sid) for i, sid in enumerate(ids)))
    finally:
        await asyncio.gather(*(client.delete(f"/v1/sessions/{sid}") for sid in ids))


# -- files -----------------------------------------------------------------------------------


async def test_files_put_list_get_delete(client, session_id):
    put = await client.put(f"/v1/sessions/{session_id}/files/data/in.csv", content=b"a,b\n1,2\n")
    assert put.status_code == 201
    assert put.json()["path"] == "data/in.csv" and put.json()["size"] == 8
    read = await client.post(
        f"/v1/sessions/{session_id}/execute", json={"code": "pd.read_csv('data/in.csv').b.sum()"}
    )
    assert read.json()["results"][0]["data"]["text/plain"] == "2"
    listing = (await client.get(f"/v1/sessions/{session_id}/files")).json()
    assert [f["path"] for f in listing] == ["data/in.csv"]
    got = await client.get(f"/v1/sessions/{session_id}/files/data/in.csv")
    assert got.content == b"a,b\n1,2\n"
    assert (await client.delete(f"/v1/sessions/{session_id}/files/data/in.csv")).status_code == 204
    missing = await client.get(f"/v1/sessions/{session_id}/files/data/in.csv")
    assert missing.status_code == 404


@pytest.mark.parametrize(
    "path", ["%2Fetc%2Fpasswd", "..%2F..%2Fetc%2Fpasswd", "a/..%2F..%2Fsecret", "~root%2F.ssh"]
)
async def test_file_routes_refuse_escaping_paths(client, session_id, path):
    for method in ("GET", "PUT", "DELETE"):
        response = await client.request(
            method, f"/v1/sessions/{session_id}/files/{path}", content=b"x"
        )
        assert response.status_code == 400, (method, path, response.text)
        assert response.json()["error"]["code"] == "bad_path"


async def test_symlink_planted_by_code_is_not_followed(client, session_id):
    await client.post(
        f"/v1/sessions/{session_id}/execute",
        json={"code": "import os\nos.symlink('/etc', 'etc')\nos.symlink('/etc/hostname', 'host')"},
    )
    for method, path in (
        ("GET", "etc/hostname"),
        ("GET", "host"),
        ("PUT", "etc/evil"),
        ("PUT", "host"),
        ("DELETE", "etc/hostname"),
    ):
        response = await client.request(
            method, f"/v1/sessions/{session_id}/files/{path}", content=b"x"
        )
        assert response.status_code == 400, (method, path, response.text)
        assert "symlink" in response.json()["error"]["message"]


# -- bad input -------------------------------------------------------------------------------


async def test_bad_requests_get_clear_errors(client, session_id, server):
    url = f"/v1/sessions/{session_id}/execute"
    wrong_type = await client.post(url, json={"code": 5})
    assert wrong_type.status_code == 422
    assert wrong_type.json()["error"]["code"] == "invalid_body"
    assert wrong_type.json()["error"]["fields"][0]["loc"] == ["body", "code"]
    malformed = await client.post(
        url, content=b"{not json", headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 422
    negative = await client.post(url, json={"code": "1", "timeout": -1})
    assert negative.status_code == 422 and "timeout" in negative.json()["error"]["message"]
    unknown_field = await client.post(url, json={"code": "1", "tiemout": 3})
    assert unknown_field.status_code == 422
    huge_body = await client.post(
        url,
        content=b'{"code": "' + b"x" * (3 * 1024**2) + b'"}',
        headers={"content-type": "application/json"},
    )
    assert huge_body.status_code == 413
    assert huge_body.json()["error"]["code"] == "too_large"
    assert (await client.post("/v1/sessions/nope/execute", json={"code": "1"})).status_code == 404
    # The session is unharmed by all of it.
    assert (await client.post(url, json={"code": "'fine'"})).json()["status"] == "ok"


async def test_code_length_limit(server):
    with running_server(min_idle=0, max_code_chars=100) as small:
        async with small.client() as c:
            response = await c.post("/v1/execute", json={"code": "x" * 101})
            # Refused before a session is made for it: none is left behind.
            tool_call = {"arguments": {"code": "x" * 101}}
            refused = await c.post("/v1/tools/code_interpreter", json=tool_call)
            sessions = (await c.get("/v1/sessions")).json()
    assert response.status_code == 413
    assert "limit is 100" in response.json()["error"]["message"]
    assert refused.status_code == 413
    assert sessions == []


async def test_busy_session_answers_409(client, session_id):
    url = f"/v1/sessions/{session_id}/execute"
    slow = asyncio.create_task(client.post(url, json={"code": "import time; time.sleep(1.5)"}))
    await asyncio.sleep(0.5)
    busy = await client.post(url, json={"code": "1"})
    assert busy.status_code == 409
    assert busy.json()["error"]["code"] == "session_busy"
    assert (await slow).json()["status"] == "ok"


async def test_interrupt_and_restart_routes(client, session_id):
    url = f"/v1/sessions/{session_id}"
    slow = asyncio.create_task(
        client.post(f"{url}/execute", json={"code": "import time; time.sleep(30)"})
    )
    await asyncio.sleep(0.5)
    assert (await client.post(f"{url}/interrupt")).json() == {"interrupted": True}
    assert (await slow).json()["error"]["name"] == "KeyboardInterrupt"
    await client.post(f"{url}/execute", json={"code": "gone = 1"})
    restarted = await client.post(f"{url}/restart")
    assert restarted.status_code == 200 and restarted.json()["execution_count"] == 0
    after = await client.post(f"{url}/execute", json={"code": "'gone' in globals()"})
    assert after.json()["results"][0]["data"]["text/plain"] == "False"


async def test_one_shot_execute_is_stateless(client):
    first = (await client.post("/v1/execute", json={"code": "leak = 1\nprint('hi')"})).json()
    assert first["stdout"] == "hi\n"
    second = (await client.post("/v1/execute", json={"code": "'leak' in globals()"})).json()
    assert second["results"][0]["data"]["text/plain"] == "False"
    plot = (await client.post("/v1/execute", json={"code": "plt.plot([1]); plt.show()"})).json()
    assert plot["images"][0]["url"].startswith("data:image/png;base64,")


# -- health and metrics ----------------------------------------------------------------------


async def test_health_ready_and_metrics(client):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    # Ready means a warm kernel is waiting; earlier tests may have just taken them all.
    deadline = time.monotonic() + 120
    while (ready := await client.get("/readyz")).status_code != 200:
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
        assert time.monotonic() < deadline, "no warm kernel within 120 s"
        await asyncio.sleep(0.2)
    assert ready.json()["status"] == "ready" and ready.json()["idle_kernels"] >= 1
    await client.post("/v1/execute", json={"code": "1"})
    text = (await client.get("/metrics")).text
    for name in (
        "kernelbox_sessions ",
        "kernelbox_pool_idle_kernels ",
        'kernelbox_executions_total{status="ok"}',
        "kernelbox_execution_seconds_bucket",
    ):
        assert name in text, name


async def test_openapi_documents_every_route(client):
    spec = (await client.get("/openapi.json")).json()
    paths = spec["paths"]
    for path in (
        "/v1/sessions",
        "/v1/sessions/{session_id}",
        "/v1/sessions/{session_id}/execute",
        "/v1/sessions/{session_id}/interrupt",
        "/v1/sessions/{session_id}/restart",
        "/v1/sessions/{session_id}/files",
        "/v1/sessions/{session_id}/files/{path}",
        "/v1/execute",
        "/v1/tools",
        "/v1/tools/code_interpreter",
        "/v1/render",
        "/healthz",
        "/readyz",
    ):
        assert path in paths, path
    assert (await client.get("/docs")).status_code == 200


# -- auth, ownership, capacity, expiry, a broken backend -------------------------------------


async def test_auth_and_ownership():
    with running_server(min_idle=1, api_key=["key-a", "key-b"]) as srv:
        async with srv.client() as anon, srv.client("key-a") as a, srv.client("key-b") as b:
            assert (await anon.get("/healthz")).status_code == 200
            denied = await anon.post("/v1/sessions", json={})
            assert denied.status_code == 401 and denied.json()["error"]["code"] == "unauthorized"
            async with srv.client("wrong") as wrong:
                assert (await wrong.get("/v1/sessions")).status_code == 401
            sid = (await a.post("/v1/sessions", json={})).json()["id"]
            for method, path in (
                ("GET", f"/v1/sessions/{sid}"),
                ("POST", f"/v1/sessions/{sid}/execute"),
                ("GET", f"/v1/sessions/{sid}/files"),
                ("DELETE", f"/v1/sessions/{sid}"),
            ):
                response = await b.request(method, path, json={"code": "1"})
                assert response.status_code == 404, (method, path)
            assert (await b.get("/v1/sessions")).json() == []
            assert [s["id"] for s in (await a.get("/v1/sessions")).json()] == [sid]
            basic = httpx.BasicAuth("anyone", "key-a")
            async with httpx.AsyncClient(base_url=srv.url, auth=basic) as basic_client:
                assert (await basic_client.get(f"/v1/sessions/{sid}")).status_code == 200


async def test_pool_exhaustion_answers_429_with_retry_after():
    with running_server(min_idle=1, max_sessions=1) as srv:
        async with srv.client() as c:
            assert (await c.post("/v1/sessions", json={})).status_code == 201
            full = await c.post("/v1/sessions", json={})
            assert full.status_code == 429
            assert full.headers["Retry-After"] == "1"
            assert full.json()["error"]["code"] == "pool_exhausted"
            # Streamed, the refusal comes as a `fail` event with the same code.
            streamed = await c.post("/v1/execute", json={"code": "1", "stream": True})
            assert "event: fail" in streamed.text
            assert '"code":"pool_exhausted"' in streamed.text


async def test_expired_session_is_reaped_and_its_kernel_gone():
    with running_server(min_idle=1) as srv:
        async with srv.client() as c:
            sid = (await c.post("/v1/sessions", json={"idle_timeout": 1})).json()["id"]
            pid = srv.manager.get(sid, "anonymous").session.kernel.proc.pid
            assert psutil.pid_exists(pid)
            await asyncio.sleep(3)
            assert (await c.get(f"/v1/sessions/{sid}")).status_code == 404
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
            assert "kernelbox_sessions_reaped_total 1.0" in (await c.get("/metrics")).text


async def test_backend_that_cannot_start_kernels_gives_503_not_a_hang(tmp_path):
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'no python here' >&2\nexit 3\n")
    broken.chmod(0o755)
    with running_server(wait_ready=False, min_idle=1, kernel_python=str(broken)) as srv:
        async with srv.client(timeout=30) as c:
            started = time.monotonic()
            response = await c.post("/v1/sessions", json={})
            assert time.monotonic() - started < 10
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "kernel_unavailable"
            assert "no python here" in response.json()["error"]["message"]
            assert "Retry-After" in response.headers
            await asyncio.sleep(0.5)
            assert (await c.get("/readyz")).status_code == 503


def test_kernels_die_with_a_killed_service(tmp_path):
    """SIGKILL gives the service no chance to stop its kernels; they stop themselves."""
    import os
    import signal
    import subprocess
    import sys

    import httpx

    from tests.server import _wait_for_warm, free_port

    port = free_port()
    env = {**os.environ, "KERNELBOX_MIN_IDLE": "2", "KERNELBOX_DATA_DIR": str(tmp_path)}
    serve = [sys.executable, "-m", "kernelbox.cli", "serve", "--port", str(port)]
    server = subprocess.Popen(
        serve,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_warm(f"http://127.0.0.1:{port}", 2)
        created = httpx.post(f"http://127.0.0.1:{port}/v1/sessions", json={})
        created.raise_for_status()
        kernels = [
            p
            for p in psutil.Process(server.pid).children(recursive=True)
            if any(
                s in part
                for part in p.cmdline()
                for s in ("kernel_boot.py", "kernel_template_boot")
            )
        ]
        assert len(kernels) >= 2
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        _, alive = psutil.wait_procs(kernels, timeout=10)
        assert alive == [], f"kernels outlived their service: {[p.pid for p in alive]}"
        # What the dead instance left in the data directory (the warm kernels' working
        # directories, their filesystems when it was root) is removed by the next one that
        # starts there; the session's is kept (sessions outlive the service) until deleted.
        server = subprocess.Popen(serve, env=env, stdout=subprocess.DEVNULL)
        _wait_for_warm(f"http://127.0.0.1:{port}", 1)
        sid = created.json()["id"]
        assert [p.name for p in (tmp_path / "sessions").iterdir()].count(sid) == 1
        httpx.delete(f"http://127.0.0.1:{port}/v1/sessions/{sid}").raise_for_status()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == -signal.SIGTERM  # uvicorn re-raises it when done
        with open("/proc/self/mountinfo") as f:
            assert str(tmp_path) not in f.read(), "a working directory is still mounted"
        assert list((tmp_path / "sessions").iterdir()) == []
        registry = {".lock", "sessions", "sessions.db", "sessions.db-wal", "sessions.db-shm"}
        assert {p.name for p in tmp_path.iterdir()} <= registry, list(tmp_path.iterdir())
    finally:
        if server.poll() is None:
            server.kill()
