"""The one health check (local supervisor, Kubernetes watchdog sidecar, compose healthcheck): busy is not broken.

A check is: every model ready, then one real `zero_shot` inference (both preprocessors, both encoders, postprocess)
and `clip_info` within a deadline. A stub that is dead, stopped or hung keeps its model "ready" in Triton 2.51, so
only an inference that goes through every stub sees it. An overloaded server refuses the check's inference (queue
policy: HTTP 503 / UNAVAILABLE) or answers it late: that is busy, not broken, as long as Triton's own counters
(`nv_inference_exec_count` on the metrics port) show it executing. Broken is: not live, a model not ready, an error
other than an overload refusal, a wrong answer, or no progress (no model executed while requests waited) for
`stall_seconds`.

Standard library only (plus the tensor contract): the server image runs it with Triton's own Python.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from clip_common.contract import ClipInfo, ZeroShot

OK, BUSY, BROKEN = "ok", "busy", "broken"
# HTTP statuses an overloaded Triton answers an inference with (queue full / queue timeout: UNAVAILABLE).
OVERLOAD_STATUSES = (503, 429)


@dataclass
class Verdict:
    """One check's outcome: state is ok, busy (refused or late, but Triton executes) or broken; why in words."""

    state: str
    reason: str = ""

    @property
    def broken(self) -> bool:
        """True when the server needs a restart."""
        return self.state == BROKEN


def npy_pixel() -> bytes:
    """A 1x1 grey RGB uint8 image in .npy form (accepted by preprocess_image, no decoder involved), without numpy."""
    header = "{'descr': '|u1', 'fortran_order': False, 'shape': (1, 1, 3), }"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\x80\x80\x80"


def _element(data: bytes) -> bytes:
    """One BYTES tensor element in Triton's binary encoding: 4-byte little-endian length, then the bytes."""
    return struct.pack("<I", len(data)) + data


def _infer_body(model: str) -> tuple[bytes, dict[str, str]]:
    """The binary-tensor HTTP body of the check's request to `model` and its headers."""
    parts: list[tuple[str, bytes]] = []
    if model == ZeroShot.NAME:
        parts = [(ZeroShot.TEXT, _element(b"a photo")), (ZeroShot.IMAGE, _element(npy_pixel()))]
    output = ZeroShot.PROBS if model == ZeroShot.NAME else ClipInfo.INFO
    header = json.dumps(
        {
            "inputs": [
                {"name": name, "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": len(data)}}
                for name, data in parts
            ],
            "outputs": [{"name": output, "parameters": {"binary_data": False}}],
        }
    ).encode()
    return header + b"".join(d for _, d in parts), {"Inference-Header-Content-Length": str(len(header))}


def read_counters(metrics_url: str, timeout: float) -> dict[str, tuple[float, float]] | None:
    """model -> (executions so far, requests pending now) from Triton's Prometheus metrics; None when unreadable."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout) as resp:
            text = resp.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return None
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        for index, metric in enumerate(("nv_inference_exec_count{", "nv_inference_pending_request_count{")):
            if line.startswith(metric) and 'model="' in line:
                model = line.split('model="', 1)[1].split('"', 1)[0]
                try:
                    out.setdefault(model, [0.0, 0.0])[index] += float(line.rsplit(" ", 1)[1])
                except ValueError:
                    pass
    return {model: (v[0], v[1]) for model, v in out.items()} if out else None


@dataclass
class HealthCheck:
    """Checks one server; keeps the last time Triton was seen executing, so that busy is told from stalled.

    url: the server's HTTP endpoint (http://host:port); metrics_url: its Prometheus metrics; models: the models that
    must be ready; timeout: the check's inference deadline in seconds; stall_seconds: how long no execution while
    requests wait (the check's own included) counts as broken.
    """

    url: str
    metrics_url: str
    models: list[str]
    timeout: float = 20.0
    stall_seconds: float = 60.0
    headers: dict[str, str] = field(default_factory=dict)  # sent with every request (e.g. a gateway's API key)
    _progress_at: float = field(default_factory=time.monotonic, init=False)
    _counters: dict[str, tuple[float, float]] | None = field(default=None, init=False)

    def _status(self, path: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """(HTTP status, body) of one request; raises OSError/TimeoutError when nothing answers in time."""
        sent = {**self.headers, **(headers or {})}
        request = urllib.request.Request(self.url.rstrip("/") + path, data=data, headers=sent)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def _progress(self) -> str | None:
        """Read Triton's counters; None when it executed since the last read (or is idle), else why it stalled."""
        now = read_counters(self.metrics_url, min(self.timeout, 5.0))
        before, self._counters = self._counters, now
        if now is None:
            return f"cannot read Triton's metrics at {self.metrics_url} to tell busy from stalled"
        if before is None:
            return "no earlier counters to compare with"
        ran = sum(now[m][0] - before.get(m, (0.0, 0.0))[0] for m in now)
        stuck = [
            m for m in sorted(now) if now[m][1] > 0 and before.get(m, (0.0, 0.0))[1] > 0 and now[m][0] == before[m][0]
        ]
        if ran > 0 and not stuck:
            return None
        return f"requests waiting in {', '.join(stuck)} and none executed" if stuck else "no model executed"

    def _slow(self, what: str) -> Verdict:
        """A refused or late check: busy while Triton executes, broken after stall_seconds without progress."""
        stalled = self._progress()
        now = time.monotonic()
        if stalled is None:
            self._progress_at = now
            return Verdict(BUSY, f"{what}; Triton is executing (busy)")
        if now - self._progress_at >= self.stall_seconds:
            return Verdict(BROKEN, f"{what}; {stalled} for {now - self._progress_at:.0f}s")
        return Verdict(
            BUSY,
            f"{what}; {stalled} for {now - self._progress_at:.0f}s so far (broken after {self.stall_seconds:.0f}s)",
        )

    def _infer(self, model: str) -> Verdict | None:
        """None when `model` answered correctly; else the verdict its answer gives."""
        data, headers = _infer_body(model)
        try:
            status, body = self._status(f"/v2/models/{model}/infer", data, headers)
        except TimeoutError:
            return self._slow(f"{model}: no answer within {self.timeout:.0f}s")
        if status in OVERLOAD_STATUSES:
            return self._slow(f"{model}: refused with HTTP {status} ({body[:120].decode('utf-8', 'replace')})")
        if status != 200:
            return Verdict(BROKEN, f"{model}: HTTP {status} {body[:200].decode('utf-8', 'replace')}")
        try:
            values = json.loads(body)["outputs"][0]["data"]
        except (ValueError, KeyError, IndexError, TypeError):
            return Verdict(BROKEN, f"{model}: unreadable answer")
        if model == ZeroShot.NAME and not (len(values) == 1 and abs(float(values[0]) - 1.0) < 1e-4):
            return Verdict(BROKEN, f"{model}: wrong answer {values!r}"[:300])
        return None

    def check(self) -> Verdict:
        """One check now (see the module docstring)."""
        if self._counters is None:
            self._counters = read_counters(self.metrics_url, min(self.timeout, 5.0))
        try:
            if self._status("/v2/health/live")[0] != 200:
                return Verdict(BROKEN, "server not live")
            for model in self.models:
                status, _ = self._status(f"/v2/models/{model}/ready")
                if status != 200:
                    return Verdict(BROKEN, f"model {model} not ready (HTTP {status})")
            for model in (ZeroShot.NAME, ClipInfo.NAME):
                if model in self.models:
                    verdict = self._infer(model)
                    if verdict is not None:
                        return verdict
        except TimeoutError:
            return self._slow(f"no answer within {self.timeout:.0f}s")
        except OSError as exc:  # refused, reset, closed: nothing serves there
            return Verdict(BROKEN, f"cannot reach {self.url}: {type(exc).__name__}: {exc}"[:300])
        self._progress_at = time.monotonic()
        self._counters = None  # the next slow check compares with counters read during it
        return Verdict(OK)


def repository_models(repository: str) -> list[str]:
    """Model names of a repository folder (every sub-folder with a config.pbtxt)."""
    return sorted(m for m in os.listdir(repository) if os.path.isfile(os.path.join(repository, m, "config.pbtxt")))


def _api_key_headers() -> dict[str, str]:
    """Authorization for a gateway with API keys: the first key of the file CLIP_API_KEY_FILE, if set."""
    path = os.environ.get("CLIP_API_KEY_FILE")
    if not path:
        return {}
    with open(path, encoding="utf-8") as keys:
        key = next((line.strip() for line in keys if line.strip()), "")
    return {"Authorization": f"Bearer {key}"} if key else {}


def from_env() -> HealthCheck:
    """The check the container scripts run, configured by CLIP_HEALTH_URL (http:// or https://; SSL_CERT_FILE for a
    private CA), CLIP_METRICS_URL, CLIP_REPOSITORY, CLIP_HEALTH_TIMEOUT, CLIP_HEALTH_STALL (seconds) and
    CLIP_API_KEY_FILE."""
    return HealthCheck(
        headers=_api_key_headers(),
        url=os.environ.get("CLIP_HEALTH_URL", "http://127.0.0.1:8000"),
        metrics_url=os.environ.get("CLIP_METRICS_URL", "http://127.0.0.1:8002/metrics"),
        models=repository_models(os.environ.get("CLIP_REPOSITORY", "/models")),
        timeout=float(os.environ.get("CLIP_HEALTH_TIMEOUT", "20")),
        stall_seconds=float(os.environ.get("CLIP_HEALTH_STALL", "60")),
    )


def probe(http_url: str, models: list[str], timeout: float, metrics_url: str = "") -> str | None:
    """One stateless check (no earlier progress to remember): None when serving or busy, else why it is broken."""
    check = HealthCheck(f"http://{http_url}", metrics_url, models, timeout=timeout, stall_seconds=0.0)
    verdict = check.check()
    return verdict.reason if verdict.broken else None


def main(argv: list[str] | None = None) -> int:
    """The compose healthcheck: one check; exit 0 when ok or busy, 1 when broken (why on stderr).

    --once-ok (`helm test`): exit 0 only for a correct answer now, busy included in failures.
    """
    strict = "--once-ok" in (sys.argv[1:] if argv is None else argv)
    check = from_env()
    check.stall_seconds = 0.0  # one shot: no progress during its own deadline is a stall
    try:
        verdict = check.check()
    except Exception as exc:  # noqa: BLE001 - any failure of the check itself is "unhealthy", said in docker inspect
        verdict = Verdict(BROKEN, f"{type(exc).__name__}: {exc}")
    failed = verdict.broken or (strict and verdict.state != OK)
    print(f"{'unhealthy' if failed else verdict.state}: {verdict.reason}"[:500], file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
