"""Service settings: environment (`KERNELBOX_*`) and `kernelbox serve` flags, one model."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KERNELBOX_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    # a name in the backend registry (sandbox/backends/registry.py): "local", "docker", ...
    backend: str = "local"
    # One key or several, comma-separated. Each key owns the sessions it creates.
    api_key: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # A file of keys (comma- or line-separated), added to api_key: keeps them off every
    # command line and out of the environment
    api_key_file: Path | None = None
    # Where sessions live: their working directories and their registry (sessions.db), kept
    # from one service process to the next (the service's own view of the path; one service
    # per directory).
    data_dir: Path = Field(default_factory=lambda: Path(tempfile.gettempdir()) / "kernelbox")
    # A graceful shutdown stops the kernels too. Default: kernels that can outlive the service
    # (Docker's containers) keep running, and the next service on the same data_dir
    # re-attaches to them with their variables; sessions and files are kept either way.
    stop_kernels_on_shutdown: bool = False
    # Base of the URLs given for images; default: the URL the request came in on.
    public_url: str | None = None
    # Host names (besides loopback, `host` and public_url's) that MCP requests may name in
    # their Host header: DNS-rebinding protection of /mcp. Comma-separated.
    mcp_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # pool and sessions
    min_idle: int = Field(default=2, ge=0)
    max_sessions: int = Field(default=64, ge=1)
    # A key's share: slots (sessions and one-shot kernels) and one-shot runs at once. Default:
    # max_sessions (and the fork server's run slots) divided evenly among the keys.
    max_sessions_per_key: int | None = Field(default=None, ge=1)
    max_runs_per_key: int | None = Field(default=None, ge=1)
    pool_wait: float = Field(default=0.0, ge=0, description="seconds a create may wait for a slot")
    idle_timeout: float = Field(default=600.0, gt=0)
    max_idle_timeout: float = Field(default=3600.0, gt=0)
    # Sessions the tool endpoint makes for a call without a session id.
    tool_session_idle_timeout: float = Field(default=300.0, gt=0)
    # Seconds unused after which a session pauses by itself (its variables saved, its kernel
    # stopped; the next execution resumes it). 0: only POST .../pause pauses.
    pause_after: float = Field(default=0.0, ge=0)

    # executions
    default_timeout: float = Field(default=30.0, gt=0)
    max_timeout: float = Field(default=600.0, gt=0)
    interrupt_grace: float = Field(default=2.0, gt=0)
    max_output_chars: int = Field(default=200_000, ge=1000)
    # Bytes of output (streams, results, images, errors) one execution may bring into the
    # service; the rest is dropped before it is decoded. Also the largest message a kernel may
    # send (a larger one replaces the kernel).
    max_execution_bytes: int = Field(default=16 * 1024**2, ge=1024**2)
    max_code_chars: int = Field(default=1_000_000, ge=1)
    max_body_bytes: int = Field(default=2 * 1024**2, ge=1024)
    max_file_bytes: int = Field(default=100 * 1024**2, ge=1024)
    # Seconds a client may take to send a request's headers.
    header_timeout: float = Field(default=10.0, gt=0)

    # kernel limits
    memory_mb: int = Field(default=2048, ge=64)
    cpus: float = Field(default=1.0, gt=0)
    pids: int = Field(default=256, ge=8)
    # The working directory's size. "auto": each is a size-limited filesystem of its own where
    # the service may mount one (root), else its size is measured; "always": refuse to start
    # without; "never": always measure.
    disk_mb: int = Field(default=1024, ge=16)
    workdir_mount: Literal["auto", "always", "never"] = "auto"

    # stateless runs (/run_code): fork-server templates, started on first use. 0 templates:
    # one per CPU core (at most 4); slots: concurrent runs per template (more wait their turn)
    run_code_templates: int = Field(default=0, ge=0)
    run_code_slots: int = Field(default=64, ge=1, le=1024)
    run_code_preload: str = "numpy,pandas,matplotlib,matplotlib.pyplot"

    # local backend: the interpreter that runs kernels (default: the service's own)
    kernel_python: str | None = None
    # local backend: each kernel in a bubblewrap sandbox. auto: where bwrap works, else plain
    # processes with loud warnings; bwrap: refuse to start without it; none: plain processes
    local_sandbox: Literal["auto", "bwrap", "none"] = "auto"
    # local backend: kernels forked from a warm template (ready in tens of milliseconds,
    # most of their memory shared) or spawned as new interpreters. auto: forked where the
    # service is root with bwrap, else spawned
    local_kernels: Literal["auto", "forked", "spawned"] = "auto"
    # start with several API keys even where the backend cannot keep their kernels apart
    allow_weak_isolation: bool = False

    # docker backend
    image: str = "kernelbox-kernel:latest"
    # the engine's OCI runtime for kernels and fork-server templates, e.g. "runsc" (gVisor);
    # default: the engine's own default (runc). See sandbox/backends/docker_runtime.py
    docker_runtime: str | None = None
    # docker backend: a throwaway kernel (/run_jupyter's) forked in a kernel-template container
    # (tens of milliseconds; kernels of the container share its limits, each its own uid) or
    # a container of its own (seconds; its own limits). Sessions have a container each.
    docker_throwaway: Literal["forked", "container"] = "forked"
    # data_dir's path on the Docker engine's host, for a service in a container that cannot
    # find it by inspecting its own container (default: found that way; see
    # sandbox/backends/hostpath.py)
    host_data_dir: Path | None = None

    # Past one machine (docs/scale-out.md). none: this machine's engine. ray: sessions live on
    # kernel hosts, one per Ray node offering the resource `kernelbox_host`, each with its own
    # pool on `backend`; any number of services route to them (the `ray` extra).
    cluster: Literal["none", "ray"] = "none"
    # Passed to ray.init: "auto" (a node of the cluster), "host:6379", or "ray://host:10001"
    ray_address: str = "auto"

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        from kernelbox_server.sandbox.backends import (
            registry,  # entry points only: no backend is imported
        )

        names = registry.available()
        if names and value not in names:
            raise ValueError(f"unknown backend {value!r}; installed: {', '.join(sorted(names))}")
        return value

    @field_validator("host_data_dir", "api_key_file", "docker_runtime", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # docker-compose.yml passes unset variables as empty strings
        return None if value == "" else value

    def per_key(self, total: int) -> int:
        """A key's even share of `total` (all of it with one key, or none configured)."""
        return max(1, total // max(1, len(self.api_key)))

    @field_validator("api_key", "mcp_allowed_hosts", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @model_validator(mode="after")
    def _keys_from_file(self) -> Settings:
        if self.api_key_file is not None:
            try:
                text = self.api_key_file.read_text()
            except OSError as exc:
                raise ValueError(f"api_key_file {self.api_key_file}: {exc.strerror}") from exc
            keys = self._split_keys(text.replace("\n", ","))
            self.api_key = list(dict.fromkeys([*self.api_key, *keys]))
        return self
