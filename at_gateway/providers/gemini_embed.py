"""Embeddings on Gemini (``batchEmbedContents``) and Vertex AI (being written: see issue 12)."""

from __future__ import annotations

from typing import Any

from ..config import Step
from ..errors import StepFailed
from .base import Completion


async def embed(provider: Any, body: dict[str, Any], step: Step) -> Completion:
    """An OpenAI embeddings request on a ``gemini`` or ``vertex`` provider; OpenAI's ``list`` answer back."""
    raise StepFailed("embeddings on Gemini are not written yet", status=400)
