"""TritonServer: one tritonserver process serving a model repository (start, readiness, stop, stubs, memory)."""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from .backend_dir import assemble_backend_dir
from .binary import TritonServerError, server_env, tritonserver_binary

log = logging.getLogger(__name__)

# APIs (HTTP) / protocols (gRPC) that `serve` puts behind the admin key header by default. Health, metadata and
# inference stay open: clients need nothing else (identity and limits come from the clip_info model).
ADMIN_HEADER = "x-clip-admin-key"
# Triton 2.51's gRPC frontend reads a restricted-protocol key from the metadata key with this prefix.
GRPC_ADMIN_HEADER = "triton-grpc-protocol-" + ADMIN_HEADER
RESTRICTED_APIS = ("model-repository", "model-config", "shared-memory", "statistics", "trace", "logging")

# Python backend stubs (our Python models, and here also the `pytorch` runner) exchange tensors with the server through
# one shared-memory region each (/dev/shm). A region starts at SHM_DEFAULT_BYTES and grows in SHM_GROWTH_BYTES steps
# to hold the batches that reach its stub; it never shrinks while the server runs (measured high-water marks: README
# "Shared memory"). docker-compose.yml passes the same sizes; its shm_size bounds all regions together.
SHM_DEFAULT_BYTES = 4 * 1024 * 1024
SHM_GROWTH_BYTES = 4 * 1024 * 1024
SHM_DIR = Path("/dev/shm")


class StartupCancelled(TritonServerError):
    """wait_ready() was asked to stop (a signal arrived while the models were loading)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def repository_models(repository: Path) -> list[str]:
    """Model names in a repository: every folder holding a config.pbtxt."""
    return sorted(p.parent.name for p in Path(repository).glob("*/config.pbtxt"))


def _set_pdeathsig() -> None:
    """In the child: get SIGTERM when the parent dies, so a crashed test run leaves no server behind."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


# E-level lines a CPU-only machine always prints; they are not why anything failed.
_HARMLESS = ("CudaDriverHelper", "unable to create stream", "CUDA driver version", "NVML", "DCGM")


def _error_lines(log_text: str, limit: int = 20, fallback: bool = True) -> str:
    """The server's own error lines (E-level glog lines and failed model table rows), CPU-only noise dropped.

    With none found: the log's last `limit` lines when `fallback`, else "".
    """
    keep = []
    for line in log_text.splitlines():
        s = line.strip()
        if any(h in s for h in _HARMLESS):
            continue
        if s.startswith("E") and "]" in s[:60] or "failed to load" in s or "UNAVAILABLE" in s or s.startswith("error:"):
            keep.append(s)
    if keep:
        return "\n".join(keep[-limit:])
    return "\n".join(log_text.splitlines()[-limit:]) if fallback else ""


class TritonServer:
    """A tritonserver process serving one model repository; use as a context manager.

    >>> with TritonServer("repo") as server:      # start() + wait_ready()
    ...     client = tritonclient.http.InferenceServerClient(server.http_url)

    Ports default to free ones. die_with_parent: the server gets SIGTERM when the *thread* that started it exits
    (PR_SET_PDEATHSIG), so a crashed test run leaves nothing behind; start it from a long-lived thread.
    admin_key: when set, the `restricted_apis` (HTTP --http-restricted-api, gRPC --grpc-restricted-protocol) answer
    only requests carrying the header `x-clip-admin-key: <admin_key>` (see `admin_headers`).
    """

    def __init__(
        self,
        repository: str | Path,
        *,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        log_path: str | Path | None = None,
        log_verbose: int = 0,
        backend_dir: str | Path | None = None,
        extra_args: list[str] | tuple[str, ...] = (),
        startup_timeout: float = 180.0,
        exit_timeout: int = 10,
        die_with_parent: bool = True,
        admin_key: str | None = None,
        restricted_apis: tuple[str, ...] | list[str] = RESTRICTED_APIS,
    ):
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise TritonServerError(f"model repository {self.repository} does not exist")
        self.host = host
        probe_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        self.http_port = http_port or free_port(probe_host)
        self.grpc_port = grpc_port or free_port(probe_host)
        self.metrics_port = metrics_port or free_port(probe_host)
        self._probe_host = probe_host
        self.log_verbose = log_verbose
        self.backend_dir = Path(backend_dir) if backend_dir else None
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.exit_timeout = exit_timeout  # seconds the server waits for open connections/in-flight work on SIGTERM
        self.die_with_parent = die_with_parent
        self._own_log_dir: str | None = None
        if log_path is None:
            self._own_log_dir = tempfile.mkdtemp(prefix="clip-triton-server-")
            log_path = Path(self._own_log_dir) / "tritonserver.log"
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None
        # this start's shared-memory region names begin with it: regions a killed server leaves behind are removed
        self.shm_prefix = self._new_shm_prefix()
        self.ready_seconds = 0.0  # how long the last start took to serve every model
        self._stubs: list = []  # psutil.Process of each python backend stub, found when the server became ready
        self.models = repository_models(self.repository)
        if admin_key is not None and (not admin_key or any(c in admin_key for c in ",:= \t\n")):
            raise TritonServerError("admin_key must be non-empty without spaces, ',', ':' or '='")
        self.admin_key = admin_key
        self.restricted_apis = tuple(restricted_apis) if admin_key else ()

    # ---- addresses
    @property
    def http_url(self) -> str:
        """host:port for tritonclient.http."""
        return f"{self._probe_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """host:port for tritonclient.grpc."""
        return f"{self._probe_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """Prometheus metrics endpoint."""
        return f"http://{self._probe_host}:{self.metrics_port}/metrics"

    @property
    def admin_headers(self) -> dict[str, str]:
        """Headers that unlock the restricted APIs over HTTP and gRPC (empty when nothing is restricted).

        tritonclient: `headers=server.admin_headers`. HTTP reads `x-clip-admin-key`; Triton's gRPC frontend reads
        the metadata key `triton-grpc-protocol-x-clip-admin-key`; each side ignores the other's.
        """
        return {ADMIN_HEADER: self.admin_key, GRPC_ADMIN_HEADER: self.admin_key} if self.admin_key else {}

    @staticmethod
    def _new_shm_prefix() -> str:
        return f"clip_triton_{secrets.token_hex(6)}_"

    def shm_args(self) -> list[str]:
        """--backend-config flags of the python backend: region sizes and this start's region name prefix."""
        return [
            f"--backend-config=python,shm-default-byte-size={SHM_DEFAULT_BYTES}",
            f"--backend-config=python,shm-growth-byte-size={SHM_GROWTH_BYTES}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]

    def shm_regions(self) -> list[Path]:
        """This start's python backend shared-memory regions (files in /dev/shm)."""
        return sorted(SHM_DIR.glob(self.shm_prefix + "*"))

    def remove_shm_regions(self) -> list[str]:
        """Delete this start's regions; only for a server that is gone (a killed one cannot remove its own)."""
        removed = []
        for path in self.shm_regions():
            try:
                path.unlink()
                removed.append(path.name)
            except FileNotFoundError:
                pass
        if removed:
            log.info("removed %d shared-memory region(s) the server left in %s", len(removed), SHM_DIR)
        return removed

    def restriction_args(self) -> list[str]:
        """--http-restricted-api / --grpc-restricted-protocol flags for the admin key (none without one)."""
        if not self.admin_key or not self.restricted_apis:
            return []
        apis = ",".join(self.restricted_apis)
        return [
            f"--http-restricted-api={apis}:{ADMIN_HEADER}={self.admin_key}",
            f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}={self.admin_key}",
        ]

    # ---- lifecycle
    def command(self) -> list[str]:
        """The tritonserver command line."""
        backend_dir = self.backend_dir or assemble_backend_dir()
        return [
            str(tritonserver_binary()),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_dir}",
            "--model-control-mode=none",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--exit-timeout-secs={self.exit_timeout}",
            "--disable-auto-complete-config",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--metrics-config=summary_latencies=true",  # p50/p90/p99 per model: the dashboard's latency panels
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--log-verbose={self.log_verbose}",
            *self.restriction_args(),
            *self.shm_args(),
            *self.extra_args,
        ]

    def start(self) -> TritonServer:
        """Launch the server (returns at once; call wait_ready)."""
        if self.process is not None and self.process.poll() is None:
            raise TritonServerError("server already running")
        if not self.models:
            raise TritonServerError(f"no model (folder with config.pbtxt) in {self.repository}")
        busy = self.ports_in_use()
        if busy:
            raise TritonServerError(
                f"port(s) {', '.join(busy)} on {self.host} already in use: another server is "
                "listening there; stop it or choose other ports"
            )
        self.shm_prefix = self._new_shm_prefix()
        cmd = self.command()
        log.debug("starting %s", " ".join(cmd))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=server_env(),
                start_new_session=True,  # Ctrl-C reaches us, and we shut the server down in order
                preexec_fn=_set_pdeathsig if self.die_with_parent else None,
            )
        self._started_at = time.monotonic()
        return self

    def ports_in_use(self) -> list[str]:
        """'NAME PORT' of each of our ports that something else listens on now (bound as tritonserver binds)."""
        host = "" if self.host in ("0.0.0.0", "") else self.host
        busy = []
        for name, port in (("HTTP", self.http_port), ("gRPC", self.grpc_port), ("metrics", self.metrics_port)):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed server's TIME_WAIT is no owner
                try:
                    s.bind((host, port))
                except OSError:
                    busy.append(f"{name} {port}")
        return busy

    def _listening_ports(self) -> set[int]:
        """TCP ports the server process itself listens on."""
        import psutil

        try:
            conns = psutil.Process(self.process.pid).net_connections(kind="tcp")
        except psutil.Error:
            return set()
        return {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN}

    def _get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        url = f"http://{self._probe_host}:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(
                urllib.request.Request(url, headers=self.admin_headers), timeout=timeout
            ) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return 0, b""

    def model_ready(self, name: str, version: str = "") -> bool:
        """True when the server reports `name` (any or one version) ready."""
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/ready"
        return self._get(path)[0] == 200

    def not_ready_models(self) -> list[str]:
        """Models of the repository that are not ready now."""
        return [m for m in self.models if not self.model_ready(m)]

    def wait_ready(self, timeout: float | None = None, stop: threading.Event | None = None) -> float:
        """Block until every model of the repository is ready; return seconds since start.

        Raises TritonServerError with the server's own error lines if it exits or times out, and StartupCancelled
        as soon as `stop` is set.
        """
        if self.process is None:
            raise TritonServerError("server not started")
        deadline = time.monotonic() + (self.startup_timeout if timeout is None else timeout)
        while True:
            if stop is not None and stop.is_set():
                raise StartupCancelled("stopped while the models were loading")
            code = self.process.poll()
            if code is not None:
                raise TritonServerError(f"tritonserver exited with code {code}:\n{_error_lines(self.log_text())}")
            if self._get("/v2/health/live")[0] == 200 and not self.not_ready_models():
                if self.http_port not in self._listening_ports():  # someone else answers on our port
                    raise TritonServerError(
                        f"HTTP port {self.http_port} answers, but not from this tritonserver "
                        f"(pid {self.process.pid}): the port is in use by another server"
                    )
                self._stubs = self._find_stubs()
                self.ready_seconds = time.monotonic() - self._started_at
                return self.ready_seconds
            if time.monotonic() > deadline:
                pending = self.not_ready_models()
                raise TritonServerError(
                    f"models not ready after {timeout or self.startup_timeout:.0f}s: {pending}\n"
                    f"{_error_lines(self.log_text())}"
                )
            time.sleep(0.25)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM the server, wait for its stubs to go; SIGKILL the group after `timeout`. Returns the exit code."""
        proc = self.process
        if proc is None:
            return None
        timeout = self.exit_timeout + 20.0 if timeout is None else timeout
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop in %.0fs; killing its process group", timeout)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        # stubs share the server's process group; none should remain, but never leave one behind
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.remove_shm_regions()  # a killed or aborted server could not (unlinking a mapped region is safe)
        return proc.returncode

    def close(self) -> None:
        """Stop and remove our own temporary log dir."""
        self.stop()
        if self._own_log_dir:
            shutil.rmtree(self._own_log_dir, ignore_errors=True)
            self._own_log_dir = None

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()  # also drops our temporary log dir
        else:
            self.stop()  # keep the log for the post-mortem
            log.info("tritonserver log kept at %s", self.log_path)

    # ---- inspection
    @property
    def running(self) -> bool:
        """The server process is alive."""
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        """Everything the server wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def pids(self) -> list[int]:
        """Server pid followed by its descendants (python backend stubs)."""
        if not self.running:
            return []
        import psutil

        root = psutil.Process(self.process.pid)
        return [root.pid] + [c.pid for c in root.children(recursive=True)]

    def _find_stubs(self) -> list:
        import psutil

        stubs = []
        for pid in self.pids()[1:]:
            try:
                proc = psutil.Process(pid)
                if proc.name().startswith("triton_python_b"):  # triton_python_backend_stub (comm is 15 chars)
                    stubs.append(proc)
            except psutil.Error:
                pass
        return stubs

    def stubs(self) -> dict[str, list[int]]:
        """Model name -> pids of its python backend stub processes (one per instance), as found at ready time."""
        out: dict[str, list[int]] = {}
        for proc in self._stubs:
            try:
                model = Path(proc.cmdline()[1]).parents[1].name  # <repository>/<model>/<version>/model.py
            except Exception:  # noqa: BLE001 - gone or unreadable
                model = "?"
            out.setdefault(model, []).append(proc.pid)
        return out

    def dead_stubs(self) -> list[int]:
        """Pids of stubs (found at ready time) that are no longer running.

        Triton 2.51 neither restarts a crashed stub nor marks its model not ready: requests fail with INTERNAL
        "Stub process '<model>_0_0' is not healthy" while /v2/models/<model>/ready stays 200. This is the check.
        """
        import psutil

        dead = []
        for proc in self._stubs:
            try:
                if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                    dead.append(proc.pid)
            except psutil.Error:
                dead.append(proc.pid)
        return dead

    def rss_bytes(self) -> int:
        """Resident memory of the server and all its stubs."""
        import psutil

        total = 0
        for pid in self.pids():
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total
