"""Checks of each provider type's own config keys, for ``check-config``.

Kept apart from the adapters so validating a config imports no network code.
Each checker returns problems as ``key: what is wrong`` (the caller adds the
``providers[i].`` path); secrets are never echoed.
"""

from __future__ import annotations

import re
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


def _safety_settings(options: Mapping[str, Any]) -> list[str]:
    v = options.get("safety_settings")
    if v is not None and not (isinstance(v, list) and all(isinstance(x, dict) for x in v)):
        return ["safety_settings: must be a list of {category, threshold} mappings"]
    return []


def _vertex(options: Mapping[str, Any]) -> list[str]:
    problems = _safety_settings(options)
    api = options.get("api")
    if api is not None and api not in ("auto", "gemini", "openai"):
        problems.append("api: must be one of auto, gemini, openai")
    for key in ("project", "location", "credentials_file", "token_url"):
        problems += _non_empty_str(options, key, {"project": "my-project", "location": "us-central1",
                                                  "credentials_file": "/etc/at-gateway/sa.json",
                                                  "token_url": "https://oauth2.googleapis.com/token"}[key])
    token_url = options.get("token_url")
    if isinstance(token_url, str) and token_url and not token_url.startswith(("http://", "https://")):
        problems.append("token_url: must start with http:// or https://")
    location = options.get("location")
    # It becomes part of the Vertex host name ({location}-aiplatform.googleapis.com): a plain region name only.
    if isinstance(location, str) and location.strip() and not re.fullmatch(r"[a-z0-9-]+", location):
        problems.append("location: must be a region name such as us-central1 or global (letters, digits, '-')")
    for key in ("project",):
        value = options.get(key)
        if isinstance(value, str) and value.strip() and not re.fullmatch(r"[A-Za-z0-9_.:-]+", value):
            problems.append(f"{key}: must be a project id such as my-project (letters, digits, '-', '_', '.', ':')")
    return problems


def _openai(options: Mapping[str, Any]) -> list[str]:
    v = options.get("stream_usage")
    if v is not None and not isinstance(v, bool):
        return ["stream_usage: must be true or false"]
    return []


WIRE_APIS = ("chat", "responses")


def _openai_type(options: Mapping[str, Any]) -> list[str]:
    """``type: openai``: also ``wire_api``, the upstream API its requests go to."""
    problems = _openai(options)
    wire = options.get("wire_api")
    if wire is not None and wire not in WIRE_APIS:
        shown = repr(wire)[:40]
        problems.append(f"wire_api: must be chat (POST /chat/completions, the default) or responses "
                        f"(POST /responses, OpenAI's Responses API); got {shown}")
    elif wire == "responses" and options.get("stream_usage") is not None:
        problems.append("stream_usage: only for wire_api: chat (Responses streams always carry usage); remove it")
    return problems


CHECKERS: dict[str, Callable[[Mapping[str, Any]], list[str]]] = {
    "openai": _openai_type,
    "azure": _openai,
    "anthropic": _anthropic,
    "gemini": _safety_settings,
    "vertex": _vertex,
}


def check_options(type_name: str, options: Mapping[str, Any]) -> list[str]:
    checker = CHECKERS.get(type_name)
    return checker(options) if checker else []
