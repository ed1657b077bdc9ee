"""Client keys: ``atg_<id>_<secret>``, stored as the id and the SHA-256 of the secret.

(Skeleton: the ClientKey record is fixed here so that limits and the app can build on it; the key
store, the in-memory cache and the CLI are filled in by the keys work.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import Limits


@dataclass(frozen=True)
class ClientKey:
    """One client key as the running gateway sees it (never the secret, never its hash)."""

    id: str
    name: str
    prefix: str  # for display: atg_<id>_<first characters of the secret>
    state: str = "active"  # active | disabled | revoked
    routes: tuple[str, ...] = ()  # glob patterns over route names; () = every route
    limits: Limits = field(default_factory=Limits)  # None fields: the config's limits: defaults apply
    budget_nanousd: int | None = None
    budget_period: str | None = None  # day | week | month
    max_tokens: int | None = None
    system_prompt: str | None = None
    metadata: Any = None  # free JSON (dict), shown in lists and passed to the request log
    expires_at: float | None = None  # unix time


async def open_key_cache(config: Any) -> Any:
    """The client keys of ``config.store``, served from memory (None: no store keys in use)."""
    return None
