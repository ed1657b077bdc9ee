"""Admin API: system (being written)."""

from __future__ import annotations

from .api import Route

ROUTES: list[Route] = []
