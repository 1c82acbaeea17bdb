"""Helpers for tests that run real pods: a CNI bridge config and pod configs."""

from __future__ import annotations

import json
import random
from pathlib import Path

from cri_shim.gen.runtime import v1 as cri

CNI_BIN = "/usr/lib/cni"
# Images the pod tests need from the catalog: the pause image and busybox.
POD_IMAGES = ("registry.k8s.io/pause:3.9", "library/busybox:latest")


def pod_config(name: str, **kwargs: object) -> cri.PodSandboxConfig:
    uid = f"uid-{name}-{random.randrange(1 << 30)}"
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, namespace="sandbox-test", uid=uid),
        **kwargs,  # type: ignore[arg-type]
    )


def write_conflist(conf_dir: Path, subnet: str, bridge: str, data_dir: Path) -> None:
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "10-test.conflist").write_text(
        json.dumps(
            {
                "cniVersion": "1.0.0",
                "name": "crishim-sandbox-test",
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": bridge,
                        "isGateway": True,
                        "ipMasq": False,
                        "hairpinMode": True,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": subnet}]],
                            "dataDir": str(data_dir),
                            "routes": [{"dst": "0.0.0.0/0"}],
                        },
                    },
                    {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
                    {"type": "loopback"},
                ],
            }
        )
    )
