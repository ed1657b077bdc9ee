"""The one place where usage is counted.

Every finished request passes through :meth:`UsageMeter.record`; per-client
quotas, the sqlite request log and metrics attach here. The meter outlives
config reloads (each rebuilt gateway is handed the same one), so what it
remembers about a provider survives an admin change to that provider.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from .context import RequestContext


class UsageMeter:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = defaultdict(int)
        self.tokens: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
        # Per provider, its last failed attempt in this process: {"time", "status", "error", "model", "route"}.
        # The error text is routing's, redacted whole and shortened; health details show it as it is.
        self.last_errors: dict[str, dict[str, Any]] = {}

    def record(self, ctx: RequestContext) -> None:
        if ctx.route is None:
            return
        key = (ctx.client, ctx.route)
        self.requests[key] += 1
        usage = ctx.usage
        if usage:
            t = self.tokens[key]
            for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
                v = usage.get(name)
                if isinstance(v, int):
                    t[name] += v
        attempts = ctx.attempts
        # A request served by its first step has one attempt and no error: two looks, nothing written. A
        # failed attempt has its error set by routing (a stream broken after its first chunk too, while it
        # counts as ok); at most one entry per step of the route is written.
        if attempts and (len(attempts) > 1 or attempts[0].error is not None):
            self._failed(ctx)

    def _failed(self, ctx: RequestContext) -> None:
        now = time.time()
        for a in ctx.attempts:
            # An attempt that sent nothing (its circuit open, every key resting) says why it was skipped, not
            # what the upstream did: the upstream's last error stays what health shows.
            if a.error is not None and not getattr(a, "skipped", False):
                self.last_errors[a.provider] = {"time": now, "status": a.status, "error": a.error,
                                                "timeout": a.timeout, "model": a.model, "route": ctx.route}

    def snapshot(self) -> dict[str, Any]:
        return {f"{c}|{r}": {"requests": n, **self.tokens.get((c, r), {})} for (c, r), n in self.requests.items()}
