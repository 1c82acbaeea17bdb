"""Pod networking through CNI plugins, following the CNI spec (0.3.x, 0.4.0, 1.0.0).

`PodNetwork` is what the sandbox code calls: `setup` runs the network's plugin
chain for ADD inside the pod's namespace and returns the pod's IPs, `teardown`
runs it in reverse for DEL. The ADD result and the exact configuration used
are cached as a JSON file per (network, sandbox, interface), like libcni's
/var/lib/cni/results, because DEL must hand plugins the `prevResult` of the
ADD and must still work after the shim restarted, after the config on disk
changed or vanished, and after the namespace is gone.

A failed ADD leaves nothing behind: the whole chain is DELeted (best effort)
before the error is raised, so no IP allocation, veth or iptables rule leaks
into the next attempt. ADD and DEL for one sandbox never overlap; different
sandboxes run in parallel.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cri_shim.checkpoint import write_atomic
from cri_shim.keyed_locks import KeyedLocks
from cri_shim.logs import log_event
from cri_shim.network.cni_cache import (
    CachedAttachment,
    ResultCache,
    SweepReport,
)
from cri_shim.network.cni_runner import (
    Attachment,
    CniRunner,
    NetworkChain,
    plugin_stdin,
)
from cri_shim.network.cni_types import (
    _SAFE_NAME,
    CACHE_FORMAT,
    CACHE_KIND,
    DEFAULT_IFNAME,
    SUPPORTED_VERSIONS,
    Bandwidth,
    CniError,
    CniNotReady,
    CniResult,
    DnsConfig,
    DnsResult,
    Interface,
    IPAddress,
    IPConfig,
    IPInterface,
    IPNetwork,
    PodNetworkRequest,
    PodNetworkStatus,
    PortMapping,
    Route,
    capability_args,
    cni_args,
)
from cri_shim.network.netns import (
    UsernsPin,
    create_pod_netns,
    netns_exists,
    new_pin_name,
    remove_pod_netns,
)
from cri_shim.network.pod_cidr import PodCidrStore
from cri_shim.network.readiness import NetworkReadiness
from cri_shim.settings import CniSettings

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------
# The API the sandbox code uses


class PodNetwork:
    """Sets up and tears down pod networks with the node's current CNI config."""

    def __init__(
        self,
        settings: CniSettings,
        state_dir: Path,
        readiness: NetworkReadiness,
        pod_cidrs: PodCidrStore | None = None,
        *,
        ifname: str = DEFAULT_IFNAME,
    ) -> None:
        self.settings = settings
        self.readiness = readiness
        self.pod_cidrs = pod_cidrs
        self.ifname = ifname
        cache_dir = settings.cache_dir or str(state_dir / "cni-cache")
        self.cache = ResultCache(Path(cache_dir))
        # Written before an ADD and dropped once its result is cached or undone:
        # what a shim killed mid-ADD leaves here is DELeted by the next start.
        self.pending = ResultCache(state_dir / "cni-pending")
        # One file per namespace pin we made, so a start-up sweep removes only
        # our own orphans from a pin directory other runtimes may share.
        self.pins_dir = state_dir / "netns-pins"
        self.runner = CniRunner(settings.bin_dirs, settings.plugin_timeout)
        self._locks = KeyedLocks()

    # namespaces, with the configured pin directory

    async def create_netns(self, userns: UsernsPin | None = None) -> str:
        name = new_pin_name()
        path = os.path.join(self.settings.netns_dir, name)
        await asyncio.to_thread(write_atomic, self.pins_dir / name, path.encode())
        try:
            return await create_pod_netns(self.settings.netns_dir, name, userns)
        except BaseException:
            await asyncio.to_thread((self.pins_dir / name).unlink, missing_ok=True)
            raise

    async def remove_netns(self, path: str) -> None:
        await remove_pod_netns(path)
        if path:
            await asyncio.to_thread((self.pins_dir / os.path.basename(path)).unlink, True)

    def _pins_sync(self) -> list[str]:
        try:
            names = os.listdir(self.pins_dir)
        except FileNotFoundError:
            return []
        paths = []
        for name in names:
            if name.startswith("."):
                continue  # a temp file of a write the kill cut short
            with contextlib.suppress(OSError):
                paths.append((self.pins_dir / name).read_text())
        return paths

    async def sweep(self, known_sandboxes: set[str], known_netns: set[str]) -> SweepReport:
        """Release what RunPodSandbox calls cut off by a kill left behind: cached
        and in-flight CNI attachments and namespace pins of no known sandbox.

        Only safe before the CRI socket serves (no RunPodSandbox in flight)."""
        report = SweepReport()
        for path, record in await self.cache.all():
            if record.container_id in known_sandboxes:
                continue
            request = PodNetworkRequest(record.container_id, "", "", "", record.netns)
            await self._delete_cached(request, path, record, best_effort=True)
            report.cached += 1
            log_event(
                log,
                "orphaned cni attachment released",
                level=logging.WARNING,
                pod=record.container_id,
                network=record.chain.name,
            )
        for path, record in await self.pending.all():
            if record.container_id not in known_sandboxes:
                netns = await self._usable_netns(record.netns)
                attachment = self._attachment(
                    PodNetworkRequest(record.container_id, "", "", "", netns),
                    netns,
                    record.cni_args,
                    record.capability_args,
                )
                await self.runner.delete(record.chain, attachment, None, best_effort=True)
                report.pending += 1
                log_event(
                    log,
                    "cni add cut off by a kill released",
                    level=logging.WARNING,
                    pod=record.container_id,
                    network=record.chain.name,
                )
            await self.pending.remove(path)
        for pin in await asyncio.to_thread(self._pins_sync):
            if pin in known_netns:
                continue
            await self.remove_netns(pin)
            report.pins += 1
            log_event(log, "orphaned netns pin removed", level=logging.WARNING, netns=pin)
        return report

    # helpers

    async def _current_chain(self) -> NetworkChain:
        if self.readiness.config is None:
            await self.readiness.refresh()  # a config written a moment ago
        config = self.readiness.config
        if config is None:
            raise CniNotReady(f"network plugin is not ready: {self.readiness.error}")
        chain = NetworkChain.from_config(config)
        chain.validate()
        return chain

    async def _usable_netns(self, *paths: str) -> str:
        """The first path that is still a live namespace; "" tells DEL it is gone."""
        for path in paths:
            if path and await netns_exists(path):
                return path
        return ""

    def _attachment(
        self,
        pod: PodNetworkRequest,
        netns: str,
        args: tuple[tuple[str, str], ...] | None = None,
        capabilities: Mapping[str, Any] | None = None,
    ) -> Attachment:
        return Attachment(
            container_id=pod.sandbox_id,
            netns=netns,
            ifname=self.ifname,
            cni_args=cni_args(pod) if args is None else args,
            capability_args=(
                capability_args(pod, self.pod_cidrs.cidrs if self.pod_cidrs else ())
                if capabilities is None
                else capabilities
            ),
            pod=pod.pod,
        )

    async def _delete_cached(
        self, pod: PodNetworkRequest, path: Path, record: CachedAttachment, *, best_effort: bool
    ) -> None:
        netns = await self._usable_netns(pod.netns_path, record.netns)
        attachment = self._attachment(pod, netns, record.cni_args, record.capability_args)
        await self.runner.delete(record.chain, attachment, record.result, best_effort=best_effort)
        await self.cache.remove(path)

    # setup / teardown

    async def setup(self, pod: PodNetworkRequest) -> PodNetworkStatus:
        """ADD the pod to the network; on any failure nothing is left behind."""
        _check_id(pod.sandbox_id)
        async with self._locks.hold(pod.sandbox_id):
            chain = await self._current_chain()
            if not await netns_exists(pod.netns_path):
                raise CniError(f"network namespace {pod.netns_path!r} does not exist")
            for path, stale in await self.cache.load(pod.sandbox_id, self.ifname):
                log_event(
                    log,
                    "stale cni attachment removed before add",
                    level=logging.WARNING,
                    pod=pod.sandbox_id,
                    network=stale.chain.name,
                )
                await self._delete_cached(pod, path, stale, best_effort=True)
            attachment = self._attachment(pod, pod.netns_path)
            started = time.monotonic()
            result: dict[str, Any] | None = None
            intent = CachedAttachment(
                chain=chain,
                container_id=pod.sandbox_id,
                ifname=self.ifname,
                netns=pod.netns_path,
                cni_args=attachment.cni_args,
                capability_args=dict(attachment.capability_args),
                result={},
            )
            await self.pending.save(intent)
            try:
                result = await self.runner.add(chain, attachment)
                status = PodNetworkStatus.from_result(CniResult.parse(result), self.ifname)
                await self.cache.save(dataclasses.replace(intent, result=result))
            except BaseException as err:
                prev = result if result is not None else getattr(err, "partial_result", None)
                await asyncio.shield(self._rollback(chain, attachment, prev, err))
                if isinstance(err, CniError):
                    raise _in_network(err, chain.name) from err
                raise
            finally:
                await asyncio.shield(
                    self.pending.remove(self.pending.path(chain.name, pod.sandbox_id, self.ifname))
                )
            log_event(
                log,
                "pod network set up",
                pod=pod.sandbox_id,
                name=pod.pod,
                network=chain.name,
                ip=status.ip,
                additional_ips=",".join(status.additional_ips),
                duration_ms=round((time.monotonic() - started) * 1000, 1),
            )
            return status

    async def _rollback(
        self,
        chain: NetworkChain,
        attachment: Attachment,
        prev_result: Mapping[str, Any] | None,
        cause: BaseException,
    ) -> None:
        log_event(
            log,
            "cni add failed, rolling back",
            level=logging.WARNING,
            pod=attachment.container_id,
            name=attachment.pod,
            network=chain.name,
            error=str(cause) or type(cause).__name__,
        )
        try:
            await self.runner.delete(chain, attachment, prev_result, best_effort=True)
            await self.cache.remove(
                self.cache.path(chain.name, attachment.container_id, attachment.ifname)
            )
        except Exception:  # the original error is what the caller must see
            log.exception("cni rollback failed")

    async def teardown(self, pod: PodNetworkRequest) -> None:
        """DEL the pod from the network. Idempotent; works from the cache after a
        restart, with the config gone, and with the namespace already removed."""
        _check_id(pod.sandbox_id)
        async with self._locks.hold(pod.sandbox_id):
            cached = await self.cache.load(pod.sandbox_id, self.ifname)
            for path, record in cached:
                try:
                    await self._delete_cached(pod, path, record, best_effort=False)
                except CniError as err:
                    raise _in_network(err, record.chain.name) from err
                log_event(
                    log,
                    "pod network torn down",
                    pod=pod.sandbox_id,
                    name=pod.pod,
                    network=record.chain.name,
                )
            if cached:
                return
            # No ADD result on record (a crash mid-ADD, or a cache from elsewhere):
            # plugins are built to release whatever they hold on DEL without one.
            try:
                chain = await self._current_chain()
            except CniError as err:
                log_event(
                    log,
                    "no cni result cached and no usable config; nothing to tear down",
                    level=logging.DEBUG,
                    pod=pod.sandbox_id,
                    reason=str(err),
                )
                return
            netns = await self._usable_netns(pod.netns_path)
            try:
                await self.runner.delete(chain, self._attachment(pod, netns), None)
            except CniError as err:
                raise _in_network(err, chain.name) from err
            log_event(
                log,
                "pod network torn down without cached result",
                pod=pod.sandbox_id,
                name=pod.pod,
                network=chain.name,
            )

    async def status(self, pod: PodNetworkRequest) -> PodNetworkStatus | None:
        """The pod's network as the last ADD returned it (from the cache; no plugin runs)."""
        _check_id(pod.sandbox_id)
        for _path, record in await self.cache.load(pod.sandbox_id, self.ifname):
            return PodNetworkStatus.from_result(CniResult.parse(record.result), self.ifname)
        return None

    async def check(self, pod: PodNetworkRequest) -> None:
        """CHECK the pod's attachment with its plugins; raises CniError if they object."""
        _check_id(pod.sandbox_id)
        async with self._locks.hold(pod.sandbox_id):
            cached = await self.cache.load(pod.sandbox_id, self.ifname)
            if not cached:
                raise CniError(f"pod sandbox {pod.sandbox_id} has no network attachment")
            for _path, record in cached:
                netns = await self._usable_netns(pod.netns_path, record.netns)
                if not netns:
                    raise CniError(f"network namespace of sandbox {pod.sandbox_id} is gone")
                attachment = self._attachment(pod, netns, record.cni_args, record.capability_args)
                await self.runner.check(record.chain, attachment, record.result)


def _in_network(err: CniError, network: str) -> CniError:
    """The same error, its message prefixed with the network it happened in."""
    return CniError(
        f"network {network}: {err}",
        plugin=err.plugin,
        command=err.command,
        code=err.code,
        msg=err.msg,
        details=err.details,
    )


def _check_id(sandbox_id: str) -> None:
    """Sandbox ids become file names in the cache; refuse anything path-like."""
    if not _SAFE_NAME.match(sandbox_id):
        raise CniError(f"sandbox id {sandbox_id!r} is not usable as a CNI container id")


__all__ = [
    "Bandwidth",
    "CniError",
    "CniNotReady",
    "CniResult",
    "CniRunner",
    "DnsConfig",
    "IPConfig",
    "Interface",
    "NetworkChain",
    "PodNetwork",
    "PodNetworkRequest",
    "PodNetworkStatus",
    "PortMapping",
    "Route",
    "capability_args",
    "cni_args",
    "plugin_stdin",
]


__all__ = [
    "CACHE_FORMAT",
    "CACHE_KIND",
    "DEFAULT_IFNAME",
    "SUPPORTED_VERSIONS",
    "Attachment",
    "Bandwidth",
    "CachedAttachment",
    "CniError",
    "CniNotReady",
    "CniResult",
    "CniRunner",
    "DnsConfig",
    "DnsResult",
    "IPAddress",
    "IPConfig",
    "IPInterface",
    "IPNetwork",
    "Interface",
    "NetworkChain",
    "PodNetwork",
    "PodNetworkRequest",
    "PodNetworkStatus",
    "PortMapping",
    "ResultCache",
    "Route",
    "SweepReport",
    "capability_args",
    "cni_args",
    "plugin_stdin",
]
