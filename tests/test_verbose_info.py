"""The Go encoding rules the verbose info relies on, checked without a containerd
(tests/test_parity_info.py compares whole documents with containerd's)."""

from __future__ import annotations

import json

from cri_shim.gen.containerd.runc import v1 as runc_v1
from cri_shim.gen.runtime import v1 as cri
from cri_shim.store.verbose import RuntimeIdentity, cni_result, go_json, go_message, go_spec


def test_go_json_is_compact_keeps_utf8_and_escapes_html() -> None:
    text = go_json({"a": "<b>&é\u2028", "n": [1, None, True]})
    assert text == '{"a":"\\u003cb\\u003e\\u0026é\\u2028","n":[1,null,true]}'
    assert json.loads(text) == {"a": "<b>&é\u2028", "n": [1, None, True]}


def test_go_message_follows_protoc_gen_go_json_tags() -> None:
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="app", attempt=0),
        envs=[cri.KeyValue(key="A", value=b"x y"), cri.KeyValue(key="B", value=b"\xff")],
        labels={"z": "1", "a": "2"},
        linux=cri.LinuxContainerConfig(
            security_context=cri.LinuxContainerSecurityContext(
                run_as_user=cri.Int64Value(value=0),
                namespace_options=cri.NamespaceOption(pid=cri.NamespaceMode.CONTAINER),
            )
        ),
        tty=False,
    )
    assert go_message(config) == {
        "metadata": {"name": "app"},  # zero attempt omitted
        # cri-api's KeyValue.MarshalJSON: text, invalid UTF-8 replaced
        "envs": [{"key": "A", "value": "x y"}, {"key": "B", "value": "\ufffd"}],
        "labels": {"a": "2", "z": "1"},  # Go sorts map keys
        "linux": {
            # a set message stays, even when all its fields are zero; enums are numbers
            "security_context": {"namespace_options": {"pid": 1}, "run_as_user": {}}
        },
    }


def test_go_spec_drops_false_omitempty_booleans_only() -> None:
    spec = {"process": {"noNewPrivileges": False, "terminal": True}, "root": {"readonly": False}}
    assert go_spec(spec) == {"process": {"terminal": True}, "root": {}}
    assert spec["root"] == {"readonly": False}  # the stored spec is not changed
    assert go_spec(None) is None


def test_runtime_options_print_as_containerd_prints_them() -> None:
    assert RuntimeIdentity.of("io.containerd.runc.v2", runc_v1.Options(), "overlayfs") == (
        RuntimeIdentity("io.containerd.runc.v2", None, "overlayfs")
    )
    systemd = RuntimeIdentity.of("r", runc_v1.Options(systemd_cgroup=True), "s")
    assert systemd.runtime_options == {"systemd_cgroup": True}


def test_cni_result_as_go_cni_builds_it() -> None:
    result = cni_result(
        [
            {
                "interfaces": [{"name": "br0", "mac": "aa"}, {"name": "eth0", "sandbox": "/ns"}],
                "ips": [
                    {"interface": 1, "address": "10.0.0.2/24", "gateway": "10.0.0.1"},
                    {"address": "fd00::2/64"},  # no interface index: the default one
                ],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dns": {"nameservers": ["10.0.0.10"], "search": []},
            }
        ]
    )
    assert list(result["Interfaces"]) == ["br0", "eth0"]
    assert result["Interfaces"]["br0"]["IPConfigs"] is None
    assert result["Interfaces"]["eth0"]["IPConfigs"] == [
        {"IP": "10.0.0.2", "Gateway": "10.0.0.1"},
        {"IP": "fd00::2", "Gateway": ""},
    ]
    assert result["DNS"] == [{"nameservers": ["10.0.0.10"]}]
    assert result["Routes"] == [{"dst": "0.0.0.0/0"}]
