"""OpenAI's HTTP API shapes for the edge's local endpoint: request bodies checked into a `Generation`, results
and stream chunks as OpenAI's objects, errors in OpenAI's error shape.

Pure (no I/O, no clocks): the ASGI shell, edge_client.openai_server, passes ids and times in.
A parameter is honoured, accepted at the one value that changes nothing, or refused with a
400: never silently ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from edge_client.api import Generation
from edge_client.client import ClientResult
from shared.decoding import AcceptanceRule, DecodeMode, DecodingConfig
from shared.wire import ChatMessage, FinishReason

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_SEQUENCES = 4  # as OpenAI allows
SEED_MODULUS = 2**64  # OpenAI takes any 64-bit seed; the wire carries it unsigned
# Roles a chat template knows; OpenAI's "developer" is its newer name for "system".
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class Endpoint(Enum):
    COMPLETIONS = "text_completion"
    CHAT = "chat.completion"


class APIError(Exception):
    """A request this endpoint refuses, as OpenAI reports it: an HTTP status and an error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 error_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type

    @property
    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class ParsedRequest:
    endpoint: Endpoint
    model: str
    generation: Generation
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk carries the usage


@dataclass(frozen=True)
class EndpointSettings:
    """What the server decides, not the request."""

    model_id: str
    chat_default_max_tokens: int  # OpenAI's chat default is "until the model stops"; a local server needs a bound
    draft_len: int | None = None  # None: adapts to the network each round
    draft_ahead: bool = True
    rule: AcceptanceRule = AcceptanceRule.POINT_MASS  # how a sampled proposal is accepted


# OpenAI parameters accepted only at a value that changes nothing (clients often send the defaults; null is
# always absent), and those with no such value (only null).
_NEUTRAL: dict[Endpoint, dict[str, tuple[Any, ...]]] = {
    Endpoint.COMPLETIONS: {"frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "echo": (False,),
                           "best_of": (1,), "suffix": ("",), "logprobs": ()},
    Endpoint.CHAT: {"frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "logprobs": (False,),
                    "top_logprobs": (0,), "tools": ([],), "tool_choice": ("none",), "functions": ([],),
                    "function_call": ("none",), "response_format": ({"type": "text"},), "modalities": (["text"],),
                    "store": (False,), "parallel_tool_calls": (), "prediction": (), "audio": (), "metadata": (),
                    "reasoning_effort": (), "service_tier": (), "web_search_options": (), "verbosity": ()},
}
_HONOURED = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "user"}
_HONOURED_BY_ENDPOINT = {Endpoint.COMPLETIONS: {"prompt"}, Endpoint.CHAT: {"messages", "max_completion_tokens"}}


def parse_request(endpoint: Endpoint, body: Any, settings: EndpointSettings) -> ParsedRequest:
    """A request body checked parameter by parameter; raises APIError naming the first offending one."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    present = {name: value for name, value in body.items() if value is not None}
    for name, value in present.items():
        if name in _HONOURED or name in _HONOURED_BY_ENDPOINT[endpoint]:
            continue
        if name not in _NEUTRAL[endpoint]:
            raise bad_request(f"Unrecognized request argument supplied: {name}", param=name, code="unrecognized_argument")
        if value not in _NEUTRAL[endpoint][name]:
            neutral = " or ".join(json.dumps(v) for v in (*_NEUTRAL[endpoint][name], None))
            raise bad_request(f"{name} is not supported by this endpoint (only {neutral}): specbridge serves the target "
                              f"model's own output, verified token by token", param=name, code="unsupported_parameter")
    model = present.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("you must provide a model parameter", param="model")
    if model != settings.model_id:
        raise APIError(404, f"the model '{model}' is not served here; this endpoint serves '{settings.model_id}'",
                       param="model", code="model_not_found")
    if present.get("n", 1) != 1 or isinstance(present.get("n"), bool):
        raise bad_request("n must be 1: specbridge verifies one continuation per request", param="n",
                          code="unsupported_value")
    if "user" in present and not isinstance(present["user"], str):
        raise bad_request("user must be a string", param="user")
    stream = _boolean(present, "stream", default=False)
    options = present.get("stream_options")
    if options is not None and not stream:
        raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise bad_request("stream_options takes only include_usage", param="stream_options")
    include_usage = _boolean(options or {}, "include_usage", default=False)
    if endpoint is Endpoint.CHAT:
        prompt, messages = "", _messages(present.get("messages"))
        max_tokens = _max_tokens(present, settings.chat_default_max_tokens, ("max_completion_tokens", "max_tokens"))
    else:
        prompt, messages = _prompt(present.get("prompt")), ()
        max_tokens = _max_tokens(present, COMPLETIONS_DEFAULT_MAX_TOKENS, ("max_tokens",))
    generation = Generation(prompt=prompt, messages=messages, max_tokens=max_tokens,
                            decoding=_decoding(present, settings.rule), stop=_stop(present.get("stop")),
                            draft_len=settings.draft_len, draft_ahead=settings.draft_ahead)
    return ParsedRequest(endpoint=endpoint, model=model, generation=generation, stream=stream, include_usage=include_usage)


def _boolean(values: Mapping[str, Any], name: str, *, default: bool) -> bool:
    value = values.get(name, default)
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, got {value!r}", param=name)
    return value


def _number(values: Mapping[str, Any], name: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    value = values.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"{name} must be a number, got {value!r}", param=name)
    if not (low < value if low_open else low <= value) or value > high:
        bounds = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise bad_request(f"{name} must lie in {bounds}, got {value}", param=name, code="invalid_value")
    return float(value)


def _decoding(values: Mapping[str, Any], rule: AcceptanceRule) -> DecodingConfig:
    """temperature 0 is greedy (token-identical to the target's own greedy output); above 0 the target's distribution."""
    temperature = _number(values, "temperature", 1.0, 0.0, 2.0)  # OpenAI's default and range
    top_p = _number(values, "top_p", 1.0, 0.0, 1.0, low_open=True)
    seed = values.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad_request(f"seed must be an integer, got {seed!r}", param="seed")
    seed = None if seed is None else seed % SEED_MODULUS
    if temperature == 0:
        return DecodingConfig(mode=DecodeMode.GREEDY, seed=seed)
    return DecodingConfig(mode=DecodeMode.SAMPLE, temperature=temperature, top_p=top_p, seed=seed, rule=rule)


def _max_tokens(values: Mapping[str, Any], default: int, names: tuple[str, ...]) -> int:
    given = {name: values[name] for name in names if name in values}
    if len(set(map(repr, given.values()))) > 1:
        raise bad_request(f"{' and '.join(given)} disagree; give one", param=names[0])
    name, value = next(iter(given.items()), (names[0], default))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad_request(f"{name} must be an integer >= 1, got {value!r}", param=name, code="invalid_value")
    return value


def _stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(stops, list) or not all(isinstance(stop, str) and stop for stop in stops):
        raise bad_request("stop must be a non-empty string or a list of them", param="stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise bad_request(f"stop takes at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}", param="stop")
    return tuple(stops)


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(item, int) for item in value):
        raise bad_request("prompt as token ids is not supported: the draft and the target have different tokenizers; "
                          "send text", param="prompt", code="unsupported_value")
    if isinstance(value, list) and len(value) > 1:
        raise bad_request("one prompt per request: specbridge verifies one continuation at a time", param="prompt",
                          code="unsupported_value")
    raise bad_request("prompt must be a string", param="prompt")


def _messages(value: Any) -> tuple[ChatMessage, ...]:
    if not isinstance(value, list) or not value:
        raise bad_request("messages must be a non-empty list", param="messages")
    return tuple(_message(message, f"messages[{index}]") for index, message in enumerate(value))


def _message(message: Any, where: str) -> ChatMessage:
    if not isinstance(message, dict):
        raise bad_request(f"{where} must be an object with a role and a content", param=where)
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise bad_request(f"{where}.role {role!r} is not supported (expected one of {', '.join(CHAT_ROLES)}; "
                          f"no tools here)", param=f"{where}.role", code="unsupported_value")
    for name, value in message.items():
        if name not in ("role", "content") and value is not None:
            raise bad_request(f"{where}.{name} is not supported", param=f"{where}.{name}", code="unsupported_parameter")
    return ChatMessage(role=CHAT_ROLES[role], content=_content(message.get("content"), f"{where}.content"))


def _content(content: Any, where: str) -> str:
    """A string, or a list of text parts (OpenAI's multi-part form), joined."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str) for part in content):
        return "".join(part["text"] for part in content)
    raise bad_request(f"{where} must be a string or a list of text parts (no images or audio here)", param=where,
                      code="unsupported_value")


def finish_reason(result: ClientResult) -> str:
    """OpenAI's reason: "length" for the token budget; the target's EOS and a stop sequence are both "stop"."""
    return "length" if result.finish_reason is FinishReason.LENGTH else "stop"


def usage(result: ClientResult) -> dict[str, Any]:
    """OpenAI's usage object: completion tokens are target tokens; the draft's proposals are the "prediction"
    (accepted + rejected); the `specbridge` object says how the rounds went."""
    completion_tokens = len(result.target_token_ids)
    rounds = result.speculation_rounds
    return {
        "prompt_tokens": result.prompt_token_count,
        "completion_tokens": completion_tokens,
        "total_tokens": result.prompt_token_count + completion_tokens,
        "completion_tokens_details": {"accepted_prediction_tokens": result.accepted_prediction_tokens,
                                      "rejected_prediction_tokens": result.rejected_prediction_tokens,
                                      "reasoning_tokens": 0, "audio_tokens": 0},
        "specbridge": {
            "mode": "speculative" if rounds else "target_only",
            "rounds": result.rounds,
            # target tokens committed per verification round (per target forward): the speed-up's source
            "mean_accepted_length": completion_tokens / result.rounds if result.rounds else 0.0,
            "draft_tokens": sum(record.draft_len for record in rounds),
            "round_trip_ms": _spread([record.round_trip_ms for record in rounds]),
            "verify_ms": _spread([record.verify_ms for record in rounds]),
            "draft_ms": _spread([record.draft_ms for record in rounds]),
            "wall_ms": result.wall_ms,
        },
    }


def _spread(values_ms: list[float]) -> dict[str, float] | None:
    if not values_ms:
        return None
    return {"p50": float(np.percentile(values_ms, 50)), "p90": float(np.percentile(values_ms, 90)),
            "mean": float(np.mean(values_ms)), "total": float(np.sum(values_ms))}


def completion_body(parsed: ParsedRequest, result: ClientResult, *, response_id: str, created: int) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason(result)}
    if parsed.endpoint is Endpoint.CHAT:
        choice["message"] = {"role": "assistant", "content": result.text, "refusal": None}
    else:
        choice["text"] = result.text
    return {"id": response_id, "object": parsed.endpoint.value, "created": created, "model": parsed.model,
            "system_fingerprint": None, "choices": [choice], "usage": usage(result)}


def chunk_body(parsed: ParsedRequest, *, response_id: str, created: int, text: str | None = None,
               result: ClientResult | None = None, first: bool = False) -> dict[str, Any]:
    """One streamed chunk: text (a chat's first chunk also names the role), or the end with its finish reason."""
    reason = finish_reason(result) if result is not None else None
    if parsed.endpoint is Endpoint.CHAT:
        delta: dict[str, Any] = {} if result is not None else {"content": text or ""}
        if first:
            delta["role"] = "assistant"
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        kind = "text_completion"
    body = {"id": response_id, "object": kind, "created": created, "model": parsed.model, "system_fingerprint": None,
            "choices": [choice]}
    if parsed.include_usage:
        body["usage"] = None  # as OpenAI: every chunk has the key; the last one, usage_chunk_body, fills it
    return body


def usage_chunk_body(parsed: ParsedRequest, result: ClientResult, *, response_id: str, created: int) -> dict[str, Any]:
    kind = "chat.completion.chunk" if parsed.endpoint is Endpoint.CHAT else "text_completion"
    return {"id": response_id, "object": kind, "created": created, "model": parsed.model, "system_fingerprint": None,
            "choices": [], "usage": usage(result)}


def models_body(model_id: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_body(model_id, created)]}


def model_body(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "specbridge"}
