"""Prometheus metrics at ``{base_path}/metrics`` (``metrics.enabled``), in the text format 0.0.4, written by us.

- :mod:`.registry`: what a process counts per request (``observe``) and how that becomes the families;
- :mod:`.exposition`: the text format;
- :mod:`.share`: ``workers: N``: each worker's counts in shared memory, summed by whichever worker answers;
- :mod:`.process`: CPU, memory, descriptors and start time from /proc.

:class:`Metrics` is what :class:`~at_gateway.services.Services` holds: ``started``/``observe`` on the request
path, ``authorize``/``render`` for the scrape (app.py calls them). ``metrics.per_key``, ``top_keys`` and
``seed_names`` shape what is counted and take effect at a restart; the credentials (``metrics.username``/
``password``, the admin tokens) follow a reload.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import marshal
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import Unauthorized
from . import process
from .exposition import render as render_text
from .registry import Counts, families, merged
from .share import PUBLISH_INTERVAL, Share, inherited, new_share

if TYPE_CHECKING:
    from ..config import Config
    from ..http.server import Request
    from ..services import Services

__all__ = ["Metrics"]

log = logging.getLogger("at_gateway.metrics")

_BASIC = (b"www-authenticate", b'Basic realm="at-gateway metrics"')
_BEARER = (b"www-authenticate", b'Bearer realm="at-gateway metrics"')


def _commit() -> str:
    try:
        from .._build import COMMIT  # type: ignore[import-not-found]  # written by build_zipapp.py
    except ImportError:
        return "unknown"
    return str(COMMIT or "unknown")


class Metrics(Counts):
    """One process's metrics (see the package doc). ``share``: the workers' shared map; default: the one
    :func:`.share.prepare` made before the fork, else private memory (one process)."""

    def __init__(self, config: Config, services: Services, share: Share | None = None) -> None:
        m = config.metrics
        super().__init__(per_key=m.per_key, seed_names=m.seed_names)
        self.config = config
        self.services = services
        self.share = share or inherited() or new_share(config, shared=False)
        self.build = (__version__, _commit())
        self._gateway: Any = None  # the last one a scrape rendered with (its pools, its config)
        self._base_cpu = 0.0  # what the dead workers this one took over from had used
        self._base_write_errors = 0
        self._too_big = False
        self._last_publish = float("-inf")
        self.slot, adopted = self.share.claim()
        self.shared = self.slot >= 0
        if adopted is not None:
            try:
                snap = marshal.loads(adopted)
                self.take_over(snap)
                self._base_cpu = float(snap.get("cpu", 0.0))
                self._base_write_errors = int(snap.get("w", 0))
            except (ValueError, EOFError, TypeError, AttributeError) as exc:
                log.warning("metrics: the counts of the worker this one replaces cannot be read (%s); they are "
                            "lost", exc)
        if self.shared:
            self.publish()  # at once: the slot holds this worker's share (and what it took over) from now on

    def key_label(self, client: str) -> str:
        return self.share.key_label(client)

    def configured_routes(self) -> Mapping[str, Any]:
        """The current gateway's routes (a reload may add or remove one): see :meth:`Counts.configured_routes`."""
        return self._config_now().routes

    # -- publishing (workers) ----------------------------------------------------------------------------------
    def arm(self) -> None:
        """Publish within :data:`~.share.PUBLISH_INTERVAL` of the last publish: one timer on the event loop,
        set by the first change after a publish (so an idle worker publishes nothing and its share stays exact)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self.armed = True
        delay = max(0.0, self._last_publish + PUBLISH_INTERVAL - time.monotonic())
        loop.call_later(delay, self._timer)

    def _timer(self) -> None:
        self.armed = False
        try:
            self.publish()
        except Exception:  # never into the event loop's exception handler; the next change tries again
            log.exception("metrics: publishing this worker's counts failed")

    def _in_flight(self) -> int:
        return sum(1 for ctx in self.services.in_flight.values() if not ctx.unlogged)

    def _gateway_now(self) -> Any:
        control = self.services.control
        gateway = getattr(control, "gateway", None) if control is not None else None
        return gateway if gateway is not None else self._gateway

    def _write_errors(self) -> int:
        return self._base_write_errors + int(getattr(self.services.store, "write_errors", 0) or 0)

    def snapshot(self, gateway: Any = None) -> dict[str, Any]:
        """This process's share: its counters (live objects) and gauges, and what it used of the machine."""
        gateway = gateway if gateway is not None else self._gateway_now()
        client = getattr(gateway, "client", None)
        conns = client.connections() if client is not None and hasattr(client, "connections") else {}
        stats = process.read()
        return {**self.tables(), "f": self._in_flight(), "c": conns, "w": self._write_errors(),
                "cpu": self._base_cpu + (stats.cpu if stats else 0.0),
                "rss": stats.rss if stats else 0, "vms": stats.vms if stats else 0, "fds": stats.fds if stats else 0}

    def publish(self, snap: dict[str, Any] | None = None) -> None:
        if not self.shared:
            return
        data = marshal.dumps(snap if snap is not None else self.snapshot())
        self._last_publish = time.monotonic()
        if not self.share.publish(self.slot, data) and not self._too_big:
            self._too_big = True
            log.warning("metrics: this worker's counts (%d bytes) do not fit its shared slot (%d bytes); scrapes "
                        "answered by the other workers miss them", len(data), self.share.slot_bytes)

    # -- the scrape ----------------------------------------------------------------------------------------------
    def _config_now(self) -> Config:
        gateway = self._gateway_now()
        return gateway.config if gateway is not None else self.config

    def authorize(self, request: Request) -> None:
        """Basic auth with ``metrics.username``/``password``, or an admin token as Bearer, whichever is
        configured (each compared in constant time); neither configured: open. Raises 401 otherwise.

        A wrong credential counts as a wrong admin credential of the client's address, with the dashboard's
        failed logins and the admin API's wrong Bearer tokens (:class:`~at_gateway.admin.auth.AdminState`):
        /metrics takes the admin token, so it must not be the door where guessing it is unlimited. Over the
        limit, 429 with Retry-After, whatever is sent."""
        config = self._config_now()
        m = config.metrics
        tokens = config.admin.tokens
        if not m.username and not tokens:
            return
        auth = request.header(b"authorization") or b""
        state = address = None
        now = 0.0
        if auth.strip():  # a credential presented: a guess, limited; none at all is not counted
            from ..admin.auth import client_address, process_state

            state, address, now = process_state(self.services), client_address(request), self.services.clock()
            state.check(address, now)
        scheme, _, value = auth.partition(b" ")
        scheme = scheme.lower()
        value = value.strip()
        ok = False
        if scheme == b"basic" and m.username and m.password:
            try:
                user, sep, password = base64.b64decode(value, validate=True).partition(b":")
            except (binascii.Error, ValueError):
                user, sep, password = b"", b"", b""
            same_user = hmac.compare_digest(user, m.username.encode())
            same_password = hmac.compare_digest(password, m.password.encode())  # both compared, always
            ok = bool(sep) and same_user and same_password
        elif scheme == b"bearer" and tokens:
            for token in tokens:  # no early exit: constant time over the token list
                if hmac.compare_digest(value, token.encode()):
                    ok = True
        if not ok:
            if state is not None and address is not None:
                state.login_failed(address, now)
            what = "metrics.username and metrics.password (Basic auth)" if m.username else ""
            if tokens:
                what += (" or " if what else "") + "an admin token (Authorization: Bearer ...)"
            raise Unauthorized(f"/metrics needs {what}", code="metrics_unauthorized",
                               headers=[_BASIC if m.username else _BEARER])

    def render(self, gateway: Any) -> bytes:
        """The exposition: this process's live counts plus every other worker's latest share (see :mod:`.share`
        for how old those can be); the memory and descriptors of the other live workers read fresh from /proc."""
        self._gateway = gateway
        mine = self.snapshot(gateway)
        if self.shared:
            self.publish(mine)  # at every scrape: whoever answers next sees this worker exact as of now
        shares = [mine]
        in_flight = mine["f"]
        conns = dict(mine["c"])
        write_errors = mine["w"]
        workers = 1
        stats = process.read()
        cpu, rss, vms, fds = mine["cpu"], mine["rss"], mine["vms"], mine["fds"]
        start = stats.start if stats else time.time()
        for pid, data in self.share.others(self.slot):
            if data is None:
                continue
            try:
                snap = marshal.loads(data)
            except (ValueError, EOFError, TypeError) as exc:
                log.warning("metrics: worker %d's share could not be read (%s); left out of this scrape", pid, exc)
                continue
            shares.append(snap)
            write_errors += snap.get("w", 0)
            if not process.alive(pid):  # dead (its replacement not started yet): its counts, not its gauges
                cpu += snap.get("cpu", 0.0)
                continue
            workers += 1
            in_flight += snap.get("f", 0)
            for origin, (active, idle) in snap.get("c", {}).items():
                a, i = conns.get(origin, (0, 0))
                conns[origin] = (a + active, i + idle)
            # CPU as published, like every counter: read live it would drop back to the last share when that
            # worker died, and Prometheus takes any drop for a reset. The gauges are read fresh.
            cpu += snap.get("cpu", 0.0)
            live = process.read(pid)
            if live is not None:
                rss, vms, fds = rss + live.rss, vms + live.vms, fds + live.fds
            else:
                rss, vms, fds = rss + snap.get("rss", 0), vms + snap.get("vms", 0), fds + snap.get("fds", 0)
        creator = self.share.creator
        if creator != os.getpid():  # the supervisor: its share of the machine, and the gateway's start
            sup = process.read(creator)
            if sup is not None:
                cpu, rss, vms, fds, start = cpu + sup.cpu, rss + sup.rss, vms + sup.vms, fds + sup.fds, sup.start
        gauges = {"in_flight": in_flight, "connections": conns, "workers": workers, "write_errors": write_errors,
                  "build": self.build, "process": (round(cpu, 6), rss, vms, fds, start) if stats is not None else None}
        return render_text(families(merged(shares), per_key=self.per_key, seed_names=self.seed_names,
                                    providers=gateway.config.providers, gauges=gauges))
