"""Structured logging: one JSON line per request, secrets redacted by value.

Redaction works on values, not field names: every configured key, and
anything shaped like a bearer token or an ``sk-...`` key, is replaced before
a line is written, wherever it appears (upstream error texts included).

Text is redacted whole and only then shortened (:func:`quote`): a cut made
first can split a key so that its start no longer matches and leaks.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO

_TOKEN_PATTERNS = [
    r"[Bb][Ee][Aa][Rr][Ee][Rr]\s+[A-Za-z0-9._~+/=-]{8,}",
    r"\bsk-[A-Za-z0-9_-]{8,}",
    r"\bAIza[0-9A-Za-z_-]{20,}",
    # A whole client key (atg_<id>_<secret>): its id may show (the admin API's URLs name it), never the secret.
    r"(?<=\batg_[a-z0-9]{12}_)[A-Za-z0-9_-]{8,}",
    r"(?i)(api[_-]?key|token|secret|password)([\"']?\s*[:=]\s*[\"']?)[^\s\"'&,}]{6,}",
]
# "token" is in every line with usage ("tokens", "prompt_tokens"): only an assignment needs the full pattern.
_TOKEN_ASSIGN_HINT = re.compile(r"token[\"']?\s*[:=]")
# The longest part of a token-shaped secret that a cut can leave unrecognised at a text's end (an
# ``AIza`` key cut before its 20th character is 23): quote() keeps this much past what it shows.
_PATTERN_REACH = 32


class Redactor:
    """Replaces known secrets and token-shaped strings with ``[REDACTED]``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        values = sorted({s for s in secrets if s}, key=len, reverse=True)
        parts = [re.escape(s) for s in values]
        # How far the start of a secret cut off at a text's end can reach back from that end.
        self.reach = max(_PATTERN_REACH, len(values[0]) if values else 0)
        self._values = re.compile("|".join(parts)) if parts else None
        self._tokens = re.compile("|".join(f"(?:{p})" for p in _TOKEN_PATTERNS[:-1]))
        self._assign = re.compile(_TOKEN_PATTERNS[-1])  # the assignment pattern is the last one

    def quote(self, data: bytes | str, limit: int) -> str:
        """:func:`quote` with this redactor: for callers that hold the redactor and not this module."""
        return quote(self, data, limit)

    def __call__(self, text: str) -> str:
        if self._values is not None:
            text = self._values.sub("[REDACTED]", text)
        if text.isascii():
            # Fast path (runs on every request-log line): the patterns scan every position, so run
            # each only when the words it needs are present. For ASCII text these checks are exact
            # necessary conditions; anything else takes the full path below.
            low = text.lower()
            if "bearer" in low or "sk-" in text or "AIza" in text or "atg_" in text:
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


def quote(redact: Callable[[str], str], data: bytes | str, limit: int) -> str:
    """``data`` made fit to show: redacted whole, then shortened to ``limit`` characters ("…" included).

    The one way upstream bytes (or a client's) are quoted: redacting after a cut would miss a key
    the cut split, and leak its start. Only as much as can matter is redacted: a text far longer
    than ``limit`` is redacted in a growing prefix until what it redacts to reaches ``limit`` plus
    the redactor's ``reach`` (the most a secret split at the prefix's end can leave unrecognised),
    so whatever such a split leaves lies beyond the cut. Bytes are decoded as UTF-8 (bad bytes
    replaced).
    """
    reach = getattr(redact, "reach", None)
    size = len(data)
    if reach is None or size <= 2 * (limit + reach):
        text = redact(data.decode("utf-8", "replace") if isinstance(data, bytes) else data)
    else:
        window = 2 * (limit + reach)
        while True:
            part = data[:window]
            text = redact(part.decode("utf-8", "replace") if isinstance(part, bytes) else part)
            if window >= size or len(text) >= limit + reach:
                break
            window *= 4  # redaction shrank the prefix (long tokens become ten characters): take more
    if len(text) <= limit:
        return text
    return text[:limit - 1] + "…"


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
            out["msg"] = record.getMessage()  # the request lines' field name too: "msg": "request"
        if record.exc_info and record.exc_info[0] is not None:
            # The type and message only: tracebacks may carry request content.
            exc = record.exc_info[1]
            out["error"] = f"{record.exc_info[0].__name__}: {exc}"
        return self.redact(_ENCODER.encode(out))


_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str, ensure_ascii=False)  # built once, not per line


def setup_logging(level: str, redactor: Redactor, stream: TextIO | None = None) -> logging.Logger:
    root = logging.getLogger("at_gateway")
    # Our lines never show the process name, and looking it up costs every record a call once multiprocessing
    # is imported (the shared cooldown state's lock imports it).
    logging.logMultiprocessing = False
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
