"""``workers: N``: every worker's counts in one shared memory map, so whichever worker answers a scrape answers
the sum over all of them.

The map is anonymous shared memory (``mmap(-1, ...)``, MAP_SHARED) made by :func:`prepare` in the supervisor
before it forks, so every worker maps the same bytes. It holds:

- the **key table**: the ids of at most ``metrics.top_keys`` client keys that get a label of their own, shared
  so that every worker agrees which keys those are (the others count as ``other``). It is seeded before the
  fork with the keys that made the most requests in the last 30 days (the store's daily usage); the places
  left go to new keys first come. A key keeps its place for the life of the gateway: a series that moved in and
  out of ``other`` as rankings change would make counters jump, which ``rate()`` reads as resets.
- one **slot per worker** (twice as many slots as workers): a worker claims one at start and publishes into it a
  snapshot of its counters (:mod:`marshal` of plain tuples, lists and numbers) at most every
  :data:`PUBLISH_INTERVAL` after something changed, and at every scrape it answers. A scrape sums the
  answering worker's live counters with the other slots' latest snapshots: **another worker's share is at
  most 250 ms old** (plus however long that worker's event loop is blocked; an idle worker's share is
  exact, as nothing changed since its last publish), and the answering worker's own share is exact.

A worker that dies keeps its last snapshot in its slot: its counts stay in the sum (its gauges, such as
requests in flight, do not: its pid is gone). Its replacement claims that slot and takes the snapshot over as
its starting counts, so counters never go backwards across a restart; what the dead worker counted after its
last publish (at most 250 ms of requests) is lost.

Writes to a slot come from its owner only and are guarded by a write counter (a seqlock: odd while a write is
under way); readers copy and retry while it moved, so they never take a torn snapshot on x86. Python promises
no ordering across processes on weakly ordered CPUs: there a torn copy fails to decode and that worker's share
is left out of one scrape (logged). Claiming a slot or a key-table place takes a cross-process lock made before
the fork; those happen once per worker and once per key, never per request.

With one process (``workers: 1``) :class:`Share` works on private memory with no slots: nothing is published.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import sqlite3
import struct
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .process import alive

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("at_gateway.metrics")

PUBLISH_INTERVAL = 0.25  # seconds: a worker publishes at most this often (and at every scrape it answers)
SLOT_BYTES = 8 << 20  # a snapshot's room; anonymous memory: only the pages a snapshot touches are ever used
OTHER = "other"  # the label of every key beyond the top N (and of series past a table's cap)
TOP_KEYS_DAYS = 30  # the window the key table is seeded from

_HEADER = 64  # magic, key places, keys taken, slots, slot bytes, the creator's pid
_KEY_ENTRY = 64  # a length byte and up to 63 bytes of UTF-8
_SLOT_HEAD = 64  # write counter, pid, length, when published (wall time)
_MAGIC = 0x7274656D5F677461  # "atg_metr"
_U64 = struct.Struct("=Q")
_HEAD = struct.Struct("=QQQQQQ")
_SLOT = struct.Struct("=QQQd")
_KEYS_TAKEN = 16  # offset of the key count in the header
_READ_PATIENCE = 0.05  # seconds a reader waits for a write under way before leaving that share out
LOCK_TIMEOUT = 1.0  # a claim lasts microseconds: a lock held this long belongs to a killed worker

_prepared: Share | None = None


def _process_lock() -> Any:
    """A lock the processes forked from this one share (the "fork" context's, which starts no helper process);
    None where the platform has none (no /dev/shm in some containers): claims then go without it."""
    import multiprocessing

    try:
        try:
            ctx: Any = multiprocessing.get_context("fork")
        except ValueError:
            ctx = multiprocessing.get_context()
        return ctx.Lock()
    except (OSError, ImportError) as exc:
        log.warning("metrics: no cross-process lock on this system (%s); workers claim their places without one",
                    exc)
        return None


class Share:
    """The key table and the workers' slots (see the module doc). ``shared=False``: one process, private memory."""

    def __init__(self, *, slots: int, key_cap: int, slot_bytes: int = SLOT_BYTES, shared: bool) -> None:
        self.key_cap = max(0, key_cap)
        self.slots = slots if shared else 0
        self.slot_bytes = slot_bytes
        self._keys_at = _HEADER
        self._slots_at = -(-(_HEADER + self.key_cap * _KEY_ENTRY) // 4096) * 4096
        size = self._slots_at + self.slots * (_SLOT_HEAD + slot_bytes)
        self.shared = shared
        self._buf: Any = mmap.mmap(-1, size, flags=mmap.MAP_SHARED) if shared else bytearray(size)
        self._lock = _process_lock() if shared else None
        self._lock_broken = False
        self.creator = os.getpid()  # the supervisor, with workers
        _HEAD.pack_into(self._buf, 0, _MAGIC, self.key_cap, 0, self.slots, slot_bytes, self.creator)
        self._known: set[str] = set()  # key ids with a place, as far as this process has read the table
        self._known_upto = 0

    # -- the key table -----------------------------------------------------------------------------------------
    def seed_keys(self, ids: Sequence[str]) -> None:
        """Give these keys their places first (before any fork: no lock, nobody else reads yet)."""
        for kid in ids:
            self._take(kid)

    def key_label(self, kid: str) -> str:
        """``kid`` when it has (or now gets) a place in the table, else :data:`OTHER`. Called once per key per
        process (the caller keeps the answer)."""
        if kid in self._known or self._refresh(kid):
            return kid
        raw = kid.encode("utf-8", "replace")
        if not raw or len(raw) >= _KEY_ENTRY or self._taken() >= self.key_cap:
            return OTHER
        with self._locked():
            if self._refresh(kid):
                return kid
            return kid if self._take(kid) else OTHER

    def _taken(self) -> int:
        return int(_U64.unpack_from(self._buf, _KEYS_TAKEN)[0])

    def _refresh(self, kid: str) -> bool:
        """Read the places taken since the last look; whether ``kid`` is among them."""
        count = min(self._taken(), self.key_cap)
        for i in range(self._known_upto, count):
            off = self._keys_at + i * _KEY_ENTRY
            n = self._buf[off]
            self._known.add(bytes(self._buf[off + 1:off + 1 + n]).decode("utf-8", "replace"))
        self._known_upto = max(self._known_upto, count)
        return kid in self._known

    def _take(self, kid: str) -> bool:
        raw = kid.encode("utf-8", "replace")
        count = self._taken()
        if not raw or len(raw) >= _KEY_ENTRY or count >= self.key_cap or kid in self._known:
            return kid in self._known
        off = self._keys_at + count * _KEY_ENTRY
        self._buf[off] = len(raw)
        self._buf[off + 1:off + 1 + len(raw)] = raw
        _U64.pack_into(self._buf, _KEYS_TAKEN, count + 1)  # after the entry: a reader sees it whole
        self._refresh(kid)
        return True

    def keys(self) -> set[str]:
        """Every key id with a place (tests, diagnostics)."""
        self._refresh("")
        return set(self._known)

    # -- the slots ---------------------------------------------------------------------------------------------
    def _slot_at(self, index: int) -> int:
        return self._slots_at + index * (_SLOT_HEAD + self.slot_bytes)

    def claim(self) -> tuple[int, bytes | None]:
        """This process's slot, and the snapshot of the dead worker it takes over (None: a free slot).

        A dead worker's slot is taken first, so its counts carry on in its replacement's. -1: no slot (no
        sharing, or every slot held by a live process: then this worker's counts reach only the scrapes it
        answers itself, which is logged)."""
        if not self.slots:
            return -1, None
        me = os.getpid()
        with self._locked():
            free = dead = None
            for i in range(self.slots):
                pid = int(_U64.unpack_from(self._buf, self._slot_at(i) + 8)[0])
                if pid == 0:
                    free = i if free is None else free
                elif pid != me and dead is None and not alive(pid):
                    dead = i
            index = dead if dead is not None else free
            if index is None:
                log.warning("metrics: all %d worker slots are held by live processes; this worker's counts are "
                            "only in the scrapes it answers itself", self.slots)
                return -1, None
            adopted = None
            if index == dead:
                at = self._slot_at(index)
                seq, _, length, _ = _SLOT.unpack_from(self._buf, at)
                if seq & 1 or length > self.slot_bytes:
                    log.warning("metrics: the worker that held slot %d died while publishing; its last counts are "
                                "lost", index)
                elif length:
                    adopted = bytes(self._buf[at + _SLOT_HEAD:at + _SLOT_HEAD + length])
            at = self._slot_at(index)
            seq = int(_U64.unpack_from(self._buf, at)[0])
            seq = seq + 1 if not seq & 1 else seq
            _U64.pack_into(self._buf, at, seq)
            _SLOT.pack_into(self._buf, at, seq, me, 0, 0.0)  # emptied: the adopter publishes what it took over
            _U64.pack_into(self._buf, at, seq + 1)
        return index, adopted

    def publish(self, index: int, data: bytes) -> bool:
        """Write this process's snapshot into its slot; False when it does not fit (the caller says so)."""
        if index < 0 or index >= self.slots:
            return False
        if len(data) > self.slot_bytes:
            return False
        at = self._slot_at(index)
        seq = int(_U64.unpack_from(self._buf, at)[0])
        seq = seq + 1 if not seq & 1 else seq  # odd: a write is under way
        _U64.pack_into(self._buf, at, seq)
        start = at + _SLOT_HEAD
        self._buf[start:start + len(data)] = data
        _SLOT.pack_into(self._buf, at, seq, os.getpid(), len(data), time.time())
        _U64.pack_into(self._buf, at, seq + 1)
        return True

    def read(self, index: int) -> tuple[int, bytes | None]:
        """(the slot's pid, its latest whole snapshot); None for none, or when a write held it too long."""
        at = self._slot_at(index)
        deadline = time.monotonic() + _READ_PATIENCE
        while True:
            seq, pid, length, _ = _SLOT.unpack_from(self._buf, at)
            if not seq & 1:
                data = bytes(self._buf[at + _SLOT_HEAD:at + _SLOT_HEAD + min(length, self.slot_bytes)])
                if _U64.unpack_from(self._buf, at)[0] == seq:
                    return int(pid), (data if length else None)
            if time.monotonic() > deadline:
                return int(pid), None
            os.sched_yield()

    def others(self, index: int) -> Iterator[tuple[int, bytes | None]]:
        """(pid, snapshot) of every claimed slot but ``index``."""
        for i in range(self.slots):
            if i == index:
                continue
            pid, data = self.read(i)
            if pid:
                yield pid, data

    # -- the lock ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self._lock
        if lock is None or self._lock_broken:
            yield
            return
        if not lock.acquire(timeout=LOCK_TIMEOUT):
            self._lock_broken = True  # only a worker killed inside a microsecond-long claim holds it this long
            log.error("metrics: the shared lock was not released within %gs (a worker killed while claiming?); "
                      "this worker claims without it from now on", LOCK_TIMEOUT)
            yield
            return
        try:
            yield
        finally:
            lock.release()


def top_keys(path: str, n: int, days: int = TOP_KEYS_DAYS) -> list[str]:
    """The ``n`` key ids with the most requests in the store's daily usage over the last ``days`` days; [] when
    the store cannot be read (a new file, no table yet). Read-only: nothing is created or migrated."""
    if n <= 0 or not os.path.exists(path):
        return []
    since = time.strftime("%Y-%m-%d", time.gmtime(time.time() - days * 86400))
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error:
        return []
    try:
        rows = conn.execute("SELECT key_id, SUM(requests) AS n FROM usage_daily WHERE day >= ? AND key_id != '' "
                            "GROUP BY key_id ORDER BY n DESC, key_id LIMIT ?", (since, n)).fetchall()
    except sqlite3.Error as exc:
        log.debug("metrics: no key usage to seed the key labels from (%s)", exc)
        return []
    finally:
        conn.close()
    return [str(r[0]) for r in rows]


def new_share(config: Config, *, shared: bool) -> Share:
    """A share for ``config``: slots for twice its workers when ``shared``, the key table seeded from the store."""
    from ..store.db import MEMORY

    share = Share(slots=max(2, 2 * config.workers), key_cap=config.metrics.top_keys, shared=shared)
    if config.metrics.per_key and config.store.path != MEMORY:
        share.seed_keys(top_keys(config.store.path, config.metrics.top_keys))
    return share


def prepare(config: Config) -> Share:
    """Make the share before the workers fork (the supervisor's :func:`~at_gateway.service.run` calls it): every
    worker forked after it finds it with :func:`inherited`."""
    global _prepared
    _prepared = new_share(config, shared=True)
    return _prepared


def inherited() -> Share | None:
    """The share :func:`prepare` made in this process or a parent it was forked from; None without one."""
    return _prepared
