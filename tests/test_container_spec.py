"""An app container's OCI spec from CRI configs, checked rule by rule (no runc needed)."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from cri_shim.gen.runtime import v1 as cri
from cri_shim.oci import seccomp
from cri_shim.oci.annotations import glob_match
from cri_shim.oci.capabilities import CAPABILITY_NAMES
from cri_shim.oci.container_spec import (
    ContainerSpecInput,
    SandboxView,
    apply_linux_resources,
    build_container_spec,
    devices_from_path,
    ensure_mount_source,
    merge_env,
)
from cri_shim.oci.defaults import DEFAULT_CAPABILITIES
from cri_shim.oci.errors import SpecError
from cri_shim.oci.users import resolve_user

Spec = dict[str, Any]

PASSWD = """root:x:0:0:root:/root:/bin/sh
# a comment
daemon:x:1:1:daemon:/usr/sbin:/bin/false
www:x:1000:1000:www:/home/www:/bin/sh
app:x:2000:2001::/app:/bin/sh
broken line
"""
GROUP = """root:x:0:
wheel:x:10:root
www:x:1000:www
appgroup:x:2001:
audio:x:29:app,www
video:x:44:app
"""
IMAGE = {"Entrypoint": ["/entry"], "Cmd": ["cmd-arg"], "Env": ["PATH=/image/bin", "A=1"]}
# Everything but CAP_SYS_RESOURCE, like this test VM.
HOST_CAPS = tuple(c for c in CAPABILITY_NAMES if c != "CAP_SYS_RESOURCE")

POD = cri.PodSandboxConfig(
    metadata=cri.PodSandboxMetadata(name="web-0", namespace="prod", uid="pod-uid"),
    hostname="web-0",
    linux=cri.LinuxPodSandboxConfig(cgroup_parent="/kubepods/burstable/podpod-uid"),
)
SANDBOX = SandboxView(
    sandbox_id="sb1",
    pid=4242,
    config=POD,
    hostname_path="/state/sb1/hostname",
    hosts_path="/state/sb1/hosts",
    resolv_conf_path="/state/sb1/resolv.conf",
    shm_path="/state/sb1/shm",
)


def make_fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "fifo.json")
    return tmp / "fifo.json"


def fake_devices(host: str, inside: str) -> list[dict[str, Any]]:
    """Stands in for stat(2): /dev/fuse is c 10:229; /dev/snd holds two devices."""
    table = {
        "/dev/fuse": [("c", 10, 229, "/dev/fuse")],
        "/dev/snd": [("c", 116, 1, "/dev/snd/seq"), ("c", 116, 33, "/dev/snd/timer")],
        "/dev": [("c", 1, 3, "/dev/null"), ("c", 10, 229, "/dev/fuse"), ("b", 7, 0, "/dev/loop0")],
    }
    if host not in table:
        raise FileNotFoundError(2, "No such file or directory", host)
    found = []
    for kind, major, minor, path in table[host]:
        if inside:
            path = inside if host != "/dev/snd" else inside + path.removeprefix(host)
        found.append(
            {"path": path, "type": kind, "major": major, "minor": minor, "fileMode": 0o666}
        )
    return found


def container(
    *,
    command: list[str] | None = None,
    args: list[str] | None = None,
    security: cri.LinuxContainerSecurityContext | None = None,
    resources: cri.LinuxContainerResources | None = None,
    **fields: Any,
) -> cri.ContainerConfig:
    return cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="app", attempt=1),
        image=cri.ImageSpec(image="registry.example/app:1"),
        command=command or [],
        args=args or [],
        linux=cri.LinuxContainerConfig(resources=resources, security_context=security),
        **fields,
    )


def build(
    config: cri.ContainerConfig | None = None,
    *,
    sandbox: SandboxView = SANDBOX,
    image: dict[str, Any] | None = None,
    **overrides: Any,
) -> Spec:
    inputs = ContainerSpecInput(
        container_id="ctr1",
        config=config or container(),
        sandbox=sandbox,
        image_config=IMAGE if image is None else image,
        image_name="registry.example/app:1",
        passwd=PASSWD,
        group=GROUP,
        cgroup_driver="cgroupfs",
        oom_score_adj_floor=None,
        seccomp_localhost_root=None,
        apparmor_available=False,
        recursive_readonly_supported=True,
        all_capabilities=HOST_CAPS,
        cgroup_v2=False,
        swap_available=True,
        device_lookup=fake_devices,
    )
    return build_container_spec(replace(inputs, **overrides))


def pod_with(**security: Any) -> SandboxView:
    assert POD.linux is not None
    linux = replace(POD.linux, security_context=cri.LinuxSandboxSecurityContext(**security))
    return replace(SANDBOX, config=replace(POD, linux=linux))


def namespaces(spec: Spec) -> dict[str, str | None]:
    return {n["type"]: n.get("path") for n in spec["linux"]["namespaces"]}


def mount_at(spec: Spec, destination: str) -> dict[str, Any]:
    return next(m for m in spec["mounts"] if m["destination"] == destination)


def ns_options(**modes: Any) -> cri.LinuxContainerSecurityContext:
    return cri.LinuxContainerSecurityContext(namespace_options=cri.NamespaceOption(**modes))


def legacy_context(**fields: Any) -> cri.LinuxContainerSecurityContext:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cri.LinuxContainerSecurityContext(**fields)


# ------------------------------------------------------------------- process


@pytest.mark.parametrize(
    ("command", "args", "image", "expected"),
    [
        (["/bin/app"], ["-v"], IMAGE, ["/bin/app", "-v"]),
        (["/bin/app"], [], IMAGE, ["/bin/app"]),  # a command drops the image's CMD
        ([], ["-v"], IMAGE, ["/entry", "-v"]),  # args replace CMD only
        ([], [], IMAGE, ["/entry", "cmd-arg"]),
        ([], [], {"Cmd": ["sh"]}, ["sh"]),
        ([], [], {"Entrypoint": [""], "Cmd": ["sh"]}, ["sh"]),  # ENTRYPOINT [""] resets it
        ([], ["x"], {}, ["x"]),
    ],
)
def test_process_args(
    command: list[str], args: list[str], image: dict[str, Any], expected: list[str]
) -> None:
    spec = build(container(command=command, args=args), image=image)
    assert spec["process"]["args"] == expected


def test_no_command_at_all_is_refused() -> None:
    with pytest.raises(SpecError, match="no command specified"):
        build(image={"Env": []})


def test_env_image_then_config_overrides_by_key() -> None:
    config = container(
        envs=[cri.KeyValue(key="A", value=b"2"), cri.KeyValue(key="B", value=b"x=y")]
    )
    assert build(config)["process"]["env"] == ["PATH=/image/bin", "HOSTNAME=web-0", "A=2", "B=x=y"]
    no_hostname = replace(SANDBOX, config=replace(POD, hostname=""))
    env = build(config, sandbox=no_hostname, node_hostname="node-1")["process"]["env"]
    assert "HOSTNAME=node-1" in env


@pytest.mark.parametrize(
    ("base", "overrides", "expected"),
    [
        (["A=1", "B=2"], ["B=3", "C=4"], ["A=1", "B=3", "C=4"]),
        (["A=1", "B=2"], ["A"], ["B=2"]),  # no '=': unset, as containerd does
        (["A=1"], ["A", "A=5"], ["A=5"]),
    ],
)
def test_merge_env(base: list[str], overrides: list[str], expected: list[str]) -> None:
    assert merge_env(base, overrides) == expected


def test_bad_env_name_is_refused() -> None:
    with pytest.raises(SpecError, match="environment variable name"):
        build(container(envs=[cri.KeyValue(key="", value=b"x")]))
    with pytest.raises(SpecError, match="environment variable name"):
        build(container(envs=[cri.KeyValue(key="A\x00B", value=b"x")]))


def test_nul_bytes_a_process_cannot_take_are_refused_at_create() -> None:
    """runc fails such a container only at start, with an UNKNOWN; found by the fuzz test."""
    with pytest.raises(SpecError, match="NUL byte"):
        build(container(envs=[cri.KeyValue(key="A", value=b"x\x00y")]))
    with pytest.raises(SpecError, match="NUL byte"):
        build(container(command=["/bin/sh"], args=["-c", "echo\x00"]))


@pytest.mark.parametrize(
    ("working_dir", "image", "expected"),
    [("/work", IMAGE, "/work"), ("", {**IMAGE, "WorkingDir": "/srv"}, "/srv"), ("", IMAGE, "/")],
)
def test_cwd(working_dir: str, image: dict[str, Any], expected: str) -> None:
    assert build(container(working_dir=working_dir), image=image)["process"]["cwd"] == expected


def test_relative_cwd_is_refused() -> None:
    with pytest.raises(SpecError, match="absolute"):
        build(container(working_dir="work"))


def test_terminal_rlimits_and_flags() -> None:
    spec = build(container(tty=True, stdin=True))
    assert spec["process"]["terminal"] is True
    assert "rlimits" not in spec["process"]  # containerd strips the OCI defaults
    assert spec["process"]["noNewPrivileges"] is False
    assert spec["root"] == {"path": "rootfs", "readonly": False}
    secure = build(
        container(
            security=cri.LinuxContainerSecurityContext(no_new_privs=True, readonly_rootfs=True)
        )
    )
    assert secure["process"]["noNewPrivileges"] is True
    assert secure["root"]["readonly"] is True
    assert "terminal" not in secure["process"]


# ---------------------------------------------------------------------- users


def ctx(**fields: Any) -> cri.LinuxContainerSecurityContext:
    return cri.LinuxContainerSecurityContext(**fields)


STRICT = cri.SupplementalGroupsPolicy.Strict


@pytest.mark.parametrize(
    ("image_user", "context", "expected"),
    [
        ("", None, (0, 0, (0, 10), "root")),  # root is listed in wheel
        ("1000", None, (1000, 1000, (29, 1000), "www")),
        ("www", None, (1000, 1000, (29, 1000), "www")),
        ("1000:44", None, (1000, 44, (29, 44), "www")),
        ("www:video", None, (1000, 44, (29, 44), "www")),
        ("app", None, (2000, 2001, (29, 44, 2001), "app")),
        ("4321", None, (4321, 0, (0,), "")),  # unknown uid: gid 0, no groups
        ("4321:4321", None, (4321, 4321, (4321,), "")),
        ("www", ctx(run_as_user=cri.Int64Value(2000)), (2000, 2001, (29, 44, 2001), "app")),
        ("www", ctx(run_as_username="app"), (2000, 2001, (29, 44, 2001), "app")),
        (
            "www",
            ctx(run_as_user=cri.Int64Value(1000), run_as_username="app"),
            (1000, 1000, (29, 1000), "www"),
        ),
        ("app:video", ctx(run_as_user=cri.Int64Value(2000)), (2000, 2001, (29, 44, 2001), "app")),
        (
            "",
            ctx(run_as_user=cri.Int64Value(1000), run_as_group=cri.Int64Value(3000)),
            (1000, 3000, (29, 3000), "www"),
        ),
        (
            "",
            ctx(run_as_user=cri.Int64Value(1000), supplemental_groups=[5000, 29, 5000]),
            (1000, 1000, (29, 1000, 5000), "www"),
        ),
        (
            "",
            ctx(
                run_as_user=cri.Int64Value(1000),
                supplemental_groups=[5000],
                supplemental_groups_policy=STRICT,
            ),
            (1000, 1000, (1000, 5000), "www"),
        ),
        ("app", ctx(supplemental_groups_policy=STRICT), (2000, 2001, (2001,), "app")),
    ],
)
def test_resolve_user(
    image_user: str,
    context: cri.LinuxContainerSecurityContext | None,
    expected: tuple[int, int, tuple[int, ...], str],
) -> None:
    user = resolve_user(image_user=image_user, context=context, passwd=PASSWD, group=GROUP)
    assert (user.uid, user.gid, user.additional_gids, user.username) == expected


@pytest.mark.parametrize(
    ("image_user", "context", "passwd", "match"),
    [
        ("nobody", None, PASSWD, "unable to find user nobody"),
        ("www:nogroup", None, PASSWD, "unable to find group nogroup"),
        ("www", None, None, "no /etc/passwd"),
        ("", ctx(run_as_username="ghost"), PASSWD, "unable to find user ghost"),
        ("", ctx(run_as_group=cri.Int64Value(5)), PASSWD, "without run_as_user"),
        ("a:b:c", None, PASSWD, "invalid user"),
        ("", ctx(run_as_user=cri.Int64Value(-1)), PASSWD, "out of range"),
    ],
)
def test_resolve_user_errors(
    image_user: str,
    context: cri.LinuxContainerSecurityContext | None,
    passwd: str | None,
    match: str,
) -> None:
    with pytest.raises(SpecError, match=match):
        resolve_user(image_user=image_user, context=context, passwd=passwd, group=GROUP)


def test_numeric_user_needs_no_passwd() -> None:
    user = resolve_user(image_user="1234:5678", context=None, passwd=None, group=None)
    assert (user.uid, user.gid, user.additional_gids) == (1234, 5678, (5678,))


def test_user_lands_in_the_spec() -> None:
    spec = build(container(security=ctx(run_as_username="app", supplemental_groups=[7])))
    assert spec["process"]["user"] == {
        "uid": 2000,
        "gid": 2001,
        "additionalGids": [7, 29, 44, 2001],
    }


# ----------------------------------------------------------------- namespaces


def test_pod_namespaces_are_joined_through_the_sandbox_process() -> None:
    assert namespaces(build()) == {
        "pid": "/proc/4242/ns/pid",  # no namespace options: POD, as containerd reads it
        "ipc": "/proc/4242/ns/ipc",
        "uts": "/proc/4242/ns/uts",
        "network": "/proc/4242/ns/net",
        "mount": None,
    }


@pytest.mark.parametrize(
    ("mode", "target_pid", "expected"),
    [
        (cri.NamespaceMode.POD, None, "/proc/4242/ns/pid"),
        (cri.NamespaceMode.CONTAINER, None, None),
        (cri.NamespaceMode.TARGET, 777, "/proc/777/ns/pid"),
    ],
)
def test_pid_namespace_modes(
    mode: cri.NamespaceMode, target_pid: int | None, expected: str | None
) -> None:
    spec = build(container(security=ns_options(pid=mode, target_id="other")), target_pid=target_pid)
    assert namespaces(spec)["pid"] == expected


def test_host_pid_drops_the_namespace() -> None:
    spec = build(container(security=ns_options(pid=cri.NamespaceMode.NODE)))
    assert "pid" not in namespaces(spec)


def test_target_pid_namespace_needs_the_target() -> None:
    with pytest.raises(SpecError, match="TARGET"):
        build(container(security=ns_options(pid=cri.NamespaceMode.TARGET, target_id="other")))


def test_sandbox_without_process_cannot_be_joined() -> None:
    with pytest.raises(SpecError, match="no running process"):
        build(sandbox=replace(SANDBOX, pid=0))


def test_host_network_and_ipc_pods() -> None:
    options = cri.NamespaceOption(network=cri.NamespaceMode.NODE, ipc=cri.NamespaceMode.NODE)
    spec = build(sandbox=pod_with(namespace_options=options))
    assert set(namespaces(spec)) == {"pid", "mount"}
    assert mount_at(spec, "/dev/shm")["source"] == "/dev/shm"


def test_cgroup_namespace_only_on_v2_unprivileged() -> None:
    assert "cgroup" not in namespaces(build())
    assert namespaces(build(cgroup_v2=True))["cgroup"] is None
    privileged = container(security=ctx(privileged=True))
    assert "cgroup" not in namespaces(
        build(privileged, sandbox=pod_with(privileged=True), cgroup_v2=True)
    )


def userns_pod(host_id: int = 100000, **modes: Any) -> cri.NamespaceOption:
    line = [cri.IdMapping(container_id=0, host_id=host_id, length=65536)]
    return cri.NamespaceOption(
        userns_options=cri.UserNamespace(mode=cri.NamespaceMode.POD, uids=line, gids=line),
        **modes,
    )


def test_pod_user_namespace_is_joined_with_its_mappings() -> None:
    options = userns_pod()
    data = bind("/data", uid_mappings=[cri.IdMapping(container_id=0, host_id=100000, length=65536)])
    spec = build(
        container(security=ctx(namespace_options=options), mounts=[data]),
        sandbox=pod_with(namespace_options=options),
    )
    assert namespaces(spec)["user"] == f"/proc/{SANDBOX.pid}/ns/user"
    mapping = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    assert spec["linux"]["uidMappings"] == mapping
    assert spec["linux"]["gidMappings"] == mapping
    assert mount_at(spec, "/data")["uidMappings"] == mapping
    assert "gidMappings" not in mount_at(spec, "/data")
    assert mount_at(spec, "/sys")["type"] == "sysfs"


def test_user_namespace_on_the_host_network_binds_sys() -> None:
    options = userns_pod(network=cri.NamespaceMode.NODE)
    spec = build(
        container(security=ctx(namespace_options=options)),
        sandbox=pod_with(namespace_options=options),
    )
    assert mount_at(spec, "/sys")["type"] == "bind"
    assert "rro" in mount_at(spec, "/sys")["options"]


@pytest.mark.parametrize(
    ("userns", "message"),
    [
        (cri.UserNamespace(mode=cri.NamespaceMode.CONTAINER), "mode CONTAINER is not supported"),
        (cri.UserNamespace(mode=cri.NamespaceMode.TARGET), "mode TARGET is not supported"),
        (cri.UserNamespace(mode=cri.NamespaceMode.POD), "needs one uid and one gid mapping"),
        (
            cri.UserNamespace(
                mode=cri.NamespaceMode.POD,
                uids=[cri.IdMapping(container_id=1, host_id=1000, length=10)],
                gids=[cri.IdMapping(container_id=0, host_id=1000, length=10)],
            ),
            "container id 0 must be mapped",
        ),
        (
            cri.UserNamespace(
                mode=cri.NamespaceMode.POD,
                uids=[
                    cri.IdMapping(container_id=0, host_id=1000, length=10),
                    cri.IdMapping(container_id=10, host_id=2000, length=10),
                ],
                gids=[cri.IdMapping(container_id=0, host_id=1000, length=10)],
            ),
            "only one mapping line",
        ),
        (
            cri.UserNamespace(
                mode=cri.NamespaceMode.NODE,
                uids=[cri.IdMapping(container_id=0, host_id=1000, length=10)],
            ),
            "mode NODE takes no mappings",
        ),
    ],
)
def test_invalid_user_namespaces_are_refused(userns: cri.UserNamespace, message: str) -> None:
    options = cri.NamespaceOption(userns_options=userns)
    with pytest.raises(SpecError, match=message):
        build(container(security=ctx(namespace_options=options)))


def test_container_user_namespace_must_match_its_pods() -> None:
    with pytest.raises(SpecError, match="differ from its pod's"):
        build(
            container(security=ctx(namespace_options=userns_pod(200000))),
            sandbox=pod_with(namespace_options=userns_pod(100000)),
        )
    with pytest.raises(SpecError, match="needs a pod user namespace"):
        build(
            container(
                mounts=[
                    bind("/data", uid_mappings=[cri.IdMapping(container_id=0, host_id=1, length=1)])
                ]
            )
        )


# --------------------------------------------------------------------- mounts


def bind(container_path: str, host_path: str = "/host/data", **fields: Any) -> cri.Mount:
    return cri.Mount(container_path=container_path, host_path=host_path, **fields)


def test_sandbox_files_and_cri_mounts() -> None:
    spec = build(container(mounts=[bind("/data/cache", "/h/cache"), bind("/data", "/h/data")]))
    binds = [(m["destination"], m["source"], m["options"]) for m in spec["mounts"][6:]]
    # Parents before children; sandbox files after CRI mounts of the same depth.
    assert binds == [
        ("/data", "/h/data", ["rbind", "rprivate", "rw"]),
        ("/data/cache", "/h/cache", ["rbind", "rprivate", "rw"]),
        ("/etc/hostname", "/state/sb1/hostname", ["rbind", "rprivate", "rw"]),
        ("/etc/hosts", "/state/sb1/hosts", ["rbind", "rprivate", "rw"]),
        ("/etc/resolv.conf", "/state/sb1/resolv.conf", ["rbind", "rprivate", "rw"]),
        ("/dev/shm", "/state/sb1/shm", ["rbind", "rprivate", "rw"]),
    ]
    assert [m["destination"] for m in spec["mounts"][:6]] == [
        "/proc", "/dev", "/dev/pts", "/dev/mqueue", "/sys", "/sys/fs/cgroup",
    ]  # fmt: skip


def test_readonly_rootfs_makes_pod_files_readonly_but_not_shm() -> None:
    spec = build(container(security=ctx(readonly_rootfs=True)))
    assert mount_at(spec, "/etc/hosts")["options"][-1] == "ro"
    assert mount_at(spec, "/etc/resolv.conf")["options"][-1] == "ro"
    assert mount_at(spec, "/dev/shm")["options"][-1] == "rw"


def test_cri_mount_replaces_sandbox_file_and_default_mount() -> None:
    spec = build(container(mounts=[bind("/etc/hosts/", "/custom/hosts"), bind("/dev", "/dev")]))
    hosts = [m for m in spec["mounts"] if m["destination"].rstrip("/") == "/etc/hosts"]
    assert [m["source"] for m in hosts] == ["/custom/hosts"]
    # A host /dev replaces the tmpfs /dev and the default mounts under it; the pod's
    # /dev/shm still goes on top.
    dev = [m["destination"] for m in spec["mounts"] if m["destination"].startswith("/dev")]
    assert dev == ["/dev", "/dev/shm"]


@pytest.mark.parametrize(
    ("propagation", "option", "rootfs"),
    [
        (cri.MountPropagation.PROPAGATION_PRIVATE, "rprivate", None),
        (cri.MountPropagation.PROPAGATION_HOST_TO_CONTAINER, "rslave", "rslave"),
        (cri.MountPropagation.PROPAGATION_BIDIRECTIONAL, "rshared", "rshared"),
    ],
)
def test_mount_propagation(
    propagation: cri.MountPropagation, option: str, rootfs: str | None
) -> None:
    spec = build(container(mounts=[bind("/data", propagation=propagation, readonly=True)]))
    assert mount_at(spec, "/data")["options"] == ["rbind", option, "ro"]
    assert spec["linux"].get("rootfsPropagation") == rootfs


def test_shared_rootfs_propagation_wins_over_slave() -> None:
    mounts = [
        bind("/a", propagation=cri.MountPropagation.PROPAGATION_BIDIRECTIONAL),
        bind("/b", propagation=cri.MountPropagation.PROPAGATION_HOST_TO_CONTAINER),
    ]
    assert build(container(mounts=mounts))["linux"]["rootfsPropagation"] == "rshared"


def test_recursive_readonly_mount() -> None:
    spec = build(container(mounts=[bind("/data", readonly=True, recursive_read_only=True)]))
    assert mount_at(spec, "/data")["options"] == ["rbind", "rprivate", "rro"]


@pytest.mark.parametrize(
    ("mount", "rro_supported", "match"),
    [
        (bind("data"), True, "must be an absolute path"),
        (bind("/data/../etc"), True, "must not contain '..'"),
        (bind("/data", "relative/dir"), True, "must be an absolute path"),
        (bind("/data", "/host/../etc"), True, "must not contain '..'"),
        (bind("/data", ""), True, "must not be empty"),
        (bind("/data", recursive_read_only=True), True, "conflicts with RW mount"),
        (bind("/data", readonly=True, recursive_read_only=True), False, "RRO is not supported"),
        (
            bind(
                "/data",
                readonly=True,
                recursive_read_only=True,
                propagation=cri.MountPropagation.PROPAGATION_HOST_TO_CONTAINER,
            ),
            True,
            "needs private propagation, got 'PROPAGATION_HOST_TO_CONTAINER'",
        ),
        (
            cri.Mount(container_path="/img", image=cri.ImageSpec(image="registry.example/data")),
            True,
            "image volume mount",
        ),
        (
            bind("/data", uid_mappings=[cri.IdMapping(host_id=1, container_id=0, length=1)]),
            True,
            "id-mapped",
        ),
    ],
)
def test_mount_validation(mount: cri.Mount, rro_supported: bool, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        build(container(mounts=[mount]), recursive_readonly_supported=rro_supported)


def test_mount_sources_can_be_resolved() -> None:
    spec = build(
        container(mounts=[bind("/data", "/link")]),
        resolve_mount_source=lambda path: "/real" + path,
    )
    assert mount_at(spec, "/data")["source"] == "/real/link"
    assert mount_at(spec, "/etc/hosts")["source"] == "/real/state/sb1/hosts"


def test_ensure_mount_source_creates_and_resolves(tmp_path: Path) -> None:
    missing = tmp_path / "new" / "dir"
    assert ensure_mount_source(str(missing)) == str(missing)
    assert missing.is_dir()
    (tmp_path / "link").symlink_to(missing)
    assert ensure_mount_source(str(tmp_path / "link")) == str(missing)


def test_image_volumes_are_not_mounted() -> None:
    spec = build(image={**IMAGE, "Volumes": {"/var/lib/data": {}}})
    assert all(m["destination"] != "/var/lib/data" for m in spec["mounts"])


# -------------------------------------------------------------------- devices


def test_devices_become_nodes_and_cgroup_rules() -> None:
    devices = [
        cri.Device(host_path="/dev/fuse", container_path="/dev/myfuse", permissions="rw"),
        cri.Device(host_path="/dev/snd", container_path="/dev/sound", permissions="mrw"),
    ]
    spec = build(container(devices=devices))
    assert [(d["path"], d["major"], d["minor"]) for d in spec["linux"]["devices"]] == [
        ("/dev/myfuse", 10, 229),
        ("/dev/sound/seq", 116, 1),
        ("/dev/sound/timer", 116, 33),
    ]
    assert spec["linux"]["resources"]["devices"] == [
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "c", "major": 10, "minor": 229, "access": "rw"},
        {"allow": True, "type": "c", "major": 116, "minor": 1, "access": "mrw"},
        {"allow": True, "type": "c", "major": 116, "minor": 33, "access": "mrw"},
    ]


@pytest.mark.parametrize(
    ("device", "match"),
    [
        (cri.Device(host_path="/dev/fuse", container_path="/dev/f", permissions="rwx"), "r, w, m"),
        (cri.Device(host_path="/dev/missing", container_path="/dev/m"), "No such file"),
        (cri.Device(host_path="/dev/fuse", container_path="dev/f"), "absolute"),
    ],
)
def test_bad_devices(device: cri.Device, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        build(container(devices=[device]))


def test_real_device_lookup_stats_the_node() -> None:
    spec = build(
        container(devices=[cri.Device(host_path="/dev/null", container_path="/dev/nil")]),
        device_lookup=devices_from_path,  # the default: real stat(2)
    )
    assert spec["linux"]["devices"][0]["path"] == "/dev/nil"
    assert (spec["linux"]["devices"][0]["major"], spec["linux"]["devices"][0]["minor"]) == (1, 3)


# --------------------------------------------------------------- capabilities


def capability_sets(spec: Spec) -> dict[str, list[str]]:
    caps: dict[str, list[str]] = spec["process"]["capabilities"]
    return caps


# containerd's pkg/oci defaultUnixCaps(), in its order: written here, not taken
# from the product, so a change to the product's list shows as a failure.
CONTAINERD_DEFAULT_CAPS = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]


@pytest.mark.parametrize(
    ("add", "drop", "expected"),
    [
        ([], [], CONTAINERD_DEFAULT_CAPS),
        (["NET_ADMIN", "cap_sys_time"], ["CHOWN", "CAP_KILL"], [
            c for c in CONTAINERD_DEFAULT_CAPS if c not in ("CAP_CHOWN", "CAP_KILL")
        ] + ["CAP_NET_ADMIN", "CAP_SYS_TIME"]),
        (["ALL"], [], list(HOST_CAPS)),
        (["all"], ["NET_RAW"], [c for c in HOST_CAPS if c != "CAP_NET_RAW"]),
        ([], ["ALL"], []),
        (["NET_BIND_SERVICE"], ["ALL"], ["CAP_NET_BIND_SERVICE"]),
    ],
)  # fmt: skip
def test_capabilities_add_drop(add: list[str], drop: list[str], expected: list[str]) -> None:
    capability = cri.Capability(add_capabilities=add, drop_capabilities=drop)
    sets = capability_sets(build(container(security=ctx(capabilities=capability))))
    assert sets == {"bounding": expected, "effective": expected, "permitted": expected}


def test_ambient_capabilities_fill_every_set() -> None:
    capability = cri.Capability(drop_capabilities=["ALL"], add_ambient_capabilities=["NET_ADMIN"])
    sets = capability_sets(build(container(security=ctx(capabilities=capability))))
    assert sets == {name: ["CAP_NET_ADMIN"] for name in sets}
    assert set(sets) == {"bounding", "effective", "permitted", "inheritable", "ambient"}


# ----------------------------------------------------------------- privileged


def test_privileged_container_needs_a_privileged_pod() -> None:
    with pytest.raises(SpecError, match="no privileged container allowed in sandbox"):
        build(container(security=ctx(privileged=True)))


def test_privileged_container() -> None:
    security = ctx(
        privileged=True,
        masked_paths=["/proc/kcore"],
        capabilities=cri.Capability(drop_capabilities=["ALL"]),
        seccomp=cri.SecurityProfile(profile_type=cri.SecurityProfileProfileType.RuntimeDefault),
    )
    devices = [cri.Device(host_path="/dev/fuse", container_path="/dev/myfuse", permissions="r")]
    spec = build(
        container(security=security, devices=devices),
        sandbox=pod_with(privileged=True),
        apparmor_available=True,
    )
    assert capability_sets(spec)["bounding"] == list(HOST_CAPS)
    linux = spec["linux"]
    assert "maskedPaths" not in linux and "readonlyPaths" not in linux
    assert "seccomp" not in linux and "apparmorProfile" not in spec["process"]
    assert linux["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    assert [d["path"] for d in linux["devices"]] == [
        "/dev/myfuse", "/dev/null", "/dev/fuse", "/dev/loop0",
    ]  # fmt: skip
    assert mount_at(spec, "/sys")["options"][-1] == "rw"
    assert mount_at(spec, "/sys/fs/cgroup")["options"][-1] == "rw"


# ------------------------------------------------------------ masked paths


def test_masked_and_readonly_paths_are_exactly_the_configured_ones() -> None:
    # Unset (kubelet's procMount: Unmasked, or crictl): none, as with containerd.
    spec = build(container(security=ctx()))
    assert "maskedPaths" not in spec["linux"] and "readonlyPaths" not in spec["linux"]
    spec = build(container(security=ctx(masked_paths=["/proc/x"], readonly_paths=["/proc/y"])))
    assert spec["linux"]["maskedPaths"] == ["/proc/x"]
    assert spec["linux"]["readonlyPaths"] == ["/proc/y"]


# -------------------------------------------------------------------- seccomp


def runtime_default() -> cri.SecurityProfile:
    return cri.SecurityProfile(profile_type=cri.SecurityProfileProfileType.RuntimeDefault)


def rules_for(profile: Spec, name: str) -> list[dict[str, Any]]:
    return [r for r in profile["syscalls"] if name in r["names"]]


def test_runtime_default_profile_shape() -> None:
    profile = seccomp.runtime_default_profile(DEFAULT_CAPABILITIES, machine="x86_64")
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert profile["defaultErrnoRet"] == 1
    assert profile["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    assert len(profile["syscalls"][0]["names"]) > 300
    for denied in ("mount", "unshare", "keyctl", "add_key", "bpf", "reboot", "kexec_load"):
        assert not rules_for(profile, denied), denied
    assert rules_for(profile, "chroot")  # CAP_SYS_CHROOT is a default capability
    assert rules_for(profile, "arch_prctl")
    (clone,) = rules_for(profile, "clone")
    assert clone["args"] == [
        {"index": 0, "value": 0x7E020000, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}
    ]
    (clone3,) = rules_for(profile, "clone3")
    assert clone3 == {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
    (socket,) = rules_for(profile, "socket")
    assert socket["args"] == [{"index": 0, "value": 40, "op": "SCMP_CMP_NE"}]
    personas = {r["args"][0]["value"] for r in rules_for(profile, "personality")}
    assert personas == {0, 8, 0x20000, 0x20008, 0xFFFFFFFF}
    json.dumps(profile)  # plain JSON for config.json


def test_runtime_default_profile_follows_capabilities_and_arch() -> None:
    admin = seccomp.runtime_default_profile(["CAP_SYS_ADMIN"], machine="aarch64")
    assert admin["architectures"] == ["SCMP_ARCH_ARM", "SCMP_ARCH_AARCH64"]
    (clone,) = rules_for(admin, "clone")
    assert "args" not in clone
    assert rules_for(admin, "mount") and rules_for(admin, "set_tls")
    assert all(r["action"] == "SCMP_ACT_ALLOW" for r in rules_for(admin, "clone3"))
    s390 = seccomp.runtime_default_profile([], machine="s390x")
    assert rules_for(s390, "clone")[0]["args"][0]["index"] == 1


def test_seccomp_follows_the_containers_capabilities() -> None:
    add = cri.Capability(add_capabilities=["SYS_ADMIN"])
    spec = build(container(security=ctx(seccomp=runtime_default(), capabilities=add)))
    assert rules_for(spec["linux"]["seccomp"], "mount")


@pytest.mark.parametrize(
    ("profile", "legacy", "confined"),
    [
        (None, "", False),  # unset: unconfined, containerd's default
        (runtime_default(), "", True),
        (cri.SecurityProfile(profile_type=cri.SecurityProfileProfileType.Unconfined), "", False),
        (None, "runtime/default", True),
        (None, "docker/default", True),
        (None, "unconfined", False),
        (
            cri.SecurityProfile(profile_type=cri.SecurityProfileProfileType.Unconfined),
            "runtime/default",  # the field wins over the deprecated string
            False,
        ),
    ],
)  # fmt: skip
def test_seccomp_selection(
    profile: cri.SecurityProfile | None, legacy: str, confined: bool
) -> None:
    security = legacy_context(seccomp=profile, seccomp_profile_path=legacy)
    assert ("seccomp" in build(container(security=security))["linux"]) is confined


def test_seccomp_localhost_profile(tmp_path: Path) -> None:
    profile = {"defaultAction": "SCMP_ACT_LOG", "syscalls": [], "archMap": [], "names": []}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    localhost = cri.SecurityProfile(
        profile_type=cri.SecurityProfileProfileType.Localhost, localhost_ref=str(path)
    )
    spec = build(container(security=ctx(seccomp=localhost)), seccomp_localhost_root=tmp_path)
    assert spec["linux"]["seccomp"] == {"defaultAction": "SCMP_ACT_LOG", "syscalls": []}
    legacy = legacy_context(seccomp_profile_path=f"localhost/{path}")
    assert build(container(security=legacy))["linux"]["seccomp"]["defaultAction"] == "SCMP_ACT_LOG"


@pytest.mark.parametrize(
    ("ref", "content", "root", "match"),
    [
        ("profile.json", "{}", None, "absolute"),
        ("{tmp}/../profile.json", "{}", None, r"'\.\.'"),
        ("{tmp}/missing.json", None, None, "cannot load seccomp profile"),
        ("{tmp}/profile.json", "{not json", None, "not valid JSON"),
        ("{tmp}/profile.json", "[]", None, "JSON object"),
        ("{tmp}/profile.json", "{}", "/var/lib/kubelet/seccomp", "outside the allowed directory"),
    ],
)
def test_seccomp_localhost_errors(
    tmp_path: Path, ref: str, content: str | None, root: str | None, match: str
) -> None:
    if content is not None:
        (tmp_path / "profile.json").write_text(content)
    localhost = cri.SecurityProfile(
        profile_type=cri.SecurityProfileProfileType.Localhost,
        localhost_ref=ref.format(tmp=tmp_path),
    )
    with pytest.raises(SpecError, match=match):
        build(
            container(security=ctx(seccomp=localhost)),
            seccomp_localhost_root=Path(root) if root else None,
        )


@pytest.mark.parametrize(
    ("make", "match"),
    [
        pytest.param(
            make_fifo,
            "not a regular file",
            id="fifo",
        ),
        pytest.param(lambda tmp: Path("/dev/zero"), "not a regular file", id="device"),
        pytest.param(lambda tmp: tmp / "big.json", "at most 1048576", id="too-big"),
    ],
)
def test_seccomp_localhost_profile_must_be_a_small_regular_file(
    tmp_path: Path, make: Callable[[Path], Path], match: str
) -> None:
    """A FIFO would hang CreateContainer and /dev/zero would eat the shim's memory."""
    (tmp_path / "big.json").write_text("{" + " " * (1024 * 1024) + "}")
    localhost = cri.SecurityProfile(
        profile_type=cri.SecurityProfileProfileType.Localhost, localhost_ref=str(make(tmp_path))
    )
    with pytest.raises(SpecError, match=match):
        build(container(security=ctx(seccomp=localhost)), seccomp_localhost_root=None)


@pytest.mark.parametrize(
    ("security", "match"),
    [
        (legacy_context(seccomp_profile_path="bogus"), "invalid seccomp profile 'bogus'"),
        (
            ctx(seccomp=cri.SecurityProfile(localhost_ref="/x.json")),
            "only be set when profile_type is Localhost",
        ),
        (
            ctx(seccomp=cri.SecurityProfile(profile_type=cri.SecurityProfileProfileType.Localhost)),
            "needs localhost_ref",
        ),
    ],
)
def test_seccomp_config_errors(security: cri.LinuxContainerSecurityContext, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        build(container(security=security))


# ------------------------------------------------------------------- apparmor


@pytest.mark.parametrize(
    ("profile", "legacy", "expected"),
    [
        (None, "", "cri-containerd.apparmor.d"),  # containerd's default when enabled
        (runtime_default(), "", "cri-containerd.apparmor.d"),
        (cri.SecurityProfile(profile_type=cri.SecurityProfileProfileType.Unconfined), "", None),
        (None, "unconfined", None),
        (None, "localhost/my-profile", "my-profile"),
        (
            cri.SecurityProfile(
                profile_type=cri.SecurityProfileProfileType.Localhost, localhost_ref="k8s-nginx"
            ),
            "",
            "k8s-nginx",
        ),
    ],
)
def test_apparmor_profile(
    profile: cri.SecurityProfile | None, legacy: str, expected: str | None
) -> None:
    security = legacy_context(apparmor=profile, apparmor_profile=legacy)
    spec = build(container(security=security), apparmor_available=True)
    assert spec["process"].get("apparmorProfile") == expected


def test_apparmor_on_a_host_without_it() -> None:
    assert "apparmorProfile" not in build()["process"]
    unconfined = cri.SecurityProfile(profile_type=cri.SecurityProfileProfileType.Unconfined)
    assert "apparmorProfile" not in build(container(security=ctx(apparmor=unconfined)))["process"]
    for profile in (
        runtime_default(),
        cri.SecurityProfile(
            profile_type=cri.SecurityProfileProfileType.Localhost, localhost_ref="p"
        ),
    ):
        with pytest.raises(SpecError, match="apparmor is not supported"):
            build(container(security=ctx(apparmor=profile)))


# ------------------------------------------------------------------ resources


def test_resources() -> None:
    resources = cri.LinuxContainerResources(
        cpu_period=100000,
        cpu_quota=50000,
        cpu_shares=512,
        cpuset_cpus="0-1",
        cpuset_mems="0",
        memory_limit_in_bytes=256 << 20,
        oom_score_adj=900,
        hugepage_limits=[cri.HugepageLimit(page_size="2MB", limit=4 << 20)],
        unified={"memory.high": "200M"},
    )
    # `unified` needs a cgroup v2 host (test_unified_resources_need_a_cgroup_v2_host).
    spec = build(container(resources=resources), hugetlb_available=True, cgroup_v2=True)
    assert spec["linux"]["resources"] == {
        "devices": [{"allow": False, "access": "rwm"}],
        "cpu": {"period": 100000, "quota": 50000, "shares": 512, "cpus": "0-1", "mems": "0"},
        "memory": {"limit": 256 << 20, "swap": 256 << 20},  # no swap beyond the limit
        "hugepageLimits": [{"pageSize": "2MB", "limit": 4 << 20}],
        "unified": {"memory.high": "200M"},
    }
    assert spec["process"]["oomScoreAdj"] == 900


def test_hugepage_limits_left_out_without_hugetlb_controller() -> None:
    """runc would fail the container (kubelet always sends limits, 0 bytes per
    page size); containerd's tolerate_missing_hugetlb_controller drops them."""
    resources = cri.LinuxContainerResources(
        memory_limit_in_bytes=64 << 20,
        hugepage_limits=[cri.HugepageLimit(page_size="2MB", limit=0)],
    )
    spec = build(container(resources=resources), hugetlb_available=False)
    assert "hugepageLimits" not in spec["linux"]["resources"]
    assert spec["linux"]["resources"]["memory"]["limit"] == 64 << 20


@pytest.mark.parametrize(
    ("swap_limit", "available", "expected"),
    [(0, True, 100), (300, True, 300), (0, False, None), (300, False, None)],
)
def test_swap_limit(swap_limit: int, available: bool, expected: int | None) -> None:
    resources = cri.LinuxContainerResources(
        memory_limit_in_bytes=100, memory_swap_limit_in_bytes=swap_limit
    )
    spec = build(container(resources=resources), swap_available=available)
    assert spec["linux"]["resources"]["memory"].get("swap") == expected


@pytest.mark.parametrize(
    ("requested", "floor", "expected"),
    [(-997, None, -997), (-997, 0, 0), (1000, 0, 1000), (-5000, None, -1000), (5, 10, 10)],
)
def test_oom_score_adj_clamp(requested: int, floor: int | None, expected: int) -> None:
    resources = cri.LinuxContainerResources(oom_score_adj=requested)
    spec = build(container(resources=resources), oom_score_adj_floor=floor)
    assert spec["process"]["oomScoreAdj"] == expected


def test_no_resources_leaves_oom_score_alone() -> None:
    assert "oomScoreAdj" not in build()["process"]


def test_negative_cpu_shares_are_refused() -> None:
    with pytest.raises(SpecError, match="cpu_shares"):
        build(container(resources=cri.LinuxContainerResources(cpu_shares=-1)))


@pytest.mark.parametrize(
    ("driver", "parent", "expected"),
    [
        ("cgroupfs", "/kubepods/burstable/podpod-uid", "/kubepods/burstable/podpod-uid/ctr1"),
        ("cgroupfs", "", "/k8s.io/ctr1"),
        ("systemd", "kubepods-pod1.slice", "kubepods-pod1.slice:cri-containerd:ctr1"),
    ],
)  # fmt: skip
def test_cgroups_path(driver: str, parent: str, expected: str) -> None:
    assert POD.linux is not None
    sandbox = replace(SANDBOX, config=replace(POD, linux=replace(POD.linux, cgroup_parent=parent)))
    assert build(sandbox=sandbox, cgroup_driver=driver)["linux"]["cgroupsPath"] == expected


# ---------------------------------------------------------------- annotations


def test_annotations() -> None:
    """Only allow-listed annotations reach the spec (none by default, as in containerd),
    and the runtime's own keys win over allowed ones."""
    hostile = {
        "team": "web",
        "io.kubernetes.cri.container-type": "sandbox",
        "org.systemd.property.CPUQuota": "1%",
    }
    config = container(annotations=hostile)
    assert "team" not in build(config)["annotations"]
    assert "org.systemd.property.CPUQuota" not in build(config)["annotations"]
    allowed = build(config, container_annotations=("team", "io.kubernetes.cri.*"))
    assert allowed["annotations"] == {
        "team": "web",
        "io.kubernetes.cri.container-type": "container",  # the runtime's own wins
        "io.kubernetes.cri.container-name": "app",
        "io.kubernetes.cri.sandbox-id": "sb1",
        "io.kubernetes.cri.sandbox-name": "web-0",
        "io.kubernetes.cri.sandbox-namespace": "prod",
        "io.kubernetes.cri.sandbox-uid": "pod-uid",
        "io.kubernetes.cri.image-name": "registry.example/app:1",
    }


def test_pod_annotations_reach_containers_through_their_own_allow_list() -> None:
    pod = replace(SANDBOX, config=replace(POD, annotations={"pod.team": "a", "other": "b"}))
    plain = build(sandbox=pod)["annotations"]
    assert "pod.team" not in plain and "other" not in plain
    allowed = build(sandbox=pod, pod_annotations=("pod.*",))["annotations"]
    assert allowed["pod.team"] == "a" and "other" not in allowed


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("io.katacontainers.*", "io.katacontainers.config.hypervisor", True),
        ("*", "a/b", False),  # Go's path.Match: * does not cross "/"
        ("example.com/*", "example.com/x", True),
        ("a?c", "abc", True),
        ("a[!b]c", "abc", False),
        ("a[^b]c", "axc", True),
        ("a[", "a[", False),  # malformed: matches nothing
        ("a\\*", "a*", True),
    ],
)
def test_annotation_patterns_are_go_path_match(pattern: str, key: str, matches: bool) -> None:
    assert glob_match(pattern, key) is matches


@pytest.mark.parametrize(
    ("cpus", "mems", "match"),
    [
        ("G\U00040fa7", "", "not a number or a range"),  # what the fuzz test sent
        ("0-", "", "not a number or a range"),
        ("3-1", "", "not a range"),
        ("0,99999", "", "not a range"),
        ("", "0 1", "not a number or a range"),
        ("4095", "", "cpu 4095 is not online"),
        ("", "63", "node 63 is not online"),
    ],
)
def test_bad_cpusets_are_refused_before_runc(cpus: str, mems: str, match: str) -> None:
    res = cri.LinuxContainerResources(cpuset_cpus=cpus, cpuset_mems=mems)
    with pytest.raises(SpecError, match=match):
        build(container(resources=res))


def test_online_cpusets_are_taken() -> None:
    online = Path("/sys/devices/system/cpu/online").read_text().strip()
    res = cri.LinuxContainerResources(cpuset_cpus=online, cpuset_mems="0")
    spec = build(container(resources=res))
    assert spec["linux"]["resources"]["cpu"] == {"cpus": online, "mems": "0"}


def test_unified_resources_need_a_cgroup_v2_host() -> None:
    """runc refuses `unified` on cgroup v1 only at start, as UNKNOWN; found by the fuzz test."""
    res = cri.LinuxContainerResources(unified={"memory.high": "64M"})
    spec: dict[str, Any] = {"linux": {}}
    with pytest.raises(SpecError, match="cgroup v1"):
        apply_linux_resources(spec, res, cgroup_v2=False)
    apply_linux_resources(spec, res, cgroup_v2=True)
    assert spec["linux"]["resources"]["unified"] == {"memory.high": "64M"}
