"""Routes of ordered fallback steps: try each step until one succeeds.

A step fails (and the next is tried) on a connection or TLS error, a timeout,
any non-2xx status, a 2xx that is not a chat completion, or a stream that
errors or ends before its first chunk. Once a stream's first chunk reached
the client there is no going back: a later failure ends the stream with an
SSE error event and no ``[DONE]``.

Keep-alive comments may send a stream's head before any step answered: that
head names no step (it would be a guess), the answering step follows as an
SSE comment, and a failure can then only be an error event carrying the
status it stands for (the request log records the 200 and that ``outcome``).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from operator import methodcaller
from typing import Any, Protocol, TypeVar

import anyio

from .config import Route, Step
from .context import Attempt, RequestContext
from .errors import GatewayError, RateLimited, StepFailed, UpstreamFailed, UpstreamTimedOut
from .http.errors import UpstreamError
from .http.server import ClientGone, Responder, call_later
from .http.sse import DONE_EVENT, KEEPALIVE, encode
from .logs import quote
from .providers.base import Completion, Provider, QuotedFailure, StreamState
from .resilience.backoff import KEY, REQUEST, TARGET, backoff, classify
from .resilience.breaker import Breaker
from .resilience.targets import Busy, NoBreaker, Target

_T = TypeVar("_T")
DEFAULT_BACKOFF = 0.5  # retry_backoff when neither the step nor the provider sets one
DEFAULT_BACKOFF_MAX = 8.0
_RETRIED = frozenset((408, 429))  # and every 5xx, and connection errors: what a retry may cure


class _Opened:
    """A stream that produced its first chunk: the rest is relayed from ``agen``.

    It keeps what its attempt took, the provider's concurrency slot and the key's in-flight count, until it
    ends (:meth:`release`): a stream is in flight until its last chunk, not its first, for ``max_concurrency``
    and ``least-busy`` alike. Its verdict for the key and the circuit waits for the end too
    (:meth:`Router._verdict`): a stream the upstream breaks after its first chunk is as much a failure of the
    target as one it breaks before."""

    __slots__ = ("agen", "first", "state", "step", "target", "key", "slot", "breaker")

    def __init__(self, agen: AsyncGenerator[bytes, None], first: bytes, state: StreamState, step: Step) -> None:
        self.agen = agen
        self.first = first
        self.state = state
        self.step = step
        self.target: Target | None = None  # set by the attempt that opened it
        self.key: int | None = None
        self.slot = False
        self.breaker: Breaker | NoBreaker | None = None  # None once the verdict is given

    def release(self, now: float) -> None:
        """Give back the slot and the in-flight count (and a probe no verdict was given for); once."""
        target, self.target = self.target, None
        if target is None:
            return
        if self.breaker is not None:
            self.breaker.released(now)  # ended without a verdict: the client left, a hedge lost, a shutdown
            self.breaker = None
        if self.slot:
            target.release()
        if self.key is not None and target.counting and target.pool is not None:
            target.pool.finished(self.key)

    async def aclose(self, now: float) -> None:
        """Close a stream that will not be delivered (a hedge's loser, a cancelled request)."""
        try:
            with anyio.CancelScope(shield=True):
                await self.agen.aclose()
        finally:
            self.release(now)


def _sender(body: dict[str, Any], step: Step, call: DoorCall | None) -> Callable[[Provider], Awaitable[Completion]]:
    """What one attempt of a step sends: the chat body prepared for the step, through the door when there is one."""
    prepared = prepare_body(body, step)
    if call is None:
        # methodcaller: adapter.complete(prepared, step) called straight, no wrapping coroutine frame
        return methodcaller("complete", prepared, step)
    return functools.partial(_door_send, call, prepared, step)


def _door_send(call: DoorCall, prepared: dict[str, Any], step: Step, adapter: Provider) -> Awaitable[Completion]:
    return call.complete(adapter, prepared, step)


class DoorCall(Protocol):
    """What routing needs of a front door's request (at_gateway.doors.base.Call; routing imports no door)."""

    def complete(self, adapter: Provider, prepared: dict[str, Any], step: Step) -> Awaitable[Completion]: ...

    def open(self, adapter: Provider, prepared: dict[str, Any], step: Step,
             state: StreamState) -> AsyncIterator[bytes]: ...

    def end(self, agen: Any) -> bytes: ...

    def error(self, agen: Any, error: dict[str, Any]) -> bytes: ...

    #: Whether SSE comments may go out (keep-alives while waiting, the answering step's headers after an early
    #: head); False: none (Google's SDKs read nothing but ``data:`` lines).
    comments: bool
    stream_headers: list[tuple[bytes, bytes]]  # the head of a stream (content type and caching)

log = logging.getLogger("at_gateway.routing")

_MAX_ERROR_TEXT = 300
# Upstream statuses that say the *gateway's* credentials for that provider are wrong, not the client's.
_UPSTREAM_AUTH = (401, 403, 407)
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]


def prepare_body(body: dict[str, Any], step: Step) -> dict[str, Any]:
    """The client's body for one step: model replaced, conflict resolved, the rest untouched."""
    out = dict(body)
    out["model"] = step.model
    if step.conflict_resolution and "tools" in out and "response_format" in out:
        if step.conflict_resolution == "tools":
            del out["response_format"]
        else:
            for k in ("tools", "tool_choice", "parallel_tool_calls"):
                out.pop(k, None)
    return out


def _after(attempts: list[Attempt]) -> str:
    """`` after 3 attempts`` when retries made more attempts than there were steps, else nothing."""
    steps = len({a.step for a in attempts})
    return f" after {len(attempts)} attempts" if len(attempts) > steps else ""


def _lost(ctx: RequestContext, loser: int, winner: int) -> None:
    """A hedge's loser: its attempt still in flight when the other step won says so (it has no error else)."""
    for a in ctx.attempts:
        if a.step == loser and not a.ok and a.error is None:
            a.error = f"cancelled: step {winner} answered first (hedge_after)"


class Router:
    """Runs a route's steps: each step's circuit, key, slot, retries (:mod:`.resilience`), then the next step."""

    def __init__(self, routes: Mapping[str, Route], targets: Mapping[str, Target],
                 redact: Callable[[str], str], stream_idle_timeout: float = 120.0,
                 keepalive_interval: float = 15.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.routes = routes
        self.targets = targets
        # What keys and circuits are told the time with (their rests and open periods); tests drive it. Step
        # deadlines are the event loop's own clock, which timeouts measure.
        self.clock = clock
        self.redact = redact
        self.stream_idle_timeout = stream_idle_timeout
        self.keepalive_interval = keepalive_interval

    # -- bookkeeping ------------------------------------------------------
    def _failed(self, ctx: RequestContext, attempt: Attempt, exc: BaseException, step: Step) -> None:
        if isinstance(exc, StepFailed):
            attempt.status = exc.status
            attempt.timeout = exc.timeout
            attempt.upstream_error = exc.error
            text = exc.message
            if isinstance(exc, QuotedFailure):  # the upstream's bytes, whole: redacted, then shortened
                text = f"{text}: {quote(self.redact, exc.quoted, _MAX_ERROR_TEXT)}"
        elif isinstance(exc, TimeoutError):
            attempt.timeout = True
            text = f"timed out after {step.timeout:g}s"
        elif isinstance(exc, StopAsyncIteration):
            text = "upstream stream ended before its first chunk"
        elif isinstance(exc, UpstreamError):
            text = str(exc) or exc.__class__.__name__
        else:
            # A bug in an adapter (or an upstream answer it did not foresee): the step fails like any other,
            # the traceback goes to the server log only, the client sees the exception's type.
            log.error("provider %s raised while handling step %d", step.provider, attempt.step,
                      exc_info=(type(exc), exc, exc.__traceback__))
            text = f"internal error in the {step.provider} adapter ({exc.__class__.__name__})"
        # Redacted whole, then shortened: upstream texts (and the upstream client's messages about
        # malformed answers) reach this point uncut, so no cut can split a key before redaction.
        attempt.error = quote(self.redact, text, _MAX_ERROR_TEXT)

    def all_failed(self, ctx: RequestContext) -> GatewayError:
        attempts = ctx.attempts
        extra = {"attempts": [a.public() for a in attempts]}
        if attempts and all(a.status == 429 or a.rate_limited for a in attempts):
            # Only rate limits and resting keys: the client may come back when the first key is free again.
            waits = [w for w in self._next_free(ctx) if w is not None]
            wait = max(1, math.ceil(min(waits))) if waits else 1
            return RateLimited(f"every step of route {ctx.route!r} is rate limited upstream; retry in {wait}s: "
                               f"{attempts[-1].error}", code="upstream_rate_limited", extra=extra,
                               headers=[(b"retry-after", str(wait).encode())])
        statuses = {a.status for a in attempts}
        if len(statuses) == 1:
            (status,) = statuses
            if status in _UPSTREAM_AUTH:
                # Not the client's fault: its gateway key was fine, the providers refused ours.
                return UpstreamFailed(f"every step's provider refused the gateway's credentials (HTTP {status}); "
                                      f"check the providers' api_key: {attempts[-1].error}",
                                      code="upstream_auth_failed", extra=extra)
            if status is not None and 400 <= status < 500 and status not in (408, 429):
                # Every step refused the same way: the client's request is the problem.
                up = attempts[-1].upstream_error or {}
                # The upstream's own code and type are passed on, like its message: redacted, shortened.
                code = up.get("code") if isinstance(up.get("code"), str) else "upstream_rejected_request"
                utype = up.get("type") if isinstance(up.get("type"), str) else "invalid_request_error"
                code, utype = quote(self.redact, str(code), 100), quote(self.redact, str(utype), 100)
                return GatewayError(attempts[-1].error or "upstream rejected the request", status=status,
                                    type=utype, code=code, extra=extra)
            if status is not None and 400 <= status < 500:
                return GatewayError(f"{self._tried(ctx)} failed{_after(attempts)}: {attempts[-1].error}",
                                    status=status,
                                    type="rate_limit_error" if status == 429 else "upstream_error",
                                    code="all_steps_failed", extra=extra)
        if attempts and all(a.timeout for a in attempts):
            return UpstreamTimedOut(f"{self._tried(ctx)} timed out{_after(attempts)}",
                                    code="all_steps_timed_out", extra=extra)
        last = attempts[-1].error if attempts else "no steps"
        return UpstreamFailed(f"{self._tried(ctx)} failed{_after(attempts)}; last error: {last}", extra=extra)

    def _upstream_code(self, attempt: Attempt) -> str | None:
        """The failed attempt's own error code from the upstream, redacted and shortened; None without one."""
        up = attempt.upstream_error
        code = up.get("code") if isinstance(up, dict) else None
        return quote(self.redact, code, 100) if isinstance(code, str) and code else None

    @staticmethod
    def _tried(ctx: RequestContext) -> str:
        """``all 2 step(s) of route 'r'``: the steps the attempts ran (retries are attempts of one step)."""
        return f"all {len({a.step for a in ctx.attempts})} step(s) of route {ctx.route!r}"

    def _next_free(self, ctx: RequestContext) -> list[float | None]:
        """For each provider the attempts used: seconds until one of its keys is usable (or what it said)."""
        now = self.clock()
        out: list[float | None] = []
        for name in dict.fromkeys(a.provider for a in ctx.attempts):
            pool = self.targets[name].pool
            if pool is not None:
                out.append(pool.next_free(now))
            else:
                out += [a.cooling for a in ctx.attempts if a.provider == name]
        return out

    # -- one step: circuit, key, slot, retries --------------------------------
    def _choose(self, target: Target, step: Step, attempt: Attempt,
                used: set[int]) -> tuple[Provider, int | None, Breaker | NoBreaker] | float | None:
        """The adapter (and key index) this attempt sends with; None when the step cannot send now (the attempt
        then says why: the circuit is open, or every key rests); or, when every key rests but one is free within
        ``wait_for_key``, how long to wait for it (the caller waits and asks again). Not a coroutine: the
        common call (a closed circuit, one healthy key) costs two method calls and no await."""
        breaker = target.breaker(step.model)
        now = self.clock()
        if not breaker.allow(now):
            left = breaker.open_for(now)
            attempt.error = (f"circuit open (for {left:.1f}s more)" if left > 0
                             else "circuit half-open (its one probe request is in flight)")
            attempt.skipped = True
            return None
        pool = target.pool
        if pool is None:
            return target.adapters[0], None, breaker
        index = pool.pick(now, frozenset(used)) if used else None
        if index is None:
            index = pool.pick(now)
        if index is not None:
            if target.multi:
                attempt.key = index
            return target.adapters[index], index, breaker
        wait = pool.next_free(now)
        if wait is not None and wait <= step.wait_for_key:
            breaker.released(now)
            return wait
        breaker.released(now)
        attempt.skipped = True
        attempt.cooling = wait
        attempt.rate_limited = wait is not None and pool.resting_for_rate_limits(now)
        attempt.error = ("all keys disabled (refused with 401/403 until the next reload)" if wait is None
                         else f"all keys cooling down, next free in {wait:.1f}s")
        return None

    def _settle(self, target: Target, step: Step, index: int | None, breaker: Breaker | NoBreaker, exc: BaseException,
                attempt: Attempt) -> str:
        """What a failure does to the key and the circuit; its scope (backoff.KEY / TARGET / REQUEST)."""
        now = self.clock()
        if isinstance(exc, Busy):
            breaker.released(now)
            return REQUEST  # the provider is busy here: no key or circuit is to blame, and no retry
        status = exc.status if isinstance(exc, StepFailed) else None
        timed_out = isinstance(exc, TimeoutError) or (isinstance(exc, StepFailed) and exc.timeout)
        if isinstance(exc, (StepFailed, UpstreamError, TimeoutError, StopAsyncIteration)):
            scope = classify(status, timeout=timed_out)
        else:
            scope = REQUEST  # an adapter's bug: no retry, and nothing held against the upstream
        pool = target.pool
        if pool is not None and not target.cfg.cooldown.enabled and (scope == TARGET or status == 429):
            pool = None  # cooldown: off: a key never rests for these (a 401/403 still disables it)
        if scope == KEY:
            breaker.released(now)
            if pool is not None and index is not None:
                if status == 429:
                    attempt.cooling = pool.rate_limited(index, now, getattr(exc, "retry_after", None))
                else:
                    pool.refused(index)
            elif status == 429:
                attempt.cooling = getattr(exc, "retry_after", None)
        elif scope == TARGET:
            breaker.failed(now)
            if pool is not None and index is not None:
                pool.failed(index, now)
        else:
            breaker.released(now)
        return scope

    def _retry_wait(self, target: Target, step: Step, exc: BaseException, tried: int, deadline: float,
                    index: int | None, used: set[int]) -> float | None:
        """How long to wait before retry number ``tried + 1``; None: no retry (none left, not retryable, or
        the wait would outlast the step's timeout)."""
        retries = step.retries if step.retries is not None else (target.cfg.retries or 0)
        if tried >= retries:
            return None
        status = exc.status if isinstance(exc, StepFailed) else None
        if isinstance(exc, StepFailed) and not (status is None or status in _RETRIED or status >= 500):
            return None
        if isinstance(exc, (TimeoutError, Busy)) or (isinstance(exc, StepFailed) and exc.timeout):
            return None  # the step's time is spent (its timeout spans its retries) / busy is not retried
        if not isinstance(exc, (StepFailed, UpstreamError, StopAsyncIteration)):
            return None  # an adapter's bug
        base = step.retry_backoff if step.retry_backoff is not None else (
            target.cfg.retry_backoff if target.cfg.retry_backoff is not None else DEFAULT_BACKOFF)
        cap = step.retry_backoff_max if step.retry_backoff_max is not None else (
            target.cfg.retry_backoff_max if target.cfg.retry_backoff_max is not None else DEFAULT_BACKOFF_MAX)
        wait = backoff(tried, base, cap)
        left = deadline - anyio.current_time()
        after = getattr(exc, "retry_after", None)
        pool = target.pool
        if pool is None:  # no keys: the provider's own credentials go again, after what it asked for
            if after is not None:
                wait = after
            return wait if wait < left else None
        now = self.clock()
        # available(), not pick(): asking must not move the round-robin on
        if len(pool) > 1 and pool.available(now, frozenset(used)):
            return wait if wait < left else None  # a fresh key: the backoff alone (its Retry-After was another's)
        if after is not None:
            # The same key (or one this step used) goes again: the latest answer's Retry-After, if the step
            # lasts that long.
            wait = after
        # A retry that would find every key resting would only be skipped (as a step is, when every key rests):
        # the step fails now, and the route falls through, instead of sleeping for nothing.
        free = pool.next_free(now)
        if free is None or free > wait + step.wait_for_key:
            return None
        return wait if wait < left else None

    async def _attempts(self, ctx: RequestContext, index: int, step: Step,
                        send: Callable[[Provider], Awaitable[_T]], stream: bool = False) -> _T | None:
        """Run one step: attempts (retries included, each one in ``ctx.attempts``) until one succeeds (its
        result) or the step gives up (None; the attempts say why). ``stream``: the result is an :class:`_Opened`,
        which keeps the attempt's slot and in-flight count until the stream ends."""
        target = self.targets[step.provider]
        deadline = anyio.current_time() + step.timeout  # the event loop's clock: what fail_after measures
        used: set[int] = set()
        tried = 0
        while True:
            attempt = Attempt(index, step.provider, step.model)
            ctx.attempts.append(attempt)
            ctx.provider, ctx.model = step.provider, step.model
            choice = self._choose(target, step, attempt, used)
            while type(choice) is float:  # wait_for_key: a key frees up soon enough to wait for it
                if anyio.current_time() + choice >= deadline:
                    attempt.skipped = True
                    attempt.cooling = choice
                    attempt.rate_limited = target.pool is not None and target.pool.resting_for_rate_limits(
                        self.clock())
                    attempt.error = f"all keys cooling down, next free in {choice:.1f}s (after the step's timeout)"
                    return None
                await anyio.sleep(choice)
                choice = self._choose(target, step, attempt, used)
            if choice is None:
                return None
            adapter, key, breaker = choice  # type: ignore[misc]  # (no cast: its subscript is built on every call)
            pool = target.pool
            counting = target.counting  # least-busy counts what is in flight; the others need not
            if key is not None:
                used.add(key)
                if counting:
                    pool.started(key)  # type: ignore[union-attr]
            slots = target.slots  # None without max_concurrency: nothing to take or give back
            held = False
            try:
                try:
                    if stream:  # its first chunk is awaited within the deadline, in _first_chunk's own scope
                        if slots is not None:
                            with anyio.fail_at(deadline):
                                await target.acquire()  # Busy after queue_timeout
                            held = True
                        result = await send(adapter, deadline)  # type: ignore[call-arg]
                    else:
                        with anyio.fail_at(deadline):
                            if slots is not None:
                                await target.acquire()  # Busy after queue_timeout
                                held = True
                            result = await send(adapter)
                except BaseException:
                    if held:
                        target.release()
                    if counting and key is not None:
                        pool.finished(key)  # type: ignore[union-attr]
                    raise
                if stream:  # in flight until its last chunk: _Opened.release gives these back
                    opened: _Opened = result  # type: ignore[assignment]
                    opened.target, opened.key, opened.slot, opened.breaker = target, key, held, breaker
                else:
                    if held:
                        target.release()
                    if counting and key is not None:
                        pool.finished(key)  # type: ignore[union-attr]
            except ClientGone:
                breaker.released(self.clock())
                raise
            except Exception as exc:  # StepFailed, UpstreamError, TimeoutError, StopAsyncIteration, Busy, a bug
                self._failed(ctx, attempt, exc, step)
                if isinstance(exc, TimeoutError):
                    attempt.error = f"timed out after {step.timeout:g}s"
                scope = self._settle(target, step, key, breaker, exc, attempt)
                wait = None if scope == REQUEST else self._retry_wait(target, step, exc, tried, deadline, key, used)
                if wait is None:
                    return None
                tried += 1
                if wait > 0:
                    await anyio.sleep(wait)
                continue
            except BaseException:
                breaker.released(self.clock())  # cancelled (a hedge lost, the server stops): no verdict
                raise
            if not stream:  # a stream's verdict waits for its end (_verdict)
                now = self.clock()
                breaker.succeeded(now)
                if pool is not None and key is not None:
                    pool.succeeded(key, now)
            attempt.ok = True
            attempt.status = 200
            return result

    # -- non-streaming -----------------------------------------------------
    async def complete(self, ctx: RequestContext, route: Route, body: dict[str, Any],
                       call: DoorCall | None = None) -> Completion:
        """The first step's answer that succeeds. ``call``: a front door's request (its steps send and answer
        in the door's format, see :mod:`at_gateway.doors`); None: chat completions."""
        steps = route.steps
        i = 0
        while i < len(steps):
            step = steps[i]
            if step.hedge_after is not None and i + 1 < len(steps):
                result, i = await self._hedged(ctx, i, steps, body, call), i + 2
            else:
                result = await self._attempts(ctx, i, step, _sender(body, step, call))
                i += 1
            if result is not None:
                ctx.usage = result.usage
                return result
        raise self.all_failed(ctx)

    async def _hedged(self, ctx: RequestContext, i: int, steps: tuple[Step, ...], body: dict[str, Any],
                      call: DoorCall | None = None) -> Completion | None:
        """Step ``i``, and step ``i + 1`` too once ``i`` has not answered within its ``hedge_after``: the first
        to succeed wins, the other is cancelled (its connection closed, never pooled)."""
        first, second = steps[i], steps[i + 1]
        won: list[tuple[int, Completion]] = []
        done = [anyio.Event(), anyio.Event()]

        async def run(n: int, step: Step, scope: anyio.CancelScope) -> None:
            try:
                with scope:
                    result = await self._attempts(ctx, i + n, step, _sender(body, step, call))
                    if result is not None and not won:
                        won.append((n, result))
                        tg.cancel_scope.cancel()
            finally:
                done[n].set()

        async with anyio.create_task_group() as tg:
            scopes = [anyio.CancelScope(), anyio.CancelScope()]
            tg.start_soon(run, 0, first, scopes[0])
            with anyio.move_on_after(first.hedge_after or 0):
                await done[0].wait()  # failed early: the second starts now, as a plain fall-through would
            if not won:
                tg.start_soon(run, 1, second, scopes[1])
        if won:
            n, result = won[0]
            winner = (first, second)[n]
            ctx.provider, ctx.model = winner.provider, winner.model
            _lost(ctx, i + 1 - n, i + n)
            return result
        return None

    # -- streaming ----------------------------------------------------------
    async def _open_stream(self, body: dict[str, Any], step: Step, responder: Responder, ctx: RequestContext,
                           include_usage: bool, keepalive: bool, call: DoorCall | None, adapter: Provider,
                           deadline: float) -> _Opened:
        """One attempt at a stream: its generator and first chunk by ``deadline`` (a failure before it closes the
        generator)."""
        state = StreamState(include_usage=include_usage)
        agen: AsyncGenerator[bytes, None] = (adapter.stream(body, step, state) if call is None  # type: ignore[assignment]
                                             else call.open(adapter, body, step, state))
        try:
            first = await self._first_chunk(agen, step, responder, ctx, keepalive and (call is None or call.comments),
                                            deadline, _SSE_HEADERS if call is None else call.stream_headers)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await agen.aclose()
            raise
        return _Opened(agen, first, state, step)

    async def _hedged_stream(self, ctx: RequestContext, i: int, steps: tuple[Step, ...],
                             opener: Callable[[Step, bool], Callable[[Provider], Awaitable[_Opened]]]
                             ) -> _Opened | None:
        """As :meth:`_hedged`, up to the first chunk: the winner's stream goes on, the loser's is closed."""
        first, second = steps[i], steps[i + 1]
        won: list[tuple[int, _Opened]] = []
        done = [anyio.Event(), anyio.Event()]

        async def run(n: int, step: Step) -> None:
            try:
                opened = await self._attempts(ctx, i + n, step, opener(step, n == 0), stream=True)
                if opened is not None:
                    if won:  # both got a first chunk in the same instant: the later one is closed
                        await opened.aclose(self.clock())
                        return
                    won.append((n, opened))
                    tg.cancel_scope.cancel()
            finally:
                done[n].set()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(run, 0, first)
                with anyio.move_on_after(first.hedge_after or 0):
                    await done[0].wait()  # failed early: the second starts now, as a plain fall-through would
                if not won:
                    tg.start_soon(run, 1, second)
        except BaseException:
            for _, opened in won:  # the request was cancelled with a winner not delivered yet
                await opened.aclose(self.clock())
            raise
        if not won:
            return None
        n, opened = won[0]
        _lost(ctx, i + 1 - n, i + n)
        return opened

    async def stream(self, ctx: RequestContext, route: Route, body: dict[str, Any], responder: Responder,
                     call: DoorCall | None = None) -> None:
        """The first step's stream that opens, relayed to the client. ``call``: a front door's request (its
        events, end and error event are the door's); None: chat completions."""
        opts = body.get("stream_options")
        include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))

        def opener(step: Step, keepalive: bool = True) -> Callable[[Provider], Awaitable[_Opened]]:
            return functools.partial(self._open_stream, prepare_body(body, step), step, responder, ctx,
                                     include_usage, keepalive, call)

        steps = route.steps
        i = 0
        while i < len(steps):
            step = steps[i]
            opened: _Opened | None
            if step.hedge_after is not None and i + 1 < len(steps):
                opened, i = await self._hedged_stream(ctx, i, steps, opener), i + 2
            else:
                opened, i = await self._attempts(ctx, i, step, opener(step), stream=True), i + 1
            if opened is None:
                continue
            await self._deliver(ctx, opened, responder, call)
            return
        err_obj = self.all_failed(ctx)
        if not responder.started:
            raise err_obj
        # Keep-alives sent a 200 head: the failure can only be an error event now. It carries the status
        # that would have been answered; the log records the 200 the client got and that outcome.
        ctx.status = 200
        ctx.outcome = err_obj.status
        ctx.error = err_obj.message
        event = err_obj.to_dict()
        event["error"]["status"] = err_obj.status
        if ctx.attempts and "upstream_code" not in event["error"]:
            upstream_code = self._upstream_code(ctx.attempts[-1])
            if upstream_code is not None:
                event["error"]["upstream_code"] = upstream_code
        await responder.end(encode(event) if call is None else call.error(None, event))

    async def _deliver(self, ctx: RequestContext, opened: _Opened, responder: Responder,
                       call: DoorCall | None = None) -> None:
        """The answering step's stream to the client, from its first chunk to its end (or an error event)."""
        agen, first, state, step = opened.agen, opened.first, opened.state, opened.step
        ctx.provider, ctx.model = step.provider, step.model
        attempt = ctx.attempts[-1]
        if not (attempt.ok and attempt.provider == step.provider):  # a hedge: the other step's came after it
            attempt = next(a for a in reversed(ctx.attempts) if a.ok and a.provider == step.provider)
        try:
            if not responder.started:
                head = _SSE_HEADERS if call is None else call.stream_headers
                await responder.start(200, [*head, *ctx.gateway_headers()])
            else:
                # A keep-alive sent the head before this step answered, without the step's headers:
                # they come now, as a comment, before the first chunk.
                first = ctx.step_comment() + first
            ctx.status = 200
            ctx.first_byte = time.perf_counter()
            await responder.write(first)
            try:
                await self._relay(agen, responder)
            except ClientGone:
                raise
            except Exception as exc:  # after the first chunk: a visible error event, never a clean end, no retry
                self._failed(ctx, attempt, exc, step)
                self._verdict(opened, attempt, exc)
                if isinstance(exc, TimeoutError):
                    attempt.error = f"no chunk for {self.stream_idle_timeout:g}s (stream_idle_timeout)"
                # The client got a 200 and gets this event: the log says so, and what would have been
                # answered (502, or 504 for stream_idle_timeout) is the outcome, in the log and the event.
                ctx.outcome = 504 if isinstance(exc, TimeoutError) else 502  # as a whole answer would be
                ctx.usage = state.usage
                ctx.error = f"upstream stream interrupted: {attempt.error}"
                err = {"error": {"message": ctx.error, "type": "upstream_error", "code": "stream_interrupted",
                                 "status": ctx.outcome}}
                upstream_code = self._upstream_code(attempt)
                if upstream_code is not None:  # what the upstream called it (rate_limit_exceeded, ...): doors map it
                    err["error"]["upstream_code"] = upstream_code
                # no [DONE] (nor the door's end): a broken stream never looks finished
                await responder.end(encode(err) if call is None else call.error(agen, err))
                return
            self._verdict(opened, attempt, None)
            ctx.usage = state.usage
            await responder.end(DONE_EVENT if call is None else call.end(agen))
        except BaseException:
            # The client left (ClientGone, or the server cancelled us): what the upstream reported so far
            # is what the limiter and the store charge; without it the limiter charges the worst case.
            if ctx.usage is None:
                ctx.usage = state.usage
            raise
        finally:
            try:
                await agen.aclose()
            finally:
                opened.release(self.clock())

    def _verdict(self, opened: _Opened, attempt: Attempt, exc: BaseException | None) -> None:
        """A delivered stream's end settles its key and circuit: its clean end is a success, a break after the
        first chunk a failure as the same break before it would be (:meth:`_settle`; it is not retried)."""
        target, breaker = opened.target, opened.breaker
        if target is None or breaker is None:
            return
        opened.breaker = None
        if exc is not None:
            self._settle(target, opened.step, opened.key, breaker, exc, attempt)
            return
        now = self.clock()
        breaker.succeeded(now)
        if opened.key is not None and target.pool is not None:
            target.pool.succeeded(opened.key, now)

    async def _relay(self, agen: AsyncIterator[bytes], responder: Responder) -> None:
        idle = self.stream_idle_timeout
        while True:
            with anyio.fail_after(idle):
                try:
                    chunk = await agen.__anext__()
                except StopAsyncIteration:
                    return
            await responder.write(chunk)

    async def _first_chunk(self, agen: AsyncIterator[bytes], step: Step, responder: Responder,
                           ctx: RequestContext, keepalive_on: bool = True, deadline: float | None = None,
                           head: list[tuple[bytes, bytes]] = _SSE_HEADERS) -> bytes:
        """Wait for the first chunk by ``deadline`` (the step's, which its retries share; default: the step's
        timeout from now), sending SSE comments meanwhile (not for a hedge: the step it races sends them)."""
        interval = self.keepalive_interval
        if deadline is None:
            deadline = anyio.current_time() + step.timeout
        if interval <= 0 or interval >= step.timeout or not keepalive_on:
            with anyio.fail_at(deadline):
                return await agen.__anext__()
        result: list[bytes] = []
        error: list[BaseException] = []

        async def keepalive(delay: float) -> None:
            try:
                while True:
                    await anyio.sleep(delay)
                    delay = interval
                    if not responder.started:
                        # Which step answers is not known yet: the head names none (see step_comment).
                        await responder.start(200, [*head, *ctx.early_headers()])
                    await responder.write(KEEPALIVE)
            except ClientGone:
                tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            # The keep-alive task starts when the first comment is due: most first chunks come much
            # sooner, and a loop timer costs far less than a task per stream.
            timer = call_later(interval, tg.start_soon, keepalive, 0.0)
            if timer is None:
                tg.start_soon(keepalive, interval)
            try:
                with anyio.fail_at(deadline):
                    result.append(await agen.__anext__())
            except Exception as exc:  # re-raised outside the task group, unwrapped
                error.append(exc)
            finally:
                if timer is not None:
                    timer.cancel()
            tg.cancel_scope.cancel()
        if error:
            raise error[0]
        if not result:
            raise ClientGone("client went away while waiting for the first chunk")
        return result[0]
