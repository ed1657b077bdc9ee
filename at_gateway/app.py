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
import time
from typing import Any

from .config import Config
from .context import RequestContext
from .errors import BadRequest, GatewayError, MethodNotAllowed, NotFound, Unauthorized
from .http.pool import UpstreamClient
from .http.server import ClientGone, Request, Responder
from .logs import Redactor, access_log
from .providers import build_provider
from .providers.base import Provider
from .routing import Router
from .usage import UsageMeter

_JSON_CT = (b"content-type", b"application/json")
_HEALTH = b'{"status":"healthy"}'


class Gateway:
    def __init__(self, config: Config, client: UpstreamClient | None = None,
                 redactor: Redactor | None = None, usage: UsageMeter | None = None) -> None:
        self.config = config
        self.redact = redactor or Redactor(config.secrets())
        self.client = client or UpstreamClient(config.upstream)
        self.providers: dict[str, Provider] = {
            name: build_provider(pc, self.client) for name, pc in config.providers.items()}
        # Built now, not on first use: serving must import nothing more from the .pyz, which a deploy
        # may replace under a process that is still draining.
        for pc in config.providers.values():
            if pc.proxy:
                self.client.connector(pc.proxy)
        self.router = Router(config.routes, self.providers, self.redact, config.stream_idle_timeout,
                             config.stream_keepalive_interval)
        self.usage = usage or UsageMeter()  # outlives config reloads
        self.log = logging.getLogger("at_gateway.access")
        self._keys = [k.encode() for k in config.api_keys]
        created = int(time.time())
        self._models_body = json.dumps({"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "at-gateway"}
            for name in config.routes]}, separators=(",", ":")).encode()

    async def aclose(self) -> None:
        for p in self.providers.values():
            await p.aclose()
        await self.client.aclose()

    # -- helpers ------------------------------------------------------------
    def _authenticate(self, request: Request) -> str:
        """Return the caller's identity (the key's index), or raise 401."""
        presented = request.header(b"x-api-key")
        if presented is None:
            auth = request.header(b"authorization")
            if auth is not None and auth[:7].lower() == b"bearer ":
                presented = auth[7:].strip()
        if not presented:
            raise Unauthorized("missing API key: send it as X-Api-Key or Authorization: Bearer")
        found = -1
        for i, key in enumerate(self._keys):  # no early exit: constant time over the key list
            if hmac.compare_digest(presented, key) and found < 0:
                found = i
        if found < 0:
            raise Unauthorized("invalid API key")
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
        try:
            await self._dispatch(ctx, request, responder)
        except GatewayError as exc:
            ctx.status = exc.status
            ctx.error = exc.message
            if not responder.started:
                await responder.send_json(exc.status, exc.to_body(), [*exc.headers, *ctx.gateway_headers()])
        except ClientGone:
            raise
        except Exception as exc:  # a bug: the server answers 500 and logs it; the request line must agree
            if not responder.started:
                ctx.status = 500
            ctx.error = f"internal error: {exc.__class__.__name__}"
            raise
        finally:
            if ctx.status == 0:
                ctx.status = responder.status or 499  # 499: the client went away first
            if not responder.finished and ctx.error is None:
                ctx.error = "client disconnected before the response ended"
            self.finish(ctx, request)

    async def _dispatch(self, ctx: RequestContext, request: Request, responder: Responder) -> None:
        path = request.path
        if path == b"/v1/chat/completions" or path == b"/chat/completions":
            if request.method != b"POST":
                raise MethodNotAllowed(f"{request.method.decode()} is not allowed here; use POST",
                                       headers=[(b"allow", b"POST")])
            ctx.client = self._authenticate(request)
            await self.chat(ctx, request, responder)
            return
        if path == b"/health":
            if request.method != b"GET":
                raise MethodNotAllowed(f"{request.method.decode('latin-1')} is not allowed here; use GET",
                                       headers=[(b"allow", b"GET")])
            ctx.status = 200
            await responder.send(200, [_JSON_CT, (b"x-request-id", ctx.request_id.encode())], _HEALTH)
            return
        if path == b"/v1/models" or path == b"/models":
            if request.method != b"GET":
                raise MethodNotAllowed(f"{request.method.decode('latin-1')} is not allowed here; use GET",
                                       headers=[(b"allow", b"GET")])
            ctx.client = self._authenticate(request)
            ctx.status = 200
            await responder.send(200, [_JSON_CT, (b"x-request-id", ctx.request_id.encode())], self._models_body)
            return
        raise NotFound(f"no such endpoint: {request.method.decode('latin-1')} {path.decode('latin-1')[:200]}",
                       code="unknown_url")

    def parse_chat(self, request: Request) -> dict[str, Any]:
        try:
            body = json.loads(request.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object", code="invalid_json")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("'model' is required and must be a string", code="missing_model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' is required and must be a non-empty array", code="invalid_messages")
        if "stream" in body and not isinstance(body["stream"], bool) and body["stream"] is not None:
            raise BadRequest("'stream' must be true or false", code="invalid_stream")
        return body

    async def chat(self, ctx: RequestContext, request: Request, responder: Responder) -> None:
        body = self.parse_chat(request)
        model = body["model"]
        route = self.config.routes.get(model)
        if route is None:
            raise NotFound(f"the model {model[:200]!r} does not exist (no route of that name; "
                           "GET /v1/models lists them)", code="model_not_found")
        ctx.route = route.name
        if body.get("stream"):
            ctx.stream = True
            await self.router.stream(ctx, route, body, responder)
            return
        result = await self.router.complete(ctx, route, body)
        ctx.status = 200
        await responder.send(200, [_JSON_CT, *ctx.gateway_headers()], result.body)
        ctx.first_byte = time.perf_counter()

    # -- the one place a finished request is accounted for -----------------
    def finish(self, ctx: RequestContext, request: Request) -> None:
        self.usage.record(ctx)
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
        if ctx.error:
            fields["error"] = ctx.error
        if self.config.log_bodies and request.body:
            fields["request_body"] = request.body[:4096].decode("utf-8", "replace")
        access_log(self.log, fields)
