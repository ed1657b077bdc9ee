"""The one place where usage is counted.

Every finished request passes through :meth:`UsageMeter.record`; per-client
quotas, the sqlite request log and metrics attach here.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from .context import RequestContext


class UsageMeter:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = defaultdict(int)
        self.tokens: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))

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

    def snapshot(self) -> dict[str, Any]:
        return {f"{c}|{r}": {"requests": n, **self.tokens.get((c, r), {})} for (c, r), n in self.requests.items()}
