"""CPU time, memory, open file descriptors and start time of a process, read from /proc (Linux).

Any process of the same user can be read, so the worker answering a scrape reads the other workers' memory and
descriptors (and everything of the supervisor's) fresh, not as old as their last published share. Their CPU time
is a counter: it is taken from their shares, as every counter is, so that a worker's death never makes it drop.
Elsewhere (no /proc) only this process is known, through :mod:`resource`, and its start is when this module
was imported.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

_IMPORTED = time.time()
try:
    _TICKS = os.sysconf("SC_CLK_TCK")
    _PAGE = os.sysconf("SC_PAGE_SIZE")
except (AttributeError, ValueError, OSError):  # not a POSIX system
    _TICKS, _PAGE = 100, 4096
_BOOT: float | None = None


class Stats(NamedTuple):
    cpu: float  # user + system seconds
    rss: int  # resident bytes
    vms: int  # virtual bytes
    fds: int  # open file descriptors
    start: float  # unix time it started


def _boot_time() -> float:
    global _BOOT
    if _BOOT is None:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    _BOOT = float(line.split()[1])
                    break
            else:
                raise OSError("no btime in /proc/stat")
    return _BOOT


def read(pid: int | None = None) -> Stats | None:
    """``pid``'s figures (this process when None); None when it cannot be read (gone, no /proc)."""
    where = f"/proc/{pid if pid is not None else 'self'}"
    try:
        with open(where + "/stat", "rb") as f:
            raw = f.read()
        # after the command name in parentheses (which may hold spaces): field 3 (state) onwards
        fields = raw[raw.rindex(b")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12])) / _TICKS
        start = _boot_time() + int(fields[19]) / _TICKS
        vms = int(fields[20])
        rss = int(fields[21]) * _PAGE
        fds = len(os.listdir(where + "/fd"))
    except (OSError, ValueError, IndexError):
        return None if pid is not None else _fallback()
    return Stats(cpu, rss, vms, fds, start)


def _fallback() -> Stats | None:
    """This process without /proc: CPU from :func:`os.times`, peak memory for RSS, no descriptor count."""
    try:
        import resource

        times = os.times()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        scale = 1 if os.uname().sysname == "Darwin" else 1024  # bytes on macOS, KiB elsewhere
        return Stats(times.user + times.system, peak * scale, 0, 0, _IMPORTED)
    except (ImportError, OSError, AttributeError):
        return None


def alive(pid: int) -> bool:
    """Whether a process with this pid exists (ours, or one we may not signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True
