"""The one converter between scalellm.types and the scalellm.v1 protos, for the gateway and the
workers alike. Proto3 has no "unset" for plain scalars, so 0 stands for it where common.proto
says so (top_p 0 -> 1, max_tokens 0 -> up to the context length).

Building a type validates it: a bad SamplingParams message raises InvalidParameter naming the
field (the workers' interceptor reports it as INVALID_ARGUMENT; the gateway as 'sampling.<field>').
"""

from __future__ import annotations

from scalellm.types.errors import InvalidParameter
from scalellm.types.fairness import DEFAULT_TENANT, TenantShare
from scalellm.types.outputs import FinishReason, Timings, TokenLogprobs, Usage
from scalellm.types.prefill import KVDestination, PrefillResult, PrefillTarget
from scalellm.types.sampling import SamplingParams
from scalellm.types.structured import StructuredKind, StructuredOutput
from scalellm.v1 import common_pb2, worker_pb2

_FINISH_TO_PROTO = {
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
}
_FINISH_FROM_PROTO: dict[int, FinishReason] = {v: k for k, v in _FINISH_TO_PROTO.items()}


# ---- sampling --------------------------------------------------------------------------------


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    """The per-sequence parameters a worker takes (n and stop strings stay with the gateway)."""
    msg = common_pb2.SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        max_tokens=params.max_tokens or 0,
        stop_token_ids=params.stop_token_ids,
        ignore_eos=params.ignore_eos,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        logit_bias=dict(params.logit_bias),
        min_tokens=params.min_tokens,
        bad_words_token_ids=[common_pb2.TokenSequence(token_ids=s) for s in params.bad_words_token_ids],
        allowed_token_ids=params.allowed_token_ids,
    )
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    if params.prompt_logprobs is not None:
        msg.prompt_logprobs = params.prompt_logprobs
    if params.cache_salt is not None:
        msg.cache_salt = params.cache_salt
    if params.structured_output is not None:
        msg.structured_output.CopyFrom(structured_to_proto(params.structured_output))
    return msg


def sampling_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """Unset temperature is greedy, unset top_p is 1, unset max_tokens is up to the context."""
    return SamplingParams(
        temperature=msg.temperature,
        top_p=msg.top_p or 1.0,
        top_k=msg.top_k,
        min_p=msg.min_p,
        seed=msg.seed if msg.HasField("seed") else None,
        max_tokens=msg.max_tokens or None,
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
        cache_salt=msg.cache_salt if msg.HasField("cache_salt") else None,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        repetition_penalty=msg.repetition_penalty or 1.0,
        logit_bias=tuple(sorted(msg.logit_bias.items())),
        min_tokens=msg.min_tokens,
        bad_words_token_ids=tuple(tuple(s.token_ids) for s in msg.bad_words_token_ids),
        allowed_token_ids=tuple(msg.allowed_token_ids),
        structured_output=structured_from_proto(msg.structured_output)
        if msg.HasField("structured_output")
        else None,
    )


def structured_to_proto(so: StructuredOutput) -> common_pb2.StructuredOutput:
    msg = common_pb2.StructuredOutput()
    if so.kind is StructuredKind.JSON_OBJECT:
        msg.json_object = True
    else:
        setattr(msg, so.kind.value, so.spec)
    return msg


def structured_from_proto(msg: common_pb2.StructuredOutput) -> StructuredOutput:
    """A message with no kind set (or json_object false) is refused: it asks for nothing."""
    kind = msg.WhichOneof("kind")
    if kind is None or (kind == "json_object" and not msg.json_object):
        raise InvalidParameter(
            "structured_output", "must set one of json_object, json_schema, regex, lark, choice"
        )
    if kind == "json_object":
        return StructuredOutput.json_object()
    if kind == "choice":
        return StructuredOutput.choice(list(msg.choice.options))
    return StructuredOutput(StructuredKind(kind), getattr(msg, kind))


# ---- outputs ---------------------------------------------------------------------------------


def finish_reason_to_proto(reason: FinishReason | None) -> common_pb2.FinishReason:
    return _FINISH_TO_PROTO[reason] if reason is not None else common_pb2.FINISH_REASON_UNSPECIFIED


def finish_reason_from_proto(value: int) -> FinishReason | None:
    """None while unfinished (FINISH_REASON_UNSPECIFIED)."""
    return _FINISH_FROM_PROTO.get(value)


def logprobs_to_proto(lp: TokenLogprobs) -> common_pb2.TokenLogprobs:
    return common_pb2.TokenLogprobs(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
    )


def logprobs_from_proto(msg: common_pb2.TokenLogprobs) -> TokenLogprobs:
    return TokenLogprobs(msg.token_id, msg.logprob, tuple((t.token_id, t.logprob) for t in msg.top))


def usage_to_proto(usage: Usage) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_prompt_tokens=usage.cached_prompt_tokens,
    )


def usage_from_proto(msg: common_pb2.Usage) -> Usage:
    return Usage(msg.prompt_tokens, msg.completion_tokens, msg.cached_prompt_tokens)


def timings_to_proto(t: Timings) -> common_pb2.Timings:
    return common_pb2.Timings(
        gateway=t.gateway,
        queue=t.queue,
        prefill=t.prefill,
        transfer=t.transfer,
        decode=t.decode,
        transfer_bytes=t.transfer_bytes,
        total=t.total,
        worker_call=t.worker_call,
        migrations=t.migrations,
        remote_prefill=t.remote_prefill,
        prompt_blocks=t.prompt_blocks,
        routed_cached_blocks=t.routed_cached_blocks,
        routed_ahead_tokens=t.routed_ahead_tokens,
    )


def timings_from_proto(msg: common_pb2.Timings) -> Timings:
    return Timings(
        gateway=msg.gateway,
        queue=msg.queue,
        prefill=msg.prefill,
        transfer=msg.transfer,
        decode=msg.decode,
        transfer_bytes=msg.transfer_bytes,
        total=msg.total,
        worker_call=msg.worker_call,
        migrations=msg.migrations,
        remote_prefill=msg.remote_prefill,
        prompt_blocks=msg.prompt_blocks,
        routed_cached_blocks=msg.routed_cached_blocks,
        routed_ahead_tokens=msg.routed_ahead_tokens,
    )


# ---- disaggregated prefill -------------------------------------------------------------------


def tenant_from_proto(name: str, weight: float) -> TenantShare:
    """A request's tenant fields (GenerateRequest, PrefillRequest); weight 0 (unset) is 1.
    InvalidParameter for a negative or non-finite weight."""
    if not name and not weight:
        return DEFAULT_TENANT
    try:
        return TenantShare(name, weight or 1.0)
    except ValueError as exc:
        raise InvalidParameter("tenant_weight", str(exc)) from None


def prefill_target_to_proto(target: PrefillTarget) -> worker_pb2.PrefillTarget:
    return worker_pb2.PrefillTarget(worker_id=target.worker_id, address=target.address)


def prefill_target_from_proto(msg: worker_pb2.PrefillTarget) -> PrefillTarget:
    return PrefillTarget(msg.worker_id, msg.address)


def kv_destination_to_proto(dest: KVDestination) -> worker_pb2.KVDestination:
    return worker_pb2.KVDestination(
        decode_worker_id=dest.decode_worker_id,
        transfer_endpoint=dest.transfer_endpoint,
        transfer_id=dest.transfer_id,
        skip_blocks=dest.skip_blocks,
        block_ids=dest.block_ids,
    )


def kv_destination_from_proto(msg: worker_pb2.KVDestination) -> KVDestination:
    return KVDestination(
        msg.decode_worker_id, msg.transfer_endpoint, msg.transfer_id, msg.skip_blocks, tuple(msg.block_ids)
    )


def prefill_result_to_proto(result: PrefillResult) -> worker_pb2.PrefillResponse:
    reply = worker_pb2.PrefillResponse(
        first_token_id=result.first_token_id,
        cached_prompt_tokens=result.cached_tokens,
        queue_seconds=result.queue_seconds,
        prefill_seconds=result.prefill_seconds,
        transfer_seconds=result.transfer_seconds,
        transfer_bytes=result.transfer_bytes,
    )
    if result.logprobs is not None:
        reply.first_token_logprobs.CopyFrom(logprobs_to_proto(result.logprobs))
    return reply


def prefill_result_from_proto(msg: worker_pb2.PrefillResponse) -> PrefillResult:
    return PrefillResult(
        first_token_id=msg.first_token_id,
        logprobs=logprobs_from_proto(msg.first_token_logprobs)
        if msg.HasField("first_token_logprobs")
        else None,
        cached_tokens=msg.cached_prompt_tokens,
        queue_seconds=msg.queue_seconds,
        prefill_seconds=msg.prefill_seconds,
        transfer_seconds=msg.transfer_seconds,
        transfer_bytes=msg.transfer_bytes,
    )
