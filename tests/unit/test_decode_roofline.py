"""bench/decode_roofline.py end to end on CPU with the tiny shape: the code path the GPU run takes
(random weights through ModelRunner, the byte and FLOP accounting, the table), not its figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import decode_roofline


def test_tiny_shape_runs_on_cpu_and_accounts_the_bytes_it_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "roofline.json"
    decode_roofline.main(
        ["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--batch", "1", "3", "--context", "8",
         "--steps", "2", "--warmup", "1", "--prefill", "32", "--graphs", "off", "on", "--json", str(out)]
    )  # fmt: skip
    result = json.loads(out.read_text())
    cfg = decode_roofline.model_config("tiny")
    one, three, one_on, three_on = rows = result["decode"]
    assert [(r["batch"], r["graphs"]) for r in rows] == [(b, m) for m in ("off", "on") for b in (1, 3)]
    # Two more sequences read two more contexts of 9 tokens' K and V, and two more embedding rows.
    kv_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4
    assert three["bytes_per_step"] - one["bytes_per_step"] == 2 * 9 * kv_token + 2 * cfg.hidden_size * 4
    assert result["graphs"]["off"] is None and not one["bucketed"]
    if result["graphs"]["on"] is not None:  # a graph-safe CPU backend: the buckets' static buffers
        assert result["graphs"]["on"]["buckets"] == [1, 2, 3] and one_on["bucketed"] and three_on["bucketed"]
    for row in result["decode"]:
        assert row["ms_per_step"] > 0 and row["roofline"] > 0
        assert row["launches_per_step"] is None and row["host_launches_per_step"] is None  # no CUDA here
        assert row["torch_ops_per_step"] > 0
        assert (
            row["loop_ms_per_step"] > 0
            and row["async_loop_ms_per_step"] > 0
            and row["async_loop_roofline"] > 0
        )
    assert result["prefill"]["tokens"] == 32 and result["prefill"]["tflops"] > 0
    assert result["attention"].startswith(("cpu-paged", "torch-sdpa"))
    table = capsys.readouterr().out
    assert "| 3 | off |" in table and "| 3 | on" in table and "prefill 32 tokens" in table
