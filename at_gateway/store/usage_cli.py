"""``at-gateway usage``: requests, tokens and cost from the daily aggregates, as a table.

Reads ``usage_daily`` (one row per day, key, route, provider and model, the day in
``budget_timezone``) through a read-only connection, so it is cheap and safe while serving. What the
running gateways have not flushed yet (at most the last batch interval, 200 ms) is not in it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sqlite3
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

from ..config import Config
from .db_cli import open_existing
from .usage import today

_SINCE = re.compile(r"^(\d+)([dw])$")
_BY = {"day": "u.day", "route": "u.route", "model": "u.model", "key": "u.key_id"}
_NUMBERS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens",
            "cost_nanousd", "unpriced")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="at-gateway usage", description="requests, tokens and cost per day, route, "
                                "model or key (days in budget_timezone)")
    p.add_argument("--key", help="only this key id (a client key's id, or key0.. for the config's api_keys)")
    p.add_argument("--since", default="7d", help="7d (the last 7 days, today included), 2w, or a date "
                   "YYYY-MM-DD (default 7d)")
    p.add_argument("--by", choices=tuple(_BY), default="day", help="one row per ... (default day)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    return p


def first_day(since: str, tz_name: str, now: float | None = None) -> dt.date:
    """The first day ``--since`` covers: ``Nd`` = today and the N-1 days before, ``Nw`` = 7N days."""
    m = _SINCE.match(since.strip().lower())
    if m:
        if len(m.group(1)) > 7:
            raise ValueError("at most 9999999d")
        n = int(m.group(1)) * (7 if m.group(2) == "w" else 1)
        if n < 1:
            raise ValueError("must cover at least one day (1d)")
        try:
            return today(tz_name, now) - dt.timedelta(days=n - 1)
        except OverflowError:  # before year 1: everything there is
            return dt.date.min
    try:
        return dt.date.fromisoformat(since.strip())
    except ValueError:
        raise ValueError(f"{since[:30]!r} is not 7d, 2w or a date YYYY-MM-DD") from None


def usd(nanousd: int) -> str:
    """Nano-dollars as dollars with six decimals (exact: Decimal, never a float)."""
    return f"${(Decimal(nanousd) / Decimal(10**9)).quantize(Decimal('0.000001'))}"


def query(conn: sqlite3.Connection, since: dt.date, by: str, key: str | None = None) -> list[dict[str, Any]]:
    """One dict per group: the group's value and the summed counters (cost in nano-dollars)."""
    column = _BY[by]
    label = column
    join = ""
    if by == "key":
        has_keys = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'keys'").fetchone()
        if has_keys:
            join = " LEFT JOIN keys k ON k.id = u.key_id"
            label = "u.key_id, max(k.name)"
    if by != "key" or not join:
        label = f"{column}, NULL"
    sums = ", ".join(f"sum(u.{n})" for n in _NUMBERS)
    where = "u.day >= ?"
    params: list[Any] = [since.isoformat()]
    if key:
        where += " AND u.key_id = ?"
        params.append(key)
    order = "1" if by == "day" else "9 DESC, 3 DESC, 1"  # days in order; the rest by cost, then requests
    sql = (f"SELECT {label}, {sums} FROM usage_daily u{join} WHERE {where} "  # noqa: S608 (fixed columns)
           f"GROUP BY {column} ORDER BY {order}")
    out = []
    for row in conn.execute(sql, params):
        item: dict[str, Any] = {by: row[0]}
        if by == "key":
            item["name"] = row[1]
        item.update(zip(_NUMBERS, (int(v or 0) for v in row[2:]), strict=True))
        out.append(item)
    return out


def render(rows: list[dict[str, Any]], by: str) -> str:
    """The rows as an aligned table with a total line."""
    head = [by, *(["name"] if by == "key" else []), "requests", "errors", "prompt", "completion", "cached",
            "reasoning", "cost", "unpriced"]
    body: list[list[str]] = []
    total = dict.fromkeys(_NUMBERS, 0)
    for r in rows:
        for n in _NUMBERS:
            total[n] += r[n]
        body.append(_cells(r, by))
    lines = [head, *body]
    if rows:
        lines.append(_cells({by: "total", "name": "", **total}, by))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text_columns = 2 if by == "key" else 1
    out = []
    for i, line in enumerate(lines):
        cells = [c.ljust(w) if j < text_columns else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths,
                                                                                             strict=True))]
        out.append("  ".join(cells).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    if not rows:
        out.append("(no usage in this period)")
    return "\n".join(out)


def _cells(r: dict[str, Any], by: str) -> list[str]:
    cells = [str(r[by] if r[by] not in (None, "") else "-")]
    if by == "key":
        cells.append(str(r.get("name") or ""))
    cells += [f"{r[n]:,}" for n in ("requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens",
                                    "reasoning_tokens")]
    cells += [usd(r["cost_nanousd"]), f"{r['unpriced']:,}"]
    return cells


def main(argv: list[str], config: Config) -> int:
    """``usage [--key ID] [--since 7d] [--by day|route|model|key] [--json]``; the exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        since = first_day(args.since, config.budget_timezone)
    except ValueError as exc:
        print(f"at-gateway usage: --since: {exc}", file=sys.stderr)
        return 2
    conn = open_existing(config, "usage")
    if conn is None:
        return 1
    try:
        rows = query(conn, since, args.by, args.key)
    except sqlite3.Error as exc:
        print(f"at-gateway usage: {config.store.path}: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    if args.json:
        for r in rows:
            print(json.dumps(r, sort_keys=True))
        return 0
    scope = f" for key {args.key}" if args.key else ""
    print(f"usage{scope} in {Path(config.store.path).resolve()} since {since.isoformat()} "
          f"({config.budget_timezone}), by {args.by}; cost in USD, unpriced = requests of models without a price")
    print(render(rows, args.by))
    return 0
