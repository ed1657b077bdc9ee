"""``workers: 1``: the limiter's state lives in the worker, and deciding is a few dictionary lookups
and deque operations on the event loop (no I/O, no await, no lock: one step of one thread)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .base import Admissions, LimitState, RatesOf, Subject, Verdict

if TYPE_CHECKING:
    from ..config import Config


class LocalLimiter(Admissions):
    def __init__(self, config: Config, state: LimitState,
                 rates: RatesOf | None = None) -> None:
        super().__init__(config, rates)
        self.state = state

    async def decide(self, subjects: Sequence[Subject], tokens: int, nanousd: int) -> Verdict | None:
        return self.state.admit(subjects, tokens, nanousd)

    def finished(self, ticket: int, tokens: int | None, nanousd: int | None) -> None:
        self.state.settle(ticket, tokens, nanousd)

    async def describe_subject(self, subject: Subject) -> dict[str, Any] | None:
        return self.state.describe(subject)

    async def aclose(self) -> None:
        return None
