"""What one process counts, and how the counts become metric families.

``observe`` runs once per request, so it is kept to a tuple, a dict lookup and a few list increments: every
request's figures go into one *record* per ``(route, provider, model, door, status, key)`` (a flat list of
numbers: counters, then the buckets of its histograms), every attempt into one counter per
``(route, provider, model, outcome)``, and the key-related figures into one record per
``(key, status, limit)``. The families a scrape shows (``atg_requests_total{route,door,status}``,
``atg_request_duration_seconds{route,provider}``, the GenAI names, the seed's names ...) are projections of
these few tables, computed at scrape time, when the cost does not matter. The same flat tables are what a
worker publishes for the others to sum (:mod:`.share`).

Label sets stay bounded: routes, providers, models and doors come from the config, statuses are HTTP's, and key
ids are capped to the top N with an ``other`` bucket (:meth:`.share.Share.key_label`), or dropped altogether
with ``metrics.per_key: false``. The one way a client names a value is ``allow_direct``'s ``provider/model``:
such a request counts under the route ``direct:<provider>`` (one value per configured provider, whatever the
client wrote; a configured route whose name holds a ``/`` keeps its name), its model among the first
:data:`MAX_DIRECT_MODELS` direct models this process saw, the rest as ``other``. Besides, the distinct values of
route and model are capped (:data:`MAX_ROUTES`, :data:`MAX_MODELS`: a route or model the config no longer has
still counts under its name, and a ``models`` list may mix direct steps into a configured route), and each
table at :data:`MAX_SERIES` records (records multiply by door, status and key), past which new ones count as
route and model ``other``. The caps are per process: with ``workers: N`` a scrape sums at most N such sets
(a worker takes the first direct models it sees).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Any

from ..store.prices import usage_tokens
from .exposition import Family, Labels
from .share import OTHER

if TYPE_CHECKING:
    from ..context import Attempt, RequestContext

# OpenTelemetry's advised bucket boundaries for the GenAI metrics (gen_ai.server.request.duration,
# gen_ai.server.time_to_first_token, gen_ai.client.token.usage); the atg_* histograms use the same, so one
# bisect serves both names.
DURATION_BOUNDS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BOUNDS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TOKEN_BOUNDS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)

# A request record: these counters, then each histogram's buckets (one more than its bounds: +Inf).
COUNT, FALLBACKS, PROMPT, COMPLETION, CACHED, REASONING, COST, DUR_SUM, TTFT_SUM = range(9)
DUR = 9
TTFT = DUR + len(DURATION_BOUNDS) + 1
TIN = TTFT + len(TTFT_BOUNDS) + 1
TOUT = TIN + len(TOKEN_BOUNDS) + 1
RECORD = TOUT + len(TOKEN_BOUNDS) + 1
# A key record: requests, prompt tokens, completion tokens, cost in nano-dollars.
K_COUNT, K_PROMPT, K_COMPLETION, K_COST = range(4)
KEY_RECORD = 4

MAX_SERIES = 4096  # records per table; past it new routes and models count as "other"
MAX_ROUTES = 1000  # distinct route label values per process (past it: "other")
MAX_MODELS = 1000  # distinct model label values of configured routes per process (past it: "other")
MAX_DIRECT_MODELS = 100  # distinct models named by clients on direct routes per process (past it: "other")
DIRECT = "direct:"  # the route label of allow_direct's provider/model requests: "direct:<provider>"
_KEY_CACHE = 4096  # key ids remembered per process (their label), past it the cache starts over

_CHAT_PATH = "/chat/completions"

#: Each attempt outcome, as ``atg_attempts_total{outcome}`` says it.
OUTCOMES = ("ok", "http_error", "rate_limited", "timeout", "connect_error", "upstream_error", "stream_error",
            "circuit_open", "keys_cooling", "keys_disabled", "busy", "cancelled")
_UPSTREAM_ERRORS = frozenset(("http_error", "rate_limited", "timeout", "connect_error", "upstream_error",
                              "stream_error"))
_CONNECT = ("cannot connect", "connect to ", "TLS handshake")

# gen_ai.operation.name per front door (OpenTelemetry's well-known values)
OPERATIONS = {"chat": "chat", "anthropic": "chat", "responses": "chat", "gemini": "generate_content",
              "embeddings": "embeddings", "completions": "text_completion"}
# gen_ai.provider.name per provider type (and per preset of type openai), OpenTelemetry's well-known values
_PROVIDER_TYPES = {"openai": "openai", "azure": "azure.ai.openai", "anthropic": "anthropic", "gemini": "gcp.gemini",
                   "vertex": "gcp.vertex_ai"}
_PRESETS = {"groq": "groq", "deepseek": "deepseek", "mistral": "mistral_ai", "xai": "x_ai",
            "perplexity": "perplexity"}


def attempt_outcome(a: Attempt) -> str:
    """What an attempt came to (see :data:`OUTCOMES`), from what routing wrote on it."""
    error = a.error or ""
    if a.ok:
        return "ok" if not error else "stream_error"  # broke after its first chunk (the client got an error event)
    if a.skipped:
        if a.cooling is not None:
            return "keys_cooling"
        return "circuit_open" if error.startswith("circuit") else "keys_disabled"
    if a.timeout:
        return "timeout"
    if a.status == 429:
        return "rate_limited"
    if a.status is not None:
        return "http_error"
    if not error or error.startswith("cancelled"):
        return "cancelled"  # a hedge's loser, or still at it when the client left
    if error.startswith(_CONNECT):
        return "connect_error"
    if "max_concurrency" in error:
        return "busy"
    return "upstream_error"


def provider_name(pc: Any) -> str:
    """gen_ai.provider.name for a provider's config: OpenTelemetry's name for its type (or preset)."""
    ptype = getattr(pc, "type", "")
    if ptype == "openai":
        preset = (getattr(pc, "options", None) or {}).get("preset")
        return _PRESETS.get(preset, "openai") if isinstance(preset, str) else "openai"
    return _PROVIDER_TYPES.get(ptype, ptype or "_OTHER")


_CLASSES = {s: f"{s // 100}xx" for s in range(100, 600)}


def status_class(status: int) -> str:
    return _CLASSES.get(status, "other")


class Counts:
    """This process's tables and the request path's two calls (``started``, ``observe``)."""

    def __init__(self, *, per_key: bool, seed_names: bool) -> None:
        self.per_key = per_key
        self.seed_names = seed_names
        self.requests: dict[tuple[Any, ...], list[Any]] = {}
        self.keyed: dict[tuple[Any, ...], list[int]] = {}
        self.attempts: dict[tuple[Any, ...], int] = {}
        self._labels: dict[str, str] = {}  # key id -> its label (itself, or "other")
        self._route_labels: dict[str, str] = {}  # route name -> its label (itself, or "other" past MAX_ROUTES)
        self._model_labels: dict[str, str] = {}  # a configured route's model -> its label
        self._direct_routes: dict[str, str] = {}  # provider -> "direct:<provider>"
        self._direct_models: dict[str, str] = {}  # the direct models with a label of their own (MAX_DIRECT_MODELS)
        self.shared = False  # set by a subclass that publishes: changes then arm a publish
        self.armed = False

    # -- the request path ---------------------------------------------------------------------------------------
    def started(self, ctx: RequestContext) -> None:
        """A request came in (in flight until :meth:`observe`); with workers, a publish is due."""
        if self.shared and not self.armed:
            self.arm()

    def observe(self, ctx: RequestContext) -> None:
        """A request finished: count it (see the module doc). Scrapes, admin calls (``ctx.unlogged``) and health
        checks (a load balancer's, every few seconds) are not requests of the gateway's users and are not
        counted."""
        if ctx.unlogged or (ctx.route is None and ctx.path.endswith("/health")):
            if self.shared and not self.armed:
                self.arm()
            return
        end = perf_counter()
        status = ctx.outcome or ctx.status
        door = ctx.door
        route = ctx.route
        if door is not None:
            dname = door.name
        elif route is not None or ctx.path.endswith(_CHAT_PATH):
            dname = "chat"
        else:
            dname = "other"
        if self.per_key:
            client = ctx.client
            kl = self._labels.get(client)
            if kl is None:
                kl = self._key_label(client)
        else:
            kl = ""
        skl = kl if self.seed_names else ""
        model = ctx.model
        direct = False
        if route is not None:
            if "/" in route and route not in self.configured_routes():  # allow_direct's provider/model
                direct = True
                route = self._direct_route(route)
                model = self._direct_model(model)
            else:
                label = self._route_labels.get(route)
                route = label if label is not None else self._route_label(route)
                if model is not None:
                    label = self._model_labels.get(model)
                    model = label if label is not None else self._model_label(model)
        rk = (route, ctx.provider, model, dname, status, skl)
        rec = self.requests.get(rk)
        if rec is None:
            rec = self._new_record(rk)
        rec[COUNT] += 1
        counts = None
        if route is not None:
            took = end - ctx.started
            rec[DUR_SUM] += took
            rec[DUR + bisect_left(DURATION_BOUNDS, took)] += 1
            first = ctx.first_byte
            if ctx.stream and first is not None:
                ttft = first - ctx.started
                rec[TTFT_SUM] += ttft
                rec[TTFT + bisect_left(TTFT_BOUNDS, ttft)] += 1
            attempts = ctx.attempts
            if attempts:
                table = self.attempts
                models = self._model_labels
                for a in attempts:
                    if direct:
                        am: str | None = self._direct_model(a.model)
                    else:
                        am = models.get(a.model)
                        if am is None:
                            am = self._model_label(a.model)
                    ak = (route, a.provider, am, "ok" if a.ok and a.error is None else attempt_outcome(a), skl)
                    n = table.get(ak)
                    if n is None:
                        self._new_attempt(ak)
                    else:
                        table[ak] = n + 1
                if len(attempts) > 1 and not attempts[0].ok:
                    step = attempts[0].step
                    if any(a.step > step for a in attempts):
                        rec[FALLBACKS] += 1
            usage = ctx.usage
            if usage:
                counts = usage_tokens(usage)
                if counts is not None:
                    p, c, cached, reasoning = counts
                    rec[PROMPT] += p
                    rec[COMPLETION] += c
                    rec[CACHED] += cached
                    rec[REASONING] += reasoning
                    rec[TIN + bisect_left(TOKEN_BOUNDS, p)] += 1
                    rec[TOUT + bisect_left(TOKEN_BOUNDS, c)] += 1
        cost = ctx.cost_nanousd
        if cost:
            rec[COST] += cost
        limited = ctx.limited
        if kl or limited is not None:
            kk = (kl, status, limited)
            krec = self.keyed.get(kk)
            if krec is None:
                krec = self._new_key_record(kk)
            krec[K_COUNT] += 1
            if counts is not None:
                krec[K_PROMPT] += counts[0]
                krec[K_COMPLETION] += counts[1]
            if cost:
                krec[K_COST] += cost
        if self.shared and not self.armed:
            self.arm()

    # -- the slow paths: a new key, a new series -----------------------------------------------------------
    def _key_label(self, client: str) -> str:
        label = self.key_label(client) if client else ""  # "": no key (a 401, /health): no key label
        if len(self._labels) >= _KEY_CACHE:
            self._labels.clear()
        self._labels[client] = label
        return label

    def key_label(self, client: str) -> str:
        """The label of a key id seen for the first time in this process (the subclass asks the share)."""
        return client

    def configured_routes(self) -> Mapping[str, Any]:
        """The routes of the configuration served now (the subclass reads the current gateway's): a name with a
        ``/`` that is not among them is a direct ``provider/model``. Asked only for names with a ``/``."""
        return {}

    def _route_label(self, route: str) -> str:
        label = route if len(self._route_labels) < MAX_ROUTES else OTHER
        if label is not OTHER:
            self._route_labels[route] = label
        return label

    def _model_label(self, model: str) -> str:
        label = model if len(self._model_labels) < MAX_MODELS else OTHER
        if label is not OTHER:
            self._model_labels[model] = label
        return label

    def _direct_route(self, route: str) -> str:
        """``direct:<provider>`` of a direct ``provider/model`` name (the provider is a configured one: the
        gateway refuses others before routing)."""
        provider = route.partition("/")[0]
        label = self._direct_routes.get(provider)
        if label is None:
            if len(self._direct_routes) >= MAX_ROUTES:
                return OTHER
            label = self._direct_routes[provider] = DIRECT + provider
        return label

    def _direct_model(self, model: str | None) -> str | None:
        """A client-named model's label: itself while fewer than :data:`MAX_DIRECT_MODELS` have one, else other."""
        if model is None:
            return None
        label = self._direct_models.get(model)
        if label is None:
            if len(self._direct_models) >= MAX_DIRECT_MODELS:
                return OTHER
            label = self._direct_models[model] = model
        return label

    def _new_record(self, rk: tuple[Any, ...]) -> list[Any]:
        if len(self.requests) >= MAX_SERIES:
            route, provider, model, door, status, skl = rk
            rk = (OTHER if route is not None else None, provider, OTHER if model is not None else None, door,
                  status, skl)
            rec = self.requests.get(rk)
            if rec is not None:
                return rec
        rec = self.requests[rk] = [0] * RECORD
        rec[DUR_SUM] = rec[TTFT_SUM] = 0.0
        return rec

    def _new_attempt(self, ak: tuple[Any, ...]) -> None:
        if len(self.attempts) >= MAX_SERIES:
            route, provider, model, outcome, skl = ak
            ak = (OTHER, provider, OTHER, outcome, skl)
        self.attempts[ak] = self.attempts.get(ak, 0) + 1

    def _new_key_record(self, kk: tuple[Any, ...]) -> list[int]:
        if len(self.keyed) >= MAX_SERIES:
            kk = (OTHER if kk[0] else "", *kk[1:])
            rec = self.keyed.get(kk)
            if rec is not None:
                return rec
        rec = self.keyed[kk] = [0] * KEY_RECORD
        return rec

    def arm(self) -> None:
        """Schedule a publish (the subclass that shares)."""

    # -- snapshots ---------------------------------------------------------------------------------------------
    def tables(self) -> dict[str, Any]:
        """The counters as plain data (what a worker publishes; live objects: marshal or merge them, do not keep)."""
        return {"r": self.requests, "k": self.keyed, "a": self.attempts}

    def take_over(self, tables: Mapping[str, Any]) -> None:
        """Add a dead worker's counters to this process's (its replacement carries them on)."""
        merge_into(self.requests, tables.get("r", {}))
        merge_into(self.keyed, tables.get("k", {}))
        for k, n in tables.get("a", {}).items():
            self.attempts[k] = self.attempts.get(k, 0) + n


def merge_into(into: dict[Any, list[Any]], more: Mapping[Any, list[Any]]) -> None:
    """Add ``more``'s records to ``into`` element by element (new keys get a copy)."""
    for k, rec in more.items():
        mine = into.get(k)
        if mine is None:
            into[k] = list(rec)
        else:
            for i, v in enumerate(rec):
                mine[i] += v


def merged(shares: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The sum of several processes' :meth:`Counts.tables` (nothing of theirs is changed)."""
    r: dict[Any, list[Any]] = {}
    k: dict[Any, list[Any]] = {}
    a: dict[Any, int] = {}
    for s in shares:
        merge_into(r, s.get("r", {}))
        merge_into(k, s.get("k", {}))
        for key, n in s.get("a", {}).items():
            a[key] = a.get(key, 0) + n
    return {"r": r, "k": k, "a": a}


# -- projections into families ------------------------------------------------------------------------------------
def _labels(names: tuple[str, ...], values: tuple[Any, ...]) -> Labels:
    return tuple((n, "" if v is None else str(v)) for n, v in zip(names, values, strict=True))


class _Sums:
    """Counter series being summed: labels -> value."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.values: dict[tuple[Any, ...], float] = {}

    def add(self, key: tuple[Any, ...], value: float) -> None:
        self.values[key] = self.values.get(key, 0) + value

    def samples(self, scale: float = 1) -> list[tuple[Labels, Any]]:
        out = [(_labels(self.names, k), v / scale if scale != 1 else v) for k, v in self.values.items()]
        return sorted(out)


class _Hists:
    """Histogram series being summed: labels -> [bucket counts..., sum]."""

    def __init__(self, names: tuple[str, ...], bounds: tuple[float, ...]) -> None:
        self.names = names
        self.bounds = bounds
        self.values: dict[tuple[Any, ...], list[Any]] = {}

    def add(self, key: tuple[Any, ...], rec: list[Any], start: int, total: float) -> None:
        n = len(self.bounds) + 1
        h = self.values.get(key)
        if h is None:
            h = self.values[key] = [0] * n + [0.0]
        for i in range(n):
            h[i] += rec[start + i]
        h[n] += total

    def samples(self) -> list[tuple[Labels, Any]]:
        out = [(_labels(self.names, k), (self.bounds, h[:-1], h[-1])) for k, h in self.values.items()]
        return sorted(out, key=lambda s: s[0])


def _has(rec: list[Any], start: int, n: int) -> bool:
    return any(rec[start:start + n])


def families(tables: Mapping[str, Any], *, per_key: bool, seed_names: bool, providers: Mapping[str, Any],
             gauges: Mapping[str, Any]) -> list[Family]:
    """Every family a scrape shows, from the summed tables and gauges (``providers``: name -> its config, for
    gen_ai.provider.name). ``gauges``: in_flight, connections {origin: (active, idle)}, workers, write_errors,
    build (version, commit), process (cpu, rss, vms, fds, start)."""
    req = _Sums(("route", "door", "status"))
    fallbacks = _Sums(("route",))
    tokens = _Sums(("route", "provider", "model", "kind"))
    cost = _Sums(("route", "provider", "model"))
    duration = _Hists(("route", "provider"), DURATION_BOUNDS)
    ttft = _Hists(("route", "provider"), TTFT_BOUNDS)
    gen_names = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "gen_ai_response_model")
    g_duration = _Hists((*gen_names, "error_type"), DURATION_BOUNDS)
    g_ttft = _Hists((*gen_names, "error_type"), TTFT_BOUNDS)
    g_tokens = _Hists((*gen_names, "gen_ai_token_type"), TOKEN_BOUNDS)
    s_req = _Sums(("client_id", "model", "status"))
    s_in = _Sums(("client_id", "model"))
    s_out = _Sums(("client_id", "model"))
    s_duration = _Hists(("client_id", "model"), DURATION_BOUNDS)
    names: dict[Any, str] = {}
    nt, nk = len(TTFT_BOUNDS) + 1, len(TOKEN_BOUNDS) + 1
    for (route, provider, model, door, status, skl), rec in tables["r"].items():
        req.add((route, door, status_class(status)), rec[COUNT])
        if seed_names:
            s_req.add((skl, route, status), rec[COUNT])
        if route is None:
            continue
        fallbacks.add((route,), rec[FALLBACKS])
        duration.add((route, provider), rec, DUR, rec[DUR_SUM])
        op = OPERATIONS.get(door, door)
        pname = names.get(provider)
        if pname is None:
            pc = providers.get(provider) if provider is not None else None
            pname = names[provider] = provider_name(pc) if pc is not None else (provider or "")
        error = str(status) if status >= 400 else ""
        g_duration.add((op, pname, route, model, error), rec, DUR, rec[DUR_SUM])
        if seed_names:
            s_duration.add((skl, route), rec, DUR, rec[DUR_SUM])
        if _has(rec, TTFT, nt):
            ttft.add((route, provider), rec, TTFT, rec[TTFT_SUM])
            g_ttft.add((op, pname, route, model, error), rec, TTFT, rec[TTFT_SUM])
        if provider is not None:
            for kind, i in (("prompt", PROMPT), ("completion", COMPLETION), ("cached", CACHED),
                            ("reasoning", REASONING)):
                tokens.add((route, provider, model, kind), rec[i])
            cost.add((route, provider, model), rec[COST])
        if _has(rec, TIN, nk):
            g_tokens.add((op, pname, route, model, "input"), rec, TIN, rec[PROMPT])
            g_tokens.add((op, pname, route, model, "output"), rec, TOUT, rec[COMPLETION])
            if seed_names:
                s_in.add((skl, route), rec[PROMPT])
                s_out.add((skl, route), rec[COMPLETION])
    attempts = _Sums(("route", "provider", "model", "outcome"))
    s_errors = _Sums(("client_id", "model", "provider"))
    for (route, provider, model, outcome, skl), n in tables["a"].items():
        attempts.add((route, provider, model, outcome), n)
        if seed_names and outcome in _UPSTREAM_ERRORS:
            s_errors.add((skl, route, provider), n)
    limited = _Sums(("key", "limit") if per_key else ("limit",))
    k_req = _Sums(("key", "status"))
    k_tokens = _Sums(("key", "kind"))
    k_cost = _Sums(("key",))
    for (kl, status, limit), rec in tables["k"].items():
        if limit is not None:
            limited.add((kl, limit) if per_key else (limit,), rec[K_COUNT])
        if per_key and kl:
            k_req.add((kl, status_class(status)), rec[K_COUNT])
            k_tokens.add((kl, "prompt"), rec[K_PROMPT])
            k_tokens.add((kl, "completion"), rec[K_COMPLETION])
            k_cost.add((kl,), rec[K_COST])
    conns = [((("origin", origin), ("state", state)), n)
             for origin, pair in sorted(gauges["connections"].items())
             for state, n in (("active", pair[0]), ("idle", pair[1]))]
    version, commit = gauges["build"]
    nano = 1e9
    out = [
        Family("atg_requests_total", "counter", "Requests answered, by route, front door (chat, anthropic, responses, "
               "gemini, embeddings, completions; other: models, key, health) and status class (a stream that failed "
               "after its head counts as the status it stood for).", req.samples()),
        Family("atg_attempts_total", "counter", "Attempts at route steps by outcome: " + ", ".join(OUTCOMES) + ".",
               attempts.samples()),
        Family("atg_fallbacks_total", "counter", "Requests that went past the first step of their route (it failed "
               "or was skipped).", fallbacks.samples()),
        Family("atg_tokens_total", "counter", "Tokens the upstreams reported, by kind: prompt, completion, cached "
               "(part of prompt), reasoning (part of completion).", tokens.samples()),
        Family("atg_cost_usd_total", "counter", "What the answers cost in USD, at the price table (unpriced models "
               "count nothing).", cost.samples(nano)),
        Family("atg_request_duration_seconds", "histogram", "Routed requests: from arrival to the end of the "
               "answer.", duration.samples()),
        Family("atg_time_to_first_token_seconds", "histogram", "Streams: from arrival to the first chunk sent to "
               "the client.", ttft.samples()),
        Family("atg_requests_in_flight", "gauge", "Requests being answered now (scrapes and admin calls are not "
               "requests).", [((), gauges["in_flight"])]),
        Family("atg_upstream_connections", "gauge", "Upstream connections per origin: active (a request on it, or "
               "opening) and idle (kept alive in the pool).", conns),
        Family("atg_rate_limited_total", "counter", "Requests refused with 429 by the gateway's own limits, by "
               "limit: rpm, rph, rpd, tpm, tpd, budget (route_*: a route's cap over all callers).", limited.samples()),
        Family("atg_store_write_errors_total", "counter", "Batches of request-log rows the store could not write.",
               [((), gauges["write_errors"])]),
    ]
    if per_key:
        out += [
            Family("atg_key_requests_total", "counter", "Requests per client key (the top keys; the rest as other), "
                   "by status class.", k_req.samples()),
            Family("atg_key_tokens_total", "counter", "Tokens per client key, by kind (prompt, completion).",
                   k_tokens.samples()),
            Family("atg_key_cost_usd_total", "counter", "Cost per client key in USD.", k_cost.samples(nano)),
        ]
    out += [
        Family("atg_build_info", "gauge", "The running version and commit (always 1).",
               [((("version", version), ("commit", commit)), 1)]),
        Family("atg_workers", "gauge", "Worker processes whose counts this scrape sums (alive now).",
               [((), gauges["workers"])]),
        Family("gen_ai_client_token_usage", "histogram", "Input and output tokens per request (OpenTelemetry "
               "gen_ai.client.token.usage).", g_tokens.samples()),
        Family("gen_ai_server_request_duration", "histogram", "GenAI request duration in seconds (OpenTelemetry "
               "gen_ai.server.request.duration).", g_duration.samples()),
        Family("gen_ai_server_time_to_first_token", "histogram", "Time to the first token of a streamed answer in "
               "seconds (OpenTelemetry gen_ai.server.time_to_first_token).", g_ttft.samples()),
    ]
    if seed_names:
        out += [
            Family("ai_gateway_requests_total", "counter", "Total number of requests", s_req.samples()),
            Family("ai_gateway_requests_in_progress", "gauge", "Number of requests currently being processed",
                   [((), gauges["in_flight"])]),
            Family("ai_gateway_input_tokens_total", "counter", "Total number of input tokens", s_in.samples()),
            Family("ai_gateway_output_tokens_total", "counter", "Total number of output tokens", s_out.samples()),
            Family("ai_gateway_request_duration_seconds", "histogram", "Request duration in seconds",
                   s_duration.samples()),
            Family("ai_gateway_upstream_errors_total", "counter", "Total number of upstream errors",
                   s_errors.samples()),
        ]
    proc = gauges["process"]
    if proc is not None:
        cpu, rss, vms, fds, start = proc
        out += [
            Family("process_cpu_seconds_total", "counter", "User and system CPU time of the gateway's processes "
                   "(the supervisor and every worker, dead ones' included), in seconds.", [((), cpu)]),
            Family("process_resident_memory_bytes", "gauge", "Resident memory of the gateway's processes, summed.",
                   [((), rss)]),
            Family("process_virtual_memory_bytes", "gauge", "Virtual memory of the gateway's processes, summed.",
                   [((), vms)]),
            Family("process_open_fds", "gauge", "Open file descriptors of the gateway's processes, summed.",
                   [((), fds)]),
            Family("process_start_time_seconds", "gauge", "When the gateway started (its supervisor, with "
                   "workers), in seconds since the epoch.", [((), start)]),
        ]
    return out
