"""SandboxFusion compatibility: its own PyPI client (`sandbox-fusion`), pointed with its own
`set_endpoint` at a real kernelbox on loopback, for `/run_code` (fork server) and
`/run_jupyter` (a warm kernel used once). Every answer is parsed by the client's models.

The server requires an API key, which the client can only send as `user:KEY@host` in the
endpoint URL (Basic auth); raw HTTP checks use `Authorization: Bearer`.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import sandbox_fusion as sf

from tests.server import running_server
from tests.support import require_docker

KEY = "sf-test-key"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(data: str) -> bytes:
    return base64.b64decode(data)


@pytest.fixture(scope="module")
def server():
    with running_server(min_idle=1, max_sessions=16, api_key=KEY, run_code_templates=2) as srv:
        # The client's own configuration, as a training job sets it.
        sf.set_endpoint(srv.url.replace("http://", f"http://kernelbox:{KEY}@"))
        yield srv


def run(code: str, **fields) -> sf.RunCodeResponse:
    return sf.run_code(sf.RunCodeRequest(code=code, language="python", **fields), max_attempts=1)


def post(server, path: str, body: dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=120)


# -- run_code ----------------------------------------------------------------------------------


def test_success(server):
    resp = run("import numpy as np\nprint('hello', int(np.arange(4).sum()))")
    assert resp.status == sf.RunStatus.Success
    assert resp.message == ""
    assert resp.compile_result is None
    assert resp.run_result.status == sf.CommandRunStatus.Finished
    assert resp.run_result.return_code == 0
    assert resp.run_result.stdout == "hello 6\n"
    assert resp.run_result.stderr == ""
    assert isinstance(resp.run_result.execution_time, float)
    assert 0 < resp.run_result.execution_time < 5
    assert resp.files == {}


def test_wire_shape_is_sandboxfusions(server):
    """Keys in the server model's order, nulls sent (not left out)."""
    body = post(server, "/run_code", {"code": "print(1)", "language": "python"}).json()
    assert list(body) == [
        "status",
        "message",
        "compile_result",
        "run_result",
        "executor_pod_name",
        "files",
    ]
    assert body["compile_result"] is None and body["executor_pod_name"] is None
    assert list(body["run_result"]) == [
        "status",
        "execution_time",
        "return_code",
        "stdout",
        "stderr",
    ]
    # verl's payload: every field, memory_limit_MB included, "None" as stdin (older verl)
    verl = {
        "compile_timeout": 10,
        "run_timeout": 10,
        "code": "print(input())",
        "stdin": "None",
        "memory_limit_MB": 1024,
        "language": "python",
        "files": {},
        "fetch_files": [],
    }
    body = post(server, "/run_code", verl).json()
    assert body["status"] == "Success" and body["run_result"]["stdout"] == "None\n"


def test_uncaught_exception_is_return_code_1_with_traceback(server):
    resp = run("print('before')\nraise ValueError('boom')")
    assert resp.status == sf.RunStatus.Failed
    assert resp.message == ""
    assert resp.run_result.status == sf.CommandRunStatus.Finished
    assert resp.run_result.return_code == 1
    assert resp.run_result.stdout == "before\n"
    stderr = resp.run_result.stderr
    assert stderr.startswith("Traceback (most recent call last):\n  File ")
    assert '.py", line 2, in <module>\n' in stderr
    assert "    raise ValueError('boom')\n" in stderr  # the source line, as `python file.py`
    assert stderr.endswith("ValueError: boom\n")
    assert "forkserver" not in stderr  # no frame of ours


def test_syntax_error_and_exit_codes(server):
    resp = run('print("Hello, world!"')
    assert resp.status == sf.RunStatus.Failed and resp.run_result.return_code == 1
    assert resp.run_result.stderr.endswith("SyntaxError: '(' was never closed\n")
    assert "Traceback" not in resp.run_result.stderr

    assert run("import sys; sys.exit(3)").run_result.return_code == 3
    ok = run("import sys; print('x'); sys.exit(0)")
    assert ok.status == sf.RunStatus.Success and ok.run_result.stdout == "x\n"
    msg = run("raise SystemExit('bye')")
    assert msg.run_result.return_code == 1 and msg.run_result.stderr == "bye\n"
    killed = run("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert killed.status == sf.RunStatus.Failed and killed.run_result.return_code == -9


def test_timeout(server):
    started = time.monotonic()
    resp = run("import time\nprint('started', flush=True)\ntime.sleep(30)", run_timeout=1)
    assert time.monotonic() - started < 5
    assert resp.status == sf.RunStatus.Failed
    assert resp.message == ""
    assert resp.run_result.status == sf.CommandRunStatus.TimeLimitExceeded
    assert resp.run_result.return_code is None
    assert resp.run_result.stdout == "started\n"  # partial output, a string
    assert resp.run_result.stderr == ""
    assert 1.0 <= resp.run_result.execution_time < 3


def test_stdin(server):
    resp = run("a = input()\nb = input()\nprint(int(a) + int(b))", stdin="2\n40\n")
    assert resp.status == sf.RunStatus.Success and resp.run_result.stdout == "42\n"
    big = "x" * 300_000 + "\n"  # more than a pipe holds
    assert run("import sys; print(len(sys.stdin.read()))", stdin=big).run_result.stdout == (
        f"{len(big)}\n"
    )
    no_stdin = run("input()")
    assert no_stdin.run_result.return_code == 1
    assert "EOFError" in no_stdin.run_result.stderr


def test_files_and_fetch_files(server):
    code = textwrap.dedent(
        """
        import os
        import helper  # files are importable, as next to a script
        print(open('data/in.txt').read().split())
        print(helper.double(21))
        os.makedirs('out', exist_ok=True)
        open('out/result.bin', 'wb').write(bytes(range(256)))
        open('answer.txt', 'w').write('42')
        """
    )
    resp = run(
        code,
        files={
            "data/in.txt": b64(b"1 2 3"),
            "helper.py": b64(b"def double(x):\n    return 2 * x\n"),
            "skipped.txt": None,
        },
        fetch_files=["answer.txt", "out/result.bin", "missing.txt", "data", "data/in.txt"],
    )
    assert resp.status == sf.RunStatus.Success, resp.run_result.stderr
    assert resp.run_result.stdout == "['1', '2', '3']\n42\n"
    # keyed by the string asked for; missing files and directories left out
    assert set(resp.files) == {"answer.txt", "out/result.bin", "data/in.txt"}
    assert unb64(resp.files["answer.txt"]) == b"42"
    assert unb64(resp.files["out/result.bin"]) == bytes(range(256))
    assert unb64(resp.files["data/in.txt"]) == b"1 2 3"


def test_files_are_fetched_after_a_failure_or_a_timeout(server):
    failed = run("open('log.txt', 'w').write('partial')\n1/0", fetch_files=["log.txt"])
    assert failed.status == sf.RunStatus.Failed and unb64(failed.files["log.txt"]) == b"partial"
    slow = run(
        "open('log.txt', 'w').write('so far')\nimport time; time.sleep(30)",
        run_timeout=1,
        fetch_files=["log.txt"],
    )
    assert slow.run_result.status == sf.CommandRunStatus.TimeLimitExceeded
    assert unb64(slow.files["log.txt"]) == b"so far"


def test_paths_outside_the_working_directory_and_scratch_are_refused(server):
    for fields in (
        {"files": {"../escape.txt": b64(b"x")}},
        {"files": {"/etc/abs.txt": b64(b"x")}},
        {"files": {"/mnt": b64(b"x")}},
        {"files": {"/mnt/../etc/x": b64(b"x")}},
        {"fetch_files": ["/etc/passwd"]},
        {"fetch_files": ["a/../../b"]},
    ):
        body = post(server, "/run_code", {"code": "1", "language": "python", **fields})
        assert body.status_code == 200
        parsed = sf.RunCodeResponse(**body.json())
        assert parsed.status == sf.RunStatus.SandboxError
        assert "working directory" in parsed.message, parsed.message
        assert "/mnt" in parsed.message, parsed.message
    bad = post(server, "/run_code", {"code": "1", "language": "python", "files": {"a": "%%%"}})
    assert "not valid base64" in sf.RunCodeResponse(**bad.json()).message


def test_other_languages_get_a_final_failed_answer(server):
    body = post(server, "/run_code", {"code": "int main(){}", "language": "cpp"})
    assert body.status_code == 200
    parsed = sf.RunCodeResponse(**body.json())
    assert parsed.status == sf.RunStatus.Failed
    assert "python and pytest only" in parsed.message and "'cpp'" in parsed.message
    assert parsed.compile_result is None
    assert parsed.run_result.status == sf.CommandRunStatus.Error
    assert parsed.run_result.return_code is None and parsed.run_result.stdout == ""
    # The real client, with its default retries (5 attempts, 17.8 s of backoff on a
    # SandboxError or a non-200): one request, an answer at once. python2 is in the client's
    # list of languages, not in SandboxFusion's server's: no 422 for it either.
    for language in ("nodejs", "python2", "gtest"):
        started = time.monotonic()
        resp = sf.run_code(sf.RunCodeRequest(code="x", language=language))
        assert time.monotonic() - started < 2
        assert resp.status == sf.RunStatus.Failed and language in resp.message
    # Not a SandboxFusion language at all (no client sends it): a validation error.
    assert post(server, "/run_code", {"code": "1", "language": "python3"}).status_code == 422


# -- language: pytest --------------------------------------------------------------------------

PYTEST_CODE = textwrap.dedent(
    """
    def add(a, b):
        return a + b

    def test_add():
        assert add(1, 2) == 3

    def test_strings():
        assert add("a", "b") == "ab"
    """
)


def test_pytest_passing_tests(server):
    resp = sf.run_code(sf.RunCodeRequest(code=PYTEST_CODE, language="pytest"), max_attempts=1)
    assert resp.status == sf.RunStatus.Success, resp
    assert resp.compile_result is None
    assert resp.run_result.status == sf.CommandRunStatus.Finished
    assert resp.run_result.return_code == 0
    out = resp.run_result.stdout
    assert "test session starts" in out and "2 passed" in out, out
    assert ".py .." in out  # the test file, as `pytest file.py` names it


def test_pytest_failing_tests_args_and_files(server):
    code = PYTEST_CODE + textwrap.dedent(
        """
        def test_fails():
            assert add(2, 2) == 5

        def test_reads_a_file():
            assert open("data.txt").read() == "ok"
        """
    )
    # `args` is SandboxFusion's server field; its PyPI client has none, so raw HTTP here.
    body = {"code": code, "language": "pytest", "args": ["-q"], "files": {"data.txt": b64(b"ok")}}
    resp = sf.RunCodeResponse(**post(server, "/run_code", body).json())
    assert resp.status == sf.RunStatus.Failed
    assert resp.run_result.status == sf.CommandRunStatus.Finished
    assert resp.run_result.return_code == 1  # pytest's "tests failed"
    out = resp.run_result.stdout
    assert "1 failed, 3 passed" in out, out
    assert "assert 4 == 5" in out and "test session starts" not in out  # -q applied
    # No test at all: pytest's exit code 5.
    none = sf.run_code(sf.RunCodeRequest(code="x = 1", language="pytest"), max_attempts=1)
    assert none.status == sf.RunStatus.Failed and none.run_result.return_code == 5


# -- absolute paths and loopback ----------------------------------------------------------------

ABSOLUTE = textwrap.dedent(
    """
    import os
    print(open('/mnt/in.txt').read(), open('/data/sub/in.bin', 'rb').read().hex())
    open('/mnt/b', 'w').write('mnt')
    os.makedirs('/data/out', exist_ok=True)
    open('/data/out/c', 'w').write('data')
    open('/tmp/d', 'w').write('tmp')
    open('rel.txt', 'w').write('rel')
    os.symlink('/etc/hostname', '/mnt/link')
    os.mkfifo('/tmp/fifo')
    print(sorted(os.listdir('/mnt')))
    """
)
ABSOLUTE_FILES = {"/mnt/in.txt": b64(b"hello"), "/data/sub/in.bin": b64(b"\x00\x01")}
ABSOLUTE_FETCH = ["/mnt/b", "/data/out/c", "/tmp/d", "rel.txt", "/mnt/link", "/tmp/fifo"]


def check_absolute(stdout: str, files: dict[str, str]) -> None:
    assert stdout == "hello 0001\n['b', 'in.txt', 'link']\n", stdout
    # fetched under the names asked for; the link and the FIFO left out
    assert {k: unb64(v) for k, v in files.items()} == {
        "/mnt/b": b"mnt",
        "/data/out/c": b"data",
        "/tmp/d": b"tmp",
        "rel.txt": b"rel",
    }


def test_absolute_paths_are_the_runs_own_scratch(server):
    resp = run(ABSOLUTE, files=ABSOLUTE_FILES, fetch_files=ABSOLUTE_FETCH)
    assert resp.status == sf.RunStatus.Success, resp.run_result.stderr
    check_absolute(resp.run_result.stdout, resp.files)
    # The next run starts with empty scratch: nothing of the last one is there.
    again = run("import os; print([os.listdir('/mnt'), os.listdir('/data'), os.listdir('/tmp')])")
    mnt, data, tmp = ast.literal_eval(again.run_result.stdout)
    # /tmp holds the run's own program, and the interpreter's environment where the service
    # is installed under /tmp (bound back read-only into every run)
    environment = {
        Path(p).resolve().parts[2]
        for p in (sys.prefix, *sys.path)
        if p and Path(p).resolve().parts[:2] == ("/", "tmp") and len(Path(p).resolve().parts) > 2
    }
    assert mnt == data == [] and len(set(tmp) - environment) == 1, again.run_result.stdout
    assert next(iter(set(tmp) - environment)).startswith("tmp"), again.run_result.stdout


async def test_concurrent_runs_have_separate_scratch(server):
    code = (
        "import os, sys, time\n"
        "open('/mnt/same', 'w').write(sys.stdin.read())\n"
        "time.sleep(0.5)\n"
        "print(open('/mnt/same').read(), os.listdir('/mnt'))"
    )

    def one(i: int) -> sf.RunCodeResponse:
        return run(code, stdin=str(i), fetch_files=["/mnt/same"])

    results = await asyncio.gather(*(asyncio.to_thread(one, i) for i in range(6)))
    for i, resp in enumerate(results):
        assert resp.run_result.stdout == f"{i} ['same']\n", resp.run_result
        assert resp.files == {"/mnt/same": b64(str(i).encode())}


LOOPBACK = textwrap.dedent(
    """
    import socket, threading
    def echo(family, host):
        srv = socket.socket(family, socket.SOCK_STREAM)
        srv.bind((host, 0)); srv.listen(1)
        port = srv.getsockname()[1]
        def serve():
            conn, _ = srv.accept(); conn.sendall(conn.recv(100).upper()); conn.close()
        threading.Thread(target=serve).start()
        c = socket.create_connection((host, port), timeout=5)
        c.sendall(b'ping'); got = c.recv(100); c.close(); srv.close()
        return got.decode()
    def reach(host, port):
        try:
            socket.create_connection((host, port), timeout=2).close(); return 'reached'
        except OSError:
            return 'unreachable'
    print(echo(socket.AF_INET, '127.0.0.1'), echo(socket.AF_INET6, '::1'),
          reach('127.0.0.1', PORT), reach('1.1.1.1', 53))
    """
)


def loopback_code(service_port: int) -> str:
    return LOOPBACK.replace("PORT", str(service_port))


def test_loopback_works_and_only_loopback_run_code(server):
    port = int(server.url.rsplit(":", 1)[1])
    resp = run(loopback_code(port))
    # the service listens on the host's 127.0.0.1:port; the run's 127.0.0.1 is its own
    assert resp.run_result.stdout == "PING PING unreachable unreachable\n", resp.run_result


def test_loopback_works_and_only_loopback_run_jupyter(server):
    port = int(server.url.rsplit(":", 1)[1])
    resp = jupyter([loopback_code(port)])
    assert resp.cells[0].stdout == "PING PING unreachable unreachable\n", resp.cells[0]


def test_jupyter_absolute_paths_are_the_kernels_own_scratch(server):
    cells = [ABSOLUTE.replace("print(sorted", "print(sorted", 1)]
    resp = jupyter(cells, files=ABSOLUTE_FILES, fetch_files=ABSOLUTE_FETCH)
    assert resp.status == sf.RunStatus.Success, resp
    check_absolute(resp.cells[0].stdout, resp.files)
    assert "/mnt/link" in resp.message and "/tmp/fifo" in resp.message  # said why
    # A fresh kernel next time: its scratch is empty.
    again = jupyter(["import os; print(os.listdir('/mnt'), os.listdir('/data'))"])
    assert again.cells[0].stdout == "[] []\n"
    # Outside the scratch roots: refused before anything runs.
    refused = post(server, "/run_jupyter", {"cells": ["1"], "fetch_files": ["/etc/passwd"]})
    assert refused.json()["status"] == "SandboxError"
    # Larger than one output chunk: read back whole.
    big = jupyter(
        ["open('/data/big', 'wb').write(bytes(range(256)) * 4000)"], fetch_files=["/data/big"]
    )
    assert unb64(big.files["/data/big"]) == bytes(range(256)) * 4000


def test_output_is_capped_head_kept(server):
    resp = run("import sys\nsys.stdout.write('a' * 3_000_000)\nprint('end', file=sys.stderr)")
    out = resp.run_result.stdout
    assert resp.status == sf.RunStatus.Success
    assert out.startswith("a" * 1000) and out.endswith(
        f"...[{3_000_000 - 1024**2} bytes truncated]"
    )
    assert resp.run_result.stderr == "end\n"


async def test_an_output_flood_does_not_hold_up_other_runs(server):
    loop = asyncio.get_running_loop()
    flood = loop.run_in_executor(
        None, lambda: run("while True:\n    print('x' * 10000)", run_timeout=3)
    )
    await asyncio.sleep(1)
    started = time.monotonic()
    quick = await loop.run_in_executor(None, lambda: run("print('quick')"))
    assert quick.run_result.stdout == "quick\n"
    assert time.monotonic() - started < 2
    flooded = await flood
    assert flooded.run_result.status == sf.CommandRunStatus.TimeLimitExceeded
    assert len(flooded.run_result.stdout) < 1024**2 + 100
    assert flooded.run_result.stdout.endswith("bytes truncated]")


def test_memory_limit_is_applied(server):
    code = "import numpy as np\na = np.ones(400 * 2**20 // 8)\nprint('allocated')"
    assert run(code, memory_limit_MB=1024).status == sf.RunStatus.Success
    limited = post(
        server, "/run_code", {"code": code, "language": "python", "memory_limit_MB": 300}
    ).json()
    assert limited["status"] == "Failed" and "MemoryError" in limited["run_result"]["stderr"]


def test_auth(server):
    assert (
        post(server, "/run_code", {"code": "1", "language": "python"}, key=None).status_code == 401
    )
    assert post(server, "/run_jupyter", {"cells": ["1"]}, key="wrong").status_code == 401
    assert post(server, "/run_code", {"code": "1", "language": "python"}).status_code == 200
    wrong = server.url.replace("http://", "http://kernelbox:wrong@")
    with pytest.raises(Exception, match="401"):
        sf.run_code(sf.RunCodeRequest(code="1", language="python"), endpoint=wrong, max_attempts=1)


async def test_128_concurrent_run_code_all_correct(server):
    async def one(i: int) -> sf.RunCodeResponse:
        code = f"import time, numpy as np\ntime.sleep(0.2)\nprint({i}, int(np.int64({i}) * 2))"
        return await sf.run_code_async(
            sf.RunCodeRequest(code=code, language="python", stdin=str(i)), max_attempts=1
        )

    started = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(128)))
    elapsed = time.monotonic() - started
    for i, resp in enumerate(results):
        assert resp.status == sf.RunStatus.Success, resp
        assert resp.run_result.stdout == f"{i} {2 * i}\n"
    # The sleeps overlap: runs really are concurrent.
    assert elapsed < 20


def test_a_run_leaves_no_trace_for_the_next(server):
    first = textwrap.dedent(
        """
        import builtins, json, os, subprocess, sys, time
        builtins.LEAKED = 'global'                 # a global every module would see
        json.dumps = lambda *a, **k: 'patched'     # a monkeypatched module
        sys.modules['planted'] = sys               # a module that was never installed
        os.environ['LEAKED'] = '1'
        open('marker.txt', 'w').write('x')         # a file in the working directory
        open(os.path.join(os.environ['TMPDIR'], 'tmpfile'), 'w').write('x')
        # processes left behind: one in the run's group, one that escaped with setsid
        child = subprocess.Popen(['sleep', '60'])
        daemon = subprocess.Popen(['sleep', '61'], start_new_session=True)
        import numpy as np; np.random.seed(0)
        print(os.getcwd(), child.pid, daemon.pid)
        """
    )
    resp = run(first)
    assert resp.status == sf.RunStatus.Success, resp.run_result.stderr
    cwd, child, daemon = resp.run_result.stdout.split()
    second = textwrap.dedent(
        f"""
        import builtins, json, os, sys, time
        import numpy as np
        for pid in ({child}, {daemon}):
            for _ in range(50):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                print('alive', pid)
        print(hasattr(builtins, 'LEAKED'), json.dumps({{}}), 'planted' in sys.modules,
              'LEAKED' in os.environ, os.path.exists('marker.txt'), os.path.exists({cwd!r}),
              os.listdir('.') == [os.path.basename(__file__)],
              np.random.rand() != 0.5488135039273248)  # the first draw after seed(0)
        """
    )
    resp = run(second)
    assert resp.run_result.stdout == "False {} False False False False True True\n", (
        resp.run_result.stdout + resp.run_result.stderr
    )


# -- run_jupyter -------------------------------------------------------------------------------


def jupyter(cells: list[str], **fields) -> sf.RunJupyterResponse:
    return sf.run_jupyter(sf.RunJupyterRequest(cells=cells, **fields), max_attempts=1)


def test_jupyter_cells_in_order_in_one_kernel(server):
    resp = jupyter(
        [
            "a = 123",
            "a",
            "print(a)",
            'import sys; sys.stderr.write("stderr message")',
            'raise RuntimeError("error message")',
            "a + 1",  # an error does not stop later cells
            "import matplotlib.pyplot as plt\nplt.plot([1, 2]); plt.show()",
        ]
    )
    assert resp.status == sf.RunStatus.Success
    assert resp.message == ""
    assert resp.driver.status == sf.CommandRunStatus.Finished
    assert resp.driver.return_code == 0
    cells = resp.cells
    assert len(cells) == 7
    assert cells[0] == sf.models.CellRunResult(stdout="", stderr="", display=[], error=[])
    assert cells[1].display == [{"text/plain": "123"}]
    assert cells[2].stdout == "123\n"
    assert cells[3].stderr == "stderr message"
    assert cells[4].error[0]["ename"] == "RuntimeError"
    assert cells[4].error[0]["evalue"] == "error message"
    assert isinstance(cells[4].error[0]["traceback"], list)
    assert cells[5].display == [{"text/plain": "124"}]
    assert any("image/png" in d for d in cells[6].display)


def test_jupyter_files_fetch_and_a_fresh_kernel_each_time(server):
    resp = jupyter(
        ["secret = open('in.txt').read()", "open('out.txt', 'w').write(secret.upper())"],
        files={"in.txt": b64(b"hello")},
        fetch_files=["out.txt", "nothing.txt"],
    )
    assert resp.status == sf.RunStatus.Success
    assert resp.files == {"out.txt": b64(b"HELLO")}
    again = jupyter(["secret", "import os; print(os.path.exists('in.txt'))"])
    assert again.cells[0].error[0]["ename"] == "NameError"
    assert again.cells[1].stdout == "False\n"


def test_jupyter_cell_timeout_is_applied(server):
    started = time.monotonic()
    resp = jupyter(
        ["x = 1", "import time; time.sleep(30)", "print(x)"], cell_timeout=1, total_timeout=60
    )
    assert time.monotonic() - started < 10
    assert resp.status == sf.RunStatus.Failed
    assert resp.driver.status == sf.CommandRunStatus.TimeLimitExceeded
    assert len(resp.cells) == 2  # the cells that ran, the last one timed out
    assert resp.cells[1].error[0]["ename"] == "TimeoutError"


def test_jupyter_total_timeout_is_applied(server):
    started = time.monotonic()
    resp = jupyter(["import time", "time.sleep(30)", "print('never')"], total_timeout=2)
    assert time.monotonic() - started < 10
    assert resp.status == sf.RunStatus.Failed
    assert resp.driver.status == sf.CommandRunStatus.TimeLimitExceeded
    assert len(resp.cells) == 2
    assert resp.cells[1].error[0]["ename"] == "TimeoutError"


def test_jupyter_wire_shape(server):
    body = post(server, "/run_jupyter", {"cells": ["1"], "kernel": "python3"}).json()
    assert list(body) == ["status", "message", "driver", "cells", "executor_pod_name", "files"]
    assert body["cells"] == [
        {"stdout": "", "stderr": "", "display": [{"text/plain": "1"}], "error": []}
    ]
    assert post(server, "/run_jupyter", {"cells": ["1"], "kernel": "python2"}).status_code == 422


# -- Docker ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docker_server():
    require_docker()
    with running_server(
        backend="docker", min_idle=0, max_sessions=4, run_code_templates=1, run_code_slots=8
    ) as srv:
        yield srv


def drun(server, code: str, **fields) -> dict:
    body = {"code": code, "language": "python", **fields}
    response = httpx.post(f"{server.url}/run_code", json=body, timeout=120)
    assert response.status_code == 200
    sf.RunCodeResponse(**response.json())
    return response.json()


@pytest.mark.docker
def test_docker_run_code_basics(docker_server):
    body = drun(docker_server, "import pandas as pd\nprint(len(pd.DataFrame({'a': [1, 2]})))")
    assert body["status"] == "Success" and body["run_result"]["stdout"] == "2\n"
    failed = drun(docker_server, "1/0")
    assert failed["run_result"]["return_code"] == 1
    assert "ZeroDivisionError" in failed["run_result"]["stderr"]
    slow = drun(docker_server, "while True: pass", run_timeout=1)
    assert slow["run_result"]["status"] == "TimeLimitExceeded"
    files = drun(
        docker_server,
        "print(open('in.txt').read()); open('out.txt', 'w').write('ok')",
        stdin="",
        files={"in.txt": b64(b"data")},
        fetch_files=["out.txt"],
    )
    assert files["run_result"]["stdout"] == "data\n" and files["files"] == {"out.txt": b64(b"ok")}


@pytest.mark.docker
def test_docker_runs_have_no_privileges_network_or_ipc(docker_server):
    code = textwrap.dedent(
        """
        import ctypes, os, socket
        status = open('/proc/self/status').read()
        cap_eff = [l for l in status.splitlines() if l.startswith('CapEff')][0].split()[1]
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            socket.create_connection(('1.1.1.1', 53), timeout=2); net = 'reachable'
        except OSError:
            net = 'none'
        print(os.getuid() != 0, os.getgid() != 0, int(cap_eff, 16), net,
              libc.shmget(0, 4096, 0o1000 | 0o600), os.access('/run/kernelbox', os.R_OK),
              oct(os.umask(0)), os.getcwd().startswith('/tmp/tmp'))
        """
    )
    body = drun(docker_server, code)
    assert body["run_result"]["stdout"] == "True True 0 none -1 False 0o77 True\n", body
    # The template itself: root in its container with the two capabilities runs' ids need.
    import docker

    for template in docker_server.app.state.application.engine.forkserver.templates:
        host = docker.from_env().api.inspect_container(template.proc.container_id)["HostConfig"]
        assert (host["CapDrop"], sorted(host["CapAdd"])) == (["ALL"], ["SETGID", "SETUID"])


@pytest.mark.docker
async def test_docker_concurrent_runs_cannot_read_or_signal_each_other(docker_server):
    victim = textwrap.dedent(
        """
        import os, time
        open('secret.txt', 'w').write('s3cret')
        info = f'{os.getpid()} {os.getcwd()}'
        # Shared on purpose, for the attacker; published whole (written, then renamed) so it
        # never reads a file that exists but is still empty.
        with open('/dev/shm/victim-info.part', 'w') as f:
            f.write(info)
        os.chmod('/dev/shm/victim-info.part', 0o644)
        os.replace('/dev/shm/victim-info.part', '/dev/shm/victim-info')
        open('/tmp/left-behind', 'w').write('x')
        os.chmod('/tmp/left-behind', 0o644)
        time.sleep(4)
        print(open('secret.txt').read())
        """
    )
    attacker = textwrap.dedent(
        """
        import os, signal, time
        for _ in range(100):
            if os.path.exists('/dev/shm/victim-info'):
                break
            time.sleep(0.05)
        pid, cwd = open('/dev/shm/victim-info').read().split()
        pid = int(pid)
        def attempt(fn):
            try:
                fn(); return 'allowed'
            except PermissionError:
                return 'denied'
            except OSError as exc:
                return type(exc).__name__
        print(attempt(lambda: os.listdir(cwd)),
              attempt(lambda: open(cwd + '/secret.txt').read()),
              attempt(lambda: os.kill(pid, signal.SIGKILL)),
              attempt(lambda: open(f'/proc/{pid}/environ').read()),
              attempt(lambda: open(f'/proc/{pid}/mem', 'rb').read(1)),
              attempt(lambda: os.readlink(f'/proc/{pid}/cwd')))
        """
    )
    loop = asyncio.get_running_loop()
    first = loop.run_in_executor(None, lambda: drun(docker_server, victim))
    second = loop.run_in_executor(None, lambda: drun(docker_server, attacker))
    v, a = await first, await second
    assert v["status"] == "Success" and v["run_result"]["stdout"] == "s3cret\n", v
    # gVisor (runsc 2022-12) checks /proc/PID/environ against its mode, 0444, not ptrace
    # access: another uid's environment is readable there (README, "Backends and isolation").
    environ = "allowed" if docker_server.manager.pool.backend.runtime.gvisor else "denied"
    expected = f"denied denied denied {environ} denied denied\n"
    assert a["run_result"]["stdout"] == expected, a
    # What the victim left in the shared /tmp and /dev/shm went with it.
    after = drun(
        docker_server,
        "import os; print(os.path.exists('/tmp/left-behind'), "
        "os.path.exists('/dev/shm/victim-info'))",
    )
    assert after["run_result"]["stdout"] == "False False\n", after


@pytest.mark.docker
def test_docker_processes_left_behind_are_killed(docker_server):
    first = drun(
        docker_server,
        "import subprocess\n"
        "p = subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
        "print(p.pid)",
    )
    pid = int(first["run_result"]["stdout"])
    check = f"import os, time\ntime.sleep(0.5)\nprint(os.path.exists('/proc/{pid}'))"
    assert drun(docker_server, check)["run_result"]["stdout"] == "False\n"
    pss = docker_server.app.state.application.engine.forkserver.memory_pss()
    assert pss and None not in pss


@pytest.mark.docker
async def test_docker_files_left_behind_are_removed_whoever_owns_them(docker_server):
    # The template has no CAP_DAC_OVERRIDE: it removes what runs leave as the owners of each
    # directory, however they left it (no permissions at all, a directory of another run's).
    owner = textwrap.dedent(
        """
        import os, time
        os.makedirs("/tmp/shared", exist_ok=True)
        os.chmod("/tmp/shared", 0o777)
        os.makedirs("deep/er")
        open("deep/er/f", "w").write("x")
        os.chmod("deep/er", 0)
        os.chmod("deep", 0o500)
        os.symlink("/etc/passwd", "/tmp/link-to-passwd")
        for _ in range(200):
            if os.path.exists("/tmp/shared/done"):
                break
            time.sleep(0.05)
        print(os.getcwd())
        """
    )
    guest = textwrap.dedent(
        """
        import os, time
        for _ in range(200):
            if os.path.exists("/tmp/link-to-passwd"):  # the owner's directory is ready
                break
            time.sleep(0.05)
        os.makedirs("/tmp/shared/guest/inner")
        open("/tmp/shared/guest/inner/f", "w").write("x")
        os.chmod("/tmp/shared/guest", 0o500)
        open("/tmp/shared/done", "w").close()
        print(os.getcwd())
        """
    )
    loop = asyncio.get_running_loop()
    first = loop.run_in_executor(None, lambda: drun(docker_server, owner))
    second = loop.run_in_executor(None, lambda: drun(docker_server, guest))
    o, g = await first, await second
    assert o["run_result"]["return_code"] == 0 == g["run_result"]["return_code"], (o, g)
    left = [o["run_result"]["stdout"].strip(), g["run_result"]["stdout"].strip()]
    after = drun(
        docker_server,
        f"import os\nprint([p for p in {left!r} + ['/tmp/shared', '/tmp/link-to-passwd']"
        " if os.path.lexists(p)], os.path.exists('/etc/passwd'))",
    )
    assert after["run_result"]["stdout"] == "[] True\n", after


@pytest.mark.docker
def test_docker_absolute_paths_pytest_and_loopback(docker_server):
    # Absolute paths: the run's own files in the container's /tmp, /mnt, /data (per-run uid,
    # swept after the run); a link or a FIFO is never fetched.
    body = drun(docker_server, ABSOLUTE, files=ABSOLUTE_FILES, fetch_files=ABSOLUTE_FETCH)
    assert body["status"] == "Success", body
    check_absolute(body["run_result"]["stdout"], body["files"])
    again = drun(docker_server, "import os; print(os.listdir('/mnt'), os.listdir('/data'))")
    assert again["run_result"]["stdout"] == "[] []\n", again  # swept
    # pytest
    passed = drun(docker_server, PYTEST_CODE, language="pytest")
    assert passed["status"] == "Success" and "2 passed" in passed["run_result"]["stdout"]
    failed = drun(
        docker_server, PYTEST_CODE + "\ndef test_no():\n    assert False\n", language="pytest"
    )
    assert failed["status"] == "Failed" and failed["run_result"]["return_code"] == 1
    # loopback inside, nothing outside (the service's port included)
    port = int(docker_server.url.rsplit(":", 1)[1])
    loop = drun(docker_server, loopback_code(port))
    assert loop["run_result"]["stdout"] == "PING PING unreachable unreachable\n", loop


@pytest.mark.docker
def test_docker_jupyter_absolute_paths_and_loopback(docker_server):
    port = int(docker_server.url.rsplit(":", 1)[1])
    body = {
        "cells": [ABSOLUTE, loopback_code(port)],
        "files": ABSOLUTE_FILES,
        "fetch_files": ABSOLUTE_FETCH,
    }
    response = httpx.post(f"{docker_server.url}/run_jupyter", json=body, timeout=120)
    resp = sf.RunJupyterResponse(**response.json())
    assert resp.status == sf.RunStatus.Success, resp
    check_absolute(resp.cells[0].stdout, resp.files)
    assert resp.cells[1].stdout == "PING PING unreachable unreachable\n", resp.cells[1]
