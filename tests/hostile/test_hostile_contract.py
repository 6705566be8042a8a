"""Bad requests get the error the contract names, never a 500, a hang or another shape."""

from __future__ import annotations

import asyncio
import socket
import time
from urllib.parse import urlsplit

from tests.hostile.harness import new_session


async def test_run_jupyter_answers_in_its_own_shape_when_the_key_is_full(hostile):
    async with hostile.client() as c:
        held = [await new_session(c) for _ in range(6)]
        answer = await c.post("/run_jupyter", json={"cells": ["1"]})
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "SandboxError", answer.json()
        for sid in held:
            await c.delete(f"/v1/sessions/{sid}")


async def test_an_oversized_chunked_body_is_413(hostile):
    async def chunks():
        for _ in range(40):
            yield b"x" * 100_000

    async with hostile.client() as c:
        sid = await new_session(c)
        answer = await c.post(
            f"/v1/sessions/{sid}/execute",
            content=chunks(),
            headers={"Content-Type": "application/json"},
        )
        assert answer.status_code == 413, answer.text
        assert answer.json()["error"]["code"] == "too_large"


async def test_bad_env_names_and_deep_json_are_422(hostile):
    async with hostile.client() as c:
        for env in ({"A=B": "1"}, {"": "1"}, {"A": "x\x00y"}, {"KERNELBOX_API_KEY": "x"}):
            answer = await c.post("/v1/sessions", json={"env": env})
            assert answer.status_code == 422, (env, answer.text)
        deep = "[" * 100_000 + "]" * 100_000
        answer = await c.post(
            "/v1/execute",
            content=f'{{"code": {deep}}}',
            headers={"Content-Type": "application/json"},
        )
        assert answer.status_code in (400, 422), answer.text
        assert "error" in answer.json()


async def test_a_slow_client_loses_its_connection(hostile):
    host, port = urlsplit(hostile.url).hostname, urlsplit(hostile.url).port

    def dribble() -> float:
        with socket.create_connection((host, port), timeout=10) as sock:
            started = time.monotonic()
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers never finish
            try:
                while sock.recv(1024):
                    pass
            except TimeoutError:
                return 1e9
            return time.monotonic() - started

    took = await asyncio.to_thread(dribble)
    assert took < 5, f"the connection stayed open {took:.1f} s (header timeout: 2 s)"


async def test_idle_connections_that_send_nothing_are_closed(hostile):
    host, port = urlsplit(hostile.url).hostname, urlsplit(hostile.url).port

    def silent() -> float:
        with socket.create_connection((host, port), timeout=10) as sock:
            started = time.monotonic()
            try:
                sock.recv(1)
            except TimeoutError:
                return 1e9
            return time.monotonic() - started

    assert await asyncio.to_thread(silent) < 5
