"""Supervisor: keeps a TritonServer serving, restarting it (same ports) when it dies or stops serving."""

from __future__ import annotations

import logging
import threading
import time

from .probe import HealthCheck
from .process import TritonServer, TritonServerError, _error_lines

log = logging.getLogger(__name__)


class Supervisor:
    """Keeps a started, ready TritonServer serving: restarts it (same ports) when it dies or a model is not ready.

    Since Triton 24.x a crashed Python stub is not restarted, and in 2.51 neither /v2/health/ready nor the model's
    own readiness notices (its requests fail with INTERNAL "Stub process ... is not healthy"). So every
    `check_interval` seconds the supervisor checks the server process, the stub processes (TritonServer.dead_stubs)
    and each model's readiness, and every `probe_interval` seconds it runs a real inference with a `probe_timeout`
    deadline (clip_server.probe, the same check as the Kubernetes watchdog's: zero_shot and clip_info): a stub that is
    alive but stopped or hung fails it, while an overloaded server that refuses or delays it is busy, not broken, as
    long as Triton's counters show it executing (no execution for `stall_seconds` while requests wait is broken). A
    server that aborts (Triton 2.51 does when a stopped stub is continued) is a dead process. A failure is confirmed
    once (`confirm_delay` later, probing again) before it acts. A restart is: log the server's error lines, stop it
    (SIGTERM, SIGKILL after `stop_timeout`, 5 s by default), start it again, wait until every model is ready. Restart
    storms are bounded: the k-th restart within `window` seconds waits `backoff * 2**(k-1)` seconds (at most
    `max_backoff`) first, and when `max_restarts` restarts happened within `window` the supervisor gives up and `run`
    returns 1.

    >>> stop = threading.Event()
    >>> sup = Supervisor(server)            # server already started and ready
    >>> thread = sup.start_thread(stop)     # or sup.run(stop) in the calling thread; stop.set() to end it
    """

    def __init__(
        self,
        server: TritonServer,
        *,
        check_interval: float = 1.0,
        confirm_delay: float = 0.5,
        max_restarts: int = 5,
        window: float = 300.0,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        stop_timeout: float | None = None,
        ready_timeout: float | None = None,
        probe_interval: float = 5.0,
        probe_timeout: float = 30.0,
        stall_seconds: float = 60.0,
    ):
        self.server = server
        self.check_interval = check_interval
        self.confirm_delay = confirm_delay
        self.max_restarts = max_restarts
        self.window = window
        self.backoff = backoff
        self.max_backoff = max_backoff
        # A broken server is not drained for long (serve's --exit-timeout is for a clean shutdown): the clients' retries
        # carry the requests it drops; a long drain would only lengthen the outage.
        self.stop_timeout = 5.0 if stop_timeout is None else stop_timeout
        self.ready_timeout = ready_timeout
        self.probe_interval = probe_interval  # 0: no inference probe
        self.probe_timeout = probe_timeout  # > the longest legitimate wait: 2 queue timeouts + execution
        self.stall_seconds = stall_seconds
        self._next_probe = 0.0
        self.health: HealthCheck | None = None  # made at the first probe (it remembers Triton's last progress)
        self.restarts: list[dict] = []  # {"at": time.time(), "reason": str, "seconds": float, "ok": bool}
        self.gave_up = False
        self.exit_code: int | None = None

    def problem(self, probe_now: bool = False) -> str | None:
        """Why the server needs a restart now, or None when it is serving; `probe_now`: also run the inference probe."""
        if not self.server.running:
            code = self.server.process.returncode if self.server.process is not None else None
            return f"tritonserver exited (code {code})"
        dead = self.server.dead_stubs()
        if dead:  # Triton 2.51 keeps such a model "ready": its requests fail with "Stub process ... is not healthy"
            return f"python backend stub process(es) {dead} died"
        gone = self.server.not_ready_models()
        if gone:
            return f"models not ready: {', '.join(gone)}"
        if not probe_now:
            return None
        if self.health is None:
            self.health = self._new_check()
        verdict = self.health.check()
        if verdict.state == "busy":
            log.info("supervisor: %s", verdict.reason)
        return f"probe {verdict.reason}" if verdict.broken else None

    def _new_check(self) -> HealthCheck:
        return HealthCheck(
            f"http://{self.server.http_url}",
            self.server.metrics_url,
            self.server.models,
            timeout=self.probe_timeout,
            stall_seconds=self.stall_seconds,
        )

    def _probe_due(self) -> bool:
        if self.probe_interval <= 0 or time.monotonic() < self._next_probe:
            return False
        self._next_probe = time.monotonic() + self.probe_interval
        return True

    def _recent(self) -> int:
        now = time.time()
        return sum(1 for r in self.restarts if now - r["at"] <= self.window)

    def restart(self, reason: str) -> bool:
        """Stop and start the server on the same ports; True when every model is ready again."""
        started = time.monotonic()
        tail = _error_lines(self.server.log_text(), limit=10, fallback=False) or "(none)"
        log.warning("supervisor: %s; restarting tritonserver. Its last error lines:\n%s", reason, tail)
        self.server.stop(timeout=self.stop_timeout)
        ok = True
        try:
            self.server.start()
            self.server.wait_ready(self.ready_timeout)
        except TritonServerError as exc:
            ok = False
            log.error("supervisor: restart failed: %s", exc)
        seconds = time.monotonic() - started
        self.restarts.append({"at": time.time(), "reason": reason, "seconds": round(seconds, 2), "ok": ok})
        if ok:
            log.warning("supervisor: tritonserver serving again after %.1fs (restart %d)", seconds, len(self.restarts))
        return ok

    def run(self, stop: threading.Event) -> int:
        """Supervise until `stop` is set (returns 0) or restarts exceed the budget (returns 1)."""
        while not stop.wait(self.check_interval):
            probe_now = self._probe_due()
            reason = self.problem(probe_now)
            if reason is None:
                continue
            if self.server.running and stop.wait(self.confirm_delay):  # a transient probe failure is not a crash
                break
            reason = self.problem(probe_now)
            if reason is None or stop.is_set():
                continue
            recent = self._recent()
            if recent >= self.max_restarts:
                log.error(
                    "supervisor: %s, and %d restarts within %.0fs already; giving up", reason, recent, self.window
                )
                self.gave_up = True
                self.exit_code = 1
                return 1
            delay = min(self.max_backoff, self.backoff * 2 ** (recent - 1)) if recent else 0.0
            if delay and stop.wait(delay):
                break
            self.restart(reason)
            self.health = None  # a new server: no progress to remember
            self._next_probe = time.monotonic() + self.probe_interval
        self.exit_code = 0
        return 0

    def start_thread(self, stop: threading.Event) -> threading.Thread:
        """run(stop) in a daemon thread. Restarted servers die with that thread (die_with_parent): stop it last."""
        thread = threading.Thread(target=self.run, args=(stop,), name="triton-supervisor", daemon=True)
        thread.start()
        return thread
