"""compose.yaml, compose.cpu.yaml and docker/: checked by parsing them, since no Docker engine runs
here. The services' environment is fed through the services' own flag parsers, and the container
healthcheck is run against a real gRPC health server."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.redis_script import check_redis_requires_its_password

ROOT = Path(__file__).resolve().parents[2]
GRPC_SERVICES = ("kvstore", "gateway", "prefill", "decode")
WORKERS = ("prefill", "decode")
PROBE = ["CMD", "python", "-m", "scalellm.launcher.probes"]


class _Reset:
    """Compose's `!reset` tag: the key is removed when the files are merged."""


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!reset", lambda loader, node: _Reset())


def _load(name: str) -> dict[str, Any]:
    return yaml.load((ROOT / name).read_text(), Loader=_Loader)  # _Loader is a SafeLoader


def _merge(base: Any, override: Any) -> Any:
    """Compose's merge of an override file, for what these files use: mappings merge, `!reset`
    removes, anything else replaces."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = copy.deepcopy(base)
        for key, value in override.items():
            if isinstance(value, _Reset):
                out.pop(key, None)
            else:
                out[key] = _merge(out.get(key), value)
        return out
    return copy.deepcopy(override)


def _interpolate(value: str) -> str:
    """${VAR:-default} / ${VAR-default} / ${VAR} with an empty host environment; $$ is a $."""
    value = re.sub(r"(?<!\$)\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)
    return value.replace("$$", "$")


def _env(service: dict[str, Any]) -> dict[str, str]:
    return {k: _interpolate(str(v)) for k, v in (service.get("environment") or {}).items()}


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return _load("compose.yaml")["services"]


@pytest.fixture(scope="module")
def cpu_services() -> dict[str, dict[str, Any]]:
    return _merge(_load("compose.yaml"), _load("compose.cpu.yaml"))["services"]


def test_every_tier_is_a_service(services: dict[str, Any]) -> None:
    assert {"redis", "model", "kvstore", "gateway", "prefill", "decode"} <= set(services)
    assert services["redis"]["image"].startswith("redis:")  # the official image
    for name in GRPC_SERVICES:
        assert services[name]["command"][:3] == ["python", "-m", f"services.{name}"]


def test_only_the_gateway_publishes_ports(services: dict[str, Any]) -> None:
    for name, service in services.items():
        assert ("ports" in service) == (name == "gateway"), name
    targets = {str(p).rsplit(":", 1)[1] for p in services["gateway"]["ports"]}
    assert targets == {"8000", "50051"}


def test_workers_can_scale(services: dict[str, Any]) -> None:
    for name in WORKERS:
        for key in ("container_name", "hostname", "ports"):
            assert key not in services[name], f"{name}.{key} would stop --scale {name}=N"
        env = _env(services[name])
        assert "SCALELLM_ADVERTISE_HOST" not in env  # set per container by the entrypoint
        assert env["SCALELLM_KVSTORE"] == "kvstore:50070"


def test_grpc_services_are_health_checked_over_grpc(services: dict[str, Any]) -> None:
    listen = {
        "kvstore": _env(services["kvstore"])["SCALELLM_KVSTORE_ADDR"],
        "gateway": "0.0.0.0:" + _env(services["gateway"])["SCALELLM_GATEWAY_GRPC_PORT"],
        "prefill": _env(services["prefill"])["SCALELLM_LISTEN"],
        "decode": _env(services["decode"])["SCALELLM_LISTEN"],
    }
    for name in GRPC_SERVICES:
        test = services[name]["healthcheck"]["test"]
        assert test[:4] == PROBE, name
        assert test[4].rsplit(":", 1)[1] == listen[name].rsplit(":", 1)[1], name
    assert services["kvstore"]["healthcheck"]["test"][5:] == ["scalellm.v1.Registry"]
    assert services["redis"]["healthcheck"]["test"][0] == "CMD-SHELL"  # redis-cli with the password


def test_the_healthcheck_speaks_grpc_health() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("down", health_pb2.HealthCheckResponse.NOT_SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        probe = [sys.executable, "-m", "scalellm.launcher.probes", f"127.0.0.1:{port}"]
        assert subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
        assert subprocess.run([*probe, "down"], capture_output=True, timeout=30).returncode == 1
    finally:
        server.stop(0)
    assert subprocess.run(probe, capture_output=True, timeout=30).returncode == 1  # nothing listening


def test_workers_reserve_gpus(services: dict[str, Any]) -> None:
    for name in WORKERS:
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    for name in ("gateway", "kvstore", "model"):
        assert "deploy" not in services[name], name


def test_cpu_variant_reserves_no_gpu(cpu_services: dict[str, Any]) -> None:
    for name in WORKERS:
        service = cpu_services[name]
        assert "deploy" not in service, name
        assert service["build"]["dockerfile"] == "docker/Dockerfile.cpu"
        assert _env(service)["SCALELLM_DEVICE"] == "cpu"
        assert _env(service)["SCALELLM_ROLE"] == name  # the base environment is kept
        assert service["healthcheck"]["test"][:4] == PROBE


def test_the_model_is_prepared_once_into_a_shared_volume(services: dict[str, Any]) -> None:
    assert "models" in _load("compose.yaml")["volumes"]
    model = services["model"]
    assert model["command"] == ["scalellm", "model", "prepare"]
    assert model["volumes"] == ["models:/models"] and _env(model)["SCALELLM_CACHE_DIR"] == "/models"
    for name in ("gateway", *WORKERS):
        assert "models:/models:ro" in services[name]["volumes"], name
        assert services[name]["depends_on"]["model"] == {"condition": "service_completed_successfully"}
        assert services[name]["depends_on"]["kvstore"] == {"condition": "service_healthy"}
    path = "/models/models/SmolLM2-135M-Instruct"  # demo_model_dir() under SCALELLM_CACHE_DIR=/models
    assert _env(services["gateway"])["SCALELLM_GATEWAY_MODEL"] == path
    assert all(_env(services[name])["SCALELLM_MODEL"] == path for name in WORKERS)


def test_the_environment_configures_each_service(services: dict[str, Any]) -> None:
    """Each service reads its compose environment through its own parser, as in the container."""
    from scalellm.registry import WorkerRole
    from scalellm.worker.config import parse_worker_args
    from services.gateway.config import GatewayConfig
    from services.kvstore.config import KvstoreConfig

    kv = KvstoreConfig.from_args([], environ=_env(services["kvstore"]))
    assert (kv.listen, kv.redis_url) == ("0.0.0.0:50070", "redis://redis:6379/0")
    gw = GatewayConfig.from_args([], environ=_env(services["gateway"]))
    assert (gw.host, gw.http_port, gw.grpc_port, gw.kvstore) == ("0.0.0.0", 8000, 50051, ("kvstore:50070",))
    for name, role in (("prefill", WorkerRole.PREFILL), ("decode", WorkerRole.DECODE)):
        env = {**_env(services[name]), "SCALELLM_ADVERTISE_HOST": "a1b2c3"}  # what the entrypoint adds
        config = parse_worker_args([], roles=(role,), environ=env)
        assert (config.role, config.kvstore, config.listen) == (role, ("kvstore:50070",), "0.0.0.0:50061")
        assert config.advertised(50061) == "a1b2c3:50061"


def test_every_variable_is_one_the_service_reads(
    services: dict[str, Any], cpu_services: dict[str, Any]
) -> None:
    """A misspelt SCALELLM_* variable would be ignored silently in the container."""
    from scalellm.registry import WorkerRole
    from scalellm.worker.config import worker_options
    from services.gateway import config as gateway
    from services.kvstore import config as kvstore

    worker = {o.env for o in worker_options(tuple(WorkerRole))}  # the SCALELLM_MESH_* ones included
    reads = {
        "kvstore": {o.env for o in kvstore.OPTIONS},
        "gateway": {o.env for o in gateway.OPTIONS},
        "prefill": worker,
        "decode": worker,
        "model": set(),
    }
    assert "SCALELLM_NUM_THREADS" in worker and "SCALELLM_KVSTORE" in worker
    for name, known in reads.items():
        unknown = (
            {k for k in _env(services[name]) if k.startswith("SCALELLM_")} - known - {"SCALELLM_CACHE_DIR"}
        )
        assert not unknown, f"{name} does not read {sorted(unknown)}"


MESH_TOKEN_FILE = "/run/secrets/mesh_token"
REDIS_PASSWORD_FILE = "/run/secrets/redis_password"


def test_secrets_reach_only_the_services_that_need_them(services: dict[str, Any]) -> None:
    """Both secrets come from the environment compose runs in, and reach each service as a file only
    its user can read; no secret is in any service's environment."""
    assert _load("compose.yaml")["secrets"] == {
        "mesh_token": {"environment": "SCALELLM_MESH_TOKEN"},
        "redis_password": {"environment": "SCALELLM_REDIS_PASSWORD"},
    }
    users = {"redis": "999"} | {name: "10001" for name in GRPC_SERVICES}  # the images' users
    wanted = {name: {"mesh_token"} for name in GRPC_SERVICES} | {"redis": {"redis_password"}}
    wanted["kvstore"] = {"mesh_token", "redis_password"}
    for name, service in services.items():
        mounts = service.get("secrets", [])
        assert {m["source"] for m in mounts} == wanted.get(name, set()), name
        for mount in mounts:
            assert (mount["uid"], mount["gid"], str(mount["mode"])) == (users[name], users[name], "0o400"), (
                name
            )
            assert mount["target"] == mount["source"]
        env = _env(service)
        assert "SCALELLM_MESH_TOKEN" not in env and "SCALELLM_REDIS_PASSWORD" not in env, name
        assert all("@" not in v for v in env.values()), f"{name}: a password in a URL"
        if name in GRPC_SERVICES:
            assert env["SCALELLM_MESH_TOKEN_FILE"] == MESH_TOKEN_FILE, name
    assert services["redis"]["user"] == "999:999"
    assert _env(services["kvstore"])["SCALELLM_REDIS_PASSWORD_FILE"] == REDIS_PASSWORD_FILE


def test_each_service_loads_its_secrets(services: dict[str, Any], tmp_path: Path) -> None:
    """The files compose mounts (mode 0400) load through each service's own parser."""
    from scalellm.registry import WorkerRole
    from scalellm.worker.config import parse_worker_args
    from services.gateway.config import GatewayConfig
    from services.kvstore.config import KvstoreConfig

    files = {MESH_TOKEN_FILE: tmp_path / "mesh_token", REDIS_PASSWORD_FILE: tmp_path / "redis_password"}
    for path, value in zip(files.values(), ("m" * 64, "r" * 64), strict=True):
        path.write_text(value + "\n")
        path.chmod(0o400)

    def env(name: str) -> dict[str, str]:
        return {k: str(files.get(v, v)) for k, v in _env(services[name]).items()}

    kv = KvstoreConfig.from_args([], environ=env("kvstore"))
    assert kv.redis_connection_url() == "redis://:" + "r" * 64 + "@redis:6379/0"
    configs = [kv.security, GatewayConfig.from_args([], environ=env("gateway")).security]
    configs += [parse_worker_args([], roles=(r,), environ=env(n)).security for n, r in
                (("prefill", WorkerRole.PREFILL), ("decode", WorkerRole.DECODE))]  # fmt: skip
    for config in configs:
        token = config.load().token
        assert token is not None and token.matches("m" * 64)


def test_the_redis_service_requires_its_password(services: dict[str, Any], tmp_path: Path) -> None:
    """compose's redis command and healthcheck, run with a real redis-server on a free port."""
    script = _interpolate(services["redis"]["command"][2])
    health = _interpolate(services["redis"]["healthcheck"]["test"][1])
    check_redis_requires_its_password(
        script, health, REDIS_PASSWORD_FILE, "set SCALELLM_REDIS_PASSWORD", tmp_path
    )


def test_entrypoint_advertises_the_container_hostname() -> None:
    entrypoint = ROOT / "docker" / "entrypoint.sh"
    show = ["sh", str(entrypoint), "sh", "-c", 'echo "$SCALELLM_ADVERTISE_HOST"']
    out = subprocess.run(
        show, env={"HOSTNAME": "a1b2c3", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True
    )
    assert out.stdout.strip() == "a1b2c3"
    env = {"HOSTNAME": "a1b2c3", "SCALELLM_ADVERTISE_HOST": "w1", "PATH": "/usr/bin:/bin"}
    assert subprocess.run(show, env=env, capture_output=True, text=True).stdout.strip() == "w1"


def _dockerfile(name: str) -> list[str]:
    """Instructions, one per item, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "docker" / name).read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_are_lean_and_run_as_a_user(name: str) -> None:
    lines = _dockerfile(name)
    froms = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    assert len(froms) == 2, "multi-stage: a build stage and a clean final stage"
    final = lines[froms[-1] :]
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the final stage must run as a non-root user"
    assert any(line.startswith("COPY --from=build /opt/venv") for line in final)
    assert any("PIP_NO_CACHE_DIR=1" in line for line in lines)
    for line in lines:
        if "apt-get install" in line:
            assert "--no-install-recommends" in line and "rm -rf /var/lib/apt/lists/*" in line
    entrypoints = [line for line in final if line.startswith("ENTRYPOINT ")]
    assert entrypoints and "scalellm-entrypoint" in entrypoints[-1]
    torch = [i for i, line in enumerate(lines) if "torch==2.13.0" in line]
    project = [i for i, line in enumerate(lines) if re.search(r"pip install \"?/src", line)]
    assert torch and project and torch[0] < project[0], "torch 2.13.0 first, then the project"


def test_cpu_image_pins_the_cpu_torch_wheel() -> None:
    lines = _dockerfile("Dockerfile.cpu")
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in lines
    assert "pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in " ".join(lines)
    assert not any("flash-attn" in line for line in lines)


def test_cuda_image_has_cuda_torch_and_flash_attn() -> None:
    lines = _dockerfile("Dockerfile.cuda")
    froms = [line for line in lines if line.startswith("FROM ")]
    assert froms[0].startswith("FROM nvidia/cuda:") and "-devel-" in froms[0]
    assert froms[1].startswith("FROM nvidia/cuda:") and "-runtime-" in froms[1]
    assert any("/whl/cu" in line for line in lines) and any("flash-attn==" in line for line in lines)


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_build_context_keeps_what_the_image_copies(name: str) -> None:
    text = (ROOT / "docker" / f"{name}.dockerignore").read_text()
    ignore = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "everything else stays out of the build context"
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for line in _dockerfile(name):
        if line.startswith("COPY ") and "--from=" not in line:
            sources = [s for s in line.split()[1:-1] if not s.startswith("--")]
            assert all(s.rstrip("/") in kept for s in sources), line
            assert all((ROOT / s).exists() for s in sources), line


# ---------------------------------------------------------------- failures and restarts


def test_every_long_running_service_is_restarted_and_health_checked(services: dict[str, Any]) -> None:
    """compose's side of `scalellm up`'s restarts: Docker restarts any service that exits, under the
    same service name (the address every other service was given), with its own backoff; only the
    one-shot model job is left alone."""
    for name, service in services.items():
        if name == "model":
            assert service["restart"] == "no"
            continue
        assert service["restart"] == "unless-stopped", name
        assert service["healthcheck"]["test"], name


def test_redis_keeps_no_data_so_a_restart_comes_back_empty(services: dict[str, Any]) -> None:
    """The registry is soft state under leases: after a restart workers register again within a
    heartbeat (docs/deploy.md, "Failures"), so Redis writes nothing to disk."""
    script = services["redis"]["command"][2]
    assert '--save ""' in script and "--appendonly no" in script
    assert "volumes" not in services["redis"]


def test_stopping_a_worker_or_the_gateway_waits_for_its_drain(services: dict[str, Any]) -> None:
    """`docker compose stop` / a rolling replacement sends SIGTERM and kills after the grace
    period: it must cover the drain, or requests in flight are cut."""
    for name, variable in (
        ("prefill", "SCALELLM_DRAIN_TIMEOUT"),
        ("decode", "SCALELLM_DRAIN_TIMEOUT"),
        ("gateway", "SCALELLM_GATEWAY_GRACE_S"),
    ):
        grace = services[name]["stop_grace_period"]
        assert grace.endswith("s") and float(grace[:-1]) > float(_env(services[name])[variable]), name
        assert services[name].get("init") is True, name  # tini forwards SIGTERM to the service


def test_a_second_model_gets_its_own_tiers() -> None:
    """compose.models.yaml: prefill2 / decode2 extend the first model's tiers with another model
    folder and name, and the gateway serves both (each read through its own parser)."""
    from scalellm.registry import WorkerRole
    from scalellm.worker.config import parse_worker_args
    from services.gateway.config import GatewayConfig

    base = _load("compose.yaml")
    extra = _load("compose.models.yaml")["services"]
    merged = _merge(base, {"services": {"gateway": extra["gateway"]}})["services"]
    gateway = GatewayConfig.from_args([], environ=_env(merged["gateway"]))
    assert gateway.add_models == ("second=/models/second",) and gateway.kvstore == ("kvstore:50070",)
    for name, role in (("prefill2", WorkerRole.PREFILL), ("decode2", WorkerRole.DECODE)):
        service = extra[name]
        parent = service["extends"]
        assert parent["file"] == "compose.yaml" and parent["service"] == name.removesuffix("2")
        assert service["depends_on"] == base["services"][parent["service"]]["depends_on"]
        for key in ("container_name", "hostname", "ports"):
            assert key not in service, f"{name}.{key} would stop --scale {name}=N"
        env = {**_env(_merge(base["services"][parent["service"]], service)), "SCALELLM_ADVERTISE_HOST": "h"}
        config = parse_worker_args([], roles=(role,), environ=env)
        assert (config.role, config.served_model_name, config.engine.model) == (
            role,
            "second",
            "/models/second",
        )
