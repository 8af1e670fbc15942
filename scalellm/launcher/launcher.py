"""Launcher: start the mesh's processes in order, watch them, stop them in order.

start: model prepared -> Redis -> kvstore -> workers + gateway -> the gateway sees every worker
       (-> the planner, with --autoscale: then workers are started and drained as it says)
stop (SIGINT, SIGTERM, SIGHUP, a child dying during startup, or one that keeps dying): the
planner, gateway, workers, kvstore, Redis, each tier drained in turn (see shutdown.py); a second
signal kills what is left at once.
Once the mesh is up, any child that exits is restarted on the same command line, so at the same
address: Redis on its port with its password, the kvstore on its port, the gateway on the ports
it bound first (restarts.py: backoff, and a budget after which the mesh stops with the child's
last output). Meanwhile workers keep their leases and the gateway routes on its last view. A
worker the autoscaler drains is not restarted (autoscale.py).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from scalellm.launcher import placement, plan
from scalellm.launcher.autoscale import Autoscaler
from scalellm.launcher.child import Child
from scalellm.launcher.config import UpConfig
from scalellm.launcher.probes import grpc_serving, http_health, port_free
from scalellm.launcher.restarts import RestartPolicy, Restarts
from scalellm.launcher.shutdown import stop_in_order
from scalellm.lifecycle import StopSignals
from scalellm.worker import cpu_share

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(Exception):
    """A stop signal arrived while the mesh was starting."""


class LaunchError(Exception):
    """The mesh could not start, or a child died."""


class Launcher:
    def __init__(self, config: UpConfig) -> None:
        self.config = config
        self.children: list[Child] = []
        self._lock = threading.Lock()
        self._signals = StopSignals()
        self._deadline = 0.0
        self._up = False
        self._restarts = Restarts(RestartPolicy(budget=config.max_restarts))
        self._restarted: set[Child] = set()  # restarted, READY line not yet announced
        self._seen = ""
        self._autoscaler: Autoscaler | None = None
        self._spawn: Callable[[str, int], Child] | None = None
        self._secrets = plan.Secrets.for_run(os.environ)
        self._cpu_share: Path | None = None
        """The workers' core-sharing file (worker/cpu_share.py), removed when the mesh stops."""

    def say(self, message: str) -> None:
        self._echo(f"scalellm up: {message}")

    def _echo(self, line: str) -> None:
        """Print a line; a closed stdout (`scalellm up | tee` after Ctrl-C) must not stop the
        shutdown, so output goes to /dev/null from then on."""
        with self._lock:
            try:
                print(line, flush=True)
            except BrokenPipeError:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

    def run(self) -> int:
        """Start, serve until a stop signal (0) or a child's death (1), stop everything."""
        try:
            model_dir = self._prepare()  # before our handlers: Ctrl-C here just interrupts
        except LaunchError as exc:
            self.say(f"error: {exc}")
            return 1
        except KeyboardInterrupt:
            return 130
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._signals.handle)
        try:
            self._start_all(model_dir)
            while True:
                self._check_children()
                time.sleep(0.2)
        except Interrupted:
            return 0
        except LaunchError as exc:
            self.say(f"error: {exc}")
            return 1
        finally:
            if self.children:
                self.say("stopping")
                stop_in_order(self.children, self.config.drain_timeout_s, self._signals.forced, self.say)
                self.say(f"stopped {len(self.children)} processes")
            if self._cpu_share is not None:
                cpu_share.remove(self._cpu_share)

    def _prepare(self) -> Path:
        """Check the gateway's ports, then prepare the model once so the children never race."""
        from scalellm.models.prepare import resolve_model_dir

        c = self.config
        for port in (c.http_port, c.grpc_port):
            if port and not port_free(c.host, port):
                raise LaunchError(f"port {port} on {c.host} is taken: choose --http-port / --grpc-port")
        try:
            model_dir = resolve_model_dir(c.model)
        except ValueError as exc:
            raise LaunchError(str(exc)) from exc
        for model in c.extra_models:
            if not (Path(model.path) / "config.json").is_file():
                raise LaunchError(f"--model {model.name}: {model.path} is not a Hugging Face folder")
        if c.autoscale:  # parses the planner's flags: bad ones exit 2 before anything starts
            self._autoscaler = Autoscaler(c, c.served_model_name or model_dir.name, self.say)
        return model_dir

    def _start_all(self, model_dir: Path) -> None:
        c = self.config
        self._deadline = time.monotonic() + c.startup_timeout_s
        redis_url = c.redis_url or self._start_redis()
        kvstore = self._wait_ready(self._start(plan.kvstore_spec(redis_url))).address
        run_id = uuid.uuid4().hex[:6]
        share = self._cpu_share = cpu_share.create(c.ranks) if c.shares_cpus else None
        run = plan.WorkerRun(c, kvstore, run_id, share)
        workers = [self._start(s) for s in plan.worker_specs(run, model_dir)]
        self._spawn = lambda tier, n: self._start(plan.worker_spec(run, model_dir, tier, n))
        gateway = self._start(plan.gateway_spec(c, model_dir, kvstore))
        for child in (*workers, gateway):
            self._wait_ready(child)
        host = plan.LOOPBACK if c.host in ("0.0.0.0", "::", "") else c.host  # where a local client connects
        assert gateway.ready is not None  # _wait_ready returned: it printed its READY line
        http_port, grpc_port = gateway.ready.port_of(), gateway.ready.port_of("grpc")
        # A restarted gateway binds the ports this one got (--http-port 0 picked any free one).
        gateway.spec = self._secured(plan.gateway_spec(c, model_dir, kvstore, ports=(http_port, grpc_port)))
        scheme = "https" if c.tls_cert else "http"
        health = f"{scheme}://{host}:{http_port}/health"
        self._wait_until(lambda: self._sees_all_workers(health), lambda: f"the gateway to see {self._seen}")
        self.say(f"model {model_dir}" + (f"; gateway listening on {c.host}" if host != c.host else ""))
        if self._autoscaler is not None:
            planner = self._wait_ready(self._start(plan.planner_spec(c, kvstore, self._autoscaler.model)))
            self._autoscaler.metrics_url = planner.spec.metrics
            self.say(
                f"autoscaling: prefill {c.prefill}..{c.max_prefill_workers}, decode {c.decode}..{c.max_decode_workers}"
            )
        if self._secrets.generated_token:
            self.say("internal calls need this run's mesh token (set SCALELLM_MESH_TOKEN to choose it)")
        self._up = True
        self._echo(f"mesh ready: {scheme}://{host}:{http_port}/v1  grpc {host}:{grpc_port}")

    def _start_redis(self) -> str:
        """The private Redis; once it serves, its spec names the port it got, so a restart serves
        the URL the kvstore was given."""
        password = self._secrets.redis_password
        redis = self._wait_ready(self._start(plan.redis_spec(password)))
        redis.spec = self._secured(plan.redis_spec(password, urlsplit(redis.address).port or 0))
        return plan.redis_url_for(redis.address, password)

    def _sees_all_workers(self, health_url: str) -> bool:
        body = http_health(health_url) or {}
        decode, prefill = body.get("decode_workers", 0), body.get("prefill_workers", 0)
        c = self.config
        self._seen = f"{decode}/{c.all_decode} decode-capable and {prefill}/{c.all_prefill} prefill workers"
        return decode >= c.all_decode and prefill >= c.all_prefill

    def _secured(self, spec: plan.ChildSpec) -> plan.ChildSpec:
        return dataclasses.replace(spec, env={**spec.env, **self._secrets.mesh})

    def _start(self, spec: plan.ChildSpec) -> Child:
        child = self._launch(self._secured(spec))
        self.children.append(child)
        return child

    def _launch(self, spec: plan.ChildSpec) -> Child:
        if self.config.pin_cpus and spec.name in placement.SERVICES:
            spec = dataclasses.replace(spec, cpus=placement.service_cores(self.config))
        child = Child(spec, echo=None if self.config.quiet else self._echo)
        child.start()
        self._restarts.started(spec.name)
        self.say(
            f"started {spec.name} pid={child.pid}"
            + (f" cpus={','.join(map(str, spec.cpus))}" if spec.cpus else "")
        )
        return child

    def _wait_ready(self, child: Child) -> Child:
        """Wait for the child's READY line (or for its gRPC health to say SERVING)."""
        if child.spec.ready is plan.Ready.GRPC_HEALTH:
            self._wait_until(lambda: grpc_serving(child.address, child.spec.health_service), child.name)
        else:
            self._wait_until(lambda: child.printed_ready, child.name)
        self._say_ready(child)
        return child

    def _say_ready(self, child: Child) -> None:
        extra = [f"{k}={v}" for k, v in child.ready.fields.items()] if child.ready else []
        metrics = [f"metrics={child.spec.metrics}"] if child.spec.metrics else []
        self.say(" ".join(["ready", child.name, child.address, *extra, f"pid={child.pid}", *metrics]))

    def _wait_until(self, ready: Callable[[], bool], what: str | Callable[[], str]) -> None:
        """Poll ready() until true; a stop signal, a dead child or the startup deadline ends it."""
        start = time.monotonic()
        next_note = start + 30.0
        while not ready():
            self._check_children()
            now = time.monotonic()
            if now > next_note or now > self._deadline:
                waited = f"waiting for {what() if callable(what) else what} ({now - start:.0f} s)"
                if now > self._deadline:
                    raise LaunchError(
                        f"--startup-timeout {self.config.startup_timeout_s:g} s ran out {waited}"
                    )
                self.say(f"still {waited}")
                next_note = now + 30.0
            time.sleep(0.1)

    def _check_children(self) -> None:
        """Raise Interrupted on a stop signal. Once the mesh is up, restart any child that exited
        (after its backoff) and announce restarted ones when they are ready again; raise
        LaunchError for a death during startup or a child that used up its restart budget."""
        if self._signals.requested():
            raise Interrupted
        if self._autoscaler is not None and self._up and self._spawn is not None:
            self._autoscaler.reconcile(self.children, self._spawn)
        for i, child in enumerate(self.children):
            if (code := child.returncode) is None:
                if child in self._restarted and child.printed_ready:
                    self._restarted.discard(child)
                    self._say_ready(child)
                continue
            if self._autoscaler is not None and self._autoscaler.retiring(child):
                continue
            if self._restarts.pending(child.name):
                if self._restarts.due(child.name):
                    self.children[i] = self._restart(child)
                continue
            how = "stopped (status 0)" if code == 0 else f"exited unexpectedly with status {code}"
            died = f"{child.name} (pid {child.pid}) {how}"  # status 0: drained after a SIGTERM
            if not (self._up and child.spec.restart):
                raise LaunchError(f"{died}; its last output:\n{child.tail()}")
            delay = self._restarts.died(child.name)
            if delay is None:
                raise LaunchError(f"{died}; {self._gave_up()}; its last output:\n{child.tail()}")
            child.sweep()  # e.g. the redis-server of a killed Redis supervisor, holding its port
            self.say(f"{died}; restarting it in {delay:.1f} s")

    def _restart(self, child: Child) -> Child:
        self._restarted.discard(child)
        fresh = self._launch(child.spec)
        self._restarted.add(fresh)
        return fresh

    def _gave_up(self) -> str:
        policy = self._restarts.policy
        if not policy.budget:
            return "restarts are off (--max-restarts 0)"
        return (
            f"it died {policy.budget + 1} times in a row, each time within {policy.stable_s:g} s of "
            f"its start (--max-restarts {policy.budget}): giving up"
        )
