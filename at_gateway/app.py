"""The gateway application: endpoints, authentication, and the request log.

Built once from a validated :class:`Config`; holds every long-lived object
(upstream pools, providers, router, redactor) so nothing is allocated per
request that could be allocated once.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import time
from fnmatch import fnmatchcase
from typing import Any, NamedTuple
from urllib.parse import unquote_to_bytes

from .config import Config, Route, Step, _header_safe
from .context import RequestContext
from .cors import CORSPolicy
from .doors import build_doors
from .errors import AdminDisabled, BadRequest, Forbidden, GatewayError, MethodNotAllowed, NotFound, Unauthorized
from .http.pool import UpstreamClient
from .http.server import ClientGone, Request, Responder
from .logs import Redactor, access_log, quote
from .providers import build_provider
from .providers.base import Provider
from .resilience.targets import build_targets, primary
from .routing import Router
from .services import Services
from .store.prices import Pricing
from .usage import UsageMeter

_JSON_CT = (b"content-type", b"application/json")
_HEALTH = b'{"status":"healthy"}'

MAX_JSON_DEPTH = 128
"""The deepest nesting a chat body may have. Far beyond real requests (tool schemas included) and far
below the depth where json's C encoder or an adapter's recursion would fail further down the stack:
a body accepted at the door can be encoded again by every adapter."""

# What 401s say: OpenAI's wording, which clients (litellm, SDKs) classify errors by. Never the key.
_NO_KEY = ("You didn't provide an API key. Send it as an X-Api-Key header (X-Api-Key: KEY) or with "
           "Bearer auth (Authorization: Bearer KEY).")
_BAD_KEY = ("Incorrect API key provided. Send a key this gateway is configured with (api_key/api_keys) as "
            "X-Api-Key: KEY or Authorization: Bearer KEY.")
_WWW_AUTH = (b"www-authenticate", b'Bearer realm="at-gateway"')  # RFC 9110 §11.6.1: every 401 names a scheme

# Client endpoint kinds (see Gateway._endpoint).
_CHAT, _MODELS, _MODEL, _HEALTH_EP, _KEY, _DOOR, _METRICS = range(7)
_MODEL_PREFIXES = (b"/v1/models/", b"/models/")
_GET_HEAD = frozenset((b"GET", b"HEAD"))  # HEAD is GET without the body (RFC 9110 §9.3.2); the server drops it
_ADMIN_PREFIX = b"/admin/api/"
# The admin door's security headers on its "off" answer too (the door itself adds them to everything else).
_ADMIN_OFF_HEADERS = ((b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
                      (b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
                      (b"referrer-policy", b"no-referrer"), (b"cache-control", b"no-store"))
_PAGE_PREFIX = b"/admin/"  # the dashboard (its files, login and logout); /admin redirects there
_METRICS_CT = (b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
# Gemini's native methods, the part after the model in /v1beta/models/{model}:{method} (also under /v1/models/).
_GEMINI_METHODS = (b":generateContent", b":streamGenerateContent", b":countTokens")
_GEMINI_PREFIXES = (b"/v1beta/models/", b"/v1/models/", b"/models/")
_RESPONSES_PREFIXES = (b"/v1/responses/", b"/responses/")


# OpenAI's reasoning models refuse max_tokens and take max_completion_tokens instead; a key's max_tokens cap
# fills that field on routes whose openai/azure steps are such models (see Gateway._token_fields).
_COMPLETION_TOKENS_MODEL = re.compile(r"(o\d|gpt-5)")
_COMPLETION_TOKENS_TYPES = frozenset(("openai", "azure"))
_TOKEN_FIELDS = ("max_completion_tokens", "max_tokens")
_MAX_KEY_VIEWS = 4096  # cached per-key route sets; past it the cache starts over (keys are few)
MAX_MODELS = 10  # a request's "models" fallback list at most this long


class _KeyView(NamedTuple):
    """What a client key with ``routes`` may see, built once per key (and again after a key reload)."""

    key: Any  # the ClientKey it was built for: the cache makes new ones on reload, so identity says current
    allowed: frozenset[str]  # route names matching its patterns
    models_body: bytes  # GET /v1/models for it


class _Endpoint(NamedTuple):
    """A client endpoint: its kind, the methods it answers, and their Allow header for a 405; for a front
    door, which door and which of its operations."""

    kind: int
    methods: frozenset[bytes]
    allow: bytes
    door: Any = None
    op: str = ""


_CONTAINERS = frozenset((dict, list))  # what json decodes containers to
# Deeper than MAX_JSON_DEPTH takes an opening and a closing bracket per level: shorter texts need no check.
_DEPTH_MIN_TEXT = 2 * MAX_JSON_DEPTH + 1
# Up to here counting brackets first is cheaper than the walk; beyond, the walk (per value) beats the count
# (per character) on real conversations, which always have more brackets than the limit.
_DEPTH_COUNT_TEXT = 16 * 1024
# Where a body could hold a surrogate escape (backslash, u, d or D). One precompiled search: a substring
# test for it is several times slower on bodies with many escapes (newlines) followed by common letters.
_SURROGATE_HINT = re.compile(r"\\u[dD][89a-fA-F]")  # D800-DFFF; not the Hangul syllables D000-D7FF


def _header_text(text: str) -> bytes:
    """A header value from free text: printable ASCII only, at most 512 bytes, no leading or trailing space
    (RFC 9110 §5.5: a field value cannot end in whitespace, and h11 refuses to send one that does)."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:512].strip().encode()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def _finite_float(text: str) -> float:
    """A JSON number as a float; one too large for a float (``1e999``) would go upstream as ``Infinity``."""
    value = float(text)
    if value - value != 0.0:  # inf (nan cannot come from a JSON number)
        raise ValueError(f"the number {text[:40]} is out of range for a double (RFC 8259 §6)")
    return value


def _too_deep(obj: Any, limit: int) -> bool:
    """Whether decoded JSON nests more than ``limit`` containers deep.

    Level by level, without recursion (nothing to overflow) and without a tuple per node: it runs on
    every long conversation (more brackets than the limit), so it is kept to one type lookup per value.
    """
    level = [obj] if type(obj) in _CONTAINERS else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below: list[Any] = []
        add = below.append
        for node in level:
            for v in node.values() if type(node) is dict else node:
                if type(v) in _CONTAINERS:
                    add(v)
        level = below
    return False


def _has_lone_surrogate(obj: Any) -> bool:
    """Whether a decoded string (or key) holds an unpaired surrogate, which no UTF-8 encoder accepts."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class Gateway:
    def __init__(self, config: Config, client: UpstreamClient | None = None,
                 redactor: Redactor | None = None, usage: UsageMeter | None = None,
                 services: Services | None = None) -> None:
        self.config = config
        # The store, the client-key cache and the limiter: built once per process, kept across reloads.
        self.services = services or Services()
        self.pricing = Pricing(config)
        self.redact = redactor or Redactor(config.secrets())
        self.client = client or UpstreamClient(config.upstream)
        reloaded = client is not None  # a reload passes the running client: keys refused with 401 get a new chance
        self.providers: dict[str, Provider] = {
            name: build_provider(primary(pc), self.client) for name, pc in config.providers.items()}
        # Cooldowns and circuits outlive this gateway (a reload) and are shared by the workers of the machine.
        if self.services.shared is None:
            from .resilience.state import SharedState

            self.services.shared = SharedState(shared=False)
        self.targets = build_targets(config.providers, self.client, self.services.shared, self.providers,
                                     reloaded=reloaded)
        # Built now, not on first use: serving must import nothing more from the .pyz, which a deploy
        # may replace under a process that is still draining.
        for pc in config.providers.values():
            if pc.proxy:
                self.client.connector(pc.proxy)
        self.router = Router(config.routes, self.targets, self.redact, config.stream_idle_timeout,
                             config.stream_keepalive_interval, clock=self.services.clock)
        self.usage = usage or UsageMeter()  # outlives config reloads
        self.log = logging.getLogger("at_gateway.access")
        self._keys = [k.encode() for k in config.api_keys]
        created = int(time.time())
        # OpenAI's model objects, with Anthropic's fields beside them (type, display_name, created_at; has_more,
        # first_id, last_id): Claude Code's gateway model discovery reads this same list.
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
        models = [{"id": name, "object": "model", "created": created, "owned_by": "at-gateway",
                   "type": "model", "display_name": name, "created_at": stamp, "lifecycle": "active"}
                  for name in config.routes]
        self._models_body = json.dumps(self._listing(models), separators=(",", ":")).encode()
        # GET /v1/models/{id}: one answer per route, encoded once. A client key with routes sees only those.
        self._model_bodies = {m["id"]: json.dumps(m, separators=(",", ":")).encode() for m in models}
        self._models = models
        self._key_views: dict[str, _KeyView] = {}
        self._direct: dict[str, Route] = {}  # allow_direct: provider/model routes, made on first use
        self._unenforced: set[str] = set()  # routes whose limits no limiter applies (warned once)
        self._token_fields = self._token_field_per_route(config)
        # The client endpoints. Only these ever get CORS: an admin API must get a table of its own.
        chat = _Endpoint(_CHAT, frozenset((b"POST",)), b"POST")
        listing = _Endpoint(_MODELS, _GET_HEAD, b"GET, HEAD")
        self._endpoints = {b"/v1/chat/completions": chat, b"/chat/completions": chat,
                           b"/v1/models": listing, b"/models": listing,
                           b"/health": _Endpoint(_HEALTH_EP, _GET_HEAD, b"GET, HEAD")}
        key_info = _Endpoint(_KEY, _GET_HEAD, b"GET, HEAD")  # GET /v1/key: the caller's own limits and usage
        self._endpoints[b"/v1/key"] = self._endpoints[b"/key"] = key_info
        self._model_endpoint = _Endpoint(_MODEL, _GET_HEAD, b"GET, HEAD")
        # The other front doors (at_gateway.doors): each API format's paths, onto the same routes.
        self.doors = build_doors(config)
        post = frozenset((b"POST",))
        d = self.doors
        door_paths = {
            (b"/v1/messages",): _Endpoint(_DOOR, post, b"POST", d["anthropic"], "messages"),
            (b"/v1/messages/count_tokens",): _Endpoint(_DOOR, post, b"POST", d["anthropic"], "count_tokens"),
            (b"/v1/responses", b"/responses"): _Endpoint(_DOOR, post, b"POST", d["responses"], "create"),
            (b"/v1/embeddings", b"/embeddings"): _Endpoint(_DOOR, post, b"POST", d["embeddings"], "create"),
            (b"/v1/completions", b"/completions"): _Endpoint(_DOOR, post, b"POST", d["completions"], "create"),
        }
        for paths, door_ep in door_paths.items():
            for p in paths:
                self._endpoints[p] = door_ep
        self._gemini_endpoints = {m: _Endpoint(_DOOR, post, b"POST", d["gemini"], m[1:].decode())
                                  for m in _GEMINI_METHODS}
        self._gemini_unknown = _Endpoint(_DOOR, frozenset((b"GET", b"HEAD", b"POST")), b"GET, HEAD, POST",
                                         d["gemini"], "")
        self._response_endpoint = _Endpoint(_DOOR, frozenset((b"GET", b"HEAD", b"DELETE")), b"GET, HEAD, DELETE",
                                            d["responses"], "item")
        self._cors = None if config.cors is None else CORSPolicy(
            config.cors, {ep.allow for ep in (*self._endpoints.values(), self._model_endpoint,
                                              self._response_endpoint, self._gemini_unknown)})
        # base_path: every endpoint below it; None (no prefix) costs the request path nothing.
        self._base = config.base_path.encode() if config.base_path else None
        self._admin: Any = None  # the admin door (scripts, the dashboard), when an admin token or forward auth is set
        if config.admin.enabled:
            # Imported now, not on first use: serving must import nothing more from the .pyz (see above).
            from .admin.api import AdminAPI

            self._admin = AdminAPI(self)
        # Built once: json.loads with options would build a decoder per call.
        self._json_decode = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float).decode

    async def aclose(self) -> None:
        for target in self.targets.values():
            for adapter in target.adapters:
                await adapter.aclose()
        await self.client.aclose()

    # -- helpers ------------------------------------------------------------
    def _authenticate(self, request: Request, ctx: RequestContext | None = None, google: bool = False) -> str:
        """Return the caller's identity (the key's index, or a store key's id; ``ctx.key`` is then that
        key), or raise 401.

        A non-empty X-Api-Key wins: Authorization is then not looked at, whatever it holds (an SDK may
        send its own). An empty X-Api-Key counts as absent. ``google``: Gemini's ``x-goog-api-key``
        header and ``?key=`` query parameter count too, after those two.
        """
        presented = request.header(b"x-api-key")
        if not presented:
            auth = request.header(b"authorization")
            if auth is not None and auth[:7].lower() == b"bearer ":
                presented = auth[7:].strip()
        if not presented and google:
            presented = request.header(b"x-goog-api-key")
            if not presented and b"key=" in request.query:
                for pair in request.query.split(b"&"):
                    if pair.startswith(b"key="):
                        presented = unquote_to_bytes(pair[4:].replace(b"+", b" "))
                        break
        if not presented:
            raise Unauthorized(_NO_KEY, headers=[_WWW_AUTH])
        found = -1
        for i, key in enumerate(self._keys):  # no early exit: constant time over the key list
            if hmac.compare_digest(presented, key) and found < 0:
                found = i
        if found < 0:
            keys = self.services.keys
            if keys is not None:
                client_key = keys.verify(presented)  # raises 401 saying expired / disabled / revoked / unknown
                if client_key is not None:
                    if ctx is not None:
                        ctx.key = client_key
                    return client_key.id
            raise Unauthorized(_BAD_KEY, headers=[_WWW_AUTH])
        return f"key{found}"

    @staticmethod
    def _request_id(request: Request) -> str:
        rid = request.header(b"x-request-id")
        if rid and len(rid) <= 128 and rid.isascii() and rid.replace(b"-", b"").replace(b"_", b"").replace(
                b".", b"").replace(b":", b"").isalnum():
            return rid.decode()
        return os.urandom(12).hex()

    # -- dispatch -----------------------------------------------------------
    async def handle(self, request: Request, responder: Responder) -> None:
        ctx = RequestContext(self._request_id(request), method=request.method.decode("latin-1"),
                             path=request.path.decode("latin-1"))
        services = self.services
        metrics = services.metrics
        if metrics is not None:
            metrics.started(ctx)  # in flight until finish()
        in_flight = services.in_flight
        in_flight[id(ctx)] = ctx
        try:
            if self._base is not None:
                self._strip_base(request)
            if self._cors is not None and (ep := self._endpoint(request.path)) is not None:
                origin = request.header(b"origin")
                if (origin is not None and request.method == b"OPTIONS"
                        and request.header(b"access-control-request-method") is not None):
                    await self._preflight(ctx, self._cors, origin, ep, request, responder)
                    return
                responder = self._cors.wrap(responder, origin)  # errors below carry the headers too
            await self._dispatch(ctx, request, responder)
        except GatewayError as exc:
            ctx.status = exc.status
            ctx.error = exc.message
            if not responder.started:
                if ctx.door is None:
                    await responder.send_json(exc.status, exc.to_body(), [*exc.headers, *ctx.gateway_headers()])
                else:  # the door's own error shape (and status mapping: Anthropic's 529 overloaded_error)
                    ctx.status, body = ctx.door.error_body(exc)
                    await responder.send_json(ctx.status, body, [*exc.headers, *ctx.gateway_headers()])
        except ClientGone:
            raise
        except Exception as exc:  # a bug: the server answers 500 and logs it; the request line must agree
            if not responder.started:
                ctx.status = 500
            ctx.error = f"internal error: {exc.__class__.__name__}"
            if ctx.door is None or responder.started:
                raise
            # At a front door the 500 is in the door's own shape (its SDK reads it), logged as the server would.
            logging.getLogger("at_gateway.server").error("unhandled error in handler", exc_info=exc)
            ctx.status, body = ctx.door.error_body(GatewayError("internal error"))
            await responder.send_json(ctx.status, body, [(b"x-request-id", ctx.request_id.encode())])
        finally:
            if ctx.status == 0:
                ctx.status = responder.status or 499  # 499: the client went away first
            if not responder.finished and ctx.error is None:
                ctx.error = "client disconnected before the response ended"
            in_flight.pop(id(ctx), None)
            self.finish(ctx, request)

    def _strip_base(self, request: Request) -> None:
        """Serve ``{base_path}/...`` as ``/...`` (the log keeps the full path); 404 for anything outside it."""
        base = self._base
        assert base is not None
        path = request.path
        if path.startswith(base) and (len(path) == len(base) or path[len(base)] == 0x2F):  # "/"
            request.path = path[len(base):] or b"/"
            return
        shown = quote(self.redact, f"{request.method.decode('latin-1')} {path.decode('latin-1')}", 200)
        raise NotFound(f"no such endpoint: {shown} (this gateway serves under {self.config.base_path}/)",
                       code="unknown_url")

    def _endpoint(self, path: bytes) -> _Endpoint | None:
        """The client endpoint at ``path``; None for any other path (which never gets CORS)."""
        ep = self._endpoints.get(path)
        if ep is not None:
            return ep
        if path.startswith(_GEMINI_PREFIXES) and path.endswith(_GEMINI_METHODS):
            # POST .../models/{model}:generateContent; a route named "x:generateContent" is still GET-able
            return self._gemini_endpoints[path[path.rindex(b":"):]]
        if path.startswith(b"/v1beta/"):  # Gemini's API root: whatever else is asked there, a Google-shaped 404
            return self._gemini_unknown
        if path.startswith(_MODEL_PREFIXES):
            return self._model_endpoint
        if path.startswith(_RESPONSES_PREFIXES):
            return self._response_endpoint
        return None

    async def _dispatch(self, ctx: RequestContext, request: Request, responder: Responder) -> None:
        path = request.path
        ep = self._endpoint(path)
        if ep is None and path == b"/metrics":  # not a client endpoint: no CORS, not logged
            ep = _Endpoint(_METRICS, _GET_HEAD, b"GET, HEAD")
        if ep is None and (path.startswith(_PAGE_PREFIX) or path == b"/admin"):
            if self._admin is None:
                ctx.unlogged = True
                raise AdminDisabled("the admin API is off: set admin_token (or admin_tokens, or admin.forward_auth) "
                                    "in the config to enable it", headers=list(_ADMIN_OFF_HEADERS))
            if path.startswith(_ADMIN_PREFIX):
                await self._admin.handle(ctx, request, responder)
            else:
                await self._admin.page(ctx, request, responder)  # the dashboard: not in the request log either
            return
        if ep is None:
            shown = quote(self.redact, f"{request.method.decode('latin-1')} {path.decode('latin-1')}", 200)
            raise NotFound(f"no such endpoint: {shown}", code="unknown_url")
        if ep.door is not None:
            ctx.door = ep.door  # every error from here on in the door's own shape
        if request.method not in ep.methods:
            raise MethodNotAllowed(f"{request.method.decode('latin-1')} is not allowed here; use "
                                   f"{ep.allow.decode()}", headers=[(b"allow", ep.allow)])
        kind = ep.kind
        if kind == _METRICS:
            ctx.unlogged = True  # scrapes are not requests of the gateway's users: not logged, not counted
            metrics = self.services.metrics
            if metrics is None:
                raise NotFound("metrics are off: set metrics.enabled: true in the config", code="unknown_url")
            metrics.authorize(request)  # raises 401 when metrics.username/password or an admin token is wanted
            ctx.status = 200
            await responder.send(200, [_METRICS_CT], metrics.render(self))
            return
        if kind == _CHAT:
            ctx.client = self._authenticate(request, ctx)
            await self.chat(ctx, request, responder)
            return
        if kind == _DOOR:
            door = ep.door
            ctx.client = self._authenticate(request, ctx, google=door.google_keys)  # before a 404: no probing
            if not ep.op:
                shown = quote(self.redact, f"{request.method.decode('latin-1')} {path.decode('latin-1')}", 200)
                raise NotFound(f"no such endpoint: {shown} (this gateway serves generateContent, "
                               "streamGenerateContent and countTokens)", code="unknown_url")
            await door.serve(self, ctx, request, responder, ep.op)
            return
        if kind == _KEY:
            ctx.client = self._authenticate(request, ctx)
            body = await self.key_info(ctx)
            if ctx.key is not None and self.services.limiter is not None:
                await self.services.limiter.peek(ctx)  # the x-ratelimit-* headers of every answer to a limited key
        elif kind == _HEALTH_EP:
            body = _HEALTH
        else:
            ctx.client = self._authenticate(request, ctx)  # before the lookup: no probing for route names
            key = ctx.key
            if kind == _MODELS:
                body = self._models_body if key is None or not key.routes else self._key_view(key).models_body
            else:
                body = self._model_body(path, key)
            if key is not None and self.services.limiter is not None:
                await self.services.limiter.peek(ctx)  # the x-ratelimit-* headers of every answer to a limited key
        ctx.status = 200
        # For HEAD the responder writes this head (with the GET body's Content-Length) and no body.
        await responder.send(200, [_JSON_CT, (b"x-request-id", ctx.request_id.encode()), *ctx.extra_headers], body)

    async def key_info(self, ctx: RequestContext) -> bytes:
        """``GET /v1/key``, authenticated with the key itself: its limits, what it used and what is left
        (OpenRouter's /api/v1/key), so an application can pace itself. Never the key or its hash."""
        limiter = self.services.limiter
        if limiter is not None:
            info = await limiter.describe(ctx)
        else:  # no limit can apply here (no store file, no route limits)
            key = ctx.key
            info = {"object": "key", "id": ctx.client, "name": getattr(key, "name", None),
                    "operator": key is None, "limits": {}, "usage": {}}
        return json.dumps(info, separators=(",", ":")).encode()

    def _model_body(self, path: bytes, key: Any = None) -> bytes:
        """The model object of ``/v1/models/{id}``: the rest of the path, percent-decoded, is the id
        (route names may hold '/', sent raw or as %2F). A route a client key may not use is not found
        for it, as it is not listed for it."""
        raw = unquote_to_bytes(path.partition(b"/models/")[2])
        try:
            name = raw.decode("utf-8")
            body = self._model_bodies.get(name)
        except UnicodeDecodeError:
            body = None
        if body is not None and key is not None and key.routes and name not in self._key_view(key).allowed:
            body = None
        if body is None:
            shown = quote(self.redact, raw.decode("utf-8", "replace"), 200)
            raise NotFound(f"the model {shown!r} does not exist (no route of that name; GET /v1/models lists them)",
                           code="model_not_found")
        return body

    async def _preflight(self, ctx: RequestContext, cors: CORSPolicy, origin: bytes, ep: _Endpoint,
                         request: Request, responder: Responder) -> None:
        """A CORS preflight: no key needed (browsers send none); 204, or 403 for an origin not allowed."""
        headers = cors.preflight_headers(origin, ep.allow, request.header(b"access-control-request-headers"))
        if headers is None:
            raise Forbidden(f"the origin {quote(self.redact, origin.decode('latin-1'), 200)!r} is not allowed "
                            "(cors.allow_origins)",
                            code="origin_not_allowed", headers=list(cors.vary_only))
        ctx.status = 204
        # start/end, not send: a 204 has no Content-Length (RFC 9110 §8.6) and no body.
        await responder.start(204, [*headers, (b"x-request-id", ctx.request_id.encode())])
        await responder.end()

    def decode_body(self, raw: bytes) -> Any:
        """The JSON body, or 400 ``invalid_json`` for anything that can't be decoded, however it fails, or
        that no upstream could be sent: nesting deeper than :data:`MAX_JSON_DEPTH`, NaN/Infinity, and
        strings with an unpaired surrogate. The two extra checks run only when the raw text could hold
        what they look for (more brackets than the limit; a ``\\uD`` escape), so common bodies pay a few
        C-speed scans."""
        try:
            # json.loads(bytes), but strict: it would let raw UTF-8-encoded surrogates through (surrogatepass).
            text = raw.decode(json.detect_encoding(raw))
            body = self._json_decode(text)
        except RecursionError:
            raise BadRequest(f"request body is not valid JSON: nested deeper than {MAX_JSON_DEPTH} levels",
                             code="invalid_json") from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity, integers too long
            raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
        except Exception as exc:  # whatever else decoding raises is the body's fault, never a traceback
            raise BadRequest(f"request body is not valid JSON ({exc.__class__.__name__})",
                             code="invalid_json") from None
        if len(text) > _DEPTH_MIN_TEXT and (len(text) > _DEPTH_COUNT_TEXT or text.count("[") + text.count("{")
                                            > MAX_JSON_DEPTH) and _too_deep(body, MAX_JSON_DEPTH):
            raise BadRequest(f"request body is not valid JSON: nested deeper than {MAX_JSON_DEPTH} levels",
                             code="invalid_json")
        if _SURROGATE_HINT.search(text) is not None and _has_lone_surrogate(body):
            raise BadRequest("request body is not valid JSON: a string holds an unpaired UTF-16 surrogate escape "
                             "(such as \\ud800), which is not Unicode text and cannot be sent upstream; a character "
                             "beyond U+FFFF is written as a pair (\\ud83d\\ude00)", code="invalid_json")
        return body

    def parse_chat(self, request: Request) -> dict[str, Any]:
        body = self.decode_body(request.body)
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object", code="invalid_json")
        model = body.get("model")
        models = body.get("models")
        if models is not None:
            if (not isinstance(models, list) or not models or len(models) > MAX_MODELS
                    or not all(isinstance(m, str) and m for m in models)):
                raise BadRequest(f"'models' must be a list of 1 to {MAX_MODELS} model names (routes), tried in order",
                                 code="invalid_models")
            if model is not None and (not isinstance(model, str) or not model):
                raise BadRequest("'model' must be a string", code="missing_model")
        elif not isinstance(model, str) or not model:
            raise BadRequest("'model' is required and must be a string", code="missing_model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' is required and must be a non-empty array", code="invalid_messages")
        if "stream" in body and not isinstance(body["stream"], bool) and body["stream"] is not None:
            raise BadRequest("'stream' must be true or false", code="invalid_stream")
        return body

    async def chat(self, ctx: RequestContext, request: Request, responder: Responder) -> None:
        limiter = self.services.limiter
        try:
            body = self.parse_chat(request)
            route = self._route_for(ctx, body)
            ctx.route = route.name
            if ctx.key is not None:
                body = self.apply_key(ctx, route, body)
        except GatewayError:
            if ctx.key is not None and limiter is not None:
                await limiter.peek(ctx)  # a limited key's headers on this answer too; nothing is counted
            raise
        if limiter is not None:
            await limiter.admit(ctx, route, body)  # 429s raise here; sets ctx.extra_headers
        elif route.limits is not None and route.name not in self._unenforced:
            # No limiter was built at start (nothing could be limited then): a reload added this route's
            # limits, which only a restart can enforce. Said once, not silently ignored.
            self._unenforced.add(route.name)
            logging.getLogger("at_gateway.limits").warning(
                "route %r has limits, but they are not enforced: the gateway started without any limit to "
                "apply (restart it to apply them)", route.name)
        if body.get("stream"):
            ctx.stream = True
            await self.router.stream(ctx, route, body, responder)
            return
        result = await self.router.complete(ctx, route, body)
        ctx.status = 200
        await responder.send(200, [_JSON_CT, *ctx.gateway_headers()], result.body)
        ctx.first_byte = time.perf_counter()

    async def run_call(self, ctx: RequestContext, call: Any, responder: Responder) -> None:
        """A front door's request through the same route, key, limits, steps and log as chat (``call``: an
        at_gateway.doors.base.Call); answered in the door's format."""
        limiter = self.services.limiter
        door = call.door
        try:
            route = self.config.routes.get(call.model) if ctx.key is None else None
            if route is None:
                route = self._named_route(ctx, call.model)
            ctx.route = route.name
            key = ctx.key
            if key is not None:
                if door.chat_form:
                    call.chat = self.apply_key(ctx, route, call.chat)
                elif key.routes and not self._may_use(key, route.name):
                    self._named_route(ctx, route.name)  # raises 403 model_not_allowed
                if key.system_prompt or key.max_tokens is not None:
                    door.constrain(call, key.system_prompt, key.max_tokens)
        except GatewayError:
            if ctx.key is not None and limiter is not None:
                await limiter.peek(ctx)
            raise
        if limiter is not None:
            await limiter.admit(ctx, route, call.chat)
        if call.notes:  # what translation left out (built-in tools a translated step cannot run, ...)
            ctx.extra_headers.append((b"x-gateway-warning", _header_text("; ".join(call.notes))))
        if call.stream:
            ctx.stream = True
            await self.router.stream(ctx, route, call.chat, responder, call)
            return
        result = await self.router.complete(ctx, route, call.chat, call)
        await door.finished(self, ctx, call, result.body)
        ctx.status = 200
        await responder.send(200, [door.content_type, *ctx.gateway_headers()], result.body)
        ctx.first_byte = time.perf_counter()

    def _route_for(self, ctx: RequestContext, body: dict[str, Any]) -> Route:
        """The route a chat body names: ``model``, or ``models`` (several routes tried in order as one route
        made of their steps, OpenRouter style; ``model`` may then be absent), each name a route (or, with
        ``allow_direct``, ``provider/model``). A client key with routes may name only those."""
        models = body.pop("models", None)
        if models is None:
            route = self.config.routes.get(body["model"])
            if route is not None and ctx.key is None:
                return route  # the common request: a route by name, an operator key
            return self._named_route(ctx, body["model"])
        routes = [self._named_route(ctx, name) for name in models]
        body.setdefault("model", routes[0].name)
        if len(routes) == 1:
            return routes[0]
        # Named for the first: its limits apply, and the log and headers show it (each attempt names its step).
        return Route(name=routes[0].name, steps=tuple(step for r in routes for step in r.steps),
                     limits=routes[0].limits)

    def named_route(self, ctx: RequestContext, name: str) -> Route:
        """The route ``name`` names for this caller: 404 ``model_not_found``, 403 ``model_not_allowed`` for a
        client key without it (the doors' count_tokens endpoints look routes up with it too)."""
        return self._named_route(ctx, name)

    def token_field(self, route: str) -> str:
        """Which field a key's max_tokens cap fills on ``route`` when the client sent none (see
        :meth:`_token_field_per_route`)."""
        return self._token_fields.get(route, "max_tokens")

    def _named_route(self, ctx: RequestContext, name: str) -> Route:
        route = self.config.routes.get(name)
        if route is None and self.config.allow_direct:
            route = self._direct.get(name)
            if route is None:
                provider, sep, model = name.partition("/")
                if sep and model and provider in self.config.providers and _header_safe(model):
                    # A request naming provider/model goes through the same keys, retries and circuits as a route.
                    route = Route(name=name, steps=(Step(provider, model, self.config.default_timeout),))
                    if len(self._direct) >= _MAX_KEY_VIEWS:
                        self._direct.clear()
                    self._direct[name] = route
        if route is None:
            hint = " or provider/model" if self.config.allow_direct else ""
            raise NotFound(f"the model {quote(self.redact, name, 200)!r} does not exist (no route of that "
                           f"name{hint}; GET /v1/models lists them)", code="model_not_found")
        key = ctx.key
        if key is not None and key.routes and not self._may_use(key, name):
            raise Forbidden(f"this API key may not use the model {quote(self.redact, name, 200)!r} (it may use "
                            f"{quote(self.redact, ', '.join(key.routes), 200)}; GET /v1/models lists them)",
                            code="model_not_allowed")
        return route

    def _may_use(self, key: Any, name: str) -> bool:
        if name in self.config.routes:
            return name in self._key_view(key).allowed
        return any(fnmatchcase(name, p) for p in key.routes)  # provider/model (allow_direct)

    def apply_key(self, ctx: RequestContext, route: Any, body: dict[str, Any]) -> dict[str, Any]:
        """What a store key's settings do to a request: the routes it may use (403 ``model_not_allowed``
        otherwise), its system prompt (a system message before the client's), its max_tokens cap.

        A key without settings costs three attribute tests; its route set is computed once per key.
        """
        key = ctx.key
        if key.routes and not self._may_use(key, route.name):
            raise Forbidden(f"this API key may not use the model {quote(self.redact, route.name, 200)!r} (it may use "
                            f"{quote(self.redact, ', '.join(key.routes), 200)}; GET /v1/models lists them)",
                            code="model_not_allowed")
        if key.system_prompt:
            body["messages"] = [{"role": "system", "content": key.system_prompt}, *body["messages"]]
        cap = key.max_tokens
        if cap is not None:
            sent = False
            for name in _TOKEN_FIELDS:  # cap each field the client sent; upstreams read either
                value = body.get(name)
                if value is None:
                    continue
                if type(value) is not int:
                    raise BadRequest(f"'{name}' must be a whole number", code="invalid_type")
                if value > cap:
                    body[name] = cap
                sent = True
            if not sent:
                body[self._token_fields.get(route.name, "max_tokens")] = cap
        return body

    def _key_view(self, key: Any) -> _KeyView:
        """The routes a client key with patterns may use and its model list, built on first use."""
        view = self._key_views.get(key.id)
        if view is None or view.key is not key:
            allowed = frozenset(name for name in self.config.routes if any(fnmatchcase(name, p) for p in key.routes))
            listing = self._listing([m for m in self._models if m["id"] in allowed])
            view = _KeyView(key, allowed, json.dumps(listing, separators=(",", ":")).encode())
            if len(self._key_views) >= _MAX_KEY_VIEWS:
                self._key_views.clear()
            self._key_views[key.id] = view
        return view

    @staticmethod
    def _listing(models: list[dict[str, Any]]) -> dict[str, Any]:
        """A model list in OpenAI's shape and Anthropic's at once (their fields do not collide)."""
        return {"object": "list", "data": models, "has_more": False,
                "first_id": models[0]["id"] if models else None, "last_id": models[-1]["id"] if models else None}

    @staticmethod
    def _token_field_per_route(config: Config) -> dict[str, str]:
        """Which field a key's max_tokens cap fills when the client sent neither: ``max_completion_tokens``
        where an OpenAI/Azure step runs a reasoning model (o1, o3, o4-mini, gpt-5...: they refuse
        ``max_tokens``), else ``max_tokens``, which every OpenAI-compatible server and our adapters read."""
        out = {}
        for name, route in config.routes.items():
            newer = any(_COMPLETION_TOKENS_MODEL.match(step.model) is not None
                        and getattr(config.providers.get(step.provider), "type", "") in _COMPLETION_TOKENS_TYPES
                        for step in route.steps)
            out[name] = "max_completion_tokens" if newer else "max_tokens"
        return out

    # -- the one place a finished request is accounted for -----------------
    def finish(self, ctx: RequestContext, request: Request) -> None:
        self.usage.record(ctx)
        if ctx.usage:
            ctx.cost_nanousd = self.pricing.cost(ctx)
        services = self.services
        if services.metrics is not None:
            services.metrics.observe(ctx)
        if services.limiter is not None and ctx.admission is not None:
            services.limiter.settle(ctx)
        if services.store is not None and not ctx.unlogged:
            services.store.record(ctx)
        end = time.perf_counter()
        fields: dict[str, Any] = {
            "msg": "request",
            "request_id": ctx.request_id,
            "method": ctx.method,
            "path": ctx.path,
            "status": ctx.status,
            "latency_ms": round((end - ctx.started) * 1000, 2),
        }
        if ctx.client:
            fields["client"] = ctx.client
        if ctx.route is not None:
            fields["route"] = ctx.route
            fields["provider"] = ctx.provider
            fields["model"] = ctx.model
            fields["stream"] = ctx.stream
            fields["attempts"] = len(ctx.attempts)
            if ctx.first_byte is not None:
                fields["ttfb_ms"] = round((ctx.first_byte - ctx.started) * 1000, 2)
            if ctx.usage:
                fields["tokens"] = {k: ctx.usage.get(k) for k in ("prompt_tokens", "completion_tokens",
                                                                  "total_tokens") if k in ctx.usage}
            failed = [a for a in ctx.attempts if not a.ok]
            if failed:
                fields["failed_attempts"] = [a.public() for a in failed]
        if ctx.door is not None:
            fields["door"] = ctx.door.name
        if ctx.outcome is not None:  # the client got a 200 head and an error event: the status it stood for
            fields["outcome"] = ctx.outcome
        if ctx.error:
            fields["error"] = ctx.error
        if self.config.log_bodies and request.body and not ctx.unlogged:  # admin bodies carry credentials
            # Redacted whole, then cut: a key the 4 KiB cut split would otherwise leak its start.
            fields["request_body"] = self.redact.quote(request.body, 4096)
        access_log(self.log, fields)
