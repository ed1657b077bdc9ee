"""The request log and daily usage, written in batches by one thread (skeleton: filled in by the store work)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config
    from ..services import Recorder


async def open_recorder(config: Config) -> Recorder | None:
    """The store's recorder for this process (the database opened, migrated); None when not in use."""
    return None
