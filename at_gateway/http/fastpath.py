"""The server's fast path: the common request shape parsed without h11.

:func:`parse_request` takes only requests it can parse exactly as h11 would, and
returns None for anything else, so the server hands those to h11 (which answers
every error). The differential tests in ``tests/test_fastpaths.py`` hold it to that.
"""

from __future__ import annotations

import re

from .framing import FIELD_VALUE, TOKEN, Headers

_REQUEST_LINE = re.compile(rb"(GET|POST) ([\x21-\x7e]+) HTTP/1\.1")
_FALLBACK_HEADERS = frozenset({b"transfer-encoding", b"expect", b"upgrade"})


def parse_request(buf: bytes, max_head: int, max_body: int) -> tuple[bytes, bytes, Headers, int, int] | None:
    """``(method, target, headers, content_length, body_start)`` of the plain request at the start of ``buf``.

    Only the common shape is taken: a complete head of at most ``max_head`` raw bytes (every byte up to and
    including the empty line that ends it, as the h11 path counts), HTTP/1.1, GET or POST, valid header lines,
    at most one Content-Length within ``max_body``, a Host, no Transfer-Encoding, Expect, Upgrade or Connection
    other than keep-alive. Anything else returns None and the server lets h11 handle (and answer) it, so this
    never accepts a request h11 would refuse, and parses what it accepts the way h11 does.
    """
    end = buf.find(b"\r\n\r\n", 0, max_head)  # found only if the whole head, \r\n\r\n included, is within max_head
    if end < 0:
        return None
    lines = buf[:end].split(b"\r\n")
    m = _REQUEST_LINE.fullmatch(lines[0])
    if m is None:
        return None
    headers: Headers = []
    length = -1
    host = False
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or TOKEN.fullmatch(name) is None:
            return None
        value = value.strip(b" \t")
        if FIELD_VALUE.fullmatch(value) is None:
            return None
        name = name.lower()
        if name == b"content-length":
            if length >= 0 or not value.isdigit() or len(value) > 18:
                return None
            length = int(value)
        elif name == b"host":
            if host:
                return None  # h11 refuses several Host headers
            host = True
        elif name in _FALLBACK_HEADERS or (name == b"connection" and value.lower() != b"keep-alive"):
            return None
        headers.append((name, value))
    if not host or length > max_body:
        return None
    return m.group(1), m.group(2), headers, max(length, 0), end + 4
