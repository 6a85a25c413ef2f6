"""`clip-triton bench`: Triton ensembles vs the in-process transformers pipeline, on the same weights, in one run."""

from __future__ import annotations

import argparse
import io
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from clip_common.contract import EncodeImage, EncodeText

from .workload import jpeg_images, parse_sizes, short_prompts

log = logging.getLogger(__name__)


# ---- results ------------------------------------------------------------------------------------------------------
@dataclass
class LoadResult:
    """One closed-loop run: `concurrency` callers, each sending one request after the other."""

    kind: str  # "image" | "text"
    concurrency: int
    items_per_request: int
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def items_per_s(self) -> float:
        return self.requests * self.items_per_request / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        """Latency percentile q (0..100) in ms."""
        import numpy as np

        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def summary(self) -> dict:
        return {
            "kind": self.kind,
            "concurrency": self.concurrency,
            "items_per_request": self.items_per_request,
            "requests": self.requests,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "items_per_s": round(self.items_per_s, 2),
            "p50_ms": round(self.pct(50), 1),
            "p95_ms": round(self.pct(95), 1),
            "p99_ms": round(self.pct(99), 1),
        }


@dataclass
class Check:
    """One target line of the report."""

    name: str
    value: float | None
    target: str  # human text, e.g. ">= 1.2x"
    ok: bool | None  # None: not measured
    detail: str = ""
    unit: str = ""

    @property
    def verdict(self) -> str:
        if self.ok is None:
            return "info" if self.value is not None and self.target == "-" else "n/a"
        return "PASS" if self.ok else "MISS"


def _ratio_check(name: str, num: float | None, den: float | None, minimum: float, detail: str = "") -> Check:
    if not num or not den:
        return Check(name, None, f">= {minimum:g}x", None, detail or "not measured")
    r = num / den
    return Check(name, r, f">= {minimum:g}x", r >= minimum, detail, "x")


# ---- measurements -------------------------------------------------------------------------------------------------
def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def measure_in_process(
    checkpoint: Path,
    images: list[bytes],
    texts: list[str],
    batch_sizes: Sequence[int],
    n_images: int,
    n_texts: int,
    dtype: str = "fp32",
) -> dict:
    """transformers in-process: PIL decode + processor/tokenizer + get_*_features, items/s per batch size; bf16: the
    model cast to bfloat16 (pixels too), what a user would run to get bf16 speed without a server."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    weights = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = CLIPModel.from_pretrained(str(checkpoint)).eval().to(weights)
    processor = AutoImageProcessor.from_pretrained(str(checkpoint))
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))

    def feats(out):
        return out.pooler_output if hasattr(out, "pooler_output") else out

    def image_batch(batch: list[bytes]):
        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in batch]
        px = processor(images=pil, return_tensors="pt")["pixel_values"]  # (B, 3, S, S)
        return feats(model.get_image_features(pixel_values=px.to(weights)))

    def text_batch(batch: list[str]):
        enc = tokenizer(batch, padding=True, truncation=True, max_length=77, return_tensors="pt")
        return feats(model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]))

    out: dict = {
        "image": {},
        "text": {},
        "model_only_image": {},
        "processor": type(processor).__name__,
        "tokenizer": type(tokenizer).__name__,
        "torch_threads": _torch_threads(),
        "dtype": dtype,
    }
    with torch.inference_mode():
        for kind, items, fn, n in (("image", images, image_batch, n_images), ("text", texts, text_batch, n_texts)):
            for b in batch_sizes:
                fn([items[i % len(items)] for i in range(b)])  # warm-up (allocator, kernels)
                total = max(n, 2 * b) // b * b
                t0 = time.perf_counter()
                for start in range(0, total, b):
                    fn([items[(start + i) % len(items)] for i in range(b)])
                dt = time.perf_counter() - t0
                out[kind][b] = total / dt
                log.info("in-process %s %s batch %d: %.1f items/s", dtype, kind, b, total / dt)
        # model only (pixels ready): how much of the end-to-end time is decode + preprocessing
        b = max(batch_sizes)
        px = processor(
            images=[Image.open(io.BytesIO(images[i % len(images)])).convert("RGB") for i in range(b)],
            return_tensors="pt",
        )["pixel_values"].to(weights)
        model.get_image_features(pixel_values=px)
        t0, reps = time.perf_counter(), max(1, n_images // b)
        for _ in range(reps):
            model.get_image_features(pixel_values=px)
        out["model_only_image"][b] = reps * b / (time.perf_counter() - t0)
    return out


def image_config_for(manifest: dict):
    """Our ImageConfig from a manifest, exactly as preprocess_image gets it (repository.image_parameters)."""
    from clip_build.repository import image_parameters
    from clip_runtime import params as P
    from clip_runtime.image import ImageConfig

    p = {name: spec.default for name, spec in P.PARAMETERS.items()}
    p.update(image_parameters(manifest))
    return ImageConfig.from_parameters(p)


def measure_preprocessing(checkpoint: Path, manifest: dict, images: list[bytes], reps: int) -> dict:
    """Our preprocessing (clip_runtime.image) vs transformers' image processor, both bytes -> pixels, 1 thread."""
    import dataclasses

    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor

    from clip_runtime.image import ImagePreprocessor

    cfg = image_config_for(manifest)
    ours = ImagePreprocessor(cfg)
    hf = AutoImageProcessor.from_pretrained(str(checkpoint))

    def run_hf(batch):
        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in batch]
        return hf(images=pil, return_tensors="np")["pixel_values"]

    def timed(fn) -> tuple[float, object]:
        fn(images[:2])
        t0 = time.perf_counter()
        for _ in range(reps):
            result = fn(images)
        return (time.perf_counter() - t0) / (reps * len(images)), result

    t_hf, px_hf = timed(run_hf)
    t_ours, px_ours = timed(ours)
    std = np.asarray(cfg.std, dtype=np.float64).reshape(1, 3, 1, 1)
    diff = np.abs(px_ours.astype(np.float64) - px_hf.astype(np.float64))  # (N, 3, S, S) normalised units
    levels = float((diff * std / cfg.rescale_factor).max())  # in 1/255 pixel levels
    out = {
        "hf_ms": t_hf * 1e3,
        "ours_ms": t_ours * 1e3,
        "speedup": t_hf / t_ours,
        "max_diff_levels": levels,
        "max_diff_normalised": float(diff.max()),
        "hf_class": type(hf).__name__,
        "images": len(images),
    }
    # as served: preprocess_image decodes one execute's images in a pool of min(4, cores) threads
    from concurrent.futures import ThreadPoolExecutor

    threads = min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:
        t_pool, _ = timed(lambda batch: ours.normalise(np.stack(ours.load_many(batch, pool))))
    out["served_threads"], out["served_ms"], out["served_speedup"] = threads, t_pool * 1e3, t_hf / t_pool
    # the inexact fast path preprocess_image offers (jpeg_draft_gap > 0): speed and error for the notes
    draft = ImagePreprocessor(dataclasses.replace(cfg, jpeg_draft_gap=4.0))
    t_draft, px_draft = timed(draft)
    out["draft4_ms"] = t_draft * 1e3
    out["draft4_speedup"] = t_hf / t_draft
    out["draft4_max_diff_levels"] = float((np.abs(px_draft - px_hf) * std / cfg.rescale_factor).max())
    return out


def closed_loop(
    client_factory,
    kind: str,
    items: list,
    concurrency: int,
    seconds: float,
    per_request: int = 1,
    normalize: bool = False,
) -> LoadResult:
    """`concurrency` threads, each sending requests of `per_request` items back to back for `seconds`."""
    import threading

    client = client_factory()
    fn = client.encode_image if kind == "image" else client.encode_text
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    start_gate = threading.Barrier(concurrency + 1)
    deadline = [0.0]

    def worker(idx: int) -> None:
        local: list[float] = []
        n = idx * 7919
        start_gate.wait()
        while time.perf_counter() < deadline[0]:
            batch = [items[(n + j) % len(items)] for j in range(per_request)]
            n += per_request
            t0 = time.perf_counter()
            try:
                fn(batch, normalize=normalize)
            except Exception as exc:  # noqa: BLE001  counted, the run goes on
                with lock:
                    errors[0] += 1
                    if errors[0] <= 3:
                        log.warning("%s request failed: %s", kind, exc)
                continue
            local.append((time.perf_counter() - t0) * 1e3)
        with lock:
            lat.extend(local)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + seconds
    t_start = time.perf_counter()
    start_gate.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_start
    client.close()
    return LoadResult(kind, concurrency, per_request, len(lat), errors[0], elapsed, lat)


def bulk_call(client_factory, kind: str, items: list, calls: int) -> dict:
    """`calls` client calls of ALL `items` each (the client splits and pipelines them)."""
    with client_factory() as client:
        fn = client.encode_image if kind == "image" else client.encode_text
        seconds = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn(items, normalize=False)
            seconds.append(time.perf_counter() - t0)
    total = sum(seconds)
    return {
        "kind": kind,
        "items": len(items),
        "calls": calls,
        "seconds": round(total, 3),
        "items_per_s": round(len(items) * calls / total, 2) if total else 0.0,
        "per_call_items_per_s": [round(len(items) / t, 2) for t in seconds],
    }


def model_stats(http_url: str) -> dict[str, dict]:
    """Triton's per-model statistics (cumulative counts and ns) over plain HTTP (the GPU kit has no HTTP client)."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://{http_url}/v2/models/stats", timeout=30) as resp:
        stats = json.load(resp)
    out = {}
    for m in stats.get("model_stats", []):
        inf = m.get("inference_stats", {})
        out[m["name"]] = {
            "inference_count": int(m.get("inference_count", 0)),
            "execution_count": int(m.get("execution_count", 0)),
            **{
                f"{k}_ns": int(inf.get(k, {}).get("ns", 0))
                for k in ("queue", "compute_input", "compute_infer", "compute_output")
            },
            "success_count": int(inf.get("success", {}).get("count", 0)),
        }
    return out


def stats_delta(before: dict, after: dict, seconds: float | None = None) -> dict[str, dict]:
    """Per model over a run: requests, executions, mean batch, ms per request queued / computing; with the run's
    `seconds`, the share of the run the model was computing (`busy`: 1.0 = one instance never idle)."""
    out = {}
    for name, a in after.items():
        b = before.get(name, {})
        d = {k: a[k] - b.get(k, 0) for k in a}
        if not d["success_count"]:
            continue
        reqs, execs = d["success_count"], max(1, d["execution_count"])
        batch = d["inference_count"] / execs
        # Triton charges every request of a batch with the whole execution: ns / requests = one execution's time
        per_exec = (d["compute_input_ns"] + d["compute_infer_ns"] + d["compute_output_ns"]) / reqs / 1e6
        out[name] = {
            "requests": reqs,
            "executions": d["execution_count"],
            "mean_batch": batch,
            "queue_ms": d["queue_ns"] / reqs / 1e6,
            "compute_ms_per_exec": per_exec,
            "compute_ms_per_item": per_exec / max(batch, 1e-9),
        }
        if seconds:
            out[name]["busy"] = per_exec * d["execution_count"] / (seconds * 1e3)
    return out


def _cpu_seconds(server) -> dict[str, float]:
    """CPU seconds (user + system) so far per process of the server, named as in _stub_breakdown; "client": ours."""
    import psutil  # loadtest extra

    out: dict[str, float] = {"client": sum(psutil.Process().cpu_times()[:2])}
    for pid in server.pids():
        try:
            proc = psutil.Process(pid)
            cmd, used = proc.cmdline(), sum(proc.cpu_times()[:2])
        except psutil.NoSuchProcess:
            continue
        name = Path(cmd[1]).parents[1].name if cmd and "stub" in cmd[0] and len(cmd) > 1 else "tritonserver"
        out[name] = out.get(name, 0.0) + used
    return out


def cores_used(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """Cores each process kept busy on average over `seconds` (1.0 = one core all the time)."""
    used = {k: round((v - before.get(k, 0.0)) / seconds, 2) for k, v in after.items() if seconds > 0}
    return {k: v for k, v in used.items() if v >= 0.01}


def _stub_breakdown(server) -> dict[str, float]:
    """RSS (MB) per process of the server: tritonserver itself and each python stub (by model name)."""
    import psutil

    out: dict[str, float] = {}
    for pid in server.pids():
        try:
            proc = psutil.Process(pid)
            cmd = proc.cmdline()
            rss = proc.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            continue
        name = "tritonserver"
        if cmd and "stub" in cmd[0]:
            # triton_python_backend_stub <repo>/<model>/<version>/<file> <shm region> ...
            name = Path(cmd[1]).parents[1].name if len(cmd) > 1 else "stub"

        out[name] = out.get(name, 0.0) + rss
    return out


MATRIX_BATCHES = (1, 8, 64)
MATRIX_MODELS = ("ViT-B/32", "ViT-L/14")
MATRIX_PRECISIONS = ("fp32", "bf16", "fp8")
MATRIX_DEVICES = ("H100", "H200")


def measure_towers(repo: Path, batches: Sequence[int] = MATRIX_BATCHES, cell_budget_s: float = 20.0) -> dict:
    """The repository's TorchScript encoders alone, as the runner calls them: images/s and texts/s (short prompts) per
    batch; a batch whose first call shows it would take longer than cell_budget_s is not timed (None)."""
    import torch

    from clip_build.repository import read_info
    from clip_runtime.text import TextTokenizer

    info = read_info(repo)
    side = int(info["exports"]["image_encoder"]["inputs"][0]["shape"][-1])
    tok = info["tokenizer"]
    tokenizer = TextTokenizer(
        repo / "preprocess_text" / "1" / "tokenizer.json", int(tok["max_length"]), int(tok["pad_token_id"])
    )
    out: dict = {"image": {}, "text": {}}
    gen = torch.Generator().manual_seed(0)
    for kind in ("image", "text"):
        model = torch.jit.load(str(repo / f"{kind}_encoder" / "1" / "model.pt")).eval()
        for b in batches:
            if kind == "image":
                args = (torch.randn(b, 3, side, side, generator=gen),)  # (B, 3, S, S)
            else:
                rows = tokenizer.encode_batch(short_prompts(b))
                args = tuple(torch.from_numpy(getattr(rows, n)) for n in ("ids", "lengths", "widths"))
            with torch.jit.optimized_execution(False), torch.inference_mode():
                t0 = time.perf_counter()
                model(*args)  # warm-up, and the estimate
                first = time.perf_counter() - t0
                reps = max(1, min(5, int(cell_budget_s / max(first, 1e-6)) - 1))
                if first > cell_budget_s:
                    out[kind][b] = None
                    continue
                t0 = time.perf_counter()
                for _ in range(reps):
                    model(*args)
                out[kind][b] = b * reps / (time.perf_counter() - t0)
            log.info("tower %s %s batch %d: %s/s", info["dtype"], kind, b, out[kind][b])
    return out


# ---- preparation --------------------------------------------------------------------------------------------------
def prepare_weights(args) -> tuple[Path | None, Path, dict]:
    """(HF checkpoint or None, WEIGHTS_DIR, manifest): --weights, --checkpoint, or a random ViT-B/32-size CLIP."""
    from clip_build.weights import load_manifest

    work = Path(args.workdir)
    if args.weights:
        weights = Path(args.weights)
        manifest = load_manifest(weights)
        ckpt = Path(args.checkpoint) if args.checkpoint else None
        if ckpt is None:  # the baseline needs the HF checkpoint the weights came from, when it is a local folder
            src = (manifest.get("source") or {}).get("vision") or ""
            ckpt = Path(src) if src and (Path(src) / "config.json").is_file() else None
        return ckpt, weights, manifest
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
        weights = work / f"weights-{_slug(str(ckpt.resolve()))}"
    else:
        ckpt = work / "checkpoint-clip-base-random"
        weights = work / "weights-clip-base-random"
        if not (ckpt / "config.json").is_file():
            from clip_build.synthetic import make_random_checkpoint

            log.info("making a random-weight ViT-B/32-size CLIP checkpoint in %s", ckpt)
            make_random_checkpoint(ckpt, "clip", size="base")
    if not (weights / "manifest.json").is_file() or args.rebuild:
        from clip_build.convert import convert

        log.info("converting %s -> %s", ckpt, weights)
        convert(str(ckpt), weights)
    return ckpt, weights, load_manifest(weights)


def _slug(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:12]


def prepare_repository(args, weights: Path, manifest: dict, dtype: str) -> tuple[Path, float]:
    """A model repository for `dtype`, built now (seconds) with `clip-triton build`'s defaults and the bench's
    --instance-count / --queue-delay-us, so no run measures a stale build."""
    from clip_build.repository import build_repository

    repo = Path(args.workdir) / f"repo-{manifest['model_id']}-{dtype}"
    t0 = time.perf_counter()
    build_repository(
        weights, repo, dtype=dtype, instance_count=args.instance_count, max_queue_delay_us=args.queue_delay_us
    )
    return repo, time.perf_counter() - t0


# ---- the run ------------------------------------------------------------------------------------------------------
def wait_idle(max_wait_s: float, threshold: float) -> float:
    """Wait (up to max_wait_s) for the 1-minute load average to fall below threshold; return it."""

    deadline = time.monotonic() + max_wait_s
    load = os.getloadavg()[0]
    while load >= threshold and time.monotonic() < deadline:
        time.sleep(5)
        load = os.getloadavg()[0]
    if load >= threshold:
        log.warning("load average %.2f: other processes share the CPU, numbers will be low and noisy", load)
    return load


def _machine() -> dict:
    import platform

    import psutil

    cpu = platform.processor() or platform.machine()
    flags, ident = "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith(("cpu family", "model\t")):  # AMD family 25: model 0-15 Zen 3, 16+ Zen 4
                ident.append(" ".join(line.replace(":", "").split()))
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f" {f}" in flags]
    from importlib.metadata import PackageNotFoundError, version  # importing locust would monkey-patch

    versions = {}
    for mod, dist in (
        ("torch", "torch"),
        ("transformers", "transformers"),
        ("tritonclient", "tritonclient"),
        ("numpy", "numpy"),
        ("PIL", "pillow"),
    ):
        try:
            versions[mod] = version(dist)
        except PackageNotFoundError:
            versions[mod] = "?"
    return {
        "cpu": ", ".join([cpu, *ident]),
        "isa": isa,
        "cores": psutil.cpu_count(logical=True),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        **versions,
    }


def serve_and_measure(
    args,
    repo: Path,
    images: list[bytes],
    texts: list[str],
    probe_images: list[bytes],
    probe_texts: list[str],
    full: bool,
    levels: Sequence[int],
) -> dict:
    """Start the server on `repo`, measure cold start, RSS, client load at each concurrency (online), one call with
    every item (bulk), the RSS after those, perf_analyzer."""
    bulk_images = [images[i % len(images)] for i in range(args.bulk_images)]
    bulk_texts = short_prompts(args.bulk_texts)
    from clip_client import CLIPClient
    from clip_server import TritonServer

    res: dict = {"client": [], "perf_analyzer": [], "stats": {}, "errors": []}

    log_path = Path(args.workdir) / f"tritonserver-{repo.name}.log"
    server = TritonServer(repo, log_path=log_path, exit_timeout=3)
    saved = {k: os.environ.get(k) for k in args.server_env}
    os.environ.update(args.server_env)  # the launcher builds the server's environment from ours
    t0 = time.perf_counter()
    try:
        server.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        server.wait_ready(300)
        res["cold_start_s"] = time.perf_counter() - t0
        res["rss_idle_mb"] = server.rss_bytes() / 2**20
        url = server.grpc_url if args.protocol == "grpc" else server.http_url
        log.info("server ready in %.1fs (%s), RSS %.0f MB", res["cold_start_s"], repo.name, res["rss_idle_mb"])

        def factory():
            return CLIPClient(url, protocol=args.protocol, retries=0, timeout=120.0)

        # probe embeddings (bf16 vs fp32 cosine) and warm-up at every batch size the batcher may form
        with factory() as c:
            res["probe_image"] = c.encode_image(probe_images, normalize=False).tolist()
            res["probe_text"] = c.encode_text(probe_texts, normalize=False).tolist()
        closed_loop(factory, "image", images, max(args.concurrency), args.warmup)
        closed_loop(factory, "text", texts, max(args.concurrency), args.warmup / 2)
        res["rss_warm_mb"] = server.rss_bytes() / 2**20
        res["rss_by_process_mb"] = _stub_breakdown(server)
        for kind, items in (("image", images), ("text", texts)):
            for c in levels:
                before, cpu_before = model_stats(server.http_url), _cpu_seconds(server)
                r = closed_loop(factory, kind, items, c, args.duration)
                res["stats"][f"{kind}@{c}"] = stats_delta(before, model_stats(server.http_url), r.seconds)
                res.setdefault("cores_used", {})[f"{kind}@{c}"] = cores_used(
                    cpu_before, _cpu_seconds(server), r.seconds
                )
                res["client"].append(r.summary())
                log.info(
                    "triton %s c=%d: %.1f items/s p50 %.0f ms p95 %.0f ms (%d errors)",
                    kind,
                    c,
                    r.items_per_s,
                    r.pct(50),
                    r.pct(95),
                    r.errors,
                )
        # the latency figure: one request carrying 8 items, alone on the server
        for kind, items in (("image", images), ("text", texts)):
            r = closed_loop(factory, kind, items, 1, args.duration / 2, per_request=8)
            res["client"].append(r.summary())
        # bulk: one client call with every item (the client splits and pipelines it), as a batch job would
        res["bulk"] = {}
        for kind, items in (("image", bulk_images), ("text", bulk_texts)):
            bulk_call(factory, kind, items[:64], 1)  # warm-up: the batch sizes a bulk call sends
            before, cpu_before = model_stats(server.http_url), _cpu_seconds(server)
            b = bulk_call(factory, kind, items, args.bulk_calls)
            b["cores_used"] = cores_used(cpu_before, _cpu_seconds(server), b["seconds"])
            res["stats"][f"{kind}@bulk"] = stats_delta(before, model_stats(server.http_url), b["seconds"])
            res["bulk"][kind] = b
            log.info("triton %s bulk (%d items per call): %.1f items/s", kind, b["items"], b["items_per_s"])
        res["rss_after_bulk_mb"] = server.rss_bytes() / 2**20
        res["rss_by_process_after_bulk_mb"] = _stub_breakdown(server)
        res["rss_peak_mb"] = max(res["rss_warm_mb"], res["rss_after_bulk_mb"])
        if full and not args.no_perf_analyzer:
            res["perf_analyzer"] = run_perf(args, server, images, texts)
        if not server.running:
            res["errors"].append("tritonserver died during the run")
        elif server.not_ready_models():  # a dead stub is not restarted (24.x): its models stay unavailable
            res["errors"].append(f"models not ready after the run: {server.not_ready_models()}")
        for r in res["client"]:
            if r["errors"]:
                res["errors"].append(f"{r['errors']} failed {r['kind']} requests at c={r['concurrency']}")
    finally:
        server.stop()
    return res


def run_perf(args, server, images: list[bytes], texts: list[str]) -> list[dict]:
    """perf_analyzer on encode_image / encode_text, single-item requests, at each concurrency."""
    from . import perf

    rows = []
    url = server.grpc_url if args.protocol == "grpc" else server.http_url
    for kind, model, data in (
        ("image", EncodeImage.NAME, perf.image_input_data(images[:16])),
        ("text", EncodeText.NAME, perf.text_input_data(texts[:64])),
    ):
        try:
            got = perf.run_perf_analyzer(
                model,
                url,
                data,
                protocol=args.protocol,
                concurrency=args.concurrency,
                measurement_ms=args.pa_window_ms,
                max_trials=4,
                workdir=Path(args.workdir),
            )
        except perf.PerfError as exc:
            log.warning("perf_analyzer: %s", exc)
            rows.append({"kind": kind, "error": str(exc)})
            continue
        for r in got:
            rows.append(
                {
                    "kind": kind,
                    "concurrency": r.concurrency,
                    "items_per_s": round(r.throughput, 2),
                    "p50_ms": round(r.p50_us / 1e3, 1),
                    "p95_ms": round(r.p95_us / 1e3, 1),
                    "p99_ms": round(r.p99_us / 1e3, 1),
                }
            )
            log.info(
                "perf_analyzer %s c=%d: %.1f items/s p95 %.0f ms", kind, r.concurrency, r.throughput, r.p95_us / 1e3
            )
    return rows


def _find(rows: list[dict], kind: str, concurrency: int, per_request: int = 1) -> dict | None:
    for r in rows:
        if (r.get("kind"), r.get("concurrency"), r.get("items_per_request", 1)) == (kind, concurrency, per_request):
            return r
    return None


def min_cosine(a, b) -> float:
    """Smallest row-wise cosine between two (N, D) arrays (or nested lists)."""
    import numpy as np

    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)  # (N, D)
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))  # (N,)
    return float(cos.min())


def _best(inproc: dict, kind: str) -> tuple[float | None, str]:
    """The in-process rate at its best batch size, and a note naming that batch."""
    rates = inproc.get(kind) or {}
    if not rates:
        return None, "not measured"
    b, v = max(rates.items(), key=lambda kv: kv[1])
    return v, f"{inproc.get('dtype', 'fp32')} in-process best: {v:.1f}/s at batch {b}"


def _served(res: dict | None, kind: str, concurrency: int = 8, per_request: int = 1) -> float | None:
    row = _find(res["client"], kind, concurrency, per_request) if res else None
    return row["items_per_s"] if row else None


def limiter(stats: dict | None, kind: str, inproc_rate: float | None, cores: dict | None = None) -> str:
    """What limits a served run, from its Triton statistics: the encoder computing all the time (compute-bound: its
    per-item cost is the gap), or the encoder waiting (batch formation, the path outside it)."""
    enc = (stats or {}).get(f"{kind}_encoder")
    if not enc:
        return "no encoder statistics for this run"
    pre = (stats or {}).get(f"preprocess_{kind}") or {}
    parts = [
        f"{kind}_encoder: mean batch {enc['mean_batch']:.1f}, {enc['compute_ms_per_item']:.1f} ms/item, queue "
        f"{enc['queue_ms']:.0f} ms/request"
    ]
    if inproc_rate:
        parts.append(f"in-process {1e3 / inproc_rate:.1f} ms/item end to end")
    if cores:  # the bench's own client and the server's front end share the cores with the encoders
        busiest = sorted(cores.items(), key=lambda kv: -kv[1])
        parts.append("cores busy: " + ", ".join(f"{k} {v:.2f}" for k, v in busiest))
    busy = enc.get("busy")
    if busy is None:
        return "; ".join(parts)
    if busy >= 0.9:
        parts.append(f"limit: encoder compute (busy {busy:.0%} of the run)")
    else:
        parts.append(
            f"limit: the encoder idles {1 - busy:.0%} of the run (batch formation and the path outside it; "
            f"preprocess_{kind} {pre.get('compute_ms_per_exec', float('nan')):.1f} ms/execution)"
        )
    return "; ".join(parts)


def _target(
    name: str,
    num: float | None,
    den: float | None,
    minimum: float,
    note: str,
    stats: dict | None,
    kind: str,
    cores: dict | None = None,
) -> Check:
    """A ratio target; a MISS says what limits it (limiter)."""
    check = _ratio_check(name, num, den, minimum, note)
    if check.ok is False:
        check.detail = f"{note}; {limiter(stats, kind, den, cores)}"
    return check


def _bulk(res: dict | None, kind: str) -> float | None:
    return ((res or {}).get("bulk") or {}).get(kind, {}).get("items_per_s")


def evaluate(results: dict) -> list[Check]:
    """Issue 24's targets (online: 8 single-item callers vs in-process at batch 8; bulk: one client call with every
    item vs in-process at its best batch; the reduced precision vs in-process fp32), then the other tracked figures."""
    fp32, low_name = results["triton"]["fp32"], next((d for d in results["triton"] if d != "fp32"), None)
    low = results["triton"].get(low_name) if low_name else None
    inproc, inproc_low = results.get("in_process") or {}, results.get(f"in_process_{low_name}") or {}
    cos = {kind: min_cosine(low[f"probe_{kind}"], fp32[f"probe_{kind}"]) for kind in ("image", "text")} if low else {}
    isa = results.get("machine", {}).get("isa") or []
    no_bf16 = "" if {"avx512_bf16", "amx_bf16"} & set(isa) else "; this CPU has no AVX512-BF16/AMX"
    checks = []
    for kind in ("image", "text"):
        b8 = (inproc.get(kind) or {}).get(8)
        checks.append(
            _target(
                f"fp32 online {kind}s: 8 callers x 1 vs in-process fp32 batch 8",
                _served(fp32, kind),
                b8,
                1.0,
                f"in-process batch 8: {b8 or float('nan'):.1f}/s",
                fp32["stats"].get(f"{kind}@8"),
                kind,
                (fp32.get("cores_used") or {}).get(f"{kind}@8"),
            )
        )
    for kind in ("image", "text"):
        best, note = _best(inproc, kind)
        checks.append(
            _target(
                f"fp32 bulk {kind}s: one call vs in-process fp32 best",
                _bulk(fp32, kind),
                best,
                0.95,
                note,
                fp32["stats"].get(f"{kind}@bulk"),
                kind,
                ((fp32.get("bulk") or {}).get(kind) or {}).get("cores_used"),
            )
        )
    if low is None:
        why = (results.get("reduced_precision") or {}).get("reason", "not asked for (--dtype fp32)")
        checks.append(
            Check("reduced precision (bulk >= 3x in-process fp32 best)", None, ">= 3x", None, f"not measured: {why}")
        )
    for kind in ("image", "text") if low else ():
        best, note = _best(inproc, kind)
        checks.append(
            _target(
                f"{low_name} bulk {kind}s vs in-process fp32 best",
                _bulk(low, kind),
                best,
                3.0,
                f"{note}; cosine vs fp32 {cos[kind]:.5f}{no_bf16}",
                low["stats"].get(f"{kind}@bulk"),
                kind,
            )
        )
        b8 = (inproc.get(kind) or {}).get(8)
        served = _served(low, kind)
        checks.append(
            Check(
                f"{low_name} online {kind}s vs in-process fp32 batch 8",
                served and b8 and served / b8,
                "-",
                None,
                "no target",
                "x",
            )
        )
        best16, note16 = _best(inproc_low, kind)
        checks.append(
            _ratio_check(
                f"{low_name} bulk {kind}s vs in-process {low_name} best", _bulk(low, kind), best16, 0.95, note16
            )
        )
        checks.append(
            Check(f"{low_name} vs fp32 {kind} embedding cosine (min)", cos[kind], ">= 0.9999", cos[kind] >= 0.9999)
        )
    for dtype, res in results["triton"].items():
        rss = res.get("rss_after_bulk_mb")
        by = res.get("rss_by_process_after_bulk_mb") or {}
        top = ", ".join(f"{k} {v:.0f} MB" for k, v in sorted(by.items(), key=lambda kv: -kv[1])[:3])
        checks.append(
            Check(
                f"whole-server RSS after the bulk calls ({dtype})",
                rss and rss / 1024,
                "<= 1.5 GB",
                None if rss is None else rss / 1024 <= 1.5,
                f"largest: {top}" if top else "",
                "GB",
            )
        )
    cold = fp32.get("cold_start_s")
    checks.append(
        Check("cold start (serve -> all models ready)", cold, "<= 20 s", None if cold is None else cold <= 20, unit="s")
    )
    pre = results.get("preprocessing")
    if pre:
        checks.append(
            _ratio_check(
                "our image preprocessing vs transformers' processor",
                pre["speedup"],
                1.0,
                3.0,
                f"{pre['ours_ms']:.2f} vs {pre['hf_ms']:.2f} ms/img",
            )
        )
        checks.append(
            Check(
                "preprocessing max pixel difference",
                pre["max_diff_levels"],
                "<= 1/255",
                pre["max_diff_levels"] <= 1.0 + 1e-6,
                "in 1/255 levels",
                "/255",
            )
        )
    for dtype, res in results["triton"].items():
        for kind, bound in (("text", 50.0), ("image", 150.0)):
            r = _find(res["client"], kind, 1, per_request=8)
            checks.append(
                Check(
                    f"p50 of one request of 8 {kind}s ({dtype})",
                    r and r["p50_ms"],
                    f"< {bound:g} ms",
                    None if not r else r["p50_ms"] < bound,
                    "design figure; one caller" + no_bf16,
                    "ms",
                )
            )
    return checks


# ---- reporting ----------------------------------------------------------------------------------------------------
NOTES_BEGIN, NOTES_END = "<!-- notes: kept across bench runs -->", "<!-- /notes -->"


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "GB":
        return f"{value:.2f} GB"
    if unit == "/255":
        return f"{value:.2f}/255"
    if abs(value) < 10 and unit != "ms":
        return f"{value:.5g}{(' ' + unit) if unit else ''}"
    return f"{value:.1f}{(' ' + unit) if unit else ''}"


def checks_table(checks: list[Check]) -> str:
    lines = ["| metric | measured | target | verdict | detail |", "|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c.name} | {_fmt(c.value, c.unit)} | {c.target} | **{c.verdict}** | {c.detail} |")
    return "\n".join(lines)


def _load_table(rows: list[dict], title: str) -> list[str]:
    out = [
        f"| {title} | kind | concurrency | items/request | items/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {title} | {r['kind']} | | | error: {r['error'][:120]} | | | | |")
            continue
        out.append(
            f"| {title} | {r['kind']} | {r['concurrency']} | {r.get('items_per_request', 1)} | "
            f"{r['items_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | "
            f"{r.get('errors', '')} |"
        )
    return out


def _stats_table(stats: dict[str, dict]) -> list[str]:
    out = [
        "| run | model | requests | executions | mean batch | queue ms/request | compute ms/execution | "
        "compute ms/item | busy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run_name, models in stats.items():
        for name, s in sorted(models.items()):
            busy = f"{s['busy']:.0%}" if "busy" in s else ""
            out.append(
                f"| {run_name} | {name} | {s['requests']} | {s['executions']} | {s['mean_batch']:.1f} | "
                f"{s['queue_ms']:.1f} | {s['compute_ms_per_exec']:.1f} | {s['compute_ms_per_item']:.1f} | "
                f"{busy} |"
            )
    return out


def _head_lines(results: dict, checks: list[Check]) -> list[str]:
    """Title, machine, the command that reproduces the run, the targets table."""
    m, cmd = results["machine"], results["command"]
    return [
        "# Benchmarks",
        "",
        "Generated by `clip-triton bench` (loadtest/clip_loadtest/bench.py); the notes section is written by hand and "
        "kept across runs.",
        "",
        "## Machine",
        f"- CPU: {m['cpu']}, {m['cores']} logical cores ({', '.join(m['isa']) or 'no AVX-512'}), "
        f"{m['memory_gb']} GB RAM, no GPU",
        f"- {m['os']}, Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"tritonclient {m['tritonclient']}, tritonserver 2.51 (nvidia-pytriton wheel), numpy {m['numpy']}, "
        f"Pillow {m['PIL']}",
        f"- Weights: {results['weights_desc']}",
        f"- Server environment added: {results.get('server_env') or 'none'}",
        f"- Date: {results['date']}, run time {results['elapsed_s']:.0f} s, load average {m.get('loadavg', '?')}",
        "",
        "## Reproduce",
        "```bash",
        f"{cmd}",
        "```",
        "",
        "## Targets",
        checks_table(checks),
        "",
    ]


def _in_process_lines(results: dict) -> list[str]:
    """The baseline: items/s by batch size for each in-process dtype, and the model-only image rate."""
    inproc = results.get("in_process") or {}
    lines = [
        "## In-process transformers (the baseline)",
        f"PIL decode + {inproc.get('processor', '?')} / {inproc.get('tokenizer', '?')} + get_*_features, "
        f"torch threads {inproc.get('torch_threads', '?')}; items/s by batch size (bf16: the model cast to bfloat16).",
        "",
    ]
    runs = [
        (d, results[k])
        for d, k in (("fp32", "in_process"), ("bf16", "in_process_bf16"), ("fp16", "in_process_fp16"))
        if results.get(k)
    ]
    lines += [
        "| batch | " + " | ".join(f"{d} images/s | {d} texts/s" for d, _ in runs) + " |",
        "|---|" + "---|---|" * len(runs),
    ]
    for b in sorted({b for _, r in runs for kind in ("image", "text") for b in r.get(kind) or {}}):
        lines.append(
            f"| {b} | "
            + " | ".join(
                f"{(r.get('image') or {}).get(b, float('nan')):.1f} | {(r.get('text') or {}).get(b, float('nan')):.1f}"
                for _, r in runs
            )
            + " |"
        )
    for b, v in (inproc.get("model_only_image") or {}).items():
        lines.append(f"\nModel only (pixel values ready), batch {b}: {v:.1f} images/s.")
    return lines


def _triton_lines(results: dict) -> list[str]:
    """Per served dtype: the closed-loop tables, memory and build time; the run errors; the model statistics."""
    lines = ["", "## Triton (closed loop: N callers, one request after the other)", ""]
    for dtype, res in results["triton"].items():
        lines += _load_table(res["client"], f"client {dtype}")
        if res.get("perf_analyzer"):
            lines += _load_table(res["perf_analyzer"], f"perf_analyzer {dtype}")[2:]
        lines.append("")
        lines.append(
            f"{dtype}: cold start {res.get('cold_start_s', float('nan')):.1f} s; RSS idle "
            f"{res.get('rss_idle_mb', 0):.0f} MB, after warm-up {res.get('rss_warm_mb', 0):.0f} MB, peak "
            f"{res.get('rss_peak_mb', 0):.0f} MB; by process (MB): "
            + ", ".join(f"{k} {v:.0f}" for k, v in sorted((res.get("rss_by_process_mb") or {}).items()))
        )
        for kind, b in (res.get("bulk") or {}).items():
            lines.append(
                f"{dtype} bulk {kind}s: {b['items_per_s']:.1f}/s over {b['calls']} call(s) of {b['items']} "
                f"(per call: {', '.join(f'{v:.1f}' for v in b['per_call_items_per_s'])}/s); cores busy: "
                + ", ".join(
                    f"{k} {v:.2f}" for k, v in sorted((b.get("cores_used") or {}).items(), key=lambda kv: -kv[1])
                )
                + "."
            )
        for run_name, cores in (res.get("cores_used") or {}).items():
            lines.append(
                f"{dtype} {run_name} cores busy: "
                + ", ".join(f"{k} {v:.2f}" for k, v in sorted(cores.items(), key=lambda kv: -kv[1]))
                + "."
            )
        if res.get("rss_after_bulk_mb"):
            lines.append(
                f"{dtype}: RSS after the bulk calls {res['rss_after_bulk_mb']:.0f} MB; by process (MB): "
                + ", ".join(f"{k} {v:.0f}" for k, v in sorted(res["rss_by_process_after_bulk_mb"].items()))
            )
        if res.get("build_s"):
            lines.append(f"Repository build ({dtype}): {res['build_s']:.0f} s.")
        lines.append("")
    for dtype, res in results["triton"].items():
        for err in res.get("errors", []):
            lines.append(f"**{dtype} run error:** {err}")
    lines += ["", "## Where the time goes (Triton model statistics over each run)", ""]
    lines += _stats_table(
        {f"{dtype} {run}": s for dtype, res in results["triton"].items() for run, s in (res.get("stats") or {}).items()}
    )
    return lines


def _preprocessing_lines(results: dict) -> list[str]:
    """Image preprocessing alone: transformers' processor vs ours (exact, as served, inexact draft mode)."""
    pre = results.get("preprocessing")
    if not pre:
        return []
    return [
        "",
        "## Image preprocessing alone (bytes -> pixel values, one thread)",
        "",
        f"- transformers {pre['hf_class']}: {pre['hf_ms']:.2f} ms/image (PIL decode + convert + processor)",
        f"- ours (clip_runtime.image, exact): {pre['ours_ms']:.2f} ms/image, {pre['speedup']:.2f}x, "
        f"max difference {pre['max_diff_levels']:.3f}/255",
        f"- ours as served ({pre['served_threads']} decode threads): {pre['served_ms']:.2f} ms/image, "
        f"{pre['served_speedup']:.2f}x",
        f"- ours with jpeg_draft_gap=4 (inexact): {pre['draft4_ms']:.2f} ms/image, "
        f"{pre['draft4_speedup']:.2f}x, max difference {pre['draft4_max_diff_levels']:.2f}/255",
        f"- over {pre['images']} JPEGs of sizes {results['image_sizes']}",
    ]


def _matrix_lines(results: dict) -> list[str]:
    """Model x precision x device x batch: the encoders alone (images/s | texts/s), this run's CPU rows filled."""
    if not any(res.get("towers") for res in results["triton"].values()):
        return []
    m = results["machine"]
    cpu = f"CPU ({m['cores']} cores, {', '.join(m['isa']) or 'no AVX-512'})"
    why_low = (results.get("reduced_precision") or {}).get("reason", "not built in this run")
    lines = [
        "",
        "## Matrix: the encoders alone (TorchScript, as served), images/s / texts/s",
        "",
        "| model | precision | device | " + " | ".join(f"batch {b}" for b in MATRIX_BATCHES) + " |",
        "|---|---|---|" + "---|" * len(MATRIX_BATCHES),
    ]
    for model in MATRIX_MODELS:
        for precision in MATRIX_PRECISIONS:
            towers = (results["triton"].get(precision) or {}).get("towers") if model == "ViT-B/32" else None
            if towers:
                cells = [
                    " / ".join(
                        "-" if v is None else f"{v:.1f}" for v in (towers["image"].get(b), towers["text"].get(b))
                    )
                    for b in MATRIX_BATCHES
                ]
                lines.append(f"| {model} | {precision} | {cpu} | " + " | ".join(cells) + " |")
            else:
                why = (
                    "random ViT-L/14 not built this round (2-core CPU time)"
                    if model != "ViT-B/32"
                    else "FP8 matmuls need a GPU (Hopper/Ada)"
                    if precision == "fp8"
                    else why_low
                )
                lines.append(
                    f"| {model} | {precision} | {cpu} | not measured: {why} |" + " |" * (len(MATRIX_BATCHES) - 1)
                )
            for device in MATRIX_DEVICES:
                lines.append(
                    f"| {model} | {precision} | {device} | not measured this round: no device lent |"
                    + " |" * (len(MATRIX_BATCHES) - 1)
                )
    lines.append('\n"-": that batch would have taken over 20 s on this machine, not timed.')
    return lines


def render_markdown(results: dict, checks: list[Check], notes: str) -> str:
    """docs/benchmarks.md from a run's results, its checks and the hand-written notes kept across runs."""
    lines = _head_lines(results, checks) + _in_process_lines(results) + _triton_lines(results) + _matrix_lines(results)
    lines += _preprocessing_lines(results)
    if results.get("plot"):
        lines += ["", f"![throughput and latency]({Path(results['plot']).name})"]
    lines += ["", "## Notes", NOTES_BEGIN, notes.strip() or "(none yet)", NOTES_END, ""]
    return "\n".join(lines)


def read_notes(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    if NOTES_BEGIN in text and NOTES_END in text:
        return text.split(NOTES_BEGIN, 1)[1].split(NOTES_END, 1)[0]
    return ""


def plot(results: dict, path: Path) -> bool:
    """Throughput vs concurrency and latency percentiles, one PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'clip-triton[loadtest]'): no plot")
        return False
    inproc = results.get("in_process") or {}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, kind in enumerate(("image", "text")):
        ax_t, ax_l = axes[0][col], axes[1][col]
        for dtype, res in results["triton"].items():
            for source, rows in (("client", res["client"]), ("perf_analyzer", res.get("perf_analyzer") or [])):
                pts = sorted(
                    (r["concurrency"], r)
                    for r in rows
                    if r.get("kind") == kind and "error" not in r and r.get("items_per_request", 1) == 1
                )
                if not pts:
                    continue
                xs = [c for c, _ in pts]
                style = "-o" if source == "client" else "--s"
                ax_t.plot(xs, [r["items_per_s"] for _, r in pts], style, label=f"Triton {dtype} ({source})")
                if source == "client":
                    for q, ls in (("p50_ms", "-"), ("p95_ms", "--"), ("p99_ms", ":")):
                        ax_l.plot(xs, [r[q] for _, r in pts], ls, marker="o", label=f"{dtype} {q[:3]}")
        best = inproc.get(kind) or {}
        if best:
            b, v = max(best.items(), key=lambda kv: kv[1])
            ax_t.axhline(v, color="grey", linestyle=":", label=f"in-process best (batch {b})")
        ax_t.set_title(f"{kind}s/s vs concurrency (single-item requests)")
        ax_t.set_xlabel("concurrent callers")
        ax_t.set_ylabel(f"{kind}s/s")
        ax_t.set_ylim(bottom=0)
        ax_t.legend(fontsize=7)
        ax_l.set_title(f"{kind} request latency (client)")
        ax_l.set_xlabel("concurrent callers")
        ax_l.set_ylabel("ms")
        ax_l.set_ylim(bottom=0)
        ax_l.legend(fontsize=7)
    fig.suptitle(f"clip-triton on {results['machine']['cpu']} ({results['machine']['cores']} cores)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# ---- CLI ----------------------------------------------------------------------------------------------------------
COMMAND_HELP = {"bench": "benchmark Triton against the in-process transformers pipeline"}


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Options of `clip-triton bench`."""
    parser.add_argument(
        "--weights", help="WEIGHTS_DIR from `clip-triton convert` (default: a random ViT-B/32-size CLIP)"
    )
    parser.add_argument("--checkpoint", help="HF checkpoint folder: converted, and the in-process baseline loads it")
    parser.add_argument("--workdir", default=".artifacts/bench", help="checkpoints, weights, repositories, logs")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "best"),
        default="best",
        help="best: fp32 and, where `build --dtype auto` picks it on this CPU (AVX512-BF16/AMX and a "
        "calibration), bf16; bf16: fp32 and bf16 whatever the CPU; fp32: fp32 only. The reduced "
        "precision is built, served and measured in-process too, and compared with fp32 "
        "(default: best)",
    )
    parser.add_argument(
        "--matrix",
        action="store_true",
        help="also time the encoders alone per batch for the model x precision x device x batch matrix",
    )
    parser.add_argument("--bulk-texts", type=int, default=512, help="texts in each bulk call (default: 512)")
    parser.add_argument("--bulk-images", type=int, default=64, help="images in each bulk call (default: 64)")
    parser.add_argument("--bulk-calls", type=int, default=2, help="bulk calls per kind, after a warm-up (default: 2)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=[1, 8, 16, 32, 64],
        help="in-process batch sizes (8 is always measured: the online baseline)",
    )
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per concurrency level")
    parser.add_argument("--warmup", type=float, default=6.0, help="seconds of warm-up load after the server starts")
    parser.add_argument("--pa-window-ms", type=int, default=4000, help="perf_analyzer measurement window")
    parser.add_argument("--no-perf-analyzer", action="store_true")
    parser.add_argument("--instance-count", type=int, help="encoder instances (default: `clip-triton build`'s)")
    parser.add_argument(
        "--queue-delay-us", type=int, help="every batching model's queue delay (default: `clip-triton build`'s)"
    )
    parser.add_argument("--image-sizes", default="224x224,320x240,480x640,640x480,1024x768")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for tritonserver and its stubs, e.g. OMP_WAIT_POLICY=PASSIVE",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to SECONDS for the load average to fall below 0.5",
    )
    parser.add_argument("--quick", action="store_true", help="c=8 only, short runs, no perf_analyzer (~3 min)")
    parser.add_argument("--rebuild", action="store_true", help="convert the weights again even when cached")
    parser.add_argument("--report", default="docs/benchmarks.md", help="markdown report ('' = none)")
    parser.add_argument("--plot", default="docs/benchmarks.png", help="PNG plot ('' = none)")
    parser.add_argument("--json", default="reports/bench.json", help="raw results ('' = none)")


def _server_env(items: list[str]) -> dict[str, str] | None:
    """--server-env KEY=VALUE items -> a dict; None (logged) for a malformed one."""
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            log.error("--server-env wants KEY=VALUE, got %r", item)
            return None
        env[key] = value
    return env


def _results_head(args: argparse.Namespace, weights: Path, manifest: dict, sizes) -> dict:
    """What a run records before measuring: machine, date, command, weights, server environment, image sizes."""
    import sys

    return {
        "machine": _machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "clip-triton bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "clip-triton bench",
        "weights_desc": f"{manifest.get('family')} model_id {manifest['model_id']}, "
        f"{'random init, ViT-B/32 size' if not (args.weights or args.checkpoint) else weights}, "
        f"projection dim {manifest['projection_dim']}",
        "server_env": " ".join(f"{k}={v}" for k, v in args.server_env.items()),
        "image_sizes": ", ".join(f"{w}x{h}" for w, h in sizes),
        "triton": {},
    }


def _dtypes(args: argparse.Namespace) -> tuple[str, ...]:
    return args.dtypes


def choose_dtypes(dtype: str) -> tuple[tuple[str, ...], dict | None]:
    """The dtypes a run serves (fp32 first) and, for "best", clip_build.precision's decision for this CPU."""
    if dtype != "best":
        return ("fp32",) if dtype == "fp32" else ("fp32", dtype), None
    from clip_build.precision import choose_dtype

    choice = choose_dtype("cpu")
    log.info("best reduced precision on this CPU: %s (%s)", choice.dtype, choice.reason)
    return ("fp32",) if choice.dtype == "fp32" else ("fp32", choice.dtype), choice.as_dict()


def _measure_baseline(
    args,
    results: dict,
    ckpt: Path | None,
    weights: Path,
    manifest: dict,
    images: list[bytes],
    texts: list[str],
    full: bool,
) -> None:
    """Into results: preprocessing alone and the in-process transformers rates (needs the HF checkpoint)."""
    if ckpt is None:
        log.warning("no HF checkpoint for --weights %s: in-process baseline skipped", weights)
        return
    results["preprocessing"] = measure_preprocessing(ckpt, manifest, images, reps=2 if full else 1)
    log.info(
        "preprocessing: ours %.2f ms/img, transformers %.2f ms/img (%.2fx), max diff %.3f/255",
        results["preprocessing"]["ours_ms"],
        results["preprocessing"]["hf_ms"],
        results["preprocessing"]["speedup"],
        results["preprocessing"]["max_diff_levels"],
    )
    for dtype in _dtypes(args):
        key = "in_process" if dtype == "fp32" else f"in_process_{dtype}"
        results[key] = measure_in_process(
            ckpt,
            images,
            texts,
            args.batch_sizes,
            n_images=64 if full else 32,
            n_texts=256 if full else 128,
            dtype=dtype,
        )


def _print_checks(checks: list[Check]) -> None:
    width = max(len(c.name) for c in checks)
    print(f"\n{'metric':<{width}}  {'measured':>12}  {'target':>12}  verdict")
    for c in checks:
        print(f"{c.name:<{width}}  {_fmt(c.value, c.unit):>12}  {c.target:>12}  {c.verdict}")


def _write_outputs(args: argparse.Namespace, results: dict, checks: list[Check]) -> None:
    """The plot, the Markdown report (keeping its notes) and the JSON results, each where its option says."""
    import json

    if args.plot and plot(results, Path(args.plot)):
        results["plot"] = args.plot
    if args.report:
        path = Path(args.report)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_markdown(results, checks, read_notes(path)), encoding="utf-8")
        print(f"report: {path}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")


def run(args: argparse.Namespace, command: str) -> int:
    """Entry point of `clip-triton bench`."""
    import gc

    started = time.perf_counter()
    # The in-process baseline's OpenMP threads wait as the server's do (clip_server.binary.server_env): spinning
    # idle threads cost the side that spins most when other processes share the cores, and change little when not.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.quick:
        args.duration, args.warmup, args.batch_sizes = min(args.duration, 4.0), min(args.warmup, 4.0), [8, 32]
        args.no_perf_analyzer, args.bulk_calls = True, 1
    args.batch_sizes = sorted({8, *args.batch_sizes})
    full = not args.quick
    args.server_env = _server_env(args.server_env)
    if args.server_env is None:
        return 2
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    ckpt, weights, manifest = prepare_weights(args)
    load_before = wait_idle(args.wait_idle, 0.5)
    sizes = parse_sizes(args.image_sizes)
    images = jpeg_images(24 if full else 12, sizes=sizes, seed=1)
    texts = short_prompts(256)
    probe_images, probe_texts = jpeg_images(8, sizes=sizes, seed=2), short_prompts(8)
    results = _results_head(args, weights, manifest, sizes)
    args.dtypes, results["reduced_precision"] = choose_dtypes(args.dtype)
    _measure_baseline(args, results, ckpt, weights, manifest, images, texts, full)
    gc.collect()
    for dtype in _dtypes(args):
        repo, build_s = prepare_repository(args, weights, manifest, dtype)
        main = dtype == "fp32"  # the reduced-precision build: c=8, bulk and the probe embeddings only
        res = serve_and_measure(
            args,
            repo,
            images,
            texts,
            probe_images,
            probe_texts,
            full and main,
            args.concurrency if full and main else [8],
        )
        res["build_s"] = build_s
        if args.matrix:
            res["towers"] = measure_towers(repo)
        results["triton"][dtype] = res
    checks = evaluate(results)
    results["elapsed_s"] = time.perf_counter() - started
    results["machine"]["loadavg"] = f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after (1-min)"
    results["checks"] = [c.__dict__ | {"verdict": c.verdict} for c in checks]
    _print_checks(checks)
    _write_outputs(args, results, checks)
    print(f"bench finished in {results['elapsed_s']:.0f} s")
    errors = [e for res in results["triton"].values() for e in res.get("errors", [])]
    return 1 if errors else 0
