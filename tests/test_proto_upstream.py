"""protos/runtime/v1/api.proto against upstream's, field by field.

The wire contract must be exactly k8s.io/cri-api's: the same messages, field
names, numbers, types and labels, enums and RPCs. Our copy carries its own
comments, so the files are compared as compiled descriptors. Upstream's is the
`k8s.io/cri-api` module of the release our header names, fetched through the
Go module proxy into the peers' module cache (as tests/peers/build.sh does).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2  # type: ignore[import-untyped]
from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
OURS = ROOT / "protos" / "runtime" / "v1" / "api.proto"
HEADER = re.compile(r"k8s\.io/cri-api (v\d+\.\d+\.\d+)")

Shape = dict[tuple[str, ...], object]


def upstream_version() -> str:
    found = HEADER.search(OURS.read_text().splitlines()[0])
    assert found, f"{OURS}'s first line must name the cri-api release it follows"
    return found.group(1)


def upstream_proto(version: str) -> Path:
    """Download k8s.io/cri-api@version from the Go module proxy; its api.proto."""
    peers = Path(os.environ.get("CRI_SHIM_PEERS_DIR", "/var/cache/cri-shim-peers"))
    env = dict(os.environ)
    env.setdefault("GOPATH", str(peers / "gopath"))
    env.setdefault("GOMODCACHE", str(Path(env["GOPATH"]) / "pkg" / "mod"))
    env.setdefault("GOFLAGS", "-mod=mod")
    with tempfile.TemporaryDirectory() as scratch:
        result = subprocess.run(
            ["go", "mod", "download", "-json", f"k8s.io/cri-api@{version}"],
            cwd=scratch,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    assert result.returncode == 0, f"go mod download failed:\n{result.stdout}{result.stderr}"
    module_dir = Path(json.loads(result.stdout)["Dir"])
    return module_dir / "pkg" / "apis" / "runtime" / "v1" / "api.proto"


def compile_proto(path: Path) -> descriptor_pb2.FileDescriptorProto:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "set.pb"
        code = protoc.main(["protoc", f"-I{path.parent}", f"--descriptor_set_out={out}", path.name])
        assert code == 0, f"protoc could not compile {path}"
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return files.file[0]


def shape(file: descriptor_pb2.FileDescriptorProto) -> Shape:
    """Everything on the wire, keyed by where it lives; comments and options left out."""
    found: Shape = {("package",): file.package}

    def enum(message: descriptor_pb2.EnumDescriptorProto, scope: str) -> None:
        for value in message.value:
            found[("enum", scope + message.name, value.name)] = value.number

    def message(msg: descriptor_pb2.DescriptorProto, scope: str) -> None:
        name = scope + msg.name
        found[("message", name)] = True
        oneofs = [o.name for o in msg.oneof_decl]
        for field in msg.field:
            oneof = oneofs[field.oneof_index] if field.HasField("oneof_index") else None
            found[("field", name, field.name)] = (
                field.number,
                descriptor_pb2.FieldDescriptorProto.Label.Name(field.label),
                descriptor_pb2.FieldDescriptorProto.Type.Name(field.type),
                field.type_name,
                oneof,
                field.proto3_optional,
            )
        for nested in msg.nested_type:
            message(nested, name + ".")
        for nested_enum in msg.enum_type:
            enum(nested_enum, name + ".")

    for msg in file.message_type:
        message(msg, "")
    for top_enum in file.enum_type:
        enum(top_enum, "")
    for service in file.service:
        for method in service.method:
            found[("rpc", service.name, method.name)] = (
                method.input_type,
                method.output_type,
                method.client_streaming,
                method.server_streaming,
            )
    return found


def test_runtime_api_proto_matches_upstream_cri_api() -> None:
    version = upstream_version()
    ours = shape(compile_proto(OURS))
    theirs = shape(compile_proto(upstream_proto(version)))
    differences = [
        f"{'.'.join(key)}: ours {ours.get(key, 'missing')}, upstream {theirs.get(key, 'missing')}"
        for key in sorted(set(ours) | set(theirs))
        if ours.get(key) != theirs.get(key)
    ]
    assert not differences, f"api.proto differs from k8s.io/cri-api {version}:\n" + "\n".join(
        differences
    )
    # The comparison itself must have seen the whole contract.
    assert sum(1 for key in ours if key[0] == "rpc") >= 40
    assert ("field", "KeyValue", "value") in ours


def test_shape_sees_a_changed_field_number() -> None:
    """The comparison fails on a one-field change, so a match means something."""
    original = compile_proto(OURS)
    changed = descriptor_pb2.FileDescriptorProto()
    changed.CopyFrom(original)
    key_value = next(m for m in changed.message_type if m.name == "KeyValue")
    key_value.field[1].type = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
    assert shape(original) != shape(changed)
