"""OpenAI-style request bodies (/v1/completions, /v1/chat/completions) and response bodies.

Requests: ``parse_completion_request`` / ``parse_chat_request`` take the decoded JSON
object and return a frozen dataclass, or raise :class:`BadRequest` naming the field.
Only shape and range are checked here; what needs the cluster (model known, prompt
within the context length, token ids within the vocabulary) is Frontend's and the
workers' job. Fields that would change the output but are not implemented (``n`` > 1,
``echo``, ``best_of`` > 1, ``logit_bias``, non-zero penalties, tools, a response format
other than text, non-text content parts, several prompts in one request) are rejected,
never silently ignored; bookkeeping fields (``user``, ``metadata``, ``store``) and
unknown fields are ignored.

Responses: :class:`CompletionShape` and :class:`ChatShape` turn the router's TokenChunks
and GenerationResult into OpenAI's JSON objects, streamed (chunks) or whole.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proto.tandem.v1 import tandem_pb2 as pb
from router.request import GenerationResult, TokenChunk

_UINT32_MAX = (1 << 32) - 1
_SEED_LIMIT = 1 << 63  # seeds are drawn from [0, 2**63) by the router too
_MAX_LOGPROBS = 20
_MAX_TEMPERATURE = 2.0  # OpenAI's documented range
_COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # as OpenAI's /v1/completions
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class BadRequest(Exception):
    """The body is malformed or a field has the wrong type or value (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


def decode_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; NaN/Infinity and non-objects are refused."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise BadRequest(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


# -- requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """The sampling fields both endpoints share (None = the worker's default)."""

    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    min_tokens: int
    logprobs: bool

    def to_pb(self, extra_stop: tuple[str, ...] = (), extra_stop_token_ids: tuple[int, ...] = ()) -> pb.SamplingOptions:
        """As forwarded to the workers; ``extra_*`` come from the chat template (e.g. ``<|im_end|>``)."""
        options = pb.SamplingOptions(stop=[*self.stop, *extra_stop],
                                     stop_token_ids=[*self.stop_token_ids, *extra_stop_token_ids],
                                     ignore_eos=self.ignore_eos, min_tokens=self.min_tokens, logprobs=self.logprobs)
        for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
            value = getattr(self, name)
            if value is not None:
                setattr(options, name, value)
        return options


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    """Empty: the cluster's only model."""
    prompt: str | tuple[int, ...]
    sampling: Sampling
    stream: bool
    include_usage: bool
    """stream_options.include_usage: a last chunk with usage (and no choices)."""
    logprobs: int | None
    """Asked-for number of alternatives; only the chosen token's logprob is returned."""


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    """Text parts of a list content are joined with newlines."""
    name: str | None = None

    def to_template(self) -> dict[str, str]:
        """The message as a chat template sees it."""
        return {"role": self.role, "content": self.content, **({"name": self.name} if self.name else {})}


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[ChatMessage, ...]
    sampling: Sampling
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    """Accepted for compatibility; alternatives are not returned (empty lists)."""


class _Fields:
    """Typed access to a JSON object's fields; every failure names the field."""

    def __init__(self, body: dict[str, Any]):
        self._body = body

    def get(self, name: str) -> Any:
        return self._body.get(name)

    def integer(self, name: str, default: int | None = None, lo: int = 0, hi: int = _UINT32_MAX) -> int | None:
        value = self._body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(f"{name} must be an integer, got {_describe(value)}", name)
        if not lo <= value <= hi:
            raise BadRequest(f"{name} must be between {lo} and {hi}, got {value}", name)
        return value

    def number(self, name: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
        value = self._body.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadRequest(f"{name} must be a number, got {_describe(value)}", name)
        if not (lo < value if lo_open else lo <= value) or value > hi:
            raise BadRequest(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", name)
        return float(value)

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self._body.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise BadRequest(f"{name} must be true or false, got {_describe(value)}", name)
        return value

    def string(self, name: str, default: str = "") -> str:
        value = self._body.get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise BadRequest(f"{name} must be a string, got {_describe(value)}", name)
        return value

    def must_be(self, name: str, allowed: tuple, why: str) -> None:
        """Refuse a field that is set to anything but its neutral values."""
        if self._body.get(name) not in allowed:
            raise BadRequest(f"{name} is not supported: {why}", name)


def _describe(value: Any) -> str:
    kind = {str: "a string", list: "a list", dict: "an object", bool: "a boolean", float: "a number",
            int: "an integer", type(None): "null"}.get(type(value), type(value).__name__)
    return f"{kind} ({json.dumps(value)[:40]})"


def _sampling(f: _Fields, max_tokens: int | None, logprobs: bool) -> Sampling:
    n = f.integer("n", 1, lo=1, hi=_UINT32_MAX)
    if n != 1:
        raise BadRequest(f"n must be 1 (one choice per request), got {n}", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        f.must_be(name, (None, 0, 0.0), "penalties are not implemented")
    f.must_be("logit_bias", (None, {}), "logit_bias is not implemented")
    top_k = f.integer("top_k", lo=-1)
    return Sampling(
        max_tokens=max_tokens,
        temperature=f.number("temperature", 0.0, _MAX_TEMPERATURE),
        top_p=f.number("top_p", 0.0, 1.0, lo_open=True),
        top_k=None if top_k in (None, -1) else top_k,  # -1 = all tokens, as in vLLM
        seed=f.integer("seed", hi=_SEED_LIMIT - 1),
        stop=_stop_strings(f.get("stop")),
        stop_token_ids=_token_ids(f.get("stop_token_ids") or [], "stop_token_ids"),
        ignore_eos=f.boolean("ignore_eos"),
        min_tokens=f.integer("min_tokens", 0),
        logprobs=logprobs,
    )


def _stop_strings(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return ()
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest(f"stop must be a non-empty string or a list of them, got {_describe(value)}", "stop")
    return tuple(stops)


def _token_ids(value: Any, param: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= _UINT32_MAX for t in value):
        raise BadRequest(f"{param} must be a list of non-negative integer token ids", param)
    return tuple(value)


def _stream_fields(f: _Fields) -> tuple[bool, bool]:
    stream = f.boolean("stream")
    options = f.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest(f"stream_options must be an object, got {_describe(options)}", "stream_options")
    include_usage = _Fields(options or {}).boolean("include_usage")
    return stream, stream and include_usage


def parse_completion_request(body: dict[str, Any]) -> CompletionRequest:
    f = _Fields(body)
    f.must_be("echo", (None, False), "the prompt is not echoed back")
    f.must_be("best_of", (None, 1), "only one candidate is generated")
    f.must_be("suffix", (None, ""), "insertion is not implemented")
    logprobs = f.integer("logprobs", lo=0, hi=_MAX_LOGPROBS)
    stream, include_usage = _stream_fields(f)
    return CompletionRequest(
        model=f.string("model"),
        prompt=_prompt(body.get("prompt")),
        sampling=_sampling(f, f.integer("max_tokens", _COMPLETIONS_DEFAULT_MAX_TOKENS, lo=1), logprobs is not None),
        stream=stream, include_usage=include_usage, logprobs=logprobs)


def _prompt(value: Any) -> str | tuple[int, ...]:
    """A string, a list of token ids, or a one-element list of either; batches are refused."""
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        if len(value) > 1:
            raise BadRequest(f"prompt holds {len(value)} prompts; send one prompt per request", "prompt")
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _token_ids(value, "prompt")
    if value is None:
        raise BadRequest("prompt is required", "prompt")
    raise BadRequest(f"prompt must be a string or a list of token ids, got {_describe(value)}", "prompt")


def parse_chat_request(body: dict[str, Any]) -> ChatRequest:
    f = _Fields(body)
    f.must_be("tools", (None, []), "tool calling is not implemented")
    f.must_be("functions", (None, []), "function calling is not implemented")
    fmt = f.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise BadRequest("response_format is not supported: only {\"type\": \"text\"}", "response_format")
    max_tokens = f.integer("max_completion_tokens", lo=1)
    if max_tokens is None:
        max_tokens = f.integer("max_tokens", lo=1)  # None: up to the context length, as OpenAI's chat
    logprobs = f.boolean("logprobs")
    stream, include_usage = _stream_fields(f)
    return ChatRequest(
        model=f.string("model"), messages=_messages(body.get("messages")),
        sampling=_sampling(f, max_tokens, logprobs), stream=stream, include_usage=include_usage,
        logprobs=logprobs, top_logprobs=f.integer("top_logprobs", 0, hi=_MAX_LOGPROBS))


def _messages(value: Any) -> tuple[ChatMessage, ...]:
    if not isinstance(value, list) or not value:
        raise BadRequest(f"messages must be a non-empty list, got {_describe(value)}", "messages")
    return tuple(_message(m, f"messages[{i}]") for i, m in enumerate(value))


def _message(value: Any, where: str) -> ChatMessage:
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be an object with role and content, got {_describe(value)}", where)
    role = value.get("role")
    if role not in CHAT_ROLES:
        raise BadRequest(f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {_describe(role)}",
                         f"{where}.role")
    name = value.get("name")
    if name is not None and not isinstance(name, str):
        raise BadRequest(f"{where}.name must be a string", f"{where}.name")
    return ChatMessage(role, _content(value.get("content"), f"{where}.content"), name or None)


def _content(value: Any, where: str) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    if not isinstance(value, list):
        raise BadRequest(f"{where} must be a string or a list of text parts, got {_describe(value)}", where)
    texts = []
    for j, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise BadRequest(f"{where}[{j}] must be {{\"type\": \"text\", \"text\": ...}}; "
                             "only text content is supported", f"{where}[{j}]")
        texts.append(part["text"])
    return "\n".join(texts)


# -- responses -----------------------------------------------------------------------------


def usage_body(result: GenerationResult) -> dict[str, Any]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": result.cached_prompt_tokens}}


def tandem_body(result: GenerationResult) -> dict[str, Any]:
    """tandem's extension field: how the request was served (clients ignore unknown fields)."""
    return {"request_id": result.request_id, "ttft_ms": round(result.ttft_ms, 3),
            "tpot_ms": round(result.tpot_ms, 3), "e2e_ms": round(result.e2e_ms, 3), "workers": result.workers}


class _Shape:
    """What both endpoints' responses share: id, model, created, the object names."""

    object_name = ""
    chunk_object_name = ""

    def __init__(self, response_id: str, model: str, token_text: Callable[[int], str], logprobs: bool):
        self.id, self.model, self.created = response_id, model, int(time.time())
        self._token_text = token_text
        self._logprobs = logprobs

    def _envelope(self, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices}

    def usage_chunk(self, result: GenerationResult) -> dict[str, Any]:
        return {**self._envelope(self.chunk_object_name, []), "usage": usage_body(result)}

    def _full(self, choice: dict[str, Any], result: GenerationResult) -> dict[str, Any]:
        return {**self._envelope(self.object_name, [choice]), "usage": usage_body(result),
                "tandem": tandem_body(result)}


class CompletionShape(_Shape):
    object_name = chunk_object_name = "text_completion"

    def __init__(self, response_id: str, model: str, token_text: Callable[[int], str], logprobs: bool):
        super().__init__(response_id, model, token_text, logprobs)
        self._offset = 0  # text_offset of the next token, across chunks

    def opening(self) -> list[dict[str, Any]]:
        return []

    def delta(self, chunk: TokenChunk) -> dict[str, Any] | None:
        if not chunk.text and not self._logprobs:
            return None  # text held back (a possible stop string): nothing to say yet
        return self._envelope(self.chunk_object_name, [self._choice(chunk.text, [chunk], None)])

    def closing(self, result: GenerationResult) -> dict[str, Any]:
        return {**self._envelope(self.chunk_object_name, [self._choice("", [], result.finish_reason)]),
                "tandem": tandem_body(result)}

    def full(self, chunks: list[TokenChunk], result: GenerationResult) -> dict[str, Any]:
        text = "".join(c.text for c in chunks)
        return self._full(self._choice(text, chunks, result.finish_reason), result)

    def _choice(self, text: str, chunks: list[TokenChunk], finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": self._logprobs_body(chunks) if self._logprobs else None,
                "finish_reason": finish_reason}

    def _logprobs_body(self, chunks: list[TokenChunk]) -> dict[str, Any]:
        tokens = [self._token_text(t) for c in chunks for t in c.token_ids]
        offsets = []
        for token in tokens:
            offsets.append(self._offset)
            self._offset += len(token)
        return {"tokens": tokens, "token_logprobs": [lp for c in chunks for lp in c.logprobs],
                "top_logprobs": None, "text_offset": offsets}


class ChatShape(_Shape):
    object_name, chunk_object_name = "chat.completion", "chat.completion.chunk"

    def opening(self) -> list[dict[str, Any]]:
        return [self._envelope(self.chunk_object_name, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                         "logprobs": None, "finish_reason": None}])]

    def delta(self, chunk: TokenChunk) -> dict[str, Any] | None:
        if not chunk.text and not self._logprobs:
            return None
        return self._envelope(self.chunk_object_name, [{"index": 0, "delta": {"content": chunk.text},
                                                        "logprobs": self._logprobs_body([chunk]),
                                                        "finish_reason": None}])

    def closing(self, result: GenerationResult) -> dict[str, Any]:
        return {**self._envelope(self.chunk_object_name, [{"index": 0, "delta": {}, "logprobs": None,
                                                           "finish_reason": result.finish_reason}]),
                "tandem": tandem_body(result)}

    def full(self, chunks: list[TokenChunk], result: GenerationResult) -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(c.text for c in chunks)}
        return self._full({"index": 0, "message": message, "logprobs": self._logprobs_body(chunks),
                           "finish_reason": result.finish_reason}, result)

    def _logprobs_body(self, chunks: list[TokenChunk]) -> dict[str, Any] | None:
        if not self._logprobs:
            return None
        content = []
        for c in chunks:
            for token_id, logprob in zip(c.token_ids, c.logprobs):
                text = self._token_text(token_id)
                content.append({"token": text, "logprob": logprob, "bytes": list(text.encode()), "top_logprobs": []})
        return {"content": content}
