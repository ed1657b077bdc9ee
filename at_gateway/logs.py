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
# "token" is in every line with usage ("tokens", "prompt_tokens"): only an assignment needs the full pattern.
_TOKEN_ASSIGN_HINT = re.compile(r"token[\"']?\s*[:=]")


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
        if text.isascii():
            # Fast path (runs on every request-log line): the patterns scan every position, so run
            # each only when the words it needs are present. For ASCII text these checks are exact
            # necessary conditions; anything else takes the full path below.
            low = text.lower()
            if "bearer" in low or "sk-" in text or "AIza" in text:
                text = self._tokens.sub("[REDACTED]", text)
                low = text.lower()
            if not ("api" in low or "secret" in low or "password" in low
                    or ("token" in low and _TOKEN_ASSIGN_HINT.search(low) is not None)):
                return text
        else:
            text = self._tokens.sub("[REDACTED]", text)
        return self._assign.sub(_keep_name, text)


def _keep_name(m: re.Match[str]) -> str:
    return f"{m.group(1)}{m.group(2)}[REDACTED]"


class JSONFormatter(logging.Formatter):
    """Formats records as one JSON object per line; the message and fields are redacted."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redact = redactor
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # strftime once per second, not once per line
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        out: dict[str, Any] = {
            "time": f"{self._stamp}.{int(record.msecs):03d}Z",
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
        return self.redact(_ENCODER.encode(out))


_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str, ensure_ascii=False)  # built once, not per line


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
        # What logger.info() does, minus its walk up the stack for a caller nobody logs.
        logger.handle(logger.makeRecord(logger.name, logging.INFO, "at_gateway/app.py", 0, "request", (), None,
                                        extra={"fields": fields}))
