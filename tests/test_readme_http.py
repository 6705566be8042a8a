"""The README's curl example, run as pasted (only the address changed), and the content-type
rules it states: JSON bodies need their type, except on a service with API keys."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.server import running_server

README = Path(__file__).parent.parent / "README.md"
BODY = b'{"code": "print(6 * 7)"}'


def curl_example() -> str:
    text = README.read_text()
    block = re.search(r"```bash\n(# a session; its id is the handle.*?)```", text, re.S)
    assert block, "the README's curl example moved"
    return block.group(1)


def test_the_readme_curl_example_works_as_pasted(tmp_path):
    with running_server(min_idle=1) as server:
        script = curl_example().replace("localhost:8000", server.url)
        run = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        assert '"stdout":"42\\n"' in run.stdout
        assert "event: end" in run.stdout
        assert (tmp_path / "fig.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        assert httpx.get(f"{server.url}/v1/sessions").json() == []  # deleted at the end


@pytest.mark.parametrize("keys", [[], ["ct-key"]])
def test_a_body_without_content_type_is_json_only_with_keys(keys):
    headers = {"Authorization": "Bearer ct-key"}
    with running_server(min_idle=0, api_key=keys) as server, httpx.Client(timeout=60) as http:
        bare = http.post(f"{server.url}/v1/execute", content=BODY, headers=headers)
        if keys:
            assert bare.status_code == 200 and bare.json()["stdout"] == "42\n"
        else:  # a page in a browser could send this to a loopback service unasked
            assert bare.status_code == 422
            assert "send 'Content-Type: application/json'" in bare.json()["error"]["message"]
        form = http.post(
            f"{server.url}/v1/execute",
            content=BODY,
            headers={**headers, "Content-Type": "application/x-www-form-urlencoded"},
        )
        assert form.status_code == 422
        assert "not as JSON" in form.json()["error"]["message"]
        typed = http.post(f"{server.url}/v1/execute", json={"code": "print(1)"}, headers=headers)
        assert typed.status_code == 200
