"""Checks of each provider type's own config keys, for ``check-config``.

Kept apart from the adapters so validating a config imports no network code.
Each checker returns problems as ``key: what is wrong`` (the caller adds the
``providers[i].`` path); secrets are never echoed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


def _positive_int(options: Mapping[str, Any], key: str) -> list[str]:
    v = options.get(key)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
        return [f"{key}: must be a positive whole number"]
    return []


def _non_empty_str(options: Mapping[str, Any], key: str, example: str) -> list[str]:
    v = options.get(key)
    if v is not None and not (isinstance(v, str) and v.strip()):
        return [f"{key}: must be a non-empty string like {example}"]
    return []


def _anthropic(options: Mapping[str, Any]) -> list[str]:
    return _positive_int(options, "max_tokens") + _non_empty_str(options, "anthropic_version", "2023-06-01")


CHECKERS: dict[str, Callable[[Mapping[str, Any]], list[str]]] = {
    "anthropic": _anthropic,
}


def check_options(type_name: str, options: Mapping[str, Any]) -> list[str]:
    checker = CHECKERS.get(type_name)
    return checker(options) if checker else []
