"""What requests cost: a built-in price table, overridden by the config, in exact integer money.

Prices are USD per million tokens (``input``, ``output``, ``cached_input``), as the providers list
them. Each is turned once, at load, into an integer rate in femto-dollars (1e-15 USD) per token
(exact for any price with up to nine decimals), so a request's cost is integer arithmetic, rounded
once to nano-dollars (1e-9 USD, the store's unit): no floats, and nothing per request but a few
multiplications and one dictionary look-up.

Which price applies to an answer, first match wins: the answering step's ``price:``, then the
config's ``prices: {model: ...}``, then the built-in table; a model found in none of them is
*unpriced*: its cost is None (counted as unpriced in the usage tables), never 0. Model names are
matched exactly, after dropping a provider prefix (``openai/``, ``models/``) and one trailing
date or version (``-2024-08-06``, ``-20250514``, ``@20241022``, ``-001``, ``-latest``), so a
dated snapshot costs what its family costs; no looser matching, because a wrong price is worse
than none (``o3-pro`` is not ``o3``).

Usage is read as OpenAI reports it (the adapters translate to it): ``prompt_tokens`` includes the
cached ones (``prompt_tokens_details.cached_tokens``, charged at ``cached_input``, else at
``input``); ``completion_tokens`` includes reasoning tokens, all at ``output``. Not modelled:
long-context tiers (Gemini 2.5 Pro above 200k prompt tokens), Anthropic's cache writes (charged at
``input``), batch discounts; override a price where that matters.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NamedTuple

from ..config import Price

if TYPE_CHECKING:
    from ..config import Config
    from ..context import RequestContext

#: Femto-dollars per nano-dollar: rates are femto-USD per token, costs nano-USD.
_FEMTO_PER_NANO = 1_000_000


class Rates(NamedTuple):
    """Femto-dollars (1e-15 USD) per token: USD per million tokens times 1e9."""

    input: int
    output: int
    cached_input: int


def _p(inp: str, out: str, cached: str | None = None) -> Price:
    return Price(Decimal(inp), Decimal(out), Decimal(cached) if cached is not None else None)


#: USD per million tokens (input, output, cached input), as the providers published them (late 2025).
#: Override or extend with ``prices:`` in the config; a step's ``price:`` overrides both.
BUILTIN: dict[str, Price] = {
    # OpenAI
    "gpt-5": _p("1.25", "10", "0.125"),
    "gpt-5.1": _p("1.25", "10", "0.125"),
    "gpt-5-chat-latest": _p("1.25", "10", "0.125"),
    "gpt-5-codex": _p("1.25", "10", "0.125"),
    "gpt-5-mini": _p("0.25", "2", "0.025"),
    "gpt-5-nano": _p("0.05", "0.4", "0.005"),
    "gpt-5-pro": _p("15", "120"),
    "gpt-4.1": _p("2", "8", "0.5"),
    "gpt-4.1-mini": _p("0.4", "1.6", "0.1"),
    "gpt-4.1-nano": _p("0.1", "0.4", "0.025"),
    "gpt-4o": _p("2.5", "10", "1.25"),
    "gpt-4o-2024-05-13": _p("5", "15"),
    "gpt-4o-mini": _p("0.15", "0.6", "0.075"),
    "chatgpt-4o-latest": _p("5", "15"),
    "gpt-4-turbo": _p("10", "30"),
    "gpt-4": _p("30", "60"),
    "gpt-3.5-turbo": _p("0.5", "1.5"),
    "o1": _p("15", "60", "7.5"),
    "o1-mini": _p("1.1", "4.4", "0.55"),
    "o1-pro": _p("150", "600"),
    "o3": _p("2", "8", "0.5"),
    "o3-mini": _p("1.1", "4.4", "0.55"),
    "o3-pro": _p("20", "80"),
    "o4-mini": _p("1.1", "4.4", "0.275"),
    # Anthropic (cached input = cache reads, a tenth of input)
    "claude-opus-4-5": _p("5", "25", "0.5"),
    "claude-opus-4-1": _p("15", "75", "1.5"),
    "claude-opus-4": _p("15", "75", "1.5"),
    "claude-opus-4-0": _p("15", "75", "1.5"),
    "claude-sonnet-4-5": _p("3", "15", "0.3"),
    "claude-sonnet-4": _p("3", "15", "0.3"),
    "claude-sonnet-4-0": _p("3", "15", "0.3"),
    "claude-3-7-sonnet": _p("3", "15", "0.3"),
    "claude-3-5-sonnet": _p("3", "15", "0.3"),
    "claude-3-5-sonnet-v2": _p("3", "15", "0.3"),
    "claude-haiku-4-5": _p("1", "5", "0.1"),
    "claude-3-5-haiku": _p("0.8", "4", "0.08"),
    "claude-3-haiku": _p("0.25", "1.25", "0.03"),
    "claude-3-opus": _p("15", "75", "1.5"),
    # Google Gemini (prompts up to 200k tokens)
    "gemini-3-pro": _p("2", "12", "0.2"),
    "gemini-3-pro-preview": _p("2", "12", "0.2"),
    "gemini-2.5-pro": _p("1.25", "10", "0.125"),
    "gemini-2.5-flash": _p("0.3", "2.5", "0.03"),
    "gemini-2.5-flash-lite": _p("0.1", "0.4", "0.01"),
    "gemini-2.0-flash": _p("0.1", "0.4", "0.025"),
    "gemini-2.0-flash-lite": _p("0.075", "0.3"),
    "gemini-1.5-pro": _p("1.25", "5", "0.3125"),
    "gemini-1.5-flash": _p("0.075", "0.3", "0.01875"),
    # DeepSeek (V3.2, both names; cached input = cache hits)
    "deepseek-chat": _p("0.28", "0.42", "0.028"),
    "deepseek-reasoner": _p("0.28", "0.42", "0.028"),
    # xAI (grok-4-fast: prompts up to 128k tokens)
    "grok-4": _p("3", "15", "0.75"),
    "grok-4-0709": _p("3", "15", "0.75"),
    "grok-4-fast-reasoning": _p("0.2", "0.5", "0.05"),
    "grok-4-fast-non-reasoning": _p("0.2", "0.5", "0.05"),
    "grok-code-fast-1": _p("0.2", "1.5", "0.02"),
    "grok-3": _p("3", "15", "0.75"),
    "grok-3-mini": _p("0.3", "0.5", "0.075"),
    # Groq (its own model names; models other providers serve too, such as gpt-oss, are left unpriced)
    "llama-3.3-70b-versatile": _p("0.59", "0.79"),
    "llama-3.1-8b-instant": _p("0.05", "0.08"),
    # Mistral: dated names only (the -latest aliases move to new models at new prices)
    "mistral-large-2411": _p("2", "6"),
    "mistral-medium-2505": _p("0.4", "2"),
    "mistral-small-2503": _p("0.1", "0.3"),
    "mistral-small-2506": _p("0.1", "0.3"),
    "codestral-2501": _p("0.3", "0.9"),
    "open-mistral-nemo": _p("0.15", "0.15"),
    "ministral-8b-2410": _p("0.1", "0.1"),
    "ministral-3b-2410": _p("0.04", "0.04"),
}

# One trailing date or version: -2024-08-06, -20250514, @20241022, -001, -latest, -preview(-05-20|-09-2025).
# Not -0613-style four digits: gpt-4-1106-preview is not priced as gpt-4.
_VERSION_SUFFIX = re.compile(r"(?:-\d{4}-\d{2}-\d{2}|-\d{8}|@\d{8}|@latest|-\d{3}|-latest|"
                             r"-preview(?:-\d{2}-\d{2}|-\d{2}-\d{4})?)$")


def rates_of(price: Price) -> Rates:
    """A price (USD per million tokens) as integer femto-dollars per token."""
    scale = Decimal(1_000_000_000)
    inp = int((price.input * scale).to_integral_value())
    cached = price.cached_input if price.cached_input is not None else price.input
    return Rates(inp, int((price.output * scale).to_integral_value()), int((cached * scale).to_integral_value()))


def nanousd(rates: Rates, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> int:
    """What these tokens cost at ``rates``, in nano-dollars (rounded half up, once)."""
    cached = min(max(cached_tokens, 0), max(prompt_tokens, 0))
    femto = ((prompt_tokens - cached) * rates.input + cached * rates.cached_input
             + completion_tokens * rates.output)
    return (femto + _FEMTO_PER_NANO // 2) // _FEMTO_PER_NANO


def lookup(model: str, table: dict[str, Price]) -> Price | None:
    """``model``'s price in ``table``: exact, then without a provider prefix, then without one trailing
    date/version; None when not found."""
    name = model.strip().lower()
    for candidate in _candidates(name):
        price = table.get(candidate)
        if price is not None:
            return price
    return None


def _candidates(name: str) -> list[str]:
    out = [name]
    if "/" in name:
        name = name.rsplit("/", 1)[1]  # openai/gpt-4o, models/gemini-2.5-flash, google/gemini-2.5-pro
        out.append(name)
    stripped = _VERSION_SUFFIX.sub("", name)
    if stripped != name and stripped:
        out.append(stripped)
        again = _VERSION_SUFFIX.sub("", stripped)  # gemini-2.5-flash-preview-05-20 / -001-latest
        if again != stripped and again:
            out.append(again)
    return out


#: The largest token count taken from an upstream's ``usage`` (2^53: exact in JSON everywhere). A bigger
#: (or negative) number is an upstream's bug; clamped, it can still be stored, priced and summed.
MAX_TOKENS = 2**53


def _count(value: Any) -> int | None:
    """A token count as a whole number in 0..MAX_TOKENS; None when it is not one (a float, a string, a bool)."""
    if type(value) is not int:
        return None
    return value if 0 <= value <= MAX_TOKENS else (0 if value < 0 else MAX_TOKENS)


def usage_tokens(usage: dict[str, Any]) -> tuple[int, int, int, int] | None:
    """(prompt, completion, cached, reasoning) tokens of an OpenAI ``usage`` object, each clamped to
    0..MAX_TOKENS; None without any count."""
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    if prompt is None and completion is None:
        return None
    cached = reasoning = 0
    details = usage.get("prompt_tokens_details")
    if type(details) is dict:
        cached = _count(details.get("cached_tokens")) or 0
    details = usage.get("completion_tokens_details")
    if type(details) is dict:
        reasoning = _count(details.get("reasoning_tokens")) or 0
    return prompt or 0, completion or 0, cached, reasoning


class Pricing:
    """Prices from the config (``prices:``, ``price:`` on a step) over the built-in table.

    Built per config (a reload gets a new one). Look-ups are cached by (route, provider, model), so a
    request pays one dictionary look-up; the name normalisation runs once per distinct model.
    """

    def __init__(self, config: Config | Any) -> None:
        self.config = config
        table = dict(BUILTIN)
        for name, price in (getattr(config, "prices", None) or {}).items():
            table[name.strip().lower()] = price
        self._table = table
        # A step's own price, by (route, provider, model): the answering step is known by those.
        self._steps: dict[tuple[str, str, str], Price] = {}
        for route in (getattr(config, "routes", None) or {}).values():
            for step in route.steps:
                if step.price is not None:
                    self._steps.setdefault((route.name, step.provider, step.model), step.price)
        self._cache: dict[tuple[str | None, str | None, str | None], Rates | None] = {}

    def price(self, route: str | None, provider: str | None, model: str | None) -> Price | None:
        """The price that applies to ``model`` answered by ``provider`` on ``route``; None: unpriced."""
        if route is not None and provider is not None and model is not None:
            step = self._steps.get((route, provider, model))
            if step is not None:
                return step
        if not model:
            return None
        return lookup(model, self._table)

    def rates(self, route: str | None, provider: str | None, model: str | None) -> Rates | None:
        """:meth:`price` as integer rates (cached); None: unpriced. For the limiter's reservations too."""
        key = (route, provider, model)
        try:
            return self._cache[key]
        except KeyError:
            pass
        price = self.price(route, provider, model)
        found = rates_of(price) if price is not None else None
        if len(self._cache) < 10_000:  # model names come from the config; the bound is only a guard
            self._cache[key] = found
        return found

    def cost(self, ctx: RequestContext) -> int | None:
        """The request's cost in nano-dollars from ``ctx.usage``; None when unpriced or without usage."""
        usage = ctx.usage
        if not usage:
            return None
        rates = self.rates(ctx.route, ctx.provider, ctx.model)
        if rates is None:
            return None
        tokens = usage_tokens(usage)
        if tokens is None:
            return None
        return nanousd(rates, tokens[0], tokens[1], tokens[2])
