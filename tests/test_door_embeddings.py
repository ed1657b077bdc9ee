"""``POST /v1/embeddings``: the openai SDK as the client, through the gateway to wire-checking mocks of OpenAI,
Azure OpenAI, the Gemini API (``batchEmbedContents``) and Vertex AI (``predict``, ``embedContent``,
``batchEmbedContents``; express mode and a service account).

The Google mock checks each request against the fields the official ``google-genai`` SDK sends for that
method, and validates what it answers by reading it the way that SDK does (its own converters and
``EmbedContentResponse`` type), so the mock cannot drift from the real format unnoticed."""

from __future__ import annotations

import base64
import gc
import http.client
import json
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from google.genai import models as gmodels
from google.genai import types as gtypes
from openai.types import CreateEmbeddingResponse

from at_gateway.providers import openai as openai_provider
from tests.conftest import GATEWAY_KEY, base_config, run_gateway
from tests.mock_google import TokenServer, error_reply, make_service_account
from tests.mock_upstream import MockUpstream, Received, Reply, wait_until
from tests.test_keys import keyed_gateway, store_at

GEMINI_KEY = "gemini-embed-secret-key-123"
AZURE_KEY = "azure-embed-key-0123456789"
EMBED_MODEL = "text-embedding-3-small"
OPENAI_FIELDS = {"model", "input", "encoding_format", "dimensions", "user"}
PATH = "/v1/embeddings"


def vec(i: int, dims: int = 4) -> list[float]:
    """Input ``i``'s vector: float32-exact values, the first one naming the input (order is checked)."""
    return [float(i) + 0.5, -0.25, 0.125, 1.0, 2.0, -3.0][:dims]


def b64(v: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()


def unb64(s: str) -> list[float]:
    raw = base64.b64decode(s)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def sdk(gw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=GATEWAY_KEY, max_retries=0, timeout=20)


def n_inputs(value: Any) -> int:
    if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], int)):
        return 1
    return len(value)


# ---------------------------------------------------------------------------
# OpenAI's /embeddings, as the mock upstream plays it
# ---------------------------------------------------------------------------

class OpenAIEmbeddings:
    """OpenAI's embeddings endpoint: answers in the format asked for (``lax``: floats whatever was asked,
    as some OpenAI-compatible servers do; ``always_b64``: base64 whatever was asked), with usage unless
    ``usage`` is False. Unknown fields and wrong shapes are kept in ``problems``."""

    def __init__(self, lax: bool = False, always_b64: bool = False, usage: bool = True,
                 path: str = "/embeddings") -> None:
        self.lax, self.always_b64, self.usage, self.path = lax, always_b64, usage, path
        self.problems: list[str] = []

    def __call__(self, rec: Received) -> Reply:
        body = rec.json
        if rec.path != self.path:
            self.problems.append(f"path {rec.path} is not {self.path}")
        self.problems += [f"unknown field {k}" for k in sorted(set(body) - OPENAI_FIELDS - {"input_type"})]
        dims = body.get("dimensions") or 4
        want_b64 = (body.get("encoding_format") == "base64" and not self.lax) or self.always_b64
        data: list[dict[str, Any]] = [{"object": "embedding", "index": i, "embedding": vec(i, dims)}
                                      for i in range(n_inputs(body["input"]))]
        out: dict[str, Any] = {"object": "list", "data": data, "model": "text-embedding-3-small-v2",
                               "usage": {"prompt_tokens": 7, "total_tokens": 7}}
        CreateEmbeddingResponse.model_validate(out)  # the SDK's type (floats; base64 is the same list encoded)
        if want_b64:
            for d in data:
                d["embedding"] = b64(d["embedding"])
        if not self.usage:
            del out["usage"]
        return Reply(body=out)


@pytest.fixture
def oa(upstream: MockUpstream) -> Iterator[OpenAIEmbeddings]:
    mock = OpenAIEmbeddings()
    upstream.replies[EMBED_MODEL] = mock
    yield mock
    assert mock.problems == []


def oa_config(upstream: MockUpstream, routes: list[dict[str, Any]] | None = None, **top: Any) -> dict[str, Any]:
    return base_config(upstream.url, routes or [{"name": "emb", "steps": [{"provider": "up1", "model": EMBED_MODEL}]}],
                       **top)


# ---------------------------------------------------------------------------
# Google's embeddings endpoints
# ---------------------------------------------------------------------------

GEMINI_PATH = re.compile(r"^/v1beta/models/(?P<model>[^/:?]+):(?P<method>batchEmbedContents)$")
VERTEX_PATH = re.compile(r"^/v1/(?:projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/)?publishers/google/"
                         r"models/(?P<model>[^/:?]+):(?P<method>predict|embedContent|batchEmbedContents)$")
# What google-genai sends for each method (models._EmbedContentParametersPrivate_to_mldev/_to_vertex).
MLDEV_REQUEST = {"model", "content", "taskType", "title", "outputDimensionality"}
VERTEX_CONFIG = {"taskType", "title", "outputDimensionality", "autoTruncate", "documentOcr", "audioTrackExtraction"}
PREDICT_INSTANCE = {"content", "task_type", "title", "mimeType"}
PREDICT_PARAMETERS = {"outputDimensionality", "autoTruncate"}


class GoogleEmbeddings:
    """The Gemini API's ``batchEmbedContents`` (``vertex=False``) or Vertex AI's embeddings methods."""

    def __init__(self, upstream: MockUpstream, vertex: bool = False, api_key: str | None = GEMINI_KEY,
                 tokens: set[str] | None = None, report_usage: bool = False) -> None:
        self.vertex, self.api_key, self.tokens, self.report_usage = vertex, api_key, tokens, report_usage
        self.calls: list[tuple[dict[str, Any], dict[str, Any], Received]] = []  # (path info, body, request)
        self.problems: list[str] = []
        upstream.default = self._handle  # type: ignore[assignment]

    def _auth(self, rec: Received, info: dict[str, Any]) -> Reply | None:
        h = rec.headers
        if self.vertex and info.get("project"):
            if self.tokens is None or h.get("authorization", "")[7:] not in self.tokens:
                return error_reply(401, "Request had invalid authentication credentials.")
            if "x-goog-api-key" in h:
                self.problems.append("x-goog-api-key sent with OAuth")
        elif h.get("x-goog-api-key") != self.api_key:
            return error_reply(400, "API key not valid. Please pass a valid API key.")
        return None

    def _content(self, c: Any, where: str) -> str:
        try:
            gtypes.Content.model_validate(c)
        except Exception as exc:  # the SDK's type forbids unknown fields
            self.problems.append(f"{where}: {exc}")
            return ""
        parts = c.get("parts") or []
        if len(parts) != 1 or set(parts[0]) != {"text"} or not parts[0]["text"]:
            self.problems.append(f"{where}.parts: one non-empty text part per input")
            return ""
        return str(parts[0]["text"])

    def _handle(self, rec: Received) -> Reply:
        m = (VERTEX_PATH if self.vertex else GEMINI_PATH).match(rec.path)
        if rec.method != "POST" or m is None:
            self.problems.append(f"no such method: {rec.method} {rec.path}")
            return error_reply(404, "not found")
        info = m.groupdict()
        body = json.loads(rec.body)
        self.calls.append((info, body, rec))
        refused = self._auth(rec, info)
        if refused is not None:
            return refused
        method = info["method"]
        dims: int | None = None
        stats = self.vertex  # Vertex reports token counts per input
        if method == "predict":
            for k in sorted(set(body) - {"instances", "parameters"}):
                self.problems.append(f"predict: unknown field {k}")
            for inst in body.get("instances") or []:
                for k in sorted(set(inst) - PREDICT_INSTANCE):
                    self.problems.append(f"instances[].{k}: unknown")
            for k in sorted(set(body.get("parameters") or {}) - PREDICT_PARAMETERS):
                self.problems.append(f"parameters.{k}: unknown")
            texts = [str(i.get("content")) for i in body.get("instances") or []]
            dims = (body.get("parameters") or {}).get("outputDimensionality")
        elif method == "embedContent":
            for k in sorted(set(body) - {"content", "embedContentConfig"}):
                self.problems.append(f"embedContent: unknown field {k}")
            texts = [self._content(body.get("content"), "content")]
            dims = (body.get("embedContentConfig") or {}).get("outputDimensionality")
        else:
            requests = body.get("requests")
            if set(body) != {"requests"} or not isinstance(requests, list) or not requests:
                self.problems.append("batchEmbedContents: a non-empty 'requests' only")
                requests = []
            if len(requests) > 100:
                return error_reply(400, "* BatchEmbedContentsRequest.requests: at most 100 requests can be in one "
                                        "batch")
            texts = []
            for i, r in enumerate(requests):
                if self.vertex:
                    extra = set(r) - {"content", "embedContentConfig"}
                    extra |= {f"embedContentConfig.{k}" for k in set(r.get("embedContentConfig") or {}) - VERTEX_CONFIG}
                    dims = (r.get("embedContentConfig") or {}).get("outputDimensionality")
                else:
                    extra = set(r) - MLDEV_REQUEST
                    if r.get("model") != f"models/{info['model']}":
                        self.problems.append(f"requests[{i}].model: {r.get('model')!r} is not the URL's model")
                    dims = r.get("outputDimensionality")
                self.problems += [f"requests[{i}].{k}: unknown" for k in sorted(extra)]
                texts.append(self._content(r.get("content"), f"requests[{i}].content"))
        if self.problems:
            return error_reply(400, "; ".join(self.problems))
        return Reply(body=self._answer(method, texts, dims or 4, stats))

    def _answer(self, method: str, texts: list[str], dims: int, stats: bool) -> dict[str, Any]:
        """What the service sends, checked by reading it as google-genai does."""
        first = int(texts[0].split()[-1]) if texts and texts[0].split()[-1].isdigit() else 0
        vectors = [vec(first + i, dims) for i in range(len(texts))]
        root: dict[str, Any] = {"embedding_api_type": {"predict": "PREDICT", "embedContent": "EMBED_CONTENT",
                                                       "batchEmbedContents": "BATCH_EMBED_CONTENTS"}[method]}
        if method == "predict":
            out: dict[str, Any] = {"predictions": [
                {"embeddings": {"values": v, "statistics": {"token_count": float(len(t.split())), "truncated": False}}}
                for v, t in zip(vectors, texts, strict=True)], "metadata": {"billableCharacterCount": 10}}
        elif method == "embedContent":
            out = {"embedding": {"values": vectors[0]}, "usageMetadata": {"promptTokenCount": len(texts[0].split())}}
        else:
            out = {"embeddings": [{"values": v} for v in vectors]}
            if self.report_usage or stats:
                out["usageMetadata"] = {"promptTokenCount": sum(len(t.split()) for t in texts)}
        read = (gmodels._EmbedContentResponse_from_vertex(out, None, root) if self.vertex
                else gmodels._EmbedContentResponse_from_mldev(out, None, root))
        parsed = gtypes.EmbedContentResponse.model_validate(read)
        assert parsed.embeddings is not None and len(parsed.embeddings) == len(texts)
        return out


@pytest.fixture
def google(other: MockUpstream) -> Iterator[GoogleEmbeddings]:
    mock = GoogleEmbeddings(other)
    yield mock
    assert mock.problems == []


def google_config(google_url: str, openai_url: str, ptype: str = "gemini", **provider: Any) -> dict[str, Any]:
    routes = [
        {"name": "emb", "steps": [{"provider": "goo", "model": "gemini-embedding-001"}]},
        {"name": "text5", "steps": [{"provider": "goo", "model": "text-embedding-005"}]},
        {"name": "goo-then-openai", "steps": [{"provider": "goo", "model": "gemini-embedding-001"},
                                              {"provider": "up1", "model": EMBED_MODEL}]},
    ]
    cfg = base_config(openai_url, routes)
    spec = {"name": "goo", "type": ptype, "base_url": google_url, **provider}
    if ptype == "gemini" or "credentials_file" not in provider:
        spec.setdefault("api_key", GEMINI_KEY)
    cfg["providers"].append(spec)
    return cfg


# ---------------------------------------------------------------------------
# OpenAI steps: formats, what the upstream received, usage
# ---------------------------------------------------------------------------

FORMATS: dict[str, tuple[dict[str, Any], dict[str, Any], str | None, bool]] = {
    # case: (create() arguments, mock behaviour, encoding_format the upstream got, SDK result is base64 text)
    "sdk-default-asks-base64-and-decodes": ({}, {}, "base64", False),
    "explicit-float": ({"encoding_format": "float"}, {}, "float", False),
    "explicit-base64": ({"encoding_format": "base64"}, {}, "base64", True),
    "upstream-ignores-base64-we-encode": ({}, {"lax": True}, "base64", False),
    "upstream-ignores-base64-client-sees-base64": ({"encoding_format": "base64"}, {"lax": True}, "base64", True),
    "upstream-sends-base64-to-float-we-decode": ({"encoding_format": "float"}, {"always_b64": True}, "float", False),
}


@pytest.mark.parametrize("case", sorted(FORMATS))
def test_openai_step_in_every_encoding(upstream: MockUpstream, case: str) -> None:
    args, behaviour, sent_format, as_text = FORMATS[case]
    mock = OpenAIEmbeddings(**behaviour)
    upstream.replies[EMBED_MODEL] = mock
    with run_gateway(oa_config(upstream)) as gw:
        raw = sdk(gw).embeddings.with_raw_response.create(model="emb", input=["alpha", "beta"], dimensions=3,
                                                          user="u-42", **args)
        answer = raw.parse()
        logs = gw.request_logs()
    assert mock.problems == []
    got = upstream.received[-1].json
    assert got == {"model": EMBED_MODEL, "input": ["alpha", "beta"], "user": "u-42", "dimensions": 3,
                   **({"encoding_format": sent_format} if sent_format else {})}
    assert upstream.received[-1].headers["authorization"] == "Bearer sk-upstream-secret-1"
    vectors = [unb64(d.embedding) if as_text else d.embedding for d in answer.data]  # type: ignore[arg-type]
    on_wire = [d["embedding"] for d in json.loads(raw.http_response.content)["data"]]
    assert on_wire == ([b64(vec(0, 3)), b64(vec(1, 3))] if sent_format == "base64" else [vec(0, 3), vec(1, 3)])
    assert vectors == [vec(0, 3), vec(1, 3)]
    assert [d.index for d in answer.data] == [0, 1]
    assert answer.usage.prompt_tokens == 7 and answer.usage.total_tokens == 7
    assert raw.headers["x-gateway-provider"] == "up1" and raw.headers["x-gateway-model"] == EMBED_MODEL
    assert logs[-1]["door"] == "embeddings" and logs[-1]["route"] == "emb" and logs[-1]["status"] == 200
    assert logs[-1]["tokens"] == {"prompt_tokens": 7, "total_tokens": 7}


def test_an_answer_in_the_format_asked_with_usage_is_passed_on_as_received(upstream: MockUpstream,
                                                                           oa: OpenAIEmbeddings) -> None:
    with run_gateway(oa_config(upstream)) as gw:
        r = httpx.post(gw.url + PATH, headers={"x-api-key": GATEWAY_KEY},
                       json={"model": "emb", "input": "hi", "encoding_format": "base64"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json()["model"] == "text-embedding-3-small-v2"  # the upstream's own bytes
    assert r.json()["data"][0]["embedding"] == b64(vec(0))


@pytest.mark.parametrize("value, tokens", [("a" * 40, 11), (["ab", "cdef"], 3), ([5, 6, 7], 3), ([[1, 2], [3]], 3)])
def test_usage_is_estimated_when_the_upstream_counts_none(upstream: MockUpstream, value: Any, tokens: int) -> None:
    upstream.replies[EMBED_MODEL] = OpenAIEmbeddings(usage=False)
    with run_gateway(oa_config(upstream)) as gw:
        answer = sdk(gw).embeddings.create(model="emb", input=value)
        logs = gw.request_logs()
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == tokens
    assert logs[-1]["tokens"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert upstream.received[-1].json["input"] == value  # token arrays go to OpenAI as they are


def test_fallback_from_a_failing_step(upstream: MockUpstream, oa: OpenAIEmbeddings) -> None:
    upstream.replies["broken-model"] = Reply(status=500, body={"error": {"message": "boom", "type": "server_error"}})
    routes = [{"name": "emb", "steps": [{"provider": "up1", "model": "broken-model"},
                                        {"provider": "echo", "model": "e"},  # echo does not embed: 400, next
                                        {"provider": "up2", "model": EMBED_MODEL}]}]
    with run_gateway(oa_config(upstream, routes)) as gw:
        raw = sdk(gw).embeddings.with_raw_response.create(model="emb", input="hello")
        logs = gw.request_logs()
    assert raw.parse().data[0].embedding == vec(0)
    assert raw.headers["x-gateway-provider"] == "up2" and raw.headers["x-gateway-attempts"] == "3"
    assert [r.json["model"] for r in upstream.received] == ["broken-model", EMBED_MODEL]
    assert upstream.received[-1].headers["authorization"] == "Bearer sk-upstream-secret-2"
    failed = logs[-1]["failed_attempts"]
    assert [(a["provider"], a["status"]) for a in failed] == [("up1", 500), ("echo", 400)]
    assert "does not serve embeddings" in failed[1]["error"]
    assert logs[-1]["tokens"]["prompt_tokens"] == 7


# ---------------------------------------------------------------------------
# Errors, in OpenAI's shape, as the SDK's exception classes
# ---------------------------------------------------------------------------

BAD_BODIES: dict[str, tuple[Any, str, str | None]] = {
    "not-an-object": ([1, 2], "invalid_json", None),
    "no-model": ({"input": "x"}, "missing_model", "model"),
    "no-input": ({"model": "emb"}, "invalid_input", "input"),
    "empty-string": ({"model": "emb", "input": ""}, "invalid_input", "input"),
    "empty-list": ({"model": "emb", "input": []}, "invalid_input", "input"),
    "empty-string-in-list": ({"model": "emb", "input": ["a", ""]}, "invalid_input", "input"),
    "mixed-list": ({"model": "emb", "input": ["a", 1]}, "invalid_input", "input"),
    "negative-token": ({"model": "emb", "input": [1, -2]}, "invalid_input", "input"),
    "bool-token": ({"model": "emb", "input": [True]}, "invalid_input", "input"),
    "empty-token-array": ({"model": "emb", "input": [[1], []]}, "invalid_input", "input"),
    "too-many": ({"model": "emb", "input": ["a"] * 2049}, "invalid_input", "input"),
    "object-input": ({"model": "emb", "input": {"text": "a"}}, "invalid_input", "input"),
    "bad-format": ({"model": "emb", "input": "a", "encoding_format": "int8"}, "invalid_encoding_format",
                   "encoding_format"),
    "zero-dimensions": ({"model": "emb", "input": "a", "dimensions": 0}, "invalid_dimensions", "dimensions"),
    "float-dimensions": ({"model": "emb", "input": "a", "dimensions": 2.5}, "invalid_dimensions", "dimensions"),
    "numeric-user": ({"model": "emb", "input": "a", "user": 7}, "invalid_user", "user"),
}


def test_bodies_openai_would_refuse_are_400_before_any_upstream(upstream: MockUpstream) -> None:
    with run_gateway(oa_config(upstream)) as gw:
        for name, (body, code, param) in BAD_BODIES.items():
            r = httpx.post(gw.url + PATH, headers={"x-api-key": GATEWAY_KEY}, json=body)
            assert r.status_code == 400, (name, r.text)
            err = r.json()["error"]
            assert err["code"] == code and err["type"] == "invalid_request_error", (name, err)
            assert err.get("param") == param, (name, err)
            assert r.headers["x-request-id"]
        with pytest.raises(openai.BadRequestError) as bad:
            sdk(gw).embeddings.create(model="emb", input="")
        assert bad.value.code == "invalid_input"
    assert upstream.received == []


def test_errors_are_the_sdks_exception_classes_and_leak_no_secret(upstream: MockUpstream) -> None:
    def echo_key(rec: Received) -> Reply:  # an upstream that quotes our key back in its error
        return Reply(status=500, body={"error": {"message": f"bad key {rec.headers['authorization']}"}})

    upstream.replies["leaky"] = echo_key
    routes = [{"name": "emb", "steps": [{"provider": "up1", "model": "leaky"}]},
              {"name": "echo-only", "steps": [{"provider": "echo", "model": "e"}]}]
    with run_gateway(oa_config(upstream, routes)) as gw:
        client = sdk(gw)
        with pytest.raises(openai.NotFoundError) as missing:
            client.embeddings.create(model="no-such-route", input="x")
        assert missing.value.code == "model_not_found"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=gw.url + "/v1", api_key="wrong", max_retries=0).embeddings.create(
                model="emb", input="x")
        with pytest.raises(openai.BadRequestError) as refused:
            client.embeddings.create(model="echo-only", input="x")
        assert "does not serve embeddings" in refused.value.message
        with pytest.raises(openai.InternalServerError) as failed:
            client.embeddings.create(model="emb", input="x")
        assert failed.value.status_code == 502
        assert "sk-upstream-secret-1" not in str(failed.value.body)
        assert all("sk-upstream-secret" not in line for line in gw.log_lines())


def test_a_client_keys_routes_apply_and_its_prompt_and_cap_do_not(upstream: MockUpstream, oa: OpenAIEmbeddings,
                                                                  tmp_path: Path) -> None:
    conn, store = store_at(tmp_path / "gw.db")
    try:
        narrow = store.create("narrow", routes=["other"])[1]
        capped = store.create("capped", routes=["emb"], max_tokens=5, system_prompt="Be brief.")[1]
    finally:
        conn.close()
    routes = [{"name": "emb", "steps": [{"provider": "up1", "model": EMBED_MODEL}]},
              {"name": "other", "steps": [{"provider": "echo", "model": "e"}]}]
    with keyed_gateway(oa_config(upstream, routes, store={"path": str(tmp_path / "gw.db")})) as gw:
        with pytest.raises(openai.PermissionDeniedError) as denied:
            openai.OpenAI(base_url=gw.url + "/v1", api_key=narrow, max_retries=0).embeddings.create(
                model="emb", input="x")
        assert denied.value.code == "model_not_allowed"
        answer = openai.OpenAI(base_url=gw.url + "/v1", api_key=capped, max_retries=0).embeddings.create(
            model="emb", input="x")
    assert answer.data[0].embedding == vec(0)
    assert upstream.received[-1].json == {"model": EMBED_MODEL, "input": "x", "encoding_format": "base64"}


# ---------------------------------------------------------------------------
# Azure OpenAI
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("version, path, model_in_body", [
    (None, "/openai/deployments/emb-prod/embeddings?api-version=2024-10-21", False),
    ("v1", "/openai/v1/embeddings", True),
])
def test_azure_step(upstream: MockUpstream, version: str | None, path: str, model_in_body: bool) -> None:
    mock = OpenAIEmbeddings(path=path)
    upstream.replies[path] = mock
    cfg = base_config(upstream.url, [{"name": "emb", "steps": [{"provider": "az", "model": "emb-prod"}]}])
    cfg["providers"].append({"name": "az", "type": "azure", "base_url": upstream.url + "/openai", "api_key": AZURE_KEY,
                             **({"api_version": version} if version else {})})
    if model_in_body:  # the v1 API names the deployment in the body: the mock answers by model
        upstream.replies["emb-prod"] = mock
    with run_gateway(cfg) as gw:
        answer = sdk(gw).embeddings.create(model="emb", input=["a", "b"], dimensions=2)
        logs = gw.request_logs()
    assert mock.problems == []
    got = upstream.received[-1]
    assert got.path == path and got.headers["api-key"] == AZURE_KEY and "authorization" not in got.headers
    assert got.json == {"input": ["a", "b"], "dimensions": 2, "encoding_format": "base64",
                        **({"model": "emb-prod"} if model_in_body else {})}
    assert [d.embedding for d in answer.data] == [vec(0, 2), vec(1, 2)]
    assert logs[-1]["provider"] == "az" and logs[-1]["tokens"]["prompt_tokens"] == 7


# ---------------------------------------------------------------------------
# Gemini API
# ---------------------------------------------------------------------------

TEXTS = ("alpha beta 0", "gamma 1", "delta 2")


@pytest.mark.parametrize("reported", [False, True])
def test_gemini_step_batch_embed_contents(upstream: MockUpstream, other: MockUpstream, google: GoogleEmbeddings,
                                          reported: bool) -> None:
    google.report_usage = reported
    with run_gateway(google_config(other.url, upstream.url)) as gw:
        raw = sdk(gw).embeddings.with_raw_response.create(model="emb", input=list(TEXTS), dimensions=2,
                                                          user="dropped")
        answer = raw.parse()
        logs = gw.request_logs()
    info, body, rec = google.calls[-1]
    assert rec.path == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    assert rec.headers["x-goog-api-key"] == GEMINI_KEY and "authorization" not in rec.headers
    assert body == {"requests": [
        {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": t}], "role": "user"},
         "outputDimensionality": 2} for t in TEXTS]}
    assert [d.embedding for d in answer.data] == [vec(0, 2), vec(1, 2), vec(2, 2)]  # base64 from us, decoded
    assert json.loads(raw.http_response.content)["data"][0]["embedding"] == b64(vec(0, 2))
    assert answer.model == "gemini-embedding-001" and raw.headers["x-gateway-provider"] == "goo"
    tokens = 7 if reported else 8  # Google's count (words, in the mock), or ours: 12 // 4 + 1, 7 // 4 + 1, ...
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == tokens
    assert logs[-1]["tokens"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert upstream.received == []


def test_gemini_float_answer_and_batches_of_a_hundred(upstream: MockUpstream, other: MockUpstream,
                                                      google: GoogleEmbeddings) -> None:
    texts = [f"text {i}" for i in range(150)]
    with run_gateway(google_config(other.url, upstream.url)) as gw:
        raw = sdk(gw).embeddings.with_raw_response.create(model="emb", input=texts, encoding_format="float")
        answer = raw.parse()
    assert isinstance(json.loads(raw.http_response.content)["data"][0]["embedding"], list)
    assert [len(body["requests"]) for _, body, _ in google.calls] == [100, 50]
    assert [d.embedding for d in answer.data] == [vec(i) for i in range(150)]
    assert [d.index for d in answer.data] == list(range(150))


def test_token_ids_fail_a_google_step_and_fall_through(upstream: MockUpstream, other: MockUpstream,
                                                       google: GoogleEmbeddings, oa: OpenAIEmbeddings) -> None:
    with run_gateway(google_config(other.url, upstream.url)) as gw:
        answer = sdk(gw).embeddings.create(model="goo-then-openai", input=[[1, 2, 3], [4]])
        with pytest.raises(openai.BadRequestError) as refused:
            sdk(gw).embeddings.create(model="emb", input=[1, 2, 3])
        logs = gw.request_logs(2)
    assert [d.embedding for d in answer.data] == [vec(0), vec(1)]
    assert upstream.received[-1].json["input"] == [[1, 2, 3], [4]]
    assert google.calls == []  # nothing was sent to Google
    assert [a["status"] for a in logs[0]["failed_attempts"]] == [400]
    assert "token ids" in refused.value.message


def test_gemini_errors_fall_through_and_keep_their_status(upstream: MockUpstream, other: MockUpstream,
                                                          oa: OpenAIEmbeddings) -> None:
    GoogleEmbeddings(other, api_key="another-key")  # refuses the gateway's key: Google's 400
    with run_gateway(google_config(other.url, upstream.url)) as gw:
        assert sdk(gw).embeddings.create(model="goo-then-openai", input="x").data[0].embedding == vec(0)
        with pytest.raises(openai.BadRequestError) as refused:
            sdk(gw).embeddings.create(model="emb", input="x")
        logs = gw.request_logs(2)
    assert "API key not valid" in refused.value.message
    assert logs[0]["failed_attempts"][0]["status"] == 400 and logs[0]["provider"] == "up1"
    assert all(GEMINI_KEY not in line for line in gw.log_lines())


# ---------------------------------------------------------------------------
# Vertex AI: express mode and a service account
# ---------------------------------------------------------------------------

VERTEX_CASES: dict[str, tuple[str, list[str], str, Callable[[dict[str, Any]], bool], int]] = {
    # case: (route, input, method, what the body must be, tokens the answer counts)
    "text-embedding-predict": ("text5", ["a b 0", "c 1"], "predict",
                               lambda b: b == {"instances": [{"content": "a b 0"}, {"content": "c 1"}],
                                               "parameters": {"outputDimensionality": 3}}, 5),
    "gemini-several-batch": ("emb", ["a b 0", "c 1"], "batchEmbedContents",
                             lambda b: b == {"requests": [
                                 {"content": {"parts": [{"text": t}], "role": "user"},
                                  "embedContentConfig": {"outputDimensionality": 3}} for t in ("a b 0", "c 1")]}, 5),
    "gemini-one-embed-content": ("emb", ["a b 0"], "embedContent",
                                 lambda b: b == {"content": {"parts": [{"text": "a b 0"}], "role": "user"},
                                                 "embedContentConfig": {"outputDimensionality": 3}}, 3),
}


@pytest.mark.parametrize("case", sorted(VERTEX_CASES))
def test_vertex_express_mode(upstream: MockUpstream, other: MockUpstream, case: str) -> None:
    route, texts, method, body_ok, tokens = VERTEX_CASES[case]
    mock = GoogleEmbeddings(other, vertex=True, api_key="vertex-express-key-123")
    with run_gateway(google_config(other.url, upstream.url, "vertex", api_key="vertex-express-key-123")) as gw:
        answer = sdk(gw).embeddings.create(model=route, input=texts, dimensions=3)
        logs = gw.request_logs()
    assert mock.problems == []
    info, body, rec = mock.calls[-1]
    model = "text-embedding-005" if route == "text5" else "gemini-embedding-001"
    assert rec.path == f"/v1/publishers/google/models/{model}:{method}"
    assert rec.headers["x-goog-api-key"] == "vertex-express-key-123"
    assert body_ok(body), body
    assert [d.embedding for d in answer.data] == [vec(i, 3) for i in range(len(texts))]
    assert answer.usage.prompt_tokens == tokens and logs[-1]["tokens"]["prompt_tokens"] == tokens


def test_vertex_with_a_service_account(upstream: MockUpstream, other: MockUpstream, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "GCE_METADATA_HOST"):
        monkeypatch.delenv(var, raising=False)
    tokens = TokenServer().start()
    try:
        info, public_key = make_service_account()
        tokens.public_keys[info["client_email"]] = public_key
        (tmp_path / "sa.json").write_text(json.dumps(info))
        mock = GoogleEmbeddings(other, vertex=True, tokens=tokens.issued)
        cfg = google_config(other.url, upstream.url, "vertex", project="test-project", location="europe-west4",
                            credentials_file=str(tmp_path / "sa.json"), token_url=tokens.url)
        with run_gateway(cfg) as gw:
            answer = sdk(gw).embeddings.create(model="text5", input="hello 0")
    finally:
        tokens.stop()
    assert mock.problems == [] and tokens.problems == []
    _, body, rec = mock.calls[-1]
    assert rec.path == ("/v1/projects/test-project/locations/europe-west4/publishers/google/models/"
                        "text-embedding-005:predict")
    assert rec.headers["authorization"].startswith("Bearer ya29.mock-access-token-")
    assert body == {"instances": [{"content": "hello 0"}]}
    assert answer.data[0].embedding == vec(0) and answer.usage.prompt_tokens == 2


# ---------------------------------------------------------------------------
# Large answers do not stall the event loop
# ---------------------------------------------------------------------------

BIG_N, BIG_D = 2048, 1536  # OpenAI's most inputs, text-embedding-3-small's width: a ~40 MB float answer
BIG_VECTOR = [((i * 37) % 2001 - 1000) / 1024 for i in range(BIG_D)]  # float32-exact
LOOP_BOUND = 0.3  # seconds: slower /health answers mean the loop was busy with one request (it was 0.4-1.6 s)


def big_openai_answer(encoding: str, usage: bool = True) -> bytes:
    """OpenAI's answer to BIG_N inputs, built by joining (json.dumps of it would take the test a second)."""
    vector = json.dumps(b64(BIG_VECTOR) if encoding == "base64" else BIG_VECTOR)
    items = ",".join(f'{{"object":"embedding","index":{i},"embedding":{vector}}}' for i in range(BIG_N))
    tail = f',"usage":{{"prompt_tokens":{BIG_N},"total_tokens":{BIG_N}}}' if usage else ""
    return f'{{"object":"list","data":[{items}],"model":"{EMBED_MODEL}"{tail}}}'.encode()


def big_gemini_answer(rec: Received) -> Reply:
    """batchEmbedContents for as many requests as were sent (the mock is plain: its own work would hold the GIL
    the gateway's loop shares in this process)."""
    one = json.dumps({"values": BIG_VECTOR})
    n = rec.body.count(b'"content"')
    return Reply(body=f'{{"embeddings":[{",".join([one] * n)}]}}'.encode(),
                 headers={"content-type": "application/json"})


class LoopProbe:
    """``GET /health`` in a loop, on its own connection, while a request runs: the slowest answer is the longest
    the gateway's event loop spent on something else (/health itself takes well under a millisecond)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            while not self._stop.is_set():
                start = time.perf_counter()
                conn.request("GET", "/health")
                conn.getresponse().read()
                self.latencies.append(time.perf_counter() - start)
        finally:
            conn.close()

    def __enter__(self) -> LoopProbe:
        self._thread.start()
        assert wait_until(lambda: len(self.latencies) >= 3)  # probing before the request starts
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(30)


def big_request(gw: Any, route: str, encoding: str) -> tuple[int, bytes, list[float]]:
    """One request for BIG_N embeddings, over http.client (it reads the answer without decoding it), while a
    LoopProbe runs; the answer and the probe's latencies."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=60)
    body = json.dumps({"model": route, "input": ["x"] * BIG_N, "encoding_format": encoding})
    # As `serve` runs the gateway (service.tune_gc): what was built before serving is frozen out of the
    # collector's sight. Unfrozen, a full collection over this process's heap (the SDKs the tests import) would
    # be a stall of the test's own making.
    gc.collect()
    gc.freeze()
    try:
        with LoopProbe(gw.port) as probe:
            conn.request("POST", PATH, body, {"content-type": "application/json", "x-api-key": GATEWAY_KEY})
            resp = conn.getresponse()
            data = resp.read()
            seen = len(probe.latencies)
        assert seen > 3  # the probe ran during the request
        return resp.status, data, probe.latencies
    finally:
        gc.unfreeze()
        conn.close()


BIG_CASES = {
    # case: (route, the client's encoding_format, the upstream's answer)
    "openai-float-passed-through": ("emb", "float", "float"),
    "openai-float-to-base64": ("emb", "base64", "float"),
    "openai-base64-to-float": ("emb", "float", "base64"),
    "openai-usage-estimated": ("emb", "float", "float-no-usage"),
    "gemini-packed-as-float": ("gemb", "float", "gemini"),
}


@pytest.mark.parametrize("case", list(BIG_CASES))
def test_a_large_answer_does_not_stall_the_event_loop(upstream: MockUpstream, other: MockUpstream,
                                                      case: str) -> None:
    route, encoding, upstream_gives = BIG_CASES[case]
    if upstream_gives == "gemini":
        other.replies["/v1beta/models/gemini-embedding-001:batchEmbedContents"] = big_gemini_answer
    else:
        upstream.replies[EMBED_MODEL] = Reply(
            body=big_openai_answer(upstream_gives.removesuffix("-no-usage"), usage="no-usage" not in upstream_gives),
            headers={"content-type": "application/json"})
    cfg = oa_config(upstream, [{"name": "emb", "steps": [{"provider": "up1", "model": EMBED_MODEL}]},
                               {"name": "gemb", "steps": [{"provider": "goo", "model": "gemini-embedding-001"}]}])
    cfg["providers"].append({"name": "goo", "type": "gemini", "base_url": other.url, "api_key": GEMINI_KEY})
    with run_gateway(cfg) as gw:
        status, data, latencies = big_request(gw, route, encoding)
    assert status == 200, data[:300]
    assert max(latencies) < LOOP_BOUND, f"the loop stalled {max(latencies) * 1000:.0f} ms"
    answer = json.loads(data)
    assert [d["index"] for d in answer["data"]] == list(range(BIG_N))
    first, last = answer["data"][0]["embedding"], answer["data"][-1]["embedding"]
    if encoding == "base64":
        assert unb64(first) == unb64(last) == BIG_VECTOR
    else:
        assert first == last == BIG_VECTOR
    assert answer["usage"] == {"prompt_tokens": BIG_N, "total_tokens": BIG_N}  # counted, or estimated as 1 each


@pytest.mark.parametrize("raw", [
    b"{}", b' { "a" : [ ] } ', b'{"data": [1, {"b": [2]}], "c": "d\\u00e9", "n": null}', b"[1, 2]", b'"x"',
    '{"é": ["ü"]}'.encode(), b'{"a": [1, 2,]}', b'{"a": 1,}', b'{"a" 1}', b'{"a": 1} x', b'{"a": [1 2]}', b"{",
    b'{"a": [1', b"\xff{}",
], ids=repr)
def test_decoding_in_pieces_is_json_loads(raw: bytes) -> None:
    """What a large answer is decoded with (a top-level object's arrays one element per call): json.loads's
    result, or a ValueError where json.loads raises one; and encoding it back is json.dumps's compact UTF-8."""
    try:
        want: Any = json.loads(raw)
    except ValueError:
        with pytest.raises(ValueError):
            openai_provider.loads_in_pieces(raw)
        return
    assert openai_provider.loads_in_pieces(raw) == want
    if isinstance(want, dict):
        assert openai_provider.dumps_in_pieces(want) == json.dumps(want, separators=(",", ":"),
                                                                   ensure_ascii=False).encode()


def test_a_large_answer_not_shaped_as_openais_is_decoded_to_be_sure(upstream: MockUpstream) -> None:
    """A large answer is judged from its head and tail (``data`` first, ``usage`` last, as OpenAI writes them);
    one that is shaped otherwise is decoded whole (off the loop) before it is passed on, and one that is not
    JSON fails the step (502), as a small one does."""
    vectors = [vec(i) for i in range(40_000)]
    late = {"model": "m" * 5000, "usage": {"prompt_tokens": 3, "total_tokens": 3},
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]}
    as_json = {"content-type": "application/json"}
    upstream.replies["late-data"] = Reply(body=json.dumps(late).encode(), headers=as_json)
    upstream.replies["garbage"] = Reply(body=b'{"data": [' + b"1," * 200_000, headers=as_json)  # cut short
    routes = [{"name": "late", "steps": [{"provider": "up1", "model": "late-data"}]},
              {"name": "bad", "steps": [{"provider": "up1", "model": "garbage"}]}]
    with run_gateway(oa_config(upstream, routes)) as gw:
        r = httpx.post(gw.url + PATH, headers={"x-api-key": GATEWAY_KEY}, timeout=20,
                       json={"model": "late", "input": ["x"] * 3, "encoding_format": "float"})
        bad = httpx.post(gw.url + PATH, headers={"x-api-key": GATEWAY_KEY}, timeout=20,
                         json={"model": "bad", "input": "x", "encoding_format": "float"})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3
    assert [d["embedding"] for d in r.json()["data"]] == vectors
    assert bad.status_code == 502 and "not JSON" in bad.json()["error"]["message"], bad.text
