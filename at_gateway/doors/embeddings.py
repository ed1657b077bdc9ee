"""The OpenAI embeddings door: ``POST /v1/embeddings`` through the same routes, keys, limits and log as chat.

The internal form is OpenAI's embeddings body itself (``Call.chat``): ``openai`` and ``azure`` steps get it
as sent, the model rewritten (token-id inputs, ``encoding_format``, ``dimensions``, ``user`` and extensions
such as ``input_type`` included); ``gemini`` and ``vertex`` steps translate it (:mod:`..providers.gemini_embed`,
text only: token ids are a 400 for that step, so the route falls through); every other type fails the step
with 400. A route for embeddings names embedding models in its steps; nothing tells a chat route from an
embeddings route but what its upstreams answer.

The answer is OpenAI's ``list``, in the ``encoding_format`` the client asked for (``float`` when it named
none, as OpenAI does). The openai SDK asks for ``base64`` unless told otherwise and decodes it (little-endian
float32); an upstream that answers floats anyway (some OpenAI-compatible servers ignore the field) has them
encoded by us, and the other way round. ``usage`` is always there (``prompt_tokens``, ``total_tokens``):
what the upstream counted, or, when it counted nothing, an estimate from the input
(:func:`~at_gateway.providers.openai.estimate_input_tokens`): an estimate is better than 0, which would make
embeddings free for budgets, limits and the usage report. An answer that needs neither (the common one:
an OpenAI upstream that honoured the format and counted) is passed on as the bytes received.

``chat_form`` is False: a client key's routes apply; its system prompt and max_tokens cap mean nothing to
an embedding (:meth:`EmbeddingsDoor.constrain` does nothing). Errors are OpenAI's shape.
"""

from __future__ import annotations

import json
import re
from typing import Any

import anyio.to_thread

from ..config import Step
from ..errors import BadRequest, StepFailed
from ..providers.base import Completion, Provider, QuotedFailure
from ..providers.openai import (
    LARGE_ANSWER,
    dumps_in_pieces,
    embedding_base64,
    embedding_floats,
    estimate_input_tokens,
    loads_in_pieces,
    search_in_pieces,
)
from .base import Call, Door, json_object

MAX_INPUTS = 2048  # OpenAI's limit on an input array
_FLOAT_VECTOR = re.compile(rb'"embedding"\s*:\s*\[')
_B64_VECTOR = re.compile(rb'"embedding"\s*:\s*"')
_INPUT_SHAPES = ("'input' must be a non-empty string, an array of 1 to 2048 non-empty strings, an array of token "
                 "ids (integers), or an array of 1 to 2048 non-empty token-id arrays")


def _is_token(v: Any) -> bool:
    return type(v) is int and v >= 0


def check_input(value: Any) -> None:
    """400 for an ``input`` OpenAI's API would refuse (its shapes, no empty strings, at most 2048 items)."""
    if isinstance(value, str):
        if value:
            return
        raise BadRequest("'input' must not be an empty string", code="invalid_input", extra={"param": "input"})
    if isinstance(value, list) and 0 < len(value) <= MAX_INPUTS:
        first = value[0]
        if isinstance(first, str):
            if all(isinstance(v, str) and v for v in value):
                return
        elif _is_token(first):
            if all(_is_token(v) for v in value):
                return
        elif isinstance(first, list):
            if all(isinstance(v, list) and v and all(_is_token(t) for t in v) for v in value):
                return
    raise BadRequest(_INPUT_SHAPES, code="invalid_input", extra={"param": "input"})


class EmbeddingsCall(Call):
    """One embeddings request: each step's ``embed``, its answer normalized (:meth:`finish`)."""

    def __init__(self, door: Door, model: str, body: dict[str, Any], encoding: str) -> None:
        super().__init__(door, model, body)
        self.encoding = encoding

    async def complete(self, adapter: Provider, prepared: dict[str, Any], step: Step) -> Completion:
        done = await adapter.embed(prepared, step)
        if len(done.body) >= LARGE_ANSWER:  # searched, converted and encoded off the loop, in pieces
            return await anyio.to_thread.run_sync(self.finish, done)
        return self.finish(done)

    def finish(self, done: Completion) -> Completion:
        """The answer in the format asked for and with usage; untouched (not decoded) when it has both. A
        large answer (``LARGE_ANSWER``) is worked on in pieces (see :func:`..providers.openai.loads_in_pieces`):
        :meth:`complete` runs this in a worker thread then, and pieces let the event loop have the GIL."""
        body = done.body
        usage = done.usage
        large = len(body) >= LARGE_ANSWER
        counted = isinstance(usage, dict) and type(usage.get("prompt_tokens")) is int
        pattern = _FLOAT_VECTOR if self.encoding == "base64" else _B64_VECTOR
        wrong = search_in_pieces(pattern, body) if large else pattern.search(body) is not None
        if counted and not wrong:
            return done
        try:
            obj = loads_in_pieces(body) if large else json.loads(body)
        except ValueError:
            raise QuotedFailure("upstream answered 2xx with a body that is not JSON", body[:4096]) from None
        data = obj.get("data") if isinstance(obj, dict) else None
        if not isinstance(data, list):
            raise StepFailed("upstream answered 2xx with a body that is not an embeddings list (no data)")
        if wrong:
            for item in data:
                vec = item.get("embedding") if isinstance(item, dict) else None
                if self.encoding == "base64" and isinstance(vec, list):
                    item["embedding"] = embedding_base64(vec)
                elif self.encoding == "float" and isinstance(vec, str):
                    item["embedding"] = embedding_floats(vec)
        if not counted:
            tokens = estimate_input_tokens(self.chat.get("input"))
            usage = {**(usage if isinstance(usage, dict) else {}), "prompt_tokens": tokens, "total_tokens": tokens}
            obj["usage"] = usage
        if large:
            return Completion(dumps_in_pieces(obj), usage)
        return Completion(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode(), usage)


class EmbeddingsDoor(Door):
    name = "embeddings"
    chat_form = False

    def parse(self, request: Any, decode: Any) -> Call:
        body = json_object(request, decode)
        model = body["model"]
        check_input(body.get("input"))
        encoding = body.get("encoding_format")
        if encoding is None:
            encoding = "float"
        elif encoding not in ("float", "base64"):
            raise BadRequest("'encoding_format' must be 'float' or 'base64'", code="invalid_encoding_format",
                             extra={"param": "encoding_format"})
        dims = body.get("dimensions")
        if dims is not None and (type(dims) is not int or dims < 1):
            raise BadRequest("'dimensions' must be a positive whole number", code="invalid_dimensions",
                             extra={"param": "dimensions"})
        if body.get("user") is not None and not isinstance(body["user"], str):
            raise BadRequest("'user' must be a string", code="invalid_user", extra={"param": "user"})
        return EmbeddingsCall(self, model, body, encoding)
