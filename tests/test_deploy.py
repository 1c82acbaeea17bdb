"""The install paths in deploy/ stay valid and in step with the code.

Manifests against Kubernetes' own schemas (kubernetes-validate ships them,
no network), the systemd units through `systemd-analyze verify`, the
production config against the settings' defaults, and the Dockerfile's
install steps by running them: wheel, clean venv, install, run.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cri_shim import __version__, settings
from cri_shim.settings import Settings
from tests.support.tools import require_tool

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DAEMONSET = DEPLOY / "kubernetes" / "daemonset.yaml"
UNIT = DEPLOY / "systemd" / "cri-shim.service"
KUBELET_DROP_IN = DEPLOY / "systemd" / "kubelet.service.d" / "20-cri-shim.conf"
# The Kubernetes versions the manifests must be valid for: oldest supported, and newer.
K8S_VERSIONS = ("1.30.0", "1.34.0")
# The only keys deploy/config.toml may set away from the defaults.
PRODUCTION_OVERRIDES = {"containerd.embedded": False}
# And the ConfigMap's config, away from deploy/config.toml (see daemonset.yaml).
DAEMONSET_OVERRIDES = {
    "containerd.namespace": "cri-shim",
    "runtime.cgroup_driver": "systemd",
    "log.format": "json",
    "registry.config_path": "/etc/containerd/certs.d",
}


def flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a TOML document, as `settings.known_keys()` names them."""
    found: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            found.update(flat(value, f"{prefix}{key}."))
        else:
            found[prefix + key] = value
    return found


def settings_dict(config: Settings) -> dict[str, Any]:
    return flat(dataclasses.asdict(config))


def manifests() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(DAEMONSET.read_text()) if doc]


def manifest(kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in manifests() if doc["kind"] == kind]
    return found


def configmap_toml() -> str:
    text: str = manifest("ConfigMap")["data"]["config.toml"]
    return text


def differences(a: Settings, b: Settings) -> dict[str, Any]:
    left, right = settings_dict(a), settings_dict(b)
    return {key: right[key] for key in left if left[key] != right[key]}


# --- config ---------------------------------------------------------------------------


def test_production_config_is_the_defaults_plus_its_overrides() -> None:
    loaded = settings.load(DEPLOY / "config.toml", environ={})
    assert differences(Settings(), loaded) == PRODUCTION_OVERRIDES


def test_production_config_lists_every_key() -> None:
    written = set(flat(tomllib.loads((DEPLOY / "config.toml").read_text())))
    missing = [key for key in settings.known_keys() if key not in written]
    assert not missing, (
        f"deploy/config.toml lacks {', '.join(missing)}: add each with its default "
        "and a one-line comment (and to the ConfigMap in deploy/kubernetes/daemonset.yaml)"
    )


def test_daemonset_config_is_the_production_config_plus_its_overrides(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(configmap_toml())
    in_cluster = settings.load(path, environ={})
    production = settings.load(DEPLOY / "config.toml", environ={})
    assert differences(production, in_cluster) == DAEMONSET_OVERRIDES
    written = set(flat(tomllib.loads(configmap_toml())))
    assert written >= set(settings.known_keys())


# --- Kubernetes manifests ---------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version: str) -> None:
    docs = manifests()
    assert [d["kind"] for d in docs] == ["Namespace", "ServiceAccount", "ConfigMap", "DaemonSet"]
    for doc in docs:
        # strict: unknown or misspelt fields fail too.
        kubernetes_validate.validate(doc, version, strict=True)


def test_schema_validation_catches_a_mistake() -> None:
    daemonset = manifest("DaemonSet")
    daemonset["spec"]["template"]["spec"]["hostPid"] = True  # the field is hostPID
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, K8S_VERSIONS[0], strict=True)


def test_daemonset_mounts_every_host_path_the_config_names(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(configmap_toml())
    config = settings.load(path, environ={})
    pod = manifest("DaemonSet")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    # Paths are handed to the host's containerd as they are: mounted at the same place.
    for name, host in host_paths.items():
        assert mounts[host]["name"] == name, f"{host} must be mounted at the same path"
    needed = {
        config.state_dir,
        str(PurePosixPath(config.server.socket).parent),
        str(PurePosixPath(config.containerd.address).parent),
        config.cni.conf_dir,
        *config.cni.bin_dirs,
        config.cni.netns_dir,
        config.registry.config_path,
        "/var/lib/cni",  # host-local IPAM leases, shared with the node's runtime
        "/var/lib/kubelet",
        "/var/log/pods",
    }
    assert needed <= set(host_paths.values())
    # Namespaces the shim pins, and the pods' /dev/shm tmpfs and image volumes it
    # mounts in its state dir, must show in the host's mount namespace.
    assert mounts[config.cni.netns_dir]["mountPropagation"] == "Bidirectional"
    assert mounts[config.state_dir]["mountPropagation"] == "Bidirectional"
    assert mounts["/etc/cri-shim"]["name"] == "config"
    assert not config.containerd.embedded


def test_daemonset_runs_privileged_on_every_node_with_probes(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(configmap_toml())
    config = settings.load(path, environ={})
    pod = manifest("DaemonSet")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["hostPID"] and pod["hostNetwork"]
    assert container["securityContext"]["privileged"] is True
    assert {"operator": "Exists"} in pod["tolerations"]
    assert container["resources"]["requests"].keys() >= {"cpu", "memory"}
    probes = {
        "readinessProbe": "/healthz",
        "livenessProbe": "/livez",
    }
    for probe, endpoint in probes.items():
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"], get["host"]) == (
            endpoint,
            config.metrics.port,
            config.metrics.address,
        )
    assert config.metrics.enabled
    assert manifest("Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == (
        "privileged"
    )


# --- systemd ---------------------------------------------------------------------------


def unit_entries(path: Path) -> dict[str, list[str]]:
    """`Key=value` lines of a unit file (repeated keys kept in order)."""
    entries: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        text = raw.strip()
        if not text or text.startswith(("#", ";", "[")):
            continue
        key, _, value = text.partition("=")
        entries.setdefault(key, []).append(value)
    return entries


def test_systemd_unit_keeps_pods_alive_across_restarts() -> None:
    unit = unit_entries(UNIT)
    assert unit["ExecStart"] == [
        "/usr/local/bin/cri-shim serve --config /etc/cri-shim/config.toml --no-embedded-containerd"
    ]
    assert unit["KillMode"] == ["process"]
    assert unit["Delegate"] == ["yes"]
    assert unit["Restart"] == ["always"]
    assert "containerd.service" in unit["After"][0].split()
    assert "containerd.service" in unit["Wants"][0].split()
    assert int(unit["LimitNOFILE"][0]) >= 65536


def test_kubelet_is_pointed_at_the_default_socket() -> None:
    endpoint = f"unix://{Settings().server.socket}"
    drop_in = unit_entries(KUBELET_DROP_IN)
    assert drop_in["ExecStart"][0] == ""  # reset kubeadm's command line first
    assert drop_in["ExecStart"][1].endswith(f"--container-runtime-endpoint={endpoint}")
    kubelet = yaml.safe_load((DEPLOY / "kubelet-config.yaml").read_text())
    assert kubelet["apiVersion"] == "kubelet.config.k8s.io/v1beta1"
    assert kubelet["kind"] == "KubeletConfiguration"
    assert kubelet["containerRuntimeEndpoint"] == endpoint
    assert kubelet["imageServiceEndpoint"] == endpoint


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    installed = Path(sys.executable).parent / "cri-shim"
    assert installed.exists()
    # verify insists that ExecStart's binary exists: use this checkout's.
    unit = UNIT.read_text().replace("/usr/local/bin/cri-shim", str(installed))
    (tmp_path / "cri-shim.service").write_text(unit)
    (tmp_path / "kubelet.service").write_text("[Service]\nExecStart=/bin/true\n")
    (tmp_path / "kubelet.service.d").mkdir()
    drop_in = KUBELET_DROP_IN.read_text().replace("/usr/bin/kubelet", "/bin/true")
    (tmp_path / "kubelet.service.d" / KUBELET_DROP_IN.name).write_text(drop_in)
    # A trailing ":" keeps the built-in search path (containerd.service lives there).
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{tmp_path}:")
    for name in ("cri-shim.service", "kubelet.service"):
        result = subprocess.run(
            [analyze, "verify", name],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        # Unknown or malformed settings are only warnings ("..., ignoring"): none allowed.
        ours = [line for line in result.stderr.splitlines() if str(tmp_path) in line]
        assert result.returncode == 0 and not ours, result.stderr


# --- image install steps ------------------------------------------------------------------


def dockerfile_runs() -> list[str]:
    """The Dockerfile's RUN commands, continuation lines joined."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    return [" ".join(line.split()[1:]) for line in text.splitlines() if line.startswith("RUN ")]


def dockerfile_copies() -> list[str]:
    """Sources the builder copies from the build context."""
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    sources: list[str] = []
    stage = ""
    for line in lines:
        parts = line.split()
        if parts[:1] == ["FROM"]:
            stage = parts[-1]
        if stage == "builder" and parts[:1] == ["COPY"]:
            sources += parts[1:-1]
    return sources


def run(*cmd: str, cwd: Path) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"{' '.join(cmd)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_dockerfile_shape() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    stages = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert stages == ["FROM ${BASE_IMAGE} AS python", "FROM python AS builder", "FROM python"]
    # Debian's own Python: tests/support/dockerfile.py builds this base offline.
    assert "ARG BASE_IMAGE=debian:bookworm-slim" in text
    assert text.splitlines()[-1] == (
        'ENTRYPOINT ["cri-shim", "serve", "--config", "/etc/cri-shim/config.toml"]'
    )
    assert "COPY deploy/config.toml /etc/cri-shim/config.toml" in text
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for source in [*dockerfile_copies(), "deploy/config.toml"]:
        assert f"!{source.rstrip('/')}" in ignore or f"!{source.rstrip('/')}/" in ignore


def test_wheel_installs_into_a_clean_venv_and_runs(tmp_path: Path) -> None:
    """What the Dockerfile does, with the same commands, on this machine (with
    this venv's Python; tests/test_daemonset.py runs them in the image itself)."""
    wheel_cmd = "python3.11 -m venv /build && /build/bin/pip wheel --no-deps --wheel-dir /wheels ."
    install_cmd = (
        "python3.11 -m venv /opt/cri-shim && /opt/cri-shim/bin/pip install --no-cache-dir "
        "--only-binary :all: /wheels/*.whl && rm -rf /wheels"
    )
    assert dockerfile_runs()[1] == wheel_cmd
    assert dockerfile_runs()[-1] == install_cmd

    # The builder's context: exactly what the Dockerfile copies.
    context = tmp_path / "src"
    context.mkdir()
    for source in dockerfile_copies():
        if (ROOT / source).is_dir():
            shutil.copytree(
                ROOT / source, context / source, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy(ROOT / source, context / source)
    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(wheels), ".",
        cwd=context)  # fmt: skip
    (wheel,) = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "cri_shim/py.typed" in names and "cri_shim/metrics.py" in names
    assert all(n.startswith(("cri_shim/", f"cri_shim-{__version__}.dist-info/")) for n in names)

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", str(venv), cwd=tmp_path)
    run(str(venv / "bin" / "pip"), "install", "--no-cache-dir", "--only-binary", ":all:",
        str(wheel), cwd=tmp_path)  # fmt: skip
    cli = str(venv / "bin" / "cri-shim")
    assert run(cli, "--version", cwd=tmp_path).strip() == f"cri-shim {__version__}"
    assert run(cli, "config", "default", cwd=tmp_path) == settings.render_toml(Settings())
    assert "--no-embedded-containerd" in run(cli, "check", "--help", cwd=tmp_path)
    # The installed copy reads the config the image ships.
    loaded = run(
        str(venv / "bin" / "python"),
        "-c",
        "import sys; from pathlib import Path; from cri_shim import settings; "
        "print(settings.load(Path(sys.argv[1]), environ={}).containerd.embedded)",
        str(DEPLOY / "config.toml"),
        cwd=tmp_path,
    )
    assert loaded.strip() == "False"
