"""The shared slots: fingerprint -> slot by open addressing, stable across processes; what a forked child
writes the parent reads (and not with ``shared=False``); read-modify-write under the lock is exact between
two processes; a full table falls back to private slots with one warning; a lock left held by a killed
worker does not hang the others; the write counter (seqlock) moves by two per write."""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable, Iterator

import pytest

from at_gateway.resilience import state as state_module
from at_gateway.resilience.state import SharedState, Slot, fingerprint_u64


def in_child(fn: Callable[[], object]) -> int:
    """Run ``fn`` in a forked child and wait for it (os.waitpid, no sleep); its exit code: 0 when ``fn``
    returned, else 1 (the traceback on stderr). The child leaves with os._exit: no pytest teardown there."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture
def resilience_log(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    """caplog for at_gateway.resilience at INFO (a gateway test before may have stopped at_gateway's
    propagation to the root logger, where caplog listens: setup_logging does)."""
    monkeypatch.setattr(logging.getLogger("at_gateway"), "propagate", True)
    caplog.set_level(logging.INFO, "at_gateway.resilience")
    return caplog


@pytest.fixture(params=[True, False], ids=["shared", "private"])
def any_state(request: pytest.FixtureRequest) -> Iterator[SharedState]:
    s = SharedState(64, shared=request.param)
    yield s
    s.close()


def test_a_fingerprint_keeps_its_slot_and_distinct_ones_get_distinct_slots(any_state: SharedState) -> None:
    prints = [f"fp-{i}".encode() for i in range(40)]
    first = [any_state.slot(fp) for fp in prints]
    assert len(set(first)) == len(prints)
    assert all(0 <= i < any_state.slots for i in first)
    assert [any_state.slot(fp) for fp in prints] == first


def test_read_write_round_trip_and_the_write_counter(any_state: SharedState) -> None:
    i = any_state.slot(b"k")
    assert any_state.read(i) == Slot()
    before = any_state.version(i)
    assert before % 2 == 0
    with any_state.lock():
        any_state.write(i, Slot(until=12.5, failures=3, flags=5, stamp=7.25, generation=9, limited=2))
    assert any_state.read(i) == Slot(until=12.5, failures=3, flags=5, stamp=7.25, generation=9, limited=2)
    assert any_state.version(i) == before + 2  # odd during the write, even after
    other = any_state.slot(b"other")
    assert any_state.read(other) == Slot()  # a neighbour untouched


def test_the_lock_is_reentrant(any_state: SharedState) -> None:
    with any_state.lock(), any_state.lock():
        i = any_state.slot(b"claimed-while-locked")  # a claim takes the lock again
    assert any_state.slot(b"claimed-while-locked") == i


def test_open_addressing_probes_past_taken_slots() -> None:
    """Fingerprints whose home slot is the same all get slots, in probe order."""
    s = SharedState(8)
    same_home = [fp for fp in (f"c{i}".encode() for i in range(2000)) if fingerprint_u64(fp) % 8 == 3][:4]
    got = [s.slot(fp) for fp in same_home]
    assert got == [3, 4, 5, 6]


def test_a_child_claims_and_writes_the_parent_reads() -> None:
    """A SharedState made before fork() is one table: a slot a child claims is found at the same index by
    the parent (which never looked that fingerprint up), and what the child wrote is what the parent reads."""
    s = SharedState(128)
    known = s.slot(b"known-before-fork")

    def child() -> None:
        with s.lock():
            s.write(known, Slot(until=50.0, failures=2))
            i = s.slot(b"claimed-in-child")
            s.write(i, Slot(flags=1, generation=4))
        os._exit(i)  # the index, as the exit code, for the parent to compare

    index_in_child = in_child(child)
    assert s.read(known) == Slot(until=50.0, failures=2)
    assert s.slot(b"claimed-in-child") == index_in_child
    assert s.read(index_in_child) == Slot(flags=1, generation=4)


def test_private_state_is_not_shared_with_a_child() -> None:
    s = SharedState(16, shared=False)
    i = s.slot(b"k")

    def child() -> None:
        with s.lock():
            s.write(i, Slot(until=99.0))
        assert s.read(i).until == 99.0

    assert in_child(child) == 0
    assert s.read(i) == Slot()


def test_read_modify_write_under_the_lock_is_exact_between_processes() -> None:
    """Parent and child each add 1 to the same counter 3000 times at once: no update is lost."""
    s = SharedState(16)
    i = s.slot(b"counter")
    rounds = 3000

    def bump() -> None:
        for _ in range(rounds):
            with s.lock():
                slot = s.read(i)
                slot.failures += 1
                s.write(i, slot)

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            bump()
            code = 0
        finally:
            os._exit(code)
    bump()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert s.read(i).failures == 2 * rounds


def test_a_full_table_falls_back_to_private_slots_with_one_warning(resilience_log: pytest.LogCaptureFixture) -> None:
    s = SharedState(4)
    shared = [s.slot(f"s{i}".encode()) for i in range(4)]
    assert sorted(shared) == [0, 1, 2, 3]
    assert not resilience_log.records
    extra = [s.slot(f"x{i}".encode()) for i in range(3)]
    assert len(set(extra)) == 3 and all(i >= 4 for i in extra)
    warnings = [r for r in resilience_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "all 4 shared slots are taken" in warnings[0].getMessage()
    assert s.slot(b"x1") == extra[1]  # the fallback slot is kept too
    # a private slot works like a shared one, in this process only
    with s.lock():
        s.write(extra[0], Slot(until=10.0, failures=1))
    assert s.read(extra[0]) == Slot(until=10.0, failures=1)
    assert s.version(extra[0]) == 2
    assert s.read(extra[1]) == Slot()

    def child() -> None:
        with s.lock():
            s.write(extra[1], Slot(until=77.0))
            s.write(shared[0], Slot(until=88.0))

    assert in_child(child) == 0
    assert s.read(extra[1]) == Slot()  # private: the child's write stayed in the child
    assert s.read(shared[0]).until == 88.0  # shared: seen


def test_a_lock_left_held_by_a_killed_worker_does_not_hang_the_others(
        monkeypatch: pytest.MonkeyPatch, resilience_log: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(state_module, "LOCK_TIMEOUT", 0.05)
    s = SharedState(8)
    i = s.slot(b"k")

    def die_holding_the_lock() -> None:
        held = s.lock()
        held.__enter__()
        os._exit(0)  # never released (`held` is alive): as a worker killed inside a write

    assert in_child(die_holding_the_lock) == 0
    with s.lock():
        s.write(i, Slot(failures=1))
    with s.lock():  # from now on without the lock, at once
        s.write(i, Slot(failures=2))
    assert s.read(i).failures == 2
    errors = [r for r in resilience_log.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "not released" in errors[0].getMessage()


def test_a_write_left_half_done_is_finished_by_the_next_writer() -> None:
    """A writer killed between the two counter bumps leaves it odd: readers still get an answer (bounded
    retries), and the next write makes it even again."""
    s = SharedState(8)
    i = s.slot(b"k")

    def die_mid_write() -> None:
        s._begin(s._words, i * 8)  # the first half of a write, then the end of the process
        os._exit(0)

    assert in_child(die_mid_write) == 0
    assert s.version(i) % 2 == 1
    assert s.read(i) == Slot()
    with s.lock():
        s.write(i, Slot(until=3.0))
    assert s.version(i) % 2 == 0 and s.read(i).until == 3.0


def test_slots_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SharedState(0)


def test_without_a_cross_process_lock_the_state_is_private_and_says_so(
        monkeypatch: pytest.MonkeyPatch, resilience_log: pytest.LogCaptureFixture) -> None:
    """Some containers have no /dev/shm: the multiprocessing lock cannot be made. The gateway still runs."""
    def no_semaphores(*a: object, **kw: object) -> object:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(state_module.multiprocessing, "get_context", no_semaphores)
    s = SharedState(8)
    assert not s.shared
    i = s.slot(b"k")
    with s.lock():
        s.write(i, Slot(until=1.0))
    assert s.read(i).until == 1.0
    assert in_child(lambda: s.write(i, Slot(until=2.0))) == 0
    assert s.read(i).until == 1.0
    assert "no cross-process lock" in resilience_log.text
