"""The pause container's OCI spec, built from CRI configs (no containerd needed)."""

from dataclasses import replace
from pathlib import Path

import pytest

from cri_shim.gen.runtime import v1 as cri
from cri_shim.host import running_in_user_namespace
from cri_shim.oci.defaults import MASKED_PATHS, masked_paths
from cri_shim.oci.sandbox_spec import SandboxSpecInput, SpecError, build_sandbox_spec

PAUSE_CONFIG = {"Entrypoint": ["/pause"], "User": "65535:65535", "Env": ["PATH=/bin"]}


def spec_for(config: cri.PodSandboxConfig, floor: int | None = None) -> dict:  # type: ignore[type-arg]
    return build_sandbox_spec(
        SandboxSpecInput(
            sandbox_id="abc",
            config=config,
            image_config=PAUSE_CONFIG,
            netns_path="/var/run/netns/cni-1",
            shm_path="/state/sandboxes/abc/shm",
            resolv_conf_path="/state/sandboxes/abc/resolv.conf",
            hostname="web-0",
            cgroup_driver="cgroupfs",
            oom_score_adj_floor=floor,
            image_name="registry.k8s.io/pause:3.10",
        )
    )


def pod(**linux: object) -> cri.PodSandboxConfig:
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="web-0", namespace="prod", uid="u1"),
        linux=cri.LinuxPodSandboxConfig(**linux),  # type: ignore[arg-type]
    )


def namespaces(spec: dict) -> dict[str, str | None]:  # type: ignore[type-arg]
    return {n["type"]: n.get("path") for n in spec["linux"]["namespaces"]}


def test_pod_network_namespace_is_joined_and_rootfs_readonly() -> None:
    spec = spec_for(
        pod(cgroup_parent="/kubepods/besteffort/podu1", sysctls={"net.ipv4.ip_forward": "1"})
    )
    assert spec["process"]["args"] == ["/pause"]
    assert spec["process"]["user"] == {"uid": 65535, "gid": 65535, "additionalGids": [65535]}
    assert spec["root"]["readonly"] is True
    assert "rlimits" not in spec["process"]  # containerd strips the OCI default
    assert [m["destination"] for m in spec["mounts"]] == [
        "/proc", "/dev", "/dev/pts", "/dev/mqueue", "/sys", "/dev/shm", "/etc/resolv.conf"
    ]  # fmt: skip
    for mount in spec["mounts"][-2:]:
        assert mount["options"] == ["rbind", "ro", "nosuid", "nodev", "noexec"]
    assert spec["mounts"][-1]["source"] == "/state/sandboxes/abc/resolv.conf"
    assert spec["process"]["noNewPrivileges"] is True
    assert namespaces(spec)["network"] == "/var/run/netns/cni-1"
    assert spec["linux"]["sysctl"] == {
        "net.ipv4.ip_forward": "1",
        "net.ipv4.ip_unprivileged_port_start": "0",
        "net.ipv4.ping_group_range": "0 2147483647",
    }
    assert spec["linux"]["cgroupsPath"] == "/kubepods/besteffort/podu1/abc"
    shm = next(m for m in spec["mounts"] if m["destination"] == "/dev/shm")
    assert shm["source"] == "/state/sandboxes/abc/shm"
    assert spec["hostname"] == "web-0"
    assert spec["annotations"]["io.kubernetes.cri.container-type"] == "sandbox"
    assert spec["annotations"]["io.kubernetes.cri.podsandbox.image-name"] == (
        "registry.k8s.io/pause:3.10"
    )


def test_host_namespaces() -> None:
    options = cri.NamespaceOption(
        network=cri.NamespaceMode.NODE, pid=cri.NamespaceMode.NODE, ipc=cri.NamespaceMode.NODE
    )
    spec = spec_for(
        pod(security_context=cri.LinuxSandboxSecurityContext(namespace_options=options))
    )
    assert set(namespaces(spec)) == {"mount"}
    shm = next(m for m in spec["mounts"] if m["destination"] == "/dev/shm")
    assert shm["source"] == "/dev/shm"


def test_host_network_keeps_only_a_requested_hostname() -> None:
    """As containerd: the pod's hostname stays in the spec (runc then refuses it
    without a UTS namespace); none requested, none set."""
    options = cri.NamespaceOption(network=cri.NamespaceMode.NODE)
    config = pod(security_context=cri.LinuxSandboxSecurityContext(namespace_options=options))
    assert spec_for(config)["hostname"] == "web-0"
    unnamed = build_sandbox_spec(
        SandboxSpecInput(
            sandbox_id="abc",
            config=config,
            image_config=PAUSE_CONFIG,
            netns_path="",
            shm_path="/state/sandboxes/abc/shm",
            hostname="",
            cgroup_driver="cgroupfs",
            oom_score_adj_floor=None,
        )
    )
    assert "hostname" not in unnamed
    assert "uts" not in namespaces(unnamed)


def test_privileged_pod_mounts_sysfs_read_write() -> None:
    def sysfs(spec: dict) -> list[str]:  # type: ignore[type-arg]
        return next(m["options"] for m in spec["mounts"] if m["destination"] == "/sys")

    assert "ro" in sysfs(spec_for(pod()))
    privileged = spec_for(pod(security_context=cri.LinuxSandboxSecurityContext(privileged=True)))
    assert "rw" in sysfs(privileged) and "ro" not in sysfs(privileged)


def test_unprivileged_port_and_icmp_sysctls_as_containerd_2() -> None:
    """containerd 2.x's defaults: set on pod networks unless the pod sets them; no
    ping range in a user namespace (its gids), none of either on the host network."""
    own = spec_for(pod(sysctls={"net.ipv4.ip_unprivileged_port_start": "1024"}))
    assert own["linux"]["sysctl"] == {
        "net.ipv4.ip_unprivileged_port_start": "1024",
        "net.ipv4.ping_group_range": "0 2147483647",
    }
    in_userns = build_sandbox_spec(
        SandboxSpecInput(
            sandbox_id="abc",
            config=pod(),
            image_config=PAUSE_CONFIG,
            netns_path="/var/run/netns/x",
            shm_path="/dev/shm",
            hostname="h",
            cgroup_driver="cgroupfs",
            oom_score_adj_floor=None,
            host_in_userns=True,
        )
    )
    assert in_userns["linux"]["sysctl"] == {"net.ipv4.ip_unprivileged_port_start": "0"}
    options = cri.NamespaceOption(network=cri.NamespaceMode.NODE)
    host = spec_for(
        pod(security_context=cri.LinuxSandboxSecurityContext(namespace_options=options))
    )
    assert "sysctl" not in host["linux"]


def test_running_in_user_namespace(tmp_path: Path) -> None:
    uid_map = tmp_path / "uid_map"
    uid_map.write_text("         0          0 4294967295\n")
    assert not running_in_user_namespace(uid_map)
    uid_map.write_text("         0     100000      65536\n")
    assert running_in_user_namespace(uid_map)


def test_masked_paths_are_containerd_2s_with_cpu_thermal_throttle(tmp_path: Path) -> None:
    assert spec_for(pod())["linux"]["maskedPaths"][:3] == [
        "/proc/acpi",
        "/proc/asound",
        "/proc/interrupts",
    ]
    (tmp_path / "possible").write_text("0-2,5\n")
    for cpu in (1, 5, 7):  # cpu7 is not a possible one
        (tmp_path / f"cpu{cpu}" / "thermal_throttle").mkdir(parents=True)
    throttled = (f"{tmp_path}/cpu1/thermal_throttle", f"{tmp_path}/cpu5/thermal_throttle")
    assert masked_paths(tmp_path) == (*MASKED_PATHS, *throttled)


def test_network_sysctls_refused_on_host_network() -> None:
    options = cri.NamespaceOption(network=cri.NamespaceMode.NODE)
    config = pod(
        security_context=cri.LinuxSandboxSecurityContext(namespace_options=options),
        sysctls={"net.core.somaxconn": "1024"},
    )
    with pytest.raises(SpecError, match=r"net\.core\.somaxconn"):
        spec_for(config)


def test_oom_score_adj_is_clamped_where_the_host_refuses_negative_values() -> None:
    assert spec_for(pod())["process"]["oomScoreAdj"] == -998
    assert spec_for(pod(), floor=0)["process"]["oomScoreAdj"] == 0


def test_security_context_user_overrides_image_user() -> None:
    context = cri.LinuxSandboxSecurityContext(
        run_as_user=cri.Int64Value(1000), run_as_group=cri.Int64Value(3000), supplemental_groups=[4]
    )
    spec = spec_for(pod(security_context=context))
    assert spec["process"]["user"] == {"uid": 1000, "gid": 3000, "additionalGids": [3000, 4]}


def test_pod_annotations_cannot_impersonate_the_runtime() -> None:
    """A pod naming another pod's sandbox id or a systemd property gets neither into the
    pause container's spec; an allow-listed key does, below the runtime's own."""
    hostile = {
        "io.kubernetes.cri.sandbox-id": "someone-elses-pod",
        "io.kubernetes.cri.container-type": "container",
        "org.systemd.property.TasksMax": "1",
        "io.katacontainers.config.x": "y",
    }
    config = replace(pod(), annotations=hostile)
    spec = spec_for(config)
    assert spec["annotations"]["io.kubernetes.cri.sandbox-id"] == "abc"
    assert spec["annotations"]["io.kubernetes.cri.container-type"] == "sandbox"
    assert not any(k.startswith(("org.systemd", "io.katacontainers")) for k in spec["annotations"])
    allowed = build_sandbox_spec(
        SandboxSpecInput(
            sandbox_id="abc",
            config=config,
            image_config=PAUSE_CONFIG,
            netns_path="/var/run/netns/x",
            shm_path="/dev/shm",
            hostname="h",
            cgroup_driver="cgroupfs",
            oom_score_adj_floor=None,
            pod_annotations=("io.katacontainers.*", "io.kubernetes.cri.*"),
        )
    )["annotations"]
    assert allowed["io.katacontainers.config.x"] == "y"
    assert allowed["io.kubernetes.cri.sandbox-id"] == "abc"
    assert allowed["io.kubernetes.cri.container-type"] == "sandbox"
