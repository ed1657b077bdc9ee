"""A cryptography-backed path through the .pyz: a Vertex step signing its service-account JWT.

The .pyz runs under ``python3 -I -S``, so cryptography can only come from the wheel the .pyz
embeds and extracts on first use; the local token endpoint verifies the JWT's RS256 signature.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import GATEWAY_KEY, base_config
from tests.mock_google import GeminiMock, TokenServer, make_service_account, response, text
from tests.mock_upstream import MockUpstream, Reply
from tests.pyz_support import pyz_process, session_pyz

MODEL = "gemini-2.5-flash"


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return session_pyz(tmp_path_factory)


def test_vertex_service_account_through_the_pyz(pyz: Path, upstream: MockUpstream, tmp_path: Path) -> None:
    tokens = TokenServer().start()
    try:
        vertex = GeminiMock(upstream, vertex=True, tokens=tokens.issued)
        vertex.on(MODEL, Reply(body=response(text("signed"))))
        info, public_key = make_service_account(tokens.url)
        tokens.public_keys[info["client_email"]] = public_key
        sa = tmp_path / "sa.json"
        sa.write_text(json.dumps(info))
        cfg = base_config(upstream.url, [{"name": "v", "steps": [{"provider": "vx", "model": MODEL}]}])
        cfg["providers"].append({"name": "vx", "type": "vertex", "base_url": upstream.url, "project": "test-project",
                                 "location": "europe-west4", "credentials_file": str(sa), "token_url": tokens.url})
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump(cfg))
        cache = tmp_path / "cache"
        with pyz_process(pyz, config, tmp_path, env={"AT_GATEWAY_CACHE": str(cache)}) as (proc, url, log):
            for _ in range(2):
                r = httpx.post(url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY}, timeout=20,
                               json={"model": "v", "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["message"]["content"] == "signed"
            assert "Traceback" not in log.read_text()
        assert tokens.problems == []  # the JWT's signature and claims checked out
        assert tokens.token_requests == 1  # one token, reused
        assert vertex.problems == []
        assert any(cache.rglob("cryptography")), "cryptography came from the .pyz's extracted wheel"
    finally:
        tokens.stop()
