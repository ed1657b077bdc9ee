"""Rate limits, token quotas and budgets (skeleton: filled in by the limits work)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config
    from ..services import Limiter


async def open_limiter(config: Config) -> Limiter | None:
    """The limiter for this process; None when no limit can apply."""
    return None
