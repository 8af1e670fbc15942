"""bench/prefill_attention.py on CPU with the tiny shape: the Triton kernel interpreted (the code
path the GPU run takes: the step's layout, both backends, the accounting, not its figures), and
our CPU kernel against SDPA on every workload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import prefill_attention
from scalellm.engine import attention_triton, cpu_kernels

needs_triton = pytest.mark.skipif(not attention_triton.AVAILABLE, reason="triton is not installed")


def test_causal_pairs_count_the_context_and_the_chunk_up_to_each_token() -> None:
    # token i of a 3-token chunk on 2 cached sees 2 + i + 1 keys: 3 + 4 + 5
    assert prefill_attention.attended_pairs([(2, 3)]) == 12
    assert prefill_attention.attended_pairs([(0, 4), (2, 3)]) == 10 + 12


@needs_triton
def test_tiny_shape_runs_both_backends_to_the_same_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "prefill.json"
    prefill_attention.main(
        ["--device", "cpu", "--shape", "tiny", "--dtype", "float32", "--workload", "burst", "chunked",
         "--repeats", "1", "--json", str(out)]
    )  # fmt: skip
    results = json.loads(out.read_text())["results"]
    assert [(r["workload"], r["chunks"], r["tokens"]) for r in results] == [
        ("burst", 4, 32),
        ("chunked", 1, 20),
    ]
    for r in results:
        assert r["kernel_ms"] > 0 and r["sdpa_ms"] > 0 and r["kernel_tflops"] > 0
        assert r["max_abs_diff"] < 1e-5  # the same attention, chunk by chunk or in one launch
    assert "| chunked | 1 | 20 |" in capsys.readouterr().out


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ toolchain for the CPU kernel")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_kernel_runs_every_workload_to_sdpas_output(tmp_path: Path, dtype: str) -> None:
    out = tmp_path / "prefill.json"
    prefill_attention.main(
        ["--device", "cpu", "--kernel", "cpu", "--shape", "tiny", "--dtype", dtype, "--repeats", "1",
         "--threads", "2", "--json", str(out)]
    )  # fmt: skip
    results = json.loads(out.read_text())["results"]
    assert [r["workload"] for r in results] == list(prefill_attention.WORKLOADS)
    for r in results:
        assert r["kernel_ms"] > 0 and r["sdpa_ms"] > 0
        assert r["max_abs_diff"] < (1e-5 if dtype == "float32" else 2e-2)
