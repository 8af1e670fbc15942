"""Regenerate scalellm/v1/*_pb2*.py from protos/scalellm/v1/*.proto.

The generated modules are committed so that `pip install -e .` needs no build step; the test
tests/unit/test_protos.py regenerates into a temporary folder and fails on any drift, so stale
generated code cannot land. Run after editing a .proto:

    python tools/gen_protos.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def generate(out_dir: Path) -> list[Path]:
    """Compile every proto under protos/scalellm/v1 into out_dir; returns the .proto files."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted((PROTO_ROOT / "scalellm" / "v1").glob("*.proto"))
    if not protos:
        return []
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    return protos


if __name__ == "__main__":
    generated = generate(ROOT)
    print(f"generated {len(generated)} proto file(s) into scalellm/v1/", file=sys.stderr)
