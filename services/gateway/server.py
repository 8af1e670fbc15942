"""GatewayServer: the gRPC server (the Gateway front end, health, reflection) and the HTTP app
(http_app) on one event loop; SIGTERM drains.

The gRPC front end is GatewayServicer, a thin layer over GatewayCore (the same checks, limits and
routing as HTTP), with the conversions between the Gateway's messages and the gateway's typed
requests and results (the shared types go through scalellm.types.proto, as on the workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import fields, replace

import grpc
from aiohttp import web
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from scalellm import keepalive
from scalellm.lifecycle import ReadyLine, cancel_and_wait, stop_requested
from scalellm.models.prepare import resolve_model_dir
from scalellm.registry import RegistryClient, WorkerView
from scalellm.text.reasoning import ReasoningStream
from scalellm.types import InvalidParameter, SamplingParams
from scalellm.types.proto import (
    finish_reason_to_proto,
    logprobs_to_proto,
    sampling_from_proto,
    timings_to_proto,
    usage_to_proto,
)
from scalellm.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.admission import ApiKeys, ServedModel
from services.gateway.config import GatewayConfig
from services.gateway.core import GatewayCore
from services.gateway.http_app import HttpApi
from services.gateway.models import SourceFor
from services.gateway.request import (
    CHAT_ROLES,
    ChatMessage,
    ChatRendering,
    ChoiceUpdate,
    GatewayError,
    GenerationRequest,
    GenerationSpec,
    Prompt,
    PromptKind,
    checked_request_id,
    invalid,
)
from services.gateway.routing import RegistryWorkers, StaticWorkers, WorkerSource

log = logging.getLogger(__name__)

GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FIRST_VIEW_WAIT_S = 5.0
"""How long start() waits for the registry's first snapshot before binding anyway: a restarted
gateway that takes connections only once it knows the workers routes its first request."""


class GatewayServer:
    """One gateway replica. Health ("" and scalellm.v1.Gateway) is SERVING while a decode worker is
    routable; /health says the same over HTTP. `source` and `model` may be injected by tests."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        source: WorkerSource | None = None,
        model: ServedModel | None = None,
        source_for: SourceFor | None = None,
    ) -> None:
        self.config = config
        self._source = source
        self._model = model
        self._source_for = source_for
        self.core: GatewayCore | None = None
        self.view: WorkerView | None = None
        self.health = health.aio.HealthServicer()
        self.http_port = 0
        self.grpc_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopped = False

    def _make_source(self, model: ServedModel) -> WorkerSource:
        c = self.config
        if c.decode_addrs:
            return StaticWorkers(c.decode_addrs, c.prefill_addrs)
        if c.kvstore:
            client = RegistryClient(c.kvstore, security=c.security.load())
            if not c.add_models:
                self.view = WorkerView(client, model=model.worker_model)
                return RegistryWorkers(self.view)
            self.view = view = WorkerView(client)  # every model's workers; each lane filters its own
            self._source_for = self._source_for or (lambda name: RegistryWorkers(view, name))
            return RegistryWorkers(view, model.worker_model)
        raise ValueError("no workers to route to: give --kvstore or --decode-addr")

    async def start(self) -> None:
        """Load the tokenizer, start watching the registry, bind both listeners."""
        c = self.config
        model = self._model
        if model is None:
            model = await asyncio.to_thread(ServedModel, resolve_model_dir(c.model), c)
        tls = c.tls.read() if c.tls else None  # a bad certificate or key stops the start here
        source = self._source or self._make_source(model)
        keys = ApiKeys.load(c.api_keys_file) if c.api_keys_file else ApiKeys.disabled()
        self.core = core = GatewayCore(c, model, source, keys, source_for=self._source_for)
        if self.view is not None:
            with contextlib.suppress(asyncio.TimeoutError):  # no registry yet: serve; the view keeps trying
                await self.view.start(wait=True, timeout_s=FIRST_VIEW_WAIT_S)

        options = [("grpc.max_receive_message_length", c.max_payload_bytes), *keepalive.PUBLIC_SERVER_OPTIONS]
        self._grpc = server = grpc.aio.server(options=options)
        gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(core), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (GATEWAY_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        address = f"{c.host}:{c.grpc_port}"
        self.grpc_port = (
            server.add_secure_port(address, tls.server_credentials())
            if tls
            else server.add_insecure_port(address)
        )
        await server.start()

        self._runner = web.AppRunner(HttpApi(core).build_app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        ssl_context = c.tls.server_context() if c.tls else None
        site = web.TCPSite(self._runner, c.host, c.http_port, backlog=1024, ssl_context=ssl_context)
        await site.start()
        self.http_port = self._runner.addresses[0][1]
        await self._update_health()
        self._watch = asyncio.create_task(self._watch_workers(), name="gateway-worker-watch")
        log.info(
            "gateway serving %s: %s %d, grpc%s %d", model.name, "https" if tls else "http", self.http_port,
            " (TLS)" if tls else "", self.grpc_port,
        )  # fmt: skip

    async def _update_health(self) -> None:
        assert self.core is not None
        status = _SERVING if self.core.can_serve() and not self.core.draining else _NOT_SERVING
        for service in ("", GATEWAY_SERVICE):
            await self.health.set(service, status)

    async def _watch_workers(self, period_s: float = 0.5) -> None:
        """Keep health in step with the worker set and close channels to workers that left."""
        assert self.core is not None
        last = None
        while True:
            current = self.core.worker_sets()
            if last is None or any(a is not b for a, b in zip(current, last, strict=True)):
                last = current
                await self._update_health()
                self.core.prune_channels()
            await asyncio.sleep(period_s)

    async def stop(self, grace_s: float | None = None) -> None:
        """Refuse new requests, let those in flight finish for grace_s, then close (idempotent)."""
        if self._stopped or self.core is None:
            return
        self._stopped = True
        core = self.core
        core.draining = True
        grace = self.config.grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while core.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self._watch is not None:
            await cancel_and_wait(self._watch)
        if self._grpc is not None:
            await self._grpc.stop(0.5)
        if self._runner is not None:
            await self._runner.cleanup()
        if self.view is not None:
            await self.view.stop()
            await self.view.client.close()
        await core.close()


async def serve(config: GatewayConfig) -> None:
    """Run one gateway until SIGTERM or SIGINT, then drain gracefully."""
    server = GatewayServer(config)
    await server.start()
    stopping = stop_requested()  # before READY: a stop right after it drains
    print(
        ReadyLine(f"{config.host}:{server.http_port}", {"grpc": f"{config.host}:{server.grpc_port}"}),
        flush=True,
    )
    try:
        await stopping.wait()
        log.info("gateway shutting down (grace %.1f s)", config.grace_s)
    finally:
        await server.stop()


# ---- the gRPC front end --------------------------------------------------------------------------


def _retry_metadata(exc: GatewayError) -> tuple[tuple[str, str], ...]:
    """A refusal's retry-after (seconds) as trailing metadata, as HTTP's Retry-After."""
    return (("retry-after", str(exc.retry_after)),) if exc.retry_after else ()


def _metadata(context: grpc.aio.ServicerContext, name: str) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    return _metadata(context, "authorization")


REQUEST_ID_METADATA = "x-request-id"
"""A Generate call's id: the client's (checked) in its metadata, and the answer's in the
response's initial metadata, as X-Request-Id over HTTP."""


def _client_request_id(context: grpc.aio.ServicerContext) -> str | None:
    value = _metadata(context, REQUEST_ID_METADATA)
    return None if value is None else checked_request_id(value, REQUEST_ID_METADATA)


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """scalellm.v1.Gateway over a GatewayCore."""

    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    async def Generate(
        self, request: gateway_pb2.GatewayGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GatewayGenerateResponse]:
        core = self.core
        error: BaseException | None = None
        try:
            tenant = core.authenticate(_authorization(context))
            async with core.scope("grpc_generate", tenant) as scope:
                spec = replace(spec_from_proto(request), request_id=_client_request_id(context))
                generation = await core.generate(spec, tenant, scope.received_at, context.time_remaining())
                reason = "client"  # why choices still running at the end are cancelled
                try:
                    request_id = spec.request_id or generation.request.request_id
                    await context.send_initial_metadata(((REQUEST_ID_METADATA, request_id),))
                    splits = _reasoning_streams(core, spec, generation.request)
                    async for update in generation.updates():
                        yield update_to_proto(update, request_id, splits.get(update.index))
                except GatewayError:
                    reason = "error"
                    raise
                finally:
                    await generation.close(reason)
        except GatewayError as exc:
            error = exc
            await context.abort(exc.kind.grpc_code, exc.message, _retry_metadata(exc))
        except BaseException as exc:
            error = exc
            raise
        finally:
            core.record("grpc_generate", error)

    async def Tokenize(
        self, request: gateway_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.TokenizeResponse:
        core, error = self.core, None
        try:
            tenant = core.authenticate(_authorization(context))
            lane, _ = await core.lane(request.model or None, tenant)
            assert lane.preprocessor is not None
            (ids,) = await lane.preprocessor.tokenize(prompt_from_proto(request))
            return gateway_pb2.TokenizeResponse(token_ids=ids, max_total_tokens=lane.limits.max_total_tokens)
        except GatewayError as exc:
            error = exc
            await context.abort(exc.kind.grpc_code, exc.message)
            raise  # unreachable: abort raises
        finally:
            core.record("grpc_tokenize", error)

    async def ListModels(
        self, request: gateway_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListModelsResponse:
        try:
            tenant = self.core.authenticate(_authorization(context))
        except GatewayError as exc:
            self.core.record("grpc_models", exc)
            await context.abort(exc.kind.grpc_code, exc.message)
            raise  # unreachable: abort raises
        cards = [
            gateway_pb2.ModelCard(
                id=lane.name,
                created=lane.created,
                owned_by="scalellm",
                max_total_tokens=lane.limits.max_total_tokens,
            )
            for lane in self.core.lanes_for(tenant)
        ]
        self.core.record("grpc_models", None)
        return gateway_pb2.ListModelsResponse(models=cards)


# ---- its messages --------------------------------------------------------------------------------


def _messages(chat: gateway_pb2.ChatMessages, param: str) -> tuple[ChatMessage, ...]:
    if not chat.messages:
        raise invalid(f"'{param}.messages' must hold at least one message", param)
    out = []
    for i, m in enumerate(chat.messages):
        if m.role not in CHAT_ROLES:
            raise invalid(
                f"'{param}.messages[{i}].role' must be one of {sorted(CHAT_ROLES)}, got {m.role!r}", param
            )
        out.append(ChatMessage("system" if m.role == "developer" else m.role, m.content, m.name or None))
    return tuple(out)


def prompt_from_proto(msg: gateway_pb2.GatewayGenerateRequest | gateway_pb2.TokenizeRequest) -> Prompt:
    """The oneof `prompt`; INVALID_ARGUMENT when none is set."""
    which = msg.WhichOneof("prompt")
    if which == "text":
        return Prompt(PromptKind.TEXT, "text", texts=(msg.text,))
    if which == "token_ids" and isinstance(msg, gateway_pb2.GatewayGenerateRequest):
        return Prompt(PromptKind.TOKENS, "token_ids", token_ids=(tuple(msg.token_ids.ids),))
    if which == "chat":
        chat = msg.chat
        rendering = ChatRendering(
            add_generation_prompt=not chat.continue_final_message,
            continue_final_message=chat.continue_final_message,
            template_kwargs=json_format.MessageToDict(chat.template_kwargs),
        )
        return Prompt(PromptKind.CHAT, "chat", messages=_messages(chat, "chat"), rendering=rendering)
    raise invalid("a prompt is required: set text, token_ids or chat", "prompt")


_TOP_LEVEL = frozenset({"n", "stop", "include_stop_str_in_output", "skip_special_tokens", "bad_words"})
"""SamplingParams fields that GatewayGenerateRequest holds itself, not in its `sampling`."""
_SAMPLING_NAMES = {f.name: f"sampling.{f.name}" for f in fields(SamplingParams) if f.name not in _TOP_LEVEL}
"""A SamplingParams field's name in a Generate request (GenerationSpec.param_names)."""


def spec_from_proto(msg: gateway_pb2.GatewayGenerateRequest) -> GenerationSpec:
    """A Generate request as a GenerationSpec; INVALID_ARGUMENT naming the field otherwise."""
    prompt = prompt_from_proto(msg)
    try:
        sampling = replace(
            sampling_from_proto(msg.sampling),
            n=msg.n or 1,
            stop=tuple(msg.stop),
            include_stop_str_in_output=msg.include_stop_str,
            skip_special_tokens=not msg.keep_special_tokens,
            bad_words=tuple(msg.bad_words),
        )
    except InvalidParameter as exc:
        param = exc.field if exc.field in _TOP_LEVEL else f"sampling.{exc.field}"
        raise invalid(exc.message_for(param), param) from None
    return GenerationSpec(
        model=msg.model or None,
        prompt=prompt,
        sampling=sampling,
        priority=msg.priority,
        param_names=_SAMPLING_NAMES,
    )


def _reasoning_streams(
    core: GatewayCore, spec: GenerationSpec, request: GenerationRequest
) -> dict[int, ReasoningStream]:
    """Each choice's reasoning splitter: for a chat, when the gateway has a reasoning parser."""
    if spec.prompt.kind is not PromptKind.CHAT:
        return {}
    model = core.model_of(request)
    streams = {i: model.reasoning_stream(request.prompt_of(i)) for i in range(request.num_choices)}
    return {i: stream for i, stream in streams.items() if stream is not None}


def update_to_proto(
    update: ChoiceUpdate, request_id: str, reasoning: ReasoningStream | None = None
) -> gateway_pb2.GatewayGenerateResponse:
    """One choice update as a response message; with its choice's reasoning splitter, the text
    split into reasoning and what follows it."""
    out = gateway_pb2.GatewayGenerateResponse(
        request_id=request_id, index=update.index, token_ids=update.token_ids
    )
    if reasoning is None:
        out.text = update.text
    else:
        out.reasoning, out.text = reasoning.feed(update.text, final=update.finish is not None)
    if update.logprobs:
        out.logprobs.extend(logprobs_to_proto(lp) for lp in update.logprobs)
    if update.prompt_logprobs:
        out.prompt_logprobs.extend(logprobs_to_proto(lp) for lp in update.prompt_logprobs)
    if update.finish is not None:
        out.finish_reason = finish_reason_to_proto(update.finish)
        out.stop_str = update.stop_str or ""
        if update.usage is not None:
            out.usage.CopyFrom(usage_to_proto(update.usage))
        if update.timings is not None:
            out.timings.CopyFrom(timings_to_proto(update.timings))
    return out
