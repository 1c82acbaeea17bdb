"""Prometheus metrics and the health endpoints operators and kubelet probe.

`Metrics` owns its own `CollectorRegistry`, so several shims in one process
(the tests) never share counters. RPC metrics are fed by
`Instrumentation.observers`; the image manager reports each finished pull to
`Metrics.observe_pull`, handed to it by the shim.
Sandbox and container counts are read at scrape time from providers the stores
register, so they can never drift from the stores themselves.

`MetricsServer` serves `/metrics`, `/healthz` (the shim can run pods: gRPC
serving and containerd healthy) and `/livez` (the process answers and the CRI
socket is in place) with aiohttp on the shim's own event loop.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Final

from aiohttp import web
from grpclib.const import Status
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from cri_shim import __version__
from cri_shim.http_limits import CappedTCPSite, fd_share, runner_options
from cri_shim.logs import log_event
from cri_shim.settings import SettingsError

log = logging.getLogger(__name__)

# kubelet's calls are mostly sub-millisecond reads; a few (pulls, starts) take minutes.
RPC_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
PULL_BUCKETS: Final = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)

# The gauge each kind of state provider feeds, and its help text.
STATE_KINDS: Final[Mapping[str, tuple[str, str]]] = {
    "sandbox": ("cri_shim_pod_sandboxes", "Pod sandboxes known to the shim, by CRI state."),
    "container": ("cri_shim_containers", "Containers known to the shim, by CRI state."),
}

StateProvider = Callable[[], Mapping[str, int]]


# Distinct registry hosts that get their own pull series; later ones share "other".
MAX_REGISTRY_LABELS = 32
OTHER_REGISTRY = "other"


def registry_of(ref: str) -> str:
    """The registry host of an image reference: a bounded label, unlike the ref itself."""
    first, sep, _ = ref.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


class _StateCollector:
    """Calls the registered providers at scrape time; one that fails is left out."""

    def __init__(self, providers: Mapping[str, StateProvider]) -> None:
        self._providers = providers

    def describe(self) -> Iterable[Metric]:
        return []  # names are only known once providers register

    def collect(self) -> Iterable[Metric]:
        for kind, provider in list(self._providers.items()):
            name, documentation = STATE_KINDS[kind]
            try:
                counts = dict(provider())
            except Exception:
                log.exception("state provider %s failed; leaving %s out of this scrape", kind, name)
                continue
            family = GaugeMetricFamily(name, documentation, labels=["state"])
            for state, count in sorted(counts.items()):
                family.add_metric([state], count)
            yield family


class Metrics:
    """Every metric one shim exports, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._registries: set[str] = set()
        self.rpc_duration = Histogram(
            "cri_shim_rpc_duration_seconds",
            "Time to answer a CRI call, by RPC and gRPC status code.",
            ["rpc", "code"],
            buckets=RPC_BUCKETS,
            registry=self.registry,
        )
        self.rpc_errors = Counter(
            "cri_shim_rpc_errors",
            "CRI calls answered with a status other than OK.",
            ["rpc", "code"],
            registry=self.registry,
        )
        self.pull_bytes = Counter(
            "cri_shim_image_pull_bytes",
            "Bytes fetched from registries by image pulls.",
            ["registry"],
            registry=self.registry,
        )
        self.pull_duration = Histogram(
            "cri_shim_image_pull_duration_seconds",
            "Wall time of successful image pulls.",
            ["registry"],
            buckets=PULL_BUCKETS,
            registry=self.registry,
        )
        build = Gauge(
            "cri_shim_build_info",
            "Always 1; the version label says which cri-shim runs.",
            ["version"],
            registry=self.registry,
        )
        build.labels(version=__version__).set(1)
        self._providers: dict[str, StateProvider] = {}
        self.registry.register(_StateCollector(self._providers))

    def observe_rpc(self, rpc: str, status: Status, elapsed: float) -> None:
        """An `Instrumentation` observer: one call finished with `status`."""
        code = status.name
        self.rpc_duration.labels(rpc=rpc, code=code).observe(elapsed)
        if status is not Status.OK:
            self.rpc_errors.labels(rpc=rpc, code=code).inc()

    def _registry_label(self, ref: str) -> str:
        """The registry of `ref`, or "other" once MAX_REGISTRY_LABELS hosts have a series:
        image names come from pod authors, who must not create series without bound."""
        registry = registry_of(ref)
        if registry in self._registries:
            return registry
        if len(self._registries) >= MAX_REGISTRY_LABELS:
            return OTHER_REGISTRY
        self._registries.add(registry)
        return registry

    def observe_pull(self, ref: str, nbytes: int, seconds: float) -> None:
        """One finished pull of `ref`: `nbytes` fetched (0 when all layers were present)."""
        registry = self._registry_label(ref)
        if nbytes > 0:
            self.pull_bytes.labels(registry=registry).inc(nbytes)
        self.pull_duration.labels(registry=registry).observe(max(seconds, 0.0))

    def register_state_provider(self, kind: str, provider: StateProvider) -> None:
        """`provider()` returns {state: count}; it runs on the event loop at every
        scrape, so it must read memory only. Registering a kind again replaces it."""
        if kind not in STATE_KINDS:
            raise ValueError(f"unknown state kind {kind!r}; known: {', '.join(STATE_KINDS)}")
        self._providers[kind] = provider

    def register_gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge whose value is `read()` at scrape time (in-flight calls, containerd up)."""
        Gauge(name, documentation, registry=self.registry).set_function(read)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# Problems that make the shim unfit to run pods; empty when healthy.
HealthCheck = Callable[[], Awaitable[list[str]]]


class MetricsServer:
    """aiohttp on the shim's loop: /metrics, /healthz and /livez."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        healthy: HealthCheck,
        alive: HealthCheck,
        address: str,
        port: int,
        header_timeout: float = 10.0,
        max_connections: int = 64,
    ) -> None:
        self.metrics = metrics
        self._healthy = healthy
        self._alive = alive
        self.address = address
        self.port = port
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self._runner: web.AppRunner | None = None

    async def _metrics(self, request: web.Request) -> web.Response:
        body = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    @staticmethod
    async def _probe(check: HealthCheck) -> web.Response:
        problems = await check()
        if problems:
            body = {"status": "unhealthy", "reasons": problems}
            return web.Response(status=503, text=json.dumps(body), content_type="application/json")
        return web.Response(text=json.dumps({"status": "ok"}), content_type="application/json")

    async def _healthz(self, request: web.Request) -> web.Response:
        return await self._probe(self._healthy)

    async def _livez(self, request: web.Request) -> web.Response:
        return await self._probe(self._alive)

    async def start(self) -> int:
        """Bind and serve; returns the bound port (useful when `port` is 0)."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/livez", self._livez)
        # Probes hit this every few seconds; an access log line each would drown the log.
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, **runner_options(self.header_timeout)
        )
        await runner.setup()
        site = CappedTCPSite(
            runner,
            self.address,
            self.port,
            max_connections=fd_share(self.max_connections, 32, what="metrics"),
        )
        try:
            await site.start()
        except OSError as err:
            await runner.cleanup()
            raise SettingsError(
                f"cannot serve metrics on {self.address}:{self.port}: {err.strerror or err}"
            ) from err
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        log_event(log, "metrics serving", address=self.address, port=self.port)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


__all__ = [
    "STATE_KINDS",
    "Metrics",
    "MetricsServer",
    "registry_of",
]
