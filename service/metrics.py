"""Prometheus metrics, in a registry of the app's own (several apps may share a process)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from .engine import EngineStatus

# `*_created` series double the output and no dashboard of ours reads them.
disable_created_metrics()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sessions = Gauge("kernelbox_sessions", "Live sessions", registry=self.registry)
        self.pool_idle = Gauge(
            "kernelbox_pool_idle_kernels", "Warm kernels waiting", registry=self.registry
        )
        self.executions = Counter(
            "kernelbox_executions",
            "Executions by final status",
            ["status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "kernelbox_execution_seconds",
            "Execution latency as seen by the service",
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.reaped = Counter(
            "kernelbox_sessions_reaped", "Sessions closed for being idle", registry=self.registry
        )
        self._reaped_seen = 0

    def scrape(self, status: EngineStatus) -> bytes:
        """The exposition text, with what the engine counts as of `status` (read now: the
        only time it is seen)."""
        self.sessions.set(status.sessions)
        self.pool_idle.set(status.idle_kernels)
        # A cluster's total can fall (a host lost): a counter only goes up.
        self.reaped.inc(max(0, status.reaped_total - self._reaped_seen))
        self._reaped_seen = max(self._reaped_seen, status.reaped_total)
        return generate_latest(self.registry)

    def observe(self, status: str, seconds: float) -> None:
        self.executions.labels(status=status).inc()
        self.duration.observe(seconds)
