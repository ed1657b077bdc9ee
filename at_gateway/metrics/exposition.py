"""The Prometheus text exposition format, version 0.0.4, written by hand (no client library at run time).

What the format asks (https://prometheus.io/docs/instrumenting/exposition_formats/): a ``# HELP`` and a
``# TYPE`` line per family (HELP escapes backslash and newline), then one line per sample,
``name{label="value",...} number``, label values escaping backslash, double quote and newline. A histogram
is written as cumulative ``_bucket`` samples with an ``le`` label ending at ``+Inf`` (equal to the count),
then ``_sum`` and ``_count``. Labels whose value is empty are left out: Prometheus treats an empty value as
no label at all, so writing them would only cost bytes.

Scrapes are rare (every 15 s or so), so this favours clarity over speed; nothing here runs per request.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

Labels = tuple[tuple[str, str], ...]


class Family(NamedTuple):
    """One metric family. ``samples``: ``(labels, value)``; for a histogram the value is
    ``(bounds, counts, sum)`` with ``counts`` per bucket, not cumulative, the last one past every bound."""

    name: str
    kind: str  # counter, gauge, histogram
    help: str
    samples: Sequence[tuple[Labels, Any]]


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def escape_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def number(value: float) -> str:
    """A sample value: integers without a decimal point, floats as Python's shortest repr (which Go's
    ParseFloat, Prometheus's parser, reads back exactly)."""
    if type(value) is int:
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def bound(value: float) -> str:
    """An ``le`` label: as the client libraries write it (``0.01``, ``1.0``), so dashboards that match on it agree."""
    return repr(float(value))


def label_text(labels: Labels) -> str:
    parts = [f'{k}="{escape_value(v)}"' for k, v in labels if v]
    return "{" + ",".join(parts) + "}" if parts else ""


def _histogram(name: str, labels: Labels, value: tuple[Sequence[float], Sequence[int], float],
               out: list[str]) -> None:
    bounds, counts, total = value
    inner = ",".join(f'{k}="{escape_value(v)}"' for k, v in labels if v)
    sep = "," if inner else ""
    running = 0
    for i, b in enumerate(bounds):
        running += counts[i]
        out.append(f'{name}_bucket{{{inner}{sep}le="{bound(b)}"}} {running}\n')
    running += sum(counts[len(bounds):])
    out.append(f'{name}_bucket{{{inner}{sep}le="+Inf"}} {running}\n')
    tail = "{" + inner + "}" if inner else ""
    out.append(f"{name}_sum{tail} {number(total)}\n")
    out.append(f"{name}_count{tail} {running}\n")


def render(families: Iterable[Family]) -> bytes:
    out: list[str] = []
    for f in families:
        out.append(f"# HELP {f.name} {escape_help(f.help)}\n# TYPE {f.name} {f.kind}\n")
        if f.kind == "histogram":
            for labels, value in f.samples:
                _histogram(f.name, labels, value, out)
        else:
            for labels, value in f.samples:
                out.append(f"{f.name}{label_text(labels)} {number(value)}\n")
    return "".join(out).encode("utf-8")
