"""What requests cost (skeleton: filled in by the store work)."""

from __future__ import annotations

from typing import Any


class Pricing:
    """Prices from the config (``prices:``, ``price:`` on a step) over the built-in table."""

    def __init__(self, config: Any) -> None:
        self.config = config

    def cost(self, ctx: Any) -> int | None:
        """The request's cost in nano-dollars from ``ctx.usage``; None when unpriced or without usage."""
        return None
