"""The OpenAI Responses door (being written: see the issue)."""

from __future__ import annotations

from typing import Any

from .base import Door


class ResponsesDoor(Door):
    name = "responses"

    def __init__(self, config: Any) -> None:
        self.config = config
