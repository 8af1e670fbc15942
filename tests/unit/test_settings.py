"""scalellm.settings: what --help says about defaults, and the flag > environment > default order."""

from __future__ import annotations

import pytest

from scalellm.registry import WorkerRole
from scalellm.settings import build_parser
from scalellm.worker.config import WorkerConfig, parse_worker_args, worker_options


def test_help_shows_real_defaults_never_a_sentinel() -> None:
    roles = (WorkerRole.DECODE, WorkerRole.BOTH)
    parser = build_parser(WorkerConfig, worker_options(roles), "w", "", extra={"role": roles[0]})
    text = parser.format_help()
    assert "MISSING" not in text and "dataclasses" not in text
    role = next(a for a in parser._actions if a.dest == "role")
    assert role.help is not None and role.help.endswith("default decode)")


def test_flag_beats_environment_beats_default() -> None:
    roles = (WorkerRole.DECODE,)
    env = {"SCALELLM_MAX_NUM_SEQS": "7"}
    assert parse_worker_args([], roles, env).engine.max_num_seqs == 7
    assert parse_worker_args(["--max-num-seqs", "9"], roles, env).engine.max_num_seqs == 9
    assert (
        parse_worker_args([], roles, {}).engine.max_num_seqs
        == WorkerConfig(role=roles[0]).engine.max_num_seqs
    )


def test_bad_environment_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_worker_args([], (WorkerRole.DECODE,), {"SCALELLM_MAX_NUM_SEQS": "many"})
    assert "SCALELLM_MAX_NUM_SEQS='many'" in capsys.readouterr().err
