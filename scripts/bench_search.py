"""Vector search benchmark: exact vs approximate at 100k x 512, and a compressed/sharded scale-out.

What it measures (all through the public `VectorIndex` API, i.e. what the dashboard pays):
  1. exact single-query top-k latency against N, with 1 OpenMP thread and with FAISS's default,
     the evidence for `exact_below` and `single_query_threads`;
  2. at N (default 100k) x 512 (BiomedCLIP's width): exact, HNSW and IVF as chosen by the size
     rules: build time, single-query p50/p95 (one query at a time, as the dashboard does),
     batched ms/query, recall@k against exact on held-out queries;
  3. efSearch / nprobe sweeps: recall and p50 per setting, the evidence for the size rules;
  4. a compressed configuration (IVF-PQ, optionally sharded) at --large-n: build time, memory
     (estimated and on disk), p50/p95, recall@k against exact on a query sample, without and
     with exact re-ranking from a memmap of the vectors, and an nprobe x re-rank sweep.

Vectors are clustered unit vectors shaped like image embeddings (sae_cxr.index.clustered_unit_vectors:
1,000 Zipf-sized clusters in a 64-d latent space embedded in 512-d, isotropic noise, a shared mean
direction). Timings on shared cores are noisy: every latency is the median over --repeats runs.

    PYTHONPATH=. python scripts/bench_search.py                 # everything: ~6 min, plus ~10 min per 1M config
    PYTHONPATH=. python scripts/bench_search.py --sections large --large-shards 1,2 --large-n 500000
    PYTHONPATH=. python scripts/bench_search.py --sections flat,main   # skip the compressed section
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from sae_cxr.index import IndexConfig, VectorIndex, clustered_unit_vectors, recall_from_positions


def single_query_ms(ix: VectorIndex, queries: np.ndarray, k: int, repeats: int) -> tuple[float, float]:
    """(p50, p95) in ms of one-query-at-a-time search; each is the median over repeats."""
    p50s, p95s = [], []
    for _ in range(repeats):
        ts = []
        for q in queries:
            t0 = time.perf_counter()
            ix.search(q, k)
            ts.append((time.perf_counter() - t0) * 1e3)
        p50s.append(float(np.percentile(ts, 50)))
        p95s.append(float(np.percentile(ts, 95)))
    return statistics.median(p50s), statistics.median(p95s)


def batched_ms(ix: VectorIndex, queries: np.ndarray, k: int, repeats: int) -> float:
    """ms per query when all queries go in one call (median over repeats)."""
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ix.search(queries, k)
        ts.append((time.perf_counter() - t0) * 1e3 / len(queries))
    return statistics.median(ts)


def timed_build(cfg: IndexConfig, x: np.ndarray, repeats: int) -> tuple[VectorIndex, float]:
    times, ix = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        ix = VectorIndex(cfg).build(x)
        times.append(time.perf_counter() - t0)
    assert ix is not None
    return ix, statistics.median(times)


def fmt_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)
    widths = [max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in cols]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(cell(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=200, help="held-out queries for latency and recall")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3, help="latency repeats (medians are quoted)")
    ap.add_argument("--build-repeats", type=int, default=1)
    ap.add_argument("--flat-sizes", default="10000,25000,50000,100000")
    ap.add_argument("--ef-sweep", default="16,32,64,128")
    ap.add_argument("--nprobe-sweep", default="4,8,16,32,64")
    ap.add_argument("--large-n", type=int, default=1_000_000, help="compressed section size (0 = skip)")
    ap.add_argument("--large-shards", default="1,2", help="shard counts for the compressed section")
    ap.add_argument("--pq-bytes", default="64", help="PQ code sizes for the compressed section")
    ap.add_argument("--large-nprobe-sweep", default="64,128,256")
    ap.add_argument("--rerank-sweep", default="0,4,8,16", help="rerank factors swept (0 = off)")
    ap.add_argument("--sections", default="flat,main,large", help="any of flat, main (with sweeps), large")
    ap.add_argument("--json", type=Path, default=None, help="also write all results here")
    a = ap.parse_args()
    k = a.k
    results: dict[str, Any] = {"args": vars(a) | {"json": str(a.json)}, "cores": os.cpu_count(),
                               "faiss": faiss.__version__, "omp_threads": faiss.omp_get_max_threads()}
    print(f"faiss {faiss.__version__}, {os.cpu_count()} cores, OpenMP threads {faiss.omp_get_max_threads()}; "
          f"latencies are medians of {a.repeats} repeats over {a.queries} single queries")

    t0 = time.perf_counter()
    data, _ = clustered_unit_vectors(a.n + a.queries, a.dim, a.clusters, seed=0)
    x, queries = data[:a.n], data[a.n:]
    print(f"generated {a.n} + {a.queries} vectors of {a.dim} d in {time.perf_counter() - t0:.1f} s")

    sections = set(a.sections.split(","))

    # 1. exact latency vs N, 1 thread vs FAISS default -----------------------------------------
    rows = []
    if "flat" not in sections:
        a.flat_sizes = ""
    for n in [int(s) for s in a.flat_sizes.split(",") if s]:
        if n > a.n:
            continue
        row: dict[str, Any] = {"N": n}
        for threads, label in ((1, "1 thread"), (0, "default threads")):
            ix = VectorIndex(IndexConfig(exact_below=n + 1, single_query_threads=threads)).build(x[:n])
            p50, p95 = single_query_ms(ix, queries, k, a.repeats)
            row[f"p50 ms ({label})"], row[f"p95 ms ({label})"] = p50, p95
        rows.append(row)
    if rows:
        print("\n## Exact (flat) single-query top-%d latency vs N" % k)
        print(fmt_table(rows, list(rows[0].keys())))
        results["flat_vs_n"] = rows
    if "main" in sections:
        results.update(main_section(a, x, queries))
    if "large" in sections and a.large_n > 0:
        results["large"] = large_section(a, queries)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nwrote {a.json}")


def main_section(a: argparse.Namespace, x: np.ndarray, queries: np.ndarray) -> dict[str, Any]:
    k = a.k
    results: dict[str, Any] = {}

    # 2. exact vs approximate at N -------------------------------------------------------------
    exact_ix, exact_build = timed_build(IndexConfig(exact_below=a.n + 1), x, a.build_repeats)
    _, exact_pos = exact_ix.search(queries, k)
    main_rows = []

    def measure(name: str, ix: VectorIndex, build_s: float) -> dict[str, Any]:
        p50, p95 = single_query_ms(ix, queries, k, a.repeats)
        _, pos = ix.search(queries, k)
        info = ix.info()
        return {"index": name, "kind": info["kind"], "params": _params(info["plan"]), "build s": build_s,
                "p50 ms": p50, "p95 ms": p95, "batched ms/q": batched_ms(ix, queries, k, a.repeats),
                f"recall@{k}": recall_from_positions(pos, exact_pos),
                "MiB": info["memory_bytes"] / 2**20}

    main_rows.append(measure("exact", exact_ix, exact_build))
    approx: dict[str, VectorIndex] = {}
    for kind in ("hnsw", "ivf"):
        cfg = IndexConfig(approximate=kind, recall_queries=0, exact_below=min(a.n, IndexConfig().exact_below))
        ix, build_s = timed_build(cfg, x, a.build_repeats)
        approx[kind] = ix
        main_rows.append(measure(f"{kind} (size rule)", ix, build_s))
    print(f"\n## {a.n} x {a.dim}: exact vs approximate, top-{k}, held-out queries")
    print(fmt_table(main_rows, list(main_rows[0].keys())))
    results["main"] = main_rows

    # 3. sweeps --------------------------------------------------------------------------------
    sweep = []
    for ef in [int(s) for s in a.ef_sweep.split(",") if s]:
        approx["hnsw"].set_search_params(ef_search=ef)
        p50, p95 = single_query_ms(approx["hnsw"], queries, k, a.repeats)
        _, pos = approx["hnsw"].search(queries, k)
        sweep.append({"index": "hnsw", "setting": f"efSearch={ef}", "p50 ms": p50, "p95 ms": p95,
                      f"recall@{k}": recall_from_positions(pos, exact_pos)})
    nlist = approx["ivf"].plan.nlist if approx["ivf"].plan else None
    for npb in [int(s) for s in a.nprobe_sweep.split(",") if s]:
        approx["ivf"].set_search_params(nprobe=npb)
        p50, p95 = single_query_ms(approx["ivf"], queries, k, a.repeats)
        _, pos = approx["ivf"].search(queries, k)
        sweep.append({"index": f"ivf (nlist={nlist})", "setting": f"nprobe={npb}", "p50 ms": p50, "p95 ms": p95,
                      f"recall@{k}": recall_from_positions(pos, exact_pos)})
    print(f"\n## Search-parameter sweeps at {a.n}")
    print(fmt_table(sweep, list(sweep[0].keys())))
    results["sweeps"] = sweep
    return results


def large_section(a: argparse.Namespace, queries: np.ndarray) -> dict[str, Any]:
    k = a.k
    t0 = time.perf_counter()
    data, _ = clustered_unit_vectors(a.large_n + a.queries, a.dim, a.clusters, seed=1)
    xl, ql = data[:a.large_n], data[a.large_n:]
    del data
    print(f"\ngenerated {a.large_n} vectors for the compressed section in {time.perf_counter() - t0:.1f} s "
          f"({xl.nbytes / 2**30:.2f} GiB float32)")
    t0 = time.perf_counter()
    exact = VectorIndex(IndexConfig(exact_below=a.large_n + 1))
    exact.prepare(a.dim, a.large_n)
    exact.add(xl)
    _, exact_pos = exact.search(ql, k)
    del exact
    print(f"exact reference for {len(ql)} queries in {time.perf_counter() - t0:.1f} s")
    tmp = tempfile.TemporaryDirectory()
    # Re-ranking reads the original vectors from a memmap, as a run would from its embeddings
    # (freshly written, so mostly from the page cache).
    np.save(Path(tmp.name) / "vectors.npy", xl)
    on_disk = np.load(Path(tmp.name) / "vectors.npy", mmap_mode="r")
    rows, sweep = [], []
    flat_bytes = a.large_n * a.dim * 4
    for pq in [int(s) for s in a.pq_bytes.split(",") if s]:
        for shards in [int(s) for s in a.large_shards.split(",") if s]:
            cfg = IndexConfig(compressed_above=min(a.large_n - 1, IndexConfig().compressed_above),
                              exact_below=min(a.large_n - 1, IndexConfig().exact_below),
                              pq_bytes=pq, shards=shards, recall_queries=0)
            t0 = time.perf_counter()
            ix = VectorIndex(cfg).build(xl)
            build_s = time.perf_counter() - t0
            p50, p95 = single_query_ms(ix, ql, k, a.repeats)
            _, pos = ix.search(ql, k)
            files = ix.save(Path(tmp.name) / "large.faiss")
            disk = sum(f.stat().st_size for f in files if f.suffix == ".faiss")
            info = ix.info()
            row = {"N": a.large_n, "index": info["kind"], "params": _params(info["plan"]), "shards": shards,
                   "build s": build_s, "p50 ms": p50, "p95 ms": p95, "batched ms/q": batched_ms(ix, ql, k, a.repeats),
                   f"recall@{k}": recall_from_positions(pos, exact_pos),
                   "MiB (est)": info["memory_bytes"] / 2**20, "MiB (disk)": disk / 2**20,
                   "vs float32": f"{flat_bytes / max(disk, 1):.1f}x"}
            ix.attach_vectors(on_disk)
            p50r, p95r = single_query_ms(ix, ql, k, a.repeats)
            _, pos = ix.search(ql, k)
            row |= {f"recall@{k} reranked x{cfg.rerank_factor}": recall_from_positions(pos, exact_pos),
                    "p50 ms reranked": p50r, "p95 ms reranked": p95r}
            rows.append(row)
            print(fmt_table(rows[-1:], list(rows[-1].keys())))
            if not sweep:  # nprobe x rerank sweep on the first configuration
                for npb in [int(s) for s in a.large_nprobe_sweep.split(",") if s]:
                    ix.set_search_params(nprobe=npb)
                    for factor in [int(s) for s in a.rerank_sweep.split(",") if s]:
                        ix.config.rerank_factor = factor
                        p50, p95 = single_query_ms(ix, ql, k, a.repeats)
                        _, pos = ix.search(ql, k)
                        sweep.append({"shards": shards, "nprobe": npb, "rerank": f"x{factor}" if factor else "off",
                                      "p50 ms": p50, "p95 ms": p95,
                                      f"recall@{k}": recall_from_positions(pos, exact_pos)})
                        print(fmt_table(sweep[-1:], list(sweep[-1].keys())))
            del ix
    tmp.cleanup()
    print(f"\n## Compressed configuration at {a.large_n} x {a.dim} (re-ranking from a memmap of the vectors)")
    print(fmt_table(rows, list(rows[0].keys())))
    if sweep:
        print(f"\n## IVF-PQ nprobe x re-rank sweep at {a.large_n}")
        print(fmt_table(sweep, list(sweep[0].keys())))
    return {"configs": rows, "sweep": sweep}


def _params(plan: dict[str, Any] | None) -> str:
    if not plan:
        return ""
    keys = {"flat": [], "hnsw": ["hnsw_m", "ef_search"], "ivf": ["nlist", "nprobe"],
            "ivfpq": ["nlist", "nprobe", "pq_m"]}[plan["kind"]]
    return " ".join(f"{k.replace('hnsw_', '').replace('ef_search', 'ef')}={plan[k]}" for k in keys) or "-"


if __name__ == "__main__":
    main()
