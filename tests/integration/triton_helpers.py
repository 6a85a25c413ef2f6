"""Helpers shared by the serving tests: raw tritonclient inference, reading `clip-triton serve` start-up output, and
good traffic checked while an attack or a fault runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient


def infer(
    client,
    protocol: str,
    model: str,
    inputs: dict[str, np.ndarray],
    outputs: list[str],
    headers: dict[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """One raw tritonclient call: numpy inputs by name -> the requested outputs by name."""
    mod = httpclient if protocol == "http" else grpcclient
    tensors = []
    for name, array in inputs.items():
        dtype = (
            "BYTES"
            if array.dtype == object
            else {"int32": "INT32", "int64": "INT64", "float32": "FP32"}[array.dtype.name]
        )
        t = mod.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        tensors.append(t)
    result = client.infer(model, tensors, outputs=[mod.InferRequestedOutput(n) for n in outputs], headers=headers)
    return {n: result.as_numpy(n) for n in outputs}


def repository_copy(triton_server, dest: Path, **config_options) -> Path:
    """A copy of the session's repository at `dest`; with `config_options`, its configs regenerated as `build` writes
    them with those options (and clip_info's limits too when `limits` is one of them)."""
    from clip_build.repository import generate_configs, info_payload

    shutil.copytree(triton_server.repository, dest)
    if config_options:
        manifest = json.loads((triton_server.weights_dir / "manifest.json").read_text())
        for name, text in generate_configs(manifest, **config_options).items():
            (dest / name / "config.pbtxt").write_text(text)
        if "limits" in config_options:
            info = info_payload(manifest, limits=config_options["limits"])
            (dest / "clip_info" / "1" / "info.json").write_text(json.dumps(info))
    return dest


@contextmanager
def serving(repository: Path, **server_options) -> Iterator:
    """A TritonServer on `repository`, ready within 180 s; stopped on exit."""
    from clip_server import TritonServer

    server = TritonServer(repository, **server_options)
    server.start()
    try:
        server.wait_ready(180)
        yield server
    finally:
        server.stop()


def wait_until(condition, timeout: float, interval: float = 0.05) -> bool:
    """Poll `condition()` until it is true (True) or `timeout` seconds passed (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def read_until_ready(proc: subprocess.Popen, timeout: float = 120) -> list[str]:
    """stdout lines of `clip-triton serve` up to its "Ctrl-C to stop." line (or EOF / timeout)."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Ctrl-C to stop" in line:
            break
    return lines


# ------------------------------------------------------------------------------------------------ good traffic
def small_png(seed: int, h: int = 48, w: int = 64) -> bytes:
    """A small random PNG (a good image)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


GOOD_IMAGES = [small_png(i) for i in range(4)]
GOOD_TEXTS = ["a photo of a cat", "a red car", "two dogs", "an empty street"]
# (protocol, client): "raw" = tritonclient without retries (the server alone must not fail it); "sync" / "async" =
# CLIPClient / AsyncCLIPClient (retries within their budget: what a restart must not exceed)
RAW_WORKERS = (("http", "raw"), ("grpc", "raw"), ("http", "raw"), ("grpc", "raw"))
CLIP_WORKERS = (("http", "sync"), ("grpc", "sync"), ("http", "async"), ("grpc", "async"))


class GoodTraffic:
    """Good encode_text / encode_image requests from worker threads until the block ends, each answer checked
    against the same item's embedding computed alone before: zero failed or wrong good requests.

    >>> with GoodTraffic(server.http_url, server.grpc_url) as good:
    ...     attack()
    >>> good.assert_all_good()
    """

    def __init__(self, http_url: str, grpc_url: str, workers=RAW_WORKERS, **client_options):
        self.urls = {"http": http_url, "grpc": grpc_url}
        self.workers = workers
        # timeout is a total deadline per request, retries included: longer than a supervised restart of a stopped
        # stub (the probe's interval and deadline, then 10-25 s), so that the retries carry every request through it
        self.options = {"retries": 15, "backoff": 0.3, "timeout": 120, **client_options}
        self.results: list[tuple[str, int, object, float]] = []  # (kind, item, embedding or exception, time)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.reference: dict[str, np.ndarray] = {}

    def __enter__(self) -> GoodTraffic:
        from clip_client import CLIPClient

        with CLIPClient(self.urls["http"], protocol="http") as c:
            self.reference = {
                "image": c.encode_image(GOOD_IMAGES, normalize=False),
                "text": c.encode_text(GOOD_TEXTS, normalize=False),
            }
        for k, (protocol, client) in enumerate(self.workers):
            t = threading.Thread(target=self._run, args=(protocol, client, k), name=f"good-{protocol}-{client}-{k}")
            t.start()
            self._threads.append(t)
        assert wait_until(lambda: len(self.results) >= 2 * len(self.workers), 60), "good traffic never started"
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(180)

    def count(self, since: float = 0.0, kind: str | None = None) -> int:
        """Answers received after `since` (time.monotonic()), of one kind or all."""
        with self._lock:
            return sum(1 for r in self.results if r[3] > since and (kind is None or r[0] == kind))

    def _record(self, kind: str, item: int, out: object) -> None:
        with self._lock:
            self.results.append((kind, item, out, time.monotonic()))

    def _run(self, protocol: str, client: str, seed: int) -> None:
        if client == "async":
            import asyncio

            asyncio.run(self._run_async(protocol, seed))
            return
        if client == "sync":
            from clip_client import CLIPClient

            c = CLIPClient(self.urls[protocol], protocol=protocol, **self.options)
            calls = {
                "image": lambda i: c.encode_image([GOOD_IMAGES[i]], normalize=False)[0],
                "text": lambda i: c.encode_text([GOOD_TEXTS[i]], normalize=False)[0],
            }
        else:
            mod = httpclient if protocol == "http" else grpcclient
            c = mod.InferenceServerClient(self.urls[protocol])

            def raw(model: str, name: str, out: str, item: bytes) -> np.ndarray:
                return infer(c, protocol, model, {name: np.array([[item]], dtype=object)}, [out])[out][0]

            calls = {
                "image": lambda i: raw("encode_image", "image", "image_embeds", GOOD_IMAGES[i]),
                "text": lambda i: raw("encode_text", "text", "text_embeds", GOOD_TEXTS[i].encode()),
            }
        k = seed
        try:
            while not self._stop.is_set():
                k += 1
                kind = "image" if k % 2 else "text"
                try:
                    out = calls[kind](k % 4)
                except Exception as exc:  # noqa: BLE001 - asserted by assert_all_good
                    out = exc
                self._record(kind, k % 4, out)
        finally:
            c.close()

    async def _run_async(self, protocol: str, seed: int) -> None:
        from clip_client import AsyncCLIPClient

        async with AsyncCLIPClient(self.urls[protocol], protocol=protocol, **self.options) as c:
            k = seed
            while not self._stop.is_set():
                k += 1
                kind = "image" if k % 2 else "text"
                try:
                    if kind == "image":
                        out = (await c.encode_image([GOOD_IMAGES[k % 4]], normalize=False))[0]
                    else:
                        out = (await c.encode_text([GOOD_TEXTS[k % 4]], normalize=False))[0]
                except Exception as exc:  # noqa: BLE001 - asserted by assert_all_good
                    out = exc
                self._record(kind, k % 4, out)

    def assert_all_good(self, minimum: int = 10, stale_window: tuple[float, float] | None = None) -> int:
        """Every good request answered, with the embedding the item gets alone; at least `minimum` of them.
        `stale_window` (monotonic start, end): answers in it may be wrong (counted and returned, not failed): a
        stub frozen and resumed while Triton 2.51 already answered "not healthy" can hand back a stale result."""
        with self._lock:
            results = list(self.results)
        errors = [r for r in results if isinstance(r[2], BaseException)]
        assert not errors, f"{len(errors)} of {len(results)} good requests failed: {[r[2] for r in errors[:3]]}"
        assert len(results) >= minimum, (len(results), minimum)
        stale = 0
        for kind, item, out, t in results:
            if (
                not np.allclose(out, self.reference[kind][item], atol=1e-5, rtol=1e-4)
                and stale_window
                and stale_window[0] <= t <= stale_window[1]
            ):
                stale += 1
                continue
            np.testing.assert_allclose(
                out,
                self.reference[kind][item],
                atol=1e-5,
                rtol=1e-4,
                err_msg=f"good {kind} item {item} answered at {t:.3f}",
            )
        return stale
