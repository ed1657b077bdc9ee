"""``workers: N``: N processes serving one port, supervised by the parent.

One Python process uses one core, so a gateway that should use several runs
several processes. Where the OS has ``SO_REUSEPORT`` (Linux, the BSDs) every
worker binds its own listening socket to the same port and the kernel spreads
new connections over them; elsewhere the parent opens one listening socket
before forking and every worker accepts on it. Each worker is a whole gateway
with its own event loop and upstream pools.

The parent runs no event loop and serves nothing. It forks the workers,
restarts one that dies (backing off, and giving up, when they keep dying right
after start), passes SIGHUP on (each worker reloads the config file), and on
SIGTERM or SIGINT tells every worker to drain, waits for them all and exits 0.
A second SIGTERM/SIGINT makes the workers stop at once.

When limits can apply, the parent also holds the one limiter state all workers share (see
:mod:`.limits.shared`): its loop then waits on the workers' limiter sockets and a signal wake-up
pipe instead of in ``os.wait()``, still in one thread (forking from a threaded process is unsafe).

Workers live in their own process group, so a Ctrl-C in a terminal reaches
only the parent (which then drains them once), and on Linux they get SIGTERM
if the parent dies. Under systemd use ``KillMode=mixed`` so that only the
parent gets the stop signal and the workers drain once.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .config import Config
from .signals import StopSignals

if TYPE_CHECKING:
    from .limits.shared import Hub

log = logging.getLogger("at_gateway.workers")

# A worker that exits sooner than this after its start counts as a crash loop.
QUICK_EXIT = 1.0
# After this many quick exits in a row the supervisor gives up (a config that cannot serve).
MAX_QUICK_EXITS = 5

# (config, the shared listener or None); with a limiter hub also ``limiter=`` the worker's socket to it.
WorkerMain = Callable[..., int]


def default_mode() -> str:
    """SO_REUSEPORT where the OS has it; ``AT_GATEWAY_WORKER_SOCKET=shared`` forces the fallback (tests)."""
    forced = os.environ.get("AT_GATEWAY_WORKER_SOCKET", "")
    if forced in ("reuseport", "shared"):
        return forced
    return "reuseport" if hasattr(socket, "SO_REUSEPORT") else "shared"


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (never listen) a SO_REUSEPORT socket: it fixes the port, port 0 included, and gets no connections."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # type: ignore[attr-defined]
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock


def _shared_listener(host: str, port: int) -> socket.socket:
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        if os.name != "nt":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    return sock


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker if the supervisor dies (no orphans holding the port)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Supervisor:
    def __init__(self, config: Config, worker_main: WorkerMain, mode: str | None = None,
                 hub: Hub | None = None) -> None:
        self.config = config
        self.hub = hub
        self._wake: tuple[socket.socket, socket.socket] | None = None  # signal wake-up pair (hub mode)
        self._sel: selectors.BaseSelector | None = None  # the hub loop's selector (an epoll fd)
        self.worker_main = worker_main
        self.mode = mode or default_mode()
        self.workers: dict[int, float] = {}  # pid -> start time
        self.stopping = 0  # signals received asking to stop
        self._stops = StopSignals()
        self.codes: list[int] = []
        self._sock: socket.socket | None = None

    # -- processes ----------------------------------------------------------
    def _spawn(self) -> None:
        parent = os.getpid()
        hub = self.hub
        ends = hub.open() if hub is not None else None
        try:
            pid = os.fork()
        except BaseException:
            if ends is not None:
                for end in ends:
                    end.close()
            raise
        if pid == 0:  # the worker
            code = 1
            try:
                os.setpgid(0, 0)  # its own group: a terminal's Ctrl-C reaches the supervisor only
                if hub is not None and ends is not None:
                    signal.set_wakeup_fd(-1)
                    if self._wake is not None:
                        for w in self._wake:
                            w.close()
                    if self._sel is not None:
                        self._sel.close()  # the supervisor's epoll is not the worker's
                    hub.close_in_child()
                    ends[0].close()
                for sig in (signal.SIGTERM, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the worker's loop handles it
                _die_with_parent()
                if os.getppid() != parent:
                    os._exit(0)
                shared = self._sock if self.mode == "shared" else None
                if shared is None and self._sock is not None:
                    self._sock.close()
                if ends is not None:
                    code = self.worker_main(self.config, shared, limiter=ends[1])
                else:
                    code = self.worker_main(self.config, shared)
            except KeyboardInterrupt:
                code = 0
            except BaseException as exc:  # never return into the supervisor's stack
                try:
                    log.error("worker failed: %s: %s", exc.__class__.__name__, exc)
                except Exception:
                    pass
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        self.workers[pid] = time.monotonic()
        if hub is not None and ends is not None:
            ends[1].close()
            hub.attach(pid, ends[0])
        if self.stopping:  # a stop signal came while forking: this one must drain too
            os.kill(pid, signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        for pid in list(self.workers):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _on_stop(self, signum: int, frame: object) -> None:
        if not self._stops.add(signum):
            return  # the echo of the one before (make relays it; a process-group kill reached us too)
        self.stopping = self._stops.count
        if self.stopping == 1:
            log.info("signal %s: draining %d worker(s) (up to %gs)", signal.Signals(signum).name,
                     len(self.workers), self.config.shutdown_timeout)
            self._signal(signal.SIGTERM)
        else:
            self._signal(signal.SIGINT)  # a second signal: stop now, as a single process would

    def _on_hup(self, signum: int, frame: object) -> None:
        self._signal(signal.SIGHUP)

    # -- the loop -----------------------------------------------------------
    def run(self) -> int:
        cfg = self.config
        try:
            if self.mode == "reuseport":
                self._sock = _reserve_port(cfg.host, cfg.port)
            else:
                self._sock = _shared_listener(cfg.host, cfg.port)
        except OSError as exc:
            print(f"at-gateway: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        port = self._sock.getsockname()[1]
        self.config = replace(cfg, port=port)
        old = {sig: signal.signal(sig, handler) for sig, handler in (
            (signal.SIGTERM, self._on_stop), (signal.SIGINT, self._on_stop), (signal.SIGHUP, self._on_hup))}
        try:
            log.info("supervising %d workers on %s:%d (%s)", cfg.workers, cfg.host, port,
                     "SO_REUSEPORT" if self.mode == "reuseport" else "shared socket")
            if self.hub is not None:
                return self._serve_hub(cfg.workers)
            for _ in range(cfg.workers):
                self._spawn()
            return self._wait()
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self._sock.close()

    def _serve_hub(self, count: int) -> int:
        """The loop with a limiter hub: serve the workers' limiter sockets, reap and restart workers."""
        hub = self.hub
        assert hub is not None
        wake = socket.socketpair()
        for w in wake:
            w.setblocking(False)
        self._wake = wake
        old_fd = signal.set_wakeup_fd(wake[1].fileno(), warn_on_full_buffer=False)
        old_chld = signal.signal(signal.SIGCHLD, _ignore)  # a handler, so SIGCHLD wakes the loop
        sel = self._sel = selectors.DefaultSelector()
        sel.register(wake[0], selectors.EVENT_READ, None)
        try:
            for _ in range(count):
                self._spawn()
            return self._hub_loop(sel, hub, wake[0])
        finally:
            signal.set_wakeup_fd(old_fd)
            signal.signal(signal.SIGCHLD, old_chld)
            sel.close()
            self._sel = None
            hub.close()
            for w in wake:
                w.close()
            self._wake = None

    def _hub_loop(self, sel: selectors.BaseSelector, hub: Hub, wake: socket.socket) -> int:
        quick_exits = 0
        failed = False
        restart_at: list[float] = []  # when a replacement worker is due (backing off)
        watched: dict[int, Any] = {}
        while self.workers or restart_at:
            for pid, end in hub.sockets():
                if pid not in watched:
                    sel.register(end, selectors.EVENT_READ, pid)
                    watched[pid] = end
            timeout = max(0.0, min(restart_at) - time.monotonic()) if restart_at else None
            for key, _ in sel.select(timeout):
                if key.data is None:
                    try:
                        while wake.recv(512):
                            pass
                    except (BlockingIOError, InterruptedError):
                        pass
                else:
                    hub.serve(key.data)
            while True:  # reap every worker that exited
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    pid = 0
                if pid == 0:
                    break
                end = watched.pop(pid, None)
                if end is not None:
                    sel.unregister(end)
                hub.detach(pid)
                quick_exits, bad, delay = self._reaped(pid, status, quick_exits)
                failed = failed or bad
                if delay is not None:
                    restart_at.append(time.monotonic() + delay)
            if self.stopping:
                restart_at.clear()
            now = time.monotonic()
            due = [t for t in restart_at if t <= now]
            if due:
                restart_at[:] = [t for t in restart_at if t > now]
                for _ in due:
                    self._spawn()
        return 1 if failed else 0

    def _wait(self) -> int:
        quick_exits = 0
        failed = False
        while self.workers:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            quick_exits, bad, delay = self._reaped(pid, status, quick_exits)
            failed = failed or bad
            if delay is None:
                continue
            if delay:
                time.sleep(delay)
            if not self.stopping:
                self._spawn()
        return 1 if failed else 0

    def _reaped(self, pid: int, status: int, quick_exits: int) -> tuple[int, bool, float | None]:
        """A worker exited: ``(quick exits in a row, whether that is a failure, the delay before starting a new
        one, or None for none)``. While stopping, only an unclean exit counts; a crash loop gives up."""
        started = self.workers.pop(pid, None)
        if started is None:
            return quick_exits, False, None
        code = os.waitstatus_to_exitcode(status)
        if self.stopping:
            return quick_exits, code not in (0, -signal.SIGTERM, -signal.SIGINT), None
        lived = time.monotonic() - started
        quick_exits = quick_exits + 1 if lived < QUICK_EXIT else 0
        if quick_exits >= MAX_QUICK_EXITS:
            log.error("workers keep exiting right after start (last exit code %d): giving up", code)
            self.stopping = 1
            self._signal(signal.SIGTERM)
            return quick_exits, True, None
        log.warning("worker %d exited (code %d) after %.1fs; starting a new one", pid, code, lived)
        return quick_exits, False, (min(0.05 * 2 ** quick_exits, 5.0) if quick_exits else 0.0)


def _ignore(signum: int, frame: object) -> None:
    """SIGCHLD's handler in hub mode: nothing to do here, the wake-up pipe wakes the loop."""


def supervise(config: Config, worker_main: WorkerMain, mode: str | None = None, hub: Hub | None = None) -> int:
    """Run ``config.workers`` workers until told to stop; the exit code for the whole gateway. ``hub``:
    the limiter state the workers share (each gets its socket to it as ``limiter=``)."""
    if not hasattr(os, "fork"):
        log.warning("workers: %d needs fork(), which this OS lacks; serving in one process", config.workers)
        return worker_main(replace(config, workers=1), None)
    return Supervisor(config, worker_main, mode, hub).run()
