"""``type: azure``: Azure OpenAI chat completions.

Followed: the Azure OpenAI data-plane inference REST API, GA version
``2024-10-21`` (the default ``api_version``; see Microsoft's "Azure OpenAI
REST API reference" and the ``inference/stable/2024-10-21`` OpenAPI spec)::

    POST {base_url}/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21
    api-key: <key>

The step's ``model`` names the *deployment*. That API's request schema has no
``model`` field (the deployment decides the model), so it is left out of the
body; everything else passes through as for ``type: openai``, whose non-stream
and stream handling this reuses (``stream_options.include_usage`` is part of
that version). ``api_version: v1`` selects Azure's newer version-less API
instead: ``{base_url}/openai/v1/chat/completions`` with ``model`` kept in the
body (there it names the deployment).

``base_url`` is the resource endpoint, ``https://NAME.openai.azure.com``
(a trailing ``/openai`` is tolerated). Without ``api_key``, put a Microsoft
Entra token in ``headers: {Authorization: "Bearer ..."}``.

Azure streams may start with chunks that carry only ``prompt_filter_results``
(empty ``choices``, no usage); they are dropped, so the client sees OpenAI's
chunk sequence and a failure right after them still falls through to the
next step.

Embeddings and legacy completions go to the same deployment's
``/embeddings`` and ``/completions`` (``POST {base_url}/openai/deployments/
{deployment}/embeddings?api-version=...``, with ``api_version: v1``
``{base_url}/openai/v1/embeddings``), bodies and answers as for ``type:
openai``; legacy completions need a deployment of a completions model
(``gpt-35-turbo-instruct``, ``davinci-002``), and their streams lose the
filter-only chunks too.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any
from urllib.parse import quote

from ..config import ProviderConfig, Step
from ..http.pool import Headers, UpstreamClient
from .base import StreamState
from .openai import OpenAIProvider

DEFAULT_API_VERSION = "2024-10-21"


class AzureProvider(OpenAIProvider):
    type_name = "azure"

    def __init__(self, cfg: ProviderConfig, client: UpstreamClient) -> None:
        super().__init__(cfg, client)
        base = (cfg.base_url or "").rstrip("/")
        if base.endswith("/openai"):
            base = base[: -len("/openai")]
        self.base = base
        self.api_version = str(cfg.options.get("api_version") or DEFAULT_API_VERSION)
        self.v1 = self.api_version == "v1"
        self._urls: dict[str, str] = {}
        self._endpoints: dict[tuple[str, str], str] = {}

    def auth_headers(self) -> Headers:
        return [(b"api-key", self.cfg.api_key.encode())] if self.cfg.api_key else []

    def url_for(self, step: Step) -> str:
        url = self._urls.get(step.model)
        if url is None:
            if self.v1:
                url = f"{self.base}/openai/v1/chat/completions"
            else:
                url = (f"{self.base}/openai/deployments/{quote(step.model, safe='')}/chat/completions"
                       f"?api-version={quote(self.api_version, safe='')}")
            self._urls[step.model] = url  # one per configured step: bounded
        return url

    def endpoint(self, step: Step, path: str) -> str:
        url = self._endpoints.get((path, step.model))
        if url is None:
            if self.v1:
                url = f"{self.base}/openai/v1/{path}"
            else:
                url = (f"{self.base}/openai/deployments/{quote(step.model, safe='')}/{path}"
                       f"?api-version={quote(self.api_version, safe='')}")
            self._endpoints[(path, step.model)] = url  # a few per configured step: bounded
        return url

    def body_for(self, body: dict[str, Any], step: Step) -> dict[str, Any]:
        if self.v1:
            return body
        return {k: v for k, v in body.items() if k != "model"}

    def stream(self, body: dict[str, Any], step: Step, state: StreamState) -> AsyncIterator[bytes]:
        return _without_filter_chunks(super().stream(body, step, state))

    def stream_text(self, body: dict[str, Any], step: Step, state: StreamState) -> AsyncIterator[bytes]:
        return _without_filter_chunks(super().stream_text(body, step, state))


async def _without_filter_chunks(inner: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    """An OpenAI-style stream without Azure's filter-only chunks."""
    assert isinstance(inner, AsyncGenerator)
    try:
        async for out in inner:
            if b'"prompt_filter_results"' in out:
                out = _drop_filter_only_chunks(out)
                if not out:
                    continue
            yield out
    finally:
        await inner.aclose()  # release the upstream connection now, not at garbage collection


def _drop_filter_only_chunks(out: bytes) -> bytes:
    """Remove events that only annotate content filtering (no choices, no usage)."""
    kept = []
    for ev in out.split(b"\n\n"):
        if not ev:
            continue
        if b'"prompt_filter_results"' in ev and ev.startswith(b"data:"):
            try:
                obj = json.loads(ev[5:])
            except ValueError:
                obj = None
            if isinstance(obj, dict) and not obj.get("choices") and not obj.get("usage"):
                continue
        kept.append(ev + b"\n\n")
    return b"".join(kept)
