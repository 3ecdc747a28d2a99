"""Regenerates fedkube/proto/*_pb2*.py(i) from protos/ with grpcio-tools and mypy-protobuf.

It writes the messages (*_pb2.py, *_pb2.pyi) and the gRPC stubs and servicers (*_pb2_grpc.py,
typed by *_pb2_grpc.pyi from mypy-protobuf's protoc-gen-mypy_grpc).

Usage: python tools/gen_protos.py [OUT_DIR]   (default: the repository root)
A test runs it into a temporary directory and fails when the committed files differ.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def generate(out_dir: Path) -> list[Path]:
    sources = sorted(PROTOS.glob("fedkube/proto/*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(str(p.relative_to(PROTOS)) for p in sources),
    ]
    # protoc finds the mypy-protobuf plugin on PATH, beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_dir / "fedkube" / "proto").glob("*_pb2*.py*"))


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for path in generate(out):
        print(path)
