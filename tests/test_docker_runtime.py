"""The Docker backend's check of the engine's OCI runtime (sandbox/backends/docker_runtime.py),
on `docker info` answers given as data; the real engine's are in test_docker_backend.py."""

from __future__ import annotations

import json

import pytest

from kernelbox_server.sandbox.backends.docker_runtime import check, userns_shift

LEAD = {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=none", "--host-uds=all"]}


def info(**runtimes: dict) -> dict:
    return {"DefaultRuntime": "runc", "Runtimes": {"runc": {"path": "runc"}, **runtimes}}


def test_default_is_the_engines_and_not_gvisor():
    runtime = check(info(), None)
    assert (runtime.name, runtime.gvisor) == ("runc", False)
    assert runtime.host_pids(256) == 256


def test_runsc_with_what_kernels_need():
    runtime = check(info(runsc=LEAD), "runsc")
    assert runtime.gvisor and runtime.args == ("--network=none", "--host-uds=all")
    # Its pids cgroup counts the Sentry's threads: wider than the code's own limit.
    assert runtime.host_pids(256) > 256 * 8


@pytest.mark.parametrize(
    "args",
    [
        ["--network=none", "--host-uds=create"],
        ["-network", "none", "-host-uds", "create"],
        ["--network=none", "--fsgofer-host-uds"],  # the deprecated spelling of "all"
        ["--host-uds=open", "--network=none", "--host-uds=create"],  # the last one wins
    ],
)
def test_flag_spellings_are_understood(args):
    assert check(info(gvisor={"path": "/usr/bin/runsc", "runtimeArgs": args}), "gvisor").gvisor


@pytest.mark.parametrize(
    ("args", "missing"),
    [
        ([], "--network=none --host-uds=create"),
        (["--network=none"], "--host-uds=create"),
        (["--network=none", "--host-uds=open"], "--host-uds=create"),
        (["--host-uds=all"], "--network=none"),
        (["--network=none", "--host-uds=create", "--host-uds=none"], "--host-uds=create"),
    ],
)
def test_runsc_without_them_fails_saying_what_to_write(args, missing):
    with pytest.raises(RuntimeError) as caught:
        check(info(runsc={"path": "/usr/bin/runsc", "runtimeArgs": args}), "runsc")
    message = str(caught.value)
    assert f"without {missing}," in message
    wanted = [*args, *missing.split()]
    expected = '"runtimes": ' + json.dumps(
        {"runsc": {"path": "/usr/bin/runsc", "runtimeArgs": wanted}}
    )
    assert expected in message  # valid daemon.json text, the operator's own arguments kept
    assert "kill -HUP $(pidof dockerd)" in message


def test_a_runtime_the_engine_lacks_fails_saying_how_to_register_it():
    with pytest.raises(RuntimeError) as caught:
        check(info(), "runsc")
    message = str(caught.value)
    assert "no runtime 'runsc' (it has: runc)" in message
    assert (
        '"runtimes": {"runsc": {"path": "/usr/bin/runsc", '
        '"runtimeArgs": ["--network=none", "--host-uds=create"]}}' in message
    )
    assert "Debian's package `runsc`" in message


def test_gvisor_as_the_engines_default_is_checked_too():
    default_runsc = {**info(runsc={"path": "/usr/bin/runsc"}), "DefaultRuntime": "runsc"}
    with pytest.raises(RuntimeError, match="without --network=none --host-uds=create"):
        check(default_runsc, None)


REMAPPED = {"SecurityOptions": ["name=seccomp,profile=default", "name=userns"]}


def test_userns_remap_shifts_ids_for_a_service_on_the_host():
    info = {**REMAPPED, "DockerRootDir": "/var/lib/docker/100000.100000"}
    assert userns_shift(info, own=(0, 0)) == (100000, 100000)
    # A service in a container of the same engine is remapped alike: nothing to shift.
    assert userns_shift(info, own=(100000, 100000)) == (0, 0)
    assert userns_shift({"DockerRootDir": "/var/lib/docker"}, own=(0, 0)) == (0, 0)
    with pytest.raises(RuntimeError, match="does not say to which ids"):
        userns_shift({**REMAPPED, "DockerRootDir": "/srv/docker"}, own=(0, 0))
