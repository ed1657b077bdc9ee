"""Cooldowns, disabled keys and circuits shared by the workers of one machine.

Fixed slots in anonymous shared memory (``mmap(-1, ...)``, MAP_SHARED), mapped by the supervisor before it
forks, so every worker reads and writes the same bytes: a key cooled in one worker is cooled in all, at
the cost of a struct read per check (no message, no lock on the read path). Writes take one
cross-process lock (a ``multiprocessing`` lock made before the fork). A slot is found by a fingerprint
(provider name and a hash of the key, or provider and model for a circuit), so a reload that keeps a key
keeps its slot and its state. Times are ``time.monotonic()`` (one clock for all processes on Linux).
With one process the same class works on private memory.

Layout: ``slots`` records of :data:`SLOT_SIZE` bytes. Each starts with a write counter (a seqlock: odd while
a write is under way, bumped twice per write) and the slot's fingerprint (a u64 from blake2b, 0 = free),
then the fields of :class:`Slot`. A slot is claimed by open addressing (linear probing from the
fingerprint's hash) under the lock, and never freed, so a fingerprint found once stays at that index: each
process remembers the index and looks it up once.

Reads take no lock. A reader copies the record and retries while the counter was odd or moved, so it sees
one whole write. Python promises no memory ordering across processes, so a torn read remains possible in
theory on weakly ordered CPUs; it is harmless by construction: every read-modify-write re-reads under the
lock (a torn value is never written back), and a decision taken on a torn value costs one request (a key
used as its cooldown starts, or skipped once as it ends; one request let through a circuit as it opens).

When every slot is taken, new fingerprints get a slot in this process's private memory (the same
:class:`Slot` semantics, not shared with the other workers) and a warning is logged once: the gateway keeps
working, each worker then cools that key or opens that circuit on its own evidence.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import multiprocessing
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("at_gateway.resilience")

# Slot.flags bits. A key's slot uses DISABLED; a circuit's slot the others.
DISABLED = 1  # the key was refused with 401/403
HALF_OPEN_PROBE = 2  # a probe request is in flight (its start in Slot.stamp)
OPEN = 4  # the circuit opened (open until Slot.until; after that half-open)
HALF_OPEN = 8  # the half-open state was entered (logged once per opening)

SLOT_SIZE = 64  # bytes: a cache line, so two slots never share one
_SEQ = struct.Struct("=Q")
_FP = struct.Struct("=Q")
# until, stamp, failures, flags, generation, limited (native order: the counter is also read as a u64 view)
_FIELDS = struct.Struct("=ddIIQI")
_HEAD = _SEQ.size + _FP.size  # 16: the fields start after the counter and the fingerprint
_U32 = 0xFFFFFFFF
_SPINS = 1000  # a reader retrying this often met a writer that died mid-write: take what is there
LOCK_TIMEOUT = 1.0  # a write section lasts microseconds: a lock held this long belongs to a killed worker


@dataclass
class Slot:
    """One slot's state (see the module doc); 0 / 0.0 when new."""

    until: float = 0.0  # cooling (key) or open (circuit) until this monotonic time
    failures: int = 0  # consecutive failures
    flags: int = 0  # DISABLED (key refused with 401/403), HALF_OPEN_PROBE (a probe is in flight) ...
    stamp: float = 0.0  # when the probe started / the last change
    generation: int = 0  # bumped when a disabled key is enabled again by a reload
    limited: int = 0  # consecutive 429s (the exponent of the next 429 cooldown); added beside the lead's fields


def _process_lock() -> Any:
    """A lock the processes forked from this one share. The "fork" context's: the workers are forked, and
    another start method's lock may start a resource-tracker process. None, logged, where the platform
    has no such lock (no /dev/shm in some containers): the workers then keep their state each."""
    try:
        ctx: Any
        try:
            ctx = multiprocessing.get_context("fork")
        except ValueError:
            ctx = multiprocessing.get_context()
        return ctx.RLock()
    except (OSError, ImportError) as exc:
        log.warning("resilience state: no cross-process lock on this system (%s); each worker keeps its own "
                    "cooldowns and circuits", exc)
        return None


def fingerprint_u64(fingerprint: bytes) -> int:
    """The u64 stored in a slot for ``fingerprint``; never 0 (0 marks a free slot)."""
    value = int.from_bytes(hashlib.blake2b(fingerprint, digest_size=8).digest(), "little")
    return value or 1


class SharedState:
    """The slots (see the module doc). Make it before forking the workers; ``shared=False`` for one process."""

    def __init__(self, slots: int = 4096, *, shared: bool = True) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        size = slots * SLOT_SIZE
        self._buf: Any
        self._lock: Any = _process_lock() if shared else None
        self.shared = self._lock is not None
        if self._lock is not None:
            self._buf = mmap.mmap(-1, size, flags=mmap.MAP_SHARED)  # anonymous: zero-filled, no file
        else:
            self._buf = bytearray(size)
            self._lock = threading.RLock()
        # One u64 per 8 bytes: the write counter of slot i is word i * 8 (a 40 ns read, no struct call).
        self._words = memoryview(self._buf).cast("Q")
        self._index: dict[bytes, int] = {}  # fingerprint -> slot index, remembered per process
        # The private overflow (table full): indexes from `slots` on, in this process's memory.
        self._private = bytearray()
        self._pwords = memoryview(self._private).cast("Q")
        self._warned_full = False
        self._lock_broken = False

    # -- finding a slot -----------------------------------------------------------------------------------
    def slot(self, fingerprint: bytes) -> int:
        """The slot index for ``fingerprint`` (claimed on first use; the same index in every worker).

        The table is probed without the lock first (slots are never freed, so a fingerprint seen is final);
        only a fingerprint not yet present takes the lock, probes again and claims the first free slot."""
        index = self._index.get(fingerprint)
        if index is not None:
            return index
        fp = fingerprint_u64(fingerprint)
        index = self._probe(fp, claim=False)
        if index is None:
            with self.lock():
                index = self._probe(fp, claim=True)
        if index is None:
            index = self._private_slot()
        self._index[fingerprint] = index
        return index

    def _probe(self, fp: int, *, claim: bool) -> int | None:
        """Linear probing from ``fp``'s home slot: the slot holding ``fp``, else (``claim``, under the lock)
        the first free one, claimed. None: not found before a free slot (not claiming) or the table is full."""
        n = self.slots
        home = fp % n
        for step in range(n):
            i = (home + step) % n
            seen = self._stored_fp(i)
            if seen == fp:
                return i
            if seen == 0:
                if not claim:
                    return None
                self._write_fp(i, fp)
                return i
        return None

    def _stored_fp(self, i: int) -> int:
        off = i * SLOT_SIZE
        for _ in range(_SPINS):
            seq = self._words[i * 8]
            if seq & 1:
                continue
            fp: int = _FP.unpack_from(self._buf, off + _SEQ.size)[0]
            if self._words[i * 8] == seq:
                return fp
        return int(_FP.unpack_from(self._buf, off + _SEQ.size)[0])

    def _write_fp(self, i: int, fp: int) -> None:
        off = i * SLOT_SIZE
        seq = self._begin(self._words, i * 8)
        _FP.pack_into(self._buf, off + _SEQ.size, fp)
        _FIELDS.pack_into(self._buf, off + _HEAD, 0.0, 0.0, 0, 0, 0, 0)
        self._words[i * 8] = seq + 1

    def _private_slot(self) -> int:
        if not self._warned_full:
            self._warned_full = True
            log.warning("resilience state: all %d shared slots are taken; keys and circuits added from now on keep "
                        "their cooldowns and circuit state in each worker alone (not shared between workers). "
                        "Fewer keys or models, or a larger table, share them again", self.slots)
        index = self.slots + len(self._private) // SLOT_SIZE
        self._pwords.release()
        self._private.extend(bytes(SLOT_SIZE))
        self._pwords = memoryview(self._private).cast("Q")
        return index

    # -- reading and writing --------------------------------------------------------------------------------
    def _where(self, index: int) -> tuple[Any, memoryview, int]:
        """(buffer, its u64 view, the slot's byte offset) for a shared or a private index."""
        if 0 <= index < self.slots:
            return self._buf, self._words, index * SLOT_SIZE
        j = index - self.slots
        if j < 0 or j * SLOT_SIZE >= len(self._private):
            raise IndexError(f"no slot {index}")
        return self._private, self._pwords, j * SLOT_SIZE

    def version(self, index: int) -> int:
        """The slot's write counter: it moves on every write, so a reader that saw the same even value
        before may keep what it read then (the hot path's check: one memory read, no struct, no lock).
        Odd while a write is under way. Added beside the lead's interface."""
        if index < self.slots:
            return int(self._words[index * 8])
        _, words, off = self._where(index)
        return int(words[off // 8])

    def read(self, index: int) -> Slot:
        """A consistent copy of the slot (seqlock: retried while a write is under way); no lock taken."""
        buf, words, off = self._where(index)
        w = off // 8
        for _ in range(_SPINS):
            seq = words[w]
            if seq & 1:
                continue
            fields = _FIELDS.unpack_from(buf, off + _HEAD)
            if words[w] == seq:
                break
        else:
            fields = _FIELDS.unpack_from(buf, off + _HEAD)  # a writer died mid-write: harmless (module doc)
        until, stamp, failures, flags, generation, limited = fields
        return Slot(until=until, failures=failures, flags=flags, stamp=stamp, generation=generation,
                    limited=limited)

    def write(self, index: int, slot: Slot) -> None:
        """Replace the slot's fields. Call it under :meth:`lock` (after a :meth:`read` there): the lock is
        what makes read-modify-write safe between workers; the counter only protects the readers."""
        buf, words, off = self._where(index)
        w = off // 8
        seq = self._begin(words, w)
        _FIELDS.pack_into(buf, off + _HEAD, float(slot.until), float(slot.stamp), min(max(slot.failures, 0), _U32),
                          slot.flags & _U32, max(slot.generation, 0), min(max(slot.limited, 0), _U32))
        words[w] = seq + 1

    @staticmethod
    def _begin(words: memoryview, w: int) -> int:
        """Mark a write as under way; returns the (odd) counter. An odd counter left by a writer that died
        mid-write is reused as is: the next write ends it."""
        seq = int(words[w])
        if not seq & 1:
            seq = (seq + 1) & 0xFFFFFFFFFFFFFFFF
            words[w] = seq
        return seq

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._lock_broken:
            yield
            return
        if not self._lock.acquire(timeout=LOCK_TIMEOUT):
            # Only a worker killed inside a microsecond-long write section holds it this long. Waiting for ever
            # would stop every worker that records a failure; going on without it risks a lost counter update.
            self._lock_broken = True
            log.error("resilience state: the shared lock was not released within %gs (a worker killed while "
                      "writing?); this worker writes without it from now on", LOCK_TIMEOUT)
            yield
            return
        try:
            yield
        finally:
            self._lock.release()

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """A context manager: the cross-process lock for read-modify-write (re-entrant)."""
        return self._locked()

    def close(self) -> None:
        """Unmap the shared memory (tests; a gateway keeps it for its life). Added beside the lead's interface."""
        self._words.release()
        self._pwords.release()
        if isinstance(self._buf, mmap.mmap):
            self._buf.close()
