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
    assert parse_worker_args([], roles, env).max_num_seqs == 7
    assert parse_worker_args(["--max-num-seqs", "9"], roles, env).max_num_seqs == 9
    assert parse_worker_args([], roles, {}).max_num_seqs == WorkerConfig(role=roles[0]).max_num_seqs


def test_bad_environment_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_worker_args([], (WorkerRole.DECODE,), {"SCALELLM_MAX_NUM_SEQS": "many"})
    assert "SCALELLM_MAX_NUM_SEQS='many'" in capsys.readouterr().err


def test_a_group_of_flags_fills_its_own_dataclass() -> None:
    """The mesh security flags every service shares: flag > environment, into config.security."""
    roles, token = (WorkerRole.DECODE,), "t" * 20
    config = parse_worker_args([], roles, {"SCALELLM_MESH_TOKEN": token})
    assert config.security.mesh_token == token and token not in repr(config)
    flagged = parse_worker_args(["--mesh-token", "u" * 20], roles, {"SCALELLM_MESH_TOKEN": token})
    assert flagged.security.mesh_token == "u" * 20
    with pytest.raises(SystemExit):  # the group's own validation is a usage error too
        parse_worker_args(["--mesh-tls-cert", "c.pem"], roles, {})
    assert parse_worker_args([], roles, {}).security.load().token is None


def test_every_worker_listener_binds_the_host_it_is_given() -> None:
    loopback = WorkerConfig(role=WorkerRole.DECODE, listen="127.0.0.1:0")
    assert loopback.metrics_bind_host == "127.0.0.1" and loopback.channel_config().device_host == "127.0.0.1"
    advertised = WorkerConfig(role=WorkerRole.DECODE, listen="0.0.0.0:0", advertise_host="10.1.2.3")
    assert advertised.metrics_bind_host == "0.0.0.0" and advertised.channel_config().device_host == "10.1.2.3"
    assert WorkerConfig(role=WorkerRole.DECODE, metrics_host="::1").metrics_bind_host == "::1"
