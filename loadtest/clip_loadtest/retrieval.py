"""Retrieval benchmark: the embedded gallery (FAISS IVF + Parquet segments) vs the old numpy gallery, side by side.

    python -m clip_loadtest.retrieval                       # 1M clustered 512-d vectors (heavy: ~2 GB per copy)
    python -m clip_loadtest.retrieval --rows 50000 --queries 200      # a quick check
    clip-triton bench-retrieval --rows 1000000 --json-out reports/retrieval.json

Both sides get the same clustered vectors (nested clusters, see clustered()) and the same queries: held-out points
of the same clusters. Measured in this run:
- add: the gallery's add() in batches vs the old Gallery.add (concatenates the whole matrix per batch; timed on the
  first --old-add-rows rows, it is quadratic);
- reopen: a new process opens each gallery and answers one query (time inside the process, imports excluded);
- latency: single-query search in that new process after 200 other (untimed) queries, median over --queries
  (old: exact numpy q @ E.T + full sort, over --brute-queries queries);
- memory: the new process' resident memory growth after opening and searching, vs the raw float32 vectors;
- recall@10 of the gallery against exact search.
Targets (issue "Cross-modal retrieval at scale") are checked and printed with each ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("clip_loadtest.retrieval")

COMMAND_HELP = {"bench-retrieval": "benchmark the embedded gallery against the old numpy gallery (1M vectors)"}
TARGETS = {"recall": 0.95, "p50_ms": 5.0, "speedup": 10.0, "reopen_s": 2.0, "memory_ratio": 1.5, "add_per_s": 20_000}
_OLD_META = b"clip_triton_gallery"


def clustered(n: int, dim: int, seed: int, supers: int = 64, clusters: int = 4096) -> np.ndarray:
    """n L2-normalised vectors from nested clusters -> (n, dim): 64 super-clusters > 4096 clusters > n/16
    sub-clusters > points. Cosines: ~0.9 between points of one sub-cluster (one scene, near duplicates), ~0.7 within
    a cluster, ~0.47 within a super-cluster, ~0 across, so a query's nearest neighbours are mostly its sub-cluster's
    and then its cluster's, as in real image collections."""
    rng = np.random.default_rng(seed)
    top = rng.standard_normal((supers, dim)).astype(np.float32)
    centres = top[rng.integers(0, supers, clusters)] + 0.7 * rng.standard_normal((clusters, dim)).astype(np.float32)
    subs = centres[rng.integers(0, clusters, max(1, n // 16))]
    subs += 0.65 * rng.standard_normal(subs.shape).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    pick = np.random.default_rng(seed + 1)
    for lo in range(0, n, 65536):
        hi = min(n, lo + 65536)
        x = subs[pick.integers(0, len(subs), hi - lo)] + 0.46 * pick.standard_normal((hi - lo, dim)).astype(np.float32)
        out[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def exact_top_k(x: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids by inner product, in chunks of x (bounded memory) -> (Q, k)."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for lo in range(0, len(x), 131072):
        s = queries @ x[lo:lo + 131072].T  # (Q, chunk)
        s_all = np.concatenate([best_s, s], axis=1)
        i_all = np.concatenate([best_i, np.arange(lo, lo + s.shape[1])[None].repeat(len(queries), 0)], axis=1)
        top = np.argpartition(-s_all, k - 1, axis=1)[:, :k] if s_all.shape[1] > k else np.argsort(-s_all, axis=1)
        best_s, best_i = np.take_along_axis(s_all, top, 1), np.take_along_axis(i_all, top, 1)
    order = np.argsort(-best_s, axis=1)
    return np.take_along_axis(best_i, order, 1)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


# ------------------------------------------------------------------------------------------------ old gallery


def write_old_gallery(path: Path, x: np.ndarray) -> None:
    """The previous single-file Parquet gallery (path, sha256, size, embedding as fixed_size_list), as it wrote it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, dim = x.shape
    meta = json.dumps({"format_version": 1, "model_id": "bench", "dim": dim}).encode()
    table = pa.table({"path": pa.array([f"/bench/{i}.jpg" for i in range(n)]), "sha256": pa.array([""] * n),
                      "size": pa.array(np.zeros(n, np.int64)),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim)})
    pq.write_table(table.replace_schema_metadata({_OLD_META: meta}), path)


def old_add_rate(x: np.ndarray, batch: int = 2048) -> float:
    """Rows/s of the old Gallery.add, re-enacted: per batch a replace-by-path scan of every row, then the whole
    matrix concatenated with the new rows."""
    emb = np.zeros((0, x.shape[1]), np.float32)
    paths: list[str] = []
    start = time.perf_counter()
    for lo in range(0, len(x), batch):
        part = x[lo:lo + batch]
        new_paths = [f"/bench/{i}.jpg" for i in range(lo, lo + len(part))]
        replaced = set(new_paths)
        keep = [i for i, p in enumerate(paths) if p not in replaced]
        if len(keep) != len(paths):
            emb = emb[keep]
        paths += new_paths
        emb = np.concatenate([emb, part / np.linalg.norm(part, axis=1, keepdims=True)], axis=0)
    return len(x) / (time.perf_counter() - start)


def probe_old(path: str, queries: np.ndarray, k: int) -> dict:
    """In a fresh process: the old Gallery.load (whole file -> numpy) and its exact search, per single query."""
    import pyarrow.parquet as pq

    from clip_client import ops

    base = _rss_mb()
    t = time.perf_counter()
    table = pq.read_table(path)
    emb = table.column("embedding").combine_chunks()
    e = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, queries.shape[1])
    paths = table.column("path").to_pylist()
    ops.topk_indices(ops.l2_normalize(queries[:1]) @ e.T, k)
    reopen = time.perf_counter() - t
    lat = []
    for q in queries:
        t = time.perf_counter()
        idx = ops.topk_indices(ops.l2_normalize(q[None]) @ e.T, k)  # the old search: score all, full sort
        [paths[i] for i in idx[0]]
        lat.append(time.perf_counter() - t)
    return {"reopen_s": reopen, "p50_ms": 1e3 * float(np.median(lat)), "rss_mb": _rss_mb() - base}


def probe_new(uri: str, queries: np.ndarray, k: int, sweep: tuple[int, ...] = (), warmup: int = 0) -> dict:
    """In a fresh process: Gallery.open, one query, the last `warmup` queries (untimed, as a running service has seen
    some), then every other query alone (at the default nprobe, then at each nprobe of `sweep`); memory growth."""
    import faiss  # noqa: F401 - libraries loaded before the baseline, as pyarrow is for the old path
    import pyarrow  # noqa: F401 - loaded before the baseline, see faiss above

    from clip_client.gallery import Gallery

    base = _rss_mb()
    t = time.perf_counter()
    g = Gallery.open(uri)
    g.search(queries[:1], k)
    reopen = time.perf_counter() - t
    for q in queries[len(queries) - warmup:]:
        g.search(q, k)
    queries = queries[:len(queries) - warmup]

    def timed() -> tuple[float, list]:
        lat, found = [], []
        for q in queries:
            t = time.perf_counter()
            hits = g.search(q, k)[0]
            lat.append(time.perf_counter() - t)
            found.append([int(h.path[len("/bench/"):-4]) for h in hits])
        return lat, found

    default = g.nprobe
    lat, found = timed()
    out = {"reopen_s": reopen, "p50_ms": 1e3 * float(np.median(lat)), "p90_ms": 1e3 * float(np.percentile(lat, 90)),
           "rss_mb": _rss_mb() - base, "found": found, "index": {**(g.manifest["index"] or {}), "nprobe": default},
           "sweep": []}
    for nprobe in sweep:
        g.nprobe = nprobe
        lat, found = timed()
        out["sweep"].append({"nprobe": nprobe, "p50_ms": 1e3 * float(np.median(lat)), "found": found})
    return out


def _in_new_process(kind: str, target: str, queries: np.ndarray, k: int, workdir: Path, *extra) -> dict:
    qfile = workdir / f"queries-{kind}.npy"
    np.save(qfile, queries)
    args = "".join(f", {e!r}" for e in extra)
    code = (f"import json, numpy as np; from clip_loadtest.retrieval import probe_{kind}; "
            f"print(json.dumps(probe_{kind}({target!r}, np.load({str(qfile)!r}), {k}{args})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"probe {kind} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ the run


def run_benchmark(rows: int, dim: int, n_queries: int, brute_queries: int, old_add_rows: int, batch: int,
                  workdir: Path, k: int = 10, seed: int = 0, sweep: tuple[int, ...] = (), warmup: int = 200) -> dict:
    """Everything measured in one run; returns the numbers (also printed)."""
    from clip_client.gallery import Gallery

    workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    x = clustered(rows + n_queries + warmup, dim, seed)  # queries: held-out points of the same clusters
    x, queries, warm = x[:rows], x[rows:rows + n_queries], x[rows + n_queries:]
    log.info("%d x %d vectors generated in %.1fs", rows, dim, time.perf_counter() - t)
    truth = exact_top_k(x, queries, k)

    uri = workdir / "gallery"
    shutil.rmtree(uri, ignore_errors=True)
    g = Gallery.create(uri, dim=dim, model_id="bench", expected_rows=rows)
    paths = [f"/bench/{i}.jpg" for i in range(rows)]
    t = time.perf_counter()
    for lo in range(0, rows, batch):
        g.add(paths[lo:lo + batch], x[lo:lo + batch])
    add_s = time.perf_counter() - t
    g.close()
    log.info("new: %d rows added in %.1fs", rows, add_s)

    old_file = workdir / "old-gallery.parquet"
    write_old_gallery(old_file, x)
    old_add = old_add_rate(x[:old_add_rows])
    del g
    new = _in_new_process("new", str(uri), np.concatenate([queries, warm]), k, workdir, tuple(sweep), warmup)
    old = _in_new_process("old", str(old_file), queries[:brute_queries], k, workdir)

    def recall_of(found: list) -> float:
        return float(np.mean([len(set(f) & set(t.tolist())) / k for f, t in zip(found, truth)]))

    recall = recall_of(new.pop("found"))
    for point in new["sweep"]:
        point["recall_at_10"] = recall_of(point.pop("found"))
    raw_mb = rows * dim * 4 / 2**20
    result = {
        "rows": rows, "dim": dim, "queries": n_queries, "brute_queries": brute_queries, "cores": os.cpu_count(),
        "index": new.pop("index"), "recall_at_10": recall,
        "new": {**new, "add_per_s": rows / add_s, "add_s": add_s, "memory_ratio": new["rss_mb"] / raw_mb},
        "old": {**old, "add_per_s": old_add, "add_rows_timed": old_add_rows, "memory_ratio": old["rss_mb"] / raw_mb},
        "raw_vectors_mb": raw_mb,
        "disk_mb": sum(f.stat().st_size for f in uri.rglob("*") if f.is_file()) / 2**20,
    }
    result["speedup"] = old["p50_ms"] / new["p50_ms"]
    result["targets"] = {
        "recall": recall >= TARGETS["recall"], "p50_ms": new["p50_ms"] <= TARGETS["p50_ms"],
        "speedup": result["speedup"] >= TARGETS["speedup"], "reopen_s": new["reopen_s"] < TARGETS["reopen_s"],
        "memory_ratio": result["new"]["memory_ratio"] <= TARGETS["memory_ratio"],
        "add_per_s": result["new"]["add_per_s"] >= TARGETS["add_per_s"],
    }
    return result


def render(r: dict) -> str:
    """The side-by-side table."""
    new, old, ok = r["new"], r["old"], r["targets"]

    def mark(key: str) -> str:
        return "met" if ok[key] else "MISSED"

    lines = [
        f"retrieval benchmark: {r['rows']:,} clustered {r['dim']}-d vectors, {r['queries']} queries "
        f"({r['brute_queries']} for brute force), {r['cores']} cores; index {r['index']}",
        f"{'':28}{'embedded gallery':>18}{'old numpy gallery':>20}{'ratio':>10}   target",
        f"{'single-query p50 (ms)':28}{new['p50_ms']:>18.2f}{old['p50_ms']:>20.1f}{r['speedup']:>9.1f}x   "
        f"<= {TARGETS['p50_ms']} ms ({mark('p50_ms')}), >= {TARGETS['speedup']:.0f}x ({mark('speedup')})",
        f"{'single-query p90 (ms)':28}{new['p90_ms']:>18.2f}{'':>20}{'':>10}",
        f"{'recall@10 vs exact':28}{r['recall_at_10']:>18.3f}{1.0:>20.3f}{'':>10}   >= {TARGETS['recall']} ({mark('recall')})",
        f"{'reopen, new process (s)':28}{new['reopen_s']:>18.2f}{old['reopen_s']:>20.2f}"
        f"{old['reopen_s'] / max(new['reopen_s'], 1e-9):>9.0f}x   < {TARGETS['reopen_s']} s ({mark('reopen_s')})",
        f"{'memory / raw float32':28}{new['memory_ratio']:>18.2f}{old['memory_ratio']:>20.2f}{'':>10}   "
        f"<= {TARGETS['memory_ratio']} ({mark('memory_ratio')})  [raw {r['raw_vectors_mb']:.0f} MB]",
        f"{'add (vectors/s)':28}{new['add_per_s']:>18,.0f}{old['add_per_s']:>20,.0f}"
        f"{new['add_per_s'] / old['add_per_s']:>9.1f}x   >= {TARGETS['add_per_s']:,} ({mark('add_per_s')})"
        f"  [old timed on {old['add_rows_timed']:,} rows; quadratic]",
        f"{'on disk (MB)':28}{r['disk_mb']:>18,.0f}",
    ]
    lines += [f"  nprobe {p['nprobe']:>4}: p50 {p['p50_ms']:.2f} ms, recall@10 {p['recall_at_10']:.3f}" for p in new["sweep"]]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser, command: str = "bench-retrieval") -> None:
    """Arguments of `clip-triton bench-retrieval`."""
    parser.add_argument("--rows", type=int, default=1_000_000, help="vectors in the gallery")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000, help="single queries timed on the gallery")
    parser.add_argument("--brute-queries", type=int, default=50, help="single queries timed on the old path")
    parser.add_argument("--old-add-rows", type=int, default=100_000, help="rows the old add() is timed on")
    parser.add_argument("--batch", type=int, default=10_000, help="rows per add()")
    parser.add_argument("--workdir", default=None, help="where the galleries are written (default: a temp folder)")
    parser.add_argument("--sweep", default="32,64,128", help="also time these nprobe values (comma-separated; '' for none)")
    parser.add_argument("--json-out", default=None, help="also write the numbers as JSON")


def run(args: argparse.Namespace, command: str = "bench-retrieval") -> int:
    """Run the benchmark, print the table; exit 0 when every target is met, 1 otherwise."""
    tmp = None if args.workdir else tempfile.mkdtemp(prefix="clip-retrieval-")
    try:
        r = run_benchmark(args.rows, args.dim, args.queries, min(args.brute_queries, args.queries),
                          min(args.old_add_rows, args.rows), args.batch, Path(args.workdir or tmp),
                          sweep=tuple(int(v) for v in args.sweep.split(",") if v.strip()))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(render(r))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(r, indent=2))
    return 0 if all(r["targets"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=COMMAND_HELP["bench-retrieval"])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
