"""Regenerate cri_shim/gen from the .proto files under protos/.

Run through tox (`tox -e protos`) so the compiler and runtime versions are the
pinned ones. `--check` regenerates into a scratch directory and fails when the
result differs from what is committed, which is how CI keeps the two in step.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
OUTPUT = PROTO_ROOT.parent / "cri_shim" / "gen"
OPTIONS = "client_generation=async,server_generation=async"


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))


def generate(into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    # The plugin is a console script installed beside this interpreter.
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_betterproto2_out={into}",
        f"--python_betterproto2_opt={OPTIONS}",
        *proto_files(),
    ]
    subprocess.run(cmd, cwd=PROTO_ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    for module in into.rglob("*.py"):
        strip_descriptor_import(module)


# The compiler's header imports google.protobuf's Descriptor for an option we
# do not use; where a module also defines a message named Descriptor (containerd
# types) the import survives its unused-import cleanup and would make the
# `protobuf` package a runtime dependency. Drop it.
DESCRIPTOR_IMPORT = "from google.protobuf.descriptor import Descriptor\n"


def strip_descriptor_import(module: Path) -> None:
    text = module.read_text()
    if DESCRIPTOR_IMPORT in text:
        module.write_text(text.replace(DESCRIPTOR_IMPORT, "", 1))


def differences(left: Path, right: Path) -> list[str]:
    found: list[str] = []

    def walk(cmp: filecmp.dircmp[str], prefix: str) -> None:
        found.extend(f"only in committed: {prefix}{n}" for n in cmp.left_only)
        found.extend(f"only in regenerated: {prefix}{n}" for n in cmp.right_only)
        _, mismatch, errors = filecmp.cmpfiles(cmp.left, cmp.right, cmp.common_files, shallow=False)
        found.extend(f"differs: {prefix}{n}" for n in mismatch + errors)
        for name, sub in cmp.subdirs.items():
            if name != "__pycache__":
                walk(sub, f"{prefix}{name}/")

    walk(filecmp.dircmp(left, right, ignore=["__pycache__"]), "")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    args = parser.parse_args()
    if args.check:
        with tempfile.TemporaryDirectory() as scratch:
            fresh = Path(scratch) / "gen"
            generate(fresh)
            diff = differences(OUTPUT, fresh)
        if diff:
            print("generated code is stale; run `tox -e protos`:", *diff, sep="\n  ")
            return 1
        print(f"generated code matches {len(proto_files())} proto files")
        return 0
    if OUTPUT.exists():
        shutil.rmtree(OUTPUT)
    generate(OUTPUT)
    print(f"generated {OUTPUT} from {len(proto_files())} proto files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
