"""Records kept on containerd containers: versioned, and read back as written."""

from __future__ import annotations

import pytest

from cri_shim.gen.runtime import v1 as cri
from cri_shim.store.containers import Container
from cri_shim.store.record import RecordVersionError
from cri_shim.store.sandboxes import Sandbox


def _container() -> Container:
    return Container(
        id="c" * 64,
        name="pod_ns_uid_app_0",
        sandbox_id="s" * 64,
        config=cri.ContainerConfig(metadata=cri.ContainerMetadata(name="app", attempt=0)),
        image_ref="busybox:latest",
        image_id="sha256:" + "1" * 64,
        image_repo_ref="busybox@sha256:" + "2" * 64,
        created_at=123,
        log_path="/var/log/pods/x/app/0.log",
        stop_signal="SIGINT",
        user=(1000, 1000, (10, 20)),
    )


def test_container_record_round_trip_and_exit_fields() -> None:
    container = _container()
    data = container.to_record()
    assert data["version"] == 1 and "finishedAt" not in data
    back = Container.from_record(container.id, data)
    assert back == container
    container.exit_code, container.finished_at, container.reason = 3, 456, "Error"
    with_exit = container.to_record(with_exit=True)
    assert (with_exit["exitCode"], with_exit["finishedAt"], with_exit["reason"]) == (
        3,
        456,
        "Error",
    )


def test_records_without_a_version_are_read_and_newer_ones_refused() -> None:
    data = _container().to_record()
    del data["version"]  # written before versions existed
    assert Container.from_record("c" * 64, data).name == "pod_ns_uid_app_0"
    data["version"] = 2
    with pytest.raises(RecordVersionError):
        Container.from_record("c" * 64, data)


def test_sandbox_record_round_trip() -> None:
    sandbox = Sandbox(
        id="s" * 64,
        name="pod_ns_uid_0",
        config=cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name="pod", uid="uid")),
        runtime_handler="runc",
        created_at=7,
        image_id="sha256:" + "3" * 64,
        netns_path="/var/run/netns/cni-x",
        ip="10.0.0.2",
        additional_ips=["fd00::2"],
    )
    assert Sandbox.from_record(sandbox.to_record()) == sandbox
    with pytest.raises(RecordVersionError):
        Sandbox.from_record(sandbox.to_record() | {"version": 9})
