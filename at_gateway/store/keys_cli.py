"""``at-gateway keys ...``: client keys in the store, changed while the gateway runs.

Every change is one short transaction on the database file; running gateways (every worker) poll
``keys_version`` and pick it up within a second, with no reload. The key itself is printed once, by
``create`` and ``rotate``; nothing else ever shows more than its display prefix.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
import time
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

from ..config import LIMIT_KEYS, Config, Limits
from . import db
from .keys import BUDGET_PERIODS, MAX_BUDGET_NANOUSD, MAX_COUNT, MAX_EXPIRES_AT, KeyStore, KeyStoreError, StoredKey

NANO = 10**9
_CLEAR = ("none", "null", "-")
_EXPIRY_PART = re.compile(r"(\d+)([wdhms])")
_EXPIRY_UNIT = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
_TOO_LATE = "must be before 9999-12-31T23:59:59Z (or 'never')"
_LIMIT_HELP = {"rpm": "requests per minute", "rph": "requests per hour", "rpd": "requests per day",
               "tpm": "tokens (prompt + completion) per minute", "tpd": "tokens (prompt + completion) per day"}


class _Usage(Exception):
    """A bad option value: exit status 2 with the message."""


# -- option values ---------------------------------------------------------------

def _count(text: str) -> int | None:
    if text.strip().lower() in _CLEAR:
        return None
    t = text.strip()
    if len(t) > 20:  # more digits than any allowed value (and than int() reads without a limit)
        raise argparse.ArgumentTypeError(f"must be at most {MAX_COUNT}")
    try:
        n = int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:30]!r} is not a whole number (or 'none' to clear)") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be 1 or more (or 'none' to clear)")
    if n > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_COUNT}")
    return n


def _budget(text: str) -> int | None:
    """USD (``10``, ``2.50``, ``$5``) as integer nano-dollars; never through a float."""
    t = text.strip().lstrip("$")
    if t.lower() in _CLEAR:
        return None
    try:
        d = Decimal(t)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text[:30]!r} is not an amount in USD (e.g. 10 or 2.50)") from None
    if not d.is_finite() or d < 0:
        raise argparse.ArgumentTypeError("must be an amount in USD, 0 or more")
    if d > MAX_BUDGET_NANOUSD // NANO:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_BUDGET_NANOUSD // NANO} USD")
    return int((d * NANO).to_integral_value(ROUND_HALF_EVEN))


def _expiry(text: str) -> float | None:
    """``30d``, ``12h``, ``2w``, ``1d12h`` from now; an ISO date or time (UTC unless it says); ``never``."""
    t = text.strip()
    if t.lower() in (*_CLEAR, "never"):
        return None
    pos, seconds = 0, 0
    for m in _EXPIRY_PART.finditer(t):
        if m.start() != pos:
            break
        seconds += int(m.group(1)) * _EXPIRY_UNIT[m.group(2)]
        pos = m.end()
    if pos == len(t) and pos:
        if seconds <= 0:
            raise argparse.ArgumentTypeError("must be in the future (e.g. 30d)")
        if seconds > MAX_EXPIRES_AT - time.time():
            raise argparse.ArgumentTypeError(_TOO_LATE)
        return time.time() + seconds
    try:
        when = dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a time: use 30d, 12h, 2w, an ISO date "
                                         "(2027-01-31, 2027-01-31T12:00Z) or 'never'") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    try:
        stamp = when.timestamp()
    except (OverflowError, ValueError):  # 9999-12-31T23:00-05:00 is in year 10000 in UTC
        raise argparse.ArgumentTypeError(_TOO_LATE) from None
    if stamp <= time.time():
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is in the past")
    if stamp > MAX_EXPIRES_AT:
        raise argparse.ArgumentTypeError(_TOO_LATE)
    return stamp


def _metadata(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('must be a JSON object, e.g. {"team": "search"}')
    return value


def _name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text.strip()


# -- the parser ----------------------------------------------------------------------

def _settings(p: argparse.ArgumentParser, *, update: bool) -> None:
    """The key's settings as options; none has a default, so only those given reach the namespace (for
    update: an absent option keeps the setting, ``none`` clears it)."""
    clear = " ('none' clears it)" if update else ""
    keep = argparse.SUPPRESS
    p.add_argument("--name", type=_name, required=not update, default=keep, help="what the key is for (shown in lists)")
    p.add_argument("--routes", nargs="+", metavar="PATTERN", default=keep,
                   help="route names it may use, glob patterns such as 'gpt-*' (default: every route; '*' = every)")
    for k in LIMIT_KEYS:
        p.add_argument(f"--{k}", type=_count, metavar="N", default=keep,
                       help=f"{_LIMIT_HELP[k]}{clear} (default: limits: in the config, else none)")
    p.add_argument("--budget", type=_budget, metavar="USD", default=keep, help=f"spending cap per budget period{clear}")
    p.add_argument("--budget-period", choices=BUDGET_PERIODS, default=keep,
                   help="calendar period of the budget (default month)")
    p.add_argument("--max-tokens", type=_count, metavar="N", default=keep,
                   help=f"caps max_tokens / max_completion_tokens sent upstream, fills it when absent{clear}")
    p.add_argument("--system-prompt", metavar="TEXT", default=keep,
                   help=f"a system message put before the client's{clear}")
    p.add_argument("--expires", type=_expiry, metavar="WHEN", default=keep,
                   help="30d, 12h, 2w, an ISO date/time, or 'never'")
    p.add_argument("--metadata", type=_metadata, metavar="JSON", default=keep,
                   help="labels as a JSON object (shown in lists, passed to the request log)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="at-gateway keys", description="Client keys in the store.", allow_abbrev=False)
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    _settings(sub.add_parser("create", parents=[common], allow_abbrev=False, help="make a key (printed once)"),
              update=False)
    sub.add_parser("list", parents=[common], allow_abbrev=False,
                   help="every key: id, name, prefix, limits, usage today, state")
    for action, text in (("show", "one key in full"), ("disable", "refuse it until enabled"),
                         ("enable", "accept a disabled key again"), ("revoke", "refuse it for good"),
                         ("rotate", "a new secret for the same key (printed once); the old one stops working")):
        sp = sub.add_parser(action, parents=[common], allow_abbrev=False, help=text)
        sp.add_argument("id")
    up = sub.add_parser("update", parents=[common], allow_abbrev=False,
                        help="change settings; the secret and usage stay")
    up.add_argument("id")
    _settings(up, update=True)
    return p


# -- output --------------------------------------------------------------------------

def usd(nanousd: int | None) -> str:
    """``$1.50``, ``$0.000750``: at least cents, up to micro-dollars, exact."""
    if nanousd is None:
        return "-"
    d = (Decimal(nanousd) / NANO).quantize(Decimal("0.000001"), ROUND_HALF_EVEN).normalize()
    text = format(d, "f")
    whole, _, frac = text.partition(".")
    return f"${whole}.{frac.ljust(2, '0')}"


def _when(stamp: float | None) -> str | None:
    """A stored time as ISO text; a time no calendar has (a row written by hand or by an older build)
    is shown as the number it is, never an error that would hide every other key."""
    if stamp is None:
        return None
    try:
        return dt.datetime.fromtimestamp(stamp, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"unix time {stamp:g}"


def _zone(config: Config) -> dt.tzinfo:
    if config.budget_timezone == "UTC":
        return dt.timezone.utc
    import zoneinfo

    return zoneinfo.ZoneInfo(config.budget_timezone)


def _period_start(today: dt.date, period: str) -> dt.date:
    if period == "day":
        return today
    if period == "week":
        return today - dt.timedelta(days=today.weekday())  # ISO weeks start on Monday
    return today.replace(day=1)


def _usage(conn: Any, config: Config, key_id: str | None, first_day: str) -> dict[str, dict[str, int]]:
    """Requests, tokens and cost per key from the daily aggregates since ``first_day`` (inclusive)."""
    sql = ("SELECT key_id, sum(requests), sum(prompt_tokens) + sum(completion_tokens), sum(cost_nanousd), "
           "sum(unpriced) FROM usage_daily WHERE day >= ?")
    args: list[Any] = [first_day]
    if key_id is not None:
        sql += " AND key_id = ?"
        args.append(key_id)
    out = {}
    for kid, requests, tokens, cost, unpriced in conn.execute(sql + " GROUP BY key_id", args):
        out[kid] = {"requests": requests or 0, "tokens": tokens or 0, "cost_nanousd": cost or 0,
                    "unpriced": unpriced or 0}
    return out


_NO_USAGE = {"requests": 0, "tokens": 0, "cost_nanousd": 0, "unpriced": 0}


def as_dict(stored: StoredKey, config: Config, today: dict[str, int] | None = None,
            period: dict[str, int] | None = None) -> dict[str, Any]:
    """A key for ``--json`` output (and the admin API to come): never the secret or its hash."""
    k = stored.key
    own = {name: getattr(k.limits, name) for name in LIMIT_KEYS}
    defaults = config.limits.defaults
    effective = {name: own[name] if own[name] is not None else getattr(defaults, name) for name in LIMIT_KEYS}
    out: dict[str, Any] = {
        "id": k.id, "name": k.name, "prefix": k.prefix, "state": stored.state(),
        "routes": list(k.routes) or ["*"],
        "limits": {n: v for n, v in own.items() if v is not None},
        "effective_limits": {n: v for n, v in effective.items() if v is not None},
        "budget_usd": None if k.budget_nanousd is None else usd(k.budget_nanousd)[1:],
        "budget_nanousd": k.budget_nanousd,
        "budget_period": k.budget_period if k.budget_nanousd is not None else None,
        "max_tokens": k.max_tokens, "system_prompt": k.system_prompt, "metadata": k.metadata or {},
        "expires_at": _when(k.expires_at), "created_at": _when(stored.created_at),
        "updated_at": _when(stored.updated_at),
        "usage_today": dict(today or _NO_USAGE),
    }
    if period is not None:
        out["usage_budget_period"] = dict(period)
    return out


def _limits_text(d: dict[str, Any]) -> str:
    parts = []
    for name in LIMIT_KEYS:
        value = d["effective_limits"].get(name)
        if value is not None:
            parts.append(f"{name}={value}" + ("" if name in d["limits"] else "*"))
    return " ".join(parts) or "-"


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _print_list(items: list[dict[str, Any]], path: str) -> None:
    print(f"keys in {path}")
    if not items:
        print("no client keys yet (at-gateway keys create --name NAME)")
        return
    rows = [["ID", "NAME", "PREFIX", "STATE", "ROUTES", "LIMITS", "BUDGET", "TODAY", "METADATA"]]
    for d in items:
        u = d["usage_today"]
        budget = "-" if d["budget_usd"] is None else f"${d['budget_usd']}/{d['budget_period']}"
        rows.append([d["id"], _short(d["name"], 30), d["prefix"], d["state"], _short(",".join(d["routes"]), 40),
                     _limits_text(d), budget, f"{u['requests']} req, {u['tokens']} tok, {usd(u['cost_nanousd'])}",
                     _short(json.dumps(d["metadata"], ensure_ascii=False, separators=(",", ":")), 40)
                     if d["metadata"] else "-"])
    print(_table(rows))
    if any("*" in _limits_text(d) for d in items):
        print("(* from limits: in the config)")


def _print_one(d: dict[str, Any]) -> None:
    u = d["usage_today"]
    lines = [("id", d["id"]), ("name", d["name"]), ("prefix", d["prefix"]), ("state", d["state"]),
             ("routes", ", ".join(d["routes"])), ("limits", _limits_text(d))]
    if d["budget_usd"] is not None:
        spent = d.get("usage_budget_period", _NO_USAGE)["cost_nanousd"]
        lines.append(("budget", f"${d['budget_usd']} per {d['budget_period']} ({usd(spent)} spent this "
                                f"{d['budget_period']})"))
    lines += [("max_tokens", str(d["max_tokens"]) if d["max_tokens"] is not None else "-"),
              ("system_prompt", d["system_prompt"] if d["system_prompt"] is not None else "-"),
              ("metadata", json.dumps(d["metadata"], ensure_ascii=False)),
              ("expires", d["expires_at"] or "never"), ("created", d["created_at"]), ("updated", d["updated_at"]),
              ("today", f"{u['requests']} requests, {u['tokens']} tokens, {usd(u['cost_nanousd'])}"
                        + (f" ({u['unpriced']} unpriced)" if u["unpriced"] else ""))]
    if "*" in lines[5][1]:
        lines[5] = ("limits", lines[5][1] + "  (* from limits: in the config)")
    width = max(len(n) for n, _ in lines)
    for n, v in lines:
        print(f"{n.ljust(width)}  {v}")


# -- main --------------------------------------------------------------------------------

_OPTION_FIELDS = (("name", "name"), ("routes", "routes"), ("budget", "budget_nanousd"),
                  ("budget_period", "budget_period"), ("max_tokens", "max_tokens"), ("system_prompt", "system_prompt"),
                  ("metadata", "metadata"), ("expires", "expires_at"))


def _changes(args: argparse.Namespace, *, update: bool) -> dict[str, Any]:
    """The settings given on the command line, as :class:`KeyStore` arguments."""
    given = vars(args)
    out = {name: given[opt] for opt, name in _OPTION_FIELDS if opt in given}
    if update and isinstance(out.get("system_prompt"), str) and out["system_prompt"].strip().lower() in _CLEAR:
        out["system_prompt"] = None
    limits = {k: given[k] for k in LIMIT_KEYS if k in given}
    if limits:
        out["limits"] = limits if update else Limits(**limits)
    return out


def main(argv: list[str], config: Config) -> int:
    """``at-gateway keys ACTION ...``; the exit status (2: bad usage, 1: the store or the key said no)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    path = config.store.path
    if path == db.MEMORY:
        print("at-gateway keys: store.path is \":memory:\": keys made here would be gone when this command ends; "
              "set store.path (or state_dir) in the config", file=sys.stderr)
        return 1
    if args.action in ("list", "show") and not os.path.exists(path):
        if args.action == "list":
            print("[]" if args.json else f"no client keys yet ({path} does not exist; keys create makes it)")
            return 0
        print(f"at-gateway keys: no key with id {args.id[:40]!r} ({path} does not exist)", file=sys.stderr)
        return 1
    try:
        conn = db.connect(path)
    except db.StoreError as exc:
        print(f"at-gateway keys: {exc}", file=sys.stderr)
        return 1
    try:
        return _run(args, conn, config)
    except (KeyStoreError, ValueError, OverflowError) as exc:
        print(f"at-gateway keys: {exc}", file=sys.stderr)
        return 1
    except db.sqlite3.Error as exc:
        print(f"at-gateway keys: {path}: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()


def _run(args: argparse.Namespace, conn: Any, config: Config) -> int:
    store = KeyStore(conn)
    today_date = dt.datetime.now(_zone(config)).date()
    today = today_date.isoformat()
    secret: str | None = None
    action = args.action
    if action == "list":
        keys = store.list()
        usage = _usage(conn, config, None, today)
        items = [as_dict(s, config, usage.get(s.key.id)) for s in keys]
        if args.json:
            print(json.dumps(items, indent=2, ensure_ascii=False))
        else:
            _print_list(items, _where(config))
        return 0
    if action == "create":
        changes = _changes(args, update=False)
        if "budget_period" in changes and changes.get("budget_nanousd") is None:
            raise ValueError("--budget-period needs --budget")
        stored, secret = store.create(**changes)
    elif action == "update":
        changes = _changes(args, update=True)
        if not changes:
            raise ValueError("nothing to update: give the settings to change (see keys update --help)")
        stored = store.update(args.id, **changes)
    elif action == "rotate":
        stored, secret = store.rotate(args.id)
    if secret is not None:  # first, before anything that could fail: the only time the key can be seen
        if args.json:
            print(f"at-gateway keys: database {_where(config)}", file=sys.stderr)
        else:
            print(f"key: {secret}")
            print("  (shown once: store it now; only its hash is kept)")
            print(f"database: {_where(config)}")
            sys.stdout.flush()
    if action == "show":
        stored = store.get(args.id)
    elif action not in ("create", "update", "rotate"):
        stored = getattr(store, action)(args.id)
    k = stored.key
    try:
        period = None
        if k.budget_nanousd is not None and k.budget_period:
            first = _period_start(today_date, k.budget_period).isoformat()
            period = _usage(conn, config, k.id, first).get(k.id)
        d = as_dict(stored, config, _usage(conn, config, k.id, today).get(k.id), period or dict(_NO_USAGE))
    except Exception:
        if args.json and secret is not None:  # the key exists now: it must be seen, whatever failed after
            print(json.dumps({"key": secret, "id": k.id}, indent=2))
        raise
    if args.json:
        if secret is not None:
            d = {"key": secret, **d}
        print(json.dumps(d, indent=2, ensure_ascii=False))
    else:
        if action in ("disable", "enable", "revoke"):
            print(f"{k.id}: {d['state']} (running gateways see it within a second)")
        _print_one(d)
    return 0


def _where(config: Config) -> str:
    """The database file as opened: a relative store.path names another file from another directory."""
    from pathlib import Path

    return str(Path(config.store.path).resolve())
