"""The client SDK against a real service on loopback, over real HTTP: both clients, every
method, streaming order, typed errors for each status, retries, connection failures."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import email.utils
import inspect
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest

import kernelbox as kb
from kernelbox import _core as core
from tests.server import free_port, running_server, serving

PLOT = "plt.plot([1, 2, 3]); plt.show()"
# stdout, stderr, a display, more stdout, then an error: each waits so the order is real.
ORDERED = (
    "import sys, time\n"
    "print('one')\n"
    "time.sleep(0.2)\n"
    "print('two', file=sys.stderr)\n"
    "display('shown')\n"
    "time.sleep(0.2)\n"
    "print('three')\n"
    "raise ValueError('four')\n"
)


@pytest.fixture(scope="module")
def server():
    with running_server(min_idle=2, max_sessions=32) as srv:
        yield srv


@pytest.fixture
def client(server) -> Iterator[kb.Client]:
    with kb.Client(server.url) as c:
        yield c


@pytest.fixture
async def aclient(server):
    async with kb.AsyncClient(server.url) as c:
        yield c


def tool_call(code: str, call_id: str = "call_1") -> dict:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "code_interpreter", "arguments": json.dumps({"code": code})},
    }


def openai_tool_call(code: str, call_id: str = "call_obj"):
    """The shape of the OpenAI SDK's ChatCompletionMessageToolCall."""
    function = SimpleNamespace(name="code_interpreter", arguments=f'{{"code": "{code}"}}')
    return SimpleNamespace(id=call_id, type="function", function=function)


# -- every method, sync ------------------------------------------------------------------------


def test_sync_session_lifecycle_and_execute(client):
    with client.create_session(idle_timeout=120, metadata={"user": "alice"}) as session:
        assert isinstance(session.info, kb.SessionInfo)
        assert session.info.metadata == {"user": "alice"} and session.info.status == "idle"
        sid = session.id
        assert client.get_session(sid).id == sid
        assert sid in [s.id for s in client.list_sessions()]

        execution = session.execute("x = 6 * 7\nprint(x)\nx")
        assert isinstance(execution, kb.Execution)
        assert execution.status == "ok" and execution.stdout == "42\n"
        assert execution.results[0].data["text/plain"] == "42"
        assert session.execute("x + 1").results[0].data["text/plain"] == "43"  # state kept
        assert session.refresh().execution_count == 2

        rendered = session.execute("print('hi')", format="tool_response")
        assert rendered.text == "<tool_response>\nstdout:\n\n```\nhi\n\n```\n</tool_response>"

        failed = session.execute("1/0")
        assert failed.status == "error" and failed.error.name == "ZeroDivisionError"
        with pytest.raises(kb.ExecutionError) as raised:
            session.execute("1/0", raise_on_error=True)
        assert raised.value.execution.error.name == "ZeroDivisionError"

        assert session.restart().execution_count == 0
        assert session.execute("'x' in globals()").results[0].data["text/plain"] == "False"
    with pytest.raises(kb.SessionNotFound):
        client.get_session(sid)
    session.delete()  # deleting again is not an error


def test_sync_delete_session_and_close(client):
    session = client.create_session()
    client.delete_session(session.id)
    with pytest.raises(kb.SessionNotFound):
        session.refresh()
    with pytest.raises(kb.SessionNotFound):
        client.delete_session(session.id)
    session.close()


def test_sync_stream_and_callbacks(client):
    with client.create_session() as session:
        with session.stream(ORDERED) as events:
            kinds = [(e.type, getattr(e, "text", None)) for e in events]
        assert kinds == [
            ("stdout", "one\n"),
            ("stderr", "two\n"),
            ("result", None),
            ("stdout", "three\n"),
            ("error", None),
            ("end", None),
        ]
        assert events.execution is not None and events.execution.error.value == "four"

        seen: list[object] = []
        execution = session.execute(
            ORDERED,
            on_stdout=lambda t: seen.append(("out", t)),
            on_stderr=lambda t: seen.append(("err", t)),
            on_result=lambda r: seen.append(("result", r.data["text/plain"])),
            on_error=lambda e: seen.append(("error", e.name)),
        )
        assert seen == [
            ("out", "one\n"),
            ("err", "two\n"),
            ("result", "'shown'"),
            ("out", "three\n"),
            ("error", "ValueError"),
        ]
        assert execution.stdout == "one\nthree\n" and execution.status == "error"


def test_sync_stream_delivers_output_before_the_code_ends(client):
    with client.create_session() as session:
        started = time.monotonic()
        arrivals = []
        for event in session.stream("import time\nprint('early')\ntime.sleep(1.5)\nprint('late')"):
            arrivals.append((event.type, time.monotonic() - started))
        assert arrivals[0][0] == "stdout" and arrivals[0][1] < 1.0
        assert arrivals[-1][0] == "end" and arrivals[-1][1] >= 1.5


def test_sync_timeout_interrupt_and_busy(client):
    with client.create_session() as session:
        session.execute("kept = 1")
        timed_out = session.execute("while True: pass", timeout=1)
        assert timed_out.status == "timeout"
        with pytest.raises(kb.ExecutionTimeout):
            session.execute("while True: pass", timeout=1, raise_on_error=True)
        # The deadline is only known at the end: the stream reports it as an error event
        # (after the KeyboardInterrupt the interrupt raised in the code, if it did).
        events = list(session.stream("while True: pass", timeout=1))
        assert [e.type for e in events][-2:] == ["error", "end"]
        assert events[-2].error.name == "TimeoutError"
        assert session.execute("kept").results[0].data["text/plain"] == "1"

        assert session.interrupt() is False
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(session.execute, "import time; time.sleep(30)")
            time.sleep(0.5)
            with pytest.raises(kb.SessionBusy) as busy:
                session.execute("1")
            assert busy.value.status == 409 and busy.value.code == "session_busy"
            assert session.interrupt() is True
            assert slow.result(timeout=10).error.name == "KeyboardInterrupt"


def test_sync_files_and_images(client, tmp_path):
    local = tmp_path / "data.csv"
    local.write_text("a,b\n1,2\n")
    with client.create_session() as session:
        assert session.upload(b"hello", "dir/hello.txt").size == 5
        assert session.upload(local).path == "data.csv"
        assert session.upload(io.BytesIO(b"xyz"), "obj.bin").size == 3
        paths = sorted(f.path for f in session.list_files())
        assert paths == ["data.csv", "dir/hello.txt", "obj.bin"]
        assert session.execute("print(open('dir/hello.txt').read())").stdout == "hello\n"
        assert session.download("data.csv") == b"a,b\n1,2\n"
        session.delete_file("obj.bin")
        with pytest.raises(kb.FileNotFound):
            session.download("obj.bin")
        with pytest.raises(kb.FileNotFound):
            session.delete_file("obj.bin")

        plot = session.execute(PLOT)
        image = plot.images[0]
        assert image.path == "outputs/fig-001.png"
        data = session.download(image)
        assert data.startswith(b"\x89PNG")
        assert session.download_to(image, tmp_path / "plot.png").read_bytes() == data
        assert session.download_to(image, tmp_path) == tmp_path / "fig-001.png"
        saved = session.save_images(plot, tmp_path / "images")
        assert saved == [tmp_path / "images" / "fig-001.png"] and saved[0].read_bytes() == data
        with pytest.raises(ValueError):
            session.upload(b"no path")


def test_sync_one_shot_tools_and_tool_calls(server):
    with kb.Client(server.url) as client:
        once = client.execute("leak = 1\nprint('hi')")
        assert once.stdout == "hi\n"
        assert client.execute("'leak' in globals()").results[0].data["text/plain"] == "False"
        assert [e.type for e in client.stream("print(1)")] == ["stdout", "end"]
        lines: list[str] = []
        client.execute("print('cb')", on_stdout=lines.append)
        assert lines == ["cb\n"]

        assert client.tools() == [kb.CODE_INTERPRETER_TOOL]
        first = client.run_tool_call(tool_call("y = 5\ny", "call_a"))
        assert first == {
            "role": "tool",
            "tool_call_id": "call_a",
            "content": "execute_result:\n\n```\n5\n```",
        }
        kept = client.tool_session_id
        assert kept is not None
        # An OpenAI SDK tool call object, in the same kept session: `y` is still there.
        second = client.run_tool_call(openai_tool_call("y * 2"), format="tool_response")
        assert second == "<tool_response>\nexecute_result:\n\n```\n10\n```\n</tool_response>"
        many = client.run_tool_calls([tool_call("y", "c1"), tool_call("y + 1", "c2")])
        assert [m["tool_call_id"] for m in many] == ["c1", "c2"]
        assert client.tool_session_id == kept
        with pytest.raises(ValueError, match="not a code_interpreter"):
            client.run_tool_call({"id": "c", "function": {"name": "web", "arguments": "{}"}})

        with client.create_session() as session:
            assert session.run_tool_call(tool_call("z = 3")) == {
                "role": "tool",
                "tool_call_id": "call_1",
                "content": "Finished execution.",
            }
            message = client.run_tool_call(tool_call("z"), session=session)
            assert message["content"] == "execute_result:\n\n```\n3\n```"
            by_id = client.run_tool_call(tool_call("z + 1"), session=session.id)
            assert by_id["content"] == "execute_result:\n\n```\n4\n```"
    # Closing the client deleted the session it kept for tool calls.
    with kb.Client(server.url) as other, pytest.raises(kb.SessionNotFound):
        other.get_session(kept)


def test_local_rendering_matches_the_service(client):
    code = "import sys\nprint('out')\nprint('err', file=sys.stderr)\n" + PLOT + "\n1/0"
    with client.create_session() as session:
        for fmt in ("qwen", "plain", "tool_response", "output_block", "react", "qwen_fn"):
            execution = session.execute(code, format=fmt)
            assert kb.render(execution, fmt) == execution.text, fmt
        execution = session.execute("print(1)")
    assert kb.render(execution, envelope="tool_response", style="plain") == (
        "<tool_response>\n1\n</tool_response>"
    )
    assert kb.render(execution, "openai", tool_call_id="c9") == {
        "role": "tool",
        "tool_call_id": "c9",
        "content": "stdout:\n\n```\n1\n\n```",
    }
    assert kb.render(execution, "function")["name"] == "code_interpreter"


def test_local_rendering_takes_a_dict_format_as_the_service_does(client):
    # The HTTP API takes RenderOptions as a JSON object; kernelbox.render takes the same dict.
    fmt = {"style": "plain", "envelope": "tool_response", "max_chars": 300}
    with client.create_session() as session:
        execution = session.execute("print('x' * 1000)", format=fmt)
    assert execution.text.startswith("<tool_response>\nxxx")
    assert kb.render(execution, fmt) == execution.text
    with pytest.raises(ValueError, match="max_chars"):
        kb.render(execution, {"max_chars": 1})  # refused as the service refuses it (422)


# -- every method, async -----------------------------------------------------------------------


async def test_async_session_lifecycle_and_execute(aclient):
    async with await aclient.create_session(metadata={"user": "bob"}) as session:
        sid = session.id
        assert session.info.metadata == {"user": "bob"}
        assert (await aclient.get_session(sid)).id == sid
        assert sid in [s.id for s in await aclient.list_sessions()]
        execution = await session.execute("x = 6 * 7\nprint(x)\nx")
        assert execution.stdout == "42\n" and execution.results[0].data["text/plain"] == "42"
        assert (await session.refresh()).execution_count == 1
        with pytest.raises(kb.ExecutionError):
            await session.execute("1/0", raise_on_error=True)
        assert (await session.restart()).execution_count == 0
        after = await session.execute("'x' in globals()")
        assert after.results[0].data["text/plain"] == "False"
    with pytest.raises(kb.SessionNotFound):
        await aclient.get_session(sid)

    other = await aclient.create_session()
    await aclient.delete_session(other.id)
    with pytest.raises(kb.SessionNotFound):
        await other.refresh()
    await other.delete()


async def test_async_stream_and_callbacks(aclient):
    async with await aclient.create_session() as session:
        async with session.stream(ORDERED) as events:
            kinds = [(e.type, getattr(e, "text", None)) async for e in events]
        assert kinds == [
            ("stdout", "one\n"),
            ("stderr", "two\n"),
            ("result", None),
            ("stdout", "three\n"),
            ("error", None),
            ("end", None),
        ]
        assert events.execution.error.value == "four"

        seen: list[object] = []

        async def on_stderr(text: str) -> None:  # coroutine callbacks are awaited
            await asyncio.sleep(0)
            seen.append(("err", text))

        execution = await session.execute(
            ORDERED,
            on_stdout=lambda t: seen.append(("out", t)),
            on_stderr=on_stderr,
            on_result=lambda r: seen.append(("result", r.data["text/plain"])),
            on_error=lambda e: seen.append(("error", e.name)),
        )
        assert seen == [
            ("out", "one\n"),
            ("err", "two\n"),
            ("result", "'shown'"),
            ("out", "three\n"),
            ("error", "ValueError"),
        ]
        assert execution.status == "error"

        started = time.monotonic()
        arrivals = [
            (e.type, time.monotonic() - started)
            async for e in session.stream("import time\nprint(1)\ntime.sleep(1.5)\nprint(2)")
        ]
        assert arrivals[0][0] == "stdout" and arrivals[0][1] < 1.0
        assert arrivals[-1][0] == "end" and arrivals[-1][1] >= 1.5


async def test_async_timeout_interrupt_and_busy(aclient):
    async with await aclient.create_session() as session:
        await session.execute("kept = 1")
        assert (await session.execute("while True: pass", timeout=1)).status == "timeout"
        with pytest.raises(kb.ExecutionTimeout):
            await session.execute("while True: pass", timeout=1, raise_on_error=True)
        assert (await session.execute("kept")).results[0].data["text/plain"] == "1"
        assert await session.interrupt() is False
        slow = asyncio.create_task(session.execute("import time; time.sleep(30)"))
        await asyncio.sleep(0.5)
        with pytest.raises(kb.SessionBusy):
            await session.execute("1")
        assert await session.interrupt() is True
        assert (await slow).error.name == "KeyboardInterrupt"


async def test_async_files_and_images(aclient, tmp_path):
    local = tmp_path / "data.csv"
    local.write_text("a,b\n")
    async with await aclient.create_session() as session:
        assert (await session.upload(b"hello", "dir/hello.txt")).size == 5
        assert (await session.upload(local)).path == "data.csv"
        assert (await session.upload(io.BytesIO(b"xyz"), "obj.bin")).size == 3
        assert sorted(f.path for f in await session.list_files()) == [
            "data.csv",
            "dir/hello.txt",
            "obj.bin",
        ]
        assert await session.download("dir/hello.txt") == b"hello"
        await session.delete_file("obj.bin")
        with pytest.raises(kb.FileNotFound):
            await session.download("obj.bin")
        plot = await session.execute(PLOT)
        data = await session.download(plot.images[0])
        assert data.startswith(b"\x89PNG")
        target = await session.download_to(plot.images[0], tmp_path / "p.png")
        assert target.read_bytes() == data
        saved = await session.save_images(plot, tmp_path / "imgs")
        assert saved == [tmp_path / "imgs" / "fig-001.png"]


async def test_async_one_shot_tools_and_tool_calls(server):
    async with kb.AsyncClient(server.url) as client:
        assert (await client.execute("print('hi')")).stdout == "hi\n"
        assert [e.type async for e in client.stream("print(1)")] == ["stdout", "end"]
        assert await client.tools() == [kb.CODE_INTERPRETER_TOOL]
        first = await client.run_tool_call(tool_call("y = 5\ny", "call_a"))
        assert first["tool_call_id"] == "call_a" and "5" in first["content"]
        second = await client.run_tool_call(openai_tool_call("y * 2"))
        assert second["content"] == "execute_result:\n\n```\n10\n```"
        many = await client.run_tool_calls([tool_call("y", "c1"), tool_call("y + 1", "c2")])
        assert [m["tool_call_id"] for m in many] == ["c1", "c2"]
        kept = client.tool_session_id
        async with await client.create_session() as session:
            await session.run_tool_call(tool_call("z = 3"))
            message = await client.run_tool_call(tool_call("z"), session=session)
            assert message["content"] == "execute_result:\n\n```\n3\n```"
    async with kb.AsyncClient(server.url) as other:
        with pytest.raises(kb.SessionNotFound):
            await other.get_session(kept)


async def test_async_many_concurrent_sessions_see_their_own_state(aclient):
    sessions = await asyncio.gather(*(aclient.create_session() for _ in range(8)))
    try:

        async def work(i: int, session: kb.AsyncSession) -> str:
            await session.execute(f"mine = {i}")
            return (await session.execute("mine")).results[0].data["text/plain"]

        values = await asyncio.gather(*(work(i, s) for i, s in enumerate(sessions)))
        assert values == [str(i) for i in range(8)]
    finally:
        await asyncio.gather(*(s.delete() for s in sessions))


def test_sync_and_async_twins_offer_the_same_methods():
    def public(cls: type) -> dict[str, object]:
        return {n: getattr(cls, n) for n in dir(cls) if not n.startswith("_")}

    renamed = {"close": "aclose"}
    for sync_cls, async_cls in ((kb.Client, kb.AsyncClient), (kb.Session, kb.AsyncSession)):
        sync_names, async_names = public(sync_cls), public(async_cls)
        assert {renamed.get(n, n) for n in sync_names} == set(async_names), sync_cls
        for name, member in sync_names.items():
            twin = async_names[renamed.get(name, name)]
            if inspect.isfunction(member):
                sig, async_sig = inspect.signature(member), inspect.signature(twin)
                assert list(sig.parameters) == list(async_sig.parameters), name
                # `stream` hands back an async iterator at once; everything else is awaited.
                assert inspect.iscoroutinefunction(twin) == (name != "stream"), name


# -- typed errors, one per status --------------------------------------------------------------


def test_typed_errors_for_each_status(server, client, tmp_path):
    with client.create_session() as session:
        with pytest.raises(kb.SessionNotFound) as not_found:
            client.get_session("no-such-session")
        assert not_found.value.status == 404 and "no-such-session" in str(not_found.value)
        with pytest.raises(kb.SessionNotFound):
            kb.Session(client, session.info.model_copy(update={"id": "nope"})).execute("1")

        with pytest.raises(kb.InvalidRequest) as invalid:
            session.execute("1", timeout=-1)
        assert invalid.value.status == 422 and invalid.value.code == "invalid_body"
        assert invalid.value.fields[0]["loc"] == ["body", "timeout"]
        for escaping in ("../../etc/passwd", "/etc/passwd", "a/../../x"):
            with pytest.raises(kb.InvalidRequest) as bad_path:
                session.download(escaping)
            assert bad_path.value.status == 400 and bad_path.value.code == "bad_path", escaping

        with pytest.raises(kb.PayloadTooLarge) as too_large:
            session.execute("x" * (3 * 1024**2))
        assert too_large.value.status == 413 and too_large.value.code == "too_large"
        assert session.execute("'still fine'").status == "ok"

    with running_server(min_idle=1, max_sessions=1, api_key=["key-a"]) as small:
        with kb.Client(small.url) as anonymous, pytest.raises(kb.Unauthorized) as no_key:
            anonymous.list_sessions()
        assert no_key.value.status == 401 and "API key" in no_key.value.message
        with kb.Client(small.url, "wrong") as wrong, pytest.raises(kb.Unauthorized):
            wrong.create_session()
        with kb.Client(small.url, "key-a", max_retries=0) as keyed:
            held = keyed.create_session()
            with pytest.raises(kb.PoolExhausted) as exhausted:
                keyed.create_session()
            assert exhausted.value.status == 429 and exhausted.value.retry_after == 1
            assert not isinstance(exhausted.value, kb.ServiceUnavailable)
            held.delete()


async def test_typed_errors_async_and_busy(server, aclient):
    with pytest.raises(kb.SessionNotFound):
        await aclient.get_session("no-such-session")
    async with await aclient.create_session() as session:
        with pytest.raises(kb.InvalidRequest):
            await session.execute("1", timeout=-1)
        slow = asyncio.create_task(session.execute("import time; time.sleep(1)"))
        await asyncio.sleep(0.4)
        with pytest.raises(kb.SessionBusy) as busy:
            await session.execute("1")
        with pytest.raises(kb.SessionBusy):  # streaming answers 409 before any event
            async for _ in session.stream("1"):
                pass
        assert busy.value.status == 409
        await slow
    with running_server(min_idle=0, max_sessions=1, api_key=["k"]) as small:
        async with kb.AsyncClient(small.url) as anonymous:
            with pytest.raises(kb.Unauthorized):
                await anonymous.list_sessions()


async def test_service_unavailable_is_503_with_retry_after(tmp_path):
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\nexit 3\n")
    broken.chmod(0o755)
    with running_server(wait_ready=False, min_idle=1, kernel_python=str(broken)) as srv:
        async with kb.AsyncClient(srv.url, max_retries=0) as client:
            with pytest.raises(kb.ServiceUnavailable) as unavailable:
                await client.create_session()
    assert unavailable.value.status == 503 and unavailable.value.retry_after == 5
    assert isinstance(unavailable.value, kb.PoolExhausted)


# -- retries -----------------------------------------------------------------------------------


class FlakyProxy:
    """An ASGI proxy in front of the real service that answers the first `failures`
    requests to `path` with 503 and `Retry-After`, then passes everything through."""

    def __init__(self, upstream: str, path: str, failures: int, retry_after: str) -> None:
        self.upstream, self.path = upstream, path
        self.failures, self.retry_after = failures, retry_after
        self.seen: list[tuple[str, str, float]] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.seen.append((scope["method"], scope["path"], time.monotonic()))
        if scope["path"] == self.path and self.failures > 0:
            self.failures -= 1
            payload = b'{"error": {"code": "unavailable", "message": "try later"}}'
            headers = [
                (b"content-type", b"application/json"),
                (b"retry-after", self.retry_after.encode()),
            ]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
            return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"host"]
        async with httpx.AsyncClient(base_url=self.upstream, timeout=60) as upstream:
            answer = await upstream.request(
                scope["method"], scope["path"], content=body, headers=headers
            )
        hop = (b"content-length", b"transfer-encoding", b"connection")
        out = [(k, v) for k, v in answer.headers.raw if k.lower() not in hop]
        await send({"type": "http.response.start", "status": answer.status_code, "headers": out})
        await send({"type": "http.response.body", "body": answer.content})


def test_sync_retry_after_503_honours_retry_after(server):
    proxy = FlakyProxy(server.url, "/v1/sessions", failures=1, retry_after="1")
    with serving(proxy) as url, kb.Client(url) as client:
        started = time.monotonic()
        with client.create_session() as session:
            waited = time.monotonic() - started
            assert session.execute("1 + 1").results[0].data["text/plain"] == "2"
    creates = [t for method, path, t in proxy.seen if (method, path) == ("POST", "/v1/sessions")]
    assert len(creates) == 2
    assert creates[1] - creates[0] >= 0.95 and waited >= 0.95


async def test_async_retry_after_503_for_an_execute(server):
    async with kb.AsyncClient(server.url) as direct:
        session = await direct.create_session()
    path = f"/v1/sessions/{session.id}/execute"
    # Retry-After as an HTTP date works too (whole seconds, so 2-3 s from now).
    when = email.utils.formatdate(time.time() + 3, usegmt=True)
    proxy = FlakyProxy(server.url, path, failures=1, retry_after=when)
    with serving(proxy) as url:
        async with kb.AsyncClient(url) as client:
            handle = await client.get_session(session.id)
            execution = await handle.execute("print('once')")
            assert execution.stdout == "once\n"
            count = (await handle.execute("1")).execution_count
            assert count == 2, "the refused execute must not have run"
            await handle.delete()
    executes = [t for method, p, t in proxy.seen if p == path]
    assert len(executes) == 3 and executes[1] - executes[0] >= 0.9


def test_retry_until_a_session_slot_frees(server):
    with running_server(min_idle=1, max_sessions=1) as small:
        with kb.Client(small.url, max_retries=5) as client:
            held = client.create_session()
            threading.Timer(0.3, held.delete).start()
            started = time.monotonic()
            with client.create_session() as second:  # 429 + Retry-After: 1, then a slot
                assert second.execute("1").status == "ok"
            assert time.monotonic() - started >= 0.9


def test_retries_give_up_after_max_retries_and_cap_the_wait(server):
    proxy = FlakyProxy(server.url, "/v1/sessions", failures=10, retry_after="30")
    with serving(proxy) as url, kb.Client(url, max_retries=2, max_retry_wait=0.2) as client:
        started = time.monotonic()
        with pytest.raises(kb.ServiceUnavailable) as raised:
            client.list_sessions()
        assert time.monotonic() - started < 2
    assert raised.value.retry_after == 30 and len(proxy.seen) == 3


# -- transport failures ------------------------------------------------------------------------


@contextlib.contextmanager
def hanging_up_server() -> Iterator[tuple[str, list[bytes]]]:
    """Reads each request, then closes the connection without answering."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    requests: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                requests.append(conn.recv(65536))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", requests
    finally:
        stop.set()
        thread.join()
        listener.close()


def test_an_execute_is_never_sent_twice_after_the_connection_broke():
    with hanging_up_server() as (url, requests):
        info = kb.SessionInfo(
            id="s1",
            status="idle",
            created_at="2026-01-01T00:00:00Z",
            last_used_at="2026-01-01T00:00:00Z",
            expires_at=None,
            execution_count=0,
        )
        with kb.Client(url, max_retries=3) as client:
            with pytest.raises(kb.ConnectionError) as broken:
                kb.Session(client, info).execute("launch_missiles()")
            assert len(requests) == 1, "a non-idempotent execute was retried"
            assert url in str(broken.value) and isinstance(broken.value, builtins.ConnectionError)
            requests.clear()
            with pytest.raises(kb.ConnectionError):
                client.list_sessions()  # idempotent: retried
            assert len(requests) == 4


async def test_connection_refused_names_the_url():
    port = free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}"
    with kb.Client(url, max_retries=1) as client, pytest.raises(kb.ConnectionError) as raised:
        client.create_session()  # refused is safe to retry, even for a create
    assert f"cannot connect to the kernelbox service at {url}" in str(raised.value)
    assert raised.value.url == f"{url}/v1/sessions"
    async with kb.AsyncClient(url, max_retries=0) as aclient:
        with pytest.raises(kb.ConnectionError, match=f"127.0.0.1:{port}"):
            await aclient.list_sessions()


def test_environment_configures_the_client(server, monkeypatch):
    monkeypatch.setenv("KERNELBOX_URL", server.url + "/")
    monkeypatch.setenv("KERNELBOX_API_KEY", "from-env")
    with kb.Client() as client:
        assert client.base_url == server.url
        assert client._shared.http.headers["Authorization"] == "Bearer from-env"
    monkeypatch.delenv("KERNELBOX_URL")
    with kb.Client() as default:
        assert default.base_url == "http://127.0.0.1:8000"


# -- the small parts, alone --------------------------------------------------------------------


def test_sse_parser():
    parser = core.SSEParser()
    lines = [": keep-alive", "event: stdout", 'data: {"text":', 'data: "a"}', "", "", "data: x"]
    parsed = [parser.feed(line) for line in lines]
    assert parsed[4] == ("stdout", '{"text":\n"a"}')
    assert [p for p in parsed if p is not None] == [("stdout", '{"text":\n"a"}')]
    assert parser.feed("") == ("message", "x")
    assert parser.feed("event:end") is None and parser.feed("data:{}") is None
    assert parser.feed("") == ("end", "{}")


def test_event_decoder_types_fail_and_early_end():
    decoder = core.EventDecoder(url="http://svc/x")
    assert decoder.feed("event: stdout") == [] and decoder.feed('data: {"text": "hi"}') == []
    assert decoder.feed("") == [kb.StdoutEvent(text="hi")]
    for line in ("event: newer_kind", "data: {}", ""):
        assert decoder.feed(line) == []  # unknown events are skipped
    with pytest.raises(kb.ConnectionError, match="ended before"):
        decoder.finish()
    for line in ("event: fail", 'data: {"error": {"code": "internal", "message": "boom"}}'):
        decoder.feed(line)
    with pytest.raises(kb.APIError) as failed:
        decoder.feed("")
    assert failed.value.code == "internal" and failed.value.status is None


def test_retry_policy_and_retry_after():
    policy = core.RetryPolicy(max_retries=2, max_wait=5, backoff=0.5)
    assert policy.delay(0, retry_after=3) == 3 and policy.delay(0, retry_after=60) == 5
    assert 0.25 <= policy.delay(1) <= 1.0 and policy.delay(2) is None
    request = httpx.Request("GET", "http://x")
    dated = httpx.Response(
        503,
        headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"},
        request=request,
    )
    assert core.retry_after(dated) == 0  # a date in the past: retry now
    assert policy.after_response(httpx.Response(500, request=request), 0) is None
    refused = httpx.ConnectError("refused")
    assert policy.after_error(refused, 0, idempotent=False) is not None
    assert policy.after_error(httpx.ReadTimeout("slow"), 0, idempotent=False) is None
    assert policy.after_error(httpx.ReadTimeout("slow"), 0, idempotent=True) is not None


def test_tool_call_shapes():
    assert core.tool_call_parts(tool_call("1")) == ("call_1", '{"code": "1"}')
    assert core.tool_call_parts(openai_tool_call("1", "c")) == ("c", '{"code": "1"}')
    assert core.tool_call_parts({"name": "code_interpreter", "arguments": {"code": "1"}}) == (
        None,
        {"code": "1"},
    )
    responses_item = SimpleNamespace(
        id="fc_1", call_id="call_9", name="code_interpreter", arguments="{}"
    )
    assert core.tool_call_parts(responses_item)[0] == "call_9"
    with pytest.raises(ValueError):
        core.tool_call_parts({"id": "c", "function": {"name": "code_interpreter"}})
