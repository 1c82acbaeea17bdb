"""Assembles the shim: containerd connection, watchers, CRI services, socket.

`Shim` is used the same way by `cri-shim serve` and by the in-process tests:
`await shim.start()`, then `await shim.stop()` (graceful: stop accepting,
let calls in flight finish, remove the socket, leave containers running).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import stat
from pathlib import Path
from typing import Any

import grpclib.const
from grpclib import GRPCError
from grpclib.const import Status
from grpclib.protocol import H2Protocol
from grpclib.server import Server, Stream

from cri_shim.container.events import ContainerEventBus
from cri_shim.container.image_volumes import ImageVolumes
from cri_shim.container.lifecycle import ContainerEnvironment, ContainerManager
from cri_shim.container.stats import StatsCollector
from cri_shim.containerd.checkpoint import CheckpointOps
from cri_shim.containerd.client import ContainerdClient
from cri_shim.containerd.embedded import EmbeddedContainerd
from cri_shim.containerd.events import EventMonitor
from cri_shim.containerd.health import ContainerdHealth
from cri_shim.containerd.runtime import RuntimeOps
from cri_shim.containerd.snapshots import SNAPSHOTTER
from cri_shim.cri.container import ContainerHandlers
from cri_shim.cri.image import ImageHandlers
from cri_shim.cri.image_service import ImageService
from cri_shim.cri.runtime_service import RuntimeService
from cri_shim.cri.sandbox import SandboxHandlers
from cri_shim.cri.stats import StatsHandlers
from cri_shim.cri.status import RuntimeFacts, StatusHandlers
from cri_shim.cri.streaming import StreamingHandlers
from cri_shim.gen.containerd.runc import v1 as runc_v1
from cri_shim.gen.google.protobuf import Empty
from cri_shim.gen.runtime import v1 as cri
from cri_shim.grpc_limits import DEFAULT_MAX_RECV_MESSAGE_SIZE, BoundedHandler, bounded_buffer_class
from cri_shim.host import (
    CgroupDriver,
    can_lower_oom_score_adj,
    detect_cgroup_driver,
    own_oom_score_adj,
    recursive_readonly_supported,
    running_in_user_namespace,
)
from cri_shim.images.manager import ImageManager
from cri_shim.images.store import ImageRecord
from cri_shim.instrument import Instrumentation
from cri_shim.logs import log_event
from cri_shim.metrics import Metrics, MetricsServer
from cri_shim.network import default_network
from cri_shim.network.cni import PodNetwork
from cri_shim.network.pod_cidr import PodCidrStore
from cri_shim.network.readiness import NetworkReadiness
from cri_shim.oci import apparmor
from cri_shim.runtime_handlers import RuntimeHandler, probe_handlers
from cri_shim.sandbox.lifecycle import SandboxEnvironment, SandboxManager
from cri_shim.settings import Settings, SettingsError
from cri_shim.store.containers import ContainerStore
from cri_shim.store.encoded import BatchLimits
from cri_shim.store.sandboxes import SandboxStore
from cri_shim.store.verbose import RuntimeIdentity
from cri_shim.streaming.exec import StreamRuntime
from cri_shim.streaming.portforward import PodConnector
from cri_shim.streaming.server import StreamingServer

log = logging.getLogger(__name__)


async def _unknown_method(stream: Stream[Any, Any]) -> None:
    raise GRPCError(Status.UNIMPLEMENTED, "method not implemented by cri-shim")


_UNKNOWN = grpclib.const.Handler(
    _unknown_method, grpclib.const.Cardinality.UNARY_UNARY, Empty, Empty
)


class _FallbackMapping(dict[str, grpclib.const.Handler]):
    """grpclib answers an unknown method without a content-type, which Go
    clients read as UNKNOWN; kubelet needs a real UNIMPLEMENTED to detect an
    RPC a runtime lacks, so every unknown path gets a proper gRPC handler."""

    def get(self, key: str, default: Any = None) -> grpclib.const.Handler:
        return super().get(key, _UNKNOWN)


class CriServer(Server):
    def __init__(
        self, handlers: list[Any], *, max_message_size: int = DEFAULT_MAX_RECV_MESSAGE_SIZE
    ) -> None:
        super().__init__(handlers)
        self._mapping = _FallbackMapping(self._mapping)
        self._buffer_class = bounded_buffer_class(max_message_size)

    def _protocol_factory(self) -> H2Protocol:
        """grpclib's own, with a handler that bounds received messages (grpc_limits)."""
        self.__gc_step__()
        handler = BoundedHandler(
            self._mapping, self._codec, self._status_details_codec, self.__dispatch__
        )
        handler.buffer_class = self._buffer_class
        self._handlers.add(handler)
        return H2Protocol(handler, self._config, self._h2_config)

    def stop_accepting(self) -> None:
        """Close the listening socket but keep established connections serving."""
        listener: asyncio.AbstractServer | None = self._server
        if listener is not None:
            listener.close()


async def claim_socket(path: Path) -> None:
    """Make the socket path usable: refuse a live server, remove a stale socket."""
    parent = path.parent
    try:
        await asyncio.to_thread(parent.mkdir, parents=True, exist_ok=True)
    except OSError as err:
        raise SettingsError(f"cannot create socket dir {parent}: {err.strerror or err}") from err
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SettingsError(f"socket dir {parent} is not writable")
    try:
        mode = (await asyncio.to_thread(os.lstat, path)).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SettingsError(f"{path} exists and is not a socket; refusing to replace it")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 2.0)
    except (ConnectionRefusedError, FileNotFoundError):
        await asyncio.to_thread(path.unlink, missing_ok=True)
        log_event(log, "removed stale socket", socket=path)
        return
    except (OSError, TimeoutError) as err:
        raise SettingsError(f"cannot probe existing socket {path}: {err}") from err
    writer.close()
    raise SettingsError(f"another server is already listening on {path}")


class Shim:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.socket_path = Path(settings.server.socket)
        self.instrument = Instrumentation()
        self.batch_limits = BatchLimits(
            max_items=settings.server.stream_batch_items,
            max_bytes=settings.server.stream_batch_bytes,
        )
        self.embedded: EmbeddedContainerd | None = None
        self.client: ContainerdClient | None = None
        self.health: ContainerdHealth | None = None
        self.images: ImageManager | None = None
        self.network = NetworkReadiness(Path(settings.cni.conf_dir), settings.cni.bin_dirs)
        self.pod_cidrs = PodCidrStore(settings.state_path)
        self._server: CriServer | None = None
        self.metrics = Metrics()
        self.instrument.observers.append(self.metrics.observe_rpc)
        self.metrics.register_gauge(
            "cri_shim_rpc_in_flight", "CRI calls being answered.", lambda: self.instrument.in_flight
        )
        self.metrics.register_gauge(
            "cri_shim_containerd_up",
            "1 while containerd answers its health check.",
            lambda: 1.0 if self.health is not None and self.health.serving else 0.0,
        )
        self.metrics.register_gauge(
            "cri_shim_streaming_sessions",
            "Exec, attach and port-forward connections being served.",
            lambda: float(self.streaming.sessions) if self.streaming is not None else 0.0,
        )
        self.sandboxes = SandboxStore()
        self.containers = ContainerStore()
        self.container_events = ContainerEventBus()
        self.container_manager: ContainerManager | None = None
        self.sandbox_manager: SandboxManager | None = None
        self.pod_network: PodNetwork | None = None
        self.runtime_handlers: dict[str, RuntimeHandler] = {}
        self.events: EventMonitor | None = None
        self.metrics_server: MetricsServer | None = None
        self.metrics_port: int | None = None  # the bound port once serving (config may say 0)
        self.streaming: StreamingServer | None = None
        # Each part's stop, registered as soon as the part runs: stop() and a
        # start that fails half-way both undo exactly what was started, last first.
        self._stack = contextlib.AsyncExitStack()

    async def _connect_containerd(self) -> ContainerdClient:
        config = self.settings.containerd
        client = ContainerdClient(config.address, config.namespace)
        if await client.is_serving(timeout=config.connect_timeout):
            return client
        if config.embedded and EmbeddedContainerd.find_binary(config.binary):
            client.close()
            log_event(
                log,
                "containerd not reachable; starting a private one",
                address=config.address,
                state_dir=self.settings.state_path / "containerd",
            )
            self.embedded = EmbeddedContainerd(
                self.settings.state_path / "containerd", binary=config.binary
            )
            await self.embedded.start()
            self._stack.push_async_callback(self.embedded.stop)
            return ContainerdClient(self.embedded.address, config.namespace)
        log_event(
            log,
            "containerd not reachable; serving with RuntimeReady=false until it is",
            level=logging.WARNING,
            address=config.address,
        )
        return client

    async def _use_default_network_if_needed(self) -> Settings:
        """With a private containerd and no CNI config, pods get the default network
        (written into the state dir); the effective settings name its conf dir."""
        cni = self.settings.cni
        conf_dir = await asyncio.to_thread(
            default_network.ensure_default_network, cni, self.settings.state_path
        )
        if conf_dir is not None:
            self.settings = dataclasses.replace(
                self.settings, cni=dataclasses.replace(cni, conf_dir=str(conf_dir))
            )
            self.network = NetworkReadiness(conf_dir, cni.bin_dirs)
        return self.settings

    async def start(self) -> None:
        """Start every part in order; on failure what did start is stopped again."""
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise

    async def _start(self) -> None:
        settings = self.settings
        try:
            await asyncio.to_thread(settings.state_path.mkdir, parents=True, exist_ok=True)
        except OSError as err:
            raise SettingsError(
                f"cannot create state dir {settings.state_path}: {err.strerror or err}"
            ) from err
        if settings.cni.default_network:
            default_network.validate(settings.cni)  # a bad key fails start-up, used or not
        await claim_socket(self.socket_path)
        self.client = await self._connect_containerd()
        self._stack.callback(self.client.close)
        if self.embedded is not None:
            settings = await self._use_default_network_if_needed()
        self.health = ContainerdHealth(self.client, settings.containerd.health_interval)
        await self.health.start()
        self._stack.push_async_callback(self.health.stop)
        self.images = ImageManager(
            settings.registry,
            settings.runtime.sandbox_image,
            self.client,
            on_pull=self.metrics.observe_pull,
        )
        await self.images.start()
        self._stack.push_async_callback(self.images.stop)
        self.health.on_reconnect(self.images.reload)
        await self.network.start()
        self._stack.push_async_callback(self.network.stop)
        await self.pod_cidrs.load()
        cgroup_driver = detect_cgroup_driver(settings.runtime.cgroup_driver)
        sandboxes, containers = await self._start_runtime(cgroup_driver)
        stats = self._stats_handlers()
        streaming = await self._start_streaming()
        handlers = self.runtime_handlers
        facts = RuntimeFacts(
            handlers=("", *sorted(n for n in handlers if n)),
            userns_handlers=frozenset(n for n, h in handlers.items() if h.user_namespaces),
            recursive_read_only_mounts=recursive_readonly_supported(),
            supplemental_groups_policy=True,
            restrict_oom_score_adj=not can_lower_oom_score_adj(),
            apparmor=await asyncio.to_thread(apparmor.host_supports),
        )
        status = StatusHandlers(
            settings, self.health, self.network, self.pod_cidrs, cgroup_driver, facts
        )
        self._server = CriServer(
            [
                RuntimeService(
                    self.instrument,
                    status,
                    sandboxes,
                    containers,
                    stats=stats,
                    streaming=streaming,
                ),
                ImageService(self.instrument, ImageHandlers(self.images, self.batch_limits)),
            ],
            max_message_size=settings.server.max_recv_message_size,
        )
        await self._server.start(path=str(self.socket_path))
        self._stack.push_async_callback(self._stop_serving)
        await asyncio.to_thread(os.chmod, self.socket_path, settings.server.socket_mode)
        await self._start_metrics()
        log_event(
            log,
            "cri-shim serving",
            socket=self.socket_path,
            containerd=self.client.address,
            namespace=self.client.namespace,
        )

    async def _start_runtime(
        self, cgroup_driver: CgroupDriver
    ) -> tuple[SandboxHandlers, ContainerHandlers]:
        """Pods: stores rebuilt from containerd, the event stream, CNI."""
        assert self.client is not None and self.health is not None and self.images is not None
        settings = self.settings
        images = self.images
        ops = RuntimeOps(self.client, systemd_cgroup=cgroup_driver is CgroupDriver.SYSTEMD)
        floor = None if can_lower_oom_score_adj() else own_oom_score_adj()
        self.runtime_handlers = await probe_handlers(settings)
        runc_binaries = {n: h.runc_binary for n, h in self.runtime_handlers.items()}
        self.pod_network = PodNetwork(
            settings.cni, settings.state_path, self.network, self.pod_cidrs
        )

        async def ensure_pause(ref: str) -> ImageRecord:
            return await images.ensure_image(ref, pinned=True)

        self.sandbox_manager = SandboxManager(
            self.sandboxes,
            ops,
            self.pod_network,
            ensure_pause,
            SandboxEnvironment(
                sandbox_image=settings.runtime.sandbox_image,
                dirs_root=settings.state_path / "sandboxes",
                cgroup_driver=cgroup_driver.value,
                oom_score_adj_floor=floor,
                pod_annotations=settings.runtime.pod_annotations,
                runc_binaries=runc_binaries,
                namespace=self.client.namespace,
                host_in_userns=running_in_user_namespace(),
            ),
        )
        self.container_manager = ContainerManager(
            self.containers,
            self.sandboxes,
            images.store,
            ops,
            self.container_events,
            ContainerEnvironment(
                state_dir=settings.state_path,
                sandbox_dirs_root=settings.state_path / "sandboxes",
                cgroup_driver=cgroup_driver.value,
                oom_score_adj_floor=floor,
                seccomp_localhost_root=None,
                apparmor_available=await apparmor.detect(),
                recursive_readonly_supported=recursive_readonly_supported(),
                pod_annotations=settings.runtime.pod_annotations,
                container_annotations=settings.runtime.container_annotations,
                enable_criu=settings.runtime.enable_criu,
                restore_via_create=settings.runtime.restore_via_create,
                runc_binaries=runc_binaries,
                namespace=self.client.namespace,
            ),
            image_volumes=ImageVolumes(self.client, images.store, settings.state_path),
            checkpoints=CheckpointOps(self.client),
        )
        sandboxes, containers, bus = self.sandboxes, self.containers, self.container_events

        def pod_view(
            sandbox_id: str,
        ) -> tuple[cri.PodSandboxStatus | None, list[cri.ContainerStatus]]:
            sandbox = sandboxes.by_id.find(sandbox_id)
            statuses = [c.to_status() for c in containers.in_sandbox(sandbox_id)]
            return (sandbox.to_status() if sandbox is not None else None), statuses

        bus.pod_view = pod_view
        self.sandbox_manager.lifecycle_events.append(
            lambda sandbox, kind: bus.publish_for(sandbox.id, sandbox.id, kind)
        )
        self.sandbox_manager.stop_containers.append(self.container_manager.stop_pod)
        self.sandbox_manager.remove_containers.append(self.container_manager.remove_pod)
        self.events = EventMonitor(self.client, self.client.namespace)
        self.events.exit_handlers.append(self.sandbox_manager.on_task_exit)
        self.events.exit_handlers.append(self.container_manager.on_task_exit)
        self.container_manager.pull_image = images.pull
        self.events.oom_handlers.append(self.container_manager.on_oom)
        self.events.image_handlers.append(images.on_image_event)
        images.store.listeners.append(lambda ids: containers.follow_images(ids, images.store.get))
        sandbox_manager, container_manager = self.sandbox_manager, self.container_manager
        resync_lock = asyncio.Lock()

        async def resync() -> None:
            """Rebuild from containerd, one pass at a time (the health watcher and
            the event stream both ask after an outage), pods before containers."""
            async with resync_lock:
                await sandbox_manager.load()
                await container_manager.load()
                containers.follow_images({c.image_id for c in containers.by_id}, images.store.get)

        await self.container_manager.release_abandoned_execs()
        if self.health.serving:
            stale = await ops.release_stale_creation_leases()
            if stale:
                log_event(log, "released creation leases of a previous run", count=stale)
            await resync()
            await self._sweep_orphans()
        else:
            log_event(
                log,
                "containerd down at start-up; orphaned pod networks are not swept",
                level=logging.WARNING,
            )
        self.health.on_reconnect(resync)
        self.events.resync_handlers.append(resync)
        # Image records made or removed while the stream was down sent no event.
        self.events.resync_handlers.append(images.reload)
        await self.events.start()
        self._stack.push_async_callback(self.events.stop)
        self.metrics.register_state_provider("sandbox", self._sandbox_states)
        self.metrics.register_state_provider("container", self._container_states)
        record = ops.runtime_options()
        options = record.options
        identity = RuntimeIdentity.of(
            record.name,
            runc_v1.Options.parse(options.value) if options is not None else None,
            SNAPSHOTTER,
        )
        return (
            SandboxHandlers(
                self.sandboxes,
                self.sandbox_manager,
                settings.runtime.default_runtime,
                self.batch_limits,
                identity,
                self.runtime_handlers,
            ),
            ContainerHandlers(
                self.containers,
                self.sandboxes,
                self.container_manager,
                self.container_events,
                self.batch_limits,
                identity,
                drain_exec_sync_io_seconds=settings.runtime.drain_exec_sync_io_seconds,
            ),
        )

    async def _sweep_orphans(self) -> None:
        """Before serving: release the netns pins, IPs, CNI cache entries and
        sandbox dirs (shm mounts) of RunPodSandbox calls a killed shim never
        finished (no sandbox in containerd has them)."""
        assert self.pod_network is not None and self.sandbox_manager is not None
        unfinished = await self.sandbox_manager.discard_unfinished()
        known = list(self.sandboxes.by_id)
        report = await self.pod_network.sweep(
            {s.id for s in known}, {s.netns_path for s in known if s.netns_path}
        )
        dirs = await self.sandbox_manager.sweep_dirs()
        if report.cached or report.pending or report.pins or dirs or unfinished:
            log_event(
                log,
                "released pod networks of unfinished runs",
                sandboxes=unfinished,
                cached=report.cached,
                pending=report.pending,
                pins=report.pins,
                sandbox_dirs=dirs,
            )

    def _stats_handlers(self) -> StatsHandlers:
        """Stats read the stores, containerd's task metrics and snapshot usage."""
        assert self.container_manager is not None and self.images is not None
        collector = StatsCollector(
            self.container_manager.ops,
            self.containers,
            self.sandboxes,
            self.images.usage.mountpoint,
            self.images.usage,
        )
        return StatsHandlers(self.containers, self.sandboxes, collector, self.batch_limits)

    async def _start_streaming(self) -> StreamingHandlers:
        """Exec/Attach/PortForward URLs point at our own streaming HTTP server."""
        assert self.container_manager is not None
        runtime = StreamRuntime(self.container_manager, self.containers)
        config = self.settings.streaming
        self.streaming = StreamingServer(
            config, runtime, PodConnector(self.sandboxes), idle_timeout=config.idle_timeout
        )
        await self.streaming.start()
        self._stack.push_async_callback(self.streaming.stop)
        return StreamingHandlers(self.containers, self.sandboxes, self.streaming)

    def _container_states(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for container in self.containers.by_id:
            counts[container.state.value] = counts.get(container.state.value, 0) + 1
        return counts

    def _sandbox_states(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for sandbox in self.sandboxes.by_id:
            counts[sandbox.state.value] = counts.get(sandbox.state.value, 0) + 1
        return counts

    async def _start_metrics(self) -> None:
        """Metrics are always collected; the HTTP endpoint only when enabled."""
        config = self.settings.metrics
        if not config.enabled:
            return
        self.metrics_server = MetricsServer(
            self.metrics,
            healthy=self.health_problems,
            alive=self.liveness_problems,
            address=config.address,
            port=config.port,
            header_timeout=config.header_timeout,
            max_connections=config.max_connections,
        )
        self.metrics_port = await self.metrics_server.start()
        self._stack.push_async_callback(self.metrics_server.stop)

    async def liveness_problems(self) -> list[str]:
        """Why this process is not serving the CRI (for /livez); empty when it is."""
        if self._server is None:
            return ["CRI server is not serving"]
        try:
            mode = (await asyncio.to_thread(os.stat, self.socket_path)).st_mode
        except OSError as err:
            return [f"CRI socket {self.socket_path} is gone: {err.strerror or err}"]
        if not stat.S_ISSOCK(mode):
            return [f"{self.socket_path} is no longer a socket"]
        return []

    async def health_problems(self) -> list[str]:
        """Why pods cannot run through this shim now (for /healthz); empty when they can."""
        problems = await self.liveness_problems()
        if self.health is None:
            problems.append("containerd not connected yet")
        elif not self.health.serving:
            problems.append(self.health.last_error)
        return problems

    async def _finish_shielded_work(self, timeout: float) -> None:
        """RunPodSandbox and CreateContainer work on after their caller gives up
        (shielded, for kubelet's retry); exiting under them would leave a pod or
        container half made, so shutdown waits for them within the grace."""
        pending: list[asyncio.Task[str]] = []
        if self.sandbox_manager is not None:
            pending += self.sandbox_manager.in_flight()
        if self.container_manager is not None:
            pending += self.container_manager.in_flight()
        if not pending:
            return
        log_event(log, "waiting for creates in flight before exit", count=len(pending))
        _, late = await asyncio.wait(pending, timeout=timeout)
        if late:
            log_event(
                log,
                "creates still running at shutdown; cancelling them",
                level=logging.WARNING,
                count=len(late),
            )
            for task in late:
                task.cancel()
            await asyncio.wait(late)

    async def stop(self) -> None:
        """Idempotent; stops what start() started (in reverse), also after a failed start."""
        served = self._server is not None
        await self._stack.aclose()
        if served:
            log_event(log, "cri-shim stopped", socket=self.socket_path)

    async def _stop_serving(self) -> None:
        """Refuse new calls, let those in flight finish (up to the shutdown grace),
        then close the socket and finish the work callers left behind."""
        if self._server is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.server.shutdown_grace
        self._server.stop_accepting()
        drained = await self.instrument.wait_idle(self.settings.server.shutdown_grace)
        if not drained:
            log_event(
                log,
                "calls still running at shutdown; cancelling them",
                level=logging.WARNING,
                in_flight=self.instrument.in_flight,
            )
        self._server.close()
        await self._server.wait_closed()
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self.socket_path.unlink)
        await self._finish_shielded_work(max(0.0, deadline - loop.time()))
