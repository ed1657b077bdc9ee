"""Admin API: ``usage`` (daily aggregates with cost), ``requests`` (the request log) and ``audit`` (admin writes).

Read-only, plain SQL on the catalog's connection (in a thread, through :meth:`AdminRequest.db`). Each query
says which index it walks: the request log grows by a row per request, so a page is read from an index in
order and stops at ``limit``, never sorted whole. Money is integer nano-USD in the database; answers carry
it as ``cost_nanousd`` and as ``cost_usd``, an exact decimal string (``"0.000000750"``), never a float.

Pages are ``limit`` + ``cursor``; the cursor is the sort key of the last row given, so rows written while a
client walks the pages (the newest, at the front) neither shift nor repeat what it has not read yet.

``usage?format=csv`` is the same query as a CSV download (every group at once, no pages; by default one line
per stored group: day, key, route, provider and model), for a spreadsheet: names that a spreadsheet would
take for a formula (``=``, ``+``, ``-``, ``@`` first) are prefixed with ``'``.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import re
import sqlite3
import time
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

import anyio

from ..errors import BadRequest, NotFound
from ..logs import quote
from ..store.usage import day_function
from ..store.usage import today as today_in
from .api import AdminRequest, Answer, Route, listing, parse_time

#: ``group_by`` values and their columns in ``usage_daily``.
GROUPS = {"day": "day", "key": "key_id", "route": "route", "provider": "provider", "model": "model"}
_NUMBERS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens",
            "cost_nanousd", "unpriced")
_RELATIVE = re.compile(r"^(\d{1,7})([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_STATUS = re.compile(r"^([1-5])(\d\d|xx)$")
_PAGE = ("limit", "cursor")
MAX_CSV_ROWS = 200_000  # groups in one CSV export (the daily aggregates: days x keys x routes x models)
_CSV_GROUPS = "day,key,route,provider,model"  # format=csv without group_by: the stored groups
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


# -- query values ----------------------------------------------------------------------------------------

def _bad(message: str) -> BadRequest:
    return BadRequest(message, code="invalid_query")


def _only(req: AdminRequest, allowed: Iterable[str]) -> None:
    """A misspelt filter (``staus=500``) is an error, not every row."""
    allowed = tuple(allowed)
    unknown = sorted(k for k in req.query if k not in allowed)
    if unknown:
        shown = ", ".join(quote(req.gateway.redact, k, 40) for k in unknown)
        raise _bad(f"unknown query parameter(s) {shown} (allowed: {', '.join(allowed)})")


def _usd(nanousd: int) -> str:
    return f"{Decimal(nanousd).scaleb(-9):f}"


def _iso(stamp: float) -> str:
    """Unix time as ISO 8601 UTC with milliseconds (what ``since``/``until`` take back)."""
    try:
        return dt.datetime.fromtimestamp(stamp, dt.timezone.utc).isoformat(timespec="milliseconds").replace(
            "+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return f"unix time {stamp:g}"


def _time(req: AdminRequest, name: str) -> float | None:
    """A time: unix seconds, ISO 8601 (a date is its midnight UTC), or ``15m``/``24h``/``7d``/``2w`` ago."""
    value = req.query.get(name)
    if value is None:
        return None
    m = _RELATIVE.match(value.strip().lower())
    if m:
        return time.time() - int(m.group(1)) * _SECONDS[m.group(2)]
    stamp = req.q_time(name)
    if stamp is not None and not math.isfinite(stamp):  # "nan" and "inf" are floats to Python
        raise _bad(f"query parameter {name}: must be a finite time")
    return stamp


def _day(req: AdminRequest, name: str, tz_name: str) -> str | None:
    """A day (``YYYY-MM-DD`` in ``budget_timezone``) for the daily aggregates: a date, ``7d`` (today and the
    6 days before; ``1d`` is today), ``2w``, or a time (its day)."""
    value = req.query.get(name)
    if value is None:
        return None
    text = value.strip().lower()
    m = _RELATIVE.match(text)
    if m and m.group(2) in "dw":
        n = int(m.group(1)) * (7 if m.group(2) == "w" else 1)
        if n < 1:
            raise _bad(f"query parameter {name}: must cover at least one day (1d)")
        try:
            return (today_in(tz_name) - dt.timedelta(days=n - 1)).isoformat()
        except OverflowError:
            return dt.date.min.isoformat()
    if _DATE.match(text):
        try:
            return dt.date.fromisoformat(text).isoformat()
        except ValueError:
            raise _bad(f"query parameter {name}: {quote(req.gateway.redact, value, 40)} is not a date") from None
    stamp = parse_time(value, f"query parameter {name}", req.gateway.redact)
    try:
        return day_function(tz_name)(stamp)
    except (OverflowError, OSError, ValueError):
        raise _bad(f"query parameter {name}: {quote(req.gateway.redact, value, 40)} is out of range") from None


def _cursor(values: list[Any] | None, kinds: tuple[type | tuple[type, ...], ...], what: str) -> list[Any] | None:
    if values is None:
        return None
    if len(values) != len(kinds) or any(isinstance(v, bool) or not isinstance(v, k)
                                        for v, k in zip(values, kinds, strict=True)):
        raise _bad(f"query parameter cursor: not a cursor of {what} (use next_cursor as it came)")
    return values


# -- usage -----------------------------------------------------------------------------------------------

def _groups(req: AdminRequest, default: str) -> list[str]:
    groups = [g.strip() for g in req.query.get("group_by", default).split(",")]
    bad = [g for g in groups if g not in GROUPS]
    if bad or not groups:
        raise _bad(f"query parameter group_by: {quote(req.gateway.redact, ','.join(bad), 60)!r} is not one of "
                   f"{', '.join(GROUPS)} (a comma list, such as day,route)")
    if len(set(groups)) != len(groups):
        raise _bad("query parameter group_by: a group is named twice")
    return groups


def _usage_filters(req: AdminRequest) -> tuple[str | None, str | None, dict[str, str]]:
    tz = req.gateway.config.budget_timezone
    since, until = _day(req, "since", tz), _day(req, "until", tz)
    filters = {col: req.query[name] for name, col in (("key", "key_id"), ("route", "route"),
                                                      ("provider", "provider"), ("model", "model"))
               if name in req.query}
    return since, until, filters


async def usage(req: AdminRequest) -> Answer:
    """``GET usage?group_by=day,route&since=7d&until=&key=&route=&provider=&model=``: one row per group with
    requests, errors, tokens and cost (days in ``budget_timezone``; since and until are inclusive days);
    ``format=csv``: every group as CSV (:func:`usage_csv`)."""
    _only(req, ("group_by", "since", "until", "key", "route", "provider", "model", "format", *_PAGE))
    if req.q_str("format", "json", ("json", "csv")) == "csv":
        return await usage_csv(req)
    groups = _groups(req, "day")
    limit, after = req.page()
    after = _cursor(after, (str,) * len(groups), "GET usage with this group_by")
    since, until, filters = _usage_filters(req)

    catalog = req.catalog

    def read() -> dict[str, Any]:
        conn = catalog.conn
        sql, args = usage_sql(groups, since, until, filters, after, limit)
        rows = conn.execute(sql, args).fetchall()
        total_sql, total_args = usage_sql([], since, until, filters, None, 0)
        total = conn.execute(total_sql, total_args).fetchone()
        named = "key" in groups
        data = []
        for row in rows[:limit]:
            item: dict[str, Any] = dict(zip(groups, row[:len(groups)], strict=True))
            rest = row[len(groups):]
            if named:
                item["key_name"] = rest[0]
                rest = rest[1:]
            item.update(_numbers(rest))
            data.append(item)
        more = len(rows) > limit
        out = listing(data, list(rows[limit - 1][:len(groups)]) if more else None)
        out.update(group_by=groups, since=since, until=until, total=_numbers(total))
        return out

    return Answer(await req.db(read))


def _cell(value: Any) -> Any:
    """A text cell a spreadsheet will not run: a leading ``=``, ``+``, ``-``, ``@`` (a formula) gets a ``'``."""
    if isinstance(value, str) and value.startswith(_FORMULA):
        return "'" + value
    return value


async def usage_csv(req: AdminRequest) -> Answer:
    """``GET usage?format=csv``: the groups of ``GET usage`` (the same ``group_by``, by default every stored
    group, and the same filters) as ``text/csv`` with a header line, as an attachment; money as exact
    decimal dollars. No pages: at most :data:`MAX_CSV_ROWS` groups, else 400 (narrow with since/until)."""
    paged = [p for p in _PAGE if p in req.query]
    if paged:
        raise _bad(f"query parameter(s) {', '.join(paged)}: format=csv answers every row at once (no pages)")
    groups = _groups(req, _CSV_GROUPS)
    since, until, filters = _usage_filters(req)
    catalog = req.catalog

    def read() -> list[tuple[Any, ...]]:
        sql, args = usage_sql(groups, since, until, filters, None, MAX_CSV_ROWS)
        return list(catalog.conn.execute(sql, args).fetchall())

    rows = await req.db(read)
    if len(rows) > MAX_CSV_ROWS:
        raise _bad(f"more than {MAX_CSV_ROWS} groups: narrow the export with since/until or fewer group_by fields")
    # Seconds of work at the cap: in a thread (not the catalog's: its lock is not held while formatting), so the
    # event loop keeps answering this worker's requests meanwhile.
    raw = await anyio.to_thread.run_sync(_csv_bytes, groups, rows)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d")
    return Answer(None, raw=raw, headers=[
        (b"content-type", b"text/csv; charset=utf-8"),
        (b"content-disposition", f'attachment; filename="at-gateway-usage-{stamp}.csv"'.encode())])


_CSV_NUMBERS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens",
                "tokens", "cost_usd", "unpriced")


def _csv_bytes(groups: list[str], rows: list[tuple[Any, ...]]) -> bytes:
    """The export's UTF-8 bytes: a header line, then one line per group (RFC 4180 line ends); text cells that a
    spreadsheet would run as a formula are quoted (:func:`_cell`). Runs in a worker thread."""
    named = "key" in groups
    head = [*groups]
    if named:
        head.insert(groups.index("key") + 1, "key_name")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")  # RFC 4180
    writer.writerow([*head, *_CSV_NUMBERS])
    for row in rows:
        cells: list[Any] = [_cell(v) for v in row[:len(groups)]]
        rest = row[len(groups):]
        if named:
            cells.insert(groups.index("key") + 1, _cell(rest[0]) if rest[0] is not None else "")
            rest = rest[1:]
        n = _numbers(rest)
        writer.writerow([*cells, *(n[k] for k in _CSV_NUMBERS)])
    return out.getvalue().encode("utf-8")


def usage_sql(groups: list[str], since: str | None, until: str | None, filters: dict[str, str],
              after: list[Any] | None, limit: int) -> tuple[str, list[Any]]:
    """The query of one page of ``GET usage`` (no groups: the total over every group, unpaged)."""
    where: list[str] = []
    args: list[Any] = []
    if since is not None:
        where.append("u.day >= ?")
        args.append(since)
    if until is not None:
        where.append("u.day <= ?")
        args.append(until)
    for col, value in filters.items():
        where.append(f"u.{col} = ?")
        args.append(value)
    cols = [f"u.{GROUPS[g]}" for g in groups]
    sums = ", ".join(f"sum(u.{n})" for n in _NUMBERS)
    # Index: with a key, usage_daily_key_day (key_id, day); else the primary key (day, key_id, route, provider,
    # model) for the day range (a full scan without since/until). Grouping by anything but day first sorts
    # the groups (a temporary b-tree): the table has a row per day, key, route and model, not per request.
    if not cols:
        return f"SELECT {sums} FROM usage_daily u" + (" WHERE " + " AND ".join(where) if where else ""), args
    if after is not None:
        where.append(f"({', '.join(cols)}) > ({', '.join('?' * len(cols))})")  # the groups after the cursor
        args += after
    named = "key" in groups
    sql = (f"SELECT {', '.join(cols)}{', max(k.name)' if named else ''}, {sums} FROM usage_daily u"  # noqa: S608
           + (" LEFT JOIN keys k ON k.id = u.key_id" if named else "")
           + (" WHERE " + " AND ".join(where) if where else "")
           + f" GROUP BY {', '.join(cols)} ORDER BY {', '.join(cols)} LIMIT ?")
    return sql, [*args, limit + 1]


def _numbers(values: Iterable[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {n: int(v or 0) for n, v in zip(_NUMBERS, values, strict=True)}
    out["tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    out["cost_usd"] = _usd(out["cost_nanousd"])
    return out


# -- the request log -------------------------------------------------------------------------------------

_LOG_COLUMNS = ("r.id, r.time, r.request_id, r.key_id, k.name, r.method, r.path, r.route, r.provider, r.model, "
                "r.status, r.outcome, r.attempts, r.latency_ms, r.ttfb_ms, r.stream, r.prompt_tokens, "
                "r.completion_tokens, r.cached_tokens, r.reasoning_tokens, r.cost_nanousd, r.error, r.metadata, "
                "r.failed_attempts")


def _loads(text: Any) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return {"unreadable": str(text)[:200]}


def _request(row: tuple[Any, ...], *, detail: bool) -> dict[str, Any]:
    (_rowid, stamp, request_id, key_id, key_name, method, path, route, provider, model, status, outcome, attempts,
     latency, ttfb, stream, p, c, cached, reasoning, cost, error, metadata, failed) = row
    out: dict[str, Any] = {
        "object": "request", "id": request_id, "time": _iso(stamp), "key": key_id, "key_name": key_name,
        "method": method, "path": path, "route": route, "provider": provider, "model": model, "status": status,
        "outcome": outcome, "stream": bool(stream), "attempts": attempts, "latency_ms": latency, "ttfb_ms": ttfb,
        "prompt_tokens": p, "completion_tokens": c, "cached_tokens": cached, "reasoning_tokens": reasoning,
        "cost_nanousd": cost, "cost_usd": _usd(cost) if isinstance(cost, int) else None, "error": error,
        "metadata": _loads(metadata),
    }
    if detail:
        out["failed_attempts"] = _loads(failed) or []
    return out


def _status_filter(req: AdminRequest) -> tuple[str, list[int]] | None:
    value = req.query.get("status")
    if value is None:
        return None
    m = _STATUS.match(value.strip().lower())
    if not m:
        raise _bad(f"query parameter status: {quote(req.gateway.redact, value, 20)!r} is not a status (such as 200, "
                   "429) or a class (4xx, 5xx)")
    if m.group(2) == "xx":
        lo = int(m.group(1)) * 100
        return "r.status BETWEEN ? AND ?", [lo, lo + 99]
    return "r.status = ?", [int(value)]


def requests_sql(filters: list[tuple[str, Any]], status: tuple[str, list[int]] | None, since: float | None,
                 until: float | None, after: list[Any] | None, limit: int) -> tuple[str, list[Any]]:
    """The query of one page of ``GET requests``, newest first."""
    where = [sql for sql, _ in filters]
    args: list[Any] = [v for _, v in filters]
    if status is not None:
        where.append(status[0])
        args += status[1]
    if since is not None:
        where.append("r.time >= ?")
        args.append(since)
    if until is not None:
        where.append("r.time < ?")
        args.append(until)
    if after is not None:
        # The bare bound gives the index its range; the OR breaks the tie on time by id.
        where.append("r.time <= ? AND (r.time < ? OR r.id < ?)")
        args += [after[0], after[0], after[1]]
    # Index: with a key, request_log_key_time (key_id, time): the key's rows in time order; else request_log_time
    # (time), walked backwards from the newest. Both end with the rowid (id), so ORDER BY time DESC, id DESC is
    # the index's order and the walk stops at LIMIT: route, provider, model and status are checked on the rows
    # walked. keys: its primary key, one lookup per row.
    sql = (f"SELECT {_LOG_COLUMNS} FROM request_log r LEFT JOIN keys k ON k.id = r.key_id"  # noqa: S608
           + (" WHERE " + " AND ".join(where) if where else "")
           + " ORDER BY r.time DESC, r.id DESC LIMIT ?")
    return sql, [*args, limit + 1]


async def requests(req: AdminRequest) -> Answer:
    """``GET requests?key=&route=&provider=&model=&status=4xx&since=&until=``: the request log, newest first
    (``since`` inclusive, ``until`` exclusive)."""
    _only(req, ("key", "route", "provider", "model", "status", "since", "until", *_PAGE))
    limit, after = req.page()
    after = _cursor(after, ((int, float), int), "GET requests")
    since, until = _time(req, "since"), _time(req, "until")
    status = _status_filter(req)
    filters = [(f"r.{col} = ?", req.query[name]) for name, col in (("key", "key_id"), ("route", "route"),
                                                                   ("provider", "provider"), ("model", "model"))
               if name in req.query]

    catalog = req.catalog

    def read() -> dict[str, Any]:
        sql, args = requests_sql(filters, status, since, until, after, limit)
        rows = catalog.conn.execute(sql, args).fetchall()
        more = len(rows) > limit
        last = rows[limit - 1] if more else None
        return listing([_request(r, detail=False) for r in rows[:limit]],
                       [last[1], last[0]] if last is not None else None)

    return Answer(await req.db(read))


async def request_detail(req: AdminRequest) -> Answer:
    """``GET requests/{request_id}``: one row with its failed attempts (the newest, should a client have sent
    the same x-request-id twice)."""
    _only(req, ())
    request_id = req.params["request_id"]
    catalog = req.catalog

    def read() -> tuple[Any, ...] | None:
        # Index: request_log_time, newest first, until the first match: at once for a recent request, a scan
        # of the log for an old or unknown id (an index on request_id would cost every request's write).
        row: tuple[Any, ...] | None = catalog.conn.execute(
            f"SELECT {_LOG_COLUMNS} FROM request_log r LEFT JOIN keys k ON k.id = r.key_id "  # noqa: S608
            "WHERE r.request_id = ? ORDER BY r.time DESC, r.id DESC LIMIT 1", (request_id,)).fetchone()
        return row

    row = await req.db(read)
    if row is None:
        raise NotFound(f"no request {quote(req.gateway.redact, request_id, 128)!r} in the request log (it keeps "
                       "request_log.retention; rows reach it within the store's batch interval)",
                       code="request_not_found")
    return Answer(_request(row, detail=True))


# -- the audit log ---------------------------------------------------------------------------------------

async def audit(req: AdminRequest) -> Answer:
    """``GET audit?actor=&action=&object=&since=&until=``: admin writes, newest first."""
    _only(req, ("actor", "action", "object", "since", "until", *_PAGE))
    limit, after = req.page()
    after = _cursor(after, (int,), "GET audit")
    since, until = _time(req, "since"), _time(req, "until")
    catalog = req.catalog
    actor, action, object_id = req.query.get("actor"), req.query.get("action"), req.query.get("object")

    def read() -> list[dict[str, Any]]:
        # Index: audit_log's primary key (id), newest first (see Catalog.audit_rows).
        rows: list[dict[str, Any]] = catalog.audit_rows(limit + 1, after[0] if after else None, actor=actor,
                                                        action=action, object_id=object_id, since=since,
                                                        until=until)
        return rows

    rows = await req.db(read)
    more = len(rows) > limit
    data = [{**r, "id": str(r["id"]), "time": _iso(r["time"]), "change": _public(r["change"])} for r in rows[:limit]]
    return Answer(listing(data, [int(rows[limit - 1]["id"])] if more else None))


def _public(change: Any) -> Any:
    """An audit row's change as reads show it: a provider's base_url with its credentials masked, as the
    providers reads show it (the row holds the spec with the store's secrets replaced, not the URL's)."""
    if isinstance(change, dict) and isinstance(change.get("base_url"), str):
        from .catalog import mask_base_url

        return {**change, "base_url": mask_base_url(change["base_url"])}
    return change


def explain(conn: sqlite3.Connection, sql: str, args: Iterable[Any] = ()) -> str:
    """sqlite's plan for ``sql`` as one line (for tests and for checking a query's index by hand)."""
    return "; ".join(str(r[-1]) for r in conn.execute("EXPLAIN QUERY PLAN " + sql, tuple(args)))


ROUTES: list[Route] = [
    ("GET", ("usage",), usage),
    ("GET", ("requests",), requests),
    ("GET", ("requests", "{request_id}"), request_detail),
    ("GET", ("audit",), audit),
]

__all__ = ["GROUPS", "MAX_CSV_ROWS", "ROUTES", "explain", "requests_sql", "usage_csv", "usage_sql"]
