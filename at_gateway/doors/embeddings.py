"""The OpenAI embeddings door (being written: see the issue)."""

from __future__ import annotations

from typing import Any

from .base import Door


class EmbeddingsDoor(Door):
    name = "embeddings"

    def __init__(self, config: Any) -> None:
        self.config = config
