"""``workers: N``: one limiter state for every worker of the machine, held by the supervisor.

Before forking a worker, the supervisor makes a Unix datagram socket pair: it keeps one end, the
worker gets the other. The supervisor's loop (:mod:`..workers`) waits on those ends beside its
children, and each admission is one datagram each way, decided by the one :class:`LimitState` in
one atomic step, so a limit holds across all workers exactly as in one process: a burst of three
times the limit spread over the workers admits exactly the limit. It costs one round trip over a
local socket per limited request (tens of microseconds), settling is one datagram the worker does
not wait for, and requests that no limit applies to never ask.

A quota's first use reads the store's usage for its period in the supervisor, synchronously (it
runs no event loop, and a thread would make forking the next worker unsafe): one indexed query per
key and period for the life of the process. When a worker dies, what its requests in flight
reserved is released, as is a verdict that arrives just as its request is cancelled. When the supervisor cannot
be asked (no answer within :data:`TIMEOUT`, a broken socket), ``limits.on_error`` decides: ``open``
serves the request without a check (counted, logged once a minute), ``closed`` answers 503; never a
silent limit per process. The messages are tuples of builtins in :mod:`marshal` form, between
processes of one gateway over a socket pair no other process can reach.
"""

from __future__ import annotations

import asyncio
import logging
import marshal
import socket
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .base import Admissions, Head, LimitState, RatesOf, Subject, Verdict

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("at_gateway.limits")

TIMEOUT = 1.0  # seconds a worker waits for the supervisor's verdict before limits.on_error applies
_MAX_DATAGRAM = 65536

_ADMIT, _SETTLE, _DESCRIBE, _PEEK = "a", "s", "d", "p"


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(the supervisor's end, the worker's end)."""
    hub_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    hub_end.setblocking(False)
    for s in (hub_end, worker_end):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return hub_end, worker_end


class Hub:
    """The supervisor's side: the state, and one socket per worker (with that worker's open tickets)."""

    def __init__(self, state: LimitState) -> None:
        self.state = state
        self.ends: dict[int, tuple[socket.socket, set[int]]] = {}  # worker pid -> (its socket, its tickets)
        self.lost_replies = 0

    def open(self) -> tuple[socket.socket, socket.socket]:
        return channel_pair()

    def attach(self, pid: int, hub_end: socket.socket) -> None:
        self.ends[pid] = (hub_end, set())

    def sockets(self) -> list[tuple[int, socket.socket]]:
        return [(pid, end) for pid, (end, _) in self.ends.items()]

    def detach(self, pid: int) -> None:
        """A worker exited: close its socket and release what its requests in flight reserved."""
        self.serve(pid)  # settlements it sent before dying still count
        got = self.ends.pop(pid, None)
        if got is None:
            return
        end, tickets = got
        end.close()
        self.state.release(sorted(tickets))

    def close(self) -> None:
        for pid in list(self.ends):
            self.detach(pid)
        close = getattr(self.state.baseline, "close", None)
        if close is not None:
            close()

    def close_in_child(self) -> None:
        """In a new worker: the supervisor's ends are not its business."""
        for end, _ in self.ends.values():
            end.close()
        self.ends.clear()

    def serve(self, pid: int) -> None:
        """Answer every datagram waiting on a worker's socket."""
        got = self.ends.get(pid)
        if got is None:
            return
        end, tickets = got
        state = self.state
        while True:
            try:
                data = end.recv(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not data:
                return
            try:
                msg = marshal.loads(data)
                op = msg[0]
                if op == _ADMIT:
                    verdict = state.admit(msg[2], msg[3], msg[4])
                    if verdict[0]:
                        tickets.add(verdict[0])
                    reply: Any = (msg[1], verdict)
                elif op == _SETTLE:
                    tickets.discard(msg[1])
                    state.settle(msg[1], msg[2], msg[3])
                    continue
                elif op == _DESCRIBE:
                    reply = (msg[1], state.describe(msg[2]))
                elif op == _PEEK:  # a dict, so the worker never takes a late head for an admission's verdict
                    reply = (msg[1], {"head": state.peek(msg[2])})
                else:
                    continue
            except Exception as exc:  # a malformed message is a bug: never the supervisor's end
                log.error("limiter: bad message from worker %d: %s: %s", pid, exc.__class__.__name__, exc)
                continue
            try:
                end.send(marshal.dumps(reply))
            except OSError:  # the worker's queue is full or it is gone: it times out and applies on_error
                if reply[1] and isinstance(reply[1], tuple) and reply[1][0]:
                    tickets.discard(reply[1][0])
                    state.settle(reply[1][0], None, None)
                self.lost_replies += 1


class SharedLimiter(Admissions):
    """The worker's side: asks the supervisor over its socket, on the event loop (no thread, no task per
    request: a future per admission, resolved by a reader callback)."""

    def __init__(self, config: Config, sock: socket.socket,
                 rates: RatesOf | None = None) -> None:
        super().__init__(config, rates)
        sock.setblocking(False)
        self.sock = sock
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backlog: deque[bytes] = deque()  # settlements waiting for room in the socket
        self._broken = False

    def _attach(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            loop.add_reader(self.sock.fileno(), self._readable)
        return loop

    def _readable(self) -> None:
        while True:
            try:
                data = self.sock.recv(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._fail_all()
                return
            if not data:
                self._fail_all()
                return
            try:
                rid, result = marshal.loads(data)
            except Exception:
                continue
            fut = self._pending.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result(result)
            elif isinstance(result, tuple) and result and result[0]:
                # The request gave up waiting (timed out, or its client left): release what it took.
                self._send(marshal.dumps((_SETTLE, result[0], None, None)))

    def _fail_all(self) -> None:
        self._broken = True
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
        for fut in self._pending.values():
            if not fut.done():
                fut.set_result(None)
        self._pending.clear()

    def _send(self, data: bytes) -> bool:
        if self._backlog:
            self._backlog.append(data)
            return True
        try:
            self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            self._backlog.append(data)
            if self._loop is not None:
                self._loop.add_writer(self.sock.fileno(), self._writable)
        except OSError:
            return False
        return True

    def _writable(self) -> None:
        backlog = self._backlog
        while backlog:
            try:
                self.sock.send(backlog[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                backlog.clear()
                break
            backlog.popleft()
        if self._loop is not None:
            self._loop.remove_writer(self.sock.fileno())

    async def _call(self, op: str, *args: Any) -> Any:
        if self._broken:
            return None
        loop = self._attach()
        self._next += 1
        rid = self._next
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending[rid] = fut
        if not self._send(marshal.dumps((op, rid, *args))):
            self._pending.pop(rid, None)
            return None
        timer = loop.call_later(TIMEOUT, _expire, fut)
        try:
            return await fut
        except BaseException:
            # Cancelled (the client left) after the verdict had resolved the future but before this task
            # resumed: the reader has consumed the reply, so an admission's ticket is released here.
            if op == _ADMIT and fut.done() and not fut.cancelled():
                got = fut.result()
                if isinstance(got, tuple) and got and got[0]:
                    self._send(marshal.dumps((_SETTLE, got[0], None, None)))
            raise
        finally:
            timer.cancel()
            self._pending.pop(rid, None)

    async def decide(self, subjects: Sequence[Subject], tokens: int, nanousd: int) -> Verdict | None:
        verdict: Verdict | None = await self._call(_ADMIT, tuple(subjects), tokens, nanousd)
        return verdict

    def finished(self, ticket: int, tokens: int | None, nanousd: int | None) -> None:
        if ticket:
            self._send(marshal.dumps((_SETTLE, ticket, tokens, nanousd)))

    async def describe_subject(self, subject: Subject) -> dict[str, Any] | None:
        got: dict[str, Any] | None = await self._call(_DESCRIBE, subject)
        return got

    async def peek_subject(self, subject: Subject) -> Head | None:
        got = await self._call(_PEEK, subject)
        return got["head"] if isinstance(got, dict) else None

    async def aclose(self) -> None:
        if self._backlog:  # settlements not sent yet: one blocking try each (the supervisor is still reading)
            self.sock.setblocking(True)
            self.sock.settimeout(1.0)
            for data in self._backlog:
                try:
                    self.sock.send(data)
                except OSError:
                    break
            self._backlog.clear()
        if self._loop is not None and not self._broken:
            try:
                self._loop.remove_reader(self.sock.fileno())
                self._loop.remove_writer(self.sock.fileno())
            except Exception:
                pass
        self.sock.close()


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(None)
