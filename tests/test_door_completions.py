"""``POST /v1/completions`` (legacy): the openai SDK as the client, through the gateway to a mock OpenAI (and
Azure OpenAI) whose answers are validated with the SDK's own ``Completion`` type: passed through whole and
streamed, other provider types refused per step (the route falls through), a broken stream ending with
OpenAI's error event, a client key's cap."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types import Completion

from tests.conftest import GATEWAY_KEY, base_config, run_gateway
from tests.mock_upstream import MockUpstream, Reply
from tests.test_keys import keyed_gateway, store_at

INSTRUCT = "gpt-3.5-turbo-instruct"
PATH = "/v1/completions"
KEY = {"x-api-key": GATEWAY_KEY}
ROUTES = [{"name": "inst", "steps": [{"provider": "up1", "model": INSTRUCT}]},
          {"name": "inst-2", "steps": [{"provider": "up1", "model": "broken"}, {"provider": "up2", "model": INSTRUCT}]}]


def text_completion(text: str = "Hello there", finish: str = "stop") -> dict[str, Any]:
    out = {"id": "cmpl-mock", "object": "text_completion", "created": 1, "model": INSTRUCT,
           "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
           "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}}
    Completion.model_validate(out)
    return out


def text_chunk(text: str | None = None, finish: str | None = None, usage: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"id": "cmpl-mock", "object": "text_completion", "created": 1, "model": INSTRUCT,
                           "choices": [] if usage else [{"text": text or "", "index": 0, "logprobs": None,
                                                          "finish_reason": finish}]}
    if usage:
        out["usage"] = {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    # The SDK's type, but for the null finish_reason of chunks before the last (it reads chunks unvalidated).
    Completion.model_validate({**out, "choices": [{**c, "finish_reason": c["finish_reason"] or "stop"}
                                                  for c in out["choices"]]})
    return out


def text_stream(*words: str) -> list[Any]:
    return [*(text_chunk(w) for w in words), text_chunk(finish="stop"), text_chunk(usage=True)]


def sdk(gw: Any, key: str = GATEWAY_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20)


def events(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e]


# ---------------------------------------------------------------------------
# Passed through: whole answers and streams
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", ["Say hi", ["Say hi", "Say bye"], [1, 2, 3], [[1, 2], [3]]])
def test_whole_answer_passed_through(upstream: MockUpstream, prompt: Any) -> None:
    upstream.replies[INSTRUCT] = Reply(body=text_completion())
    with run_gateway(base_config(upstream.url, ROUTES)) as gw:
        raw = sdk(gw).completions.with_raw_response.create(model="inst", prompt=prompt, max_tokens=5, temperature=0,
                                                           echo=False, logprobs=2, extra_body={"top_k": 3})
        answer = raw.parse()
        logs = gw.request_logs()
    got = upstream.received[-1]
    assert got.path == "/completions" and got.headers["authorization"] == "Bearer sk-upstream-secret-1"
    assert got.json == {"model": INSTRUCT, "prompt": prompt, "max_tokens": 5, "temperature": 0, "echo": False,
                        "logprobs": 2, "top_k": 3}
    assert json.loads(raw.http_response.content) == text_completion()  # the upstream's answer as it was
    assert answer.choices[0].text == "Hello there" and answer.object == "text_completion"
    assert raw.headers["x-gateway-provider"] == "up1" and raw.headers["x-gateway-model"] == INSTRUCT
    assert logs[-1]["door"] == "completions" and logs[-1]["status"] == 200
    assert logs[-1]["tokens"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_passed_through_and_ended_with_done(upstream: MockUpstream, include_usage: bool) -> None:
    upstream.replies[INSTRUCT] = Reply(sse=text_stream("Hel", "lo", "!"))
    with run_gateway(base_config(upstream.url, ROUTES)) as gw:
        extra = {"stream_options": {"include_usage": True}} if include_usage else {}
        chunks = list(sdk(gw).completions.create(model="inst", prompt="Say hi", stream=True, **extra))  # type: ignore[call-overload]
        r = httpx.post(gw.url + PATH, headers=KEY, json={"model": "inst", "prompt": "Say hi", "stream": True, **extra})
        logs = gw.request_logs(2)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello!"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage_chunks = [c for c in chunks if not c.choices]
    assert len(usage_chunks) == (1 if include_usage else 0)
    assert r.headers["content-type"] == "text/event-stream"
    evs = events(r.content)
    assert evs[-1] == b"data: [DONE]"
    assert [json.loads(e[6:]) for e in evs[:-1]] == [json.loads(json.dumps(x)) for x in text_stream("Hel", "lo", "!")
                                                     if include_usage or x["choices"]]
    got = upstream.received[-1]
    assert got.path == "/completions" and got.json["stream"] is True
    assert got.json["stream_options"] == {"include_usage": True}  # asked always: accounting needs it
    assert got.headers["accept"] == "text/event-stream"
    assert all(line["tokens"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7} for line in logs)
    assert logs[-1]["stream"] is True and logs[-1]["door"] == "completions"


# ---------------------------------------------------------------------------
# Other provider types: 400 for their step, the route falls through
# ---------------------------------------------------------------------------

OTHER_TYPES = {"echo": {}, "anthropic": {"api_key": "sk-ant-x"}, "gemini": {"api_key": "g-key"},
               "vertex": {"api_key": "v-key"}}


def mixed_config(upstream: MockUpstream, other: MockUpstream, ptype: str) -> dict[str, Any]:
    x_step = {"provider": "x", "model": "some-model"}
    routes = [{"name": "mixed", "steps": [x_step, {"provider": "up1", "model": INSTRUCT}]},
              {"name": "only-x", "steps": [x_step]}]
    cfg = base_config(upstream.url, routes)
    spec: dict[str, Any] = {"name": "x", "type": ptype, **OTHER_TYPES[ptype]}
    if ptype != "echo":
        spec["base_url"] = other.url
    cfg["providers"].append(spec)
    return cfg


@pytest.mark.parametrize("ptype", sorted(OTHER_TYPES))
def test_a_step_of_another_type_is_a_400_and_the_route_falls_through(upstream: MockUpstream, other: MockUpstream,
                                                                     ptype: str) -> None:
    upstream.replies[INSTRUCT] = lambda rec: (Reply(sse=text_stream("ok")) if rec.json.get("stream")
                                              else Reply(body=text_completion("ok")))
    with run_gateway(mixed_config(upstream, other, ptype)) as gw:
        client = sdk(gw)
        raw = client.completions.with_raw_response.create(model="mixed", prompt="hi")
        assert raw.parse().choices[0].text == "ok" and raw.headers["x-gateway-attempts"] == "2"
        streamed = "".join(c.choices[0].text for c in client.completions.create(model="mixed", prompt="hi", stream=True)
                           if c.choices)
        assert streamed == "ok"
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model="only-x", prompt="hi")
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="only-x", prompt="hi", stream=True)
        logs = gw.request_logs(4)
    assert "does not serve legacy completions" in refused.value.message
    for line in logs[:2]:
        assert [(a["provider"], a["status"]) for a in line["failed_attempts"]] == [("x", 400)]
        assert line["provider"] == "up1"
    assert other.received == []  # nothing went to the other type's upstream
    assert [r.path for r in upstream.received] == ["/completions", "/completions"]


def test_fallback_from_a_failing_openai_step(upstream: MockUpstream) -> None:
    upstream.replies["broken"] = Reply(body={"object": "list", "data": []})  # 200, but not a text completion
    upstream.replies[INSTRUCT] = Reply(body=text_completion())
    with run_gateway(base_config(upstream.url, ROUTES)) as gw:
        raw = sdk(gw).completions.with_raw_response.create(model="inst-2", prompt="hi")
        logs = gw.request_logs()
    assert raw.parse().choices[0].text == "Hello there" and raw.headers["x-gateway-provider"] == "up2"
    assert "not a text completion" in logs[-1]["failed_attempts"][0]["error"]


# ---------------------------------------------------------------------------
# Broken streams
# ---------------------------------------------------------------------------

def test_a_stream_broken_after_its_first_event_ends_with_the_error_event(upstream: MockUpstream) -> None:
    upstream.replies[INSTRUCT] = Reply(sse=text_stream("Hel", "lo", "!"), reset_after=2)
    with run_gateway(base_config(upstream.url, ROUTES)) as gw:
        seen = []
        with pytest.raises(openai.APIError) as broken:
            for c in sdk(gw).completions.create(model="inst", prompt="hi", stream=True):
                seen.append(c.choices[0].text)
        r = httpx.post(gw.url + PATH, headers=KEY, json={"model": "inst", "prompt": "hi", "stream": True})
        logs = gw.request_logs(2)
    assert seen == ["Hel", "lo"]
    assert "interrupted" in broken.value.message
    evs = events(r.content)
    assert b"[DONE]" not in r.content
    err = json.loads(evs[-1][6:])["error"]
    assert err["code"] == "stream_interrupted" and err["status"] == 502 and err["type"] == "upstream_error"
    assert logs[-1]["status"] == 200 and logs[-1]["outcome"] == 502


@pytest.mark.parametrize("first", ["reset", "error-event", "not-a-completion"])
def test_a_stream_failing_before_its_first_event_falls_through(upstream: MockUpstream, first: str) -> None:
    upstream.replies["broken"] = {
        "reset": Reply(sse=text_stream("x"), reset_after=0),
        "error-event": Reply(sse=[{"error": {"message": "overloaded", "type": "server_error", "code": 503}}]),
        "not-a-completion": Reply(sse=[{"object": "something.else"}]),
    }[first]
    upstream.replies[INSTRUCT] = Reply(sse=text_stream("fine"))
    with run_gateway(base_config(upstream.url, ROUTES)) as gw:
        text = "".join(c.choices[0].text for c in sdk(gw).completions.create(model="inst-2", prompt="hi", stream=True)
                       if c.choices)
        logs = gw.request_logs()
    assert text == "fine" and logs[-1]["provider"] == "up2"
    assert len(logs[-1]["failed_attempts"]) == 1


# ---------------------------------------------------------------------------
# Azure OpenAI deployments
# ---------------------------------------------------------------------------

def test_azure_deployment_whole_and_streamed(upstream: MockUpstream) -> None:
    path = "/openai/deployments/instruct-prod/completions?api-version=2024-10-21"
    filters = {"hate": {"filtered": False, "severity": "safe"}}
    filter_only = {"id": "", "object": "", "created": 0, "model": "", "choices": [],
                   "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": filters}]}
    upstream.replies[path] = lambda rec: (Reply(sse=[filter_only, *text_stream("az", "ure")]) if rec.json.get("stream")
                                          else Reply(body=text_completion("azure")))
    cfg = base_config(upstream.url, [{"name": "inst", "steps": [{"provider": "az", "model": "instruct-prod"}]}])
    cfg["providers"].append({"name": "az", "type": "azure", "base_url": upstream.url, "api_key": "azure-key-123456"})
    with run_gateway(cfg) as gw:
        whole = sdk(gw).completions.create(model="inst", prompt="hi", max_tokens=3)
        r = httpx.post(gw.url + PATH, headers=KEY, json={"model": "inst", "prompt": "hi", "stream": True})
    assert whole.choices[0].text == "azure"
    assert [e for e in events(r.content) if b"prompt_filter_results" in e] == []  # dropped, as for chat
    assert events(r.content)[-1] == b"data: [DONE]"
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events(r.content)[:-1]) == "azure"
    for got in upstream.received:
        assert got.path == path and got.headers["api-key"] == "azure-key-123456" and "model" not in got.json
    assert upstream.received[0].json == {"prompt": "hi", "max_tokens": 3}


# ---------------------------------------------------------------------------
# Client keys and bad requests
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("cap, sent, expected", [
    (100, {}, 16),  # absent: OpenAI's own default, not raised to the cap
    (8, {}, 8),  # absent, and the cap is below that default
    (100, {"max_tokens": 500}, 100),
    (100, {"max_tokens": 10}, 10),
])
def test_a_client_keys_cap_on_max_tokens(upstream: MockUpstream, tmp_path: Path, cap: int, sent: dict[str, Any],
                                         expected: int) -> None:
    conn, store = store_at(tmp_path / "gw.db")
    try:
        key = store.create("capped", max_tokens=cap)[1]
    finally:
        conn.close()
    upstream.replies[INSTRUCT] = Reply(body=text_completion())
    with keyed_gateway(base_config(upstream.url, ROUTES, store={"path": str(tmp_path / "gw.db")})) as gw:
        assert sdk(gw, key).completions.create(model="inst", prompt="hi", **sent).choices[0].text == "Hello there"
    assert upstream.received[-1].json["max_tokens"] == expected


def test_a_client_key_with_a_system_prompt_or_other_routes_is_refused(upstream: MockUpstream, tmp_path: Path) -> None:
    conn, store = store_at(tmp_path / "gw.db")
    try:
        prompted = store.create("prompted", system_prompt="Be brief.")[1]
        narrow = store.create("narrow", routes=["inst-2"])[1]
        capped = store.create("capped", max_tokens=10)[1]
    finally:
        conn.close()
    with keyed_gateway(base_config(upstream.url, ROUTES, store={"path": str(tmp_path / "gw.db")})) as gw:
        with pytest.raises(openai.PermissionDeniedError) as prompt_refused:
            sdk(gw, prompted).completions.create(model="inst", prompt="hi")
        with pytest.raises(openai.PermissionDeniedError) as route_refused:
            sdk(gw, narrow).completions.create(model="inst", prompt="hi")
        r = httpx.post(gw.url + PATH, headers={"authorization": f"Bearer {capped}"},
                       json={"model": "inst", "prompt": "hi", "max_tokens": "ten"})
    assert prompt_refused.value.code == "system_prompt_required"
    assert route_refused.value.code == "model_not_allowed"
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert upstream.received == []


BAD_BODIES: dict[str, tuple[Any, int, str]] = {
    "not-an-object": ("hi", 400, "invalid_json"),
    "no-model": ({"prompt": "hi"}, 400, "missing_model"),
    "no-prompt": ({"model": "inst"}, 400, "invalid_prompt"),
    "empty-prompt-list": ({"model": "inst", "prompt": []}, 400, "invalid_prompt"),
    "mixed-prompt": ({"model": "inst", "prompt": ["a", 1]}, 400, "invalid_prompt"),
    "object-prompt": ({"model": "inst", "prompt": {"text": "a"}}, 400, "invalid_prompt"),
    "stream-not-bool": ({"model": "inst", "prompt": "a", "stream": "yes"}, 400, "invalid_stream"),
    "stream-options-not-object": ({"model": "inst", "prompt": "a", "stream_options": True}, 400,
                                  "invalid_stream_options"),
    "unknown-route": ({"model": "nope", "prompt": "a"}, 404, "model_not_found"),
}


def test_bad_requests_in_openais_shape(upstream: MockUpstream) -> None:
    with run_gateway(base_config(upstream.url, ROUTES)) as gw:
        for name, (body, status, code) in BAD_BODIES.items():
            r = httpx.post(gw.url + PATH, headers=KEY, json=body)
            assert r.status_code == status, (name, r.text)
            err = r.json()["error"]
            assert err["code"] == code and isinstance(err["message"], str), (name, err)
            assert r.headers["x-request-id"]
        with pytest.raises(openai.AuthenticationError):
            sdk(gw, "wrong-key").completions.create(model="inst", prompt="hi")
    assert upstream.received == []
