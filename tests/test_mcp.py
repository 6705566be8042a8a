"""The MCP endpoint (/mcp) with real MCP clients over streamable HTTP, against a running
service: the official `mcp` SDK's client (both protocol eras: the 2026-07-28 single-exchange
requests and the older initialize handshake) and the OpenAI Agents SDK's
MCPServerStreamableHttp."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import subprocess
import time

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from tests.server import running_server
from tests.support import fresh_venv, pypi_reachable

KEY_A, KEY_B = "mcp-key-a", "mcp-key-b"
TOOLS = {"create_session", "run_code", "list_files", "read_file", "write_file", "delete_session"}


@pytest.fixture(scope="module")
def server():
    with running_server(
        min_idle=2, api_key=[KEY_A, KEY_B], allow_weak_isolation=True, max_timeout=60
    ) as srv:
        yield srv


@contextlib.asynccontextmanager
async def mcp_client(server, key: str | None = KEY_A, mode: str = "auto", host: str | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if host:
        headers["Host"] = host
    http = create_mcp_http_client(headers=headers, timeout=httpx2.Timeout(30, read=120))
    transport = streamable_http_client(f"{server.url}/mcp", http_client=http)
    async with http, Client(transport, mode=mode, raise_exceptions=True) as client:
        yield client


def text_of(result) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


async def new_session(client, **args) -> str:
    result = await client.call_tool("create_session", args)
    assert not result.is_error, text_of(result)
    return result.structured_content["session_id"]


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_tools_are_listed_with_schemas(server, mode):
    async with mcp_client(server, mode=mode) as client:
        if mode == "auto":  # the SDK negotiates the newest revision both speak
            assert client.protocol_version == "2026-07-28"
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == TOOLS
    run_code = tools["run_code"]
    assert set(run_code.input_schema["properties"]) == {"code", "session_id", "timeout"}
    assert run_code.input_schema["required"] == ["code"]
    # The whole Execution is the declared structured output.
    assert {"status", "stdout", "images", "text", "outputs"} <= set(
        run_code.output_schema["properties"]
    )


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_state_persists_across_calls_with_a_handle(server, mode):
    async with mcp_client(server, mode=mode) as client:
        sid = await new_session(client)
        first = await client.call_tool("run_code", {"code": "x = 21 * 2", "session_id": sid})
        assert not first.is_error
        second = await client.call_tool("run_code", {"code": "print(x)", "session_id": sid})
        assert not second.is_error
        assert second.structured_content["status"] == "ok"
        assert second.structured_content["stdout"] == "42\n"
        # The qwen rendering, as the tool endpoint gives it.
        assert text_of(second) == "stdout:\n\n```\n42\n\n```"
        # Without a handle: a fresh interpreter, no x.
        once = await client.call_tool("run_code", {"code": "print('x' in dir())"})
        assert once.structured_content["stdout"] == "False\n"
        await client.call_tool("delete_session", {"session_id": sid})


async def test_a_plot_comes_back_as_an_image(server):
    code = "plt.plot([1, 3, 2]); plt.title('mcp'); plt.show()"
    async with mcp_client(server) as client:
        sid = await new_session(client)
        result = await client.call_tool("run_code", {"code": code, "session_id": sid})
        images = [c for c in result.content if c.type == "image"]
        assert len(images) == 1
        assert images[0].mime_type == "image/png"
        assert base64.b64decode(images[0].data).startswith(b"\x89PNG\r\n\x1a\n")
        execution = result.structured_content
        assert execution["images"][0]["path"] == "outputs/fig-001.png"
        url = execution["images"][0]["url"]
        assert url == f"{server.url}/v1/sessions/{sid}/files/outputs/fig-001.png"
        assert "![fig-001](" in text_of(result)
        # The same file, through the file tools.
        listed = await client.call_tool("list_files", {"session_id": sid})
        paths = [f["path"] for f in listed.structured_content["result"]]
        assert "outputs/fig-001.png" in paths
        read = await client.call_tool(
            "read_file", {"session_id": sid, "path": "outputs/fig-001.png"}
        )
        assert read.content[0].type == "image"
        assert read.content[0].data == images[0].data
        await client.call_tool("delete_session", {"session_id": sid})


async def test_one_shot_plot_is_an_image_too(server):
    async with mcp_client(server) as client:
        result = await client.call_tool("run_code", {"code": "plt.plot([1, 2]); plt.show()"})
    assert [c.mime_type for c in result.content if c.type == "image"] == ["image/png"]


async def test_files_written_are_seen_by_the_code_and_read_back(server):
    async with mcp_client(server) as client:
        sid = await new_session(client)
        wrote = await client.call_tool(
            "write_file", {"session_id": sid, "path": "data/in.csv", "content": "a,b\n1,2\n"}
        )
        assert not wrote.is_error and wrote.structured_content["size"] == 8
        blob = base64.b64encode(b"\x00\xff").decode()
        await client.call_tool(
            "write_file",
            {"session_id": sid, "path": "raw.bin", "content": blob, "encoding": "base64"},
        )
        code = (
            "df = pd.read_csv('data/in.csv')\nprint(int(df.a[0] + df.b[0]))\n"
            "open('out.txt', 'w').write('made by code')\nprint(open('raw.bin','rb').read())"
        )
        ran = await client.call_tool("run_code", {"code": code, "session_id": sid})
        assert ran.structured_content["stdout"] == "3\nb'\\x00\\xff'\n"
        read = await client.call_tool("read_file", {"session_id": sid, "path": "out.txt"})
        assert text_of(read) == "made by code"
        missing = await client.call_tool("read_file", {"session_id": sid, "path": "nope.txt"})
        assert missing.is_error and "no such file" in text_of(missing)
        escape = await client.call_tool("read_file", {"session_id": sid, "path": "../etc/passwd"})
        assert escape.is_error and "bad path" in text_of(escape)
        await client.call_tool("delete_session", {"session_id": sid})


async def test_an_error_is_a_result_the_model_reads(server):
    async with mcp_client(server) as client:
        sid = await new_session(client)
        result = await client.call_tool("run_code", {"code": "1 / 0", "session_id": sid})
        # The code failed, the tool did not: the traceback is the answer.
        assert not result.is_error
        assert result.structured_content["status"] == "error"
        assert result.structured_content["error"]["name"] == "ZeroDivisionError"
        assert text_of(result).startswith("error:\n\n```\n")
        assert "ZeroDivisionError" in text_of(result)
        await client.call_tool("delete_session", {"session_id": sid})


async def test_a_timeout_interrupts_and_keeps_the_session(server):
    async with mcp_client(server) as client:
        sid = await new_session(client)
        await client.call_tool("run_code", {"code": "y = 7", "session_id": sid})
        started = time.monotonic()
        result = await client.call_tool(
            "run_code",
            {"code": "import time\nwhile True: time.sleep(0.1)", "session_id": sid, "timeout": 1},
        )
        assert time.monotonic() - started < 30
        assert result.structured_content["status"] == "timeout"
        assert "Timeout: Code execution exceeded the time limit." in text_of(result)
        after = await client.call_tool("run_code", {"code": "print(y)", "session_id": sid})
        assert after.structured_content["stdout"] == "7\n"  # interrupted, not restarted
        await client.call_tool("delete_session", {"session_id": sid})


async def test_progress_notifications_carry_the_output_as_it_comes(server):
    seen: list[str] = []

    async def on_progress(progress, total, message):
        seen.append(message or "")

    code = "import time\nfor i in range(3):\n    print('step', i, flush=True); time.sleep(0.2)"
    async with mcp_client(server) as client:
        result = await client.call_tool("run_code", {"code": code}, progress_callback=on_progress)
    assert result.structured_content["stdout"] == "step 0\nstep 1\nstep 2\n"
    assert "".join(seen).count("step") == 3
    assert seen[0].startswith("stdout: step 0")


async def test_another_keys_handle_is_refused(server):
    async with mcp_client(server, key=KEY_A) as a, mcp_client(server, key=KEY_B) as b:
        sid = await new_session(a)
        await a.call_tool("run_code", {"code": "secret = 1", "session_id": sid})
        for tool, args in [
            ("run_code", {"code": "print(secret)", "session_id": sid}),
            ("list_files", {"session_id": sid}),
            ("read_file", {"session_id": sid, "path": "x"}),
            ("delete_session", {"session_id": sid}),
        ]:
            refused = await b.call_tool(tool, args)
            assert refused.is_error, tool
            assert f"unknown or expired session_id {sid!r}" in text_of(refused)
        # ... and A's session is untouched.
        still = await a.call_tool("run_code", {"code": "print(secret)", "session_id": sid})
        assert still.structured_content["stdout"] == "1\n"
        await a.call_tool("delete_session", {"session_id": sid})


async def test_an_expired_or_deleted_handle_says_so(server):
    async with mcp_client(server) as client, server.client(KEY_A) as http:
        sid = await new_session(client, idle_timeout=1)
        deadline = time.monotonic() + 30  # reaped within a second or two of its timeout
        while (await http.get(f"/v1/sessions/{sid}")).status_code != 404:
            assert time.monotonic() < deadline, "the session was not reaped"
            await asyncio.sleep(0.1)
        expired = await client.call_tool("run_code", {"code": "1", "session_id": sid})
        assert expired.is_error
        assert "unknown or expired session_id" in text_of(expired)
        assert "create_session" in text_of(expired)

        sid = await new_session(client)
        await client.call_tool("delete_session", {"session_id": sid})
        gone = await client.call_tool("run_code", {"code": "1", "session_id": sid})
        assert gone.is_error and "unknown or expired" in text_of(gone)


async def test_keys_are_checked_on_the_http_requests(server):
    async with httpx.AsyncClient(base_url=server.url) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            answer = await http.post(
                "/mcp",
                headers={**headers, "Accept": "application/json, text/event-stream"},
                json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            )
            assert answer.status_code == 401
            assert answer.headers["www-authenticate"] == "Bearer"
            assert answer.json()["error"]["code"] == "unauthorized"
    with pytest.raises(Exception):  # noqa: B017 - the client's error type varies by era
        async with mcp_client(server, key=None) as client:
            await client.list_tools()


async def test_dns_rebinding_protection_refuses_foreign_hosts(server):
    async with httpx.AsyncClient(base_url=server.url) as http:
        answer = await http.post(
            "/mcp",
            headers={
                "Authorization": f"Bearer {KEY_A}",
                "Host": "evil.example:8000",
                "Accept": "application/json, text/event-stream",
            },
            json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        )
        assert answer.status_code == 421
        answer = await http.post(
            "/mcp",
            headers={
                "Authorization": f"Bearer {KEY_A}",
                "Origin": "http://evil.example",
                "Accept": "application/json, text/event-stream",
            },
            json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        )
        assert answer.status_code == 403


async def test_openai_agents_sdk_lists_and_calls_the_tools(server):
    """The OpenAI Agents SDK's own MCP client, without a model: list, then call."""
    from agents.mcp import MCPServerStreamableHttp

    params = {"url": f"{server.url}/mcp", "headers": {"Authorization": f"Bearer {KEY_A}"}}
    async with MCPServerStreamableHttp(
        params=params, client_session_timeout_seconds=60, cache_tools_list=True
    ) as mcp_server:
        tools = {t.name for t in await mcp_server.list_tools()}
        assert tools == TOOLS
        created = await mcp_server.call_tool("create_session", {})
        sid = created.structured_content["session_id"]
        await mcp_server.call_tool("run_code", {"code": "z = 6 * 7", "session_id": sid})
        result = await mcp_server.call_tool("run_code", {"code": "print(z)", "session_id": sid})
        assert result.structured_content["stdout"] == "42\n"
        assert result.content[0].text == "stdout:\n\n```\n42\n\n```"
        await mcp_server.call_tool("delete_session", {"session_id": sid})


LANGCHAIN_SCRIPT = """
import asyncio, json, sys
from langchain_mcp_adapters.client import MultiServerMCPClient

async def main(url, key):
    client = MultiServerMCPClient({"kernelbox": {
        "url": url, "transport": "streamable_http", "headers": {"Authorization": f"Bearer {key}"}}})
    tools = {tool.name: tool for tool in await client.get_tools()}
    created = await tools["create_session"].ainvoke({})
    sid = json.loads(created[0]["text"])["session_id"]
    await tools["run_code"].ainvoke({"code": "w = 6 * 7", "session_id": sid})
    answer = await tools["run_code"].ainvoke({"code": "print(w)", "session_id": sid})
    await tools["delete_session"].ainvoke({"session_id": sid})
    print(json.dumps({"tools": sorted(tools), "args": sorted(tools["run_code"].args),
                      "answer": answer}))

asyncio.run(main(*sys.argv[1:3]))
"""


@pytest.mark.timeout(600)
def test_langchain_mcp_adapters_load_and_call_the_tools(server, tmp_path):
    """LangChain's MCP client (langchain-mcp-adapters), without a model: its tools, called.

    Its releases import the 1.x SDK's modules, so it runs in a venv of its own with mcp 1.x:
    a client of the other SDK era, against this server."""
    if not pypi_reachable():
        pytest.skip("PyPI is not reachable: cannot install langchain-mcp-adapters")
    python = fresh_venv(tmp_path, ["langchain-mcp-adapters>=0.1", "mcp>=1.9,<2"])
    run = subprocess.run(
        [str(python), "-c", LANGCHAIN_SCRIPT, f"{server.url}/mcp", KEY_A],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    answer = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(answer["tools"]) == TOOLS
    assert "code" in answer["args"] and "session_id" in answer["args"]
    assert [part["text"] for part in answer["answer"]] == ["stdout:\n\n```\n42\n\n```"]
