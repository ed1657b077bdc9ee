"""Embeddings on Gemini (``batchEmbedContents``) and Vertex AI, as OpenAI's ``/v1/embeddings``.

Wire formats followed (request and answer shapes as the official ``google-genai`` SDK sends and reads them):

* Gemini API v1beta ``models.batchEmbedContents``: one request per input,
  ``{"requests": [{"model": "models/M", "content": {"parts": [{"text": ...}], "role": "user"},
  "outputDimensionality": N}]}``, answered ``{"embeddings": [{"values": [...]}]}`` (plus ``usageMetadata``
  where the API reports it). The API takes at most 100 requests a call: longer inputs go as several calls,
  in order, their vectors joined.
* Vertex AI v1, in express mode (``api_key``) and with Application Default Credentials: models named
  ``*gemini*`` (``gemini-embedding-001``) or ``*maas*`` go to ``:embedContent`` for one input and
  ``:batchEmbedContents`` for several (``requests[].content`` + ``embedContentConfig``), as the SDK sends
  them, since ``:predict`` takes one instance per call for these models; every other model
  (``text-embedding-005``, ``text-multilingual-embedding-002``) goes to the text embeddings API,
  ``:predict`` with ``instances: [{"content": ...}]`` and ``parameters.outputDimensionality``, answered
  ``predictions[].embeddings.{values, statistics.token_count}``, at most 250 instances a call.

OpenAI's ``dimensions`` becomes ``outputDimensionality``; ``user`` and extensions are dropped (Google's APIs
have no such fields). Token-id inputs cannot be sent (Google's APIs take text only): the step fails with
400 and the route falls through (an ``openai`` step takes them). The answer is OpenAI's ``list`` in the
``encoding_format`` asked for, with usage: the tokens Google counted when it says (Vertex's statistics,
``usageMetadata``), else an estimate (:func:`.openai.estimate_input_tokens`), never 0.

Large answers (above :data:`.openai.LARGE_ANSWER`: Google's answer to a batch, or ours to many inputs) are
decoded and encoded in a worker thread, in pieces, so the event loop goes on serving the worker's other
requests (see :func:`.openai.loads_in_pieces`).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import anyio.to_thread

from ..config import Step
from ..errors import StepFailed
from . import gemini
from .base import Completion, QuotedFailure
from .openai import LARGE_ANSWER, dumps_in_pieces, embedding_base64, estimate_input_tokens, loads_in_pieces

GEMINI_BATCH = 100  # batchEmbedContents: requests per call (Gemini API)
VERTEX_BATCH = 100
PREDICT_BATCH = 250  # Vertex text embeddings API: instances per call
_FLOAT_BYTES = 11  # about what one float takes in JSON: how large an answer will be, before it is encoded


def _bad_request(message: str) -> StepFailed:
    return StepFailed(message, status=400,
                      error={"message": message, "type": "invalid_request_error", "code": "invalid_request"})


def texts_of(body: dict[str, Any]) -> list[str]:
    """The inputs as texts; 400 for token ids (the door checked the rest of ``input``'s shape)."""
    value = body.get("input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise _bad_request("Gemini and Vertex AI embed text only: 'input' as token ids needs an OpenAI-compatible step")


def _content(text: str) -> dict[str, Any]:
    return {"parts": [{"text": text}], "role": "user"}


async def _post(provider: Any, url: str, payload: dict[str, Any]) -> dict[str, Any]:
    """One call: the JSON answer, StepFailed (Google's error, status kept) for anything else."""
    data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    auth = await provider.auth_headers()
    headers = [*provider.headers, (b"accept", b"application/json"), *auth]
    async with provider.client.stream(b"POST", url, headers, data, provider.cfg.proxy) as resp:
        if not 200 <= resp.status < 300:
            if resp.status == 401:
                provider.on_unauthorized(auth)
            raise await gemini.read_error(resp)
        raw = await resp.read()
    try:  # a large answer (100 vectors of 3072 floats: 3 MB) off the loop, in pieces (see .openai.LARGE_ANSWER)
        obj = json.loads(raw) if len(raw) < LARGE_ANSWER else await anyio.to_thread.run_sync(loads_in_pieces, raw)
    except ValueError:
        raise QuotedFailure("Google answered 2xx with a body that is not JSON", raw[:4096]) from None
    if not isinstance(obj, dict):
        raise StepFailed("Google answered 2xx with JSON that is not an object")
    return obj


def _values(item: Any, where: str) -> list[Any]:
    values = item.get("values") if isinstance(item, dict) else None
    if not isinstance(values, list):
        raise StepFailed(f"Google answered {where} without an embedding's values")
    return values


def _count(v: Any) -> int | None:
    """A token count as Google writes it (Vertex's statistics say ``5`` or ``5.0``)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return int(v)


def _prompt_tokens(obj: dict[str, Any]) -> int | None:
    meta = obj.get("usageMetadata")
    return _count(meta.get("promptTokenCount")) if isinstance(meta, dict) else None


def _sum(counts: list[int | None]) -> int | None:
    """The total of per-input counts, or None unless every input has one."""
    return None if any(c is None for c in counts) else sum(c for c in counts if c is not None)


def _stat_tokens(item: Any) -> int | None:
    stats = item.get("statistics") if isinstance(item, dict) else None
    return _count(stats.get("token_count")) if isinstance(stats, dict) else None


def _check_count(got: list[Any], want: int) -> None:
    if len(got) != want:
        raise StepFailed(f"Google answered {len(got)} embeddings for {want} inputs")


async def _gemini(provider: Any, texts: list[str], dims: int | None, step: Step) -> tuple[list[Any], int | None]:
    model = step.model.removeprefix("models/")
    url = f"{provider.base}/models/{gemini.model_path(model)}:batchEmbedContents"
    vectors: list[Any] = []
    counts: list[int | None] = []
    for start in range(0, len(texts), GEMINI_BATCH):
        part = texts[start:start + GEMINI_BATCH]
        requests = []
        for text in part:
            req: dict[str, Any] = {"model": f"models/{model}", "content": _content(text)}
            if dims is not None:
                req["outputDimensionality"] = dims
            requests.append(req)
        obj = await _post(provider, url, {"requests": requests})
        items = obj.get("embeddings")
        if not isinstance(items, list):
            raise StepFailed("Google answered batchEmbedContents without embeddings")
        _check_count(items, len(part))
        vectors += [_values(item, "batchEmbedContents") for item in items]
        counts.append(_prompt_tokens(obj))
    return vectors, _sum(counts)


async def _vertex_url(provider: Any, model: str, method: str) -> str:
    path = f"publishers/google/models/{gemini.model_path(model)}:{method}"
    if provider.express:
        return f"{provider.base}/{path}"
    project = quote(await provider.project(), safe="")
    return f"{provider.base}/projects/{project}/locations/{quote(provider.location, safe='')}/{path}"


async def _vertex(provider: Any, texts: list[str], dims: int | None, step: Step) -> tuple[list[Any], int | None]:
    model = step.model.removeprefix("publishers/google/models/").removeprefix("models/")
    if "/" in model:
        raise _bad_request(f"Vertex AI embeddings serve Google's own models (such as text-embedding-005 or "
                           f"gemini-embedding-001), not {step.model!r}")
    config = {"outputDimensionality": dims} if dims is not None else None
    if "gemini" in model or "maas" in model:  # the SDK's test for models served by embedContent
        if len(texts) == 1:
            body: dict[str, Any] = {"content": _content(texts[0])}
            if config:
                body["embedContentConfig"] = config
            obj = await _post(provider, await _vertex_url(provider, model, "embedContent"), body)
            vector = _values(obj.get("embedding"), "embedContent")
            return [vector], _prompt_tokens(obj) or _stat_tokens(obj.get("embedding"))
        if "maas" in model:
            raise _bad_request(f"the Vertex AI model {model!r} embeds one input a request; send one string")
        url = await _vertex_url(provider, model, "batchEmbedContents")
        vectors: list[Any] = []
        counts: list[int | None] = []
        for start in range(0, len(texts), VERTEX_BATCH):
            part = texts[start:start + VERTEX_BATCH]
            requests = [{"content": _content(t), **({"embedContentConfig": config} if config else {})} for t in part]
            obj = await _post(provider, url, {"requests": requests})
            items = obj.get("embeddings")
            if not isinstance(items, list):
                raise StepFailed("Google answered batchEmbedContents without embeddings")
            _check_count(items, len(part))
            vectors += [_values(item, "batchEmbedContents") for item in items]
            counts.append(_prompt_tokens(obj) or _sum([_stat_tokens(item) for item in items]))
        return vectors, _sum(counts)
    url = await _vertex_url(provider, model, "predict")
    vectors = []
    counts = []
    for start in range(0, len(texts), PREDICT_BATCH):
        part = texts[start:start + PREDICT_BATCH]
        payload: dict[str, Any] = {"instances": [{"content": t} for t in part]}
        if config:
            payload["parameters"] = config
        obj = await _post(provider, url, payload)
        predictions = obj.get("predictions")
        if not isinstance(predictions, list):
            raise StepFailed("Vertex AI answered predict without predictions")
        _check_count(predictions, len(part))
        for p in predictions:
            emb = p.get("embeddings") if isinstance(p, dict) else None
            vectors.append(_values(emb, "predict"))
            counts.append(_stat_tokens(emb))
    return vectors, _sum(counts)


async def embed(provider: Any, body: dict[str, Any], step: Step) -> Completion:
    """An OpenAI embeddings request on a ``gemini`` or ``vertex`` provider; OpenAI's ``list`` answer back, in
    the ``encoding_format`` asked for, with usage (counted by Google, or estimated)."""
    texts = texts_of(body)
    dims = body.get("dimensions")
    dims = dims if isinstance(dims, int) and not isinstance(dims, bool) else None
    if provider.type_name == "vertex":
        vectors, tokens = await _vertex(provider, texts, dims, step)
    else:
        vectors, tokens = await _gemini(provider, texts, dims, step)
    if tokens is None:
        tokens = estimate_input_tokens(texts)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    b64 = body.get("encoding_format") == "base64"
    if sum(len(v) for v in vectors) * _FLOAT_BYTES < LARGE_ANSWER:
        return Completion(_pack(vectors, b64, step.model, usage, large=False), usage)
    # 2048 vectors of 1536 floats: a 40 MB answer, encoded off the loop and in pieces (see .openai.LARGE_ANSWER)
    return Completion(await anyio.to_thread.run_sync(_pack, vectors, b64, step.model, usage), usage)



def _pack(vectors: list[Any], b64: bool, model: str, usage: dict[str, int], large: bool = True) -> bytes:
    """OpenAI's ``list`` answer (``large``: encoded in pieces, in a worker thread)."""
    data = [{"object": "embedding", "index": i, "embedding": embedding_base64(v) if b64 else v}
            for i, v in enumerate(vectors)]
    answer = {"object": "list", "data": data, "model": model, "usage": usage}
    return dumps_in_pieces(answer) if large else json.dumps(answer, separators=(",", ":")).encode()
