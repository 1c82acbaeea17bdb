"""Running, stopping and removing pod sandboxes against containerd.

A sandbox is a containerd container running the pause image, in a network
namespace the shim creates and wires with CNI before the pause task starts.
Everything needed to rebuild the in-memory view lives on that containerd
container (labels and one JSON extension), so a restarted shim loses no pod.
Every step of RunPodSandbox registers its undo; a failure unwinds them all,
leaving no namespace, IP, snapshot or task behind.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cri_shim.concurrency import InFlight, run_all
from cri_shim.containerd.events import TaskExit
from cri_shim.containerd.runtime import RuntimeOps, TaskStatus, pack_json, unpack_json
from cri_shim.errors import failed_precondition, go_quote
from cri_shim.gen.containerd.types import Mount
from cri_shim.gen.runtime import v1 as cri
from cri_shim.logs import log_event
from cri_shim.network.cni import DnsConfig, PodNetwork, PodNetworkRequest, PortMapping
from cri_shim.network.netns import UsernsPin, netns_exists, remove_pod_netns
from cri_shim.oci.sandbox_spec import SandboxSpecInput, build_sandbox_spec
from cri_shim.oci.userns import IdMapping, pod_userns_of
from cri_shim.sandbox.files import SandboxDirs
from cri_shim.sandbox.resources import apply_pod_resources
from cri_shim.store.index import new_id
from cri_shim.store.record import RecordVersionError
from cri_shim.store.sandboxes import Sandbox, SandboxState, SandboxStore, sandbox_name

log = logging.getLogger(__name__)

KIND_LABEL = "io.cri-shim.kind"
SANDBOX_KIND = "sandbox"
RUN_COMPLETE = "runComplete"
METADATA_EXTENSION = "io.cri-shim.sandbox.metadata"
METADATA_TYPE_URL = "cri-shim.io/sandbox-metadata/v1"
STOP_WAIT_SECONDS = 10.0


class SandboxImage(Protocol):
    """What the sandbox needs of the pause image."""

    @property
    def id(self) -> str: ...

    @property
    def chain_id(self) -> str: ...

    @property
    def config(self) -> dict[str, Any]:
        """The whole OCI image config document."""
        ...


EnsureImage = Callable[[str], Awaitable[SandboxImage]]
PodHook = Callable[[Sandbox], Awaitable[None]]


@dataclass(frozen=True)
class SandboxEnvironment:
    sandbox_image: str
    dirs_root: Path
    cgroup_driver: str
    oom_score_adj_floor: int | None
    pod_annotations: tuple[str, ...] = ()  # allow-list of pod annotations for the spec
    # runc binary of each configured runtime handler; absent: the shim's default runc.
    runc_binaries: Mapping[str, str] = field(default_factory=dict)
    namespace: str = "k8s.io"  # containerd namespace (cgroup parent without a pod's own)
    host_in_userns: bool = False  # host.running_in_user_namespace()


def runtime_config(image_config: dict[str, Any]) -> dict[str, Any]:
    """The part of an OCI image config that says how to run it (Entrypoint, Env, User...)."""
    inner = image_config.get("config")
    return inner if isinstance(inner, dict) else {}


def _protocol_name(protocol: cri.Protocol) -> str:
    return {cri.Protocol.TCP: "tcp", cri.Protocol.UDP: "udp", cri.Protocol.SCTP: "sctp"}[
        cri.Protocol(protocol)
    ]


def network_request(sandbox: Sandbox) -> PodNetworkRequest:
    metadata = sandbox.metadata
    dns = sandbox.config.dns_config
    return PodNetworkRequest(
        sandbox_id=sandbox.id,
        name=metadata.name,
        namespace=metadata.namespace,
        uid=metadata.uid,
        netns_path=sandbox.netns_path,
        port_mappings=[
            PortMapping(
                protocol=_protocol_name(p.protocol),
                container_port=p.container_port,
                host_port=p.host_port,
                host_ip=p.host_ip,
            )
            for p in sandbox.config.port_mappings
            if p.host_port
        ],
        dns=DnsConfig(dns.servers, dns.searches, dns.options) if dns is not None else None,
    )


class SandboxManager:
    def __init__(
        self,
        store: SandboxStore,
        ops: RuntimeOps,
        network: PodNetwork,
        ensure_image: EnsureImage,
        environment: SandboxEnvironment,
    ) -> None:
        self.store = store
        self.ops = ops
        self.network = network
        self.ensure_image = ensure_image
        self.env = environment
        # Registered by the container module: stop / remove a pod's containers.
        self.stop_containers: list[PodHook] = []
        self.remove_containers: list[PodHook] = []
        # Told of each sandbox lifecycle step (GetContainerEvents, under the sandbox id).
        self.lifecycle_events: list[Callable[[Sandbox, cri.ContainerEventType], None]] = []
        # Runs in flight by name: a kubelet retry joins the first call's work.
        self._running: InFlight[str] = InFlight()
        # Loaded records of runs a killed shim never finished (see discard_unfinished).
        self._unfinished: set[str] = set()

    def in_flight(self) -> list[asyncio.Task[str]]:
        """Runs still working (their callers may be gone): shutdown awaits them."""
        return self._running.running()

    def dirs(self, sandbox_id: str) -> SandboxDirs:
        return SandboxDirs(self.env.dirs_root, sandbox_id)

    # persistence

    async def _persist_run_complete(self, sandbox: Sandbox) -> None:
        """The record's last write of a run: with the IP CNI gave and the mark that
        tells a restarted shim this run finished (see `discard_unfinished`)."""
        data = sandbox.to_record()
        data[RUN_COMPLETE] = True
        await self.ops.update_extension(
            sandbox.id, METADATA_EXTENSION, pack_json(METADATA_TYPE_URL, data)
        )

    async def load(self) -> None:
        """Rebuild the store from containerd (start-up and after containerd returns)."""
        containers = await self.ops.list_containers(f'labels."{KIND_LABEL}"=={SANDBOX_KIND}')
        seen: set[str] = set()
        self._unfinished.clear()
        for container in containers:
            data = unpack_json(container.extensions.get(METADATA_EXTENSION))
            if not isinstance(data, dict):
                log_event(
                    log, "sandbox without metadata skipped", level=logging.WARNING, pod=container.id
                )
                continue
            seen.add(container.id)
            sandbox = (
                self.store.by_id.find(container.id) if container.id in self.store.by_id else None
            )
            if sandbox is None:
                try:
                    sandbox = Sandbox.from_record(data)
                except RecordVersionError as err:
                    log_event(log, "sandbox record skipped", level=logging.WARNING, error=err)
                    continue
                self.store.add(sandbox)
                self.store.names.reserve(sandbox.name, sandbox.id)
            task = await self.ops.task(sandbox.id)
            # UNKNOWN: the runc shim did not answer in time (busy, or stuck on an exec
            # a killed shim left); its pause process is taken as alive, as for
            # containers, and a real exit still arrives as an event.
            running = task is not None and task.status in (TaskStatus.RUNNING, TaskStatus.UNKNOWN)
            netns_ok = sandbox.host_network or (
                bool(sandbox.netns_path) and await netns_exists(sandbox.netns_path)
            )
            sandbox.pid = task.pid if running and task is not None else 0
            sandbox.task_deleted = task is None
            sandbox.image = container.image
            spec = unpack_json(container.spec)
            sandbox.spec = spec if isinstance(spec, dict) else None
            sandbox.network_ready = netns_ok
            sandbox.state = SandboxState.READY if running and netns_ok else SandboxState.NOTREADY
            if not running and not data.get(RUN_COMPLETE) and sandbox.name not in self._running:
                self._unfinished.add(sandbox.id)
        for stale in [s for s in self.store.by_id if s.id not in seen]:
            self.store.remove(stale)
        log_event(log, "sandboxes loaded", count=len(self.store.by_id))

    async def discard_unfinished(self) -> int:
        """Before serving: undo the sandboxes of RunPodSandbox calls a killed shim
        never finished (record made, run never marked complete, pause not running).
        kubelet never learned their ids, so nobody else would release their IP and
        namespace, and the pod's retry must find its name free."""
        discarded = 0
        for sandbox_id in sorted(self._unfinished):
            sandbox = self.store.by_id.find(sandbox_id)
            if sandbox is None or sandbox.id != sandbox_id:
                continue
            await self.remove(sandbox)
            discarded += 1
            log_event(log, "unfinished sandbox run undone", level=logging.WARNING, pod=sandbox_id)
        self._unfinished.clear()
        return discarded

    async def sweep_dirs(self) -> int:
        """Remove (unmounting /dev/shm) the dirs of sandboxes containerd does not
        know: a RunPodSandbox cut off by a kill. Only before serving."""
        try:
            names = await asyncio.to_thread(os.listdir, self.env.dirs_root)
        except FileNotFoundError:
            return 0
        orphans = [n for n in names if n not in self.store.by_id]
        for name in orphans:
            await self.dirs(name).remove()
            log_event(log, "orphaned sandbox dir removed", level=logging.WARNING, pod=name)
        return len(orphans)

    # run

    async def run(self, config: cri.PodSandboxConfig, runtime_handler: str) -> str:
        """Shielded: a caller that gives up (kubelet's timeout) does not undo the
        work, which finishes and is handed to the retry with the same name."""
        metadata = config.metadata or cri.PodSandboxMetadata()
        name = sandbox_name(metadata)
        return await self._running.join(
            name,
            lambda: self._run_once(name, config, runtime_handler),
            on_join=lambda: log_event(log, "retried run joins the one in flight", name=name),
        )

    async def _run_once(self, name: str, config: cri.PodSandboxConfig, runtime_handler: str) -> str:
        owner = self.store.names.owner(name)
        if owner is not None:
            existing = self.store.by_id.find(owner)
            if (
                existing is not None
                and existing.state is SandboxState.READY
                and existing.config == config
                and existing.runtime_handler == runtime_handler
            ):
                # kubelet retrying a call that timed out on its side: same pod, same answer.
                log_event(log, "sandbox reused for retried run", pod=owner, name=name)
                return owner
            # containerd's words (its name registrar), so tools matching them keep working.
            raise failed_precondition(
                f"failed to reserve sandbox name {go_quote(name)}: "
                f"name {go_quote(name)} is reserved for {go_quote(owner)}"
            )
        sandbox = Sandbox(
            id=new_id(),
            name=name,
            config=config,
            runtime_handler=runtime_handler,
            created_at=time.time_ns(),
            image_id="",
        )
        self.store.names.reserve(name, sandbox.id)
        undo: list[Callable[[], Awaitable[None]]] = []
        try:
            async with sandbox.lock:
                await self._run_steps(sandbox, undo)
        except BaseException as err:
            log_event(
                log, "sandbox run failed; undoing", level=logging.WARNING, pod=sandbox.id, error=err
            )
            for step in reversed(undo):
                try:
                    await asyncio.shield(step())
                except Exception as cleanup_err:  # report, keep undoing
                    log_event(
                        log,
                        "sandbox cleanup step failed",
                        level=logging.WARNING,
                        pod=sandbox.id,
                        error=cleanup_err,
                    )
            self.store.names.release(name, sandbox.id)
            raise
        return sandbox.id

    async def _run_steps(self, sandbox: Sandbox, undo: list[Callable[[], Awaitable[None]]]) -> None:
        config = sandbox.config
        image = await self.ensure_image(self.env.sandbox_image)
        sandbox.image_id = image.id
        sandbox.image = self.env.sandbox_image
        options = sandbox.namespace_options()
        host_ipc = options.ipc == cri.NamespaceMode.NODE
        dirs = self.dirs(sandbox.id)
        node_hostname = "" if config.hostname else await asyncio.to_thread(_host_hostname)
        # A pod that names no hostname gets the node's in /etc/hostname, as containerd
        # writes it. The spec carries the requested one alone, as containerd's does: a
        # hostname on a host-network pod (no UTS namespace) is refused by runc.
        hostname = config.hostname
        undo.append(dirs.remove)
        await dirs.create(
            config.hostname or node_hostname, config.dns_config, private_shm=not host_ipc
        )

        userns = pod_userns_of(config)
        userns_path = ""
        if not sandbox.host_network:
            pin = None
            if userns is not None:
                userns_path = str(dirs.userns)
                pin = UsernsPin(userns_path, _map_line(userns.uids), _map_line(userns.gids))
                undo.append(lambda: remove_pod_netns(userns_path))
            sandbox.netns_path = await self.network.create_netns(pin)
            netns = sandbox.netns_path
            undo.append(lambda: self.network.remove_netns(netns))

        spec = build_sandbox_spec(
            SandboxSpecInput(
                sandbox_id=sandbox.id,
                config=config,
                image_config=runtime_config(image.config),
                netns_path=sandbox.netns_path,
                shm_path=str(dirs.shm),
                resolv_conf_path=str(dirs.resolv_conf),
                hostname=hostname,
                cgroup_driver=self.env.cgroup_driver,
                oom_score_adj_floor=self.env.oom_score_adj_floor,
                pod_annotations=self.env.pod_annotations,
                userns=userns,
                userns_path=userns_path,
                namespace=self.env.namespace,
                image_name=self.env.sandbox_image,
                host_in_userns=self.env.host_in_userns,
            )
        )
        sandbox.spec = spec
        # CNI ADD and the pause container's create (snapshot, record, runc create) need
        # only the pinned namespace, not each other: they run at once, and the pause
        # process is started once both are done, so it still runs on a wired network.
        mounts: list[Mount] = []

        async def create_pause() -> None:
            async with self.ops.creation_lease() as lease:
                parent, labels = image.chain_id, None
                if userns is not None:
                    rootfs = await self.ops.userns_rootfs(parent, userns, lease)
                    parent, labels = rootfs.parent, rootfs.labels
                undo.append(lambda: self.ops.remove_snapshot(sandbox.id))
                mounts[:] = await self.ops.prepare_snapshot(sandbox.id, parent, labels, lease=lease)
                await self._create_pause_container(sandbox, spec, lease, undo)
            undo.append(lambda: self._kill_and_delete_task(sandbox.id))
            await self.ops.create_task(sandbox.id, mounts)

        await run_all(self._set_up_network(sandbox, undo), create_pause())
        sandbox.network_ready = True

        async def start() -> None:
            sandbox.pid = await self.ops.start_task(sandbox.id)

        # The record was written before CNI said the IP; a restart reads it from there.
        await run_all(self._persist_run_complete(sandbox), start())
        sandbox.state = SandboxState.READY
        self.store.add(sandbox)
        self._publish(sandbox, cri.ContainerEventType.CONTAINER_CREATED_EVENT)
        self._publish(sandbox, cri.ContainerEventType.CONTAINER_STARTED_EVENT)
        log_event(
            log,
            "sandbox running",
            pod=sandbox.id,
            name=sandbox.name,
            ip=sandbox.ip,
            pid=sandbox.pid,
        )

    async def _set_up_network(
        self, sandbox: Sandbox, undo: list[Callable[[], Awaitable[None]]]
    ) -> None:
        if sandbox.host_network:
            return
        request = network_request(sandbox)
        undo.append(lambda: self.network.teardown(request))
        result = await self.network.setup(request)
        sandbox.ip = result.ip
        sandbox.additional_ips = list(result.additional_ips)
        sandbox.cni_result = result.result.raw

    async def _create_pause_container(
        self,
        sandbox: Sandbox,
        spec: dict[str, Any],
        lease: str,
        undo: list[Callable[[], Awaitable[None]]],
    ) -> None:
        config = sandbox.config
        metadata = config.metadata or cri.PodSandboxMetadata()
        labels = {
            **{k: v for k, v in config.labels.items()},
            KIND_LABEL: SANDBOX_KIND,
            "io.kubernetes.pod.name": metadata.name,
            "io.kubernetes.pod.namespace": metadata.namespace,
            "io.kubernetes.pod.uid": metadata.uid,
        }
        undo.append(lambda: self.ops.delete_container(sandbox.id))
        await self.ops.create_container(
            sandbox.id,
            image=self.env.sandbox_image,
            spec=spec,
            labels=labels,
            extensions={METADATA_EXTENSION: pack_json(METADATA_TYPE_URL, sandbox.to_record())},
            snapshot_key=sandbox.id,
            lease=lease,
            runc_binary=self.env.runc_binaries.get(sandbox.runtime_handler, ""),
        )

    async def _kill_and_delete_task(self, sandbox_id: str) -> None:
        # Wait is asked before the kill so the two round-trips overlap.
        waiting = asyncio.ensure_future(self.ops.wait(sandbox_id, timeout=STOP_WAIT_SECONDS))
        try:
            killed = await self.ops.kill(sandbox_id, all_processes=True)
        except BaseException:
            waiting.cancel()
            raise
        try:
            await waiting
        except TimeoutError:
            if killed:
                log_event(
                    log, "pause task did not exit in time", level=logging.WARNING, pod=sandbox_id
                )
        await self.ops.delete_task(sandbox_id)

    # resources

    async def update_resources(
        self,
        sandbox: Sandbox,
        overhead: cri.LinuxContainerResources | None,
        resources: cri.LinuxContainerResources | None,
    ) -> list[str]:
        """Write the pod's new resources into its cgroup parent, then record them
        (in memory and on the containerd record) as containerd does; the files written."""
        async with sandbox.lock:
            linux = sandbox.config.linux
            parent = linux.cgroup_parent if linux is not None else ""
            written: list[str] = []
            if resources is not None and parent:
                written = await asyncio.to_thread(apply_pod_resources, parent, resources)
            sandbox.overhead, sandbox.resources = overhead, resources
            data = sandbox.to_record()
            data[RUN_COMPLETE] = True
            await self.ops.update_extension(
                sandbox.id, METADATA_EXTENSION, pack_json(METADATA_TYPE_URL, data)
            )
        log_event(log, "pod resources updated", pod=sandbox.id, files=",".join(written))
        return written

    # stop / remove

    async def stop(self, sandbox: Sandbox) -> None:
        """Idempotent: stopping a stopped pod tears down whatever is left. Once a
        stop has completed, a second one (RemovePodSandbox's) only stops containers:
        running every CNI DEL again costs ~25 ms and finds nothing."""
        async with sandbox.lock:
            for hook in self.stop_containers:
                await hook(sandbox)
            if sandbox.stop_complete:
                return
            # The pause task and the network are independent (the namespace is pinned
            # by its mount, not by the pause process): both are undone at once.
            await run_all(self._stop_task(sandbox), self._stop_network(sandbox))
            await self.dirs(sandbox.id).release_shm()
            sandbox.stop_complete = True
            log_event(log, "sandbox stopped", pod=sandbox.id, name=sandbox.name)

    def _publish(self, sandbox: Sandbox, kind: cri.ContainerEventType) -> None:
        for hook in self.lifecycle_events:
            hook(sandbox, kind)

    def _mark_not_ready(self, sandbox: Sandbox) -> None:
        """One STOPPED event, whichever of StopPodSandbox and the pause exit comes first."""
        was_ready = sandbox.state is SandboxState.READY
        sandbox.pid = 0
        sandbox.state = SandboxState.NOTREADY
        if was_ready:
            self._publish(sandbox, cri.ContainerEventType.CONTAINER_STOPPED_EVENT)

    async def _stop_task(self, sandbox: Sandbox) -> None:
        await self._kill_and_delete_task(sandbox.id)
        self._mark_not_ready(sandbox)
        sandbox.task_deleted = True

    async def _stop_network(self, sandbox: Sandbox) -> None:
        if not sandbox.host_network and sandbox.netns_path:
            await self.network.teardown(network_request(sandbox))
            await self.network.remove_netns(sandbox.netns_path)
            await remove_pod_netns(self.dirs(sandbox.id).userns)
        sandbox.network_ready = False

    async def remove(self, sandbox: Sandbox) -> None:
        await self.stop(sandbox)
        async with sandbox.lock:
            for hook in self.remove_containers:
                await hook(sandbox)
            await run_all(self._remove_record(sandbox.id), self.dirs(sandbox.id).remove())
            # Sent while the pod's status can still be read, as containerd does.
            self._publish(sandbox, cri.ContainerEventType.CONTAINER_DELETED_EVENT)
            self.store.remove(sandbox)
            log_event(log, "sandbox removed", pod=sandbox.id, name=sandbox.name)

    async def _remove_record(self, sandbox_id: str) -> None:
        await self.ops.delete_container(sandbox_id)
        await self.ops.remove_snapshot(sandbox_id)

    async def on_task_exit(self, event: TaskExit) -> None:
        sandbox = self.store.by_id.find(event.container_id) if event.is_init else None
        if sandbox is None or sandbox.id != event.container_id:
            return
        self._mark_not_ready(sandbox)
        log_event(
            log,
            "sandbox pause process exited",
            level=logging.WARNING,
            pod=sandbox.id,
            exit_code=event.exit_code,
        )


def _map_line(mapping: IdMapping) -> str:
    """One /proc/<pid>/uid_map line."""
    return f"{mapping.container_id} {mapping.host_id} {mapping.size}"


def _host_hostname() -> str:
    import socket

    return socket.gethostname()
