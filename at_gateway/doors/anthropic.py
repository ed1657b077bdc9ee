"""The Anthropic Messages door (being written: see the issue)."""

from __future__ import annotations

from typing import Any

from .base import Door


class AnthropicDoor(Door):
    name = "anthropic"

    def __init__(self, config: Any) -> None:
        self.config = config
