"""The OpenAPI 3.1 document of the gateway's HTTP API, served at GET /openapi.json.

Written by hand (the parsers read JSON through ``Body``, there are no request models to generate
it from); tests/unit/test_gateway_openapi.py keeps it true: every route of the aiohttp app is in
``paths``, each request schema lists exactly the fields its parser reads, and every example in it
is accepted by a running gateway. Fields a known OpenAI client may send but that change nothing
here are listed with the only values accepted (``enum``).
"""

from __future__ import annotations

import copy
from typing import Any

from services.gateway.responses import PASSED_AS_IS

J = dict[str, Any]


def _ref(name: str) -> J:
    return {"$ref": f"#/components/schemas/{name}"}


def _t(kind: str, description: str, **extra: Any) -> J:
    return {"type": kind, "description": description, **extra}


def _only(description: str, *values: Any) -> J:
    return {
        "description": description + " (accepted only with this value: changes nothing)",
        "enum": list(values),
    }


def _function(properties: J) -> J:
    """{"type": "function", "function": {<properties>}} (a tool, a named tool choice)."""
    function = {
        "type": "object",
        "required": ["name"],
        "properties": properties,
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "required": ["type", "function"],
        "properties": {"type": {"enum": ["function"]}, "function": function},
        "additionalProperties": False,
    }


_STRINGS = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}}

SAMPLING: J = {
    "model": _t("string", "The served model's name or folder; empty: the served model"),
    "n": _t("integer", "Choices per prompt", minimum=1),
    "temperature": _t("number", "0 is greedy", minimum=0, maximum=2),
    "top_p": _t("number", "Nucleus sampling, in (0, 1]", exclusiveMinimum=0, maximum=1),
    "top_k": _t("integer", "vLLM: keep the k most likely tokens (0 or -1: all)", minimum=-1),
    "min_p": _t(
        "number", "vLLM: drop tokens below min_p x the top token's probability", minimum=0, maximum=1
    ),
    "seed": _t("integer", "Per-request seed (choice i uses seed + i % n)", minimum=0),
    "stop": {**_STRINGS, "description": "Stop strings (not in the text unless include_stop_str_in_output)"},
    "stop_token_ids": {**_TOKEN_IDS, "description": "vLLM: token ids that end a choice"},
    "ignore_eos": _t("boolean", "vLLM: keep generating past EOS"),
    "skip_special_tokens": _t("boolean", "vLLM: leave special tokens out of the text (default true)"),
    "include_stop_str_in_output": _t(
        "boolean", "vLLM: keep the matched stop string (and the text of the token that ended the choice)"
    ),
    "truncate_prompt_tokens": _t(
        "integer", "vLLM: keep only the prompt's last k tokens (-1: the limit)", minimum=-1
    ),
    "presence_penalty": _t("number", "", minimum=-2, maximum=2),
    "frequency_penalty": _t("number", "", minimum=-2, maximum=2),
    "repetition_penalty": _t("number", "vLLM: > 0, 1 is off", exclusiveMinimum=0),
    "logit_bias": {
        "type": "object",
        "description": "Token id (as a string) -> bias in [-100, 100]",
        "patternProperties": {"^[0-9]+$": {"type": "number", "minimum": -100, "maximum": 100}},
        "additionalProperties": False,
    },
    "min_tokens": _t("integer", "vLLM: no EOS / stop token before this many tokens", minimum=0),
    "bad_words": {**_STRINGS, "description": "vLLM: words never generated"},
    "allowed_token_ids": {
        **_TOKEN_IDS,
        "minItems": 1,
        "description": "vLLM: only these token ids are generated",
    },
    "cache_salt": _t(
        "string",
        "vLLM: prefix-cache blocks are shared only with requests of the same salt (namespaced by tenant)",
        minLength=1,
        maxLength=1024,
    ),
    "response_format": _ref("ResponseFormat"),
    "guided_json": {"anyOf": [{"type": "object"}, {"type": "string"}], "description": "vLLM: a JSON Schema"},
    "guided_regex": _t("string", "vLLM: the output matches this regex"),
    "guided_choice": {
        "type": "array",
        "items": {"type": "string"},
        "minItems": 1,
        "description": "vLLM: the output is exactly one of these",
    },
    "guided_grammar": _t("string", "vLLM: a grammar the output follows (Lark, or GBNF: root ::= ...)"),
    "structured_outputs": {
        "type": "object",
        "description": "vLLM's: exactly one of json, regex, choice, grammar, json_object",
        "properties": {
            "json": {"anyOf": [{"type": "object"}, {"type": "string"}]},
            "regex": {"type": "string"},
            "choice": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "grammar": {"type": "string"},
            "json_object": {"type": "boolean"},
            "disable_fallback": {"type": "boolean"},
            "disable_any_whitespace": {"type": "boolean"},
        },
        "additionalProperties": False,
    },
    "stream": _t("boolean", "Server-sent events"),
    "stream_options": {
        "type": "object",
        "description": "Only with stream: true",
        "properties": {"include_usage": {"type": "boolean"}, "continuous_usage_stats": {"type": "boolean"}},
        "additionalProperties": False,
    },
    "user": _t("string", "An end-user id (accepted, changes nothing)"),
    "priority": _t("integer", "vLLM: lower runs first on the workers", minimum=-(2**31), maximum=2**31 - 1),
    "request_id": _t(
        "string",
        "vLLM: the answer's id (X-Request-Id wins over it)",
        pattern="^[A-Za-z0-9._:@/+=-]{1,128}$",
    ),
    "return_tokens_as_token_ids": _t("boolean", 'vLLM: logprobs name tokens "token_id:<id>"'),
    "use_beam_search": _only("vLLM: beam search", False),
    "length_penalty": _only("vLLM: beam search's length penalty", 1),
    "early_stopping": _only("vLLM: beam search's stopping rule", False),
    "guided_whitespace_pattern": _only("vLLM: JSON's whitespace (always compact here)", None),
    "guided_decoding_backend": _t("string", "vLLM: accepted, changes nothing (one grammar engine)"),
    "spaces_between_special_tokens": _only("vLLM: the tokenizer's spacing is the only one", True),
}

_PROMPT = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
        {**_TOKEN_IDS, "minItems": 1},
        {"type": "array", "items": {**_TOKEN_IDS, "minItems": 1}, "minItems": 1},
    ],
    "description": "A text, a batch of texts, token ids or a batch of token id lists",
}

COMPLETION_REQUEST: J = {
    "type": "object",
    "required": ["prompt"],
    "additionalProperties": False,
    "properties": {
        "prompt": _PROMPT,
        "max_tokens": _t("integer", "Default 16; 0 only with echo (scores the prompt)", minimum=0),
        "logprobs": _t("integer", "Top alternatives per token", minimum=0, maximum=20),
        **SAMPLING,
        "echo": _t(
            "boolean", "The prompt's text (with logprobs: its logprobs, the first null) before the output"
        ),
        "prompt_logprobs": _t(
            "integer",
            "vLLM: each choice's prompt_logprobs (alternatives per prompt token)",
            minimum=0,
            maximum=20,
        ),
        "suffix": _only("Text after the completion", ""),
        "best_of": _only("Server-side best of", 1),
    },
}

_TEXT_PART = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}},
    "additionalProperties": False,
}
_TOOL_CALL = {
    "type": "object",
    "required": ["function"],
    "properties": {
        "id": {"type": "string"},
        "type": {"enum": ["function"]},
        "function": {
            "type": "object",
            "required": ["name", "arguments"],
            "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}},
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}

SCHEMAS: J = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    },
    "ResponseFormat": {
        "type": "object",
        "required": ["type"],
        "properties": {
            "type": {"enum": ["text", "json_object", "json_schema"]},
            "json_schema": {
                "type": "object",
                "required": ["schema"],
                "properties": {
                    "name": {"type": "string"},
                    "description": {"type": "string"},
                    "strict": {"type": "boolean"},
                    "schema": {"type": "object"},
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
    "Message": {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
            "content": {
                "anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}, {"type": "null"}],
                "description": "Required except on assistant messages",
            },
            "name": {"type": "string"},
            "tool_calls": {"type": "array", "items": _TOOL_CALL, "description": "Assistant messages"},
            "tool_call_id": {"type": "string", "description": "Tool messages: the call answered"},
            "reasoning_content": {"type": "string", "description": "Assistant messages: their reasoning"},
            "reasoning": {"type": "string", "description": "vLLM's newer name for reasoning_content"},
            "function_call": {"enum": ["", []]},
            "audio": {"enum": ["", []]},
            "refusal": {"enum": ["", []]},
        },
        "additionalProperties": False,
    },
    "Tool": _function(
        {
            "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
            "description": {"type": "string"},
            "parameters": {"type": "object", "description": "A JSON Schema"},
            "strict": {"type": "boolean"},
        }
    ),
    "CompletionRequest": COMPLETION_REQUEST,
}

CHAT_RENDERING: J = {
    "add_generation_prompt": _t("boolean", "Open the assistant's turn after the messages (default true)"),
    "continue_final_message": _t(
        "boolean",
        "The model continues the last message (an answer's beginning) instead of starting a turn; "
        "needs add_generation_prompt: false",
    ),
    "chat_template_kwargs": {
        "type": "object",
        "description": 'Extra variables for the chat template, e.g. {"enable_thinking": false}',
    },
}

CHAT_REQUEST: J = {
    "type": "object",
    "required": ["messages"],
    "additionalProperties": False,
    "properties": {
        "messages": {"type": "array", "items": _ref("Message"), "minItems": 1},
        **CHAT_RENDERING,
        "max_tokens": _t("integer", "Default: the rest of the context", minimum=1),
        "max_completion_tokens": _t("integer", "OpenAI's newer name for max_tokens", minimum=1),
        "logprobs": _t("boolean", "Log-probabilities of the output tokens"),
        "top_logprobs": _t("integer", "Alternatives per token (with logprobs: true)", minimum=0, maximum=20),
        **SAMPLING,
        "tools": {"type": "array", "items": _ref("Tool")},
        "tool_choice": {
            "anyOf": [
                {"enum": ["none", "auto", "required"]},
                _function({"name": {"type": "string"}}),
            ],
            "description": "Default auto with tools; required / a named function is forced by a grammar",
        },
        "parallel_tool_calls": _t("boolean", "false: at most one call"),
        "store": _t("boolean", "Accepted, nothing is stored"),
        "metadata": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "Accepted, ignored",
        },
        "service_tier": _t("string", "Accepted, there is one tier"),
        "echo": _t(
            "boolean", "vLLM: the last message's content before the answer's, when it is the assistant's"
        ),
        "best_of": _only("Server-side best of", 1),
        "functions": _only("Deprecated form of tools", []),
        "function_call": _only("Deprecated form of tool_choice", "none"),
        "audio": _only("Audio output", None),
        "modalities": _only("Output modalities", ["text"]),
        "prediction": _only("Predicted output", None),
        "reasoning_effort": _only("Reasoning models only", None),
        "web_search_options": _only("Web search", None),
    },
}
SCHEMAS["ChatCompletionRequest"] = CHAT_REQUEST
SCHEMAS["ResponsesRequest"] = {
    "type": "object",
    "required": ["input"],
    "additionalProperties": False,
    "description": "OpenAI's Responses API, served over the chat completions route (docs/gateway.md)",
    "properties": {
        "model": SAMPLING["model"],
        "input": {
            "anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "object"}}],
            "description": "A user message, or items: messages (text parts), function_call, "
            "function_call_output, reasoning (dropped)",
        },
        "instructions": _t("string", "A system message before the input"),
        "max_output_tokens": _t("integer", "Default: the rest of the context", minimum=1),
        **{key: CHAT_REQUEST["properties"][key] for key in PASSED_AS_IS if key != "model"},
        "tools": {
            "type": "array",
            "items": {"type": "object", "properties": {"type": {"enum": ["function"]}}},
            "description": "Function tools: {type, name, description, parameters, strict}",
        },
        "text": {"type": "object", "description": "{format: {type: text | json_object | json_schema, ...}}"},
        "store": _t("boolean", "Accepted, nothing is stored"),
        "metadata": {"type": "object", "description": "Accepted, ignored"},
        "service_tier": _t("string", "Accepted, there is one tier"),
        "previous_response_id": _only("Needs stored responses", None),
        "background": _only("Background responses", False),
        "include": _only("Extra output data", []),
        "truncation": _only("Context truncation", "disabled"),
        "reasoning": _only("Reasoning models' effort", {}),
        "top_logprobs": _only("Output logprobs", 0),
        "prompt": _only("Stored prompt templates", None),
    },
}
SCHEMAS["TokenizeRequest"] = {
    "type": "object",
    "additionalProperties": False,
    "description": "Exactly one of prompt and messages; the ids are those generation would send",
    "properties": {
        "model": SAMPLING["model"],
        "prompt": _t("string", "A text (encoded with the special tokens, as /v1/completions does)"),
        "messages": {"type": "array", "items": _ref("Message"), "minItems": 1},
        "tools": {"type": "array", "items": _ref("Tool")},
        "add_special_tokens": {
            "type": "boolean",
            "description": "Only its default (true for prompt, false for messages)",
        },
        **CHAT_RENDERING,
        "return_token_strs": _t("boolean", "Also the tokens' strings"),
    },
}
SCHEMAS["TokenizeResponse"] = {
    "type": "object",
    "required": ["count", "max_model_len", "tokens"],
    "properties": {
        "count": {"type": "integer"},
        "max_model_len": {"type": "integer"},
        "tokens": _TOKEN_IDS,
        "token_strs": {"type": "array", "items": {"type": "string"}},
    },
}
SCHEMAS["DetokenizeRequest"] = {
    "type": "object",
    "required": ["tokens"],
    "additionalProperties": False,
    "properties": {"model": SAMPLING["model"], "tokens": _TOKEN_IDS},
}
SCHEMAS["DetokenizeResponse"] = {
    "type": "object",
    "required": ["prompt"],
    "properties": {"prompt": {"type": "string"}},
}
SCHEMAS["Model"] = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by"],
    "properties": {
        "id": {"type": "string"},
        "object": {"enum": ["model"]},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
        "max_model_len": {"type": "integer"},
    },
}
SCHEMAS["ModelList"] = {
    "type": "object",
    "properties": {"object": {"enum": ["list"]}, "data": {"type": "array", "items": _ref("Model")}},
}
SCHEMAS["Completion"] = {
    "type": "object",
    "description": "object text_completion; with stream: true, server-sent events of such chunks, then [DONE]",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"},
        "object": {"type": "string"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {"type": "array", "items": {"type": "object"}},
        "usage": {"anyOf": [{"type": "object"}, {"type": "null"}]},
    },
}

EXAMPLES: dict[str, J] = {
    "/v1/completions": {
        "greedy": {
            "model": "SmolLM2-135M-Instruct",
            "prompt": "The capital of France is",
            "max_tokens": 8,
            "temperature": 0,
        },
        "sampled": {
            "prompt": ["Once upon a time", "In a hole"],
            "n": 2,
            "seed": 7,
            "top_k": 40,
            "min_p": 0.05,
            "presence_penalty": 0.5,
            "logit_bias": {"2": -100},
            "min_tokens": 2,
            "max_tokens": 8,
            "stream": True,
            "stream_options": {"include_usage": True},
            "logprobs": 2,
            "priority": -1,
        },
        "score": {"prompt": "The capital of France is Paris", "echo": True, "max_tokens": 0, "logprobs": 1},
    },
    "/v1/chat/completions": {
        "chat": {"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 8, "temperature": 0},
        "json": {
            "messages": [{"role": "user", "content": "An item as JSON"}],
            "max_tokens": 40,
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "item",
                    "schema": {
                        "type": "object",
                        "properties": {"id": {"type": "integer"}},
                        "required": ["id"],
                    },
                },
            },
        },
        "tools": {
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "max_tokens": 40,
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "parameters": {
                            "type": "object",
                            "properties": {"city": {"type": "string"}},
                            "required": ["city"],
                        },
                    },
                }
            ],
            "tool_choice": "required",
        },
    },
    "/v1/responses": {
        "text": {"input": "Hi!", "instructions": "Be brief.", "max_output_tokens": 8, "temperature": 0},
        "items": {
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
                {
                    "type": "function_call",
                    "call_id": "call_1",
                    "name": "get_weather",
                    "arguments": '{"city": "Paris"}',
                },
                {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 21 C"},
            ],
            "max_output_tokens": 16,
            "stream": True,
        },
    },
    "/tokenize": {
        "prompt": {"prompt": "Hello world", "return_token_strs": True},
        "messages": {"messages": [{"role": "user", "content": "Hello"}]},
    },
    "/detokenize": {"tokens": {"tokens": [19556, 905]}},
}


def _json(schema: J) -> J:
    return {"content": {"application/json": {"schema": schema}}}


def _post(summary: str, request: str, response: J, path: str) -> J:
    examples = {name: {"value": value} for name, value in EXAMPLES[path].items()}
    body = _json(_ref(request))
    body["content"]["application/json"]["examples"] = examples
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, **body},
            "responses": {
                "200": {"description": "OK", **response},
                "400": {"description": "A bad field (param names it)", **_json(_ref("Error"))},
            },
        }
    }


def _get(summary: str, response: J) -> J:
    return {"get": {"summary": summary, "responses": {"200": {"description": "OK", **response}}}}


def openapi_document(version: str) -> J:
    """The document (a fresh dict: callers may change it)."""
    stream = {"text/event-stream": {"schema": {"type": "string"}}}
    completion = {"content": {**_json(_ref("Completion"))["content"], **stream}}
    model_path = _get("One model", _json(_ref("Model")))
    model_path["get"]["parameters"] = [
        {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    ]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ScaleLLM mesh gateway",
            "version": version,
            "description": "OpenAI-compatible HTTP API",
        },
        "paths": {
            "/v1/completions": _post("Text completions", "CompletionRequest", completion, "/v1/completions"),
            "/v1/chat/completions": _post(
                "Chat completions", "ChatCompletionRequest", completion, "/v1/chat/completions"
            ),
            "/v1/responses": _post(
                "Responses (OpenAI's newer API, over chat completions)",
                "ResponsesRequest",
                {"content": {"application/json": {"schema": {"type": "object"}}, **stream}},
                "/v1/responses",
            ),
            "/v1/models": _get("The served models", _json(_ref("ModelList"))),
            "/v1/models/{model}": model_path,
            "/tokenize": _post(
                "Token ids of a prompt or conversation",
                "TokenizeRequest",
                _json(_ref("TokenizeResponse")),
                "/tokenize",
            ),
            "/detokenize": _post(
                "Text of token ids", "DetokenizeRequest", _json(_ref("DetokenizeResponse")), "/detokenize"
            ),
            "/version": _get(
                "The server's version",
                _json({"type": "object", "properties": {"version": {"type": "string"}}}),
            ),
            "/openapi.json": _get("This document", _json({"type": "object"})),
            "/health": _get("200 while a decode worker is routable, else 503", _json({"type": "object"})),
            "/metrics": _get("Prometheus text", {"content": {"text/plain": {"schema": {"type": "string"}}}}),
        },
        "components": {
            "schemas": copy.deepcopy(SCHEMAS),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
