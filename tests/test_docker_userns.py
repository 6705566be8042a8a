"""The Docker backend on an engine with user-namespace remapping (`userns-remap`).

Remapping needs a daemon restart and moves the image store, so it is never switched on in the
engine the other tests share: this test starts a second dockerd of its own, with its own data,
exec root and socket, in its own network and mount namespaces (so it cannot touch the host's
links, e.g. the default engine's docker0 bridge, which a dockerd with `bridge: none` deletes,
nor its mounts, nor /etc/subuid, which it is given privately), remapped to an id range of its
own; it loads the kernel image there and points a DockerBackend at it.

Needs root, dockerd and unshare; about a minute (the image load is most of it). It runs where
KERNELBOX_TEST_USERNS=1 (CI sets it); elsewhere it skips.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from kernelbox_server.sandbox.backends.base import KernelConfig, Limits
from kernelbox_server.sandbox.forkserver import ForkServer, ForkServerOptions, RunRequest
from kernelbox_server.sandbox.session import KernelSession
from tests.support import DOCKER_RUNTIME, IMAGE, require_docker

pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]

SHIFT = 300_000  # the private engine's container root on the host
# Any user and group the host has (Debian's); the ids are the user's in our own /etc/subuid
# and /etc/subgid.
REMAP_USER, REMAP_GROUP = "nobody", "nogroup"
LIMITS = Limits(memory_bytes=512 * 1024**2, pids=64)


def _stop(root: Path, dockerd: subprocess.Popen) -> None:
    """Stop our dockerd and whatever of ours is still running, by pid."""
    dockerd.send_signal(signal.SIGTERM)
    try:
        dockerd.wait(60)
    except subprocess.TimeoutExpired:
        dockerd.kill()
        dockerd.wait(10)
    for _ in range(3):  # shims and runtimes of its containers, if any outlived it
        left = [p for p in _pids_mentioning(str(root)) if p != os.getpid()]
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def _pids_mentioning(text: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(name))
            except OSError:
                continue
    return found


@pytest.fixture(scope="module")
def remapped_engine():
    """A docker.DockerClient for a private engine with userns-remap, the image loaded."""
    require_docker()
    if os.environ.get("KERNELBOX_TEST_USERNS") != "1":
        pytest.skip("KERNELBOX_TEST_USERNS=1 starts a second Docker engine for this test")
    missing = [c for c in ("dockerd", "unshare") if shutil.which(c) is None]
    assert os.geteuid() == 0 and not missing, "needs root, dockerd and unshare"
    import docker

    default = docker.from_env()
    root = Path(tempfile.mkdtemp(prefix="kb-uns-", dir="/tmp"))
    root.chmod(0o711)  # the engine's remapped root must pass through to its data
    (root / "subid").write_text(f"{REMAP_USER}:{SHIFT}:65536\n")
    config = {
        "data-root": str(root / "data"),
        "exec-root": str(root / "exec"),
        "pidfile": str(root / "docker.pid"),
        "hosts": [f"unix://{root}/docker.sock"],
        "userns-remap": f"{REMAP_USER}:{REMAP_GROUP}",
        "storage-driver": default.info()["Driver"],
        "bridge": "none",
        "iptables": False,
        "ip-masq": False,
        "ip-forward": False,
        "cgroup-parent": f"/{root.name}",
        "runtimes": {
            "runsc": {
                "path": "/usr/bin/runsc",
                "runtimeArgs": ["--network=none", "--host-uds=create"],
            }
        },
    }
    (root / "daemon.json").write_text(json.dumps(config))
    script = textwrap.dedent(
        f"""
        ip link set lo up
        mount --bind {root}/subid /etc/subuid && mount --bind {root}/subid /etc/subgid
        exec dockerd --config-file {root}/daemon.json
        """
    )
    log = open(root / "dockerd.log", "wb")
    dockerd = subprocess.Popen(
        ["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", script],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:  # (the client asks the engine's API version as it is made)
                client = docker.DockerClient(base_url=f"unix://{root}/docker.sock", timeout=300)
                break
            except docker.errors.DockerException:
                assert dockerd.poll() is None, (root / "dockerd.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the private dockerd did not answer in 60 s"
                time.sleep(0.3)
        client.images.load(default.images.get(IMAGE).save(named=True))  # streamed
        yield client
        client.close()
    finally:
        _stop(root, dockerd)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


async def test_kernels_and_runs_work_under_userns_remap(remapped_engine, tmp_path):
    from kernelbox_server.sandbox.backends.docker import DockerBackend

    backend = DockerBackend(
        KernelConfig(limits=LIMITS), image=IMAGE, client=remapped_engine, runtime=DOCKER_RUNTIME
    )
    try:
        # The kernel's uid 1000 is the host's SHIFT + 1000: what its files must belong to.
        assert backend.id_shift == (SHIFT, SHIFT)
        assert backend.file_owner == (SHIFT + 1000, SHIFT + 1000)
        workdir = tmp_path / "work"
        workdir.mkdir()
        (workdir / "upload.txt").write_text("from the host")
        if backend.runtime.gvisor:
            with pytest.raises(Exception, match="gVisor under the engine's userns-remap"):
                await KernelSession.start(backend, workdir)
            return
        session = await KernelSession.start(backend, workdir)
        try:
            result = await session.execute(
                "import os\n"
                "print(open('upload.txt').read(), os.getuid())\n"
                "print(open('/proc/self/uid_map').read().split())\n"
                "open('written.txt', 'w').write('by the kernel')\n"
                "for action in (lambda: os.unlink('/run/kernelbox/k-1'),"
                " lambda: open('/x', 'w')):\n"
                "    try:\n"
                "        action(); print('DID')\n"
                "    except OSError as exc:\n"
                "        print('refused', exc.strerror)\n",
                30,
            )
            assert result.status == "ok", (result.error, result.stderr)
            lines = result.stdout.splitlines()
            assert lines[0] == "from the host 1000"
            assert lines[1] == ["0", str(SHIFT), "65536"].__repr__()
            assert lines[2:] == ["refused Permission denied", "refused Read-only file system"]
            written = workdir / "written.txt"
            assert written.read_text() == "by the kernel"
            assert (written.stat().st_uid, written.stat().st_gid) == backend.file_owner
        finally:
            await session.close()

        # /run_code: the template's per-run uids move into the container's 65536 ids.
        forkserver = ForkServer(backend, ForkServerOptions(templates=1, slots=4, prefork=2))
        try:
            run = await forkserver.run(
                RunRequest(code="import os\nprint(10_000 <= os.getuid() < 65536, os.getgid() != 0)")
            )
            assert (run.exit_code, run.stdout) == (0, "True True\n"), run
        finally:
            await forkserver.close()
    finally:
        await backend.close()
    assert backend.containers() == []
