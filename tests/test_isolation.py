"""Isolation, tried the way hostile code would try it: kernel code, and `/run_code` code, of one
API key against the service, the host and the other key's sessions. A real uvicorn server with
two API keys (given through its environment, as the README says), real kernels, over HTTP.

Every check runs on every backend in `BACKENDS`: the local backend (its bwrap sandbox) and the
Docker backend. Where the Docker backend fails one, that failure is its finding, not hidden.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
import psutil
import pytest

from kernelbox_server.sandbox.files import FileIO
from kernelbox_server.sandbox.workdirs import Workdirs
from kernelbox_server.service.app import create_app
from kernelbox_server.service.auth import owner_of
from kernelbox_server.service.settings import Settings
from tests.server import _wait_for_warm, free_port, running_server
from tests.support import DOCKER_RUNTIME, IMAGE, container_cmdlines, require_docker

#: the backends every check runs on
BACKENDS = ["local", pytest.param("docker", marks=pytest.mark.docker)]
KEY_A = f"isolation-a-{secrets.token_hex(8)}"
KEY_B = f"isolation-b-{secrets.token_hex(8)}"
SERVICE_SECRET = f"service-secret-{secrets.token_hex(8)}"  # in the service's environment
PIDS = 64  # per-kernel process limit of the test servers

# Prepended to the code that tries things: `attempt(fn)` is "allowed" or the errno's name.
ATTEMPT = textwrap.dedent(
    """
    import errno, json, os, signal, socket
    def attempt(fn):
        try:
            fn()
            return "allowed"
        except OSError as exc:
            return errno.errorcode.get(exc.errno, repr(exc))
    def cap_eff():
        with open("/proc/self/status") as f:
            return int([l for l in f if l.startswith("CapEff")][0].split()[1], 16)
    """
)


@pytest.fixture(scope="module", params=BACKENDS)
def server(request):
    if request.param == "docker":
        require_docker()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("KERNELBOX_API_KEY", f"{KEY_A},{KEY_B}")
        env.setenv("KERNELBOX_TEST_SERVICE_SECRET", SERVICE_SECRET)
        with running_server(
            backend=request.param,
            image=IMAGE,
            min_idle=2,
            max_sessions=16,
            pids=PIDS,
            run_code_templates=1,
            run_code_slots=8,
        ) as srv:
            yield srv


@pytest.fixture
async def a(server):
    async with server.client(KEY_A) as client:
        yield client


@pytest.fixture
async def b(server):
    async with server.client(KEY_B) as client:
        yield client


async def new_session(client: httpx.AsyncClient) -> str:
    created = await client.post("/v1/sessions", json={})
    assert created.status_code == 201, created.text
    return created.json()["id"]


async def execute(client: httpx.AsyncClient, sid: str, code: str, timeout: float = 60) -> dict:
    response = await client.post(
        f"/v1/sessions/{sid}/execute", json={"code": code, "timeout": timeout}
    )
    assert response.status_code == 200, response.text
    return response.json()


async def facts(client: httpx.AsyncClient, sid: str, code: str, timeout: float = 60) -> dict:
    """Run `code` (which prints one JSON line last) after ATTEMPT; its parsed last line."""
    body = await execute(client, sid, ATTEMPT + textwrap.dedent(code), timeout)
    assert body["status"] == "ok", body
    return json.loads(body["stdout"].strip().splitlines()[-1])


def _gvisor(server) -> bool:
    return server.settings.backend == "docker" and DOCKER_RUNTIME == "runsc"


def session_of(server, key: str, sid: str):
    return server.manager.get(sid, owner_of(key)).session


async def run_code(server, code: str, **fields) -> dict:
    async with server.client(KEY_A) as client:
        body = {"code": code, "language": "python", "run_timeout": 30, **fields}
        response = await client.post("/run_code", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def listener() -> socket.socket:
    """A TCP listener on the host's loopback, for code that must not reach it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.setblocking(False)
    return sock


def assert_nothing_connected(sock: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        sock.accept()


# -- what the service says ---------------------------------------------------------------------


async def test_readyz_reports_the_isolation(server, a):
    body = (await a.get("/readyz")).json()
    assert body["status"] == "ready" and body["idle_kernels"] >= 1
    isolation = body["isolation"]
    assert isolation["backend"] == server.settings.backend
    if server.settings.backend == "local":  # bwrap is installed here (and by .ci/run)
        assert isolation["weak"] is False, isolation
        assert isolation["kernels"]["sandbox"] == "bwrap"
        assert isolation["run_code"].startswith("namespaces of its own per run")


# -- kernels against the service and the host --------------------------------------------------


async def test_kernel_cannot_signal_or_see_the_service(server, a):
    signalled = []
    previous = signal.signal(signal.SIGCONT, lambda *_: signalled.append(True))
    try:
        sid = await new_session(a)
        seen = await facts(
            a,
            sid,
            f"""
            service = {os.getpid()}
            cmdlines, environs = [], []
            for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
                for name, into in (("cmdline", cmdlines), ("environ", environs)):
                    try:
                        with open(f"/proc/{{pid}}/{{name}}", "rb") as f:
                            into.append(f.read())
                    except OSError:
                        pass
            parent = os.getppid()  # the sandbox's PID 1 (or tini), never the service
            print(json.dumps({{
                "exists": attempt(lambda: os.kill(service, 0)),
                "sigcont": attempt(lambda: os.kill(service, signal.SIGCONT)),
                "proc": os.path.exists(f"/proc/{{service}}"),
                "cmdline_seen": any(b"pytest" in c for c in cmdlines),
                "secrets_seen": any(
                    s in e for e in environs + cmdlines
                    for s in ({KEY_A!r}.encode(), {KEY_B!r}.encode(), {SERVICE_SECRET!r}.encode())
                ),
                "own_env_has_secrets": any(
                    s in v for v in os.environ.values()
                    for s in ({KEY_A!r}, {KEY_B!r}, {SERVICE_SECRET!r})
                ),
                "parent_is_service": parent == service,
                "kill_parent": "not tried" if parent == service or {_gvisor(server)}
                    else attempt(lambda: os.kill(parent, signal.SIGKILL)),
                "cap_eff": cap_eff(),
                "uid": os.getuid(),
            }}))
            """,
        )
        assert seen["exists"] in ("ESRCH", "EPERM"), seen
        assert seen["sigcont"] in ("ESRCH", "EPERM"), seen
        assert not signalled
        assert seen["proc"] is False and seen["cmdline_seen"] is False, seen
        assert seen["secrets_seen"] is False and seen["own_env_has_secrets"] is False, seen
        assert seen["parent_is_service"] is False, seen
        assert seen["cap_eff"] == 0 and seen["uid"] != 0, seen
        # Killing its PID 1 did nothing (a PID 1 ignores it from inside its namespace): the
        # kernel, its state and the service are all still there. (gVisor lets it: the kernel
        # ended only itself, and the session says so and goes on.)
        again = await execute(a, sid, "print('still here')")
        assert again["status"] == "ok" and again["stdout"] == "still here\n", again
        if _gvisor(server):  # there PID 1 can be killed from inside: the kernel ends itself
            ended = await execute(a, sid, "import os, signal; os.kill(1, signal.SIGKILL)")
            assert ended["status"] in ("died", "ok"), ended
            again = await execute(a, sid, "print('still here')")
            assert again["status"] == "ok" and again["stdout"] == "still here\n", again
        assert not again["kernel_restarted"]
    finally:
        signal.signal(signal.SIGCONT, previous)


async def test_each_session_has_its_own_uid_under_a_root_service(server, a, b):
    code = "print(json.dumps({'uid': os.getuid(), 'cap_eff': cap_eff()}))"
    first = await facts(a, await new_session(a), code)
    second = await facts(b, await new_session(b), code)
    assert first["cap_eff"] == second["cap_eff"] == 0
    if server.settings.backend == "local" and os.geteuid() == 0:
        assert first["uid"] != second["uid"], (first, second)
        assert min(first["uid"], second["uid"]) >= 1_100_000_000


async def test_kernel_cannot_reach_any_loopback_port(server, a):
    host_listener = listener()
    service_port = int(server.url.rsplit(":", 1)[1])
    try:
        sid = await new_session(a)
        seen = await facts(
            a,
            sid,
            f"""
            def connect(host, port):
                socket.create_connection((host, port), timeout=3).close()
            print(json.dumps({{
                "listener": attempt(lambda: connect("127.0.0.1", {host_listener.getsockname()[1]})),
                "service": attempt(lambda: connect("127.0.0.1", {service_port})),
                "outside": attempt(lambda: connect("1.1.1.1", 53)),
            }}))
            """,
        )
        assert "allowed" not in seen.values(), seen
        assert_nothing_connected(host_listener)
    finally:
        host_listener.close()


async def test_kernel_cannot_open_another_sessions_files_or_sockets(server, a, b):
    sid_b = await new_session(b)
    assert (await execute(b, sid_b, "open('secret.txt', 'w').write('s3cret')"))["status"] == "ok"
    other = session_of(server, KEY_B, sid_b)
    proc = other.kernel.proc
    targets = {
        "workdir": str(other.workdir),
        "secret": str(other.workdir / "secret.txt"),
        "sessions": str(other.workdir.parent.parent),
        "runtime": str(proc.runtime_dir),
        "connection": str(Path(proc.runtime_dir) / "connection.json"),
        "socket": f"{proc.connection_info['ip']}-{proc.connection_info['shell_port']}",
    }
    host_pid = getattr(proc, "host_pid", None) or proc.pid  # Docker's, or the local sandbox's
    sid = await new_session(a)
    seen = await facts(
        a,
        sid,
        f"""
        t = {json.dumps(targets)}
        def unix(path):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(path)
            finally:
                s.close()
        print(json.dumps({{
            "read secret": attempt(lambda: open(t["secret"]).read()),
            "list workdir": attempt(lambda: os.listdir(t["workdir"])),
            "list sessions": attempt(lambda: os.listdir(t["sessions"])),
            "list runtime": attempt(lambda: os.listdir(t["runtime"])),
            "read connection": attempt(lambda: open(t["connection"]).read()),
            "connect socket": attempt(lambda: unix(t["socket"])),
            "signal kernel": attempt(lambda: os.kill({host_pid}, 0)),
        }}))
        """,
    )
    assert "allowed" not in seen.values(), seen


async def test_kernel_writes_only_its_working_directory_and_private_scratch(server, a, b):
    marker = f"kernelbox-probe-{secrets.token_hex(6)}"
    sid = await new_session(a)
    seen = await facts(
        a,
        sid,
        f"""
        import sys, sysconfig
        marker = {marker!r}
        def write(directory):
            return attempt(lambda: open(os.path.join(directory, marker), "w").write("x"))
        def reopen(path):
            return attempt(lambda: os.close(os.open(path, os.O_WRONLY)))
        shared = ["/", "/etc", "/usr", "/usr/local", "/root", "/home", "/home/sandbox", "/run",
                  "/var/tmp", "/opt/kernelbox", "/opt/kernelbox/matplotlib", sys.prefix,
                  sys.base_prefix, sysconfig.get_paths()["purelib"], os.path.dirname(os.__file__)]
        print(json.dumps({{
            "shared": {{d: write(d) for d in shared}},
            "boot script": reopen("/opt/kernelbox/kernel_boot.py"),
            "own": {{d: write(d) for d in (os.getcwd(), "/tmp")}},
            "scratch": {{d: write(d) for d in ("/dev/shm", "/run/kernelbox")}},
        }}))
        """,
    )
    assert all(result != "allowed" for result in seen["shared"].values()), seen
    assert seen["boot script"] != "allowed", seen
    assert set(seen["own"].values()) == {"allowed"}, seen
    # What it may write besides its working directory is its own: not the host's, not the
    # other session's.
    sid_b = await new_session(b)
    theirs = await facts(
        b,
        sid_b,
        f"""
        print(json.dumps([d for d in ("/tmp", "/dev/shm", "/run/kernelbox")
                          if os.path.exists(os.path.join(d, {marker!r}))]))
        """,
    )
    assert theirs == []
    runtime_root = server.manager.pool.backend.runtime_root
    on_host = [Path("/tmp", marker), Path("/dev/shm", marker), *runtime_root.rglob(marker)]
    assert not any(p.exists() for p in on_host), on_host


async def test_warm_kernels_carry_nothing_another_key_planted(server, a, b):
    pool = server.manager.pool
    warm = [(str(w.workdir), str(w.kernel.proc.runtime_dir)) for w in pool._idle]
    sid = await new_session(a)
    planted = await facts(
        a,
        sid,
        f"""
        import sys, sysconfig, matplotlib
        line = "import os; os.environ['KERNELBOX_PLANTED'] = '1'\\n"
        purelib = sysconfig.get_paths()["purelib"]
        targets = {{
            os.path.join(purelib, "zz_kernelbox_plant.pth"): line,
            os.path.join(purelib, "sitecustomize.py"): line,
            os.path.join(os.path.dirname(os.__file__), "sitecustomize.py"): line,
            "/tmp/kernelbox_plant": "x",
            "/dev/shm/kernelbox_plant": "x",
            os.path.join(matplotlib.get_configdir(), "matplotlibrc"): "lines.linewidth: 7.25\\n",
            "/opt/kernelbox/matplotlib/matplotlibrc": "lines.linewidth: 7.25\\n",
            os.path.join(os.environ.get("IPYTHONDIR", "/tmp/ipython"),
                         "profile_default", "startup", "00-plant.py"): line,
        }}
        for workdir, runtime in {json.dumps(warm)}:
            targets[os.path.join(workdir, "kernelbox_plant")] = "x"
            targets[os.path.join(runtime, "kernelbox_plant")] = "x"
        def plant(path, text):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
        print(json.dumps({{
            "written": {{p: attempt(lambda p=p, t=t: plant(p, t)) for p, t in targets.items()}},
            "boot script": attempt(lambda: os.close(os.open("/opt/kernelbox/kernel_boot.py",
                                                          os.O_WRONLY))),
        }}))
        """,
    )
    # Three sessions for the other key: the kernels that were warm before the planting, and
    # one started after it (the pool's refill, or a cold start).
    check = """
    import matplotlib
    ipython = os.environ.get("IPYTHONDIR", "/tmp/ipython")
    print(json.dumps({
        "env": os.environ.get("KERNELBOX_PLANTED"),
        "tmp": os.path.exists("/tmp/kernelbox_plant"),
        "shm": os.path.exists("/dev/shm/kernelbox_plant"),
        "startup": os.path.exists(f"{ipython}/profile_default/startup/00-plant.py"),
        "linewidth": matplotlib.rcParams["lines.linewidth"],
        "workdir": os.listdir("."),
        "runtime": [n for n in os.listdir("/run/kernelbox") if "plant" in n],
    }))
    """
    try:
        for _ in range(3):
            seen = await facts(b, await new_session(b), check)
            assert seen == {
                "env": None,
                "tmp": False,
                "shm": False,
                "startup": False,
                "linewidth": 1.5,
                "workdir": [],
                "runtime": [],
            }, (seen, planted)
        assert planted["boot script"] != "allowed", planted
    finally:  # had a plant reached the service's own interpreter, it must not stay there
        for name in ("zz_kernelbox_plant.pth", "sitecustomize.py"):
            path = Path(sysconfig.get_paths()["purelib"], name)
            if planted["written"].get(str(path)) == "allowed":
                path.unlink(missing_ok=True)


async def test_processes_a_kernel_started_die_with_its_session(server, a):
    marker = f"{4000 + secrets.randbelow(1000)}.{secrets.randbelow(10**6):06d}"
    sid = await new_session(a)
    proc = session_of(server, KEY_A, sid).kernel.proc
    started = await execute(
        a,
        sid,
        "import subprocess\n"
        # A double fork in a session of its own: a daemon that left every group of the kernel.
        f"subprocess.run(['setsid', 'sh', '-c', 'sleep {marker} &'], check=True)\n"
        "print('started')",
    )
    assert started["stdout"] == "started\n", started
    assert await _until(lambda: _sandboxed_with(proc, marker), True), "the daemon did not start"
    assert (await a.delete(f"/v1/sessions/{sid}")).status_code == 204
    assert await _until(lambda: _sandboxed_with(proc, marker), False) == []


def _sandboxed_with(proc, marker: str) -> list[str]:
    """Command lines with `marker` among a kernel's sandbox's processes. Docker: as its
    container sees them (gVisor's processes are not the host's); a container that is gone
    has none. Local: the host's processes."""
    if not hasattr(proc, "container"):
        return [" ".join(p.cmdline()) for p in _processes_with(marker, True, timeout=0)]
    return [line for line in container_cmdlines(proc.container) if marker in line]


async def _until(probe, present: bool, timeout: float = 30) -> list:
    """`probe()` once it finds something (`present`) or nothing (not), or at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        found = await asyncio.to_thread(probe)
        if bool(found) == present or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.2)


def _processes_with(marker: str, present: bool, timeout: float = 30) -> list[psutil.Process]:
    """The host's processes whose command line has `marker`, once there are some (`present`)
    or none (not `present`), or at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for proc in psutil.process_iter():
            try:
                if marker in " ".join(proc.cmdline()):
                    found.append(proc)
            except psutil.Error:
                continue
        if bool(found) == present or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


async def test_a_fork_bomb_stops_at_its_kernels_process_limit(server, a, b):
    sid, sid_b = await new_session(a), await new_session(b)
    bomb = asyncio.ensure_future(
        facts(
            a,
            sid,
            f"""
            import time
            children, error = [], None
            for _ in range({PIDS * 4}):
                try:
                    pid = os.fork()
                except OSError as exc:
                    error = errno.errorcode[exc.errno]
                    break
                if pid == 0:
                    time.sleep(60)
                    os._exit(0)
                children.append(pid)
            time.sleep(2)  # all of them alive, while the other session forks
            for pid in children:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            print(json.dumps({{"forked": len(children), "error": error}}))
            """,
        )
    )
    await asyncio.sleep(0.5)
    other = await facts(
        b,
        sid_b,
        """
        import subprocess
        print(json.dumps([subprocess.run(["true"]).returncode for _ in range(5)]))
        """,
    )
    assert other == [0] * 5
    if _gvisor(server):
        # gVisor's own threads count in the container's pids cgroup too: its wider bound may
        # end the whole sandbox before RLIMIT_NPROC says EAGAIN (README, gVisor): the session
        # says so and goes on.
        with contextlib.suppress(AssertionError):  # facts() found it `died`
            result = await bomb
            assert result["error"] == "EAGAIN" and result["forked"] < PIDS, result
        ended = await execute(a, sid, "1")
        assert ended["status"] == "ok", ended
        return
    result = await bomb
    assert result["error"] == "EAGAIN" and result["forked"] < PIDS, result


async def test_interrupt_reaches_the_codes_children(server, a):
    sid = await new_session(a)
    await execute(a, sid, "kept = 7")
    started = time.monotonic()
    result = await execute(a, sid, "import subprocess\nsubprocess.run(['sleep', '60'])", timeout=1)
    assert result["status"] == "timeout" and not result["kernel_restarted"], result
    assert time.monotonic() - started < 1 + server.settings.interrupt_grace + 1.0
    after = await facts(
        a,
        sid,
        """
        sleeping = [p for p in os.listdir("/proc") if p.isdigit()
                    and b"sleep" in open(f"/proc/{p}/cmdline", "rb").read()]
        print(json.dumps({"kept": kept, "sleeping": sleeping}))
        """,
    )
    assert after == {"kept": 7, "sleeping": []}


# -- /run_code ---------------------------------------------------------------------------------

VICTIM = """
import json, os, socket, time
started = time.time()
open("secret.txt", "w").write("s3cret")
tcp = socket.socket()
tcp.bind(("127.0.0.1", 0))
tcp.listen()
abstract = socket.socket(socket.AF_UNIX)
abstract.bind("\\0kernelbox-victim")
abstract.listen()
# Published where a run would look: /tmp and /dev/shm (each run's own, if isolated).
for path in ("/tmp/victim.json", "/dev/shm/victim.json"):
    with open(path, "w") as f:
        json.dump({"pid": os.getpid(), "cwd": os.getcwd(), "port": tcp.getsockname()[1]}, f)
    os.chmod(path, 0o644)
time.sleep(6)
print(json.dumps({"secret": open("secret.txt").read(), "started": started, "ended": time.time()}))
"""

ATTACKER = (
    ATTEMPT
    + """
import time
started = time.time()
me = os.getpid()
foreign, victim = set(), None
while time.time() < started + 3 and victim is None:
    for path in ("/tmp/victim.json", "/dev/shm/victim.json"):
        try:
            victim = json.load(open(path))
        except (OSError, ValueError):
            pass
    foreign |= {int(p) for p in os.listdir("/proc") if p.isdigit()} - {1, me}
    time.sleep(0.05)
def connect_abstract():
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect("\\0kernelbox-victim")
    finally:
        s.close()
def connect_tcp():
    socket.create_connection(("127.0.0.1", victim["port"]), timeout=2).close()
out = {
    "found victim": victim is not None,
    "foreign pids": sorted(foreign),
    "signal foreign": sorted({attempt(lambda p=p: os.kill(p, 0)) for p in foreign}),
    "cmdline foreign": sorted(
        {attempt(lambda p=p: open(f"/proc/{p}/cmdline").read()) for p in foreign}),
    "abstract socket": attempt(connect_abstract),
    "cap_eff": cap_eff(),
    "started": started,
    "ended": time.time(),
}
if victim is not None:
    out["read secret"] = attempt(lambda: open(victim["cwd"] + "/secret.txt").read())
    out["signal victim"] = attempt(lambda: os.kill(victim["pid"], 0))
    out["tcp"] = attempt(connect_tcp)
print(json.dumps(out))
"""
)


async def test_a_run_cannot_see_signal_or_reach_a_concurrent_run_or_the_template(server):
    victim = asyncio.ensure_future(run_code(server, VICTIM))
    attacker = asyncio.ensure_future(run_code(server, ATTACKER))
    v, att = await victim, await attacker
    assert v["status"] == "Success", v
    assert att["status"] == "Success", att
    seen_v = json.loads(v["run_result"]["stdout"])
    seen = json.loads(att["run_result"]["stdout"])
    assert seen_v["secret"] == "s3cret"
    # They did run at the same time: for the attacker's 3 s where it finds nothing of the
    # victim (local), until it finds what the victim published in the shared /tmp (Docker).
    overlap = min(seen_v["ended"], seen["ended"]) - max(seen_v["started"], seen["started"])
    assert overlap > (2 if server.settings.backend == "local" else 0), (v, att)
    assert seen["cap_eff"] == 0, seen
    if server.settings.backend == "local":
        # Namespaces of its own: neither the victim, nor the template, nor its init is there.
        assert seen["foreign pids"] == [], seen
        assert seen["abstract socket"] != "allowed", seen
        out_of_reach = ("read secret", "signal victim", "tcp")
    else:
        # A Docker template's runs share its container's process list and loopback (README,
        # "What separates runs"); a uid of their own keeps each one's files and processes apart.
        assert seen["foreign pids"], seen
        assert "allowed" not in seen["signal foreign"], seen
        out_of_reach = ("read secret", "signal victim")
    # Where the victim could be found at all (what it published, in a shared /tmp), it is still
    # out of reach.
    for what in out_of_reach:
        assert seen.get(what, "not found") != "allowed", seen


async def test_a_run_cannot_reach_host_loopback(server):
    host_listener = listener()
    try:
        port = host_listener.getsockname()[1]
        body = await run_code(
            server,
            ATTEMPT + f"print(attempt(lambda: socket.create_connection(('127.0.0.1', {port}), 3)))",
        )
        assert body["run_result"]["stdout"].strip() not in ("", "allowed"), body
        assert_nothing_connected(host_listener)
    finally:
        host_listener.close()


async def test_a_runs_files_are_gone_after_it(server):
    marker = f"kernelbox-run-{secrets.token_hex(6)}"
    first = await run_code(
        server,
        f"import os\nfor d in ('.', '/tmp', '/dev/shm'):\n"
        f"    open(os.path.join(d, {marker!r}), 'w').write('x')\nprint(os.getcwd())",
    )
    assert first["status"] == "Success", first
    cwd = first["run_result"]["stdout"].strip()
    second = await run_code(
        server,
        f"import os\nprint([p for p in ({cwd!r}, '/tmp/{marker}', '/dev/shm/{marker}', "
        f"os.path.join({cwd!r}, {marker!r})) if os.path.exists(p)])",
    )
    assert second["run_result"]["stdout"] == "[]\n", second
    assert not any(Path(d, marker).exists() for d in ("/tmp", "/dev/shm"))


# -- a service killed with SIGKILL -------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_everything_a_kernel_started_dies_with_a_killed_service(backend, tmp_path):
    """SIGKILL gives the service no chance to clean up: the sandbox must die with it, a
    double-forked daemon of the kernel's included (Docker: every container but the session's,
    which outlives the service by design and dies with its session). (The keys travel in its
    environment: none may show on any command line.)"""
    if backend == "docker":
        require_docker()
    port = free_port()
    env = {
        **os.environ,
        "KERNELBOX_API_KEY": f"{KEY_A},{KEY_B}",
        "KERNELBOX_MIN_IDLE": "1",
        "KERNELBOX_DATA_DIR": str(tmp_path),
        "KERNELBOX_BACKEND": backend,
        "KERNELBOX_IMAGE": IMAGE,
    }
    service = subprocess.Popen(
        [sys.executable, "-m", "kernelbox.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = f"{5000 + secrets.randbelow(1000)}.{secrets.randbelow(10**6):06d}"
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_warm(url, 1)
        headers = {"Authorization": f"Bearer {KEY_B}"}
        sid = httpx.post(f"{url}/v1/sessions", json={}, headers=headers).json()["id"]
        code = f"import subprocess\nsubprocess.run(['setsid', 'sh', '-c', 'sleep {marker} &'])"
        body = {"code": code, "timeout": 30}
        ran = httpx.post(f"{url}/v1/sessions/{sid}/execute", json=body, headers=headers, timeout=60)
        assert ran.json()["status"] == "ok", ran.text
        if backend == "docker":  # as the containers see it: gVisor's are not host processes
            assert _containers_of(service.pid)
            assert any(_sandboxed_with(_Kernel(c), marker) for c in _containers_of(service.pid))
        else:
            assert _processes_with(marker, present=True)
        on_command_lines = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if any(k in " ".join(proc.cmdline()) for k in (KEY_A, KEY_B)):
                    on_command_lines.append(proc.pid)
        assert on_command_lines == []
        service.send_signal(signal.SIGKILL)
        service.wait(timeout=10)
        if backend == "docker":
            # Its watcher removes the containers, and all in them, but the session's: that one
            # outlives the service on purpose (the next service re-attaches to it, see
            # test_durable.py). Removing it, as deleting the session would, ends its daemon.
            deadline = time.monotonic() + 30
            while len(left := _containers_of(service.pid)) > 1:
                assert time.monotonic() < deadline, f"containers outlived the service: {left}"
                time.sleep(0.2)
            _remove_containers_of(service.pid)
        left = _processes_with(marker, present=False)
        assert left == [], f"still running after the service was killed: {left}"
        # Its working directories (mounted filesystems, when root) are the next start's to
        # remove: the same clean-up a service runs on its data directory at start-up.
        assert asyncio.run(_next_start_removes_stale(tmp_path)), "nothing was left to remove"
        assert not [m for m in _mount_points() if m.startswith(str(tmp_path))]
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
        for proc in _processes_with(marker, present=False, timeout=0):
            proc.kill()
        if backend == "docker":
            _remove_containers_of(service.pid)


async def _next_start_removes_stale(data_dir: Path) -> list[Path]:
    workdirs = Workdirs(data_dir, FileIO(), disk_bytes=None, mount="never")
    try:
        return await workdirs.remove_stale()
    finally:
        await workdirs.close()


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


@dataclasses.dataclass
class _Kernel:
    container: object


def _containers_of(pid: int) -> list:
    import docker

    from kernelbox_server.sandbox.backends.docker import our_containers_filter

    client = docker.from_env()
    return client.containers.list(filters=our_containers_filter(pid=pid), ignore_removed=True)


def _remove_containers_of(pid: int) -> None:
    import docker

    from kernelbox_server.sandbox.backends.docker import our_containers_filter

    client = docker.from_env()
    for container in client.containers.list(all=True, filters=our_containers_filter(pid=pid)):
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):  # 409: going
            container.remove(force=True)


# -- start-up: keys and weak isolation ---------------------------------------------------------


def test_api_keys_from_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv("KERNELBOX_API_KEY", raising=False)  # a server fixture's, maybe
    keys = tmp_path / "keys"
    keys.write_text("first\nsecond, third\n\n")
    assert Settings(api_key_file=keys).api_key == ["first", "second", "third"]
    assert Settings(api_key="zero", api_key_file=keys).api_key[0] == "zero"
    with pytest.raises(ValueError, match="api_key_file"):
        Settings(api_key_file=tmp_path / "missing")


async def test_several_keys_on_weak_isolation_refuse_to_start_unless_allowed(tmp_path):
    weak = {"local_sandbox": "none", "min_idle": 0, "data_dir": tmp_path}
    app = create_app(Settings(api_key=[KEY_A, KEY_B], **weak))
    with pytest.raises(RuntimeError, match="KERNELBOX_ALLOW_WEAK_ISOLATION"):
        async with app.router.lifespan_context(app):
            pass
    for allowed in (
        Settings(api_key=[KEY_A, KEY_B], allow_weak_isolation=True, **weak),
        Settings(api_key=[KEY_A], **weak),
    ):
        app = create_app(allowed)
        async with app.router.lifespan_context(app):
            assert app.state.application.engine.manager.pool.backend.isolation["weak"] is True


# -- a service that is not root ----------------------------------------------------------------

NON_ROOT = 65534
NON_ROOT_ENGINE = """
import asyncio, json, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from kernelbox_server.sandbox.backends.base import KernelConfig, Limits
from kernelbox_server.sandbox.backends.local import LocalBackend
from kernelbox_server.sandbox.session import KernelSession

BOMB = '''
import errno, os, time
children, error = [], None
for _ in range(200):
    try:
        pid = os.fork()
    except OSError as exc:
        error = errno.errorcode[exc.errno]
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    children.append(pid)
time.sleep(1)
for pid in children:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
print(len(children), error)
'''

async def main(root):
    backend = LocalBackend(KernelConfig(limits=Limits(pids=32)), runtime_root=root / "run")
    a = await KernelSession.start(backend, root / "a")
    b = await KernelSession.start(backend, root / "b")
    try:
        seen = await a.execute(
            f"print(json.dumps([os.getuid(), os.path.exists('/proc/{os.getpid()}'), "
            "int([l for l in open('/proc/self/status') if l.startswith('CapEff')][0].split()[1]"
            ", 16)]))"
        )
        bomb = asyncio.ensure_future(a.execute(BOMB, timeout=60))
        await asyncio.sleep(0.5)
        other = await b.execute("import subprocess\\nprint([subprocess.run(['true']).returncode"
                                " for _ in range(5)])")
        print(json.dumps({"isolation": backend.isolation, "seen": seen.stdout,
                          "bomb": (await bomb).stdout, "other": other.stdout}))
    finally:
        await a.close()
        await b.close()
        await backend.close()

root = Path(sys.argv[2])
for name in ("a", "b"):
    (root / name).mkdir()
asyncio.run(main(root))
"""


def _traversable_for_others(path: Path) -> Path | None:
    """The first ancestor of `path` that other users cannot enter, if any."""
    for parent in [*reversed(path.parents), path]:
        if parent.is_dir() and not parent.stat().st_mode & 0o001:
            return parent
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="the service is not root: every test here is so")
def test_a_service_that_is_not_root_isolates_its_kernels_and_counts_their_processes_apart():
    """Run the engine as another user (in a private mount namespace where that user can reach
    this interpreter, e.g. pyenv's under /root, 0700): bwrap's unprivileged mode. The kernels
    have the service's uid, yet cannot see it, and each has its own process count."""
    repo = Path(__file__).resolve().parent.parent
    prefix = Path(sys.base_prefix)
    closed = _traversable_for_others(prefix)
    root = Path(tempfile.mkdtemp(prefix="kb-nonroot-", dir="/tmp"))  # others may enter /tmp
    try:
        os.chown(root, NON_ROOT, NON_ROOT)
        setup = ["set -e", "mount --make-rprivate /"]
        if closed is not None:  # a tmpfs over it, with the one subtree needed moved back
            below = prefix.relative_to(closed).parts[0]
            stash = root / "stash"
            stash.mkdir()
            setup += [
                f"mount --rbind {closed / below} {stash}",
                f"mount -t tmpfs -o mode=0755 tmpfs {closed}",
                f"mkdir {closed / below}",
                f"mount --move {stash} {closed / below}",
            ]
        setup.append(f'exec setpriv --reuid={NON_ROOT} --regid={NON_ROOT} --clear-groups -- "$@"')
        (root / "engine.py").write_text(NON_ROOT_ENGINE)
        work = root / "work"
        work.mkdir()
        os.chown(work, NON_ROOT, NON_ROOT)
        engine = [sys.executable, str(root / "engine.py"), str(repo), str(work)]
        done = subprocess.run(
            ["unshare", "-m", "sh", "-c", "\n".join(setup), "sh", *engine],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    isolation = report["isolation"]
    assert isolation["weak"] is False and isolation["kernels"]["user"] == "the service's uid"
    assert json.loads(report["seen"]) == [NON_ROOT, False, 0], report
    forked, error = report["bomb"].split()
    assert error == "EAGAIN" and int(forked) < 32, report
    assert report["other"] == "[0, 0, 0, 0, 0]\n", report
