"""Kept responses of the Responses door: ``previous_response_id`` and ``GET``/``DELETE /v1/responses/{id}``.

One row per answer (table ``responses``, schema v3): its id, the caller that made it (``key_id``: only that
caller may read or delete it), when it expires, and three JSON texts: ``input``, the *whole* context the
answer was made from (the earlier responses' input and output it followed, then its own input items),
``output``, its output items, and ``response``, the response object as answered. A follow-up's context is
then one primary-key read (``input + output``), however long the conversation, and it does not depend on
earlier rows that have expired since. The price is that rows grow with the conversation; they live for
``response.retention`` (1 day by default), and Codex-like clients send ``store: false`` and their whole
history anyway.

The event loop never touches sqlite: every call runs in a worker thread (:func:`anyio.to_thread.run_sync`)
on this process's one connection, under a lock, and JSON is encoded and decoded there too (a long context is
a large text). The connection is in autocommit mode, so each write is committed when :meth:`put` returns,
and each read is a fresh snapshot: with ``workers: N`` another process's follow-up sees a row as soon as the
process that wrote it has answered (WAL readers see every committed write).

Expired rows are never returned (reads filter on ``expires_at``) and are deleted by a purge that runs at most
once per ``purge_interval`` (10 minutes) per process, in the thread of a write that finds it due: one indexed
``DELETE``, not a cost per request.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import anyio
import anyio.to_thread

from .db import MEMORY, StoreError, connect

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("at_gateway.store")

PURGE_INTERVAL = 600.0

_PUT = ("INSERT OR REPLACE INTO responses (id, key_id, created_at, expires_at, input, output, response) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)")
_GET = ("SELECT id, key_id, created_at, expires_at, input, output, response FROM responses "
        "WHERE id = ? AND key_id = ? AND expires_at > ?")
_DELETE = "DELETE FROM responses WHERE id = ? AND key_id = ? AND expires_at > ?"
_PURGE = "DELETE FROM responses WHERE expires_at <= ?"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


class StoredResponse(NamedTuple):
    """One kept response, decoded."""

    id: str
    key_id: str
    created_at: float
    expires_at: float
    input: list[Any]  # the whole context it was made from (earlier turns included)
    output: list[Any]  # its output items
    response: dict[str, Any]  # the response object as answered


class ResponseStore:
    """The ``responses`` table for one process: one connection, used by one thread at a time."""

    def __init__(self, conn: sqlite3.Connection, path: str, *, purge_interval: float = PURGE_INTERVAL,
                 clock: Callable[[], float] = time.time) -> None:
        self.conn = conn
        self.path = path
        self.purge_interval = purge_interval
        self.clock = clock  # wall-clock seconds (rows outlive the process); tests pass their own
        self.lock = threading.Lock()
        self._next_purge = 0.0  # the first write purges what expired while the gateway was down
        self.purges = 0  # purge runs (tests and diagnostics)
        self.purged = 0  # rows they deleted

    # -- the event loop's side: each call one trip to a worker thread --------------------------------------
    async def put(self, response_id: str, key_id: str, input_items: list[Any], output_items: list[Any],
                  response: dict[str, Any], retention: float) -> None:
        """Keep a response for ``retention`` seconds; committed when this returns."""
        await anyio.to_thread.run_sync(self._locked, self.put_sync, response_id, key_id, input_items,
                                       output_items, response, retention)

    async def get(self, response_id: str, key_id: str) -> StoredResponse | None:
        """The response, if ``key_id`` made it and it has not expired; else None (whoever made it)."""
        result: StoredResponse | None = await anyio.to_thread.run_sync(self._locked, self.get_sync, response_id,
                                                                       key_id)
        return result

    async def delete(self, response_id: str, key_id: str) -> bool:
        """Delete the response ``key_id`` made; False when there is none (or it is another caller's)."""
        result: bool = await anyio.to_thread.run_sync(self._locked, self.delete_sync, response_id, key_id)
        return result

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self.close)

    def _locked(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self.lock:
            return fn(*args)

    # -- the thread's side (the caller holds the lock) --------------------------------------------------------
    def put_sync(self, response_id: str, key_id: str, input_items: list[Any], output_items: list[Any],
                 response: dict[str, Any], retention: float) -> None:
        now = self.clock()
        if now >= self._next_purge:
            self.purge_sync(now)
        self.conn.execute(_PUT, (response_id, key_id, now, now + retention, _dumps(input_items),
                                 _dumps(output_items), _dumps(response)))

    def get_sync(self, response_id: str, key_id: str) -> StoredResponse | None:
        row = self.conn.execute(_GET, (response_id, key_id, self.clock())).fetchone()
        if row is None:
            return None
        return StoredResponse(row[0], row[1], row[2], row[3], json.loads(row[4]), json.loads(row[5]),
                              json.loads(row[6]))

    def delete_sync(self, response_id: str, key_id: str) -> bool:
        return self.conn.execute(_DELETE, (response_id, key_id, self.clock())).rowcount > 0

    def purge_sync(self, now: float | None = None) -> int:
        """Delete every expired row (one indexed statement); the next purge is due ``purge_interval`` later."""
        now = self.clock() if now is None else now
        self._next_purge = now + self.purge_interval
        deleted = self.conn.execute(_PURGE, (now,)).rowcount
        self.purges += 1
        self.purged += deleted
        return int(deleted)

    def close(self) -> None:
        with self.lock:
            self.conn.close()


def open_store(path: str, **kwargs: Any) -> ResponseStore:
    """A :class:`ResponseStore` on the database at ``path`` (opened and migrated; blocking: call in a thread)."""
    conn = connect(path, check_same_thread=False)
    return ResponseStore(conn, path, **kwargs)


async def open_response_store(config: Config) -> ResponseStore | None:
    """This process's kept responses on ``config.store``; None for an in-memory store (each worker would
    keep its own, and a follow-up that reached another worker would not find its response: the door answers
    a clear 400 instead)."""
    from ..errors import ConfigError

    path = config.store.path
    if path == MEMORY:
        return None
    try:
        return await anyio.to_thread.run_sync(open_store, path)
    except StoreError as exc:
        raise ConfigError(config.source, [f"store.path: {exc}"]) from None
