"""Provider types: adapters between the internal form and upstream APIs.

The internal form is the OpenAI chat-completions request as a decoded dict.
Each provider type is one module; this registry names it lazily so that
``check-config`` can validate a config without importing any network code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import Provider

# type name -> (module, class, extra config keys allowed for that type)
PROVIDER_TYPES: dict[str, tuple[str, str, frozenset[str]]] = {
    "openai": ("openai", "OpenAIProvider", frozenset({"preset", "stream_usage", "wire_api"})),
    "echo": ("echo", "EchoProvider", frozenset()),
    "azure": ("azure", "AzureProvider", frozenset({"api_version", "stream_usage"})),
    "anthropic": ("anthropic", "AnthropicProvider", frozenset({"anthropic_version", "max_tokens"})),
    "gemini": ("gemini", "GeminiProvider", frozenset({"safety_settings"})),
    "vertex": ("vertex", "VertexProvider",
               frozenset({"project", "location", "credentials_file", "token_url", "api", "safety_settings"})),
}

# (type, option, value) -> (module, class): a type whose option picks another adapter class.
VARIANTS: dict[tuple[str, str, str], tuple[str, str]] = {
    ("openai", "wire_api", "responses"): ("openai_responses", "OpenAIResponsesProvider"),  # POST /responses
}

# Keys every provider accepts (the resilience ones: api_keys, retries, breaker, ... see config.ProviderConfig).
COMMON_KEYS = frozenset({"name", "type", "api_key", "base_url", "headers", "proxy", "api_keys", "key_strategy",
                         "cooldown", "retries", "retry_backoff", "retry_backoff_max", "breaker", "max_concurrency",
                         "queue_timeout"})

# Types that need no base_url (built in, or a default endpoint).
NO_BASE_URL_TYPES = {"echo", "anthropic", "gemini", "vertex"}


def provider_class(type_name: str, options: Any = None) -> type[Provider]:
    """The adapter class of a type, or of the variant its ``options`` select (``wire_api: responses``)."""
    module_name, cls_name, _ = PROVIDER_TYPES[type_name]
    for (vtype, key, value), target in VARIANTS.items():
        if vtype == type_name and options is not None and options.get(key) == value:
            module_name, cls_name = target
    module = importlib.import_module(f"{__name__}.{module_name}")
    cls: type[Provider] = getattr(module, cls_name)
    return cls


def allowed_keys(type_name: str) -> frozenset[str]:
    entry = PROVIDER_TYPES.get(type_name)
    return COMMON_KEYS | (entry[2] if entry else frozenset())


def build_provider(cfg: Any, client: Any) -> Provider:
    return provider_class(cfg.type, cfg.options)(cfg, client)
