"""The models one gateway serves: a ModelLane per model, each with its own worker set and
router, and its tokenizer and chat template loaded once, on the first request that needs them.

    --model PATH [--served-model-name A]      the default model (its lane is loaded at start)
    --add-model B=PATH_B  (repeatable)        more models, loaded lazily; routed to the workers
                                              that registered under B
    request "model": ""  -> the default;  "A" or its folder -> A;  "B" -> B;  else 404 model_not_found

Each lane reads only its workers (RegistryWorkers filtered by the model name they registered),
so a request never reaches a worker of another model and each model's tiers scale on their own.
The lanes share the gateway's Session channels (one per decode worker address).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from scalellm.models.config import ModelConfig
from services.gateway.admission import Preprocessor, ServedModel, TokenLimits
from services.gateway.config import GatewayConfig
from services.gateway.request import ErrorKind, GatewayError
from services.gateway.routing import Router, WorkerSource
from services.gateway.session import WorkerChannels
from services.gateway.streaming import Dispatcher

if TYPE_CHECKING:  # core imports this module
    from services.gateway.core import GatewayMetrics


class ModelLane:
    """One served model: its workers and router now, its tokenizer when first needed."""

    def __init__(
        self,
        name: str,
        path: Path,
        source: WorkerSource,
        config: GatewayConfig,
        parts: tuple[WorkerChannels, GatewayMetrics],
        served: ServedModel | None = None,
    ) -> None:
        self.name = name
        self.path = path
        self.source = source
        self.config = config
        self.router = Router(
            source,
            prefill_fallbacks=config.prefill_fallbacks,
            colocate_below_tokens=config.colocate_below_tokens,
            policy=config.routing_policy,
        )
        self._channels, self._metrics = parts
        # The card's figures come from config.json alone (cheap); a folder the workers could not
        # load is refused at start, not at the first request.
        self.limits = (
            served.limits
            if served
            else TokenLimits.resolve(config, ModelConfig.from_dir(path).context_length)
        )
        self.created = served.created if served else int(time.time())
        self._served: ServedModel | None = None
        self._loading: asyncio.Task[ServedModel] | None = None
        self.preprocessor: Preprocessor | None = None
        self.dispatcher: Dispatcher | None = None
        if served is not None:
            self._install(served)

    def accepts(self, name: str) -> bool:
        return name == self.name or name == str(self.path)

    @property
    def loaded(self) -> ServedModel | None:
        return self._served

    async def load(self) -> ServedModel:
        """The model's tokenizer and chat template, read once (on a thread) however many ask."""
        if self._served is not None:
            return self._served
        if self._loading is None:
            self._loading = asyncio.create_task(
                asyncio.to_thread(ServedModel, self.path, self.config, self.name), name=f"load-{self.name}"
            )
        try:
            served = await asyncio.shield(self._loading)
        except Exception as exc:
            self._loading = None  # the next request tries again
            raise GatewayError(
                ErrorKind.UNAVAILABLE,
                f"the model {self.name!r} could not be loaded: {exc}",
                code="model_unavailable",
            ) from exc
        if self._served is None:
            self._install(served)
        return served

    def _install(self, served: ServedModel) -> None:
        self._served = served
        self.preprocessor = Preprocessor(served, self.config)
        self.dispatcher = Dispatcher(
            self.router,
            self._channels,
            served.tokenizer,
            self._metrics,
            self.config.route_attempts,
            self.config.migration_limit,
            eos_token_ids=served.eos_token_ids,
        )


class ModelCatalog:
    """Every lane, the default first; find() maps a request's model name to its lane."""

    def __init__(self, default: ModelLane) -> None:
        self.default = default
        self.lanes: dict[str, ModelLane] = {default.name: default}

    def add(self, lane: ModelLane) -> None:
        if lane.name in self.lanes:
            raise ValueError(f"the model name {lane.name!r} is served twice")
        self.lanes[lane.name] = lane

    def find(self, name: str | None) -> ModelLane:
        """The lane of a request's model; 404 model_not_found naming what is served."""
        if not name:
            return self.default
        lane = self.lanes.get(name) or next((x for x in self.lanes.values() if x.accepts(name)), None)
        if lane is not None:
            return lane
        raise GatewayError(
            ErrorKind.NOT_FOUND,
            f"the model {name!r} does not exist (this gateway serves {', '.join(map(repr, self.lanes))})",
            param="model",
            code="model_not_found",
        )


def parse_added(specs: tuple[str, ...]) -> list[tuple[str, Path]]:
    """--add-model NAME=PATH values; ValueError on a malformed one."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--add-model takes NAME=PATH, got {spec!r}")
        out.append((name, Path(path)))
    return out


SourceFor = Callable[[str], WorkerSource]
"""A worker source for the workers registered under one model name."""
