"""The gRPC Gateway servicer: a thin layer over GatewayCore (same checks, limits and routing as HTTP)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from scalellm.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.core import GatewayCore
from services.gateway.errors import GatewayError
from services.gateway.grpc_convert import prompt_from_proto, spec_from_proto, update_to_proto


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


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
            with core.scope("grpc_generate") as scope:
                spec = spec_from_proto(request)
                generation = await core.generate(spec, tenant, scope.received_at, context.time_remaining())
                reason = "client"  # why choices still running at the end are cancelled
                try:
                    request_id = generation.request.request_id
                    async for update in generation.updates():
                        yield update_to_proto(update, request_id)
                except GatewayError:
                    reason = "error"
                    raise
                finally:
                    await generation.close(reason)
        except GatewayError as exc:
            error = exc
            await context.abort(exc.kind.grpc_code, exc.message)
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
            core.authenticate(_authorization(context))
            core.preprocessor.check_model(request.model or None)
            (ids,) = await core.preprocessor.tokenize(prompt_from_proto(request))
            return gateway_pb2.TokenizeResponse(
                token_ids=ids, max_total_tokens=core.model.limits.max_total_tokens
            )
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
            self.core.authenticate(_authorization(context))
        except GatewayError as exc:
            self.core.record("grpc_models", exc)
            await context.abort(exc.kind.grpc_code, exc.message)
        model = self.core.model
        card = gateway_pb2.ModelCard(
            id=model.name,
            created=model.created,
            owned_by="scalellm",
            max_total_tokens=model.limits.max_total_tokens,
        )
        self.core.record("grpc_models", None)
        return gateway_pb2.ListModelsResponse(models=[card])
