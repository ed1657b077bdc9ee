"""Admin API: ``providers`` and ``routes``, the effective ones (the YAML file merged with the database) read, and
the database's written while the gateway runs.

A provider or route written here goes to the database (:class:`~at_gateway.store.catalog.Catalog`, which seals
its secrets and writes the audit row in the same transaction) and replaces the file's entry of the same name;
deleting it brings the file's back. Every write is checked as the YAML is (``validate_provider`` /
``validate_route``: every problem with its path), then as the whole configuration it makes
(:meth:`~at_gateway.live.Live.merge`), before anything is written: what the database holds always builds.
This worker then rebuilds at once (:meth:`~at_gateway.live.Live.refresh`); the others follow within their poll.

Reads show each entry as it was given (the database's spec, or the file's entry with ``${VAR}`` substituted),
with its ``source`` and whether it ``overrides_config``. Secrets (what the store encrypts: ``api_key``, each
of ``api_keys``, every header value, a proxy's user info) are shown masked (``sk-…abcd``), and so are the
credentials a ``base_url`` may carry: its user info's password and the values of credential-like query
parameters (``api-key``, ``key``, ``token``, ``sig``, ...: :func:`mask_base_url`).
A client that read a provider and sends it back unchanged sends those masks: a secret given as the mask of the
stored one keeps the stored one, so an edit never needs the secrets again (and PATCH keeps what it omits) --
unless the edit changes where the provider sends them (type, base_url, proxy, token_url, preset, location):
then every secret must be sent again, or an admin who cannot read a key could have it sent to a host of theirs.

Each write runs its checks and its write in one catalog transaction (BEGIN IMMEDIATE): what it checked (the
name free, the provider unused, the route's providers there) is what it writes over, in whichever worker.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

import anyio

from ..config import (
    LIMIT_KEYS,
    Config,
    Overlay,
    ProviderConfig,
    Step,
    substitute_env,
    validate_provider,
    validate_route,
)
from ..config import Route as RouteConfig
from ..context import Attempt
from ..errors import BadRequest, ConfigError, Conflict, GatewayError, NotFound
from ..http.server import ClientGone
from ..logs import quote
from ..providers import PROVIDER_TYPES
from ..routing import prepare_body
from ..store.catalog import secret_fields, usable_overlay
from ..store.crypto import CryptoError
from ..store.db import StoreError
from .api import AdminRequest, Answer, Route, invalid, listing, mask

if TYPE_CHECKING:
    from ..app import Gateway
    from ..live import Live
    from ..store.catalog import Catalog

log = logging.getLogger("at_gateway.admin")

SecretPath = tuple[Any, ...]  # a secret's place in a provider spec: ("api_key",), ("api_keys", 0, "key"), ...

SOURCES = ("config", "database")
#: Fields of a read that a write ignores (a read sent back as it came is a valid write).
READ_ONLY = frozenset({"object", "source", "overrides_config", "created_at", "updated_at", "credentials_encrypted"})
#: Fields that say where a provider's secrets go: changing one with a secret kept (masked or omitted) is refused.
DESTINATION = ("type", "base_url", "proxy", "token_url", "preset", "location")
MASK_MARK = "…"  # what every masked value holds (api.mask)
TEST_TIMEOUT = 30.0  # seconds: POST providers/{name}/test waits at most this (or the route step's, if shorter)
_PAGE = ("limit", "cursor")


# -- specs: the entries as the admin API takes them ----------------------------------------------------

def _jsonable(value: Any) -> Any:
    """YAML values as JSON ones (a date read from the file becomes its ISO text)."""
    return json.loads(json.dumps(value, default=str))


def file_entry(file_config: Config, kind: str, name: str) -> dict[str, Any] | None:
    """The config file's ``providers``/``routes`` entry named ``name``, ``${VAR}`` substituted as a load does:
    the spec a PATCH or PUT of an entry only the file defines starts from (its secrets in clear, since the
    database entry made from it replaces the file's whole)."""
    doc = file_config.document
    items = doc.get(kind) if isinstance(doc, dict) else None
    for item in items if isinstance(items, list) else ():
        if isinstance(item, dict):
            spec = substitute_env(item, os.environ, kind, [])
            if spec.get("name") == name:
                return _jsonable(spec)  # type: ignore[no-any-return]
    return None


def provider_spec(pc: ProviderConfig) -> dict[str, Any]:
    """A built provider as a spec (when its entry cannot be found: a gateway built without a file document)."""
    spec: dict[str, Any] = {"name": pc.name, "type": pc.type}
    if pc.base_url is not None:
        spec["base_url"] = pc.base_url
    if pc.api_key:
        spec["api_key"] = pc.api_key
    if pc.headers:
        spec["headers"] = dict(pc.headers)
    if pc.proxy:
        spec["proxy"] = pc.proxy
    spec.update(_jsonable(dict(pc.options)))
    return spec


def route_spec(rt: RouteConfig) -> dict[str, Any]:
    """A built route as a spec (the fallback of :func:`provider_spec`): timeouts in seconds, exact prices."""
    steps = []
    for s in rt.steps:
        step: dict[str, Any] = {"provider": s.provider, "model": s.model, "timeout": s.timeout}
        if s.conflict_resolution:
            step["conflict_resolution"] = s.conflict_resolution
        if s.price is not None:
            price = {"input": str(s.price.input), "output": str(s.price.output)}
            if s.price.cached_input is not None:
                price["cached_input"] = str(s.price.cached_input)
            step["price"] = price
        steps.append(step)
    spec: dict[str, Any] = {"name": rt.name, "steps": steps}
    if rt.limits is not None and rt.limits.any():
        spec["limits"] = {k: getattr(rt.limits, k) for k in LIMIT_KEYS if getattr(rt.limits, k) is not None}
    return spec


def entry_spec(kind: str, name: str, config: Config, file_config: Config, overlay: Overlay | None) -> dict[str, Any]:
    """An effective entry as it was given: the database's spec, or the file's (``kind``: providers | routes)."""
    sources = config.provider_sources if kind == "providers" else config.route_sources
    spec = None
    if sources.get(name) == "database" and overlay is not None:
        spec = next((dict(e) for e in getattr(overlay, kind) if e.get("name") == name), None)
    if spec is None:
        spec = file_entry(file_config, kind, name)
    if spec is None:
        spec = provider_spec(config.providers[name]) if kind == "providers" else route_spec(config.routes[name])
    return spec


def mask_url(url: str) -> str:
    """A URL with its user info masked as ``Config.secrets`` reads it (everything before the last ``@`` after
    the scheme): ``http://user:…@proxy:3128``; a URL without one as it is."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")
    user, colon, password = userinfo.partition(":")
    shown = f"{user}:{mask(password) or ''}" if colon else (mask(userinfo) or "")
    return f"{scheme}://{shown}@{host}"


# Query parameters of a base_url whose values are credentials (names compared lowercased, without - _ . and
# spaces): Azure's api-key and SAS sig, Google's key, OAuth's access_token, AWS's X-Amz-Signature/-Credential...
_QUERY_SECRET_NAMES = frozenset(("key", "sig", "sas", "code", "auth", "pass", "pwd", "jwt", "session", "sessionid"))
_QUERY_SECRET_ENDS = ("key", "token", "secret", "password", "passwd", "signature", "sig", "credential", "credentials")
_QUERY_NAME_NOISE = re.compile(r"[-_.\s]")


def _secret_query_name(name: str) -> bool:
    n = _QUERY_NAME_NOISE.sub("", unquote_plus(name)).lower()
    return n in _QUERY_SECRET_NAMES or n.endswith(_QUERY_SECRET_ENDS)


def mask_base_url(url: str) -> str:
    """A provider's ``base_url`` as admin reads show it: its user info masked as :func:`mask_url` masks a proxy's
    (``http://user:…@host``), and the value of every credential-like query parameter masked as a key is
    (``?api-version=2024-06-01&api-key=…abcd``); the rest, and the order of everything, as it is. A write that
    sends the masked URL back keeps the stored one (:func:`keep_base_url`)."""
    head, hashmark, fragment = url.partition("#")
    head, question, query = head.partition("?")
    head = mask_url(head)
    if question:
        parts = []
        for part in query.split("&"):
            name, eq, value = part.partition("=")
            parts.append(f"{name}={mask(value)}" if eq and value and _secret_query_name(name) else part)
        head += "?" + "&".join(parts)
    return head + hashmark + fragment


def keep_base_url(spec: dict[str, Any], base: Mapping[str, Any] | None, problems: list[str]) -> dict[str, Any]:
    """``spec`` with a ``base_url`` given as the mask of the stored one (what a read showed) replaced by the stored
    one; a ``base_url`` holding the mask's ``…`` that masks something else is refused (it would be dialled). Then
    too the stored one is put back, so that the other checks do not add problems that are this one's echo."""
    url = spec.get("base_url")
    if not isinstance(url, str) or MASK_MARK not in url:
        return spec
    stored = base.get("base_url") if base is not None else None
    if not (isinstance(stored, str) and mask_base_url(stored) == url):
        problems.append(f"provider.base_url: holds '{MASK_MARK}' as a masked value does, but is not the mask of the "
                        "stored base_url: send the whole URL, or the value exactly as read to keep the stored one")
    return {**spec, "base_url": stored} if isinstance(stored, str) else spec


def _masker(path: SecretPath) -> Callable[[str], str | None]:
    return mask_url if path[0] == "proxy" else mask


def _put(obj: Any, path: SecretPath, value: Any) -> Any:
    """``obj`` (a spec, or a part of it) with the value at ``path`` replaced; copies, never changes ``obj``."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(obj, list) and isinstance(head, int):
        out_list = list(obj)
        out_list[head] = _put(out_list[head], rest, value)
        return out_list
    out = dict(obj)
    out[head] = _put(out[head], rest, value)
    return out


def _field(kind: str, path: SecretPath) -> str:
    text = kind
    for p in path:
        text += f"[{p}]" if isinstance(p, int) else f".{p}"
    return text


def masked(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A provider spec fit to show: every secret the store encrypts (``secret_fields``: api_key, api_keys, every
    header value, a proxy's user info) masked, and the credentials in its base_url (:func:`mask_base_url`)."""
    out: Any = dict(spec)
    for path, value in secret_fields(spec):
        out = _put(out, path, _masker(path)(value))
    if isinstance(out.get("base_url"), str):
        out["base_url"] = mask_base_url(out["base_url"])
    return dict(out)


def _iso(stamp: float) -> str:
    return dt.datetime.fromtimestamp(stamp, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


Stamps = Mapping[str, tuple[float, float]]  # name -> (created_at, updated_at) of the database's entries


def _meta(name: str, source: str, file_names: Any, stamps: Stamps) -> dict[str, Any]:
    out: dict[str, Any] = {"source": source, "overrides_config": source == "database" and name in file_names}
    if source == "database" and name in stamps:
        out["created_at"], out["updated_at"] = (_iso(t) for t in stamps[name])
    return out


def render_provider(config: Config, name: str, file_config: Config, overlay: Overlay | None,
                    stamps: Stamps | None = None) -> dict[str, Any]:
    """One effective provider as reads show it: as it was given, secrets masked, with its source."""
    spec = masked(entry_spec("providers", name, config, file_config, overlay))
    spec.setdefault("type", config.providers[name].type)
    return {"object": "provider", **spec,
            **_meta(name, config.provider_sources.get(name, "config"), file_config.providers, stamps or {})}


def render_route(config: Config, name: str, file_config: Config, overlay: Overlay | None,
                 stamps: Stamps | None = None) -> dict[str, Any]:
    """One effective route as reads show it, with its source."""
    spec = entry_spec("routes", name, config, file_config, overlay)
    return {"object": "route", **spec,
            **_meta(name, config.route_sources.get(name, "config"), file_config.routes, stamps or {})}


# -- where the handlers stand ----------------------------------------------------------------------------

def control(req: AdminRequest) -> Live | None:
    """The :class:`~at_gateway.live.Live` of this process (None: a bare gateway, as some tests run one)."""
    return getattr(req.gateway.services, "control", None)


def current(req: AdminRequest) -> tuple[Gateway, Config, Overlay | None]:
    """The gateway serving now (after a write, the rebuilt one, not the one this request started on), the
    file's configuration alone and the database's entries it was built with."""
    live = control(req)
    if live is None:
        return req.gateway, req.gateway.config, None
    return live.gateway, live.file_config, live.overlay


def _writable(req: AdminRequest) -> tuple[Live, Catalog]:
    catalog = req.catalog  # 409 store_in_memory first: the usual reason
    live = control(req)
    if live is None:
        raise Conflict("this gateway does not follow the database's providers and routes (it was not started "
                       "by `serve`)", code="not_live")
    return live, catalog


def only(req: AdminRequest, allowed: tuple[str, ...]) -> None:
    """A misspelt filter is an error, not every row."""
    unknown = sorted(k for k in req.query if k not in allowed)
    if unknown:
        shown = ", ".join(quote(req.gateway.redact, k, 40) for k in unknown)
        raise BadRequest(f"unknown query parameter(s) {shown} (allowed: {', '.join(allowed) or 'none'})",
                         code="invalid_query")


def _shown(req: AdminRequest, name: str) -> str:
    return repr(quote(req.gateway.redact, name, 100))


async def _stamps(req: AdminRequest, table: str) -> dict[str, tuple[float, float]]:
    catalog = getattr(req.gateway.services, "catalog", None)
    if catalog is None:
        return {}

    def read() -> dict[str, tuple[float, float]]:
        rows = catalog.conn.execute(f"SELECT name, created_at, updated_at FROM {table}")  # noqa: S608 (a constant)
        return {n: (c, u) for n, c, u in rows}

    return await catalog.call(read)  # type: ignore[no-any-return]


def _page(req: AdminRequest, rows: list[dict[str, Any]], what: str) -> Answer:
    """``limit`` + ``cursor`` over rows sorted by name (the cursor: the last name given)."""
    limit, after = req.page()
    if after is not None and not (len(after) == 1 and isinstance(after[0], str)):
        raise BadRequest(f"query parameter cursor: not a cursor of GET {what} (use next_cursor as it came)",
                         code="invalid_query")
    rows = sorted(rows, key=lambda r: r["name"])
    if after is not None:
        rows = [r for r in rows if r["name"] > after[0]]
    more = len(rows) > limit
    return Answer(listing(rows[:limit], [rows[limit - 1]["name"]] if more else None))


# -- bodies ----------------------------------------------------------------------------------------------

def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396: objects merged key by key, ``null`` removes a key, anything else (lists too) replaces."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def _body(req: AdminRequest, what: str, path_name: str | None) -> tuple[str, dict[str, Any], list[str]]:
    """The name, the body without its read-only fields, and the problems found so far."""
    body = {k: v for k, v in req.json().items() if k not in READ_ONLY}
    problems: list[str] = []
    if path_name is None:
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise invalid([f"{what}.name: required, a non-empty string"])
        return name, body, problems
    if not body and req.method == "PATCH":
        raise invalid([f"body: nothing to change (give any field of the {what})"])
    if "name" in body and body["name"] != path_name:
        problems.append(f"{what}.name: must be the name in the URL ({_shown(req, path_name)}); renaming is not "
                        f"supported (create the new {what}, move what uses it, delete the old one)")
    return path_name, body, problems


def _same_slot(a: SecretPath, b: SecretPath) -> bool:
    """Whether a stored secret at ``b`` may stand for a mask given at ``a``: the same field (api_keys: any
    of them, their order may change; headers: the same name, in any case)."""
    if a[0] != b[0]:
        return False
    return a[0] != "headers" or str(a[1]).lower() == str(b[1]).lower()


def keep_secrets(spec: dict[str, Any], base: Mapping[str, Any] | None, problems: list[str]) -> dict[str, Any]:
    """``spec`` with each secret given as the mask of a stored one (what a read showed) replaced by that secret.
    A value that holds the mask's ``…`` but masks nothing stored is refused: it would go upstream as a key."""
    stored = list(secret_fields(base or {}))
    out: Any = spec
    for path, value in list(secret_fields(spec)):
        if MASK_MARK not in value:
            continue
        masker = _masker(path)
        same = [v for p, v in stored if p == path and masker(v) == value]
        fits = same or list(dict.fromkeys(v for p, v in stored if _same_slot(path, p) and masker(v) == value))
        if len(fits) == 1:
            out = _put(out, path, fits[0])
        else:
            why = "is the mask of several stored secrets" if fits else "is not the mask of a stored secret"
            problems.append(f"{_field('provider', path)}: holds '{MASK_MARK}' as a masked value does, but {why}: "
                            "send the whole secret, or the value exactly as read to keep the stored one")
    return dict(out)


def _destination(spec: Mapping[str, Any], key: str) -> Any:
    value = spec.get(key)
    if key == "type":
        return value or "openai"
    if key == "base_url" and isinstance(value, str):
        return value.rstrip("/")
    return value


def kept_for_new_destination(spec: Mapping[str, Any], base: Mapping[str, Any] | None, body: Mapping[str, Any],
                             problems: list[str]) -> None:
    """A change of where the provider sends its secrets (:data:`DESTINATION`) must come with every secret it
    keeps: a secret the body does not hold in clear (omitted by a PATCH, or sent as its mask) would be sent
    to the new destination by an admin who never knew it. One problem per such secret. A proxy's password is
    the exception: it goes to the proxy only, whose host its mask holds (a mask with another host keeps
    nothing, :func:`keep_secrets`)."""
    if base is None:
        return
    changed = [k for k in DESTINATION if _destination(spec, k) != _destination(base, k)]
    if not changed:
        return
    given = {(path, value) for path, value in secret_fields(body) if MASK_MARK not in value}
    for path, value in secret_fields(spec):
        if path != ("proxy",) and (path, value) not in given:
            problems.append(f"{_field('provider', path)}: the destination changed ({', '.join(changed)}): send the "
                            "secret again (a stored secret is kept only while it goes where it went)")


def _spec(mode: str, body: dict[str, Any], base: Mapping[str, Any] | None, name: str) -> dict[str, Any]:
    """create/put: the body (nulls dropped); patch: the body merged into ``base``."""
    if mode == "patch":
        spec: dict[str, Any] = merge_patch(dict(base or {}), body)
    else:
        spec = {k: v for k, v in body.items() if v is not None}
    spec["name"] = name
    return spec


def _replaced(entries: tuple[Mapping[str, Any], ...], spec: Mapping[str, Any] | None, name: str
              ) -> tuple[Mapping[str, Any], ...]:
    """The database's entries with ``name``'s replaced by ``spec`` (added when new; removed when None)."""
    out = [e for e in entries if e.get("name") != name]
    if spec is not None:
        out.append(spec)
    return tuple(out)


def _merged(live: Live, overlay: Overlay, before: Overlay, kind: _Kind, name: str | None) -> Config:
    """The configuration a change makes; 400 listing every problem the change brings. Problems the database
    had before it (a stored route whose provider the YAML no longer has: left out of what is served, see
    :func:`~at_gateway.store.catalog.usable_overlay`) do not block an unrelated write; they are listed only
    when the entry written is among what they leave out."""
    try:
        return live.merge(overlay)
    except ConfigError as exc:
        fitted = usable_overlay(overlay, live.merge)
        old = usable_overlay(before, live.merge).error
        new = [p for p in exc.problems if old is None or p not in old.problems]
        if new or (name is not None and (kind.table, name) in fitted.dropped):
            shown = new or list(exc.problems)
            raise invalid(shown, f"the change does not fit the rest of the configuration: {len(shown)} "
                                 "problem(s): " + "; ".join(shown)) from None
        return fitted.config


async def _in_db(req: AdminRequest, fn: Callable[[], Any]) -> Any:
    """A write in the catalog's thread; the store's refusals as clear errors (never a traceback)."""
    try:
        return await req.db(fn)
    except CryptoError as exc:  # a stored secret that does not decrypt: named by row and field, never a value
        raise GatewayError(f"the database's stored credentials cannot be read: {exc}", status=500,
                           code="store_decrypt_failed") from None
    except StoreError as exc:  # e.g. the encryption key was rotated by another process
        raise Conflict(str(exc), code="store_conflict") from None


async def _follow(live: Live, when: str) -> None:
    """Rebuild from the database now: before a write, to check it against what the other workers wrote; after,
    to serve it here at once (the other workers follow within their poll). A database that cannot be read
    here is logged (the watch retries); the write itself then reports it."""
    try:
        await live.refresh()
    except Exception as exc:  # noqa: BLE001 (after a write, it is committed: the answer must say so)
        log.error("config: cannot rebuild from the database %s: %s", when, exc)


async def _after_write(live: Live) -> None:
    await _follow(live, "after an admin write (the watch retries)")


def _not_found(req: AdminRequest, what: str, name: str) -> NotFound:
    return NotFound(f"no {what} named {_shown(req, name)} (GET {what}s lists them)", code=f"{what}_not_found")


class _Kind:
    """What differs between providers and routes for the shared handlers below."""

    def __init__(self, word: str) -> None:
        self.word = word  # "provider" | "route"
        self.table = word + "s"  # the table, the Overlay field, the YAML key, the URL segment

    def effective(self, config: Config) -> Mapping[str, Any]:
        return config.providers if self.word == "provider" else config.routes

    def render(self, config: Config, name: str, file_config: Config, overlay: Overlay | None,
               stamps: Stamps | None = None) -> dict[str, Any]:
        render = render_provider if self.word == "provider" else render_route
        return render(config, name, file_config, overlay, stamps)

    def overlay(self, overlay: Overlay, spec: Mapping[str, Any] | None, name: str) -> Overlay:
        if self.word == "provider":
            return Overlay(_replaced(overlay.providers, spec, name), overlay.routes)
        return Overlay(overlay.providers, _replaced(overlay.routes, spec, name))


PROVIDERS, ROUTES_KIND = _Kind("provider"), _Kind("route")


async def _list(req: AdminRequest, kind: _Kind, rows_filter: Callable[[dict[str, Any]], bool],
                config: Config, file_config: Config, overlay: Overlay | None) -> Answer:
    stamps = await _stamps(req, kind.table)
    rows = [kind.render(config, n, file_config, overlay, stamps) for n in kind.effective(config)]
    return _page(req, [r for r in rows if rows_filter(r)], kind.table)


async def _get(req: AdminRequest, kind: _Kind) -> Answer:
    only(req, ())
    name = req.params["name"]
    gateway, file_config, overlay = current(req)
    if name not in kind.effective(gateway.config):
        raise _not_found(req, kind.word, name)
    return Answer(kind.render(gateway.config, name, file_config, overlay, await _stamps(req, kind.table)))


def _state(live: Live, overlay: Overlay) -> Config:
    """The configuration the database holds now (read in the write's transaction), to check a change against
    what every worker wrote, not what this one last rebuilt; the part that builds when a stored entry no
    longer fits (:func:`~at_gateway.store.catalog.usable_overlay`)."""
    return usable_overlay(overlay, live.merge).config


async def _write(req: AdminRequest, kind: _Kind, mode: str) -> Answer:
    """create (POST), put (PUT) or patch (PATCH) one database entry: checked, merged, written, served."""
    only(req, ())
    live, catalog = _writable(req)
    name, body, problems = _body(req, kind.word, None if mode == "create" else req.params["name"])
    actor = req.actor
    await _follow(live, "before an admin write")  # the file as every worker reads it (an admin reload)

    def write() -> tuple[bool, Config, Overlay]:
        with catalog.transaction():  # the checks below and the write: one state, one writer at a time
            stored_overlay = catalog.overlay()
            stored = catalog.provider(name) if kind is PROVIDERS else catalog.route(name)
            in_file = name in kind.effective(live.file_config)
            if mode == "create" and stored is not None:
                raise Conflict(f"a {kind.word} named {_shown(req, name)} is already in the database (PUT or PATCH "
                               f"{kind.table}/{{name}} changes it)", code=f"{kind.word}_exists")
            if mode == "patch" and stored is None and not in_file:
                raise _not_found(req, kind.word, name)
            # An entry only the file defines: the database's starts as the file's (its secrets too), then the change.
            base = dict(stored.spec) if stored is not None else (
                file_entry(live.file_config, kind.table, name) if in_file else None)
            spec = _spec(mode, body, base, name)
            if kind is PROVIDERS:
                spec = keep_base_url(spec, base, problems)
                spec = keep_secrets(spec, base, problems)
                kept_for_new_destination(spec, base, body, problems)
                problems.extend(validate_provider(spec, source="database")[1])
            else:
                state = _state(live, stored_overlay)
                problems.extend(validate_route(spec, state.providers, state.default_timeout)[1])
            if problems:
                raise invalid(problems)
            overlay = kind.overlay(stored_overlay, spec, name)
            merged = _merged(live, overlay, stored_overlay, kind, name)
            created = catalog.put_provider(spec, actor) if kind is PROVIDERS else catalog.put_route(spec, actor)
        return created, merged, overlay

    created, merged, overlay = await _in_db(req, write)
    await _after_write(live)
    answer = kind.render(merged, name, live.file_config, overlay, await _stamps(req, kind.table))
    if kind is PROVIDERS:
        # Said where it is decided: a provider's credentials written without store.encryption_key are plaintext.
        answer["credentials_encrypted"] = catalog.encrypts
    # 201 for a new name; a PATCH answers 200 even when it made the database copy of a file's entry
    return Answer(answer, status=201 if created and mode != "patch" else 200)


async def _delete(req: AdminRequest, kind: _Kind) -> Answer:
    only(req, ())
    live, catalog = _writable(req)
    name = req.params["name"]
    actor = req.actor
    await _follow(live, "before an admin delete")

    def write() -> tuple[Config, Overlay]:
        with catalog.transaction():  # "unused" checked and the delete done at one state of the database
            stored_overlay = catalog.overlay()
            in_file = name in kind.effective(live.file_config)
            if (catalog.provider(name) if kind is PROVIDERS else catalog.route(name)) is None:
                if in_file:
                    raise Conflict(f"{kind.word} {_shown(req, name)} is defined in the config file, not in the "
                                   "database: change the file and reload to remove it", code="defined_in_config")
                raise _not_found(req, kind.word, name)
            if kind is PROVIDERS and not in_file:
                routes = _state(live, stored_overlay).routes
                users = sorted(r.name for r in routes.values() if any(s.provider == name for s in r.steps))
                if users:
                    raise Conflict(f"provider {_shown(req, name)} is used by route(s) {', '.join(users)}: change "
                                   "or delete them first", code="provider_in_use", extra={"routes": users})
            overlay = kind.overlay(stored_overlay, None, name)
            merged = _merged(live, overlay, stored_overlay, kind, None)
            if kind is PROVIDERS:
                catalog.delete_provider(name, actor)
            else:
                catalog.delete_route(name, actor)
        return merged, overlay

    merged, overlay = await _in_db(req, write)
    await _after_write(live)
    restored = kind.render(merged, name, live.file_config, overlay) if name in kind.effective(merged) else None
    return Answer({"object": kind.word, "name": name, "deleted": True, "restored": restored})


# -- providers ---------------------------------------------------------------------------------------------

async def list_providers(req: AdminRequest) -> Answer:
    """``GET providers?source=&type=&limit=&cursor=``: the effective providers, by name."""
    only(req, ("source", "type", *_PAGE))
    source = req.q_str("source", choices=SOURCES)
    ptype = req.q_str("type", choices=sorted(PROVIDER_TYPES))
    gateway, file_config, overlay = current(req)
    return await _list(req, PROVIDERS, lambda r: (source is None or r["source"] == source)
                       and (ptype is None or r["type"] == ptype), gateway.config, file_config, overlay)


async def get_provider(req: AdminRequest) -> Answer:
    """``GET providers/{name}``."""
    return await _get(req, PROVIDERS)


async def create_provider(req: AdminRequest) -> Answer:
    """``POST providers``: 201; 409 when the database has one of that name (a file's name is allowed: the new
    one overrides it)."""
    return await _write(req, PROVIDERS, "create")


async def put_provider(req: AdminRequest) -> Answer:
    """``PUT providers/{name}``: the whole provider (201 when new); secrets sent as read are kept."""
    return await _write(req, PROVIDERS, "put")


async def patch_provider(req: AdminRequest) -> Answer:
    """``PATCH providers/{name}``: fields merged into the stored one (RFC 7396: null removes one); a provider the
    file defines gets a database entry made from the file's."""
    return await _write(req, PROVIDERS, "patch")


async def delete_provider(req: AdminRequest) -> Answer:
    """``DELETE providers/{name}``: the database entry (the file's comes back); 409 for a provider only the file
    defines, and for one an effective route would still use."""
    return await _delete(req, PROVIDERS)


async def test_provider(req: AdminRequest) -> Answer:
    """``POST providers/{name}/test {"model"?}``: one chat request of one token ("ping", max_tokens 1) through the
    provider as built now, to ``model`` or the first model a route uses it with: ``{ok, status, latency_ms,
    model, error}`` (the error redacted and shortened, as routing shows one)."""
    only(req, ())
    body = req.json(allowed=("model",))
    name = req.params["name"]
    gateway, _, _ = current(req)
    provider = gateway.providers.get(name)
    if provider is None:
        raise _not_found(req, "provider", name)
    model = body.get("model")
    timeout = TEST_TIMEOUT
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise invalid(["body.model: must be a non-empty string"])
    if model is None:
        used = next((s for r in gateway.config.routes.values() for s in r.steps if s.provider == name), None)
        if used is None:
            raise invalid([f"body.model: required: no route uses provider {_shown(req, name)}, so there is no "
                           "model to test it with"])
        model, timeout = used.model, min(used.timeout, TEST_TIMEOUT)
    step = Step(provider=name, model=model, timeout=timeout)
    attempt = Attempt(0, name, model)
    chat = {"model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    started = time.perf_counter()
    try:
        with anyio.fail_after(timeout):
            await provider.complete(prepare_body(chat, step), step)
    except ClientGone:
        raise
    except Exception as exc:  # noqa: BLE001 (as a route step fails: StepFailed, UpstreamError, TimeoutError, a bug)
        gateway.router._failed(req.ctx, attempt, exc, step)  # the status and the redacted, shortened error
    else:
        attempt.ok, attempt.status = True, 200
    latency = round((time.perf_counter() - started) * 1000, 2)
    return Answer({"object": "provider.test", "provider": name, "ok": attempt.ok, "status": attempt.status,
                   "latency_ms": latency, "model": model, "error": attempt.error})


# -- routes ------------------------------------------------------------------------------------------------

async def list_routes(req: AdminRequest) -> Answer:
    """``GET routes?source=&provider=&limit=&cursor=``: the effective routes, by name (``provider``: those with a
    step on it)."""
    only(req, ("source", "provider", *_PAGE))
    source = req.q_str("source", choices=SOURCES)
    provider = req.q_str("provider")
    gateway, file_config, overlay = current(req)
    config = gateway.config

    def keep(r: dict[str, Any]) -> bool:
        return (source is None or r["source"] == source) and (
            provider is None or any(s.provider == provider for s in config.routes[r["name"]].steps))

    return await _list(req, ROUTES_KIND, keep, config, file_config, overlay)


async def get_route(req: AdminRequest) -> Answer:
    """``GET routes/{name}``."""
    return await _get(req, ROUTES_KIND)


async def create_route(req: AdminRequest) -> Answer:
    """``POST routes``: 201; 409 when the database has one of that name."""
    return await _write(req, ROUTES_KIND, "create")


async def put_route(req: AdminRequest) -> Answer:
    """``PUT routes/{name}``: the whole route (201 when new)."""
    return await _write(req, ROUTES_KIND, "put")


async def patch_route(req: AdminRequest) -> Answer:
    """``PATCH routes/{name}``: fields merged into the stored route (``steps`` replaced whole)."""
    return await _write(req, ROUTES_KIND, "patch")


async def delete_route(req: AdminRequest) -> Answer:
    """``DELETE routes/{name}``: the database entry (the file's comes back); 409 for a route only the file defines."""
    return await _delete(req, ROUTES_KIND)


ROUTES: list[Route] = [
    ("GET", ("providers",), list_providers),
    ("POST", ("providers",), create_provider),
    ("GET", ("providers", "{name}"), get_provider),
    ("PUT", ("providers", "{name}"), put_provider),
    ("PATCH", ("providers", "{name}"), patch_provider),
    ("DELETE", ("providers", "{name}"), delete_provider),
    ("POST", ("providers", "{name}", "test"), test_provider),
    ("GET", ("routes",), list_routes),
    ("POST", ("routes",), create_route),
    ("GET", ("routes", "{name}"), get_route),
    ("PUT", ("routes", "{name}"), put_route),
    ("PATCH", ("routes", "{name}"), patch_route),
    ("DELETE", ("routes", "{name}"), delete_route),
]

__all__ = ["DESTINATION", "READ_ONLY", "ROUTES", "entry_spec", "file_entry", "keep_base_url", "keep_secrets",
           "kept_for_new_destination", "mask_base_url", "mask_url", "masked", "merge_patch", "render_provider",
           "render_route"]
