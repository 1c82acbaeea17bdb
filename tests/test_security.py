"""Issue 16's attacks, replayed against a real shim: each is refused or bounded.

Hostile pod authors (annotations, names, DNS, huge requests), streaming
clients (SPDY floods, idle and half-sent connections) and local users
(settings) as the README's SECURITY section describes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import resource
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from grpclib import GRPCError
from grpclib.const import Status

from cri_shim.containerd.embedded import EmbeddedContainerd
from cri_shim.gen.runtime import v1 as cri
from cri_shim.logs import JsonFormatter, TextFormatter
from cri_shim.metrics import MAX_REGISTRY_LABELS, OTHER_REGISTRY, Metrics
from cri_shim.oci import apparmor
from cri_shim.server import Shim
from cri_shim.streaming.spdy import (
    Frame,
    FrameDecoder,
    FrameEncoder,
    GoAway,
    GoAwayStatus,
    RstStatus,
    RstStream,
    SynReply,
    SynStream,
    encode_data,
    make_headers,
)

from .conftest import CriClient, short_tempdir, wait_for
from .pods import make_container, pod_config
from .support.registry import free_port
from .support.streaming_client import http_request

MiB = 1024 * 1024
# The shim process runs with this many file descriptors, so exhausting them is cheap.
SHIM_NOFILE = 1024
HEADER_TIMEOUT = 1.0


def rss(pid: int | str = "self") -> int:
    """Resident set size of a process, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class ShimUnderAttack:
    process: asyncio.subprocess.Process
    socket: Path
    streaming_port: int
    metrics_port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self) -> CriClient:
        return CriClient.connect(self.socket)


def _low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (SHIM_NOFILE, SHIM_NOFILE))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def attacked(containerd: EmbeddedContainerd) -> AsyncIterator[ShimUnderAttack]:
    """`cri-shim serve` as its own process, with RLIMIT_NOFILE 1024 and short header timeouts."""
    base = short_tempdir("crishim-sec-")
    (base / "cni").mkdir()
    streaming_port, metrics_port = free_port(), free_port()
    config = base / "cri-shim.toml"
    config.write_text(
        f'state_dir = "{base / "state"}"\n'
        f'[server]\nsocket = "{base / "cri.sock"}"\n'
        f'[containerd]\naddress = "{containerd.address}"\nembedded = false\n'
        'namespace = "crishim-sec"\n'
        f'[cni]\nconf_dir = "{base / "cni"}"\nnetns_dir = "{base / "netns"}"\n'
        f"[streaming]\nport = {streaming_port}\nheader_timeout = {HEADER_TIMEOUT}\n"
        f"[metrics]\nport = {metrics_port}\nheader_timeout = {HEADER_TIMEOUT}\n"
    )
    log = base / "shim.log"
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cri_shim",
            "serve",
            "--config",
            str(config),
            stdout=out,
            stderr=out,
            stdin=asyncio.subprocess.DEVNULL,
            preexec_fn=_low_nofile,
        )
    shim = ShimUnderAttack(process, base / "cri.sock", streaming_port, metrics_port, log)
    deadline = time.monotonic() + 60
    while True:
        assert process.returncode is None, log.read_text()
        client = shim.client()
        try:
            await client.runtime.version(cri.VersionRequest(), timeout=2)
            break
        except (TimeoutError, OSError):
            assert time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.1)
        finally:
            client.close()
    yield shim
    process.terminate()
    await process.wait()


# 4. gRPC message size


async def test_oversized_grpc_message_is_refused_before_it_is_read(
    attacked: ShimUnderAttack,
) -> None:
    """A 20 MiB RunPodSandbox gets RESOURCE_EXHAUSTED at once; the shim's RSS does not move."""
    config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="huge", namespace="ns", uid="u1"),
        annotations={"big": "x" * (20 * MiB)},
    )
    client = attacked.client()
    try:
        await client.runtime.version(cri.VersionRequest())
        before = rss(attacked.pid)
        started = time.monotonic()
        with pytest.raises(GRPCError) as caught:
            await client.runtime.run_pod_sandbox(
                cri.RunPodSandboxRequest(config=config), timeout=60
            )
        elapsed = time.monotonic() - started
        grown = rss(attacked.pid) - before
        assert caught.value.status is Status.RESOURCE_EXHAUSTED
        message = caught.value.message or ""
        assert "received message larger than max" in message and str(16 * MiB) in message
        print(f"20 MiB request refused in {elapsed:.2f}s; shim rss {grown / MiB:+.1f} MiB")
        assert grown < 8 * MiB
        assert elapsed < 10
        # The connection and the shim still serve.
        assert (await client.runtime.version(cri.VersionRequest())).runtime_name
    finally:
        client.close()


# 3. header timeout and connection caps


CRICTL = Path("/var/cache/cri-shim-peers/cri-tools-v1.37.0/crictl")


async def crictl_version(socket: Path) -> str:
    """`crictl version` (Go's gRPC client) when built, else our client."""
    if not CRICTL.exists():
        client = CriClient.connect(socket)
        try:
            return (await client.runtime.version(cri.VersionRequest(), timeout=10)).runtime_name
        finally:
            client.close()
    process = await asyncio.create_subprocess_exec(
        str(CRICTL),
        "--runtime-endpoint",
        f"unix://{socket}",
        "--timeout",
        "10s",
        "version",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    assert process.returncode == 0, output.decode()
    return output.decode()


async def half_open(
    port: int, count: int, pid: int, peak: list[int]
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """`count` connections that each send part of a request header and then nothing;
    the shim's descriptor count is sampled as they open (highest kept in `peak`)."""
    opened = []
    for index in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /exec/x HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        opened.append((reader, writer))
        if index % 50 == 0:
            peak[0] = max(peak[0], open_fds(pid))
    return opened


async def test_partial_headers_are_timed_out_and_connections_capped(
    attacked: ShimUnderAttack,
) -> None:
    """2,000 half-sent requests on each HTTP port: the shim keeps descriptors for CRI
    (crictl version answers), and every connection is closed within the header timeout."""
    baseline_fds = open_fds(attacked.pid)
    started = time.monotonic()
    peak = [baseline_fds]
    flood = await half_open(attacked.streaming_port, 2000, attacked.pid, peak)
    flood += await half_open(attacked.metrics_port, 2000, attacked.pid, peak)
    peak_fds = peak[0]
    assert "cri-shim" in await crictl_version(attacked.socket)

    async def closed(reader: asyncio.StreamReader) -> bytes:
        # A refused connection is closed with our unread bytes in it: the kernel resets it.
        try:
            return await reader.read()
        except ConnectionResetError:
            return b"reset"

    answers = await asyncio.wait_for(asyncio.gather(*(closed(reader) for reader, _ in flood)), 60)
    elapsed = time.monotonic() - started
    refused = sum(answer.startswith((b"HTTP/1.1 503", b"reset")) for answer in answers)
    print(
        f"4000 half-open connections: shim fds {baseline_fds} -> {peak_fds} "
        f"(limit {SHIM_NOFILE}), {refused} refused with 503, all closed in {elapsed:.1f}s"
    )
    for _, writer in flood:
        writer.close()
    # Caps: 1024/8 streaming + 1024/32 metrics connections at a time; the header
    # timeout frees slots while the flood is still being opened, so some more get in.
    assert refused > 0
    assert peak_fds < SHIM_NOFILE // 2
    assert "cri-shim" in await crictl_version(attacked.socket)
    assert attacked.process.returncode is None


async def test_idle_connections_leave_the_cri_socket_working(attacked: ShimUnderAttack) -> None:
    """Connections that send nothing at all, past the fd limit: CRI calls still work."""
    flood = []
    peak = 0
    for index in range(3000):
        flood.append(await asyncio.open_connection("127.0.0.1", attacked.streaming_port))
        if index % 50 == 0:
            peak = max(peak, open_fds(attacked.pid))
    print(f"3000 idle connections: shim fds peaked at {peak} (limit {SHIM_NOFILE})")
    assert peak < SHIM_NOFILE // 2
    assert "cri-shim" in await crictl_version(attacked.socket)
    await asyncio.wait_for(
        asyncio.gather(*(reader.read() for reader, _ in flood), return_exceptions=True), 60
    )
    for _, writer in flood:
        writer.close()


# 2. annotations


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("PPid:"):
                return int(line.split()[1])
    raise AssertionError("no PPid")


async def _sandbox_pid(pods: CriClient, pod_id: str) -> int:
    status = await pods.runtime.pod_sandbox_status(
        cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True)
    )
    return int(json.loads(status.info["info"])["pid"])


async def test_pod_annotations_cannot_join_another_pods_shim(
    pods: CriClient,
    pod: tuple[str, cri.PodSandboxConfig],
    containerd: EmbeddedContainerd,
    pod_shim: Shim,
) -> None:
    """A pod annotated with another pod's sandbox id, a container type and a systemd
    property runs under its own containerd-shim with the runtime's annotations."""
    victim_id, _ = pod
    hostile = pod_config(
        "hostile",
        annotations={
            "io.kubernetes.cri.sandbox-id": victim_id,
            "io.kubernetes.cri.container-type": "container",
            "org.systemd.property.TasksMax": "1",
        },
    )
    reply = await pods.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=hostile))
    try:
        bundle = (
            containerd.base
            / "state/io.containerd.runtime.v2.task"
            / pod_shim.settings.containerd.namespace
            / reply.pod_sandbox_id
        )
        spec = json.loads((bundle / "config.json").read_text())
        annotations = spec["annotations"]
        assert annotations["io.kubernetes.cri.sandbox-id"] == reply.pod_sandbox_id
        assert annotations["io.kubernetes.cri.container-type"] == "sandbox"
        assert not any(key.startswith("org.systemd.property.") for key in annotations)
        victim_shim = _ppid(await _sandbox_pid(pods, victim_id))
        hostile_shim = _ppid(await _sandbox_pid(pods, reply.pod_sandbox_id))
        assert victim_shim != hostile_shim
        # The CRI still reports what the pod asked for.
        status = await pods.runtime.pod_sandbox_status(
            cri.PodSandboxStatusRequest(pod_sandbox_id=reply.pod_sandbox_id)
        )
        assert status.status is not None
        assert status.status.annotations["io.kubernetes.cri.sandbox-id"] == victim_id
    finally:
        await pods.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(reply.pod_sandbox_id))


# 1 and 5. SPDY streams, buffers and control-frame floods


@pytest_asyncio.fixture(loop_scope="session")
async def sleeper(pods: CriClient, pod: tuple[str, cri.PodSandboxConfig], busybox: str) -> str:
    return await make_container(pods, pod, busybox, ["sleep", "3600"], name="sleeper")


async def _exec_upgrade(
    pods: CriClient, container: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, FrameEncoder]:
    """An exec of `sleep` (never reads stdin) upgraded to SPDY, its four streams created."""
    request = cri.ExecRequest(
        container_id=container, cmd=["sleep", "3600"], stdin=True, stdout=True, stderr=True
    )
    url = (await pods.runtime.exec(request)).url
    headers = [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")]
    headers.append(("X-Stream-Protocol-Version", "v4.channel.k8s.io"))
    reply, reader, writer = await http_request(url, headers=headers)
    assert reply.status == 101
    encoder = FrameEncoder()
    for index, kind in enumerate(("error", "stdin", "stdout", "stderr")):
        writer.write(encoder.encode(SynStream(1 + 2 * index, make_headers(streamType=kind))))
    await writer.drain()
    return reader, writer, encoder


async def _frames_until(
    reader: asyncio.StreamReader, decoder: FrameDecoder, done: Callable[[list[Frame]], bool]
) -> list[Frame]:
    seen: list[Frame] = []
    while not done(seen):
        chunk = await asyncio.wait_for(reader.read(65536), 60)
        if not chunk:
            break
        decoder.feed(chunk)
        seen += list(decoder)
    return seen


async def test_spdy_extra_streams_and_huge_frames_stay_bounded(
    pods: CriClient, sleeper: str
) -> None:
    """30 extra streams with a 16 MiB DATA frame each, 16 MiB on each output stream,
    and 64 MiB of stdin the process never reads: the extra streams are refused with
    RST_STREAM, output streams' input is dropped, stdin pushes back through TCP,
    and the shim's RSS stays within a few MiB of where it started."""
    reader, writer, encoder = await _exec_upgrade(pods, sleeper)
    decoder = FrameDecoder()
    replies = await _frames_until(
        reader, decoder, lambda seen: sum(isinstance(f, SynReply) for f in seen) == 4
    )
    assert {f.stream_id for f in replies if isinstance(f, SynReply)} == {1, 3, 5, 7}
    before = rss()
    frame = bytes(16 * MiB - 1)  # the largest a SPDY frame can carry
    extra = list(range(9, 9 + 2 * 30, 2))
    for stream_id in extra:
        writer.write(encoder.encode(SynStream(stream_id, make_headers(streamType="stdout"))))
        writer.write(encode_data(stream_id, frame))
        await writer.drain()
    for stream_id in (5, 7):  # stdout and stderr: the server only writes to them
        writer.write(encode_data(stream_id, frame))
        await writer.drain()
    refused = await _frames_until(
        reader,
        decoder,
        lambda seen: sum(isinstance(f, RstStream) for f in seen) == len(extra),
    )
    resets = [f for f in refused if isinstance(f, RstStream)]
    assert [f.stream_id for f in resets] == extra
    assert {f.status for f in resets} == {RstStatus.REFUSED_STREAM}
    after_flood = rss()
    # stdin: the server buffers at most its budget, then stops reading the socket.
    stdin = asyncio.ensure_future(_send_stdin(writer, 4 * 16 * MiB))
    transport = writer.transport

    async def pushed_back() -> bool:
        return transport.get_write_buffer_size() > 0 or stdin.done()

    assert await wait_for(pushed_back, 60, 0.05)
    peak = rss()
    assert not stdin.done(), "64 MiB of stdin was all taken by a process that reads none"
    stdin.cancel()
    writer.close()
    print(
        f"rss before {before / MiB:.0f} MiB, after 30x16 MiB refused streams "
        f"{after_flood / MiB:.0f} MiB, with stdin pushing back {peak / MiB:.0f} MiB"
    )
    # The client's 16 MiB frame and its encodings live in this process too.
    assert after_flood - before < 64 * MiB
    assert peak - before < 64 * MiB


async def _send_stdin(writer: asyncio.StreamWriter, total: int) -> None:
    chunk = encode_data(3, bytes(MiB))
    for _ in range(total // MiB):
        writer.write(chunk)
        await writer.drain()


async def test_unknown_control_frame_flood_closes_the_connection(
    pods: CriClient, sleeper: str
) -> None:
    """A client sending 100,000 unknown control frames is cut off with GOAWAY, and CRI
    calls made meanwhile are answered promptly."""
    reader, writer, _ = await _exec_upgrade(pods, sleeper)
    unknown = bytes.fromhex("8003000a 00000000")  # SPDY/3 control frame type 10, empty
    flood = unknown * 100_000
    latencies: list[float] = []

    async def versions() -> None:
        for _ in range(20):
            started = time.monotonic()
            await pods.runtime.version(cri.VersionRequest())
            latencies.append(time.monotonic() - started)

    calls = asyncio.ensure_future(versions())
    writer.write(flood)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    frames = await _frames_until(
        reader, FrameDecoder(), lambda seen: any(isinstance(f, GoAway) for f in seen)
    )
    await calls
    writer.close()
    goaways = [f for f in frames if isinstance(f, GoAway)]
    assert goaways and goaways[0].status == GoAwayStatus.PROTOCOL_ERROR
    latencies.sort()
    print(f"Version during the flood: max {latencies[-1] * 1000:.1f} ms")
    assert latencies[-1] < 2.0


# 8. settings


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("[streaming]\nport = 70000", "'streaming.port' must be between 0 and 65535"),
        ("[containerd]\nhealth_interval = 0", "'containerd.health_interval' must be between"),
        ("[cni]\nplugin_timeout = -3", "'cni.plugin_timeout' must be between"),
        ("[server]\nsocket_mode = 0o777", "'server.socket_mode' must give no access to others"),
        ("[registry]\nstall_timeout = -1", "'registry.stall_timeout' must be between"),
        ("[registry]\nstall_timeout = nan", "'registry.stall_timeout' must be between"),
        ("[server]\nmax_recv_message_size = 0", "'server.max_recv_message_size' must be"),
        ("[metrics]\nmax_connections = 0", "'metrics.max_connections' must be between"),
        (
            '[containerd]\nnamespace = "a/b"',
            "'containerd.namespace' must be a containerd namespace",
        ),
        ('[server]\nsocket = ""', "'server.socket' must not be empty"),
    ],
)
async def test_bad_settings_are_one_line_and_exit_2(
    tmp_path: Path, setting: str, expected: str
) -> None:
    config = tmp_path / "cri-shim.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n{setting}\n')
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cri_shim",
        "serve",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    lines = stderr.decode().splitlines()
    assert process.returncode == 2, stderr.decode()
    assert len(lines) == 1 and expected in lines[0], lines
    assert stdout == b""


# 7 and 9. what pod authors write: logs, hostnames, DNS, log paths


def _capture(formatter: logging.Formatter) -> tuple[logging.Handler, io.StringIO]:
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    handler.setFormatter(formatter)
    logging.getLogger("cri_shim").addHandler(handler)
    return handler, text


async def test_control_characters_in_names_are_escaped_in_both_log_formats(
    pods: CriClient, pod: tuple[str, cri.PodSandboxConfig], busybox: str
) -> None:
    """A container named with NUL, CR, ESC and DEL: every log line stays one line of
    printable text, in the text and the JSON format alike."""
    captures = [_capture(TextFormatter()), _capture(JsonFormatter())]
    hostile = "a\x00b\rc\x1b[2Jd\x7fe\u2028f"
    logger = logging.getLogger("cri_shim")
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        await make_container(pods, pod, busybox, ["true"], name=hostile, log_path="h.log")
    finally:
        logger.setLevel(level)
        for handler, _ in captures:
            logger.removeHandler(handler)
    for _, text in captures:
        output = text.getvalue()
        assert "container created" in output
        assert "\\u0000" in output and "\\u001b" in output and "\\u007f" in output
        for char in "\x00\r\x1b\x7f\u2028":
            assert char not in output


@pytest.mark.parametrize(
    ("field", "config"),
    [
        ("config.hostname", {"hostname": "web\n10.0.0.1 evil"}),
        ("config.dns_config.servers[0]", {"dns_config": cri.DnsConfig(servers=["1.1.1.1\nx"])}),
        ("config.dns_config.searches[0]", {"dns_config": cri.DnsConfig(searches=["a\rb"])}),
        ("config.dns_config.options[0]", {"dns_config": cri.DnsConfig(options=["ndots:5\n"])}),
    ],
)
async def test_line_breaks_in_hostname_and_dns_are_invalid(
    pods: CriClient, field: str, config: dict[str, object]
) -> None:
    request = cri.RunPodSandboxRequest(config=pod_config("dns", **config))
    with pytest.raises(GRPCError) as caught:
        await pods.runtime.run_pod_sandbox(request)
    assert caught.value.status is Status.INVALID_ARGUMENT
    assert field in (caught.value.message or "")


async def test_log_path_through_a_symlink_cannot_leave_the_log_directory(
    pods: CriClient, pod: tuple[str, cri.PodSandboxConfig], busybox: str, tmp_path: Path
) -> None:
    """A symlink inside the pod's log directory (which a container with that directory
    mounted could plant) does not make the shim create files elsewhere; a plain log
    file is created 0640."""
    pod_id, pod_config_ = pod
    log_dir = Path(pod_config_.log_directory)
    log_dir.mkdir(parents=True, exist_ok=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (log_dir / "evil").symlink_to(outside)
    (log_dir / "evil.log").symlink_to(outside / "direct.log")
    for log_path in ("evil/0.log", "evil.log"):
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=f"c{len(log_path)}"),
            image=cri.ImageSpec(image=busybox),
            command=["echo", "hi"],
            log_path=log_path,
        )
        request = cri.CreateContainerRequest(pod_id, config, pod_config_)
        with contextlib.suppress(GRPCError):
            created = await pods.runtime.create_container(request)
            await pods.runtime.start_container(cri.StartContainerRequest(created.container_id))
    assert list(outside.iterdir()) == []
    await make_container(pods, pod, busybox, ["echo", "hi"], name="plain")
    logs = [p for p in log_dir.rglob("*.log") if not p.is_symlink() and p.is_file()]
    assert logs and all(stat.S_IMODE(p.stat().st_mode) == 0o640 for p in logs)


def test_pull_metrics_have_bounded_registry_labels() -> None:
    """Pulls from 1,000 registry hosts (image names are chosen by pod authors) make at
    most MAX_REGISTRY_LABELS + 1 series; the first hosts keep their own."""
    metrics = Metrics()
    for index in range(1000):
        metrics.observe_pull(f"host{index}.example/app:1", 10, 0.1)
    metrics.observe_pull("host0.example/app:2", 10, 0.1)
    rendered = metrics.render().decode()
    series = {
        line.split('registry="')[1].split('"')[0]
        for line in rendered.splitlines()
        if line.startswith("cri_shim_image_pull_bytes") and 'registry="' in line
    }
    assert len(series) == MAX_REGISTRY_LABELS + 1
    assert "host0.example" in series and OTHER_REGISTRY in series


# 6. AppArmor


def _fake_sys(root: Path, *, securityfs: bool, enabled: bytes | None) -> Path:
    if securityfs:
        (root / "sys/kernel/security/apparmor").mkdir(parents=True)
    if enabled is not None:
        params = root / "sys/module/apparmor/parameters"
        params.mkdir(parents=True)
        (params / "enabled").write_bytes(enabled)
    return root


@pytest.mark.parametrize(
    ("securityfs", "enabled", "supported"),
    [(True, b"Y\n", True), (True, b"N\n", False), (False, b"Y\n", False), (True, None, False)],
)
def test_apparmor_detection_is_containerds(
    tmp_path: Path, securityfs: bool, enabled: bytes | None, supported: bool
) -> None:
    root = _fake_sys(tmp_path, securityfs=securityfs, enabled=enabled)
    assert apparmor.host_supports(root) is supported


def test_this_host_has_no_apparmor() -> None:
    """The kernel here has no AppArmor: detection says so (critest's AppArmor specs skip)."""
    assert apparmor.host_supports() is False


def test_loaded_profiles_and_parser_versions(tmp_path: Path) -> None:
    root = _fake_sys(tmp_path, securityfs=True, enabled=b"Y")
    profiles = root / "sys/kernel/security/apparmor/profiles"
    profiles.write_text("docker-default (enforce)\ncri-containerd.apparmor.d (enforce)\n")
    assert apparmor.profile_loaded(apparmor.DEFAULT_PROFILE, root)
    assert not apparmor.profile_loaded("cri-containerd", root)
    assert apparmor.parser_version("AppArmor parser version 2.13.6\nCopyright") == 213006
    assert apparmor.parser_version("AppArmor parser version 3.0\n") == 300000
    assert apparmor.parser_version("garbage") == 0


def test_default_profile_matches_containerds_template() -> None:
    text = apparmor.default_profile(version=300000, daemon_profile="unconfined")
    assert text.startswith("#include <tunables/global>\n")
    assert "profile cri-containerd.apparmor.d flags=(attach_disconnected,mediate_deleted) {" in text
    for rule in (
        "deny mount,",
        "deny @{PROC}/sysrq-trigger rwklx,",
        "deny /sys/kernel/security/** rwklx,",
        "signal (send,receive) peer=cri-containerd.apparmor.d,",
        "ptrace (trace,read,tracedby,readby) peer=cri-containerd.apparmor.d,",
    ):
        assert rule in text
    old = apparmor.default_profile(version=208000, tunables=False, abstractions=False)
    assert old.startswith("@{PROC}=/proc/\n") and "signal" not in old and "ptrace" not in old


async def test_runtime_default_apparmor_on_a_host_without_apparmor(
    pods: CriClient, pod: tuple[str, cri.PodSandboxConfig], busybox: str
) -> None:
    """RuntimeDefault is refused with a message that says why; Unconfined runs."""
    runtime_default = cri.SecurityProfile(
        profile_type=cri.SecurityProfileProfileType.RuntimeDefault
    )
    with pytest.raises(GRPCError) as caught:
        await make_container(
            pods,
            pod,
            busybox,
            ["true"],
            name="aa-default",
            linux=cri.LinuxContainerConfig(
                security_context=cri.LinuxContainerSecurityContext(apparmor=runtime_default)
            ),
        )
    message = caught.value.message or ""
    assert "apparmor is not supported" in message and "no AppArmor" in message
    unconfined = cri.SecurityProfile(profile_type=cri.SecurityProfileProfileType.Unconfined)
    await make_container(
        pods,
        pod,
        busybox,
        ["true"],
        name="aa-unconfined",
        linux=cri.LinuxContainerConfig(
            security_context=cri.LinuxContainerSecurityContext(apparmor=unconfined)
        ),
    )
