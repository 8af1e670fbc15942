"""WorkerConfig embeds the engine's own EngineConfig: flags and SCALELLM_* variables set it, and
--help shows its defaults (one source of truth for engine settings)."""

from __future__ import annotations

from dataclasses import fields

import pytest

from scalellm.engine.config import EngineConfig
from scalellm.registry import WorkerRole
from scalellm.settings import build_parser
from scalellm.worker.config import WorkerConfig, parse_worker_args, worker_options

ROLES = (WorkerRole.PREFILL,)


def test_engine_flags_and_variables_build_the_engine_config() -> None:
    env = {"SCALELLM_KV_CACHE_GB": "0.5", "SCALELLM_NUM_THREADS": "2"}
    config = parse_worker_args(["--model", "/m", "--dtype", "float32", "--block-size", "8"], ROLES, env)
    assert config.engine == EngineConfig(
        model="/m", dtype="float32", block_size=8, kv_cache_gb=0.5, num_threads=2
    )
    assert parse_worker_args([], ROLES, {}).engine == EngineConfig()
    assert parse_worker_args(["--async-scheduling", "on"], ROLES, {}).engine.async_scheduling
    assert parse_worker_args([], ROLES, {"SCALELLM_ASYNC_SCHEDULING": "on"}).engine.async_scheduling
    assert not {f.name for f in fields(WorkerConfig)} & {f.name for f in fields(EngineConfig)}


def test_a_bad_engine_setting_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_worker_args([], ROLES, {"SCALELLM_BLOCK_SIZE": "3"})
    assert "block_size must be a power of two" in capsys.readouterr().err


def test_help_shows_the_engines_defaults() -> None:
    parser = build_parser(WorkerConfig, worker_options(ROLES), "w", "", extra={"role": ROLES[0]})
    helps = {a.dest: a.help or "" for a in parser._actions}
    assert helps["engine.dtype"].endswith(f"default {EngineConfig().dtype!r})")
    assert helps["engine.max_num_seqs"].endswith(f"default {EngineConfig().max_num_seqs!r})")
    assert "--dtype DTYPE" in parser.format_help()
