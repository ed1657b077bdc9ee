"""``workers: 1``: the limiter's state lives in the worker, and deciding is a few dictionary lookups
and array operations on the event loop (no I/O, no lock: one step of one thread).

The one exception is a quota's first use in this process: what the store says its period used so far
is read on a thread (the state asks for it with :class:`~.quota.NeedBaseline`), then the decision is
taken again. That await comes *before* the decision, so a cancelled request holds nothing; and the
decision and the ticket it takes are one synchronous step, with no await between them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import anyio.to_thread

from .base import Admissions, Head, LimitState, RatesOf, Subject, Verdict
from .quota import NeedBaseline

if TYPE_CHECKING:
    from ..config import Config

T = TypeVar("T")
_MAX_READS = 8  # quotas one decision can need: 2 subjects x (tpd, budget), with room for a race


class LocalLimiter(Admissions):
    def __init__(self, config: Config, state: LimitState,
                 rates: RatesOf | None = None) -> None:
        super().__init__(config, rates)
        self.state = state

    async def _with_baseline(self, step: Callable[..., T], *args: Any) -> T:
        """Run a state step; when it needs a quota's usage from the store, read it off the loop first."""
        try:
            return step(*args)
        except NeedBaseline as need:
            item = need.item
        baseline: Any = self.state.baseline
        loaded = []
        try:
            for _ in range(_MAX_READS):
                baseline.ready[item] = await anyio.to_thread.run_sync(baseline.read, *item)
                loaded.append(item)
                try:
                    return step(*args)
                except NeedBaseline as need:
                    item = need.item
            baseline.ready[item] = baseline.read(*item)  # only a quota dropped and needed again meanwhile
            loaded.append(item)
            return step(*args)
        finally:
            for done in loaded:  # a figure another request's step already consumed must not linger
                baseline.ready.pop(done, None)

    async def decide(self, subjects: Sequence[Subject], tokens: int, nanousd: int) -> Verdict | None:
        try:  # the common case: no coroutine more than the caller's
            return self.state.admit(subjects, tokens, nanousd)
        except NeedBaseline:
            return await self._with_baseline(self.state.admit, subjects, tokens, nanousd)

    def finished(self, ticket: int, tokens: int | None, nanousd: int | None) -> None:
        self.state.settle(ticket, tokens, nanousd)

    async def describe_subject(self, subject: Subject) -> dict[str, Any] | None:
        return await self._with_baseline(self.state.describe, subject)

    async def peek_subject(self, subject: Subject) -> Head | None:
        return await self._with_baseline(self.state.peek, subject)

    async def aclose(self) -> None:
        close = getattr(self.state.baseline, "close", None)
        if close is not None:
            close()
