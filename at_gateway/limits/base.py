"""The limiter's pieces: the state that decides (:class:`LimitState`), and what a worker does around it.

The state is plain data driven by an injected clock, so it can live in the worker (``workers: 1``,
:mod:`.local`) or in the one process all workers ask (:mod:`.shared`), and later behind Redis,
without the request path changing. What travels between the two is small tuples of builtins:

- a *subject* ``(sid, rpm, rph, rpd, tpm, tpd, budget_nanousd, budget_period)``: ``key:<id>`` for a
  client key (its own limits, else the config's ``limits:`` defaults), ``route:<name>`` for a route's
  global cap over every caller;
- an admission ``(subjects, tokens, nanousd)``: the request's worst case, reserved when admitted;
- a *verdict* ``(ticket, head, code, message, retry_after)``: ticket > 0 when admitted (settled with
  it at the end), else the refusal; ``head`` is what the x-ratelimit-* headers say; a refusal has a sixth
  item, the limit that refused (``rpm``, ``rph``, ``rpd``, ``tpm``, ``tpd``, ``budget``; ``route_`` before it
  for a route's cap), which the metrics count as ``ctx.limited``;
- a *settlement* ``(ticket, tokens, nanousd)``: what the request used (tokens = prompt + completion,
  as the store counts them), ``None`` for nothing (released), or :data:`RESERVED` for its worst case.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from ..errors import GatewayError, RateLimited, ServiceUnavailable
from .quota import Baseline, Quota, no_baseline, period_bounds, timezone
from .window import RequestWindow, TokenWindow

if TYPE_CHECKING:
    from ..config import Config, Limits, Route
    from ..context import RequestContext

log = logging.getLogger("at_gateway.limits")

Subject = tuple  # (sid, rpm, rph, rpd, tpm, tpd, budget_nanousd, budget_period)
Head = tuple  # (req_limit, req_remaining, req_reset_s, tok_limit, tok_remaining, tok_reset_s)
Verdict = tuple  # (ticket, head, code, message, retry_after[, limit]): the limit on refusals
RatesOf = Callable[[str, str, str], "Sequence[int] | None"]  # store.prices.Pricing.rates

_SPANS = ((1, 60.0, "requests per minute"), (2, 3600.0, "requests per hour"), (3, 86400.0, "requests per day"))
_SPAN_LIMITS = {1: "rpm", 2: "rph", 3: "rpd"}  # a refusal's limit, as the metrics name it
_NO_HEAD: Head = (None, None, None, None, None, None)

#: A settlement's figure that means "what was reserved": the request reached an upstream, which
#: generated (and bills) tokens nobody told us the number of.
RESERVED = -1


def duration(seconds: float) -> str:
    """OpenAI's x-ratelimit-reset-* form: ``20ms``, ``1s``, ``6m0s``, ``1h2m3s`` (rounded up)."""
    ms = math.ceil(seconds * 1000)
    if ms < 1000:  # 0.9996 s is 1000 ms when rounded up: that is "1s"
        return f"{max(0, ms)}ms"
    s = math.ceil(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


def usd(nanousd: int) -> str:
    """Nano-dollars as dollars: cents when round, else as many decimals as needed (at most 9)."""
    value = Decimal(nanousd) / Decimal(10 ** 9)
    text = f"{value:.9f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"${whole}.{frac.ljust(2, '0')}"


class LimitState:
    """Every window, quota and reservation; one instance decides for all the workers it serves.

    Not thread-safe and never awaiting: each call is one atomic step of the process that owns it.
    """

    def __init__(self, tz: str = "UTC", *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, baseline: Baseline = no_baseline) -> None:
        self.tz = timezone(tz)
        self.tz_name = tz or "UTC"
        self.clock = clock
        self.wall = wall
        self.baseline = baseline
        self.requests: dict[tuple[str, float], RequestWindow] = {}
        self.tokens: dict[str, TokenWindow] = {}
        # subject -> its quotas by name ("tpd", "$day", "$week", "$month"): only those its limits have now
        self.quotas: dict[str, dict[str, Quota]] = {}
        # ticket -> what it reserved: [(TokenWindow | Quota, amount)]
        self.tickets: dict[int, list[tuple[Any, int]]] = {}
        self._next = 0

    # -- parts ---------------------------------------------------------------
    def _rwin(self, sid: str, span: float) -> RequestWindow:
        w = self.requests.get((sid, span))
        if w is None:
            w = self.requests[(sid, span)] = RequestWindow(span)
        return w

    def _twin(self, sid: str) -> TokenWindow:
        w = self.tokens.get(sid)
        if w is None:
            w = self.tokens[sid] = TokenWindow(60.0)
        return w

    def _quotas(self, sub: Subject, wall: float) -> tuple[Quota | None, Quota | None]:
        """The subject's token quota and budget, each counted since it first applied: a quota that is
        new (since start, or again after a spell without it) starts from what the store says the
        period used (``baseline``, which may raise :class:`~.quota.NeedBaseline`), and one the subject's
        limits no longer have is dropped, since the requests admitted without it are not in it."""
        sid, tpd, budget = sub[0], sub[5], sub[6]
        qs = self.quotas.get(sid)
        if qs is None:
            if tpd is None and budget is None:
                return None, None
            qs = self.quotas[sid] = {}
        tq = bq = None
        if tpd is not None:
            tq = qs.get("tpd")
            if tq is None:
                tq = qs["tpd"] = self._new_quota(sid, "day", False, wall)
            else:
                tq.roll(wall, self.tz)
        if budget is not None:
            name = "$" + (sub[7] or "month")
            bq = qs.get(name)
            if bq is None:
                bq = qs[name] = self._new_quota(sid, sub[7] or "month", True, wall)
            else:
                bq.roll(wall, self.tz)
        if len(qs) > (tq is not None) + (bq is not None):  # a limit was removed or its period changed
            for name in [n for n, q in qs.items() if q is not tq and q is not bq]:
                del qs[name]
        return tq, bq

    def _new_quota(self, sid: str, period: str, money: bool, wall: float) -> Quota:
        q = Quota(sid, period, money)
        q.first_day, q.ends = period_bounds(period, wall, self.tz)
        tokens, cost = self.baseline(sid, q.first_day)
        q.used = cost if money else tokens
        return q

    # -- the decisions -------------------------------------------------------
    def admit(self, subjects: Sequence[Subject], tokens: int, nanousd: int, dry: bool = False) -> Verdict:
        """Check every limit of every subject and, only when all pass, count the request and take its
        reservations: one atomic step, so concurrent requests cannot all slip through.

        ``dry``: a peek, for the headers of an answer given before admission; nothing is taken."""
        now = self.clock()
        wall = self.wall()
        take_req: list[RequestWindow] = []
        take: list[tuple[Any, int]] = []
        head_req: tuple[int, int, float] | None = None  # (limit, remaining after this one, reset)
        head_tok: tuple[int, int, float] | None = None
        refusal: Verdict | None = None
        for sub in subjects:
            sid = sub[0]
            # Quotas first: when one ran out, that is what the caller must hear about.
            if sub[5] is None and sub[6] is None and sid not in self.quotas:
                continue  # no quota (the common case: no call)
            tq, bq = self._quotas(sub, wall)
            if tq is not None:
                tpd = sub[5]
                q = tq
                left = q.left(tpd)
                if left <= 0 and refusal is None:
                    refusal = (0, None, "insufficient_quota",
                               f"Quota exceeded for {_who(sid)}: tokens per day: {tpd} ({max(0, tpd - q.used)} left, "
                               f"{q.reserved} reserved by requests in flight; resets in "
                               f"{duration(q.ends - wall)}, at the start of the next day in {self.tz_name}).",
                               q.ends - wall, _limit(sid, "tpd"))
                take.append((q, tokens))
                if sub[4] is None and (head_tok is None or left - tokens < head_tok[1]):
                    head_tok = (tpd, left - tokens, q.ends - wall)
            if bq is not None:
                budget = sub[6]
                period = sub[7] or "month"
                q = bq
                if q.left(budget) <= 0 and refusal is None:
                    refusal = (0, None, "insufficient_quota",
                               f"Budget exceeded for {_who(sid)}: budget per {period}: {usd(budget)} (spent "
                               f"{usd(q.used)}, {usd(max(0, budget - q.used - q.reserved))} left after the "
                               f"requests in flight; resets in {duration(q.ends - wall)}, at the start of the "
                               f"next {period} in {self.tz_name}).", q.ends - wall, _limit(sid, "budget"))
                take.append((q, nanousd))
        for sub in subjects:
            sid = sub[0]
            for index, span, name in _SPANS:
                limit = sub[index]
                if limit is None:
                    continue
                w = self._rwin(sid, span)
                n = w.count(now)
                wait = w.frees_in(now, limit) if n >= limit else 0.0  # once: the refusal and the head say it
                if n >= limit and refusal is None:
                    refusal = (0, None, "rate_limit_exceeded",
                               f"Rate limit reached for {_who(sid)}: {name}: {limit}. Try again in "
                               f"{duration(wait)}.", wait, _limit(sid, _SPAN_LIMITS[index]))
                take_req.append(w)
                remaining = limit - n - 1
                if head_req is None or remaining < head_req[1]:
                    # reset: when the next slot frees (the oldest logged admission leaves the window)
                    if n < limit:
                        oldest = w.oldest()
                        wait = oldest + span - now if oldest is not None else 0.0
                    head_req = (limit, remaining, max(0.0, wait))
            tpm = sub[4]
            if tpm is not None:
                tw = self._twin(sid)
                used = tw.used(now)
                wait = tw.frees_in(now, tpm) if used >= tpm else 0.0
                if used >= tpm and refusal is None:
                    refusal = (0, None, "rate_limit_exceeded",
                               f"Rate limit reached for {_who(sid)}: tokens per minute: {tpm} ({used} used or "
                               f"reserved by requests in flight). Try again in {duration(wait)}.", wait,
                               _limit(sid, "tpm"))
                take.append((tw, tokens))
                left = tpm - used - tokens
                if head_tok is None or left < head_tok[1]:
                    if used < tpm:
                        oldest = tw.oldest()
                        wait = max(0.0, oldest + 60.0 - now) if oldest is not None else 0.0
                    head_tok = (tpm, left, wait)
        if refusal is not None:
            head = _head(head_req, head_tok, tokens)
            return (0, head, refusal[2], refusal[3], refusal[4], refusal[5])
        if dry:
            return (0, _head(head_req, head_tok, tokens), None, None, None)
        for w in take_req:
            w.add(now)
        for part, amount in take:
            part.reserved += amount
        self._next += 1
        ticket = self._next
        self.tickets[ticket] = take
        return (ticket, _head(head_req, head_tok), None, None, None)

    def settle(self, ticket: int, tokens: int | None, nanousd: int | None) -> None:
        """Replace the ticket's reservations by what the request used (None: nothing, released;
        :data:`RESERVED`: its worst case, what it reserved)."""
        taken = self.tickets.pop(ticket, None)
        if taken is None:
            return
        now = self.clock()
        wall = self.wall()
        for part, amount in taken:
            part.reserved -= amount
            if isinstance(part, TokenWindow):
                used = amount if tokens == RESERVED else tokens
                if used:
                    part.add(now, used)
            else:
                part.roll(wall, self.tz)  # a request that ran over midnight counts in the new day
                used = nanousd if part.money else tokens
                if used == RESERVED:
                    used = amount
                if used:
                    part.used += used

    def peek(self, subject: Subject) -> Head:
        """The x-ratelimit-* figures of a subject as they stand, taking nothing."""
        return self.admit((subject,), 0, 0, dry=True)[1]

    def release(self, tickets: Sequence[int]) -> None:
        """A worker died: what its requests in flight reserved is given back."""
        for t in tickets:
            self.settle(t, None, None)

    def describe(self, subject: Subject) -> dict[str, Any]:
        """A subject's limits, what it used and what is left (``GET /v1/key``)."""
        now = self.clock()
        wall = self.wall()
        sid = subject[0]
        out: dict[str, Any] = {}
        for index, span, name in _SPANS:
            limit = subject[index]
            if limit is not None:
                w = self._rwin(sid, span)
                n = w.count(now)
                out[name.replace(" ", "_")] = {"limit": limit, "used": n, "remaining": max(0, limit - n),
                                               "resets_in": round(w.resets_in(now), 3)}
        if subject[4] is not None:
            tw = self._twin(sid)
            used = tw.used(now)
            out["tokens_per_minute"] = {"limit": subject[4], "used": tw.total, "reserved": tw.reserved,
                                        "remaining": max(0, subject[4] - used),
                                        "resets_in": round(tw.resets_in(now), 3)}
        tq, bq = self._quotas(subject, wall)
        if tq is not None:
            out["tokens_per_day"] = tq.describe(subject[5], wall)
        if bq is not None:
            d = bq.describe(subject[6], wall)
            out["budget"] = {**{k: v for k, v in d.items() if k not in ("limit", "used", "reserved", "remaining")},
                             "limit_usd": usd(d["limit"])[1:], "spent_usd": usd(d["used"])[1:],
                             "reserved_usd": usd(d["reserved"])[1:], "remaining_usd": usd(d["remaining"])[1:]}
        return out


def _limit(sid: str, name: str) -> str:
    """A refusal's limit as the metrics name it: ``rpm`` for a key's, ``route_rpm`` for a route's cap."""
    return "route_" + name if sid.startswith("route:") else name


def _who(sid: str) -> str:
    kind, _, name = sid.partition(":")
    return f"key {name}" if kind == "key" else f"route {name!r}"


def _head(req: tuple[int, int, float] | None, tok: tuple[int, int, float] | None, refused: int = -1) -> Head:
    """The headers' figures: what remains after this request, or (``refused``: its token estimate) as it
    was, since a refused request takes nothing."""
    back_r, back_t = (1, refused) if refused >= 0 else (0, 0)
    r = (req[0], max(0, req[1] + back_r), req[2]) if req else (None, None, None)
    t = (tok[0], max(0, tok[1] + back_t), tok[2]) if tok else (None, None, None)
    return (*r, *t)


def render_head(head: Head | None) -> list[tuple[bytes, bytes]]:
    """OpenAI's x-ratelimit-* headers for a verdict's head."""
    if not head:
        return []
    out: list[tuple[bytes, bytes]] = []
    if head[0] is not None:
        out += [(b"x-ratelimit-limit-requests", b"%d" % head[0]),
                (b"x-ratelimit-remaining-requests", b"%d" % head[1]),
                (b"x-ratelimit-reset-requests", duration(head[2]).encode())]
    if head[3] is not None:
        out += [(b"x-ratelimit-limit-tokens", b"%d" % head[3]),
                (b"x-ratelimit-remaining-tokens", b"%d" % head[4]),
                (b"x-ratelimit-reset-tokens", duration(head[5]).encode())]
    return out


def refusal_error(verdict: Verdict) -> GatewayError:
    retry = max(1, math.ceil(verdict[4] or 0))
    headers = [(b"retry-after", b"%d" % retry)]
    if verdict[2] == "insufficient_quota":
        return RateLimited(verdict[3], code="insufficient_quota", type="insufficient_quota", headers=headers)
    return RateLimited(verdict[3], headers=headers)


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """A cheap upper-leaning guess of the prompt's tokens: about 4 characters a token, plus a few per message."""
    chars = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if not isinstance(m, dict):
                continue
            c = m.get("content")
            if isinstance(c, str):
                chars += len(c)
            elif isinstance(c, list):
                for part in c:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        chars += len(part["text"])
            chars += 16
    tools = body.get("tools")
    if tools:
        chars += len(repr(tools))
    for name in ("input", "prompt"):  # embeddings and legacy completions carry their text here
        chars += _text_chars(body.get(name))
    return chars // 4 + 1


def _text_chars(value: Any) -> int:
    """Characters of an ``input``/``prompt``: a string, strings, or token ids (about 4 characters each)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        total = 0
        for v in value:
            if isinstance(v, str):
                total += len(v)
            elif isinstance(v, int):
                total += 4
            elif isinstance(v, list):
                total += 4 * len(v)
        return total
    return 0


def completion_cap(body: dict[str, Any]) -> int:
    """The request's own cap on its answer (0: none given)."""
    for name in ("max_completion_tokens", "max_tokens"):
        v = body.get(name)
        if type(v) is int and v > 0:
            return v
    return 0


class Admissions:
    """The worker's side of any limiter: which limits apply to a request, what it may cost, the
    headers and errors of the verdict. Subclasses say where the :class:`LimitState` is."""

    def __init__(self, config: Config, rates: RatesOf | None = None) -> None:
        self.defaults: Limits = config.limits.defaults
        self.on_error = config.limits.on_error
        if rates is None:
            from ..store.prices import Pricing

            rates = Pricing(config).rates
        # (route, provider, model) -> femto-dollars per (input, output, ...) token; None: unpriced
        self.rates = rates
        self._key_subjects: dict[str, tuple[Any, Subject | None]] = {}
        self._route_subjects: dict[str, tuple[Any, Subject | None]] = {}
        self._step_rates: dict[str, tuple[Any, list[tuple[int, int]]]] = {}
        self.errors = 0  # admissions the limiter could not decide (on_error)
        self._errors_logged = 0
        self._error_logged_at = float("-inf")

    # -- which limits ------------------------------------------------------------
    def key_subject(self, key: Any) -> Subject | None:
        cached = self._key_subjects.get(key.id)
        if cached is not None and cached[0] is key:
            return cached[1]
        own, d = key.limits, self.defaults
        values = [getattr(own, n) if getattr(own, n) is not None else getattr(d, n)
                  for n in ("rpm", "rph", "rpd", "tpm", "tpd")]
        budget = key.budget_nanousd
        sub: Subject | None = None
        if budget is not None or any(v is not None for v in values):
            sub = (f"key:{key.id}", *values, budget, key.budget_period or "month" if budget is not None else None)
        self._key_subjects[key.id] = (key, sub)
        return sub

    def route_subject(self, route: Route) -> Subject | None:
        cached = self._route_subjects.get(route.name)
        if cached is not None and cached[0] is route:
            return cached[1]
        lim = route.limits
        sub: Subject | None = None
        if lim is not None and lim.any():
            sub = (f"route:{route.name}", lim.rpm, lim.rph, lim.rpd, lim.tpm, lim.tpd, None, None)
        self._route_subjects[route.name] = (route, sub)
        return sub

    def worst_cost(self, route: Route, prompt: int, cap: int) -> int:
        """The priciest step's price of the request's worst case, in nano-dollars (unpriced steps: 0):
        a fallback may land on any step."""
        cached = self._step_rates.get(route.name)
        if cached is None or cached[0] is not route:
            rates = []
            unpriced = []
            for step in route.steps:
                r = self.rates(route.name, step.provider, step.model)
                if r is not None:
                    rates.append((r[0], r[1]))
                else:
                    unpriced.append(f"{step.provider}/{step.model}")
            if unpriced:  # once per route (and config): what such a step costs is unknown, so never counted
                log.warning("route %r: step(s) %s are unpriced: a key's budget counts nothing for what they "
                            "answer and reserves nothing for them (set prices: or the step's price:)",
                            route.name, ", ".join(unpriced))
            cached = self._step_rates[route.name] = (route, rates)
        worst = 0
        for inp, out in cached[1]:
            worst = max(worst, inp * prompt + out * cap)
        return -(-worst // 1_000_000)  # femto- to nano-dollars, rounded up

    # -- the request path ------------------------------------------------------------
    async def admit(self, ctx: RequestContext, route: Route, body: dict[str, Any]) -> None:
        key = ctx.key
        ks = self.key_subject(key) if key is not None else None
        rs = self.route_subject(route) if route.limits is not None else None
        if ks is None and rs is None:
            return  # nothing limits this request: no work at all
        subjects: tuple[Subject, ...]
        if ks is None:
            subjects = (rs,) if rs is not None else ()
        else:
            subjects = (ks, rs) if rs is not None else (ks,)
        tokens = nanousd = 0
        if any(s[4] is not None or s[5] is not None or s[6] is not None for s in subjects):
            prompt = estimate_prompt_tokens(body)
            cap = completion_cap(body)
            tokens = prompt + cap
            if ks is not None and ks[6] is not None:
                nanousd = self.worst_cost(route, prompt, cap)
        verdict = await self.decide(subjects, tokens, nanousd)
        if verdict is None:  # the shared state could not be asked
            self.failed()
            if self.on_error == "closed":
                raise ServiceUnavailable("the rate limiter cannot be reached and limits.on_error is closed; "
                                         "try again shortly", code="limiter_unavailable",
                                         headers=[(b"retry-after", b"1")])
            return
        ctx.extra_headers = render_head(verdict[1])
        if not verdict[0]:
            ctx.limited = verdict[5] if len(verdict) > 5 else "limit"  # what atg_rate_limited_total counts
            raise refusal_error(verdict)
        ctx.admission = verdict[0]

    def settle(self, ctx: RequestContext) -> None:
        """Replace the request's reservation: by its usage (prompt + completion tokens, as the store
        counts them) when the upstream reported it; by its worst case when it reached an upstream that
        did not say (its client left or was cancelled mid-answer, a stream broke, an answer without
        usage): the upstream generated and bills tokens; released when it never reached one, or
        every step it tried failed."""
        ticket = ctx.admission
        ctx.admission = None
        usage = ctx.usage
        if usage:
            p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
            self.finished(ticket, (p if type(p) is int else 0) + (c if type(c) is int else 0), ctx.cost_nanousd)
            return
        attempts = ctx.attempts
        if attempts and (attempts[-1].ok or attempts[-1].error is None):  # answered, or still at it when cut off
            self.finished(ticket, RESERVED, RESERVED)
        else:
            self.finished(ticket, None, None)

    async def peek(self, ctx: RequestContext) -> None:
        """The key's x-ratelimit-* headers on an answer given before admission (a bad body, an unknown
        or forbidden model, /v1/models, /v1/key): a read, nothing taken; none when it cannot be had."""
        key = ctx.key
        sub = self.key_subject(key) if key is not None else None
        if sub is None:
            return
        head = await self.peek_subject(sub)
        if head is not None:
            ctx.extra_headers = render_head(head)

    def failed(self) -> None:
        """Count an undecided admission; say so at most once a minute."""
        self.errors += 1
        now = time.monotonic()
        if now - self._error_logged_at >= 60:
            log.warning("limiter unreachable: %d request(s) %s without a limit check so far (limits.on_error: %s)",
                        self.errors - self._errors_logged, "served" if self.on_error == "open" else "refused",
                        self.on_error)
            self._errors_logged = self.errors
            self._error_logged_at = now

    # -- where the state is -------------------------------------------------------------
    async def decide(self, subjects: Sequence[Subject], tokens: int, nanousd: int) -> Verdict | None:
        raise NotImplementedError

    def finished(self, ticket: int, tokens: int | None, nanousd: int | None) -> None:
        raise NotImplementedError

    async def describe_subject(self, subject: Subject) -> dict[str, Any] | None:
        raise NotImplementedError

    async def peek_subject(self, subject: Subject) -> Head | None:
        raise NotImplementedError

    async def describe(self, ctx: RequestContext) -> dict[str, Any]:
        """``GET /v1/key``: the caller's own limits (its own, else the config's defaults), what it used
        and what is left, so an application can pace itself."""
        key = ctx.key
        if key is None:  # an operator key of the config: no key limits (route limits still apply)
            return {"object": "key", "id": ctx.client, "name": None, "operator": True, "limits": {}, "usage": {}}
        sub = self.key_subject(key)
        limits: dict[str, Any] = {}
        usage: dict[str, Any] = {}
        if sub is not None:
            limits = {n: sub[i] for i, n in enumerate(("rpm", "rph", "rpd", "tpm", "tpd"), 1) if sub[i] is not None}
            if sub[6] is not None:
                limits["budget_usd"] = usd(sub[6])[1:]
                limits["budget_period"] = sub[7]
            got = await self.describe_subject(sub)
            if got is None:
                self.failed()
                raise ServiceUnavailable("the rate limiter cannot be reached; try again shortly",
                                         code="limiter_unavailable", headers=[(b"retry-after", b"1")])
            usage = got
        return {"object": "key", "id": key.id, "name": key.name, "prefix": key.prefix, "operator": False,
                "expires_at": key.expires_at, "limits": limits, "usage": usage}
