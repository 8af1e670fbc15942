"""The committed generated code must match protos/ exactly: stale generated code cannot land."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import gen_protos  # noqa: E402


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    protos = gen_protos.generate(tmp_path)
    if not protos:
        pytest.skip("no .proto files yet")
    fresh = sorted(p.relative_to(tmp_path) for p in (tmp_path / "scalellm" / "v1").glob("*_pb2*"))
    committed = sorted(p.relative_to(ROOT) for p in (ROOT / "scalellm" / "v1").glob("*_pb2*"))
    assert fresh == committed, "run `python tools/gen_protos.py` and commit the result"
    for rel in fresh:
        assert (tmp_path / rel).read_bytes() == (ROOT / rel).read_bytes(), (
            f"{rel} is stale: run `python tools/gen_protos.py` and commit the result"
        )


def test_generated_modules_import_cleanly() -> None:
    for path in sorted((ROOT / "scalellm" / "v1").glob("*_pb2*.py")):
        importlib.import_module(f"scalellm.v1.{path.stem}")
