"""Structured logging: one JSON line per request, secrets redacted by value.

Redaction works on values, not field names: every configured key, and
anything shaped like a bearer token or an ``sk-...`` key, is replaced before
a line is written, wherever it appears (upstream error texts included).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

_TOKEN_PATTERNS = [
    r"[Bb][Ee][Aa][Rr][Ee][Rr]\s+[A-Za-z0-9._~+/=-]{8,}",
    r"\bsk-[A-Za-z0-9_-]{8,}",
    r"\bAIza[0-9A-Za-z_-]{20,}",
    r"(?i)(api[_-]?key|token|secret|password)([\"']?\s*[:=]\s*[\"']?)[^\s\"'&,}]{6,}",
]


class Redactor:
    """Replaces known secrets and token-shaped strings with ``[REDACTED]``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        parts = [re.escape(s) for s in sorted(set(secrets), key=len, reverse=True) if s]
        self._values = re.compile("|".join(parts)) if parts else None
        self._tokens = re.compile("|".join(f"(?:{p})" for p in _TOKEN_PATTERNS[:3]))
        self._assign = re.compile(_TOKEN_PATTERNS[3])

    def __call__(self, text: str) -> str:
        if self._values is not None:
            text = self._values.sub("[REDACTED]", text)
        text = self._tokens.sub("[REDACTED]", text)
        return self._assign.sub(lambda m: f"{m.group(1)}{m.group(2)}[REDACTED]", text)


class JSONFormatter(logging.Formatter):
    """Formats records as one JSON object per line; the message and fields are redacted."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redact = redactor

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        else:
            out["message"] = record.getMessage()
        if record.exc_info and record.exc_info[0] is not None:
            # The type and message only: tracebacks may carry request content.
            exc = record.exc_info[1]
            out["error"] = f"{record.exc_info[0].__name__}: {exc}"
        return self.redact(json.dumps(out, separators=(",", ":"), default=str, ensure_ascii=False))


def setup_logging(level: str, redactor: Redactor, stream: TextIO | None = None) -> logging.Logger:
    root = logging.getLogger("at_gateway")
    root.handlers.clear()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter(redactor))
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    return root


def access_log(logger: logging.Logger, fields: dict[str, Any]) -> None:
    """Write the per-request line (one format call, no work when disabled)."""
    if logger.isEnabledFor(logging.INFO):
        logger.info("request", extra={"fields": fields})
