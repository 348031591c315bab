#!/usr/bin/env python
"""Generate the committed Python gRPC stubs from protos/ (the only way to produce them).

Usage (from anywhere; paths are resolved from this file):

    python scripts/gen_protos.py            # regenerate socialrec/v1/*_pb2*.py{,i}
    python scripts/gen_protos.py --check    # CI: exit 1 if the committed stubs are stale

Every ``*.proto`` under ``protos/`` is compiled with ``grpc_tools.protoc`` using
``protos/`` as the proto path root, so ``protos/socialrec/v1/recommender.proto``
becomes the importable modules ``socialrec.v1.recommender_pb2`` (+ ``.pyi``) and
``socialrec.v1.recommender_pb2_grpc`` (which imports
``from socialrec.v1 import recommender_pb2``).

The output depends on the grpcio-tools version (it embeds the protobuf and grpc
versions and checks them at import time), so regenerate with the same version CI
uses; ``--check`` prints the version it used when it finds a difference.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.metadata
import importlib.resources
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
# Generated files land next to the hand-written package, under the same
# relative path the .proto files have below PROTO_ROOT.
OUTPUT_ROOT = REPO_ROOT
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def find_protos() -> list[Path]:
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT}")
    return protos


def expected_outputs(protos: list[Path]) -> list[Path]:
    """Generated file paths, relative to the output root, for the given protos."""
    outputs = []
    for proto in protos:
        rel = proto.relative_to(PROTO_ROOT)
        stem = rel.with_suffix("")
        outputs.extend(stem.parent / f"{stem.name}{suffix}" for suffix in GENERATED_SUFFIXES)
    return outputs


def package_dirs(protos: list[Path]) -> list[Path]:
    """Package directories (relative) that hold generated modules."""
    return sorted({proto.relative_to(PROTO_ROOT).parent for proto in protos})


def run_protoc(protos: list[Path], out_dir: Path) -> None:
    # The well-known types (google/protobuf/*.proto) ship inside grpc_tools.
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p) for p in protos),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")


def ensure_init_files(protos: list[Path]) -> list[Path]:
    """Create missing ``__init__.py`` files for the generated packages; return those created."""
    created = []
    for pkg in package_dirs(protos):
        init = OUTPUT_ROOT / pkg / "__init__.py"
        if not init.exists():
            init.parent.mkdir(parents=True, exist_ok=True)
            dotted = ".".join(pkg.parts)
            init.write_text(
                f'"""Generated protobuf/gRPC stubs for the {dotted} wire contract."""\n'
            )
            created.append(init)
    return created


def stray_outputs(protos: list[Path]) -> list[Path]:
    """Generated-looking files (relative) in the output packages with no matching .proto."""
    expected = set(expected_outputs(protos))
    strays = []
    for pkg in package_dirs(protos):
        pkg_dir = OUTPUT_ROOT / pkg
        if not pkg_dir.is_dir():
            continue
        for path in sorted(pkg_dir.iterdir()):
            rel = path.relative_to(OUTPUT_ROOT)
            if path.name.endswith(GENERATED_SUFFIXES) and rel not in expected:
                strays.append(rel)
    return strays


def generate() -> int:
    protos = find_protos()
    run_protoc(protos, OUTPUT_ROOT)
    for init in ensure_init_files(protos):
        print(f"created {init.relative_to(REPO_ROOT)}")
    for rel in expected_outputs(protos):
        print(f"wrote {rel}")
    for rel in stray_outputs(protos):
        print(f"warning: {rel} has no matching .proto; delete it if it is obsolete")
    return 0


def check() -> int:
    protos = find_protos()
    stale: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gen_protos_") as tmp:
        tmp_dir = Path(tmp)
        run_protoc(protos, tmp_dir)
        for rel in expected_outputs(protos):
            fresh, committed = tmp_dir / rel, OUTPUT_ROOT / rel
            if not committed.exists():
                stale.append(f"{rel} (missing)")
            elif not filecmp.cmp(fresh, committed, shallow=False):
                stale.append(f"{rel} (differs)")
    for pkg in package_dirs(protos):
        if not (OUTPUT_ROOT / pkg / "__init__.py").exists():
            stale.append(f"{pkg / '__init__.py'} (missing)")
    stale.extend(f"{rel} (no matching .proto)" for rel in stray_outputs(protos))

    if stale:
        version = importlib.metadata.version("grpcio-tools")
        print("generated protobuf code is stale:", file=sys.stderr)
        for entry in stale:
            print(f"  {entry}", file=sys.stderr)
        print(
            f"run `python scripts/gen_protos.py` (grpcio-tools {version}) and commit the result",
            file=sys.stderr,
        )
        return 1
    print("generated protobuf code is up to date")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="generate into a temp dir and compare byte-for-byte with the committed files; "
        "exit 1 listing stale files if they differ",
    )
    args = parser.parse_args(argv)
    return check() if args.check else generate()


if __name__ == "__main__":
    sys.exit(main())
