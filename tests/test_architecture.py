"""The shape of the code that users and the next engineer rely on (docs/architecture.md):
the wire package loads nothing above it, the engine's folders have one import name each, the
two distributions agree on their version, and a backend is one module plus one registration."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import kernelbox

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
    )


def test_importing_the_wire_loads_no_http_client_no_engine_and_no_client():
    ran = _run(
        """
        import sys
        import kernelbox_wire, kernelbox_wire.models, kernelbox_wire.events, kernelbox_wire.render
        import kernelbox_wire.envelopes, kernelbox_wire.sandboxfusion, kernelbox_wire.tools
        above = ("httpx", "kernelbox", "kernelbox_server", "fastapi", "jupyter_client", "zmq")
        print(sorted({m.split(".")[0] for m in sys.modules} & set(above)))
        """
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "[]"


def test_the_engine_and_the_service_import_by_their_own_names_only():
    ran = _run("import kernelbox_server.sandbox.manager, kernelbox_server.service.app")
    assert ran.returncode == 0, ran.stderr
    for bare in ("sandbox", "service"):
        ran = _run(f"import {bare}")  # the repository root is on the path here
        assert ran.returncode != 0
        assert f"import kernelbox_server.{bare}, not '{bare}'" in ran.stderr


def test_the_two_distributions_have_one_version():
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]
    assert server["name"] == "kernelbox-server" and client["name"] == "kernelbox-client"
    assert server["version"] == client["version"] == kernelbox.__version__
    assert f"kernelbox-client=={client['version']}" in server["dependencies"]


NEW_BACKEND = '''
from kernelbox_server.sandbox.backends.local import LocalBackend


class EchoBackend(LocalBackend):
    """A backend of one module: the local one under another name."""

    name = "echo"
'''

REGISTRATION = """
[kernelbox.backends]
echo = echo_backend:EchoBackend
"""


def test_a_new_backend_is_one_module_and_one_registration(tmp_path):
    """What a package of one's own does (docs/architecture.md): a module with the backend, an
    entry point naming it; the service then builds it by name."""
    (tmp_path / "echo_backend.py").write_text(NEW_BACKEND)
    info = tmp_path / "echo_backend-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-backend\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text(REGISTRATION)
    ran = _run(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from kernelbox_server.service.engine import build_backend
        from kernelbox_server.service.settings import Settings
        backend = build_backend(Settings(backend="echo"))
        print(type(backend).__name__, backend.name)
        """,
        cwd=tmp_path,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["EchoBackend", "echo"]
