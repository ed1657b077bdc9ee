"""at-gateway: a self-hosted LLM API gateway on anyio + h11."""

__version__ = "0.1.0"
