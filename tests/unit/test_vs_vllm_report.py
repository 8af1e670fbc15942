"""bench/vs_vllm_report.py's tables from saved level results (no server runs)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import vs_vllm_report


def _level(results: Path, rnd: int, system: str, streams: int, tok_s: float, cpu: dict[str, float]) -> None:
    result = {
        "output_throughput": tok_s,
        "median_tpot_ms": 100.0,
        "p99_itl_ms": 200.0,
        "duration": 10.0,
        "completed": 8,
        "num_prompts": 8,
        "server_cpu_s": cpu,
    }
    (results / f"r{rnd}-float32-{system}-c{streams}.json").write_text(json.dumps(result))


def test_the_report_shows_each_process_kinds_cores_median_over_rounds(tmp_path: Path) -> None:
    _level(tmp_path, 0, "vllm", 64, 80.0, {"VLLM::Worker": 10.0, "VLLM::EngineCore": 5.0, "python3": 0.03})
    _level(tmp_path, 1, "vllm", 64, 90.0, {"VLLM::Worker": 10.0, "VLLM::EngineCore": 7.0, "python3": 0.03})
    _level(tmp_path, 2, "vllm", 64, 100.0, {"VLLM::Worker": 10.0, "VLLM::EngineCore": 10.0, "python3": 0.03})
    _level(tmp_path, 0, "mesh-colocated", 64, 130.0, {"services.decode": 19.5, "services.gateway": 0.2})
    _level(tmp_path, 1, "mesh-colocated", 64, 140.0, {"services.decode": 19.1, "services.gateway": 0.2})
    levels = vs_vllm_report.load_levels(tmp_path)
    rows = vs_vllm_report.cores(levels, "float32")
    assert rows[0] == "| streams | vllm cores (by process) | mesh-colocated cores (by process) |"
    # vLLM: worker 1.00, engine core median(0.5, 0.7, 1.0) = 0.70 (the mean would be 0.73),
    # python3 0.003 (counted, not listed).
    # Mesh: decode median(1.95, 1.91) = 1.93, gateway 0.02.
    assert rows[2] == (
        "| 64 | 1.70 (VLLM::Worker 1.00, VLLM::EngineCore 0.70) "
        "| 1.95 (services.decode 1.93, services.gateway 0.02) |"
    )
    assert "| 64 | 90.0 (100, 200) x3 | 135.0 (100, 200) x2 | **1.50x** |" in vs_vllm_report.table(
        levels, "float32"
    )


def test_results_without_cpu_counts_give_no_cores_table(tmp_path: Path) -> None:
    _level(tmp_path, 0, "vllm", 1, 10.0, {})
    assert vs_vllm_report.cores(vs_vllm_report.load_levels(tmp_path), "float32") == []


def test_levels_from_before_the_run_are_named_in_the_report(tmp_path: Path) -> None:
    """A results folder may hold an earlier run's levels, which a run reuses (it skips levels
    whose file exists): the report's note names them with their dates, and only them."""
    import os

    from bench import vs_vllm

    old, new = tmp_path / "r0-float32-vllm-c1.json", tmp_path / "r0-float32-vllm-c64.json"
    for path in (old, new, tmp_path / "machine.json"):
        path.write_text("{}")
    os.utime(old, (1_700_000_000, 1_700_000_000))  # 2023-11-14 22:13 UTC
    line = vs_vllm.reused_before(tmp_path, started=1_800_000_000)
    assert "r0-float32-vllm-c1 (2023-11-14 22:13 UTC)" in line and "c64" in line  # both older than that
    line = vs_vllm.reused_before(tmp_path, started=new.stat().st_mtime - 1)
    assert "r0-float32-vllm-c1 (2023-11-14 22:13 UTC)" in line and "c64" not in line
    assert vs_vllm.reused_before(tmp_path, started=0) == ""


def test_ours_is_set_against_each_vllm_configuration_that_ran(tmp_path: Path) -> None:
    """vLLM as it comes and with every core bound to its worker: one ratio column per pair."""
    _level(tmp_path, 0, "vllm", 64, 80.0, {})
    _level(tmp_path, 0, "vllm-all-cores", 64, 160.0, {})
    _level(tmp_path, 0, "mesh-colocated", 64, 120.0, {})
    lines = vs_vllm_report.table(vs_vllm_report.load_levels(tmp_path), "float32")
    assert lines[0] == (
        "| streams | vllm tok/s (TPOT p50, ITL p99 ms) | vllm-all-cores tok/s (TPOT p50, ITL p99 ms) "
        "| mesh-colocated tok/s (TPOT p50, ITL p99 ms) | colocated / vLLM | colocated / vLLM all cores |"
    )
    assert (
        lines[2] == "| 64 | 80.0 (100, 200) | 160.0 (100, 200) | 120.0 (100, 200) | **1.50x** | **0.75x** |"
    )


def test_vllm_all_cores_binds_its_worker_to_every_core_this_process_may_use() -> None:
    import os

    from bench import vs_vllm

    plan = vs_vllm.Plan("/m", "vllm-cpu.sh", Path("r"), Path("l"), 128, 64, 2, 2, 8, False)
    cores = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    system = vs_vllm.make_system("vllm-all-cores", "float32", plan, ["--x=1"])
    assert system.command[:3] == ["env", f"VLLM_CPU_OMP_THREADS_BIND={cores}", "vllm-cpu.sh"]
    assert system.command[-1] == "--x=1"
    assert vs_vllm.make_system("vllm", "float32", plan, []).command[0] == "vllm-cpu.sh"  # as it comes
    tuned = vs_vllm.Plan(
        "/m", "vllm-cpu.sh", Path("r"), Path("l"), 128, 64, 2, 2, 8, False, ("LD_PRELOAD=/x.so",)
    )
    assert vs_vllm.make_system("vllm", "float32", tuned, []).command[:3] == [
        "env",
        "LD_PRELOAD=/x.so",
        "vllm-cpu.sh",
    ]


def test_ours_at_another_revision_gets_its_column_and_a_ratio(tmp_path: Path) -> None:
    """bench/vs_vllm.py's NAME@REV systems: after vLLM and ours, and ours set against them."""
    _level(tmp_path, 0, "vllm", 64, 80.0, {})
    _level(tmp_path, 0, "mesh-colocated@abc123", 64, 100.0, {})
    _level(tmp_path, 0, "mesh-colocated", 64, 120.0, {})
    _level(tmp_path, 1, "mesh-colocated@abc123", 64, 110.0, {})
    lines = vs_vllm_report.table(vs_vllm_report.load_levels(tmp_path), "float32")
    assert lines[0] == (
        "| streams | vllm tok/s (TPOT p50, ITL p99 ms) | mesh-colocated tok/s (TPOT p50, ITL p99 ms) "
        "| mesh-colocated@abc123 tok/s (TPOT p50, ITL p99 ms) | colocated / vLLM | colocated / at abc123 |"
    )
    assert lines[2] == (
        "| 64 | 80.0 (100, 200) | 120.0 (100, 200) | 105.0 (100, 200) x2 | **1.50x** | **1.14x** |"
    )


def test_system_names_take_a_revision_for_mesh_systems_only() -> None:
    import argparse

    import pytest

    from bench import vs_vllm

    assert vs_vllm.system_name("mesh-colocated@HEAD~1") == "mesh-colocated@HEAD~1"
    assert vs_vllm.system_name("vllm") == "vllm"
    for bad in ("vllm@HEAD", "mesh-colocated@", "mesh-nothing", "mesh-colocated@origin/main"):
        with pytest.raises(argparse.ArgumentTypeError):
            vs_vllm.system_name(bad)


def test_a_mesh_at_a_revision_runs_from_that_revisions_files(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import tempfile

    from bench import vs_vllm

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    plan = vs_vllm.Plan("/m", "vllm-cpu.sh", Path("r"), Path("l"), 128, 64, 2, 2, 8, False)
    system = vs_vllm.make_system("mesh-colocated@HEAD", "bfloat16", plan, ["--x=1"])
    head = subprocess.run(
        ["git", "-C", str(vs_vllm.ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert system.name == "mesh-colocated@HEAD"
    assert (
        system.cwd == tmp_path / f"scalellm-at-{head}" and (system.cwd / "scalellm" / "__init__.py").exists()
    )
    assert system.env == (f"PYTHONPATH={system.cwd}",)
    assert system.command[1:4] == ["-m", "scalellm", "up"] and system.command[-1] == "--x=1"
    here = vs_vllm.make_system("mesh-colocated", "bfloat16", plan, [])
    assert here.cwd == vs_vllm.ROOT and here.env == ()


def test_ours_run_only_at_a_revision_is_set_against_vllm(tmp_path: Path) -> None:
    """A run of mesh-colocated@REV alone (the tree kept free) still gets its ratio to vLLM."""
    _level(tmp_path, 0, "vllm", 64, 80.0, {})
    _level(tmp_path, 0, "mesh-colocated@abc123", 64, 120.0, {})
    lines = vs_vllm_report.table(vs_vllm_report.load_levels(tmp_path), "float32")
    assert lines[0].endswith(
        "| mesh-colocated@abc123 tok/s (TPOT p50, ITL p99 ms) | colocated@abc123 / vLLM |"
    )
    assert lines[2] == "| 64 | 80.0 (100, 200) | 120.0 (100, 200) | **1.50x** |"


def test_each_system_gets_its_own_plot_colour() -> None:
    """NAME@REV alone takes NAME's colour; beside NAME it takes a spare one, never vLLM's."""
    alone = vs_vllm_report.colors(["vllm", "mesh-colocated@abc", "mesh-disaggregated@abc"])
    assert alone == {"vllm": "C1", "mesh-colocated@abc": "C0", "mesh-disaggregated@abc": "C2"}
    beside = vs_vllm_report.colors(["vllm", "mesh-colocated", "mesh-colocated@abc", "mesh-colocated@def"])
    assert beside["mesh-colocated"] == "C0"
    assert {beside["mesh-colocated@abc"], beside["mesh-colocated@def"]} == {"C6", "C7"}
    two = vs_vllm_report.colors(["vllm", "mesh-colocated@abc", "mesh-colocated@def"])  # an A/B
    assert {two["mesh-colocated@abc"], two["mesh-colocated@def"]} == {"C6", "C7"}
