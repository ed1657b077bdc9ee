"""Configuration: YAML with ${VAR} substitution, validated into frozen dataclasses.

Validation collects *every* problem with its path (``routes[0].steps[1].timout``)
and a hint, so one run of ``check-config`` shows all there is to fix. Values of
secrets never appear in messages: problems name keys, not contents.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError
from .providers import NO_BASE_URL_TYPES, PROVIDER_TYPES, allowed_keys
from .providers.options import check_options
from .providers.presets import PRESETS

DEFAULT_LOCATIONS = ("./config.yaml", "/etc/at-gateway/config.yaml")

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|s|m|h|d|w)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
                 "d": 86400.0, "w": 7 * 86400.0}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "ki": 1024, "kib": 1024, "m": 10**6,
               "mb": 10**6, "mi": 2**20, "mib": 2**20, "g": 10**9, "gb": 10**9,
               "gi": 2**30, "gib": 2**30}

TOP_KEYS = frozenset({
    "api_key", "api_keys", "host", "port", "default_timeout", "stream_idle_timeout",
    "stream_keepalive_interval", "max_body_size", "max_header_size", "header_timeout",
    "body_timeout", "keepalive_timeout", "cors", "max_connections", "shutdown_timeout", "tls", "log_level",
    "log_bodies", "upstream", "workers", "loop", "state_dir", "providers", "routes",
    "store", "request_log", "limits", "budget_timezone", "prices", "admin_token", "admin_tokens", "admin",
    "base_path", "allow_direct", "metrics", "response",
})
STEP_KEYS = frozenset({"provider", "model", "timeout", "conflict_resolution", "price", "retries", "retry_backoff",
                       "retry_backoff_max", "wait_for_key", "hedge_after"})
# Resilience keys every provider accepts beside its own (see ProviderConfig).
RESILIENCE_KEYS = frozenset({"api_keys", "key_strategy", "cooldown", "retries", "retry_backoff", "retry_backoff_max",
                             "breaker", "max_concurrency", "queue_timeout"})
COOLDOWN_KEYS = frozenset({"initial", "max", "failures"})
BREAKER_KEYS = frozenset({"failures", "failure_ratio", "window", "min_requests", "open_for"})
KEY_STRATEGIES = ("round-robin", "fill-first", "least-busy")
MAX_WAIT_FOR_KEY = 5.0
ROUTE_KEYS = frozenset({"name", "steps", "limits"})
STORE_KEYS = frozenset({"path", "encryption_key"})
ADMIN_KEYS = frozenset({"forward_auth", "max_body_size", "session_ttl"})
METRICS_KEYS = frozenset({"enabled", "username", "password", "per_key", "top_keys", "seed_names"})
FORWARD_AUTH_KEYS = frozenset({"address", "auth_request_headers", "auth_response_headers", "timeout"})
REQUEST_LOG_KEYS = frozenset({"retention"})
RESPONSE_KEYS = frozenset({"retention"})  # ``response:``, the Responses door's kept responses
LIMIT_KEYS = ("rpm", "rph", "rpd", "tpm", "tpd")
LIMITS_KEYS = frozenset({*LIMIT_KEYS, "on_error"})
ROUTE_LIMITS_KEYS = frozenset(LIMIT_KEYS)
PRICE_KEYS = frozenset({"input", "output", "cached_input"})
LIMIT_ON_ERROR = ("open", "closed")
TLS_KEYS = frozenset({"cert_file", "key_file"})
CORS_KEYS = frozenset({"allow_origins", "allow_headers", "expose_headers", "max_age", "allow_credentials"})
UPSTREAM_KEYS = frozenset({"max_connections_per_origin", "idle_timeout", "connect_timeout", "ca_file",
                           "max_response_size"})
LOG_LEVELS = ("debug", "info", "warning", "error")
CONFLICT_MODES = ("tools", "format")
LOOPS = ("auto", "asyncio", "uvloop")


@dataclass(frozen=True)
class CooldownConfig:
    """How long a provider key rests after failing: ``initial`` doubling up to ``max``; network errors and
    5xx cool a key only after ``failures`` in a row (a 429 at once, for what the upstream says or the backoff)."""

    initial: float = 1.0
    max: float = 60.0
    failures: int = 3
    enabled: bool = True  # ``cooldown: off``: keys never rest (a 401/403 still disables its key)


@dataclass(frozen=True)
class BreakerConfig:
    """A circuit per (provider, upstream model): open after ``failures`` consecutive failures, or when at least
    ``min_requests`` in the last ``window`` seconds failed at ``failure_ratio`` or more; open for ``open_for``,
    then one probe at a time (half-open) until one succeeds."""

    failures: int = 5
    failure_ratio: float | None = None  # None: consecutive failures only
    window: float = 60.0
    min_requests: int = 20
    open_for: float = 30.0
    enabled: bool = True  # ``breaker: off``: the provider's circuits never open


@dataclass(frozen=True)
class WeightedKey:
    key: str = field(repr=False)
    weight: int = 1


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    type: str
    api_key: str | None = field(default=None, repr=False)  # secrets: never in a repr (a log line, a traceback)
    base_url: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    proxy: str | None = field(default=None, repr=False)  # may hold a password
    # Type-specific keys (preset, api_version, credentials_file, ...).
    options: Mapping[str, Any] = field(default_factory=dict)
    # Resilience (issue 11): several keys, how they are chosen and rest, retries, the breaker, concurrency.
    api_keys: tuple[WeightedKey, ...] = ()  # beside api_key (which, when set too, comes first with weight 1)
    key_strategy: str = "round-robin"
    cooldown: CooldownConfig = field(default_factory=CooldownConfig)
    retries: int | None = None  # a step's default (None: 0)
    retry_backoff: float | None = None
    retry_backoff_max: float | None = None
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    max_concurrency: int | None = None  # requests in flight to this provider per worker; more wait (queue_timeout)
    queue_timeout: float = 5.0

    def keys(self) -> tuple[WeightedKey, ...]:
        """Every key of the provider, ``api_key`` first; ``()`` for a provider without keys."""
        if self.api_key and all(k.key != self.api_key for k in self.api_keys):
            return (WeightedKey(self.api_key), *self.api_keys)
        return self.api_keys


@dataclass(frozen=True)
class Price:
    """USD per million tokens, as exact decimals (money never goes through floats)."""

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None  # None: cached prompt tokens cost the input price


@dataclass(frozen=True)
class Limits:
    """Requests per minute/hour/day and tokens (prompt + completion) per minute/day; None: no limit."""

    rpm: int | None = None
    rph: int | None = None
    rpd: int | None = None
    tpm: int | None = None
    tpd: int | None = None

    def any(self) -> bool:
        return any(getattr(self, k) is not None for k in LIMIT_KEYS)


@dataclass(frozen=True)
class LimitsConfig:
    """``limits:``: defaults for every client key of the store, and what to do when the limiter fails."""

    defaults: Limits = field(default_factory=Limits)
    on_error: str = "open"  # open: serve (counted, logged once a minute); closed: 503


@dataclass(frozen=True)
class StoreConfig:
    path: str  # a file, or ":memory:"
    # Any passphrase (usually ${AT_GATEWAY_ENCRYPTION_KEY}): provider credentials stored in the database are
    # encrypted with a key stretched from it. None: they are stored as they are (a warning at start).
    encryption_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ForwardAuthConfig:
    """``admin.forward_auth``: every admin request is first asked about at an auth service (an SSO proxy's
    verify endpoint); its 2xx lets the request through, anything else is the answer. The body never goes."""

    address: str  # http(s)://host[:port]/path
    auth_request_headers: tuple[str, ...] = ("authorization", "cookie")  # sent to the auth service (lowercase)
    auth_response_headers: tuple[str, ...] = ()  # taken from its 2xx; the first one present names the actor
    timeout: float = 5.0


@dataclass(frozen=True)
class AdminConfig:
    """The admin API: on when a token or forward auth is configured (explicit opt-in), else 403."""

    tokens: tuple[str, ...] = field(default=(), repr=False)
    forward_auth: ForwardAuthConfig | None = None
    max_body_size: int = 1 * 2**20
    session_ttl: float = 12 * 3600.0  # the dashboard's login cookie lives this long

    @property
    def enabled(self) -> bool:
        return bool(self.tokens) or self.forward_auth is not None


@dataclass(frozen=True)
class MetricsConfig:
    """``{base_path}/metrics`` (Prometheus text format): off unless enabled; Basic auth when a username is set
    (the admin token works too)."""

    enabled: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    per_key: bool = True  # key ids as labels (capped to top_keys, the rest as "other")
    top_keys: int = 20
    seed_names: bool = False  # also the seed gateway's ai_gateway_* names


@dataclass(frozen=True)
class Step:
    provider: str
    model: str
    timeout: float  # the whole step, its retries included
    conflict_resolution: str | None = None
    price: Price | None = None  # overrides the price table for this step
    retries: int | None = None  # None: the provider's, else 0
    retry_backoff: float | None = None  # None: the provider's, else 0.5s
    retry_backoff_max: float | None = None  # None: the provider's, else 8s
    wait_for_key: float = 0.0  # when every key is cooling: wait up to this long for one (at most 5s)
    hedge_after: float | None = None  # no answer (or first chunk) after this long: the next step starts too


@dataclass(frozen=True)
class Route:
    name: str
    steps: tuple[Step, ...]
    limits: Limits | None = None  # a global cap on the route, over all keys


@dataclass(frozen=True)
class TLSConfig:
    cert_file: str
    key_file: str


@dataclass(frozen=True)
class CORSConfig:
    """Cross-origin access for browser clients to the client endpoints (never the admin API).

    ``allow_origins`` lists exact origins (``https://app.example``) or ``"*"``; with credentials allowed
    the matching origin is echoed back, never ``*`` (browsers refuse ``*`` with credentials).
    """

    allow_origins: tuple[str, ...] = ()
    # None: a preflight's Access-Control-Request-Headers are allowed as asked (SDKs send their own, such as
    # openai-node's x-stainless-*); a list allows just those names.
    allow_headers: tuple[str, ...] | None = None
    expose_headers: tuple[str, ...] = ("x-request-id", "x-gateway-route", "x-gateway-provider",
                                       "x-gateway-model", "x-gateway-attempts")
    max_age: int = 600
    allow_credentials: bool = False


@dataclass(frozen=True)
class UpstreamConfig:
    max_connections_per_origin: int = 256
    idle_timeout: float = 60.0
    connect_timeout: float = 10.0
    ca_file: str | None = None  # extra CA bundle for upstreams behind a private CA
    max_response_size: int = 64 * 2**20  # a whole (non-stream) upstream answer larger than this fails the step


@dataclass(frozen=True)
class Config:
    source: str
    api_keys: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8080
    default_timeout: float = 300.0
    stream_idle_timeout: float = 120.0
    stream_keepalive_interval: float = 15.0
    max_body_size: int = 10 * 2**20
    max_header_size: int = 64 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 60.0  # the whole request body must arrive within this, however it trickles
    keepalive_timeout: float = 75.0
    max_connections: int = 10000
    shutdown_timeout: float = 30.0
    tls: TLSConfig | None = None
    log_level: str = "info"
    log_bodies: bool = False
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    workers: int = 1
    loop: str = "auto"
    state_dir: str | None = None
    cors: CORSConfig | None = None  # off unless allow_origins is set
    store: StoreConfig = field(default_factory=lambda: StoreConfig(":memory:"))
    request_log_retention: float = 30 * 86400.0
    # How long the Responses door keeps each response (for previous_response_id and GET /v1/responses/{id})
    # when the store is a file; read per request, so a reload applies to the responses made after it.
    response_retention: float = 86400.0
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    budget_timezone: str = "UTC"
    prices: Mapping[str, Price] = field(default_factory=dict)  # model name -> price (over the built-in table)
    providers: Mapping[str, ProviderConfig] = field(default_factory=dict)
    routes: Mapping[str, Route] = field(default_factory=dict)
    admin: AdminConfig = field(default_factory=AdminConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    base_path: str = ""  # every endpoint under this prefix ("/llm"); "" serves at the root
    allow_direct: bool = False  # a request may name "provider/model" without a route
    # Where each provider and route was defined: "config" (the YAML file) or "database" (the admin API; a
    # database entry replaces the file's entry of the same name).
    provider_sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    route_sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    # The parsed YAML document as read (before ${VAR} substitution): what the database's entries are merged
    # over again when they change (see :func:`build_config`'s ``overlay``).
    document: Any = field(default=None, compare=False, repr=False)

    def secrets(self) -> list[str]:
        """Every configured secret value, for redaction by value."""
        out = list(self.api_keys)
        out += self.admin.tokens
        if self.metrics.password:
            out.append(self.metrics.password)
        for p in self.providers.values():
            out += [k.key for k in p.api_keys]
        if self.store.encryption_key:
            out.append(self.store.encryption_key)
        for p in self.providers.values():
            if p.api_key:
                out.append(p.api_key)
            for k, v in p.headers.items():
                # Redacted by value where it may be a credential: an auth-like name, or a value long and mixed
                # enough to be one (an org id, a tenant key). A value such as "true" or "request" is not: replacing
                # it everywhere would mangle every log line, and the store encrypts every header value anyway.
                if not (_CREDENTIAL_HEADER.search(k) or _credential_like(v)):
                    continue
                out.append(v)
                scheme, _, token = v.partition(" ")
                if token.strip() and scheme.lower() in ("bearer", "basic", "token"):
                    out.append(token.strip())  # an upstream may quote the token without its scheme
            if p.proxy and "@" in p.proxy:
                from urllib.parse import unquote

                userinfo = p.proxy.split("://", 1)[-1].rsplit("@", 1)[0]
                out.append(userinfo)
                if ":" in userinfo:
                    password = userinfo.split(":", 1)[1]
                    out += [password, unquote(password)]
            if p.base_url:
                out += _url_secrets(p.base_url)
            token_url = p.options.get("token_url")
            if isinstance(token_url, str):
                out += _url_secrets(token_url)
        if self.admin.forward_auth is not None:
            out += _url_secrets(self.admin.forward_auth.address)
        return [s for s in out if s and len(s) >= 4]


def url_without_credentials(url: str) -> str:
    """``url`` with what :func:`_url_secrets` finds replaced by ``(set)``: for the audit log, which must say
    where a provider sends without saying with what."""
    out = url
    for secret in sorted(set(_url_secrets(url)), key=len, reverse=True):
        if len(secret) >= 4:
            out = out.replace(secret, "(set)")
    return out


def _url_secrets(url: str) -> list[str]:
    """Credentials a URL carries: its userinfo's password, and query values named like credentials
    (``?api-key=...``, ``key=``, ``token=``, ``sig=``), raw and percent-decoded."""
    from urllib.parse import unquote

    out: list[str] = []
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return out
    if password:
        out += [password, unquote(password)]
    for raw in parts.query.split("&"):
        name, eq, value = raw.partition("=")
        if eq and value and (_CREDENTIAL_HEADER.search(unquote(name)) or unquote(name).lower() in ("sig", "code")):
            out += [value, unquote(value.replace("+", " "))]
    return out


_CREDENTIAL_HEADER = re.compile(r"(?i)auth|key|token|secret|cookie|session|signature|password|credential")


def _credential_like(value: str) -> bool:
    """A header value that could be a credential: 16+ characters mixing letters and digits, not a plain word,
    number or date."""
    v = value.strip()
    return len(v) >= 16 and any(c.isdigit() for c in v) and any(c.isalpha() for c in v)


def parse_duration(value: Any) -> float:
    """``300s``, ``5m``, ``1.5s``, ``1m30s``, ``250ms``, ``30d``, ``2w``; a bare number is seconds."""
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("negative duration")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("not a duration")
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pos, seconds = 0, 0.0
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
            pos = m.end()
        if pos != len(text) or not text:
            raise ValueError("not a duration") from None
    if seconds < 0:
        raise ValueError("negative duration")
    return seconds


def parse_size(value: Any) -> int:
    """``10MiB``, ``512k``, ``1048576``."""
    if isinstance(value, bool):
        raise ValueError("not a size")
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError("not a size")
    return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()])


def substitute_env(node: Any, env: Mapping[str, str], path: str, problems: list[str]) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string scalar."""
    if isinstance(node, str):
        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.append(f"{path}: environment variable {name} is not set (and has no default)")
            return ""
        return _ENV_RE.sub(repl, node) if "${" in node else node
    if isinstance(node, dict):
        return {k: substitute_env(v, env, _join(path, k), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute_env(v, env, f"{path}[{i}]", problems) for i, v in enumerate(node)]
    return node


def _header_safe(value: str) -> bool:
    """Names and models travel in response headers: no control characters, no spaces at the ends."""
    return value == value.strip() and value.isprintable()


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _unknown_keys(d: dict[str, Any], allowed: frozenset[str], path: str, problems: list[str]) -> None:
    for key in d:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (allowed: {', '.join(sorted(allowed))})"
            problems.append(f"{_join(path, key)}: unknown key{hint}")


class _Reader:
    """Typed getters that record problems instead of raising."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems

    def duration(self, d: dict[str, Any], key: str, path: str, default: float, positive: bool = False) -> float:
        """``positive``: zero would fail every request at once (a timeout of 0), so it is refused."""
        if d.get(key) is None:
            return default
        try:
            seconds = parse_duration(d[key])
        except ValueError:
            self.problems.append(
                f"{_join(path, key)}: {d[key]!r} is not a duration (use e.g. 300s, 5m, 1.5s or a number of seconds)")
            return default
        if positive and seconds <= 0:
            self.problems.append(f"{_join(path, key)}: must be greater than zero")
            return default
        return seconds

    def integer(self, d: dict[str, Any], key: str, path: str, default: int, lo: int = 0, hi: int | None = None) -> int:
        if d.get(key) is None:
            return default
        v = d[key]
        try:
            if isinstance(v, bool):
                raise ValueError
            n = int(v)
        except (TypeError, ValueError):
            self.problems.append(f"{_join(path, key)}: {v!r} is not a whole number")
            return default
        if n < lo or (hi is not None and n > hi):
            rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            self.problems.append(f"{_join(path, key)}: {n} is out of range ({rng})")
            return default
        return n

    def string(self, d: dict[str, Any], key: str, path: str, default: str | None = None,
               choices: tuple[str, ...] | None = None, secret: bool = False) -> str | None:
        v = d.get(key)
        if v is None:
            return default
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not secret:
            v = str(v)
        if not isinstance(v, str):
            self.problems.append(f"{_join(path, key)}: must be a string")
            return default
        if choices and v not in choices:
            self.problems.append(f"{_join(path, key)}: must be one of {', '.join(choices)}" +
                                 ("" if secret else f" (got {v!r})"))
            return default
        return v

    def boolean(self, d: dict[str, Any], key: str, path: str, default: bool) -> bool:
        v = d.get(key)
        if v is None:
            return default
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return v.lower() in ("true", "yes", "1", "on")
        self.problems.append(f"{_join(path, key)}: must be true or false")
        return default


def _size(d: dict[str, Any], key: str, path: str, default: int, problems: list[str]) -> int:
    if d.get(key) is None:
        return default
    try:
        return parse_size(d[key])
    except ValueError:
        problems.append(f"{_join(path, key)}: {d[key]!r} is not a size (e.g. 64MiB)")
        return default


def _mapping(v: Any, path: str, problems: list[str]) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        problems.append(f"{path}: must be a mapping")
        return {}
    return v


def _sequence(v: Any, path: str, problems: list[str]) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        problems.append(f"{path}: must be a list")
        return []
    return v


@dataclass(frozen=True)
class Overlay:
    """Providers and routes kept in the database (as the admin API wrote them, credentials decrypted):
    each replaces the YAML entry of the same name, or comes after the YAML ones. Never ${VAR}-substituted:
    an admin must not be able to send the gateway's environment upstream."""

    providers: tuple[Mapping[str, Any], ...] = field(default=(), repr=False)  # credentials decrypted
    routes: tuple[Mapping[str, Any], ...] = ()


def _merge(items: list[Any], stored: tuple[Mapping[str, Any], ...], kind: str,
           problems: list[str]) -> tuple[list[Any], list[str], dict[str, str]]:
    """The YAML list with the database entries merged in by name; each entry's path for problems, and the
    source of each name."""
    out = list(items)
    paths = [f"{kind}[{i}]" for i in range(len(items))]
    sources: dict[str, str] = {}
    index: dict[str, int] = {}
    for i, item in enumerate(items):
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            index.setdefault(item["name"], i)
            sources[item["name"]] = "config"
    for spec in stored:
        name = spec.get("name")
        if not isinstance(name, str):
            problems.append(f"{kind} (database): an entry without a name")
            continue
        path = f"{kind}[{name!r}] (database)"
        if name in index:
            out[index[name]], paths[index[name]] = dict(spec), path
        else:
            index[name] = len(out)
            out.append(dict(spec))
            paths.append(path)
        sources[name] = "database"
    return out, paths, sources


def _list_or_empty(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def build_config(raw: Any, source: str, env: Mapping[str, str] | None = None,
                 overlay: Overlay | None = None) -> Config:
    """Validate a parsed YAML document (with the database's ``overlay`` merged in); raise ConfigError listing
    every problem."""
    env = os.environ if env is None else env
    problems: list[str] = []
    document = raw
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, ["the top level must be a mapping of keys (api_key, providers, routes, ...)"])
    data = substitute_env(raw, env, "", problems)
    provider_paths = route_paths = None
    provider_sources: dict[str, str] = {}
    route_sources: dict[str, str] = {}
    if overlay is not None and (overlay.providers or overlay.routes):
        data = dict(data)
        data["providers"], provider_paths, provider_sources = _merge(
            _list_or_empty(data.get("providers")), overlay.providers, "providers", problems)
        data["routes"], route_paths, route_sources = _merge(
            _list_or_empty(data.get("routes")), overlay.routes, "routes", problems)
    r = _Reader(problems)
    _unknown_keys(data, TOP_KEYS, "", problems)

    keys = _one_or_many(data, "api_key", "api_keys", r, problems)
    store_raw = data.get("store")
    in_memory = isinstance(store_raw, dict) and store_raw.get("path") == ":memory:"
    if not keys and in_memory:
        # With a store file, client keys made by `at-gateway keys create` can call; in memory nothing could.
        problems.append("api_key: no gateway key is configured (set api_key or api_keys, or keep client keys "
                        "in a store file and create them with `at-gateway keys create`; clients send a key "
                        "as X-Api-Key or Authorization: Bearer)")

    default_port = 8080
    if env.get("PORT", "").isdigit():
        default_port = int(env["PORT"])
        if default_port > 65535 and data.get("port") is None:
            problems.append(f"port: not set, and $PORT ({default_port}) is out of range (0..65535)")
    port = r.integer(data, "port", "", default_port, 0, 65535)
    default_timeout = r.duration(data, "default_timeout", "", 300.0, positive=True)

    tls = None
    tls_raw = _mapping(data.get("tls"), "tls", problems)
    if tls_raw:
        _unknown_keys(tls_raw, TLS_KEYS, "tls", problems)
        cert, key = r.string(tls_raw, "cert_file", "tls"), r.string(tls_raw, "key_file", "tls")
        if not cert or not key:
            problems.append("tls: both cert_file and key_file are required")
        else:
            tls = TLSConfig(cert, key)

    up_raw = _mapping(data.get("upstream"), "upstream", problems)
    _unknown_keys(up_raw, UPSTREAM_KEYS, "upstream", problems)
    upstream = UpstreamConfig(
        max_connections_per_origin=r.integer(up_raw, "max_connections_per_origin", "upstream", 256, 1),
        idle_timeout=r.duration(up_raw, "idle_timeout", "upstream", 60.0),
        connect_timeout=r.duration(up_raw, "connect_timeout", "upstream", 10.0, positive=True),
        ca_file=r.string(up_raw, "ca_file", "upstream"),
        max_response_size=_size(up_raw, "max_response_size", "upstream", 64 * 2**20, problems),
    )

    max_body = 10 * 2**20
    if data.get("max_body_size") is not None:
        try:
            max_body = parse_size(data["max_body_size"])
        except ValueError:
            problems.append(f"max_body_size: {data['max_body_size']!r} is not a size (e.g. 10MiB)")

    cors = _build_cors(data.get("cors"), r, problems)
    store = _build_store(data.get("store"), r, problems, data.get("state_dir"), env)
    rl_raw = _mapping(data.get("request_log"), "request_log", problems)
    _unknown_keys(rl_raw, REQUEST_LOG_KEYS, "request_log", problems)
    retention = r.duration(rl_raw, "retention", "request_log", 30 * 86400.0, positive=True)
    resp_raw = _mapping(data.get("response"), "response", problems)
    _unknown_keys(resp_raw, RESPONSE_KEYS, "response", problems)
    response_retention = r.duration(resp_raw, "retention", "response", 86400.0, positive=True)
    lim_raw = _mapping(data.get("limits"), "limits", problems)
    _unknown_keys(lim_raw, LIMITS_KEYS, "limits", problems)
    limits = LimitsConfig(defaults=_build_limits(lim_raw, "limits", r),
                          on_error=r.string(lim_raw, "on_error", "limits", "open", LIMIT_ON_ERROR) or "open")
    budget_tz = r.string(data, "budget_timezone", "", "UTC") or "UTC"
    if budget_tz != "UTC":
        try:
            import zoneinfo

            zoneinfo.ZoneInfo(budget_tz)
        except Exception:
            problems.append(f"budget_timezone: unknown time zone {budget_tz[:60]!r} (an IANA name such as "
                            "Europe/Berlin, or UTC)")
    prices: dict[str, Price] = {}
    for model, raw_price in _mapping(data.get("prices"), "prices", problems).items():
        price = _build_price(raw_price, f"prices.{model}", problems)
        if price is not None:
            prices[str(model)] = price
    providers = _build_providers(data.get("providers"), r, problems, provider_paths)
    routes = _build_routes(data.get("routes"), r, problems, providers, default_timeout, route_paths)
    admin = _build_admin(data, r, problems)
    base_path = _build_base_path(data.get("base_path"), problems)
    if not provider_sources:
        provider_sources = {name: "config" for name in providers}
        route_sources = {name: "config" for name in routes}

    cfg = Config(
        source=source,
        api_keys=tuple(keys),
        host=r.string(data, "host", "", "127.0.0.1") or "127.0.0.1",
        port=port,
        default_timeout=default_timeout,
        stream_idle_timeout=r.duration(data, "stream_idle_timeout", "", 120.0, positive=True),
        stream_keepalive_interval=r.duration(data, "stream_keepalive_interval", "", 15.0),
        max_body_size=max_body,
        max_header_size=r.integer(data, "max_header_size", "", 64 * 1024, 1024),
        header_timeout=r.duration(data, "header_timeout", "", 10.0, positive=True),
        body_timeout=r.duration(data, "body_timeout", "", 60.0, positive=True),
        keepalive_timeout=r.duration(data, "keepalive_timeout", "", 75.0),
        max_connections=r.integer(data, "max_connections", "", 10000, 1),
        shutdown_timeout=r.duration(data, "shutdown_timeout", "", 30.0),
        tls=tls,
        log_level=r.string(data, "log_level", "", "info", LOG_LEVELS) or "info",
        log_bodies=r.boolean(data, "log_bodies", "", False),
        upstream=upstream,
        workers=r.integer(data, "workers", "", 1, 1, 256),
        loop=r.string(data, "loop", "", "auto", LOOPS) or "auto",
        state_dir=r.string(data, "state_dir", ""),
        cors=cors,
        store=store,
        request_log_retention=retention,
        response_retention=response_retention,
        limits=limits,
        budget_timezone=budget_tz,
        prices=prices,
        providers=providers,
        routes=routes,
        admin=admin,
        metrics=_build_metrics(data, r, problems),
        base_path=base_path,
        allow_direct=r.boolean(data, "allow_direct", "", False),
        provider_sources={n: provider_sources.get(n, "config") for n in providers},
        route_sources={n: route_sources.get(n, "config") for n in routes},
        document=document,
    )
    if problems:
        raise ConfigError(source, problems)
    return cfg


def _one_or_many(data: dict[str, Any], one: str, many: str, r: _Reader, problems: list[str]) -> list[str]:
    """``api_key`` + ``api_keys`` (or ``admin_token`` + ``admin_tokens``): the single secret first, then the list."""
    out: list[str] = []
    if data.get(one) not in (None, ""):
        value = r.string(data, one, "", secret=True)
        if value:
            out.append(value)
    for i, value in enumerate(_sequence(data.get(many), many, problems)):
        if not isinstance(value, str) or not value:
            problems.append(f"{many}[{i}]: must be a non-empty string")
        else:
            out.append(value)
    return out


def _build_admin(data: dict[str, Any], r: _Reader, problems: list[str]) -> AdminConfig:
    tokens = _one_or_many(data, "admin_token", "admin_tokens", r, problems)
    for i, token in enumerate(tokens):
        if len(token) < 16:
            problems.append(f"admin_token{'s' if len(tokens) > 1 else ''}: the {_ordinal(i)} token is shorter than "
                            "16 characters (use a long random one: openssl rand -hex 32)")
    raw = _mapping(data.get("admin"), "admin", problems)
    _unknown_keys(raw, ADMIN_KEYS, "admin", problems)
    forward = None
    fa_raw = raw.get("forward_auth")
    if fa_raw is not None:
        fa = _mapping(fa_raw, "admin.forward_auth", problems)
        _unknown_keys(fa, FORWARD_AUTH_KEYS, "admin.forward_auth", problems)
        address = r.string(fa, "address", "admin.forward_auth")
        if not address or not re.match(r"^https?://[^/\s]+", address) or not _valid_port(address):
            problems.append("admin.forward_auth.address: required, an http:// or https:// URL of the auth service "
                            "(e.g. http://127.0.0.1:4181/verify)")
            address = None
        lists: dict[str, tuple[str, ...]] = {}
        for key in ("auth_request_headers", "auth_response_headers"):
            value = fa.get(key)
            if value is None:
                continue
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(
                    isinstance(v, str) and re.fullmatch(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+", v) for v in value):
                problems.append(f"admin.forward_auth.{key}: must be a list of header names")
                continue
            lists[key] = tuple(v.lower() for v in value)
        timeout = r.duration(fa, "timeout", "admin.forward_auth", 5.0, positive=True)
        if address:
            base = ForwardAuthConfig(address)
            forward = ForwardAuthConfig(address, lists.get("auth_request_headers", base.auth_request_headers),
                                        lists.get("auth_response_headers", base.auth_response_headers), timeout)
    return AdminConfig(tokens=tuple(tokens), forward_auth=forward,
                       max_body_size=_size(raw, "max_body_size", "admin", 1 * 2**20, problems),
                       session_ttl=r.duration(raw, "session_ttl", "admin", 12 * 3600.0, positive=True))


def _build_metrics(data: dict[str, Any], r: _Reader, problems: list[str]) -> MetricsConfig:
    raw = _mapping(data.get("metrics"), "metrics", problems)
    _unknown_keys(raw, METRICS_KEYS, "metrics", problems)
    username = r.string(raw, "username", "metrics")
    password = r.string(raw, "password", "metrics")
    if (username is None) != (password is None):
        problems.append("metrics: username and password go together (set both for Basic auth, or neither: then "
                        "the admin token, or no auth at all)")
    if password is not None and len(password) < 12:
        problems.append("metrics.password: shorter than 12 characters (use a long random one: openssl rand -hex 16)")
    return MetricsConfig(enabled=r.boolean(raw, "enabled", "metrics", False), username=username, password=password,
                         per_key=r.boolean(raw, "per_key", "metrics", True),
                         top_keys=r.integer(raw, "top_keys", "metrics", 20, 1, 1000),
                         seed_names=r.boolean(raw, "seed_names", "metrics", False))


def _ordinal(i: int) -> str:
    return {0: "first", 1: "second", 2: "third"}.get(i, f"{i + 1}th")


def _build_base_path(value: Any, problems: list[str]) -> str:
    """``/llm`` (leading slash, no trailing one); "" or "/" serve at the root."""
    if value is None:
        return ""
    if not isinstance(value, str) or not re.fullmatch(r"(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)*/?", value):
        problems.append(f"base_path: {str(value)[:60]!r} is not a path prefix (like /llm: a leading slash, "
                        "path characters only, no query)")
        return ""
    return value.rstrip("/")


def validate_provider(spec: Any, source: str = "config") -> tuple[ProviderConfig | None, list[str]]:
    """One provider as the admin API receives it, checked as the YAML would check it: the provider, or every
    problem with its path (``provider.base_url: ...``).

    ``source="database"`` (the admin API's): also refused is whatever would make the gateway use its host's
    own credentials or files on an admin's say: a ``credentials_file`` (any file the gateway can read, its
    contents sent to the ``token_url``), a ``token_url`` (where a Google credential is exchanged), and a
    vertex provider without ``api_key`` (it would take the host's Application Default Credentials:
    ``$GOOGLE_APPLICATION_CREDENTIALS``, gcloud's file, the metadata server). The config file, which only
    the operator writes, may use all of them."""
    problems: list[str] = []
    out = _build_providers([spec], _Reader(problems), problems, ["provider"])
    if source == "database" and isinstance(spec, dict):
        for key in ("credentials_file", "token_url"):
            if spec.get(key) is not None:
                problems.append(f"provider.{key}: not allowed for a provider stored in the database (it makes the "
                                "gateway use its host's files and credentials): set it in the config file")
        if spec.get("type") == "vertex" and not spec.get("api_key"):
            problems.append("provider.api_key: required for a vertex provider stored in the database (Vertex AI "
                            "express mode; without a key it would use the host's Google credentials): define "
                            "providers using service accounts or ADC in the config file")
    return (next(iter(out.values())) if out and not problems else None), problems


def validate_route(spec: Any, providers: Mapping[str, ProviderConfig], default_timeout: float = 300.0
                   ) -> tuple[Route | None, list[str]]:
    """One route as the admin API receives it (its providers must be among ``providers``)."""
    problems: list[str] = []
    out = _build_routes([spec], _Reader(problems), problems, providers, default_timeout, ["route"])
    return (next(iter(out.values())) if out and not problems else None), problems


def default_store_path(state_dir: str | None, env: Mapping[str, str]) -> str:
    """``at-gateway.db`` under ``state_dir``, else systemd's ``$STATE_DIRECTORY``, else the working directory."""
    if state_dir:
        return os.path.join(state_dir, "at-gateway.db")
    if env.get("STATE_DIRECTORY"):
        return os.path.join(env["STATE_DIRECTORY"].split(":")[0], "at-gateway.db")
    return os.path.join(".", "at-gateway.db")


def _build_store(raw: Any, r: _Reader, problems: list[str], state_dir: Any, env: Mapping[str, str]) -> StoreConfig:
    data = _mapping(raw, "store", problems)
    _unknown_keys(data, STORE_KEYS, "store", problems)
    path = r.string(data, "path", "store")
    if path is None:
        path = default_store_path(state_dir if isinstance(state_dir, str) else None, env)
    elif not path.strip():
        problems.append("store.path: empty (a file name, or \":memory:\" to keep everything in memory)")
    key = r.string(data, "encryption_key", "store", secret=True) or None
    if key is not None and len(key) < 16:
        problems.append("store.encryption_key: shorter than 16 characters (use a long random passphrase: "
                        "openssl rand -base64 32, usually as ${AT_GATEWAY_ENCRYPTION_KEY})")
    return StoreConfig(path, key)


def _build_limits(data: dict[str, Any], path: str, r: _Reader) -> Limits:
    values: dict[str, int | None] = {}
    for key in LIMIT_KEYS:
        values[key] = r.integer(data, key, path, 0, 1) if data.get(key) is not None else None
    return Limits(**values)


def _build_price(raw: Any, path: str, problems: list[str]) -> Price | None:
    if not isinstance(raw, dict):
        problems.append(f"{path}: must be a mapping {{input, output, cached_input}} in USD per million tokens")
        return None
    _unknown_keys(raw, PRICE_KEYS, path, problems)
    values: dict[str, Decimal | None] = {}
    for key in ("input", "output", "cached_input"):
        v = raw.get(key)
        if v is None:
            if key != "cached_input":
                problems.append(f"{path}.{key}: required (USD per million tokens, e.g. 2.5)")
            values[key] = None
            continue
        try:
            d = Decimal(str(v)) if not isinstance(v, bool) else None
        except InvalidOperation:
            d = None
        if d is None or not d.is_finite() or d < 0:
            problems.append(f"{path}.{key}: {str(v)[:30]!r} is not a price (USD per million tokens, >= 0)")
            values[key] = None
            continue
        values[key] = d
    if values["input"] is None or values["output"] is None:
        return None
    return Price(values["input"], values["output"], values["cached_input"])


def _build_cors(raw: Any, r: _Reader, problems: list[str]) -> CORSConfig | None:
    if raw is None:
        return None
    data = _mapping(raw, "cors", problems)
    _unknown_keys(data, CORS_KEYS, "cors", problems)
    lists: dict[str, tuple[str, ...]] = {}
    for key in ("allow_origins", "allow_headers", "expose_headers"):
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            problems.append(f"cors.{key}: must be a list of strings")
            continue
        items = [v.strip() for v in value]
        if key == "allow_origins":
            for v in items:
                if v != "*" and not re.match(r"^https?://[^/\s]+$", v):
                    problems.append(f"cors.allow_origins: {v[:80]!r} is not an origin (scheme://host[:port], "
                                    "no path) or \"*\"")
        elif any(not re.fullmatch(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+", v) for v in items):
            problems.append(f"cors.{key}: header names only (letters, digits, '-')")
        lists[key] = tuple(v if key == "allow_origins" else v.lower() for v in items)
    credentials = r.boolean(data, "allow_credentials", "cors", False)
    if credentials and "*" in lists.get("allow_headers", ()):
        problems.append("cors.allow_headers: \"*\" is a plain header name to browsers when allow_credentials is "
                        "on; list the names, or leave allow_headers out to allow what a preflight asks for")
    if credentials and "*" in lists.get("allow_origins", ()):
        problems.append("cors.allow_credentials: cannot be combined with allow_origins \"*\" "
                        "(list the origins instead)")
    if not lists.get("allow_origins"):
        return None  # cors: {} or no origins: off
    base = CORSConfig()
    return CORSConfig(
        allow_origins=lists["allow_origins"],
        allow_headers=lists.get("allow_headers", base.allow_headers),
        expose_headers=lists.get("expose_headers", base.expose_headers),
        max_age=r.integer(data, "max_age", "cors", 600, 0, 86400),
        allow_credentials=credentials,
    )


ENC_PREFIX = "enc:v1:"  # the store's encrypted values (store/crypto.py PREFIX)
_ENC_PROBLEM = "starts with enc:v1:, the store's prefix for encrypted values (send the value itself)"
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 5.6.2: a field name is a token
# Fields that belong to the connection or the framing, which the gateway sets itself: a provider header of
# one of these names would split or smuggle the upstream request.
FORBIDDEN_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive", "te",
                               "trailer", "upgrade", "expect", "proxy-connection"})


def _header_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a provider header's name (None: it can)."""
    if not _TOKEN.fullmatch(name):
        return "is not a valid header name (RFC 9110: letters, digits and !#$%&'*+-.^_`|~, no spaces or colons)"
    if name.lower() in FORBIDDEN_HEADERS:
        return "is set by the gateway for each connection and cannot be configured"
    return None


def _valid_port(url: str) -> bool:
    try:
        _ = urlsplit(url).port  # raises for a port that is not a number in range
    except ValueError:
        return False
    return True


def _build_providers(raw: Any, r: _Reader, problems: list[str],
                     paths: list[str] | None = None) -> dict[str, ProviderConfig]:
    out: dict[str, ProviderConfig] = {}
    for i, p in enumerate(_sequence(raw, "providers", problems)):
        path = paths[i] if paths is not None else f"providers[{i}]"
        if not isinstance(p, dict):
            problems.append(f"{path}: must be a mapping with name, type, base_url, api_key")
            continue
        name = r.string(p, "name", path)
        if not name:
            problems.append(f"{path}.name: required")
        elif name in out:
            problems.append(f"{path}.name: duplicate provider name {name!r}")
        elif not _header_safe(name):
            problems.append(f"{path}.name: {name!r} has spaces at its ends or control characters (it is sent "
                            "back in the x-gateway-provider header)")
            name = None
        ptype = r.string(p, "type", path, "openai") or "openai"
        if ptype not in PROVIDER_TYPES:
            close = difflib.get_close_matches(ptype, list(PROVIDER_TYPES), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(PROVIDER_TYPES))})"
            problems.append(f"{path}.type: unknown provider type {ptype!r}{hint}")
        allowed = allowed_keys(ptype)
        _unknown_keys(p, allowed, path, problems)
        base_url = r.string(p, "base_url", path)
        if base_url is not None:
            if not re.match(r"^https?://[^/\s]+", base_url):
                problems.append(f"{path}.base_url: must start with http:// or https:// and name a host")
            base_url = base_url.rstrip("/")
        elif ptype not in NO_BASE_URL_TYPES and not p.get("preset"):
            problems.append(f"{path}.base_url: required for type {ptype}")
        preset = p.get("preset")
        if ptype == "openai" and preset is not None and (not isinstance(preset, str) or preset not in PRESETS):
            problems.append(f"{path}.preset: unknown preset {str(preset)[:40]!r} "
                            f"(known: {', '.join(sorted(PRESETS))})")
        if ptype == "azure" and p.get("api_version") is not None:
            av = p["api_version"]
            av = av.isoformat() if hasattr(av, "isoformat") else av  # YAML reads 2024-10-21 as a date
            if not isinstance(av, str) or not re.match(r"^(\d{4}-\d{2}-\d{2}(-preview)?|v1)$", av):
                problems.append(f"{path}.api_version: must be an Azure API version like 2024-10-21, "
                                "2025-04-01-preview, or v1")
            else:
                p = {**p, "api_version": av}
        headers_raw = _mapping(p.get("headers"), f"{path}.headers", problems)
        headers: dict[str, str] = {}
        for hk, hv in headers_raw.items():
            hname = str(hk)
            hpath = f"{path}.headers.{hname}" if _TOKEN.fullmatch(hname) else f"{path}.headers.{hname[:60]!r}"
            name_problem = _header_name_problem(hname)
            if name_problem is not None:
                problems.append(f"{hpath}: {name_problem}")
            elif not isinstance(hv, (str, int, float)) or isinstance(hv, bool):
                problems.append(f"{hpath}: must be a string")
            elif "\n" in str(hv) or "\r" in str(hv):
                problems.append(f"{hpath}: must not contain line breaks")
            elif str(hv).startswith(ENC_PREFIX):
                problems.append(f"{hpath}: {_ENC_PROBLEM}")
            else:
                headers[hname] = str(hv)
        proxy = r.string(p, "proxy", path)
        if proxy is not None and not re.match(r"^(https?|socks5h?)://[^/\s]+", proxy):
            problems.append(f"{path}.proxy: must be http://, https://, socks5:// or socks5h:// with a host")
        elif proxy is not None and not _valid_port(proxy):
            problems.append(f"{path}.proxy: invalid port (use scheme://[user:password@]host:port)")
        options = {k: v for k, v in p.items()
                   if k not in {"name", "type", "api_key", "base_url", "headers", "proxy"} | RESILIENCE_KEYS}
        problems += [f"{path}.{problem}" for problem in check_options(ptype, options)]
        api_key = p.get("api_key")
        if api_key is not None and not isinstance(api_key, str):
            problems.append(f"{path}.api_key: must be a string")
            api_key = None
        if isinstance(api_key, str) and api_key.startswith(ENC_PREFIX):
            # What the store writes encrypted values as: a real key never looks like it, and storing one would
            # make the row unreadable (with a key) or read back as an undecryptable one (without).
            problems.append(f"{path}.api_key: {_ENC_PROBLEM}")
        listed = p.get("api_keys")
        for i, item in enumerate(listed if isinstance(listed, list) else ()):
            key = item.get("key") if isinstance(item, dict) else item
            if isinstance(key, str) and key.startswith(ENC_PREFIX):
                problems.append(f"{path}.api_keys[{i}]{'.key' if isinstance(item, dict) else ''}: {_ENC_PROBLEM}")
        resilience = _build_resilience(p, path, r, problems)
        if name and name not in out:
            out[name] = ProviderConfig(name=name, type=ptype, api_key=api_key or None, base_url=base_url,
                                       headers=headers, proxy=proxy, options=options, **resilience)
    return out


def _build_resilience(p: dict[str, Any], path: str, r: _Reader, problems: list[str]) -> dict[str, Any]:
    """A provider's resilience keys (api_keys, key_strategy, cooldown, retries, breaker, max_concurrency)."""
    out: dict[str, Any] = {}
    keys: list[WeightedKey] = []
    for i, item in enumerate(_sequence(p.get("api_keys"), f"{path}.api_keys", problems)):
        ipath = f"{path}.api_keys[{i}]"
        if isinstance(item, str) and item:
            keys.append(WeightedKey(item))
        elif isinstance(item, dict):
            _unknown_keys(item, frozenset({"key", "weight"}), ipath, problems)
            key = item.get("key")
            if not isinstance(key, str) or not key:
                problems.append(f"{ipath}.key: required, a non-empty string")
                continue
            keys.append(WeightedKey(key, r.integer(item, "weight", ipath, 1, 1, 1000)))
        else:
            problems.append(f"{ipath}: must be a key (a string) or {{key, weight}}")
    if len({k.key for k in keys}) != len(keys):
        problems.append(f"{path}.api_keys: the same key is listed twice")
    out["api_keys"] = tuple(keys)
    out["key_strategy"] = r.string(p, "key_strategy", path, "round-robin", KEY_STRATEGIES) or "round-robin"
    cd_off = p.get("cooldown") is False or p.get("cooldown") == "off"
    cd = {} if cd_off else _mapping(p.get("cooldown"), f"{path}.cooldown", problems)
    _unknown_keys(cd, COOLDOWN_KEYS, f"{path}.cooldown", problems)
    initial = r.duration(cd, "initial", f"{path}.cooldown", 1.0, positive=True)
    out["cooldown"] = CooldownConfig(initial=initial,
                                     max=max(initial, r.duration(cd, "max", f"{path}.cooldown", 60.0, positive=True)),
                                     failures=r.integer(cd, "failures", f"{path}.cooldown", 3, 1, 10**6),
                                     enabled=not cd_off)
    br_off = p.get("breaker") is False or p.get("breaker") == "off"
    br = {} if br_off else _mapping(p.get("breaker"), f"{path}.breaker", problems)
    _unknown_keys(br, BREAKER_KEYS, f"{path}.breaker", problems)
    ratio = br.get("failure_ratio")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1):
        problems.append(f"{path}.breaker.failure_ratio: must be a number in (0, 1], e.g. 0.5")
        ratio = None
    out["breaker"] = BreakerConfig(
        failures=r.integer(br, "failures", f"{path}.breaker", 5, 1, 10**6),
        failure_ratio=float(ratio) if ratio is not None else None,
        window=r.duration(br, "window", f"{path}.breaker", 60.0, positive=True),
        min_requests=r.integer(br, "min_requests", f"{path}.breaker", 20, 1, 10**6),
        open_for=r.duration(br, "open_for", f"{path}.breaker", 30.0, positive=True),
        enabled=not br_off)
    out.update(_retry_keys(p, path, r))
    if p.get("max_concurrency") is not None:
        out["max_concurrency"] = r.integer(p, "max_concurrency", path, 0, 1, 10**6) or None
    out["queue_timeout"] = r.duration(p, "queue_timeout", path, 5.0)
    return out


def _retry_keys(d: dict[str, Any], path: str, r: _Reader) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if d.get("retries") is not None:
        out["retries"] = r.integer(d, "retries", path, 0, 0, 20)
    for key in ("retry_backoff", "retry_backoff_max"):
        if d.get(key) is not None:
            out[key] = r.duration(d, key, path, 0.0)
    return out


def _build_routes(raw: Any, r: _Reader, problems: list[str], providers: Mapping[str, ProviderConfig],
                  default_timeout: float, paths: list[str] | None = None) -> dict[str, Route]:
    out: dict[str, Route] = {}
    for i, rt in enumerate(_sequence(raw, "routes", problems)):
        path = paths[i] if paths is not None else f"routes[{i}]"
        if not isinstance(rt, dict):
            problems.append(f"{path}: must be a mapping with name and steps")
            continue
        _unknown_keys(rt, ROUTE_KEYS, path, problems)
        name = r.string(rt, "name", path)
        if not name:
            problems.append(f"{path}.name: required")
        elif name in out:
            problems.append(f"{path}.name: duplicate route name {name!r}")
        elif not _header_safe(name):
            problems.append(f"{path}.name: {name!r} has spaces at its ends or control characters (it is sent "
                            "back in the x-gateway-route header)")
        steps: list[Step] = []
        raw_steps = _sequence(rt.get("steps"), f"{path}.steps", problems)
        if not raw_steps:
            problems.append(f"{path}.steps: a route needs at least one step")
        for j, s in enumerate(raw_steps):
            spath = f"{path}.steps[{j}]"
            if not isinstance(s, dict):
                problems.append(f"{spath}: must be a mapping with provider and model")
                continue
            _unknown_keys(s, STEP_KEYS, spath, problems)
            prov = r.string(s, "provider", spath)
            if not prov:
                problems.append(f"{spath}.provider: required")
            elif prov not in providers:
                close = difflib.get_close_matches(prov, list(providers), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                problems.append(f"{spath}.provider: unknown provider {prov!r}{hint}")
            model = r.string(s, "model", spath)
            if not model:
                problems.append(f"{spath}.model: required")
            elif not _header_safe(model):
                problems.append(f"{spath}.model: {model!r} has spaces at its ends or control characters (it is "
                                "sent back in the x-gateway-model header)")
            timeout = r.duration(s, "timeout", spath, default_timeout)
            if timeout <= 0:
                problems.append(f"{spath}.timeout: must be greater than zero")
            cr = r.string(s, "conflict_resolution", spath, None, CONFLICT_MODES)
            price = _build_price(s["price"], f"{spath}.price", problems) if s.get("price") is not None else None
            wait = r.duration(s, "wait_for_key", spath, 0.0)
            if wait > MAX_WAIT_FOR_KEY:
                problems.append(f"{spath}.wait_for_key: at most {MAX_WAIT_FOR_KEY:g}s (a longer wait holds the client; "
                                "let the route fall through instead)")
                wait = 0.0
            hedge = (r.duration(s, "hedge_after", spath, 0.0, positive=True)
                     if s.get("hedge_after") is not None else None)
            if hedge is not None and j == len(raw_steps) - 1:
                problems.append(f"{spath}.hedge_after: the last step has no next step to start")
                hedge = None
            steps.append(Step(provider=prov or "", model=model or "", timeout=timeout, conflict_resolution=cr,
                              price=price, wait_for_key=wait, hedge_after=hedge, **_retry_keys(s, spath, r)))
        route_limits = None
        if rt.get("limits") is not None:
            lraw = _mapping(rt.get("limits"), f"{path}.limits", problems)
            _unknown_keys(lraw, ROUTE_LIMITS_KEYS, f"{path}.limits", problems)
            route_limits = _build_limits(lraw, f"{path}.limits", r)
            if not route_limits.any():
                route_limits = None
        if name and name not in out:
            out[name] = Route(name=name, steps=tuple(steps), limits=route_limits)
    return out


def find_config(explicit: str | None, env: Mapping[str, str] | None = None) -> Path:
    """``--config``, else ``$AT_GATEWAY_CONFIG``, else ./config.yaml, else /etc/at-gateway/config.yaml."""
    env = os.environ if env is None else env
    if explicit:
        return Path(explicit)
    if env.get("AT_GATEWAY_CONFIG"):
        return Path(env["AT_GATEWAY_CONFIG"])
    for loc in DEFAULT_LOCATIONS:
        if Path(loc).is_file():
            return Path(loc)
    raise ConfigError("config", [
        "no configuration file found: pass --config PATH, set AT_GATEWAY_CONFIG, "
        "or create ./config.yaml or /etc/at-gateway/config.yaml (see config.yaml.example)"])


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    import yaml

    p = Path(path)
    source = str(p)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", "") or exc
        raise ConfigError(source, [f"cannot read the file: {exc.__class__.__name__}: {reason}"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(source, [f"{where}{problem}"]) from None
    return build_config(raw, source, env)
