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

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any, cast

import anyio

from .config import Route, Step
from .context import Attempt, RequestContext
from .errors import GatewayError, StepFailed, UpstreamFailed, UpstreamTimedOut
from .http.errors import UpstreamError
from .http.server import ClientGone, Responder, call_later
from .http.sse import DONE_EVENT, KEEPALIVE, encode
from .logs import quote
from .providers.base import Completion, Provider, QuotedFailure, StreamState

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


class Router:
    def __init__(self, routes: Mapping[str, Route], providers: Mapping[str, Provider],
                 redact: Callable[[str], str], stream_idle_timeout: float = 120.0,
                 keepalive_interval: float = 15.0) -> None:
        self.routes = routes
        self.providers = providers
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
                return GatewayError(f"all {len(attempts)} step(s) of route {ctx.route!r} failed: "
                                    f"{attempts[-1].error}", status=status,
                                    type="rate_limit_error" if status == 429 else "upstream_error",
                                    code="all_steps_failed", extra=extra)
        if attempts and all(a.timeout for a in attempts):
            return UpstreamTimedOut(f"all {len(attempts)} step(s) of route {ctx.route!r} timed out",
                                    code="all_steps_timed_out", extra=extra)
        last = attempts[-1].error if attempts else "no steps"
        return UpstreamFailed(f"all {len(attempts)} step(s) of route {ctx.route!r} failed; last error: {last}",
                              extra=extra)

    # -- non-streaming -----------------------------------------------------
    async def complete(self, ctx: RequestContext, route: Route, body: dict[str, Any]) -> Completion:
        for i, step in enumerate(route.steps):
            provider = self.providers[step.provider]
            attempt = Attempt(i, step.provider, step.model)
            ctx.attempts.append(attempt)
            ctx.provider, ctx.model = step.provider, step.model
            try:
                with anyio.fail_after(step.timeout):
                    result = await provider.complete(prepare_body(body, step), step)
            except ClientGone:
                raise
            except Exception as exc:  # StepFailed, UpstreamError, TimeoutError, or an adapter's bug
                self._failed(ctx, attempt, exc, step)
                continue
            attempt.ok = True
            attempt.status = 200
            ctx.usage = result.usage
            return result
        raise self.all_failed(ctx)

    # -- streaming ----------------------------------------------------------
    async def stream(self, ctx: RequestContext, route: Route, body: dict[str, Any], responder: Responder) -> None:
        opts = body.get("stream_options")
        include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
        for i, step in enumerate(route.steps):
            provider = self.providers[step.provider]
            attempt = Attempt(i, step.provider, step.model)
            ctx.attempts.append(attempt)
            ctx.provider, ctx.model = step.provider, step.model  # as in complete(): a 502 names the last step
            state = StreamState(include_usage=include_usage)
            agen = cast(AsyncGenerator[bytes, None], provider.stream(prepare_body(body, step), step, state))
            try:
                try:
                    first = await self._first_chunk(agen, step, responder, ctx)
                except ClientGone:
                    raise
                except Exception as exc:  # StepFailed, UpstreamError, TimeoutError, StopAsyncIteration, a bug
                    self._failed(ctx, attempt, exc, step)
                    continue
                attempt.ok = True
                attempt.status = 200
                if not responder.started:
                    await responder.start(200, [*_SSE_HEADERS, *ctx.gateway_headers()])
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
                except Exception as exc:  # after the first chunk: a visible error event, never a clean end
                    self._failed(ctx, attempt, exc, step)
                    if isinstance(exc, TimeoutError):
                        attempt.error = f"no chunk for {self.stream_idle_timeout:g}s (stream_idle_timeout)"
                    # The client got a 200 and gets this event: the log says so, and what would have been
                    # answered (502, or 504 for stream_idle_timeout) is the outcome, in the log and the event.
                    ctx.outcome = 504 if isinstance(exc, TimeoutError) else 502  # as a whole answer would be
                    ctx.usage = state.usage
                    ctx.error = f"upstream stream interrupted: {attempt.error}"
                    err = {"error": {"message": ctx.error, "type": "upstream_error", "code": "stream_interrupted",
                                     "status": ctx.outcome}}
                    await responder.end(encode(err))  # no [DONE]: a broken stream never looks finished
                    return
                ctx.usage = state.usage
                await responder.end(DONE_EVENT)
                return
            except BaseException:
                # The client left (ClientGone, or the server cancelled us): what the upstream reported so far
                # is what the limiter and the store charge; without it the limiter charges the worst case.
                if ctx.usage is None:
                    ctx.usage = state.usage
                raise
            finally:
                await agen.aclose()
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
        await responder.end(encode(event))

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
                           ctx: RequestContext) -> bytes:
        """Wait for the first chunk within the step's timeout, sending SSE comments meanwhile."""
        interval = self.keepalive_interval
        if interval <= 0 or interval >= step.timeout:
            with anyio.fail_after(step.timeout):
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
                        await responder.start(200, [*_SSE_HEADERS, *ctx.early_headers()])
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
                with anyio.fail_after(step.timeout):
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
