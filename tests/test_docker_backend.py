"""What the Docker sandbox holds against hostile code (Docker only; the engine's own tests run
on every backend through the `backend` fixture).

Limits here are smaller than the defaults so bombs end quickly; the defaults are exercised
by the engine tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kernelbox_server.sandbox.backends.base import KernelConfig, Limits
from kernelbox_server.sandbox.session import KernelSession
from tests.support import DOCKER_RUNTIME, IMAGE, require_docker

pytestmark = pytest.mark.docker

MiB = 1024**2
LIMITS = Limits(memory_bytes=512 * MiB, cpus=1.0, pids=64, file_size_bytes=64 * MiB, open_files=256)
TMP_BYTES = 32 * MiB
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
async def dbackend():
    require_docker()
    from kernelbox_server.sandbox.backends.docker import DockerBackend

    backend = DockerBackend(
        KernelConfig(limits=LIMITS), image=IMAGE, tmp_bytes=TMP_BYTES, runtime=DOCKER_RUNTIME
    )
    yield backend
    await backend.close()


@pytest.fixture
async def session(dbackend, workdir):
    s = await KernelSession.start(dbackend, workdir)
    yield s
    await s.close()


def docker_client():
    import docker

    return docker.from_env()


async def run(session: KernelSession, code: str, timeout: float = 30.0):
    return await session.execute(textwrap.dedent(code), timeout)


async def run_ok(session: KernelSession, code: str, timeout: float = 30.0) -> str:
    result = await run(session, code, timeout)
    assert result.status == "ok", (result.error, result.stderr)
    return result.stdout


def host_addresses() -> set[str]:
    """Addresses at which the host could be reached from a container with a network."""
    found = {"172.17.0.1"}
    try:
        bridge = docker_client().networks.get("bridge")
        found |= {c["Gateway"] for c in bridge.attrs["IPAM"]["Config"] if "Gateway" in c}
    except Exception:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing address
            found.add(s.getsockname()[0])
        except OSError:
            pass
    return found


# -- isolation -------------------------------------------------------------------------------


async def test_no_network_to_outside_or_host(session):
    # A listener on every host interface: a sandbox with any route to the host would reach it.
    server = socket.create_server(("0.0.0.0", 0))
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract_name = f"\0kernelbox-test-{os.getpid()}"
    abstract.bind(abstract_name)
    abstract.listen()
    port = server.getsockname()[1]
    targets = [(addr, port) for addr in sorted(host_addresses())] + [("1.1.1.1", 53)]
    try:
        out = await run_ok(
            session,
            f"""
            import socket, os
            for target in {targets!r}:
                try:
                    socket.create_connection(tuple(target), timeout=2).close()
                    print("REACHED", target)
                except OSError as exc:
                    print("blocked", target, exc.errno)
            for path in ("/var/run/docker.sock", "/run/docker.sock"):
                print("docker.sock exists:", os.path.exists(path))
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect({abstract_name!r})
                print("REACHED abstract socket")
            except OSError as exc:
                print("blocked abstract", exc.errno)
            print("interfaces:", [name for _, name in socket.if_nameindex()])
            """,
        )
    finally:
        server.close()
        abstract.close()
    assert "REACHED" not in out, out
    assert out.count("blocked") == len(targets) + 1
    assert "docker.sock exists: True" not in out
    assert "interfaces: ['lo']" in out


async def test_host_files_and_service_secrets_are_invisible(dbackend, workdir, monkeypatch):
    secret_file = workdir.parent / "host-secret.txt"
    secret_file.write_text("host secret")
    monkeypatch.setenv("KERNELBOX_TEST_SECRET", "s3cr3t-value")
    session = await KernelSession.start(dbackend, workdir)
    try:
        out = await run_ok(
            session,
            f"""
            import os
            for path in ({str(secret_file)!r}, {str(workdir)!r}, "/root", "/etc/shadow"):
                try:
                    print(path, "listing" if os.path.isdir(path) else "read",
                          os.listdir(path) if os.path.isdir(path) else open(path).read()[:20])
                except OSError as exc:
                    print(path, "denied", type(exc).__name__)
            print("env", sorted(os.environ))
            for pid in ("self", "1"):
                print(pid, "environ has secret:",
                      b"s3cr3t" in open(f"/proc/{{pid}}/environ", "rb").read())
            """,
        )
    finally:
        await session.close()
    assert "host secret" not in out
    assert f"{secret_file} denied FileNotFoundError" in out
    assert f"{workdir} denied FileNotFoundError" in out  # the host path means nothing inside
    assert "/etc/shadow denied" in out
    assert "KERNELBOX_TEST_SECRET" not in out and "s3cr3t-value" not in out
    assert "environ has secret: True" not in out


async def test_kernel_cannot_touch_the_service_or_other_sessions(dbackend, session, tmp_path):
    """The isolation checks, under whichever runtime the backend has: the service's process
    (signals, its command line and environment), another session's files and connection file,
    the host's loopback ports, and what one kernel plants for the next one to find."""
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    (other_dir / "secret.txt").write_text("other session's secret")
    other = await KernelSession.start(dbackend, other_dir)
    listener = socket.create_server(("127.0.0.1", 0))  # a loopback port of the host
    try:
        await run_ok(
            other,
            """
            import subprocess
            open("/tmp/planted", "w").write("x")
            open("/dev/shm/planted", "w").write("x")
            planted_process = subprocess.Popen(["sleep", "600"])
            planted_variable = 1
            """,
        )
        other_conn = other.kernel.proc.runtime_dir / "connection.json"
        me = os.getpid()
        out = await run_ok(
            session,
            f"""
            import os, signal, socket
            def attempt(fn):
                try:
                    fn()
                    return "ALLOWED"
                except OSError as exc:
                    return type(exc).__name__
            print("signal", attempt(lambda: os.kill({me}, signal.SIGTERM)))
            cmdlines = [open(f"/proc/{{p}}/cmdline", "rb").read()
                        for p in os.listdir("/proc") if p.isdigit()]
            print("service seen", any(b"pytest" in c or b"kernelbox" in c and b"serve" in c
                                      for c in cmdlines), len(cmdlines) <= 3)
            for path in ({str(other_dir / "secret.txt")!r}, {str(other_conn)!r}):
                print("open", attempt(lambda: open(path).read()))
            print("loopback", attempt(lambda: socket.create_connection(
                ("127.0.0.1", {listener.getsockname()[1]}), timeout=2)))
            print("planted", [p for p in ("/tmp/planted", "/dev/shm/planted") if os.path.exists(p)],
                  any(b"sleep" in c for c in cmdlines), "planted_variable" in globals())
            """,
        )
    finally:
        listener.close()
        await other.close()
    assert "signal ProcessLookupError" in out  # the service's pid does not exist in there
    assert "service seen False True" in out  # tini, the kernel and, briefly, nothing else
    assert out.count("open FileNotFoundError") == 2
    assert "loopback ConnectionRefusedError" in out  # its own loopback, with nothing on it
    assert "planted [] False False" in out


async def test_non_root_no_capabilities_read_only_root(dbackend, session):
    out = await run_ok(
        session,
        """
        import os
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        print("uid", os.getuid(), os.geteuid(), "gid", os.getgid())
        # gVisor has no ambient set (and no line for it): nothing to raise, nothing to check.
        for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs"):
            print(key, int(status.get(key, "0").strip(), 16))
        root = [line.split()[5] for line in open("/proc/self/mountinfo") if line.split()[4] == "/"]
        print("root mount", root[-1].split(",")[0])
        for path in ("/x", "/etc/x", "/opt/venv/x", "/home/sandbox/x"):
            try:
                open(path, "w")
                print("WROTE", path)
            except OSError as exc:
                print("refused", path, exc.strerror)
        open("in-workdir.txt", "w").write("ok")
        open("/tmp/in-tmp.txt", "w").write("ok")
        print("writable: workdir, /tmp")
        """,
    )
    assert "uid 1000 1000 gid 1000" in out or f"uid {os.getuid()} " in out
    assert "uid 0" not in out
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert f"{key} 0\n" in out
    assert "NoNewPrivs 1" in out or dbackend.runtime.gvisor  # gVisor does not show it
    assert "root mount ro\n" in out
    assert "WROTE" not in out
    # gVisor checks permissions first: only /home/sandbox, which the image's user owns, says
    # EROFS there.
    owns_home = dbackend.user[0] == 1000
    assert out.count("Read-only file system") == (owns_home if dbackend.runtime.gvisor else 4)
    assert "writable: workdir, /tmp" in out


async def test_container_is_configured_as_promised(dbackend, session):
    proc = session.kernel.proc
    attrs = docker_client().api.inspect_container(proc.container_id)
    host = attrs["HostConfig"]
    assert host["NetworkMode"] == "none"
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["Memory"] == host["MemorySwap"] == LIMITS.memory_bytes
    assert host["NanoCpus"] == 1_000_000_000
    ulimits = {u["Name"]: u["Soft"] for u in host["Ulimits"]}
    assert ulimits["fsize"] == LIMITS.file_size_bytes and ulimits["nofile"] == 256
    gvisor = dbackend.runtime.gvisor
    assert host["Runtime"] == dbackend.runtime.name
    # gVisor: the cgroup counts the sandbox's host threads; the code's processes are NPROC.
    assert host["PidsLimit"] == (dbackend.runtime.host_pids(LIMITS.pids) if gvisor else LIMITS.pids)
    assert ulimits.get("nproc") == (LIMITS.pids if gvisor else None)
    assert f"size={TMP_BYTES}" in host["Tmpfs"]["/tmp"]
    assert attrs["Config"]["Labels"]["kernelbox.instance"] == dbackend.instance
    assert attrs["Config"]["User"] in ("1000:1000", f"{os.getuid()}:{os.getgid()}")
    # The engine connects with host-side socket paths; the kernel was told container-side ones.
    assert proc.connection_info["ip"] == str(proc.runtime_dir / "k")
    inside = json.loads((proc.runtime_dir / "connection.json").read_text())
    assert inside["ip"] == "/run/kernelbox/k"
    assert inside["key"] == proc.connection_info["key"]
    # ...and the limits are those the kernel actually lives under: its cgroup (v1 or v2); in
    # gVisor, which shows no cgroup, its memory and its process limit.
    out = await run_ok(
        session,
        """
        import os, resource
        def first(*paths):
            for p in paths:
                if os.path.exists(p):
                    return open(p).read().strip()
        print("mem", first("/sys/fs/cgroup/memory.max",
                           "/sys/fs/cgroup/memory/memory.limit_in_bytes"))
        print("pids", first("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max"))
        print("memtotal", [int(l.split()[1]) * 1024 for l in open("/proc/meminfo")
                           if l.startswith("MemTotal:")][0])
        print("nproc", resource.getrlimit(resource.RLIMIT_NPROC)[0])
        """,
    )
    if gvisor:
        assert f"memtotal {LIMITS.memory_bytes}" in out
        assert f"nproc {LIMITS.pids}" in out
    else:
        assert f"mem {LIMITS.memory_bytes}" in out
        assert f"pids {LIMITS.pids}" in out


async def test_kernel_cannot_swap_its_sockets(dbackend, session):
    # A swapped socket (say, a symlink to a host socket) would be followed by the engine's
    # ZMQ client on reconnect. Sealing needs the kernel to run under another uid.
    if dbackend.user == (os.geteuid(), os.getegid()):
        pytest.skip("the kernel runs as the service's own user: it owns its runtime directory")
    out = await run_ok(
        session,
        """
        for action in ("unlink", "rename", "create"):
            try:
                if action == "unlink":
                    os.unlink("/run/kernelbox/k-1")
                elif action == "rename":
                    os.rename("/run/kernelbox/k-2", "/run/kernelbox/moved")
                else:
                    os.symlink("/var/run/docker.sock", "/run/kernelbox/evil")
                print("DID", action)
            except OSError as exc:
                print("refused", action, type(exc).__name__)
        """,
    )
    assert "DID" not in out and out.count("refused") == 3
    assert (await run_ok(session, "print('still connected')")).strip() == "still connected"


def test_image_has_no_setuid_or_setgid_file():
    # Kernels run with no-new-privileges; a runtime or an operator that lets it go must still
    # find no way back to root in the image (Dockerfile.kernel strips every such bit).
    require_docker()
    found = docker_client().containers.run(
        IMAGE,
        ["/", "-xdev", "-perm", "/6000"],
        entrypoint="find",
        user="0:0",
        network_mode="none",
        remove=True,  # (the engine's default runtime: the image is what is checked)
    )
    assert found.decode() == ""


def plant_null_device(path: Path) -> None:
    """A /dev/null node anyone may write: the device cgroup allows it in every container."""
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(path, 0o666)  # whatever the umask took


@pytest.fixture
def nosuid_fs(tmp_path):
    """A fresh tmpfs mounted nosuid,nodev, as the service gives sessions when it is root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a nosuid,nodev filesystem takes root")
    fs = tmp_path / "fs"
    fs.mkdir()
    options = "nosuid,nodev,size=16m,mode=0755"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(fs)], check=True)
    yield fs
    subprocess.run(["umount", "--lazy", str(fs)], check=True)


async def test_mounts_keep_the_hosts_nosuid_nodev(nosuid_fs):
    """A working directory and runtime root on a nosuid,nodev filesystem stay so in the
    container: a bind mount must not bring setuid or device files back. Under runc the flags
    show in the kernel's mountinfo; gVisor shows none (it never honours setuid bits), and for
    both a device node planted by the host (code has no CAP_MKNOD) cannot be opened, as it
    could be from a bind mount of a plain filesystem."""
    require_docker()
    from kernelbox_server.sandbox.backends.docker import DockerBackend

    workdir = nosuid_fs / "work"
    workdir.mkdir()
    plant_null_device(workdir / "null")
    backend = DockerBackend(
        KernelConfig(limits=LIMITS),
        image=IMAGE,
        runtime=DOCKER_RUNTIME,
        runtime_root=nosuid_fs / "rt",
    )
    try:
        session = await KernelSession.start(backend, workdir)
        try:
            plant_null_device(session.kernel.proc.runtime_dir / "null")
            out = await run_ok(
                session,
                """
                for line in open("/proc/self/mountinfo"):
                    fields = line.split()
                    if fields[4] in ("/home/sandbox/work", "/run/kernelbox"):
                        print(fields[4], "options", fields[5])
                for node in ("/home/sandbox/work/null", "/run/kernelbox/null"):
                    try:
                        open(node, "w").write("x")
                        print("OPENED", node)
                    except OSError as exc:
                        print("refused", node, exc.strerror)
                """,
            )
        finally:
            await session.close()
    finally:
        await backend.close()
    assert "OPENED" not in out and out.count("refused") == 2, out
    if not backend.runtime.gvisor:
        for target in ("/home/sandbox/work", "/run/kernelbox"):
            options = out.split(f"{target} options ")[1].split()[0].split(",")
            assert {"nosuid", "nodev"} <= set(options), out


async def test_a_runtime_the_engine_lacks_is_refused_at_start():
    require_docker()
    from kernelbox_server.sandbox.backends.docker import DockerBackend

    with pytest.raises(RuntimeError, match="no runtime 'kernelbox-no-such-runtime'"):
        DockerBackend(image=IMAGE, runtime="kernelbox-no-such-runtime")


async def test_memory_of_a_kernel_is_measured(session):
    pss = session.kernel.proc.memory_pss()
    assert pss is not None and 20 * MiB < pss < LIMITS.memory_bytes


async def test_files_flow_both_ways(session, workdir):
    (workdir / "from-host.csv").write_text("a,b\n1,2\n")
    out = await run_ok(
        session,
        """
        df = pd.read_csv("from-host.csv")
        print(int(df["b"].sum()))
        df.to_csv("from-kernel.csv", index=False)
        os.makedirs("sub/dir", exist_ok=True)
        open("sub/dir/f.txt", "w").write("deep")
        os.remove("from-host.csv")
        """,
    )
    assert out.strip() == "2"
    assert (workdir / "from-kernel.csv").read_text() == "a,b\n1,2\n"
    assert not (workdir / "from-host.csv").exists()
    # The service can delete what the kernel wrote.
    (workdir / "sub" / "dir" / "f.txt").unlink()
    (workdir / "sub" / "dir").rmdir()


# -- resource bombs --------------------------------------------------------------------------


async def test_memory_bomb_dies_out_of_memory_and_next_execute_works(session):
    await run_ok(session, "keep = 1")
    result = await run(session, "hog = []\nwhile True: hog.append(bytearray(16 * 2**20))")
    assert result.status == "died"
    assert result.kernel_restarted
    assert "out of memory" in result.error.value
    after = await run(session, "print('fresh', 'keep' in globals())")
    assert after.status == "ok"
    assert after.stdout == "fresh False\n"


async def test_fork_bomb_is_contained(dbackend, session, workdir, tmp_path):
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = await KernelSession.start(dbackend, other_dir)
    try:
        bomb = asyncio.ensure_future(
            run(session, "import os\nwhile True:\n    os.fork()", timeout=20)
        )
        await asyncio.sleep(1.0)
        # Meanwhile: another session and the host carry on.
        started = time.monotonic()
        for i in range(5):
            assert (await run_ok(other, f"print({i} * 2)")).strip() == str(i * 2)
        assert time.monotonic() - started < 20
        host_child = await asyncio.create_subprocess_exec("true")
        assert await host_child.wait() == 0
        result = await bomb
        # The pids limit stops it with a clear error (or the deadline does).
        assert result.status in ("error", "timeout", "died")
        if result.status == "error":
            assert result.error.name == "BlockingIOError"
        pids = await run_ok(
            other,
            "print(len([p for p in os.listdir('/proc') if p.isdigit()]))",
        )
        assert int(pids) < 10  # the bomb's processes are not in the other container
    finally:
        await other.close()
    # The forked copies of the kernel stay in its container; a restart clears them.
    await session.restart()
    # (Generous deadlines: on a loaded 2-core machine a fresh kernel's first cell is slow.)
    assert (await run_ok(session, "print('recovered')", 90)).strip() == "recovered"


async def test_disk_filling_stops_at_limits(session):
    # One file: stopped by the fsize limit (64 MiB here).
    result = await run(
        session,
        """
        chunk = b"x" * 2**20
        with open("huge.bin", "wb") as f:
            while True:
                f.write(chunk)
        """,
    )
    assert result.status == "error"
    assert result.error.name == "OSError" and "File too large" in result.error.value
    size = int(await run_ok(session, "print(os.path.getsize('huge.bin'))"))
    assert size <= LIMITS.file_size_bytes
    # /tmp: a tmpfs of TMP_BYTES.
    result = await run(
        session,
        """
        chunk = b"x" * 2**20
        for i in range(1000):
            with open(f"/tmp/fill-{i}", "wb") as f:
                f.write(chunk)
        """,
    )
    assert result.status == "error"
    assert "No space left on device" in result.error.value
    # The root is read-only (also where the kernel's user owns a directory).
    result = await run(session, "open('/home/sandbox/fill', 'wb').write(b'x')")
    assert result.status == "error" and "Read-only file system" in result.error.value
    # And the session carries on (and can free the space).
    out = await run_ok(
        session,
        "import glob\nfor p in glob.glob('/tmp/fill-*'): os.remove(p)\nos.remove('huge.bin')\n"
        "print('still here')",
    )
    assert out.strip() == "still here"


async def test_interrupt_reaches_child_processes_and_keeps_state(session):
    await run_ok(session, "kept = 7")
    started = time.monotonic()
    result = await run(session, "import subprocess\nsubprocess.run(['sleep', '60'])", timeout=1)
    assert result.status == "timeout"
    assert not result.kernel_restarted
    assert time.monotonic() - started < 1.5 + 1.0
    out = await run_ok(
        session,
        "print(kept, [p for p in os.listdir('/proc') if p.isdigit()"
        " and b'sleep' in open(f'/proc/{p}/cmdline', 'rb').read()])",
    )
    assert out.strip() == "7 []"


async def test_kernel_death_is_reported(dbackend, workdir):
    proc = await dbackend.start(workdir)
    try:
        assert await proc.poll() is None
        await proc.send_signal(signal.SIGKILL)
        info = await asyncio.wait_for(proc.wait(), 10)
        assert info.reason == "killed by signal 9 (SIGKILL)"
        assert (await proc.poll()) == info
    finally:
        await proc.kill()
        await proc.cleanup()
    assert not proc.runtime_dir.exists()
    assert docker_client().containers.list(all=True, filters={"id": proc.container_id}) == []


# -- ownership and leftovers -----------------------------------------------------------------

CHILD = """
import asyncio, sys, time
from pathlib import Path
from kernelbox_server.sandbox.backends.docker import DockerBackend

async def main():
    root = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    # No watcher: what is left when it too is gone (a crash of the host, of the service's
    # container) is for the next backend to find.
    backend = DockerBackend(image=sys.argv[1], runtime_root=root, orphan_watcher=False)
    proc = await backend.start(Path(sys.argv[2]))
    print(proc.container_id, flush=True)
    time.sleep(3600)

asyncio.run(main())
"""


def _container_exists(container_id: str) -> bool:
    # The low-level listing: the high-level one inspects each container found, which fails
    # when the watcher removes it in between.
    return bool(docker_client().api.containers(all=True, filters={"id": container_id}))


@pytest.mark.parametrize("shared_root", [False, True], ids=["own-root", "shared-root"])
async def test_containers_of_a_killed_service_are_removed_by_the_next_backend(
    dbackend, session, workdir, tmp_path, shared_root
):
    from kernelbox_server.sandbox.backends.docker import DockerBackend

    # shared_root: an operator-given runtime_root that each service run reuses.
    root = tmp_path / "rt" if shared_root else None
    args = [str(root)] if root else []
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, IMAGE, str(workdir), *args, cwd=REPO, stdout=subprocess.PIPE
    )
    try:
        line = await asyncio.wait_for(child.stdout.readline(), 60)
        orphan = line.decode().strip()
        assert orphan and _container_exists(orphan)
        # While its service lives, a new backend leaves it alone (and ours too).
        await DockerBackend(image=IMAGE, runtime_root=root).close()
        assert _container_exists(orphan)
        child.kill()  # SIGKILL: no clean-up code runs
        await asyncio.wait_for(child.wait(), 10)
        assert _container_exists(orphan)
        newcomer = DockerBackend(image=IMAGE, runtime_root=root)
        assert not _container_exists(orphan)
        assert _container_exists(session.kernel.proc.container_id)  # a live one is kept
        if root is not None:  # only the newcomer's lock and one-shot directory are left
            ours = {newcomer._lock_path.name, newcomer.oneshot_dir.name}
            assert {p.name for p in root.iterdir()} == ours
        await newcomer.close()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert (await run_ok(session, "print('alive')")).strip() == "alive"


async def test_a_killed_owners_containers_are_removed_by_its_watcher(dbackend, workdir):
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD.replace(", orphan_watcher=False", ""), IMAGE, str(workdir),
        cwd=REPO, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        orphan = (await asyncio.wait_for(child.stdout.readline(), 60)).decode().strip()
        assert orphan and _container_exists(orphan)
        child.kill()  # SIGKILL: no clean-up code runs, and no other backend starts
        await asyncio.wait_for(child.wait(), 10)
        deadline = time.monotonic() + 30
        while _container_exists(orphan):
            assert time.monotonic() < deadline, "the watcher did not remove the container"
            await asyncio.sleep(0.2)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


async def test_close_removes_every_container(workdir, tmp_path):
    require_docker()
    from kernelbox_server.sandbox.backends.docker import DockerBackend

    backend = DockerBackend(KernelConfig(limits=LIMITS), image=IMAGE, runtime=DOCKER_RUNTIME)
    second = tmp_path / "second"
    second.mkdir()
    procs = [await backend.start(workdir), await backend.start(second)]
    assert len(backend.containers()) == 2
    await backend.close()
    assert backend.containers() == []
    assert not any(p.runtime_dir.exists() for p in procs)
    assert not backend.runtime_root.exists()
