"""Front doors: the client-facing API formats, one module each, symmetric to :mod:`at_gateway.providers`.

Chat completions is the internal form and stays in :mod:`at_gateway.app` (its fast path decodes nothing it
does not need); every other door turns its request into that form (:mod:`.base`) and answers in its own:

- :mod:`.anthropic`: ``POST /v1/messages`` and ``/v1/messages/count_tokens`` (Anthropic Messages)
- :mod:`.responses`: ``POST /v1/responses``, ``GET``/``DELETE /v1/responses/{id}`` (OpenAI Responses)
- :mod:`.gemini`: ``POST /v1beta/models/{model}:generateContent`` / ``:streamGenerateContent`` /
  ``:countTokens``, also under ``/v1/models/`` (Gemini's native API)
- :mod:`.embeddings`: ``POST /v1/embeddings``
- :mod:`.completions`: ``POST /v1/completions`` (legacy completions)
"""

from __future__ import annotations

from typing import Any

from .base import Call, Door, DoorStream, StreamRenderer


def build_doors(config: Any) -> dict[str, Door]:
    """Every door, built once per gateway. Imported now, not on first use: serving must import nothing
    more from the .pyz, which a deploy may replace under a running process."""
    from .anthropic import AnthropicDoor
    from .completions import CompletionsDoor
    from .embeddings import EmbeddingsDoor
    from .gemini import GeminiDoor
    from .responses import ResponsesDoor

    doors: list[Door] = [AnthropicDoor(config), ResponsesDoor(config), GeminiDoor(config), EmbeddingsDoor(config),
                         CompletionsDoor(config)]
    return {d.name: d for d in doors}


__all__ = ["Call", "Door", "DoorStream", "StreamRenderer", "build_doors"]
