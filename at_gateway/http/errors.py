"""The upstream client's one exception hierarchy: routing catches :class:`UpstreamError` and
records the step as failed, whatever layer (connect, proxy, TLS, framing) it came from."""

from __future__ import annotations


class UpstreamError(Exception):
    """Any failure talking to an upstream."""


class ConnectError(UpstreamError):
    """Could not open a connection (DNS, refused, TLS handshake, proxy)."""


class ProtocolError(UpstreamError):
    """The upstream broke HTTP/1.1, or closed the connection mid-message."""


class ReadError(UpstreamError):
    """The connection failed while reading the response."""


class WriteError(UpstreamError):
    """The connection failed while sending the request."""
