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


def test_nested_options_fill_their_own_dataclass() -> None:
    """The mesh security flags every service shares: flag > environment, into config.security,
    by the same mechanism as the engine's flags into config.engine."""
    roles, token = (WorkerRole.DECODE,), "t" * 20
    config = parse_worker_args([], roles, {"SCALELLM_MESH_TOKEN": token})
    assert config.security.mesh_token == token and token not in repr(config)
    flagged = parse_worker_args(["--mesh-token", "u" * 20], roles, {"SCALELLM_MESH_TOKEN": token})
    assert flagged.security.mesh_token == "u" * 20
    with pytest.raises(SystemExit):  # the nested config's own validation is a usage error too
        parse_worker_args(["--mesh-tls-cert", "c.pem"], roles, {})
    assert parse_worker_args([], roles, {}).security.load().token is None


def test_every_worker_listener_binds_the_host_it_is_given() -> None:
    loopback = WorkerConfig(role=WorkerRole.DECODE, listen="127.0.0.1:0")
    assert loopback.metrics_bind_host == "127.0.0.1" and loopback.channel_config().device_host == "127.0.0.1"
    advertised = WorkerConfig(role=WorkerRole.DECODE, listen="0.0.0.0:0", advertise_host="10.1.2.3")
    assert advertised.metrics_bind_host == "0.0.0.0" and advertised.channel_config().device_host == "10.1.2.3"
    assert WorkerConfig(role=WorkerRole.DECODE, metrics_host="::1").metrics_bind_host == "::1"


def test_every_service_reads_the_mesh_security_flags() -> None:
    """Written once (SECURITY_OPTIONS), nested into each service's options; --help shows their
    defaults from SecurityConfig."""
    from scalellm.security import SECURITY_OPTIONS
    from services.gateway.config import OPTIONS as GATEWAY
    from services.gateway.config import GatewayConfig
    from services.kvstore.config import OPTIONS as KVSTORE
    from services.kvstore.config import KvstoreConfig
    from services.planner.config import OPTIONS as PLANNER
    from services.planner.config import PlannerServiceConfig

    tables = {
        WorkerConfig: worker_options((WorkerRole.DECODE,)),
        GatewayConfig: GATEWAY,
        KvstoreConfig: KVSTORE,
        PlannerServiceConfig: PLANNER,
    }
    for cls, options in tables.items():
        by_flag = {o.flag: o for o in options}
        for option in SECURITY_OPTIONS:
            assert by_flag[option.flag].field == f"security.{option.field}", cls
            assert by_flag[option.flag].env == option.env, cls
        parser = build_parser(cls, options, "p", "", extra={"role": WorkerRole.DECODE})
        help_ = next(a.help or "" for a in parser._actions if a.dest == "security.mesh_tls_ca")
        assert help_.endswith("(env SCALELLM_MESH_TLS_CA; default None)"), cls
