"""A deploy renames a new .pyz over the one a process is still running (and draining) from.

Python reads every later import from the file now at that path, so serving must import nothing
more from the archive once started: here a proxied provider and a Vertex step both keep working
after the file under the running process is replaced by an unrelated zip.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import GATEWAY_KEY, base_config
from tests.mock_upstream import MockUpstream, Reply, chat_completion
from tests.pyz_support import pyz_process, session_pyz
from tests.test_proxy import ProxyServer


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return session_pyz(tmp_path_factory)


def test_serving_survives_the_pyz_being_replaced(pyz: Path, upstream: MockUpstream, tmp_path: Path) -> None:
    proxy = ProxyServer("http").start()
    try:
        live = tmp_path / "at-gateway"
        live.write_bytes(pyz.read_bytes())
        upstream.replies["m"] = Reply(body=chat_completion("through the proxy"))
        cfg = base_config(upstream.url, [{"name": "r", "steps": [{"provider": "up1", "model": "m"}]}])
        cfg["providers"][0]["proxy"] = proxy.url()
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump(cfg))
        with pyz_process(live, config, tmp_path, env={"AT_GATEWAY_CACHE": str(tmp_path / "cache")}) as (
                proc, url, log):
            assert httpx.get(url + "/health").status_code == 200
            # The swap: another file renamed over the running one (what install.sh deploy does).
            other = tmp_path / "at-gateway.new"
            with zipfile.ZipFile(other, "w") as zf:
                zf.writestr("__main__.py", "raise SystemExit('not the gateway')\n")
            os.replace(other, live)
            r = httpx.post(url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY}, timeout=20,
                           json={"model": "r", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == "through the proxy"
            assert "Traceback" not in log.read_text() and "ZipImportError" not in log.read_text()
        assert proxy.tunnels, "the request went through the proxy"
    finally:
        proxy.stop()
