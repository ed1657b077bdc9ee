"""``type: vertex``: Vertex AI, authenticated by Application Default Credentials.

API versions followed:

* Vertex AI REST **v1**: ``projects.locations.publishers.models.generateContent``
  and ``streamGenerateContent?alt=sse`` for Gemini models (the request and
  answer JSON are the Gemini API's, so :mod:`.gemini` translates them), and
  the OpenAI-compatible ``projects.locations.endpoints/openapi/chat/completions``
  for models named ``publisher/model`` (``google/gemini-2.5-flash``,
  ``meta/llama-…-maas``): OpenAI bodies and chunks pass through as with
  ``type: openai``.
* Google OAuth 2.0 as ``google-auth`` implements it: a service-account JSON
  key signs an RS256 JWT (``iss`` the client email, ``scope``
  cloud-platform, ``aud`` the token URL, one hour) exchanged with the
  JWT-bearer grant (RFC 7523); an ``authorized_user`` file (``gcloud auth
  application-default login``) uses the refresh-token grant (RFC 6749 §6);
  on Google Cloud the metadata server (``computeMetadata/v1``, header
  ``Metadata-Flavor: Google``, ``GCE_METADATA_HOST`` honoured) hands out
  tokens.
* Vertex AI express mode: with only an ``api_key``, requests go to the
  global ``publishers/google/models/…`` path with ``x-goog-api-key``.

Credentials are looked for in ADC order: the provider's ``credentials_file``,
``$GOOGLE_APPLICATION_CREDENTIALS``, gcloud's
``application_default_credentials.json``, then the metadata server. An access
token is cached until shortly before it expires; refreshing takes a lock, so
however many requests arrive at once, one fetches and the rest reuse its
token (or its error). A 401 from Vertex drops the cached token.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import os
import stat
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import anyio

from ..config import ProviderConfig, Step
from ..errors import StepFailed
from ..http.errors import UpstreamError
from ..http.pool import Headers, UpstreamClient
from .base import Completion, QuotedFailure, StreamState, config_headers
from .gemini import NATIVE_OPS, GeminiProvider, model_path, versioned_base
from .openai import OpenAIProvider

API_VERSION = "v1"
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
METADATA_HOST = "metadata.google.internal"
EXPRESS_BASE_URL = "https://aiplatform.googleapis.com/" + API_VERSION
JWT_LIFETIME = 3600
MAX_REFRESH_MARGIN = 300.0  # refresh this long before expiry (less for short-lived tokens)
# What Vertex's countTokens takes beside contents (CountTokensRequest, v1), in either spelling.
_VERTEX_COUNT_FIELDS = frozenset({"contents", "systemInstruction", "system_instruction", "tools", "generationConfig",
                                  "generation_config"})


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _creds_error(message: str, quoted: bytes = b"") -> StepFailed:
    """Our credentials, not the client's request: a 502-class failure that falls through.

    ``quoted`` is the token endpoint's own answer, kept whole for routing to redact and then shorten.
    """
    text = f"Vertex credentials: {message}"
    error = {"message": text, "type": "upstream_error", "code": "upstream_auth_failed"}
    return QuotedFailure(text, quoted, error=error) if quoted else StepFailed(text, error=error)


@dataclass
class _Token:
    value: str
    refresh_at: float


@dataclass
class _Credentials:
    kind: str  # service_account | authorized_user | metadata
    info: dict[str, Any]
    source: str
    key: Any = None  # the loaded private key (service_account)


def find_credentials_file(explicit: str | None, env: Mapping[str, str]) -> tuple[str | None, str]:
    """ADC order: explicit file, $GOOGLE_APPLICATION_CREDENTIALS, gcloud's well-known file."""
    if explicit:
        return explicit, "credentials_file"
    if env.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return env["GOOGLE_APPLICATION_CREDENTIALS"], "GOOGLE_APPLICATION_CREDENTIALS"
    if env.get("CLOUDSDK_CONFIG"):
        config_dir = Path(env["CLOUDSDK_CONFIG"])
    elif os.name == "nt" and env.get("APPDATA"):
        config_dir = Path(env["APPDATA"]) / "gcloud"
    else:
        config_dir = Path(env.get("HOME") or Path.home()) / ".config" / "gcloud"
    well_known = config_dir / "application_default_credentials.json"
    if well_known.is_file():
        return str(well_known), "gcloud application default credentials"
    return None, "metadata server"


MAX_CREDENTIALS_FILE = 64 * 1024  # bytes: a service-account key is about 2.4 KiB


def _read_small_file(path: str) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most :data:`MAX_CREDENTIALS_FILE`; raises OSError
    (FileNotFoundError, ...) or ValueError. Opened without blocking (a FIFO must not hang the token fetch)
    and checked on the descriptor opened, not on the name (no swap between the check and the read); a
    device (``/dev/zero``), a directory or a huge file is refused unread."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("is not a regular file")
        if st.st_size > MAX_CREDENTIALS_FILE:
            raise ValueError(f"is larger than {MAX_CREDENTIALS_FILE // 1024} KiB (not a credentials file)")
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            data = f.read(MAX_CREDENTIALS_FILE + 1)
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > MAX_CREDENTIALS_FILE:  # it grew after the fstat
        raise ValueError(f"is larger than {MAX_CREDENTIALS_FILE // 1024} KiB (not a credentials file)")
    return data


def load_credentials(path: str, source: str) -> _Credentials:
    """The credentials a service-account or authorized-user JSON file holds. Only a regular file of at most
    64 KiB is read; errors name the file and the reason, never its contents."""
    try:
        data = _read_small_file(path)
    except FileNotFoundError:
        raise _creds_error(f"{source} file {path!r} does not exist") from None
    except OSError as exc:
        raise _creds_error(f"cannot read {source} file {path!r}: {exc.__class__.__name__}") from None
    except ValueError as exc:
        raise _creds_error(f"{source} file {path!r} {exc}") from None
    try:
        info = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _creds_error(f"cannot read {source} file {path!r}: {exc.__class__.__name__}") from None
    except (ValueError, RecursionError):
        raise _creds_error(f"{source} file {path!r} is not JSON") from None
    if not isinstance(info, dict):
        raise _creds_error(f"{source} file {path!r} is not a JSON object")
    kind = info.get("type")
    if kind == "service_account":
        missing = [k for k in ("client_email", "private_key") if not isinstance(info.get(k), str) or not info[k]]
        if missing:
            raise _creds_error(f"service-account file {path!r} lacks {', '.join(missing)}")
        try:
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric import rsa

            key = serialization.load_pem_private_key(info["private_key"].encode(), password=None)
        except (ValueError, TypeError):
            raise _creds_error(f"the private_key in {path!r} is not a PEM private key") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise _creds_error(f"the private_key in {path!r} is not an RSA key")
        return _Credentials("service_account", info, source, key)
    if kind == "authorized_user":
        missing = [k for k in ("client_id", "client_secret", "refresh_token")
                   if not isinstance(info.get(k), str) or not info[k]]
        if missing:
            raise _creds_error(f"authorized_user file {path!r} lacks {', '.join(missing)}")
        return _Credentials("authorized_user", info, source)
    raise _creds_error(f"{source} file {path!r} has type {kind!r}; supported: service_account, authorized_user")


def _preload_cryptography() -> None:
    """Import what signing needs at start-up, not at the first token fetch.

    A deploy swaps the .pyz under a process that is still draining, and Python reads each new import
    from the file at that path; imports done before the swap are safe. Where cryptography is missing,
    the first token fetch reports it (a failed step with the message saying how to install it).
    """
    try:
        from cryptography.hazmat.primitives import hashes, serialization  # noqa: F401
        from cryptography.hazmat.primitives.asymmetric import padding, rsa  # noqa: F401
    except ImportError:
        pass


def sign_jwt(creds: _Credentials, audience: str, now: int, scope: str = SCOPE) -> str:
    """The RS256-signed assertion a service account exchanges for an access token."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    header: dict[str, Any] = {"alg": "RS256", "typ": "JWT"}
    if isinstance(creds.info.get("private_key_id"), str):
        header["kid"] = creds.info["private_key_id"]
    claims = {"iss": creds.info["client_email"], "scope": scope, "aud": audience,
              "iat": now, "exp": now + JWT_LIFETIME}
    signing_input = (_b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                     + _b64url(json.dumps(claims, separators=(",", ":")).encode()))
    signature = creds.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + _b64url(signature)


class TokenSource:
    """OAuth2 access tokens from Application Default Credentials, cached and refreshed one at a time."""

    def __init__(self, client: UpstreamClient, *, credentials_file: str | None = None, token_url: str | None = None,
                 proxy: str | None = None, env: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.credentials_file = credentials_file
        self.token_url = token_url
        self.proxy = proxy
        self.env = os.environ if env is None else env
        self.clock = clock
        self.fetches = 0  # how many tokens were fetched (tests, metrics)
        self._lock = anyio.Lock()
        self._token: _Token | None = None
        self._creds: _Credentials | None = None
        self._generation = 0
        self._failure: StepFailed | None = None

    # -- public ---------------------------------------------------------------
    async def token(self) -> str:
        value = self._cached()
        if value is not None:
            return value
        generation = self._generation
        async with self._lock:
            value = self._cached()
            if value is not None:
                return value
            if self._generation != generation and self._failure is not None:
                # Another request just tried while we waited: share its answer, don't hammer the endpoint.
                raise copy.copy(self._failure)  # a fresh exception: same message, status and quote
            self._failure = None  # a fetch cancelled midway must not leave an older error for the next waiter
            try:
                self._token = await self._fetch()  # _request turns connection errors into StepFailed
            except StepFailed as exc:
                self._failure = exc
                raise
            finally:
                self._generation += 1
            return self._token.value

    def invalidate(self, value: str) -> None:
        """Forget a token the API refused (only if it is still the cached one)."""
        if self._token is not None and self._token.value == value:
            self._token = None

    async def credentials(self) -> _Credentials:
        if self._creds is None:
            path, source = find_credentials_file(self.credentials_file, self.env)
            if path is None:
                self._creds = _Credentials("metadata", {}, source)
            else:
                self._creds = load_credentials(path, source)
        return self._creds

    async def project_id(self) -> str | None:
        """The project the credentials belong to, when they say."""
        creds = await self.credentials()
        for key in ("project_id", "quota_project_id"):
            if isinstance(creds.info.get(key), str) and creds.info[key]:
                return str(creds.info[key])
        for var in ("GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT", "CLOUDSDK_CORE_PROJECT"):
            if self.env.get(var):
                return self.env[var]
        if creds.kind == "metadata":
            status, data = await self._request(b"GET", self._metadata_url("project/project-id"),
                                               [(b"metadata-flavor", b"Google")], b"", None)
            if status == 200 and data.strip():
                return data.decode("utf-8", "replace").strip()
        return None

    # -- internals --------------------------------------------------------------
    def _cached(self) -> str | None:
        t = self._token
        if t is not None and self.clock() < t.refresh_at:
            return t.value
        return None

    def _metadata_url(self, path: str) -> str:
        host = self.env.get("GCE_METADATA_HOST") or METADATA_HOST
        return f"http://{host}/computeMetadata/v1/{path}"

    async def _request(self, method: bytes, url: str, headers: Headers, body: bytes,
                       proxy: str | None) -> tuple[int, bytes]:
        try:
            async with self.client.stream(method, url, headers, body, proxy) as resp:
                parts = []
                size = 0
                async for chunk in resp.aiter_raw():
                    parts.append(chunk)
                    size += len(chunk)
                    if size > 1 << 20:
                        raise _creds_error("the token endpoint's answer is larger than 1 MiB")
                return resp.status, b"".join(parts)
        except UpstreamError as exc:
            raise _creds_error(f"cannot reach {url.split('?', 1)[0]}: {exc}") from None

    async def _fetch(self) -> _Token:
        creds = await self.credentials()
        self.fetches += 1
        form_headers = [(b"content-type", b"application/x-www-form-urlencoded"), (b"accept", b"application/json")]
        if creds.kind == "service_account":
            url = self.token_url or creds.info.get("token_uri") or GOOGLE_TOKEN_URL
            assertion = sign_jwt(creds, url, int(self.clock()))
            body = urlencode({"grant_type": JWT_BEARER, "assertion": assertion}).encode()
            status, data = await self._request(b"POST", url, form_headers, body, self.proxy)
        elif creds.kind == "authorized_user":
            url = self.token_url or creds.info.get("token_uri") or GOOGLE_TOKEN_URL
            body = urlencode({"grant_type": "refresh_token", "client_id": creds.info["client_id"],
                              "client_secret": creds.info["client_secret"],
                              "refresh_token": creds.info["refresh_token"]}).encode()
            status, data = await self._request(b"POST", url, form_headers, body, self.proxy)
        else:
            url = self.token_url or self._metadata_url("instance/service-accounts/default/token")
            try:
                status, data = await self._request(b"GET", url, [(b"metadata-flavor", b"Google")], b"", None)
            except StepFailed as exc:
                raise _creds_error("no credentials found (set credentials_file or GOOGLE_APPLICATION_CREDENTIALS, "
                                   f"or run on Google Cloud); the metadata server failed: {exc.message}") from None
        return self._parse_token(status, data, creds)

    def _parse_token(self, status: int, data: bytes, creds: _Credentials) -> _Token:
        try:
            obj = json.loads(data)
        except ValueError:
            obj = None
        if status != 200 or not isinstance(obj, dict):
            detail = ""
            quoted = b""
            if isinstance(obj, dict):
                err = obj.get("error")
                if isinstance(err, dict):  # Google API style
                    detail = str(err.get("message") or err.get("status") or "")
                elif err:
                    detail = str(err)
                    if obj.get("error_description"):
                        detail += f": {obj['error_description']}"
            else:
                quoted = data.strip()  # not JSON: quoted whole, redacted and shortened by routing
            raise _creds_error(f"the token endpoint ({creds.kind}) answered HTTP {status}"
                               + (f": {detail}" if detail else ""), quoted)
        value = obj.get("access_token")
        if not isinstance(value, str) or not value:
            raise _creds_error("the token endpoint's answer has no access_token")
        lifetime = obj.get("expires_in", 3600)
        if isinstance(lifetime, str) and lifetime.isdigit():
            lifetime = int(lifetime)
        if not isinstance(lifetime, (int, float)) or isinstance(lifetime, bool) or lifetime <= 0:
            lifetime = 3600
        margin = min(MAX_REFRESH_MARGIN, lifetime / 4)
        return _Token(value, self.clock() + lifetime - margin)


class VertexProvider(GeminiProvider):
    type_name = "vertex"
    send_ids = False  # Vertex matches function responses by order and name

    def __init__(self, cfg: ProviderConfig, client: UpstreamClient) -> None:
        super().__init__(cfg, client)
        opts = cfg.options
        self.location = str(opts.get("location") or "us-central1")
        self.api = str(opts.get("api") or "auto")
        credentials_file = opts.get("credentials_file")
        self.express = bool(cfg.api_key) and not credentials_file
        if self.express:
            self.base = versioned_base(cfg.base_url, EXPRESS_BASE_URL, API_VERSION)
        else:
            host = ("aiplatform.googleapis.com" if self.location == "global"
                    else f"{self.location}-aiplatform.googleapis.com")
            self.base = versioned_base(cfg.base_url, f"https://{host}/{API_VERSION}", API_VERSION)
            # The API key header GeminiProvider added does not belong on ADC requests.
            self.headers = [(b"content-type", b"application/json"), *config_headers(cfg)]
        if not self.express:
            _preload_cryptography()
        self.tokens = TokenSource(client, credentials_file=str(credentials_file) if credentials_file else None,
                                  token_url=str(opts["token_url"]) if opts.get("token_url") else None,
                                  proxy=cfg.proxy)
        self._project: str | None = str(opts["project"]) if opts.get("project") else None
        self._openai: tuple[str, OpenAIProvider] | None = None

    def uses_openai(self, step: Step) -> bool:
        if self.api == "openai":
            return True
        if self.api == "gemini":
            return False
        # ``publisher/model`` is the OpenAI endpoint's naming; ``models/…`` and the full
        # ``publishers/google/models/…`` name a Gemini model (endpoint() strips them).
        return "/" in step.model and not step.model.startswith(("models/", "publishers/google/models/"))

    async def project(self) -> str:
        if self._project is None:
            self._project = await self.tokens.project_id()
            if not self._project:
                raise _creds_error("no project: set `project:` on the provider (or GOOGLE_CLOUD_PROJECT)")
        return self._project

    async def method_url(self, step: Step, method: str) -> str:
        model = model_path(step.model.removeprefix("publishers/google/models/"))
        if self.express:
            return f"{self.base}/publishers/google/models/{model}:{method}"
        project = quote(await self.project(), safe="")
        return (f"{self.base}/projects/{project}/locations/{quote(self.location, safe='')}"
                f"/publishers/google/models/{model}:{method}")

    # -- the Gemini door, passed through: Vertex's generateContent speaks the Gemini API's JSON ---------------
    def native(self, op: str, step: Step) -> bool:
        return op in NATIVE_OPS and not self.uses_openai(step)  # publisher/model: the OpenAI endpoint, translated

    def count_body(self, body: dict[str, Any], step: Step) -> dict[str, Any]:
        """Vertex's countTokens takes the request's fields at the top level: a Gemini API
        ``generateContentRequest`` is unwrapped (its model, safety settings and tool config dropped: Vertex
        counts without them)."""
        inner = body.get("generateContentRequest", body.get("generate_content_request"))
        if not isinstance(inner, dict):
            return body
        rest = {k: v for k, v in body.items() if k not in ("generateContentRequest", "generate_content_request")}
        return {**{k: v for k, v in inner.items() if k in _VERTEX_COUNT_FIELDS}, **rest}

    async def quota_project(self) -> str | None:
        """The project billed for user credentials (``x-goog-user-project``), as gcloud sends it."""
        creds = await self.tokens.credentials()
        quota = creds.info.get("quota_project_id")
        return quota if creds.kind == "authorized_user" and isinstance(quota, str) and quota else None

    async def auth_headers(self) -> Headers:
        if self.express:
            return []
        headers = [(b"authorization", b"Bearer " + (await self.tokens.token()).encode())]
        quota = await self.quota_project()
        if quota:
            headers.append((b"x-goog-user-project", quota.encode()))
        return headers

    def on_unauthorized(self, headers: Headers) -> None:
        for k, v in headers:
            if k == b"authorization" and v.startswith(b"Bearer "):
                self.tokens.invalidate(v[7:].decode())

    # -- the OpenAI-compatible endpoint ----------------------------------------------
    async def _openai_provider(self) -> OpenAIProvider:
        if self.express:
            raise StepFailed("Vertex's OpenAI-compatible endpoint needs Application Default Credentials and a "
                             "project, not express mode's api_key", status=400,
                             error={"message": "vertex express mode serves Gemini models only",
                                    "type": "invalid_request_error", "code": "unsupported_model"})
        token = await self.tokens.token()
        if self._openai is None or self._openai[0] != token:
            project = quote(await self.project(), safe="")
            base = f"{self.base}/projects/{project}/locations/{quote(self.location, safe='')}/endpoints/openapi"
            headers = dict(self.cfg.headers)
            quota = await self.quota_project()
            if quota:
                headers["x-goog-user-project"] = quota
            cfg = dataclasses.replace(self.cfg, type="openai", api_key=token, base_url=base, headers=headers,
                                      options={})
            self._openai = (token, OpenAIProvider(cfg, self.client))
        return self._openai[1]

    async def complete(self, body: dict[str, Any], step: Step) -> Completion:
        if not self.uses_openai(step):
            return await super().complete(body, step)
        provider = await self._openai_provider()
        try:
            return await provider.complete(body, step)
        except StepFailed as exc:
            if exc.status == 401:
                self.tokens.invalidate(provider.cfg.api_key or "")
            raise

    async def stream(self, body: dict[str, Any], step: Step, state: StreamState) -> AsyncIterator[bytes]:
        if not self.uses_openai(step):
            inner = super().stream(body, step, state)
            token = None
        else:
            provider = await self._openai_provider()
            inner = provider.stream(body, step, state)
            token = provider.cfg.api_key
        try:
            async for chunk in inner:
                yield chunk
        except StepFailed as exc:
            if exc.status == 401 and token:
                self.tokens.invalidate(token)
            raise
        finally:
            await inner.aclose()  # type: ignore[attr-defined]
