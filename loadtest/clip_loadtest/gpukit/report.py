"""gpukit.md: the GPU kit's results as markdown (the JSON beside it has every number)."""

from __future__ import annotations

from ..bench import Check, checks_table


def _gpu(g: dict | None) -> str:
    if not g:
        return ""
    if not g.get("measured"):
        return g.get("reason", "")
    return f"{g['util_mean_pct']:.0f}% mean, {g['util_max_pct']:.0f}% max, {g['memory_max_mib']:.0f} MiB"


def _ms(row: dict, key: str) -> str:
    value = row.get(key)
    return "" if value is None else f"{value:.1f}"


def _dtype_rows(dtype: str, res: dict) -> list[str]:
    towers = res.get("towers") or {}
    lines = [f"### {dtype}", ""]
    if towers:
        texts = ", ".join(f"L={k}: {v:,.0f}" for k, v in towers["text_per_s"].items())
        lines += [
            f"- towers alone, batch {towers['batch']}: images {towers['image_per_s']:,.0f}/s; texts/s {texts}; "
            f"GPU {_gpu(towers.get('gpu'))}"
        ]
    for key, label in (("graphs", "image tower, CUDA graphs"), ("fp8", "image tower, FP8 linear layers")):
        got = (res.get("fast") or {}).get(key)
        if got:
            what = (
                got.get("error")
                or got.get("skipped")
                or (
                    f"{got['image_per_s']:,.0f} images/s, min cosine vs fp32 {got['min_cosine']:.5f}"
                    + (
                        f", top-1 agreement {got['top1_agreement'] or 0:.0%}"
                        f" ({got['decided']} decided, {got['ties']} ties)"
                        if "top1_agreement" in got
                        else ""
                    )
                    + (" (emulated on the CPU: numerics only)" if got.get("emulated") else "")
                )
            )
            lines.append(f"- {label}: {what}")
    if "parity" in res:
        lines.append("- parity vs fp32 CPU: min cosine " + ", ".join(f"{k} {v:.6f}" for k, v in res["parity"].items()))
    if "preprocess" in res:
        pre = res["preprocess"]
        lines.append(
            f"- preprocessing ({pre['rule']}, {pre['cores']} cores, decode {pre['image_decode']}): "
            f"{pre['image_instances']} preprocess_image x {pre['decode_threads'] or 'min(4, cores)'} decode "
            f"threads, "
            f"{pre['text_instances']} preprocess_text"
        )
    if "vs_exact_path" in res:
        lines.append(
            f"- embeddings vs the exact (CPU-decoding) build, min cosine: image {res['vs_exact_path']['image']:.6f}"
        )
    check = res.get("decode_check")
    if check:
        lines.append(
            f"- decode check: error {check['error'][:300]}"
            if "error" in check
            else f"- pixels vs the exact path ({check['items']} items, on {check['device']}): max "
            f"{check['max_diff_levels']}/255, mean {check['mean_diff_levels']}/255, 99.9th percentile "
            f"{check['p999_diff_levels']}/255, normalised max {check['max_diff_normalised']}; routed "
            f"{check['routed']}; fallbacks identical {all(check['fallback_identical'].values())}, "
            f"errors as the exact path {all(check['errors_match'].values())}"
        )
    if res.get("server_args"):
        lines.append(f"- server flags: `{' '.join(res['server_args'])}`")
    for key, label in (("build_s", "build"), ("cold_start_s", "cold start (all models ready)")):
        if key in res:
            lines.append(f"- {label}: {res[key]} s")
    if "rss_mb" in res:
        lines.append(f"- server RSS (tritonserver + stubs): {res['rss_mb']} MB")
    rows = []
    for run, label in (("e2e", "end to end"), ("latency", "latency"), ("perf_analyzer", "perf_analyzer")):
        for kind, r in (res.get(run) or {}).items():
            if "error" in r:
                rows.append(f"| {label} | {kind} | | | error: {r['error'][:160]} | | | |")
                continue
            models = r.get("models") or {}
            batch = ", ".join(f"{m} {s['mean_batch']:.0f}" for m, s in sorted(models.items()) if "encoder" in m)
            rows.append(
                f"| {label} | {kind} | {r.get('concurrency', '')} | {r.get('items_per_request', '')} | "
                f"{r['items_per_s']:,.0f} | {_ms(r, 'p50_ms')} | {_ms(r, 'p99_ms')} | "
                f"{_gpu(r.get('gpu'))}{'; mean batch ' + batch if batch else ''} |"
            )
    if rows:
        lines += [
            "",
            "| run | kind | callers | items/request | items/s | p50 ms | p99 ms | GPU, encoder batch |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    lines += [f"- skipped: {s}" for s in res.get("skipped", [])]
    lines += [f"- **error:** {e}" for e in res.get("errors", [])]
    return lines + [""]


def render(results: dict, checks: list[Check]) -> str:
    """The whole report."""
    env = results.get("environment") or {}
    gpu = env.get("gpu") or {}
    plan = results["plan"]
    lines = [
        "# clip-triton GPU kit results",
        "",
        f"- device: {results['device']}"
        + (
            f", {gpu.get('name')} (compute {gpu.get('capability')}, {gpu.get('memory_gib')} GiB, "
            f"driver {gpu.get('smi_driver_version', '?')})"
            if gpu
            else ""
        ),
        f"- {env.get('cpu_count', '?')} CPU cores, Python {env.get('python', '?')}, torch {env.get('torch', '?')} "
        f"(CUDA {env.get('torch_cuda')}), numpy {env.get('numpy', '?')}; "
        f"GPU utilisation: {env.get('gpu_monitor', '?')}",
        f"- server: {env.get('tritonserver', '?')}",
        f"- weights: random-init CLIP, size {plan['size']}, model_id {(results.get('weights') or {}).get('model_id')}",
        f"- plan: max_batch_size {plan['max_batch_size']}, {plan['instance_count']} encoder instance(s), "
        f"{plan['concurrency']} callers x {plan['per_request']} items, {plan['duration_s']} s per run, JPEGs "
        f"{plan['image_sizes']}",
        f"- {results['date']}, {results.get('elapsed_s', '?')} s; `{results['command']}`",
        "",
        "## Checks",
        checks_table(checks),
        "",
        "## By dtype",
        "",
    ]
    for dtype, res in results["dtypes"].items():
        lines += _dtype_rows(dtype, res)
    gpu = results.get("gpu_decode") or {}
    if gpu.get("dtype"):
        lines += ["## --image-decode gpu", ""] + _dtype_rows(gpu["dtype"], gpu)
    lines += [f"- skipped: {s}" for s in results.get("skipped", [])]
    lines += [f"- **error:** {e}" for e in results.get("errors", [])]
    return "\n".join(lines) + "\n"
