"""The GPU kit's one run: for each dtype (bf16 by default) build a ViT-B/32-size repository with --instance-kind gpu
(the preprocessors spread over the cores by `--preprocess-instances auto`), time the towers alone, serve it on the
kit's tritonserver, check parity against the fp32 CPU reference (cosine >= 0.999), measure end-to-end images/s and
texts/s through Triton (the machine's cores decoding), batch-of-8 latency, perf_analyzer and GPU utilisation. Then,
on a GPU, the same dtype again with `--image-decode gpu`: its pixels against the exact CPU path (decode_check, in a
subprocess), its embeddings against the exact path's and the fp32 reference, and end-to-end images/s. A failure there
is recorded and does not touch the rest. gpukit.json and gpukit.md (rewritten after each step) and the server logs go
into --out.

    python3 .artifacts/gpu-kit/run_kit.py --device cuda --out "$OUT"    # through the kit, on the GPU machine
    python -m clip_loadtest.gpukit.run --device cpu --out reports/gpukit  # tiny model, KIND_CPU (what CI runs)

Exit code 0 when every build served, passed parity and the run had no error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from clip_common.contract import EncodeImage, EncodeText

from .. import perf
from ..bench import Check, closed_loop, image_config_for, min_cosine, model_stats, stats_delta
from ..workload import jpeg_images, short_prompts
from .gpu import GpuMonitor
from .report import render

log = logging.getLogger(__name__)

PARITY_MIN = 0.999
KIT_ROOT_ENV = "CLIP_GPUKIT_ROOT"


@dataclass(frozen=True)
class Plan:
    """What one run measures on a device."""

    size: str  # synthetic checkpoint size: base = ViT-B/32 + CLIP text, tiny = CI
    max_batch_size: int
    instance_count: int  # encoder instances (each its own stub process and CUDA stream)
    tower_batch: int  # batch of the towers-alone timing
    tower_iters: int
    text_lengths: tuple[int, ...]  # token lengths of the text-tower timing (16: short prompts as padded; 77: max)
    concurrency: int  # callers of the end-to-end runs (enough requests in flight to keep every preprocessor busy)
    per_request: int  # items per end-to-end request
    duration_s: float  # per end-to-end run
    warmup_s: float
    image_sizes: str  # the end-to-end JPEGs (width x height)
    n_images: int
    perf_window_ms: int


PLANS = {
    "cuda": Plan("base", 256, 4, 256, 50, (16, 77), 16, 64, 8.0, 4.0, "640x480", 64, 3000),
    "cpu": Plan("tiny", 16, 1, 16, 3, (16, 77), 2, 4, 2.0, 1.0, "64x48,48x64", 8, 1000),
}
TARGETS = {"image tower bf16 (img/s, batch 256)": 30_000, "end-to-end images/s through Triton (bf16)": 5_000}
FAST_TARGETS = {
    "image tower bf16, CUDA graphs (img/s, batch 256)": ("graphs", 40_000),
    "image tower FP8 + CUDA graphs (img/s, batch 256)": ("fp8", 55_000),
}
E2E_TARGET = TARGETS["end-to-end images/s through Triton (bf16)"]
GPU_DECODE_MIN_S = 60.0  # the --image-decode gpu step starts only with this much of the budget left
DECODE_CHECK_TIMEOUT_S = 90  # normally ~15 s: torch and CUDA start, 70 decodes


class KitRunError(RuntimeError):
    """The machine cannot run the kit (no CUDA, no shared libpython for the stub, ...)."""


# ---- set-up -------------------------------------------------------------------------------------------------------
def check_machine(device: str) -> dict:
    """CUDA for --device cuda, a shared libpython and numpy < 2 for the stubs (KitRunError); what the stubs import."""
    import ctypes
    import subprocess
    import sysconfig

    import torch

    from clip_server.binary import stub_env_bin

    if device == "cuda" and not torch.cuda.is_available():
        raise KitRunError(f"--device cuda, but torch {torch.__version__} sees no CUDA device")
    soname, libdir = sysconfig.get_config_var("INSTSONAME") or "", sysconfig.get_config_var("LIBDIR") or ""
    for candidate in (os.path.join(libdir, soname), soname):
        try:
            ctypes.CDLL(candidate)
            break
        except OSError:
            continue
    else:
        raise KitRunError(
            f"the Triton python stub links {soname or 'libpython'}, which this Python "
            f"({sys.executable}) does not have as a shared library (LIBDIR {libdir})"
        )
    code = (
        "import json, numpy, clip_runtime; print(json.dumps({'numpy': numpy.__version__, 'numpy_at': "
        "numpy.__file__, 'clip_runtime_at': clip_runtime.__file__}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(stub_env_bin() / "python3"), "-c", code], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise KitRunError(
            f"the python stubs' environment ({stub_env_bin()}) cannot import numpy and clip_runtime: "
            f"{done.stderr.strip()[-500:]}"
        )
    stub = json.loads(done.stdout.strip().splitlines()[-1])
    if int(stub["numpy"].split(".")[0]) >= 2:
        raise KitRunError(
            f"the python stubs would import numpy {stub['numpy']} ({stub['numpy_at']}): Triton 24.10's "
            "stub misreads numpy 2 arrays (crashes on BYTES inputs, empty FP32 outputs); give them "
            "numpy < 2 (the GPU kit's stub-site)"
        )
    return stub


def _origin(module: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec(module)
    return str(Path(spec.origin).parent) if spec and spec.origin else "missing"


def environment(device: str, monitor: GpuMonitor) -> dict:
    """Machine, versions, and where the server and each package came from (the kit's copies on the device)."""
    import numpy
    import torch

    from clip_server.binary import tritonserver_binary

    root = os.environ.get(KIT_ROOT_ENV)
    env = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "tritonserver": str(tritonserver_binary()),
        "kit_root": root,
        "kit": json.loads((Path(root) / "kit.json").read_text(encoding="utf-8"))["versions"] if root else None,
        "packages": {
            m: _origin(m) for m in ("clip_runtime", "clip_server", "clip_loadtest", "tritonclient", "rapidjson")
        },
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            **{f"smi_{k}": v for k, v in monitor.info.items()},
        }
    env["gpu_monitor"] = monitor.reason or "nvidia-smi, 200 ms samples"
    return env


def prepare_weights(work: Path, size: str) -> tuple[Path, dict]:
    """A random-weight CLIP checkpoint of `size`, converted to Parquet (reused when already in `work`)."""
    from clip_build.convert import convert
    from clip_build.synthetic import make_random_checkpoint
    from clip_build.weights import load_manifest

    ckpt, weights = work / f"checkpoint-clip-{size}", work / f"weights-clip-{size}"
    if not (weights / "manifest.json").is_file():
        if not (ckpt / "config.json").is_file():
            make_random_checkpoint(ckpt, "clip", size=size)
        convert(str(ckpt), weights)
    return weights, load_manifest(weights)


def fp32_reference(weights: Path, manifest: dict, images: list[bytes], texts: list[str]) -> dict:
    """fp32 embeddings on the CPU of the probe images and texts, preprocessed exactly as the server does."""
    import torch

    from clip_build.export import build_image_encoder, build_text_encoder
    from clip_runtime.image import ImagePreprocessor
    from clip_runtime.text import TextTokenizer

    tok = manifest["tokenizer"]
    tokenizer = TextTokenizer(
        weights / (tok.get("dir") or "tokenizer") / "tokenizer.json", int(tok["max_length"]), int(tok["pad_token_id"])
    )
    rows = tokenizer.encode_batch(texts)  # ids (N, L), lengths (N, 1), widths (N, 1) int64
    pixels = ImagePreprocessor(image_config_for(manifest))(images)  # (N, 3, S, S) float32
    with torch.inference_mode():
        image = build_image_encoder(weights, "fp32")(torch.from_numpy(pixels))  # (N, D)
        text = build_text_encoder(weights, "fp32")(
            *(torch.from_numpy(getattr(rows, n)) for n in ("ids", "lengths", "widths"))
        )  # (N, D)
    return {"image": image.numpy(), "text": text.numpy()}


# ---- measurements -------------------------------------------------------------------------------------------------
def _rate(model, inputs: tuple, batch: int, iters: int, device) -> float:
    """Items/s of `model(*inputs)` as the runner calls it (inference mode, profiling executor off)."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.jit.optimized_execution(False), torch.inference_mode():
        for _ in range(3):  # warm-up: kernels, allocator
            model(*inputs)
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            model(*inputs)
        sync()
        return batch * iters / (time.perf_counter() - t0)


def measure_towers(repo: Path, device: str, plan: Plan, vocab_size: int) -> dict:
    """Each TorchScript encoder of `repo` alone on `device`: images/s at tower_batch, texts/s per token length."""
    import torch

    from clip_build.repository import read_info

    dev = torch.device(device)
    side = int(read_info(repo)["exports"]["image_encoder"]["inputs"][0]["shape"][-1])
    out: dict = {"batch": plan.tower_batch}
    model = torch.jit.load(str(repo / "image_encoder" / "1" / "model.pt"), map_location=dev).eval()
    pixels = torch.randn(plan.tower_batch, 3, side, side, device=dev)  # (B, 3, S, S)
    out["image_per_s"] = _rate(model, (pixels,), plan.tower_batch, plan.tower_iters, dev)
    model = torch.jit.load(str(repo / "text_encoder" / "1" / "model.pt"), map_location=dev).eval()
    out["text_per_s"] = {}
    for length in plan.text_lengths:
        ids = torch.randint(1, vocab_size, (plan.tower_batch, length), device=dev)  # (B, L)
        rows = torch.full((plan.tower_batch, 1), length, device=dev)  # (B, 1): lengths = widths = L
        out["text_per_s"][length] = _rate(model, (ids, rows, rows), plan.tower_batch, plan.tower_iters, dev)
    del model, pixels
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def measure_fast(ctx: Context, repo: Path, dtype: str) -> dict:
    """The image tower with CUDA graphs (fixed batch buckets) and with FP8 linear layers (fast.py), each checked
    against the fp32 CPU reference on the probe images; FP8's zero-shot top-1 over the probe texts too. On the CPU the
    graphs are skipped (they need CUDA) and FP8 is emulated: the bucketing and the parity gate still run."""
    import torch

    from clip_build.export import build_image_encoder
    from clip_runtime.image import ImagePreprocessor

    from .fast import GraphedTower, fp8_parity, to_fp8

    plan, dev = ctx.plan, torch.device(ctx.args.device)
    probe = torch.from_numpy(ImagePreprocessor(image_config_for(ctx.manifest))(ctx.probe_images)).to(dev)  # (N,3,S,S)
    pixels = torch.randn(plan.tower_batch, *probe.shape[1:], device=dev)  # (B, 3, S, S)
    reference, labels = (torch.from_numpy(ctx.reference[k]) for k in ("image", "text"))
    out: dict = {}
    scripted = torch.jit.load(str(repo / "image_encoder" / "1" / "model.pt"), map_location=dev).eval()
    if dev.type == "cuda":
        try:
            graphed = GraphedTower(scripted, (len(ctx.probe_images), plan.tower_batch))
            with torch.jit.optimized_execution(False), torch.inference_mode():  # as the runner calls it
                out["graphs"] = {
                    "image_per_s": _rate(graphed, (pixels,), plan.tower_batch, plan.tower_iters, dev),
                    "min_cosine": min_cosine(graphed(probe).cpu().numpy(), ctx.reference["image"]),
                }
        except Exception as exc:  # noqa: BLE001 - recorded; the FP8 step still runs
            out["graphs"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    else:
        out["graphs"] = {"skipped": "CUDA graphs need a CUDA device"}
    try:
        eager = build_image_encoder(ctx.weights, dtype if dtype in ("bf16", "fp16") else "bf16")
        out_fp8 = {"linear_layers": to_fp8(eager, "vision.layers"), "emulated": dev.type != "cuda"}
        eager = eager.to(dev)
        tower = GraphedTower(eager, (len(ctx.probe_images), plan.tower_batch)) if dev.type == "cuda" else eager
        with torch.inference_mode():
            out_fp8.update(fp8_parity(tower(probe).float().cpu(), reference, labels))
            out_fp8["image_per_s"] = _rate(tower, (pixels,), plan.tower_batch, plan.tower_iters, dev)
        out["fp8"] = out_fp8
    except Exception as exc:  # noqa: BLE001 - recorded (e.g. a GPU without FP8 matmuls: before Hopper / Ada)
        out["fp8"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _perf(server, kind: str, items: list, plan: Plan, workdir: Path) -> dict:
    """perf_analyzer on encode_image / encode_text: requests of per_request items at the run's concurrency."""
    data = (
        perf.image_input_data(items, plan.per_request)
        if kind == "image"
        else perf.text_input_data(items, plan.per_request)
    )
    model = EncodeImage.NAME if kind == "image" else EncodeText.NAME
    root = os.environ.get(KIT_ROOT_ENV)
    try:
        rows = perf.run_perf_analyzer(
            model,
            server.grpc_url,
            data,
            protocol="grpc",
            concurrency=[plan.concurrency],
            measurement_ms=plan.perf_window_ms,
            max_trials=3,
            workdir=workdir,
            tools_dir=Path(root) / "tools" if root else None,
        )
    except perf.PerfError as exc:
        return {"error": str(exc)[:500]}
    r = rows[-1]
    return {
        "concurrency": r.concurrency,
        "items_per_request": plan.per_request,
        "items_per_s": round(r.throughput * plan.per_request, 1),
        "requests_per_s": round(r.throughput, 2),
        "p50_ms": round(r.p50_us / 1e3, 2),
        "p99_ms": round(r.p99_us / 1e3, 2),
    }


@dataclass
class Context:
    """What every dtype's run shares."""

    args: argparse.Namespace
    plan: Plan
    weights: Path
    manifest: dict
    images: list[bytes]
    texts: list[str]
    probe_images: list[bytes]
    probe_texts: list[str]
    reference: dict
    monitor: GpuMonitor
    deadline: float  # monotonic: optional steps are skipped after it
    budget_end: float  # monotonic: the end of --budget-s
    served: dict  # dtype -> the probe images' embeddings as the exact (CPU-decoding) build served them

    def late(self) -> bool:
        return time.monotonic() > self.deadline


def serve_dtype(ctx: Context, dtype: str) -> dict:
    """Build, time the towers, serve, check parity, measure end to end; the server is always stopped."""
    from clip_build.repository import build_repository, read_info
    from clip_client import CLIPClient
    from clip_server import TritonServer

    args, plan, work = ctx.args, ctx.plan, Path(ctx.args.workdir)
    res: dict = {"errors": [], "skipped": []}
    repo = work / f"repo-{dtype}"
    t0 = time.perf_counter()
    build_repository(
        ctx.weights,
        repo,
        instance_kind="gpu" if args.device == "cuda" else "cpu",
        dtype=dtype,
        instance_count=plan.instance_count,
        max_batch_size=plan.max_batch_size,
    )
    res["build_s"] = round(time.perf_counter() - t0, 1)
    res["preprocess"] = read_info(repo)["preprocess"]  # the auto rule's instances and decode threads
    phase = f"{dtype} towers"
    with ctx.monitor.phase(phase):
        res["towers"] = measure_towers(repo, args.device, plan, int(ctx.manifest["text"]["config"]["vocab_size"]))
    res["towers"]["gpu"] = ctx.monitor.summary(phase)
    if dtype != "fp32":
        with ctx.monitor.phase(f"{dtype} fast towers"):
            res["fast"] = measure_fast(ctx, repo, dtype)
        log.info("%s fast towers: %s", dtype, res["fast"])
    log.info(
        "%s towers alone: %.0f images/s, texts/s %s",
        dtype,
        res["towers"]["image_per_s"],
        {k: round(v) for k, v in res["towers"]["text_per_s"].items()},
    )

    server = TritonServer(repo, log_path=Path(args.out) / f"tritonserver-{dtype}.log", exit_timeout=3)
    t0 = time.perf_counter()
    server.start()
    try:
        server.wait_ready(300)
        res["cold_start_s"] = round(time.perf_counter() - t0, 1)

        def client():
            return CLIPClient(server.grpc_url, protocol="grpc", retries=0, timeout=120.0)

        with client() as c:
            ctx.served[dtype] = c.encode_image(ctx.probe_images, normalize=False)  # (N, D)
            res["parity"] = {
                "image": min_cosine(ctx.served[dtype], ctx.reference["image"]),
                "text": min_cosine(c.encode_text(ctx.probe_texts, normalize=False), ctx.reference["text"]),
            }
        log.info(
            "%s parity vs fp32 CPU: min cosine image %.6f, text %.6f",
            dtype,
            res["parity"]["image"],
            res["parity"]["text"],
        )
        res["e2e"], res["latency"], res["perf_analyzer"] = {}, {}, {}
        for kind, items in (("image", ctx.images), ("text", ctx.texts)):
            res["e2e"][kind] = end_to_end(ctx, server, client, kind, items, dtype, res["errors"])
        for kind, items in (("image", ctx.images), ("text", ctx.texts)):
            if ctx.late():
                res["skipped"].append(f"latency and perf_analyzer ({kind}): time budget")
                continue
            r = closed_loop(client, kind, items, 1, plan.duration_s / 2, per_request=8)
            res["latency"][kind] = r.summary()
            if not args.no_perf_analyzer:
                res["perf_analyzer"][kind] = _perf(server, kind, items, plan, work)
        record_server_state(server, res)
    finally:
        server.stop()
    return res


def record_server_state(server, res: dict) -> None:
    """The server's resident memory after a run into res["rss_mb"]; an error in res["errors"] if anything died."""
    res["rss_mb"] = round(server.rss_bytes() / 2**20)
    if not server.running or server.not_ready_models() or server.dead_stubs():
        res["errors"].append("the server, a model or a python stub died during the run (see the server log)")


def end_to_end(ctx: Context, server, client, kind: str, items: list, label: str, errors: list) -> dict:
    """Closed loop (warm-up, then the timed run) at the plan's concurrency: items/s, latencies, GPU, model stats."""
    plan = ctx.plan
    closed_loop(client, kind, items, plan.concurrency, plan.warmup_s, plan.per_request)
    before, phase = model_stats(server.http_url), f"{label} e2e {kind}"
    with ctx.monitor.phase(phase):
        r = closed_loop(client, kind, items, plan.concurrency, plan.duration_s, plan.per_request)
    out = {
        **r.summary(),
        "gpu": ctx.monitor.summary(phase),
        "models": stats_delta(before, model_stats(server.http_url)),
    }
    log.info(
        "%s end to end %s: %.0f items/s, p50 %.1f ms, p99 %.1f ms, GPU %s",
        label,
        kind,
        r.items_per_s,
        r.pct(50),
        r.pct(99),
        out["gpu"],
    )
    if r.errors:
        errors.append(f"{r.errors} failed {kind} requests end to end")
    return out


def decode_check(timeout: float) -> dict:
    """clip_loadtest.gpukit.decode_check in a subprocess (a crash in nvJPEG cannot take the run down): its JSON."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "clip_loadtest.gpukit.decode_check", "--device", "cuda"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"decode_check did not finish in {timeout:.0f} s"}
    try:
        return json.loads(done.stdout)
    except ValueError:
        return {"error": f"decode_check exited {done.returncode}: {(done.stderr or done.stdout).strip()[-1500:]}"}


def serve_gpu_decode(ctx: Context, res: dict) -> None:
    """--image-decode gpu, filling `res` step by step: pixels vs the exact path (decode_check), then build, serve,
    embeddings vs the exact path's and the fp32 reference, end-to-end images/s; the server is always stopped."""
    from clip_build.repository import build_repository, read_info, server_args
    from clip_client import CLIPClient
    from clip_server import TritonServer

    args, plan, work, dtype = ctx.args, ctx.plan, Path(ctx.args.workdir), res["dtype"]
    res["decode_check"] = decode_check(min(DECODE_CHECK_TIMEOUT_S, ctx.budget_end - time.monotonic()))
    if "error" in res["decode_check"]:
        res["errors"].append(f"decode_check: {res['decode_check']['error']}")
    elif not res["decode_check"].get("ok"):
        res["errors"].append("decode_check: a fallback item or an error message differs from the exact path")
    log.info(
        "GPU decode vs the exact path: %s",
        {k: v for k, v in res["decode_check"].items() if k in ("max_diff_levels", "mean_diff_levels", "routed", "ok")},
    )
    repo = work / f"repo-{dtype}-gpu-decode"
    t0 = time.perf_counter()
    build_repository(
        ctx.weights,
        repo,
        instance_kind="gpu",
        dtype=dtype,
        instance_count=plan.instance_count,
        max_batch_size=plan.max_batch_size,
        image_decode="gpu",
    )
    res["build_s"] = round(time.perf_counter() - t0, 1)
    res["preprocess"] = read_info(repo)["preprocess"]
    res["server_args"] = server_args(repo)
    server = TritonServer(
        repo,
        log_path=Path(args.out) / f"tritonserver-{dtype}-gpu-decode.log",
        exit_timeout=3,
        extra_args=res["server_args"],
    )
    t0 = time.perf_counter()
    server.start()
    try:
        server.wait_ready(max(30.0, min(180.0, ctx.budget_end - time.monotonic())))
        res["cold_start_s"] = round(time.perf_counter() - t0, 1)

        def client():
            return CLIPClient(server.grpc_url, protocol="grpc", retries=0, timeout=60.0)

        with client() as c:
            embeds = c.encode_image(ctx.probe_images, normalize=False)  # (N, D)
        res["parity"] = {"image": min_cosine(embeds, ctx.reference["image"])}
        if dtype in ctx.served:
            res["vs_exact_path"] = {"image": min_cosine(embeds, ctx.served[dtype])}
        log.info(
            "%s GPU decode: min cosine vs fp32 CPU %.6f, vs the exact path %s",
            dtype,
            res["parity"]["image"],
            res.get("vs_exact_path"),
        )
        res["e2e"] = {
            "image": end_to_end(ctx, server, client, "image", ctx.images, f"{dtype} gpu-decode", res["errors"])
        }
        if ctx.late():
            res["skipped"].append("perf_analyzer (image): time budget")
        elif not args.no_perf_analyzer:
            res["perf_analyzer"] = {"image": _perf(server, "image", ctx.images, plan, work)}
        record_server_state(server, res)
    finally:
        server.stop()


def evaluate(results: dict, device: str) -> list[Check]:
    """Parity (enforced) and the issue's GPU targets (reported; n/a on the CPU)."""
    checks = []
    for dtype, res in results["dtypes"].items():
        for kind in ("image", "text"):
            cos = (res.get("parity") or {}).get(kind)
            checks.append(
                Check(
                    f"{dtype} {kind} embeddings vs fp32 CPU (min cosine)",
                    cos,
                    f">= {PARITY_MIN}",
                    None if cos is None else cos >= PARITY_MIN,
                )
            )
    bf16 = results["dtypes"].get("bf16") or {}
    values = [
        (bf16.get("towers") or {}).get("image_per_s"),
        ((bf16.get("e2e") or {}).get("image") or {}).get("items_per_s"),
    ]
    for (name, target), value in zip(TARGETS.items(), values):
        ok = None if device != "cuda" or value is None else value >= target
        checks.append(Check(name, value, f">= {target:,}", ok, "GPU target" if device == "cuda" else "GPU target; n/a"))
    fast = (results["dtypes"].get("bf16") or {}).get("fast") or {}
    for name, (key, target) in FAST_TARGETS.items():
        value = (fast.get(key) or {}).get("image_per_s")
        why = (fast.get(key) or {}).get("error") or (fast.get(key) or {}).get("skipped") or ""
        ok = None if device != "cuda" or value is None else value >= target
        checks.append(
            Check(
                name,
                value if device == "cuda" else None,
                f">= {target:,}",
                ok,
                f"GPU target{'; n/a' if device != 'cuda' else ''}{'; ' + why if why else ''}",
            )
        )
    fp8 = fast.get("fp8") or {}
    if "min_cosine" in fp8:  # the gate: the FP8 tower only counts when it keeps the embeddings and the zero-shot top-1
        checks.append(
            Check(
                "FP8 image tower vs fp32 CPU (min cosine; zero-shot top-1 agreement)",
                fp8["min_cosine"],
                ">= 0.999; >= 99%",
                bool(fp8["passed"]),
                f"top-1 agreement {fp8['top1_agreement'] or 0:.0%} over the {fp8['decided']} of "
                f"{fp8['images']} images decided at the gate's tolerance ({fp8['ties']} ties), "
                f"{fp8['labels']} labels{' (emulated on the CPU)' if fp8.get('emulated') else ''}",
            )
        )
    gpu = results.get("gpu_decode") or {}
    if gpu.get("dtype"):
        d = gpu["dtype"]
        for versus, key in (("fp32 CPU", "parity"), ("the exact build", "vs_exact_path")):
            cos = (gpu.get(key) or {}).get("image")
            checks.append(
                Check(
                    f"{d} GPU-decode image embeddings vs {versus} (min cosine)",
                    cos,
                    f">= {PARITY_MIN}",
                    None if cos is None else cos >= PARITY_MIN,
                )
            )
        rate = ((gpu.get("e2e") or {}).get("image") or {}).get("items_per_s")
        checks.append(
            Check(
                f"end-to-end images/s through Triton, --image-decode gpu ({d})",
                rate,
                f">= {E2E_TARGET:,}",
                None if rate is None else rate >= E2E_TARGET,
                "GPU target",
            )
        )
        levels = (gpu.get("decode_check") or {}).get("max_diff_levels")
        checks.append(
            Check(
                "GPU-decode pixels vs the exact path (max, 1/255 levels)",
                levels,
                "report",
                None,
                f"mean {(gpu.get('decode_check') or {}).get('mean_diff_levels')}",
            )
        )
    return checks


# ---- CLI ----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="run_kit.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device",
        choices=tuple(PLANS),
        default="cuda",
        help="cuda: ViT-B/32 size, KIND_GPU; cpu: tiny model, KIND_CPU",
    )
    parser.add_argument("--dtypes", default="bf16", help="comma-separated encoder dtypes, run in this order")
    parser.add_argument("--out", default="gpukit-results", help="gpukit.json, gpukit.md, server logs")
    parser.add_argument(
        "--workdir",
        default=None,
        help="checkpoints, weights, repositories (default: a folder under the system temp dir)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="seconds the run aims at: a dtype starts only "
        "if the previous one's time is left; latency and perf_analyzer are skipped after 80%%",
    )
    parser.add_argument("--no-perf-analyzer", action="store_true")
    parser.add_argument(
        "--no-gpu-decode",
        action="store_true",
        help="skip the --image-decode gpu build (it runs on --device cuda only, for the first dtype, after the others)",
    )
    args = parser.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in args.dtypes if d not in ("fp32", "fp16", "bf16")]
    if bad or not args.dtypes:
        parser.error(f"--dtypes: give some of fp32, fp16, bf16 (got {args.dtypes})")
    if args.workdir is None:
        import tempfile

        args.workdir = str(Path(tempfile.gettempdir()) / f"clip-gpukit-work-{args.device}")
    return args


def write_report(results: dict, out: Path, device: str, started: float) -> list[Check]:
    """gpukit.json and gpukit.md as they stand (rewritten after each step: a later crash leaves the earlier ones)."""
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    checks = evaluate(results, device)
    results["checks"] = [c.__dict__ | {"verdict": c.verdict} for c in checks]
    (out / "gpukit.json").write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
    (out / "gpukit.md").write_text(render(results, checks), encoding="utf-8")
    return checks


def run_gpu_decode(ctx: Context, results: dict) -> None:
    """The --image-decode gpu step for the first dtype, when on a GPU and in budget; failures recorded, not raised."""
    args = ctx.args
    if args.device != "cuda" or args.no_gpu_decode:
        results["gpu_decode"] = {"skipped": ["--device cpu: no GPU" if args.device != "cuda" else "--no-gpu-decode"]}
        return
    res = results["gpu_decode"] = {"dtype": args.dtypes[0], "errors": [], "skipped": []}
    if ctx.budget_end - time.monotonic() < GPU_DECODE_MIN_S:
        res["skipped"].append("time budget")
        return
    try:
        serve_gpu_decode(ctx, res)
    except Exception as exc:  # recorded; what was measured before stays
        log.exception("the --image-decode gpu run failed")
        res["errors"].append(f"{type(exc).__name__}: {exc}"[:2000])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    plan = PLANS[args.device]
    out, work = Path(args.out), Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "command": " ".join(["run_kit.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": args.device,
        "plan": plan.__dict__,
        "dtypes": {},
        "skipped": [],
        "errors": [],
    }
    monitor = GpuMonitor.start() if args.device == "cuda" else GpuMonitor("--device cpu: no GPU")
    try:
        stub = check_machine(args.device)
        results["environment"] = {**environment(args.device, monitor), "stub_python": stub}
        weights, manifest = prepare_weights(work, plan.size)
        results["weights"] = {
            "model_id": manifest["model_id"],
            "size": plan.size,
            "family": manifest["family"],
            "projection_dim": manifest["projection_dim"],
            "random_init": True,
        }
        probe_images, probe_texts = jpeg_images(8, sizes="224x224,640x480,480x640,1024x768", seed=2), short_prompts(8)
        ctx = Context(
            args,
            plan,
            weights,
            manifest,
            jpeg_images(plan.n_images, sizes=plan.image_sizes, seed=1),
            short_prompts(256),
            probe_images,
            probe_texts,
            fp32_reference(weights, manifest, probe_images, probe_texts),
            monitor,
            started + 0.8 * args.budget_s,
            started + args.budget_s,
            {},
        )
        results["prepare_s"] = round(time.monotonic() - started, 1)
        last_s = 0.0  # how long the previous dtype took: the next one starts only if as much time is left
        for dtype in args.dtypes:
            t0 = time.monotonic()
            if t0 + last_s > started + args.budget_s:
                results["skipped"].append(f"{dtype}: time budget")
                continue
            try:
                results["dtypes"][dtype] = serve_dtype(ctx, dtype)
            except Exception as exc:  # recorded; the next dtype still runs
                log.exception("%s run failed", dtype)
                results["dtypes"][dtype] = {"errors": [f"{type(exc).__name__}: {exc}"[:2000]]}
            last_s = time.monotonic() - t0
            write_report(results, out, args.device, started)
        run_gpu_decode(ctx, results)
    except KitRunError as exc:
        results["errors"].append(str(exc))
    except Exception as exc:  # the report is still written
        log.exception("the run failed")
        results["errors"].append(f"{type(exc).__name__}: {exc}"[:2000])
    finally:
        monitor.stop()
    checks = write_report(results, out, args.device, started)
    gpu_decode = results.get("gpu_decode") or {}
    errors = (
        results["errors"]
        + [e for r in results["dtypes"].values() for e in r.get("errors", [])]
        + [f"--image-decode gpu: {e}" for e in gpu_decode.get("errors", [])]
    )
    # every dtype's parity must pass; the GPU-decode build's must not fail (it may not have been reached)
    parity_ok = bool(results["dtypes"]) and all(
        c.ok or (c.ok is None and "GPU-decode" in c.name) for c in checks if "cosine" in c.name
    )
    print(
        f"{out / 'gpukit.md'}: {len(results['dtypes'])} dtype(s) and "
        f"{'the GPU-decode build' if gpu_decode.get('e2e') else 'no GPU-decode measurement'} in "
        f"{results['elapsed_s']:.0f} s, parity {'ok' if parity_ok else 'FAILED'}, {len(errors)} error(s)"
    )
    for e in errors:
        print(f"error: {e}")
    return 0 if parity_ok and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
