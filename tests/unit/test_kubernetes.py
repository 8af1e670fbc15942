"""deploy/kubernetes/: every manifest validated offline against the Kubernetes schemas that the
kubernetes-validate package bundles, KEDA's ScaledObjects checked structurally (no schema ships for
them), and the wiring checked against the code: selectors match labels, ports are the ones the
services' own flag parsers derive from the manifests' environment, every SCALELLM_* variable is one
the service reads (its option table, or a variable the library reads itself), and the autoscalers'
limits and metric are the planner's. The two secrets (the mesh token, Redis's password) come from
one Secret the operator creates, mounted as files into exactly the pods that need them: every
service loads the same token from its manifest, the kvstore the password Redis's pod requires."""

from __future__ import annotations

import ast
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from scalellm.registry import WorkerRole
from scalellm.security import SecurityConfig
from scalellm.security.files import UNSAFE_BITS
from scalellm.settings import Option
from tests.redis_script import check_redis_requires_its_password

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"  # gRPC probes are GA since 1.27
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _manifests() -> Iterator[tuple[Path, dict[str, Any]]]:
    """What `kubectl apply -f deploy/kubernetes/` applies, then the HPA option."""
    for path in [*sorted(DEPLOY.glob("*.yaml")), DEPLOY / "autoscaling" / "hpa.yaml"]:
        for doc in _docs(path):
            yield path, doc


MANIFESTS = list(_manifests())
BY_KIND: dict[str, dict[str, dict[str, Any]]] = {}
for _, _doc in MANIFESTS:
    BY_KIND.setdefault(_doc["kind"], {})[_doc["metadata"]["name"]] = _doc


def _workloads() -> dict[str, dict[str, Any]]:
    return {name: doc for kind in WORKLOAD_KINDS for name, doc in BY_KIND.get(kind, {}).items()}


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]


def _env(container: dict[str, Any]) -> dict[str, str]:
    """Plain values; valueFrom entries (the pod IP) as a stand-in host."""
    return {e["name"]: e.get("value", "10.0.0.1") for e in container.get("env", [])}


@pytest.mark.parametrize(
    ("path", "doc"), MANIFESTS, ids=lambda v: v.name if isinstance(v, Path) else v["kind"]
)
def test_manifest_validates_against_the_kubernetes_schema(path: Path, doc: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises on any error
    assert doc["metadata"].get("namespace", "scalellm") == "scalellm" or doc["kind"] == "Namespace"


def test_a_wrong_manifest_is_refused() -> None:
    """The validation can fail: an unknown field and a wrong type are errors."""
    import kubernetes_validate

    bad = yaml.safe_load((DEPLOY / "20-kvstore.yaml").read_text().split("---")[0])
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)
    bad["spec"]["replicas"], bad["spec"]["replica"] = 2, 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


# ---------------------------------------------------------------- selectors and Services


def _matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_selectors_match_their_pods_and_each_service_finds_one_workload() -> None:
    workloads = _workloads()
    for name, workload in workloads.items():
        selector = workload["spec"].get("selector", {}).get("matchLabels")
        if selector is not None:
            assert _matches(selector, _pod(workload)["metadata"]["labels"]), name
    for kind in ("Service", "PodDisruptionBudget"):
        for name, doc in BY_KIND[kind].items():
            selector = doc["spec"]["selector"]
            selector = selector.get("matchLabels", selector) if kind == "PodDisruptionBudget" else selector
            found = [w for w, d in workloads.items() if _matches(selector, _pod(d)["metadata"]["labels"])]
            assert len(found) == 1, (kind, name, found)


def test_only_the_gateway_is_reachable_from_outside_and_target_ports_exist() -> None:
    workloads = _workloads()
    for name, service in BY_KIND["Service"].items():
        external = service["spec"].get("type", "ClusterIP") in ("LoadBalancer", "NodePort")
        assert external == (name == "scalellm-gateway"), name
        (workload,) = (
            w
            for w in workloads.values()
            if _matches(service["spec"]["selector"], _pod(w)["metadata"]["labels"])
        )
        ports = {
            p["name"]: p["containerPort"]
            for c in _pod(workload)["spec"]["containers"]
            for p in c.get("ports", [])
        }
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in ports or target in ports.values(), (name, target)


def test_every_serving_tier_has_a_disruption_budget_and_the_workers_ask_for_a_gpu() -> None:
    budgets = {
        doc["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        for doc in BY_KIND["PodDisruptionBudget"].values()
    }
    assert {"gateway", "kvstore", "prefill", "decode"} <= budgets
    for tier in ("prefill", "decode"):
        (container,) = _pod(BY_KIND["Deployment"][f"scalellm-{tier}"])["spec"]["containers"]
        resources = container["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    assert BY_KIND["StatefulSet"]["scalellm-redis"]["spec"]["template"]["spec"]["containers"][0][
        "image"
    ].startswith("redis:")


# ---------------------------------------------------------------- what each service reads


@dataclass(frozen=True)
class ServiceKind:
    """How a container's environment becomes the service's config, and which fields are ports."""

    options: Callable[[], tuple[Option, ...]]
    parse: Callable[[dict[str, str]], Any]
    ports: Callable[[Any], dict[str, int]]
    """Port name in the manifest -> the port the service listens on, from its parsed config."""


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _service_kinds() -> dict[str, ServiceKind]:
    from scalellm.worker.config import parse_worker_args, worker_options
    from services.gateway.config import OPTIONS as GATEWAY
    from services.gateway.config import GatewayConfig
    from services.kvstore.config import OPTIONS as KVSTORE
    from services.kvstore.config import KvstoreConfig
    from services.planner.config import OPTIONS as PLANNER
    from services.planner.config import PlannerServiceConfig

    def worker(roles: tuple[WorkerRole, ...]) -> ServiceKind:
        return ServiceKind(
            lambda: worker_options(roles),
            lambda env: parse_worker_args([], roles, env),
            lambda c: {
                "grpc": _port(c.listen),
                "transfer": _port(c.transfer_listen),
                "metrics": c.metrics_port,
            },
        )

    return {
        "services.kvstore": ServiceKind(
            lambda: KVSTORE, lambda env: KvstoreConfig.from_args([], env),
            lambda c: {"grpc": _port(c.listen), "metrics": c.metrics_port},
        ),
        "services.gateway": ServiceKind(
            lambda: GATEWAY, lambda env: GatewayConfig.from_args([], env),
            lambda c: {"http": c.http_port, "grpc": c.grpc_port},
        ),
        "services.planner": ServiceKind(
            lambda: PLANNER, lambda env: PlannerServiceConfig.from_args([], env),
            lambda c: {"grpc": _port(c.listen), "metrics": c.metrics_port},
        ),
        "services.prefill": worker((WorkerRole.PREFILL,)),
        "services.decode": worker((WorkerRole.DECODE, WorkerRole.BOTH)),
    }  # fmt: skip


def _module_files(module: str) -> set[Path]:
    """The project's source files that ``python -m <module>`` may import: a static walk of the
    import statements (those inside functions too), through scalellm/ and services/ only."""
    found: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        if parts[0] not in ("scalellm", "services"):
            continue
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a, a.b
        base = ROOT.joinpath(*parts)
        path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if path in found or not path.exists():
            continue
        found.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                todo += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return found


def _read_by_the_code(files: Iterable[Path]) -> set[str]:
    """SCALELLM_* names the code reads from the environment itself (os.environ.get("..."),
    os.getenv("..."), os.environ["..."]), outside the option tables: e.g. the model cache."""
    names: set[str] = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            key = None
            if isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Attribute):
                owner, attr = ast.unparse(node.func.value), node.func.attr
                if (attr == "get" and owner.endswith("environ")) or (attr == "getenv" and owner == "os"):
                    key = node.args[0]
            elif isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("environ"):
                key = node.slice
            if (
                isinstance(key, ast.Constant)
                and isinstance(key.value, str)
                and key.value.startswith("SCALELLM_")
            ):
                names.add(key.value)
    return names


def _containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for name, workload in _workloads().items():
        spec = _pod(workload)["spec"]
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            yield name, workload, container


def _reads(kind: ServiceKind, env: dict[str, str]) -> set[str]:
    """The variables the service's parser reads: its option table, the SCALELLM_MESH_* options
    included (nested into every service's config, whose ``security`` they fill)."""
    assert isinstance(kind.parse(env).security, SecurityConfig)
    return {o.env for o in kind.options()}


def test_every_scalellm_variable_is_one_the_service_reads() -> None:
    """Read by the service's parser, or by the code the service imports (not by other code: the
    launcher reads SCALELLM_MESH_TOKEN_FILE, which says nothing of whether the planner does)."""
    kinds = _service_kinds()
    library = _read_by_the_code([*ROOT.glob("scalellm/**/*.py"), *ROOT.glob("services/**/*.py")])
    assert "SCALELLM_CACHE_DIR" in library  # the scan finds what it should
    assert "SCALELLM_MESH_TOKEN_FILE" in library - _read_by_the_code(
        _module_files("services.planner.__main__")
    )
    seen = 0
    for name, _, container in _containers():
        command = container.get("command", [])
        kind = kinds.get(command[2]) if command[:2] == ["python", "-m"] else None
        if kind is None:  # e.g. `scalellm model prepare`
            readable = library
        else:
            readable = _reads(kind, _env(container)) | _read_by_the_code(
                _module_files(f"{command[2]}.__main__")
            )
        for variable in _env(container):
            if variable.startswith("SCALELLM_"):
                seen += 1
                assert variable in readable, f"{name}/{container['name']}: {variable} is read by nothing"
    assert seen > 20


def test_ports_and_probes_are_the_ones_the_services_listen_on() -> None:
    kinds = _service_kinds()
    checked = set()
    for name, _, container in _containers():
        command = container.get("command", [])
        if command[:2] != ["python", "-m"]:
            continue
        kind = kinds[command[2]]
        config = kind.parse(_env(container))  # a bad value would exit here, as in the pod
        listens = kind.ports(config)
        declared = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        assert declared == listens, (name, declared, listens)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            check = container.get(probe, {})
            if "grpc" in check:
                assert check["grpc"]["port"] == listens["grpc"], (name, probe)
        annotations = _pod(_workloads()[name])["metadata"].get("annotations", {})
        if "prometheus.io/port" in annotations:
            assert int(annotations["prometheus.io/port"]) == listens["metrics"], name
        checked.add(command[2])
    assert checked == set(kinds)


def test_addresses_in_the_environment_name_services_and_their_ports() -> None:
    services = {(n, p["port"]) for n, s in BY_KIND["Service"].items() for p in s["spec"]["ports"]}
    addresses = 0
    for name, _, container in _containers():
        for variable, value in _env(container).items():
            if variable.endswith("KVSTORE") or variable == "SCALELLM_REDIS_URL":
                for address in value.removeprefix("redis://").split("/")[0].split(","):
                    host, port = address.rsplit(":", 1)
                    assert (host, int(port)) in services, (name, variable, value)
                    addresses += 1
    assert addresses >= 5


def test_grace_periods_cover_the_drain() -> None:
    for tier, variable in (
        ("prefill", "SCALELLM_DRAIN_TIMEOUT"),
        ("decode", "SCALELLM_DRAIN_TIMEOUT"),
        ("gateway", "SCALELLM_GATEWAY_GRACE_S"),
    ):
        pod = _pod(BY_KIND["Deployment"][f"scalellm-{tier}"])["spec"]
        (container,) = pod["containers"]
        assert pod["terminationGracePeriodSeconds"] > float(_env(container)[variable]), tier


# ---------------------------------------------------------------- the two secrets


def _secret_files(workload: dict[str, Any], container: dict[str, Any]) -> dict[str, tuple[str, str, int]]:
    """Path in the container -> (Secret name, key, file mode) for every Secret file it mounts."""
    volumes = {v["name"]: v["secret"] for v in _pod(workload)["spec"].get("volumes", []) if "secret" in v}
    files = {}
    for mount in container.get("volumeMounts", []):
        secret = volumes.get(mount["name"])
        if secret is not None:
            assert secret.get("items"), "mount only the keys the pod needs"
            for item in secret["items"]:
                mode = item.get("mode", secret.get("defaultMode", 0o644))  # Kubernetes' default
                files[f"{mount['mountPath']}/{item['path']}"] = (secret["secretName"], item["key"], mode)
    return files


def _keys(workload: dict[str, Any], container: dict[str, Any]) -> set[str]:
    return {key for _, key, _ in _secret_files(workload, container).values()}


def _redis() -> tuple[dict[str, Any], dict[str, Any]]:
    redis = BY_KIND["StatefulSet"]["scalellm-redis"]
    (container,) = _pod(redis)["spec"]["containers"]
    return redis, container


def _secret_value(key: str) -> str:
    """A stand-in value per Secret key (a valid mesh token: printable, no spaces, >= 16 chars)."""
    return f"{key}-value-0123456789abcdef"


def test_every_tier_that_talks_to_the_mesh_gets_the_token(tmp_path: Path) -> None:
    """Each service's manifest, parsed by the service's own flag parser with the Secret's files
    written where the pod mounts them (with the manifest's modes, which the services' secret-file
    check must accept): every service holds the same token, and the kvstore the Redis password."""
    kinds = _service_kinds()
    tokens: dict[str, str] = {}
    for name, workload, container in _containers():
        command = container.get("command", [])
        if command[:2] != ["python", "-m"]:
            continue
        pod = _pod(workload)["spec"]
        local = {}
        for path, (_, key, mode) in _secret_files(workload, container).items():
            assert mode & stat.S_IRGRP and not mode & UNSAFE_BITS, (name, path, oct(mode))
            assert pod["securityContext"]["fsGroup"], f"{name}: the pod's user cannot read {path}"
            file = tmp_path / name / key
            file.parent.mkdir(exist_ok=True)
            file.write_text(_secret_value(key) + "\n")
            file.chmod(mode)
            local[path] = str(file)
        env = {k: local.get(v, v) for k, v in _env(container).items()}
        config = kinds[command[2]].parse(env)
        token = config.security.load().token
        assert token is not None, f"{name} talks to the mesh without the mesh token"
        (tokens[command[2]],) = {
            key for key in _keys(workload, container) if token.matches(_secret_value(key))
        }
        if command[2] == "services.kvstore":
            (required,) = _keys(*_redis())  # the key Redis's pod requires
            url = config.redis_connection_url()
            assert url == f"redis://:{_secret_value(required)}@scalellm-redis:6379/0", url
    assert set(tokens) == set(kinds) and len(set(tokens.values())) == 1, tokens


def test_secrets_reach_only_the_pods_that_need_them_and_never_the_environment() -> None:
    mounted: dict[str, set[str]] = {}
    names = set()
    for name, workload, container in _containers():
        for secret, key, _ in _secret_files(workload, container).values():
            names.add(secret)
            mounted.setdefault(key, set()).add(name)
        for entry in container.get("env", []):
            assert "secretKeyRef" not in entry.get("valueFrom", {}), f"{name}: a secret as a variable"
            assert "@" not in str(entry.get("value", "")), f"{name}: a password in a URL"
            assert entry["name"] not in ("SCALELLM_MESH_TOKEN", "SCALELLM_REDIS_PASSWORD"), name
    assert len(names) == 1, names  # one Secret, created by the operator (docs/deploy.md)
    services = {n for n in _workloads() if n not in ("scalellm-redis", "scalellm-model-prepare")}
    assert sorted(mounted.values(), key=len) == [{"scalellm-kvstore", "scalellm-redis"}, services], mounted


def test_the_docs_create_the_secret_the_pods_mount() -> None:
    wanted = {
        (secret, key)
        for _, workload, container in _containers()
        for secret, key, _ in _secret_files(workload, container).values()
    }
    docs = (ROOT / "docs" / "deploy.md").read_text()
    created = re.findall(r"create secret generic (\S+)((?:\s+--from-file=\S+)+)", docs)
    assert created, "docs/deploy.md does not say how to create the Secret"
    made = {(name, key) for name, files in created for key in re.findall(r"--from-file=([\w.-]+)", files)}
    assert made == wanted, (made, wanted)


def test_the_redis_pod_requires_its_password(tmp_path: Path) -> None:
    """The Redis pod's command and readiness probe, run with a real redis-server on a free port."""
    redis, container = _redis()
    (path,) = _secret_files(redis, container)
    assert container["command"][:2] == ["sh", "-c"] and "args" not in container
    probe = container["readinessProbe"]["exec"]["command"]
    assert probe[:2] == ["sh", "-c"]
    check_redis_requires_its_password(
        container["command"][2], probe[2], path, "no redis-password in scalellm-secrets", tmp_path
    )


# ---------------------------------------------------------------- autoscaling on the planner


def _planner_limits() -> dict[str, tuple[int, int]]:
    (container,) = _pod(BY_KIND["Deployment"]["scalellm-planner"])["spec"]["containers"]
    from services.planner.config import PlannerServiceConfig

    config = PlannerServiceConfig.from_args([], _env(container))
    return {
        "prefill": (config.min_prefill, config.max_prefill),
        "decode": (config.min_decode, config.max_decode),
    }


def _served_model() -> str:
    (container,) = _pod(BY_KIND["Deployment"]["scalellm-decode"])["spec"]["containers"]
    env = _env(container)
    return env.get("SCALELLM_SERVED_MODEL_NAME") or Path(env["SCALELLM_MODEL"]).name


def _desired_metric() -> str:
    from services.planner.metrics import PlannerMetrics

    return PlannerMetrics().desired._name  # the name the planner really exports


def test_the_hpas_scale_each_worker_tier_to_the_planners_count() -> None:
    limits, model, metric = _planner_limits(), _served_model(), _desired_metric()
    hpas = BY_KIND["HorizontalPodAutoscaler"]
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas.values()} == {
        "scalellm-prefill",
        "scalellm-decode",
    }
    for hpa in hpas.values():
        target = hpa["spec"]["scaleTargetRef"]
        assert target["name"] in BY_KIND["Deployment"] and target["kind"] == "Deployment"
        tier = target["name"].removeprefix("scalellm-")
        (spec,) = hpa["spec"]["metrics"]
        assert spec["type"] == "External" and spec["external"]["metric"]["name"] == metric
        assert spec["external"]["metric"]["selector"]["matchLabels"] == {"tier": tier, "model": model}
        assert spec["external"]["target"] == {"type": "AverageValue", "averageValue": "1"}
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == limits[tier]


KEDA_SPEC_KEYS = {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod",
                  "idleReplicaCount", "fallback", "advanced", "triggers"}  # fmt: skip


def test_keda_scaled_objects_are_well_formed_and_match_the_planner() -> None:
    limits, model, metric = _planner_limits(), _served_model(), _desired_metric()
    docs = _docs(DEPLOY / "autoscaling" / "keda-scaledobjects.yaml")
    assert len(docs) == 2
    for doc in docs:
        assert (doc["apiVersion"], doc["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
        assert set(doc) == {"apiVersion", "kind", "metadata", "spec"} and set(doc["spec"]) <= KEDA_SPEC_KEYS
        name = doc["spec"]["scaleTargetRef"]["name"]
        assert name in BY_KIND["Deployment"]
        tier = name.removeprefix("scalellm-")
        assert (doc["spec"]["minReplicaCount"], doc["spec"]["maxReplicaCount"]) == limits[tier]
        (trigger,) = doc["spec"]["triggers"]
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        meta = trigger["metadata"]
        assert meta["threshold"] == "1" and meta["serverAddress"].startswith("http")
        assert meta["query"].startswith(f"max({metric}{{") and f'tier="{tier}"' in meta["query"]
        assert f'model="{model}"' in meta["query"]
        behavior = doc["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        import kubernetes_validate  # the HPA behavior KEDA passes on is an HPA's: validate it as one

        hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
               "spec": {"scaleTargetRef": {"kind": "Deployment", "name": name}, "maxReplicas": 2, "behavior": behavior}}  # fmt: skip
        kubernetes_validate.validate(hpa, KUBERNETES_VERSION, strict=True)


def test_the_adapter_rule_exposes_the_planners_metric() -> None:
    (values,) = _docs(DEPLOY / "autoscaling" / "prometheus-adapter-values.yaml")
    (rule,) = values["rules"]["external"]
    metric = _desired_metric()
    assert rule["seriesQuery"].startswith(metric + "{") and rule["name"]["as"] == metric
    assert "by (model, tier)" in rule["metricsQuery"]


# ---------------------------------------------------------------- failures, restarts, rollouts

SERVING_TIERS = ("kvstore", "prefill", "decode", "gateway")


def _probe_window(probe: dict[str, Any]) -> int:
    """Seconds of failing checks before the kubelet acts (its defaults: period 10, threshold 3)."""
    return int(probe.get("periodSeconds", 10)) * int(probe.get("failureThreshold", 3))


def test_every_pod_is_restarted_and_rollouts_never_shrink_a_tier() -> None:
    """Pods restart on exit (the same Service names, so every configured address still works);
    a rolling update starts the new pod before the old one drains (maxUnavailable 0); a new
    worker counts as available only after its registration had time to reach the gateways."""
    for name, workload in _workloads().items():
        if workload["kind"] != "Job":
            assert _pod(workload)["spec"].get("restartPolicy", "Always") == "Always", name
    for tier in SERVING_TIERS:
        spec = BY_KIND["Deployment"][f"scalellm-{tier}"]["spec"]
        assert spec["strategy"]["type"] == "RollingUpdate", tier
        assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}, tier
    for tier in ("prefill", "decode"):
        assert BY_KIND["Deployment"][f"scalellm-{tier}"]["spec"]["minReadySeconds"] >= 5, tier


def test_liveness_survives_a_redis_outage_a_drain_and_an_empty_mesh() -> None:
    """Liveness restarts only a process that stopped answering: never the kvstore for Redis being
    away (its Registry health is NOT_SERVING then: readiness only), never a gateway for having no
    worker, never a worker that is draining (NOT_SERVING) before its grace period is over."""
    containers = {name: c for name, _, c in _containers() if c["name"] == name.removeprefix("scalellm-")}
    kvstore = containers["scalellm-kvstore"]
    assert kvstore["readinessProbe"]["grpc"]["service"] == "scalellm.v1.Registry"
    assert "service" not in kvstore["livenessProbe"]["grpc"]  # "": SERVING while the process serves
    assert "tcpSocket" in containers["scalellm-gateway"]["livenessProbe"]
    assert "tcpSocket" in containers["scalellm-redis"]["livenessProbe"]
    for tier in ("prefill", "decode"):
        pod = _pod(BY_KIND["Deployment"][f"scalellm-{tier}"])["spec"]
        live = containers[f"scalellm-{tier}"]["livenessProbe"]
        assert _probe_window(live) >= pod["terminationGracePeriodSeconds"], tier


def test_the_gateway_leaves_the_load_balancer_before_it_stops_taking_requests() -> None:
    """On SIGTERM the gateway refuses new requests: its preStop pause lets the endpoints controller
    take it out of the Service first, and the grace period covers the pause and the drain."""
    pod = _pod(BY_KIND["Deployment"]["scalellm-gateway"])["spec"]
    (container,) = pod["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and int(command[1]) >= 5
    drain = float(_env(container)["SCALELLM_GATEWAY_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > int(command[1]) + drain


def test_redis_keeps_no_data_and_is_found_by_its_service_name() -> None:
    """After a restart Redis is empty (workers register again) and at the same address."""
    redis, container = _redis()
    script = container["command"][2]
    assert '--save ""' in script and "--appendonly no" in script
    assert "volumeClaimTemplates" not in redis["spec"]
    kvstore_env = _env(_pod(BY_KIND["Deployment"]["scalellm-kvstore"])["spec"]["containers"][0])
    assert kvstore_env["SCALELLM_REDIS_URL"] == f"redis://{redis['spec']['serviceName']}:6379/0"
