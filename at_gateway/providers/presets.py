"""``preset:`` names for ``type: openai``: the base URL of well-known OpenAI-compatible APIs.

Kept apart from the adapter (which imports the network layer) so config
validation can check a preset name without importing any network code.
A ``base_url`` in the config always wins over a preset's. The URLs follow
each service's own "OpenAI compatibility" documentation; the local servers
(ollama, lmstudio, vllm) use their default ports on 127.0.0.1.
"""

from __future__ import annotations

PRESETS: dict[str, str] = {
    "openai": "https://api.openai.com/v1",
    "groq": "https://api.groq.com/openai/v1",
    "deepseek": "https://api.deepseek.com",
    "mistral": "https://api.mistral.ai/v1",
    "together": "https://api.together.xyz/v1",
    "openrouter": "https://openrouter.ai/api/v1",
    "cerebras": "https://api.cerebras.ai/v1",
    "xai": "https://api.x.ai/v1",
    "perplexity": "https://api.perplexity.ai",
    "fireworks": "https://api.fireworks.ai/inference/v1",
    "ollama": "http://127.0.0.1:11434/v1",
    "lmstudio": "http://127.0.0.1:1234/v1",
    "vllm": "http://127.0.0.1:8000/v1",
}
