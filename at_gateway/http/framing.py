"""Lean HTTP/1.1 framing for the upstream client's hot path.

h11 is a complete, careful state machine, and per request it costs about as
much as everything else the gateway does (it validates every header through
regular expressions and builds an event object per body chunk). The upstream
side talks to servers we chose, with requests we build, so a small parser is
enough: it reads a response head, then the body by its framing (Content-Length,
chunked, or until close), and hands out everything that arrived together as
one piece. It stays strict where it matters for a proxy: invalid heads,
conflicting lengths, unsupported transfer codings, bad chunk sizes, chunked
framing without its CRLFs (RFC 9112 section 7.1: a bare LF ends no chunk-size
line and no chunk; trailers are a field section, where a bare LF ends a line as
in the head) and truncated bodies are protocol errors, never silently
accepted. h11 is the reference: tests/test_fastpaths.py compares the two.
"""

from __future__ import annotations

import re

Headers = list[tuple[bytes, bytes]]

MAX_HEAD = 256 * 1024  # a response head larger than this is refused
_MAX_CHUNK_LINE = 4096

# The empty line ending a head or trailers, searched for as h11 does: from the LF that ends the last line
# (whose CR, like every line's, is stripped later, once: "X: a\r\r\n" keeps a CR in its value and is refused).
_HEAD_END = re.compile(rb"\n\r?\n")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [^\r\n]*)?")
TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
FIELD_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff](?:[\x20-\x7e\x80-\xff\t]*[\x21-\x7e\x80-\xff])?)?")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,20})[ \t]*(?:;[^\r\n]*)?")  # 20 digits, as h11 (leading zeros)

# Framings of a response body.
NONE, LENGTH, CHUNKED, CLOSE = 0, 1, 2, 3


class HTTPError(Exception):
    """The peer broke HTTP/1.1 (or we were asked to send something that isn't HTTP/1.1)."""


# Fields whose value differs on every message: caching them would only crowd out the others.
_UNIQUE_VALUES = frozenset({b"x-request-id", b"content-length", b"date", b"retry-after",
                            b"x-ratelimit-remaining-requests", b"x-ratelimit-remaining-tokens",
                            b"x-ratelimit-reset-requests", b"x-ratelimit-reset-tokens"})


class HeaderValidator:
    """Checks header fields against the RFC 9110 grammar, each distinct field once.

    Gateways send and answer with the same few fields over and over, so a bounded
    set of fields already seen saves the regular expressions on the hot path. One
    validator belongs to each server and each upstream client (no shared state).
    """

    __slots__ = ("_seen", "_names", "_limit")

    def __init__(self, limit: int = 4096) -> None:
        self._seen: set[tuple[bytes, bytes]] = set()
        self._names: set[bytes] = set()  # names already checked (values that change each time are not cached)
        self._limit = limit

    def check(self, headers: Headers, what: str = "header") -> None:
        seen = self._seen
        for h in headers:
            if h not in seen:
                name, value = h
                if name not in self._names:
                    if TOKEN.fullmatch(name) is None:
                        raise HTTPError(f"illegal {what} {name!r}")
                    if len(self._names) < self._limit:
                        self._names.add(name)
                # Letters and digits only (bytes.isalnum is ASCII-only) is a valid value: no regex for the
                # counters and ids that differ on every message.
                if not value.isalnum() and FIELD_VALUE.fullmatch(value) is None:
                    raise HTTPError(f"illegal {what} {name!r}")
                if len(seen) < self._limit and name not in _UNIQUE_VALUES:
                    seen.add(h)


def request_bytes(method: bytes, target: bytes, headers: Headers, body: bytes, validator: HeaderValidator) -> bytes:
    """Serialise one request; header fields are validated first (never sent unchecked)."""
    if _TARGET.fullmatch(target) is None or TOKEN.fullmatch(method) is None:
        raise HTTPError(f"illegal request target or method: {target!r}")
    validator.check(headers)
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    if body:
        parts.append(body)
    return b"".join(parts)


class ResponseParser:
    """Incremental parser for the responses on one connection (one response at a time)."""

    __slots__ = ("buf", "head_only", "framing", "remaining", "keep_alive", "done", "_error", "_chunk_left",
                 "_in_trailers")

    def __init__(self, head_only: bool = False) -> None:
        self.buf = b""
        self.head_only = head_only  # the request was HEAD: no body whatever the headers say
        self.framing = NONE
        self.remaining = 0
        self.keep_alive = True
        self.done = False
        self._error: HTTPError | None = None
        self._chunk_left = -1  # -1: a chunk-size line is next; else bytes of chunk data (then CRLF) left
        self._in_trailers = False

    def feed(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data

    # -- the head -----------------------------------------------------------
    def head(self) -> tuple[int, Headers] | None:
        """The final (non-1xx) response head once complete, else None (feed more)."""
        while True:
            m = _HEAD_END.search(self.buf)
            if m is None:
                if len(self.buf) > MAX_HEAD:
                    raise HTTPError(f"response head larger than {MAX_HEAD} bytes")
                return None
            raw, self.buf = self.buf[:m.start()], self.buf[m.end():]
            if len(raw) > MAX_HEAD:
                raise HTTPError(f"response head larger than {MAX_HEAD} bytes")
            status, headers, http10 = _parse_head(raw)
            if 100 <= status < 200:
                if status == 101:
                    raise HTTPError("upstream switched protocols (101)")
                continue  # 100 Continue and friends: the real answer follows
            self._framing(status, headers, http10)
            return status, headers

    def _framing(self, status: int, headers: Headers, http10: bool) -> None:
        te = cl = None
        for k, v in headers:  # already normalised by _parse_head
            if k == b"transfer-encoding":
                te = v
            elif k == b"content-length":
                cl = v
            elif k == b"connection" and b"close" in v.lower().replace(b" ", b"").split(b","):
                self.keep_alive = False
        if http10:
            self.keep_alive = False
        if self.head_only or status in (204, 304):
            self.framing = NONE
        elif te is not None:
            self.framing = CHUNKED
            if cl is not None:  # RFC 9112 §6.3: both is a framing error in waiting; never reuse the connection
                self.keep_alive = False
        elif cl is not None:
            self.framing = LENGTH
            self.remaining = int(cl)
        else:
            self.framing = CLOSE  # the body ends when the connection does
            self.keep_alive = False
        if self.framing == NONE or (self.framing == LENGTH and self.remaining == 0):
            self._finish()

    def _finish(self) -> None:
        self.done = True
        if self.buf:  # bytes nobody asked for: never reuse this connection
            self.keep_alive = False

    # -- the body -----------------------------------------------------------
    def body(self) -> bytes:
        """The body bytes buffered so far (b"" when none); sets ``done`` at the message's end."""
        if self._error is not None:
            raise self._error
        if self.done or not self.buf:
            return b""
        if self.framing == LENGTH:
            buf = self.buf
            if len(buf) <= self.remaining:
                self.buf = b""
                self.remaining -= len(buf)
                if not self.remaining:
                    self._finish()
                return buf
            out, self.buf = buf[:self.remaining], buf[self.remaining:]
            self.remaining = 0
            self._finish()
            return out
        if self.framing == CLOSE:
            data, self.buf = self.buf, b""
            return data
        pieces: list[bytes] = []
        try:
            self._chunks(pieces)
        except HTTPError as exc:
            if not pieces:
                raise
            self._error = exc  # hand out what came before the error first
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _chunks(self, out: list[bytes]) -> None:
        buf = self.buf
        pos = 0
        n = len(buf)
        try:
            while pos < n:
                if self._in_trailers:  # a field section, ended by an empty line
                    if buf.startswith(b"\n", pos) or buf.startswith(b"\r\n", pos):
                        pos += 1 if buf[pos] == 10 else 2
                    else:
                        m = _HEAD_END.search(buf, pos)
                        if m is None:
                            if n - pos > MAX_HEAD:
                                raise HTTPError("chunked trailers too large")
                            return
                        _parse_fields(buf[pos:m.start()])  # checked, then dropped
                        pos = m.end()
                    buf = buf[pos:]
                    pos, n = 0, len(buf)
                    self._in_trailers = False
                    self.buf = buf
                    self._finish()
                    return
                left = self._chunk_left
                if left < 0:  # a chunk-size line
                    end = buf.find(b"\n", pos)
                    if end < 0:
                        if n - pos > _MAX_CHUNK_LINE:
                            raise HTTPError("chunk-size line too long")
                        return
                    if end == pos or buf[end - 1] != 13:
                        raise HTTPError(f"chunk-size line not ended by CRLF {buf[pos:end + 1]!r}")
                    m = _CHUNK_SIZE.fullmatch(buf, pos, end - 1)
                    if m is None:
                        raise HTTPError(f"bad chunk-size line {buf[pos:end]!r}")
                    size = int(m.group(1), 16)
                    pos = end + 1
                    if size == 0:
                        self._in_trailers = True
                        continue
                    self._chunk_left = size
                    continue
                if left > 0:
                    take = min(left, n - pos)
                    out.append(buf[pos:pos + take])
                    pos += take
                    self._chunk_left = left - take
                    if self._chunk_left:
                        return
                # the CRLF after a chunk's data
                if n - pos < 2:
                    if n - pos == 1 and buf[pos] != 13:
                        raise HTTPError("chunk data not followed by CRLF")
                    return
                if buf[pos] != 13 or buf[pos + 1] != 10:
                    raise HTTPError("chunk data not followed by CRLF")
                pos += 2
                self._chunk_left = -1
        finally:
            if not self.done:
                self.buf = buf[pos:]

    def eof(self) -> None:
        """The connection closed: fine only for a body that ends at close."""
        self.keep_alive = False
        if self.done:
            return
        if self.framing == CLOSE:
            self.done = True
            return
        raise HTTPError("upstream closed the connection before the response ended")


_CONTROLS = re.compile(rb"[\x00\x0b\x0c]")  # in no status line or field (h11 refuses them too); CR: per line
_FOLD = re.compile(rb"\n[ \t]")


def _check_controls(raw: bytes) -> None:
    if _CONTROLS.search(raw) is not None:
        raise HTTPError("control character in a response head or trailer")


def _parse_head(raw: bytes) -> tuple[int, Headers, bool]:
    first, _, fields = raw.partition(b"\n")
    if first.endswith(b"\r"):
        first = first[:-1]
    m = _STATUS_LINE.fullmatch(first)
    if m is None or _CONTROLS.search(first) is not None:
        raise HTTPError(f"bad status line {first!r}")
    return int(m.group(2)), _parse_fields(fields) if fields else [], m.group(1) == b"0"


def _unfold(lines: list[bytes]) -> list[bytes]:
    """Obsolete line folding undone first, as h11 does: a continuation is part of the line it continues
    (its value is checked whole: "Content-Length: 7" continued by " x" is a bad length, not 7)."""
    out: list[bytes] = []
    for line in lines:
        if line.endswith(b"\r"):
            line = line[:-1]
        if line[:1] in (b" ", b"\t"):
            if not out:
                raise HTTPError("continuation line before any header")
            out[-1] += b" " + line.lstrip(b" \t")
        else:
            out.append(line)
    return out


def _parse_fields(raw: bytes) -> Headers:
    """The field lines of a head or of chunked trailers (LF-separated, CRs not yet stripped), normalised
    the way h11 does it."""
    _check_controls(raw)
    lines = raw.split(b"\n")
    folded = _FOLD.search(raw) is not None or raw[:1] in (b" ", b"\t")
    if folded:
        lines = _unfold(lines)  # CRs stripped there
    headers: Headers = []
    seen_length: bytes | None = None
    seen_te = False
    for line in lines:
        if line.endswith(b"\r") and not folded:
            line = line[:-1]
        name, sep, value = line.partition(b":")
        if not sep or TOKEN.fullmatch(name) is None:
            raise HTTPError(f"bad header line {line!r}")
        value = value.strip(b" \t")
        if b"\r" in value:
            raise HTTPError(f"bad header value for {name!r}")
        name = name.lower()
        if name == b"content-length":  # normalised the way h11 does it
            lengths = {x.strip() for x in value.split(b",")}
            if len(lengths) != 1:
                raise HTTPError("conflicting Content-Length headers")
            value = lengths.pop()
            if not value.isdigit() or len(value) > 18:
                raise HTTPError(f"bad Content-Length {value!r}")
            if seen_length is not None:
                if value != seen_length:
                    raise HTTPError("conflicting Content-Length headers")
                continue
            seen_length = value
        elif name == b"transfer-encoding":
            value = value.lower()
            if seen_te or value != b"chunked":
                raise HTTPError(f"unsupported Transfer-Encoding {value!r}")
            seen_te = True
        headers.append((name, value))
    return headers
