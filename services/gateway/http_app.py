"""The OpenAI-compatible HTTP API (aiohttp, on the same event loop as the gRPC server).

Routes: POST /v1/completions, POST /v1/chat/completions, POST /v1/responses (over the chat route:
responses.py), GET /v1/models[/{id}], POST /tokenize,
POST /detokenize (vLLM's shapes), GET /version, GET /openapi.json (services/gateway/openapi.py),
GET /health, GET /metrics. Every route but /health, /version and /openapi.json needs an API key
when keys are configured. Errors use
OpenAI's body; once an SSE stream has started, an error is sent as a last ``data: {"error": ...}``
event before ``data: [DONE]``. Send ``x-scalellm-timings: 1`` to get each choice's timings.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from scalellm import __version__
from services.gateway.core import METRICS_CONTENT_TYPE, GatewayCore
from services.gateway.models import ModelLane
from services.gateway.openai_convert import parse_json_object
from services.gateway.openai_format import SSE_CONTENT_TYPE, SSE_DONE, OpenAIFormatter, dumps, sse_event
from services.gateway.openai_parse import (
    Api,
    OpenAIRequest,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_tokenize,
    with_request_id,
)
from services.gateway.openapi import openapi_document
from services.gateway.request import ErrorKind, GatewayError, invalid
from services.gateway.responses import ResponseBuilder, chat_body, renamed
from services.gateway.streaming import Generation

log = logging.getLogger(__name__)

TIMINGS_HEADER = "x-scalellm-timings"
REQUEST_ID_HEADER = "x-request-id"
STREAM_ERROR = web.RequestKey("stream_error", GatewayError)
"""The error a stream ended with after its 200 went out (counted as that error's outcome)."""
_UNCOUNTED = frozenset({"health", "metrics", "version", "openapi"})
"""Routes whose answers are not counted as requests."""
_HTTP_KINDS = {404: ErrorKind.NOT_FOUND, 405: ErrorKind.METHOD_NOT_ALLOWED, 413: ErrorKind.TOO_LARGE}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(exc: GatewayError) -> web.Response:
    return web.Response(
        body=dumps(exc.to_openai()),
        status=exc.kind.http_status,
        content_type="application/json",
        headers={"Retry-After": str(exc.retry_after)} if exc.retry_after else None,
    )


class HttpApi:
    """aiohttp handlers over a GatewayCore."""

    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.core.config.max_payload_bytes, middlewares=[self._errors])
        app.router.add_post("/v1/completions", self.completions, name="completions")
        app.router.add_post("/v1/chat/completions", self.chat, name="chat")
        app.router.add_post("/v1/responses", self.responses, name="responses")
        app.router.add_get("/v1/models", self.models, name="models")
        app.router.add_get("/v1/models/{model}", self.model, name="model")
        app.router.add_post("/tokenize", self.tokenize, name="tokenize")
        app.router.add_post("/detokenize", self.detokenize, name="detokenize")
        app.router.add_get("/version", self.version, name="version")
        app.router.add_get("/openapi.json", self.openapi, name="openapi")
        app.router.add_get("/health", self.health, name="health")
        app.router.add_get("/metrics", self.metrics, name="metrics")
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """OpenAI-shaped errors for everything, and one outcome count per request."""
        route = request.match_info.route.name or "unknown"
        error: BaseException | None = None
        try:
            response = await handler(request)
            error = request.get(STREAM_ERROR)
            return response
        except GatewayError as exc:
            error = exc
            return error_response(exc)
        except web.HTTPException as exc:
            kind = _HTTP_KINDS.get(exc.status, ErrorKind.INVALID)
            message = f"{request.method} {request.path}: {exc.reason}"
            if exc.status == 413:
                message = (
                    f"the request body is larger than the limit of {self.core.config.max_payload_bytes} bytes"
                )
            error = GatewayError(kind, message)
            return error_response(error)
        except ConnectionError as exc:  # the client went away while we wrote
            error = exc
            raise
        except Exception as exc:
            error = exc
            log.exception("unexpected error on %s %s", request.method, request.path)
            return error_response(GatewayError(ErrorKind.INTERNAL, f"internal error: {type(exc).__name__}"))
        except BaseException as exc:  # cancelled: the client went away
            error = exc
            raise
        finally:
            if route not in _UNCOUNTED:
                self.core.record(route, error)

    # -- generation --------------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, Api.COMPLETIONS)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, Api.CHAT)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, Api.CHAT, responses=True)

    async def _generate(self, request: web.Request, api: Api, responses: bool = False) -> web.StreamResponse:
        """responses: a Responses request (services/gateway/responses.py) over the chat route."""
        tenant = self.core.authenticate(request.headers.get("Authorization"))
        async with self.core.scope("responses" if responses else api.value, tenant) as scope:
            data = parse_json_object(await request.read())
            if responses:
                try:
                    call = parse_chat(chat_body(data))
                except GatewayError as exc:
                    raise renamed(exc) from None
            else:
                call = parse_chat(data) if api is Api.CHAT else parse_completion(data)
            call = with_request_id(call, request.headers.get(REQUEST_ID_HEADER))
            generation = await self.core.generate(call.spec, tenant, scope.received_at)
            reason = "client"  # why choices still running at the end are cancelled
            try:
                formatter = OpenAIFormatter(
                    call,
                    generation.request,
                    self.core.model_of(generation.request),
                    request.headers.get(TIMINGS_HEADER) == "1",
                )
                if responses:
                    builder = ResponseBuilder(data, generation.request.model, formatter.created)
                    if call.stream:
                        return await self._stream_response(request, generation, formatter, builder)
                    body = await self._whole_response(generation, formatter, builder)
                elif call.stream:
                    return await self._stream(request, call, generation, formatter)
                else:
                    async for update in generation.updates():
                        formatter.add(update)
                    body = formatter.response()
                return web.Response(
                    body=dumps(body),
                    content_type="application/json",
                    headers={REQUEST_ID_HEADER: formatter.request_id},
                )
            except GatewayError:
                reason = "error"
                raise
            finally:
                await generation.close("error" if STREAM_ERROR in request else reason)

    @staticmethod
    async def _whole_response(
        generation: Generation, formatter: OpenAIFormatter, builder: ResponseBuilder
    ) -> dict[str, Any]:
        async for update in generation.updates():
            formatter.add(update)
        [choice] = formatter.response()["choices"]
        message = choice["message"]
        calls = [{"index": i, **call} for i, call in enumerate(message.get("tool_calls") or ())]
        builder.feed({**message, "tool_calls": calls})
        builder.finish(choice["finish_reason"], formatter.usage())
        return builder.response()

    async def _stream_response(
        self,
        request: web.Request,
        generation: Generation,
        formatter: OpenAIFormatter,
        builder: ResponseBuilder,
    ) -> web.StreamResponse:
        """The Responses events: ``event: <type>`` and ``data: <json>`` each, no [DONE]."""
        response = await _open_stream(request, formatter.request_id)
        events = builder.start()
        try:
            async for update in generation.updates():
                chunk = formatter.chunk(update)
                if chunk is None:
                    continue
                [choice] = chunk["choices"]
                events += builder.feed(choice["delta"])
                if update.finish is not None:
                    events += builder.finish(choice["finish_reason"], formatter.usage())
                await response.write(b"".join(map(_typed_event, events)))
                events = []
        except GatewayError as exc:
            request[STREAM_ERROR] = exc
            error = exc.to_openai()["error"]
            events.append(
                builder.event("error", code=error["code"], message=error["message"], param=error["param"])
            )
        await response.write_eof(b"".join(map(_typed_event, events)))
        return response

    async def _stream(
        self, request: web.Request, call: OpenAIRequest, generation: Generation, formatter: OpenAIFormatter
    ) -> web.StreamResponse:
        response = await _open_stream(request, formatter.request_id)
        running = generation.request.num_choices
        tail = b""  # the last choice's last event: sent with [DONE] and the body's end in one write
        try:
            async for update in generation.updates():
                event = formatter.event(update)
                if update.finish is not None:
                    running -= 1
                if event is None:
                    continue
                if running:
                    await response.write(event)
                else:
                    tail = event
            if call.include_usage:
                tail += sse_event(formatter.usage_chunk())
        except GatewayError as exc:
            request[STREAM_ERROR] = exc
            tail += sse_event(exc.to_openai())
        await response.write_eof(tail + SSE_DONE)
        return response

    # -- the rest ----------------------------------------------------------------------------------

    @staticmethod
    def _card(lane: ModelLane) -> dict[str, Any]:
        return {
            "id": lane.name,
            "object": "model",
            "created": lane.created,
            "owned_by": "scalellm",
            "max_model_len": lane.limits.max_total_tokens,
        }

    async def models(self, request: web.Request) -> web.Response:
        tenant = self.core.authenticate(request.headers.get("Authorization"))
        cards = [self._card(lane) for lane in self.core.lanes_for(tenant)]
        return web.json_response({"object": "list", "data": cards}, dumps=_dumps)

    async def model(self, request: web.Request) -> web.Response:
        tenant = self.core.authenticate(request.headers.get("Authorization"))
        lane = self.core.find(request.match_info["model"], tenant)
        return web.json_response(self._card(lane), dumps=_dumps)

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's /tokenize: the ids a generation request would send (chat template applied)."""
        tenant = self.core.authenticate(request.headers.get("Authorization"))
        call = parse_tokenize(parse_json_object(await request.read()))
        lane, served = await self.core.lane(call.model or None, tenant)
        assert lane.preprocessor is not None  # set once the model is loaded
        (ids,) = await lane.preprocessor.tokenize(call.prompt)
        body: dict[str, Any] = {
            "count": len(ids),
            "max_model_len": served.limits.max_total_tokens,
            "tokens": list(ids),
        }
        if call.return_token_strs:
            body["token_strs"] = [served.tokenizer.id_to_token(t) for t in ids]
        return web.json_response(body, dumps=_dumps)

    async def detokenize(self, request: web.Request) -> web.Response:
        """vLLM's /detokenize: {tokens} -> {prompt} (special tokens kept)."""
        tenant = self.core.authenticate(request.headers.get("Authorization"))
        call = parse_detokenize(parse_json_object(await request.read()))
        _, served = await self.core.lane(call.model or None, tenant)
        tokenizer = served.tokenizer
        bad = next((t for t in call.tokens if t >= tokenizer.vocab_size), None)
        if bad is not None:
            raise invalid(
                f"'tokens': {bad} is not below the vocabulary size {tokenizer.vocab_size}", "tokens"
            )
        return web.json_response(
            {"prompt": tokenizer.decode(call.tokens, skip_special_tokens=False)}, dumps=_dumps
        )

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": __version__}, dumps=_dumps)

    async def openapi(self, request: web.Request) -> web.Response:
        """The OpenAPI 3.1 document of this API (services/gateway/openapi.py)."""
        return web.json_response(openapi_document(__version__), dumps=_dumps)

    async def health(self, request: web.Request) -> web.Response:
        """200 while the gateway can route to a decode worker, else 503 (for load balancers)."""
        sets = self.core.worker_sets()
        ready = self.core.can_serve() and not self.core.draining
        body = {
            "status": "ok" if ready else ("draining" if self.core.draining else "no_workers"),
            "decode_workers": sum(len(w.decode) for w in sets),
            "prefill_workers": sum(len(w.prefill) for w in sets),
            "requests_in_flight": self.core.in_flight,
        }
        return web.json_response(body, status=200 if ready else 503, dumps=_dumps)

    async def metrics(self, request: web.Request) -> web.Response:
        self.core.authenticate(request.headers.get("Authorization"))
        response = web.Response(body=self.core.metrics.render())
        response.headers["Content-Type"] = METRICS_CONTENT_TYPE
        return response


def _dumps(obj: Any) -> str:
    return dumps(obj).decode("utf-8")


async def _open_stream(request: web.Request, request_id: str) -> web.StreamResponse:
    """An SSE response, prepared: its headers go out with the first event."""
    response = web.StreamResponse(
        headers={
            "Content-Type": SSE_CONTENT_TYPE,
            "Cache-Control": "no-cache",
            REQUEST_ID_HEADER: request_id,
        }
    )
    await response.prepare(request)
    return response


def _typed_event(event: dict[str, Any]) -> bytes:
    """A Responses stream event: its type on the ``event:`` line, itself as the data."""
    return b"event: " + event["type"].encode() + b"\n" + sse_event(event)
