"""models/loader.py: what loading a model costs a worker's start-up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

_LOAD = """
import sys
from pathlib import Path
import torch
from scalellm.models.config import ModelConfig
from scalellm.models.loader import load_model

folder = Path(sys.argv[1])
dtype = getattr(torch, sys.argv[2])
model = load_model(folder, ModelConfig.from_dir(folder), dtype, torch.device("cpu"), 256)
ids = torch.tensor([1, 2, 3])
assert model.embed_tokens(ids).dtype == dtype and model.rotary.cos.dtype == torch.float32
print(sorted(m for m in ("torch._dynamo", "sympy", "transformers") if m in sys.modules))
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_a_model_imports_neither_dynamo_nor_sympy(tiny_llama: Path, dtype: str) -> None:
    """Allocating the model on the meta device must not run torch's Python decompositions (their
    first use imports torch._dynamo and sympy: ~4 s of a 7 s worker start here). Checked in a
    fresh interpreter: this test process may have imported them already."""
    done = subprocess.run(
        [sys.executable, "-c", _LOAD, str(tiny_llama), dtype], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
