"""TLS for upstream connections, as a stream layer whose buffers the pool can see.

The pool may reuse a connection only when nothing at all is buffered in it
(see :mod:`.pool`). A TLS layer buffers in two places the socket cannot show:
records received but not decrypted yet (the incoming memory BIO), and
decrypted bytes not read yet (``SSLObject.pending()``). anyio's ``TLSStream``
keeps the first in a private attribute, so this module has its own small TLS
stream over ``ssl.SSLObject`` and two ``ssl.MemoryBIO`` whose
:meth:`~TLSStream.buffered` says so, without reaching into anyone's internals.

It behaves like anyio's ``TLSStream(standard_compatible=False)``, as the pool
and the proxy connector used it: no closing handshake, and an EOF without
close_notify is a plain :class:`anyio.EndOfStream` (HTTP framing, not TLS,
tells a complete answer from a truncated one).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import anyio
import anyio.abc
from anyio.streams.tls import TLSAttribute

T = TypeVar("T")


class LayeredStream(anyio.abc.ByteStream):
    """A stream over ``transport_stream`` that may hold received bytes not handed out yet.

    Every stream wrapper the upstream client builds (TLS, the bytes a proxy sent
    after its handshake) is one, so the pool can walk the layers of a connection
    down to the socket and ask each whether it holds anything.
    """

    transport_stream: anyio.abc.ByteStream

    def buffered(self) -> bool:
        """True when this layer (not the ones beneath) holds received bytes not yet returned by receive()."""
        raise NotImplementedError


class TLSStream(LayeredStream):
    """Client-side TLS over any byte stream; :meth:`buffered` covers records and decrypted bytes."""

    def __init__(self, transport: anyio.abc.ByteStream, ssl_object: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO) -> None:
        self.transport_stream = transport
        self._ssl = ssl_object
        self._in = incoming
        self._out = outgoing
        self._broken = False

    @classmethod
    async def wrap(cls, transport: anyio.abc.ByteStream, hostname: str, ssl_context: ssl.SSLContext) -> TLSStream:
        """Do the handshake over ``transport``; ssl.SSLError when it fails (certificate, protocol),
        anyio.EndOfStream when the peer closes during it. The caller closes ``transport`` on failure."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ssl_context.wrap_bio(incoming, outgoing, server_side=False, server_hostname=hostname)
        stream = cls(transport, obj, incoming, outgoing)
        await stream._run(obj.do_handshake)
        return stream

    def buffered(self) -> bool:
        return self._in.pending > 0 or self._ssl.pending() > 0

    async def _flush(self) -> None:
        data = self._out.read()
        if data:
            try:
                await self.transport_stream.send(data)
            except BaseException:
                # The record's sequence number is spent: nothing sent after it would decrypt.
                self._broken = True
                raise

    async def _run(self, op: Callable[..., T], *args: Any) -> T:
        """Call an SSLObject method, moving records between the BIOs and the transport until it completes."""
        if self._broken:
            raise anyio.BrokenResourceError
        while True:
            try:
                result = op(*args)
            except ssl.SSLWantReadError:
                await self._flush()  # e.g. a handshake message the peer waits for
                try:
                    data = await self.transport_stream.receive(65536)
                except anyio.EndOfStream:
                    self._in.write_eof()
                else:
                    self._in.write(data)
                continue
            except ssl.SSLWantWriteError:  # memory BIOs never fill, but the contract allows it
                await self._flush()
                continue
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                self._broken = True
                raise anyio.EndOfStream from None
            except ssl.SSLSyscallError as exc:
                self._broken = True
                raise anyio.BrokenResourceError from exc
            except ssl.SSLError:
                self._broken = True
                raise
            if self._out.pending:
                await self._flush()
            return result

    async def receive(self, max_bytes: int = 65536) -> bytes:
        data = await self._run(self._ssl.read, max_bytes)
        if not data:  # close_notify
            raise anyio.EndOfStream
        return data

    async def send(self, item: bytes) -> None:
        await self._run(self._ssl.write, item)

    async def send_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    async def aclose(self) -> None:
        # No closing handshake (as before, with anyio's standard_compatible=False): waiting for the
        # peer's close_notify would only hold a connection we are done with.
        self._broken = True
        await self.transport_stream.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        obj = self._ssl
        return {
            **self.transport_stream.extra_attributes,
            TLSAttribute.ssl_object: lambda: obj,
            TLSAttribute.tls_version: obj.version,
            TLSAttribute.cipher: obj.cipher,
            TLSAttribute.alpn_protocol: obj.selected_alpn_protocol,
            TLSAttribute.peer_certificate: lambda: obj.getpeercert(False),
            TLSAttribute.peer_certificate_binary: lambda: obj.getpeercert(True),
            TLSAttribute.server_side: lambda: False,
            TLSAttribute.standard_compatible: lambda: False,
        }
