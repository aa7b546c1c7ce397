"""Vector indices for search: image -> similar images, pattern -> similar patterns, text -> patterns.

`VectorIndex` wraps FAISS so that callers never choose an index type by hand: the type follows
from the number of vectors (exact below `exact_below`, HNSW or IVF above it, IVF-PQ above
`compressed_above`), with every parameter derived from the size by the rules in `make_plan`.
Scores are inner products on L2-normalised vectors (cosine) unless the metric is "l2".

Callers keep their own ids (int64 or strings): FAISS only ever sees positions 0..N-1 in
insertion order, and a side table maps positions back. That keeps one code path for every
index type (HNSW and flat indices cannot store arbitrary ids) and lets string ids through.

Persistence follows the run directory's rule (sae_cxr.run): each file is written to a temporary
name, fsynced and renamed. An index is `<name>.faiss` (or one `<name>.shardI-of-N.faiss` per
shard) plus the sidecar `<name>.faiss.json` (config, plan, ids, dim, count, normalisation,
file sizes and hashes), written last, so a sidecar always describes complete index files.

The GPU is used when faiss-gpu sees one (`use_gpu="auto"`): training runs its k-means on the
GPU, flat and IVF indices are moved to it for add and search, and `save` always writes the CPU
version. HNSW has no FAISS GPU implementation and stays on the CPU.

Scale (numbers from scripts/bench_search.py on 2 shared cores, 512-d): patterns and label texts
(thousands) are searched exactly; image sets up to 2M (MIMIC-CXR is 377k images, 740 MiB as
float32) use HNSW, ~0.3 ms per query at recall@20 0.998; beyond 2M (patch tokens: 196 per image)
IVF-PQ keeps 72 B per vector (25x under float32 at 1M) and re-ranks exactly from a memmap of
the embeddings. Shards split the codes over machines or GPUs without changing results: IVF
shards are clones of one trained index, and IndexShards merges their top-k exactly.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import faiss
import numpy as np

from sae_cxr.run import atomic_path, sha256_file, write_json_atomic

log = logging.getLogger("sae_cxr.index")

Kind = Literal["flat", "hnsw", "ivf", "ivfpq"]
KINDS: tuple[Kind, ...] = ("flat", "hnsw", "ivf", "ivfpq")
FORMAT_VERSION = 1
SIDECAR_SUFFIX = ".json"
GPU_MAX_K = 2048  # FAISS GPU indices answer at most k=2048 neighbours per query

# Size rules (see make_plan). The numbers come from scripts/bench_search.py on 2 shared CPU
# cores and the FAISS wiki ("Guidelines to choose an index").
IVF_MIN_POINTS_PER_LIST = 39   # FAISS k-means warns below 39 training points per centroid
IVF_TRAIN_POINTS_PER_LIST = 64  # training sample: 64 x nlist (FAISS accepts 39..256 x nlist)
IVF_MAX_NLIST = 65536


class VectorIndexError(ValueError):
    """Bad input to a vector index (wrong shape, NaN rows, empty index, unknown ids, bad file)."""


@dataclass
class IndexConfig:
    """How a `VectorIndex` chooses and tunes its FAISS index. Saved in the index's sidecar."""

    metric: str = "ip"
    """"ip": inner product, i.e. cosine on L2-normalised vectors (higher is closer); "l2":
    squared Euclidean distance (lower is closer)."""
    normalize: bool = True
    """With metric "ip", L2-normalise vectors on build/add and on query. Set False when they
    already are unit-norm (saves a copy per chunk) or when the raw inner product is wanted."""
    exact_below: int = 40_000
    """Below this many vectors an exact flat index is used. One exact top-20 query at 512-d on
    the 2 shared cores (bench_search.py, 1 thread, p50 over runs): 2.7 ms at 20-30k, 3.7 ms at
    40k, 5-10 ms at 50k, 10-13 ms at 100k. 40k keeps exact search well inside the 10 ms budget
    on a loaded machine; above it HNSW answers in ~0.3 ms at recall@20 0.998."""
    approximate: str = "auto"
    """Index from `exact_below` up to `compressed_above`: "hnsw" (graph; best single-query
    latency and recall on the CPU, no training, 8 M B per vector for links, no FAISS GPU
    version), "ivf" (inverted lists over k-means cells: trains on a sample, builds ~2x faster,
    runs on the GPU, shares its code path with IVF-PQ), or "auto": "ivf" when the index will
    live on a GPU, else "hnsw"."""
    compressed_above: int = 2_000_000
    """Above this many vectors IVF-PQ is used so the index fits memory: 2M x 512-d float32 is
    4 GiB raw; PQ codes are `pq_bytes` bytes per vector (+8 B id), 64 B by default, i.e. 32x
    smaller than float32 at 512-d, for lower recall (measured, see recall_at_k)."""
    shards: int = 1
    """Split the vectors over this many sub-indices behind a faiss.IndexShards: for data beyond
    one machine's memory (each shard saves to its own file) or to spread over several GPUs.
    IVF shards share one trained quantizer, so sharding does not change which cells a query
    probes; results are merged exactly across shards."""
    max_shard_bytes: int | None = None
    """Shards by size: when set, the index is split into as many shards as it takes for each to
    hold at most this many bytes (codes or vectors, ids, and its copy of any quantizer), and at
    least `shards`; e.g. one GPU's memory, or what one machine can give the index. With IVF-PQ's
    72 B per vector a 40 GiB budget holds ~590M vectors per shard. None: exactly `shards`."""
    use_gpu: str = "auto"
    """"auto": use the GPU(s) when faiss-gpu sees any; "never"; "always": fail if none."""
    seed: int = 0
    """Seeds the training sample, k-means and PQ training, and recall query sampling."""
    hnsw_m: int = 32
    """HNSW links per vector (FAISS suggests 4..64); memory is (4 d + 8 M) B per vector."""
    ef_construction: int = 40
    """HNSW build-time beam width (FAISS default); larger builds slower, slightly better graphs."""
    ef_search: int | None = None
    """HNSW search beam width; None = rule: 64 up to 1M vectors, 128 above (always >= k)."""
    nlist: int | None = None
    """IVF cells; None = rule: the power of two nearest 4 sqrt(N), capped so that every cell
    has >= 39 training points and at 65536."""
    nprobe: int | None = None
    """IVF cells visited per query; None = rule: max(32, nlist / 32) (at most nlist)."""
    pq_bytes: int = 64
    """IVF-PQ code size in bytes per vector (= PQ sub-quantizers at 8 bits); the sub-quantizer
    count must divide the dimension, else the largest divisor below it is used. 64 B at 512-d:
    8 dims per code byte, 32x smaller than float32. FAISS GPU IVF-PQ takes at most 96 B codes."""
    pq_nbits: int = 8
    """Bits per PQ sub-quantizer code (8: 256 centroids per sub-space, the FAISS default)."""
    rerank_factor: int = 16
    """With the original vectors attached (`attach_vectors`, e.g. an np.memmap of the run's
    embeddings), an IVF-PQ search takes rerank_factor x k candidates by their codes and re-scores
    them exactly: codes stay in memory, floats stay on disk. At 1M x 512 with 64 B codes,
    recall@20 was 0.54 without re-ranking (PQ-bound: the same at nprobe 64..256), 0.89 with x4,
    0.965 with x8, 0.99 with x16, for +0.5..1 ms p50 (bench_search.py). 0 = never re-rank."""
    train_size: int | None = None
    """Vectors sampled to train IVF/IVF-PQ; None = rule: 64 x nlist (>= 39 x 2^pq_nbits for PQ),
    at most N. Training needs only this sample in memory; the rest is added in chunks."""
    add_batch: int = 65_536
    """Vectors normalised and added per chunk: bounds the temporary copy to add_batch x d floats."""
    single_query_threads: int = 1
    """OpenMP threads for searches of at most `small_batch` queries; 0 = leave FAISS's setting.
    On shared cores a 2-thread single query waits on descheduled OpenMP workers: exact top-20 at
    50k took 24 ms p50 with 2 threads and 4.8 ms with 1 (bench_search.py)."""
    small_batch: int = 16
    """Query batches up to this size count as interactive and use `single_query_threads`."""
    recall_queries: int = 200
    """`build` measures recall@`recall_k` of an approximate index against exact search on this
    many of its own vectors used as queries (0 = skip); the result is kept in the metadata."""
    recall_k: int = 20
    """k for the recall measured on build."""

    def __post_init__(self) -> None:
        if self.metric not in ("ip", "l2"):
            raise VectorIndexError(f"metric must be 'ip' or 'l2', got {self.metric!r}")
        if self.approximate not in ("auto", "hnsw", "ivf"):
            raise VectorIndexError(f"approximate must be 'auto', 'hnsw' or 'ivf', got {self.approximate!r}")
        if self.use_gpu not in ("auto", "never", "always"):
            raise VectorIndexError(f"use_gpu must be 'auto', 'never' or 'always', got {self.use_gpu!r}")
        if self.exact_below < 0 or self.compressed_above < self.exact_below:
            raise VectorIndexError(f"need 0 <= exact_below <= compressed_above, got exact_below={self.exact_below}, "
                                   f"compressed_above={self.compressed_above}")
        for name in ("shards", "hnsw_m", "ef_construction", "pq_bytes", "pq_nbits", "add_batch", "recall_k"):
            if getattr(self, name) < 1:
                raise VectorIndexError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rerank_factor < 0:
            raise VectorIndexError(f"rerank_factor must be >= 0, got {self.rerank_factor}")
        if self.max_shard_bytes is not None and self.max_shard_bytes < 1:
            raise VectorIndexError(f"max_shard_bytes must be >= 1 or None, got {self.max_shard_bytes}")
        for name in ("ef_search", "nlist", "nprobe", "train_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise VectorIndexError(f"{name} must be >= 1 or None (size rule), got {v}")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "IndexConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise VectorIndexError(f"unknown IndexConfig key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**data)


@dataclass
class IndexPlan:
    """The index type and parameters chosen for a size: what `info()` and the sidecar report."""

    kind: Kind
    expected_count: int
    dim: int
    factory: str
    """faiss.index_factory string of one shard (without the IDMap wrapper used for shards)."""
    nlist: int | None = None
    nprobe: int | None = None
    hnsw_m: int | None = None
    ef_construction: int | None = None
    ef_search: int | None = None
    pq_m: int | None = None
    pq_nbits: int | None = None
    train_size: int | None = None
    bytes_per_vector: float = 0.0
    """Index memory per vector (codes or floats + graph links + stored id), excluding fixed parts."""
    fixed_bytes: int = 0
    """Size-independent memory: IVF centroids, PQ codebooks (each IVF shard holds a copy)."""
    reason: str = ""
    shards: int = 1
    """Sub-indices behind faiss.IndexShards: `IndexConfig.shards`, or more by `max_shard_bytes`."""

    def shard_bytes(self) -> int:
        """Expected memory of one shard at `expected_count` vectors (the largest, when uneven)."""
        per = math.ceil(self.expected_count / max(1, self.shards))
        return int(per * self.bytes_per_vector + self.fixed_bytes)

    @property
    def needs_training(self) -> bool:
        return self.kind in ("ivf", "ivfpq")


# -- size rules ---------------------------------------------------------------------------------

def select_kind(n: int, cfg: IndexConfig, gpu: bool = False) -> Kind:
    """flat below `exact_below`, IVF-PQ above `compressed_above`, `approximate` in between
    ("auto": IVF when the index goes to a GPU, where FAISS has no HNSW; else HNSW)."""
    if n < cfg.exact_below:
        return "flat"
    if n > cfg.compressed_above:
        return "ivfpq"
    if cfg.approximate == "auto":
        return "ivf" if gpu else "hnsw"
    return "ivf" if cfg.approximate == "ivf" else "hnsw"


def _pow2_nearest(x: float) -> int:
    return 1 << max(0, round(math.log2(max(x, 1.0))))


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1.0)))))


def ivf_nlist(n: int) -> int:
    """Power of two nearest 4 sqrt(n) (the FAISS wiki suggests 4..16 sqrt(n) below 1M), with
    at least 39 training points per cell (so k-means is well posed), at most 65536."""
    return max(1, min(_pow2_nearest(4.0 * math.sqrt(max(n, 1))), _pow2_floor(n / IVF_MIN_POINTS_PER_LIST),
                      IVF_MAX_NLIST))


def ivf_nprobe(nlist: int) -> int:
    """max(32, nlist/32): visits ~3% of the cells and at least 32, since neighbours spill over
    cell borders. On the clustered 512-d benchmark (bench_search.py) recall@20 was 0.999 at
    100k (nlist 1024, nprobe 32; 0.990 at 16) and 0.96 at 20k (nlist 512; 0.93 at 16)."""
    return max(1, min(nlist, max(32, nlist // 32)))


def hnsw_ef_search(n: int) -> int:
    """64 up to 1M vectors (recall@20 0.998 at 100k, 0.984 at 32, bench_search.py), 128 above:
    a precaution for bigger graphs that this machine could not measure; check with recall_at_k."""
    return 64 if n <= 1_000_000 else 128


def _largest_divisor_at_most(d: int, m: int) -> int:
    for c in range(min(d, m), 0, -1):
        if d % c == 0:
            return c
    return 1


def make_plan(n: int, dim: int, cfg: IndexConfig, gpu: bool = False) -> IndexPlan:
    """The index type and all its parameters for `n` vectors of `dim` dims under `cfg`, including
    the shard count: `cfg.shards`, raised until each shard fits `cfg.max_shard_bytes`."""
    plan = _make_plan(n, dim, cfg, gpu, cfg.shards)
    if cfg.max_shard_bytes is None or plan.shard_bytes() <= cfg.max_shard_bytes:
        return plan
    room = cfg.max_shard_bytes - plan.fixed_bytes
    if room < plan.bytes_per_vector:
        raise VectorIndexError(f"max_shard_bytes={cfg.max_shard_bytes} cannot hold a {plan.kind} shard: its fixed part "
                               f"(centroids, codebooks) alone is {plan.fixed_bytes} B; raise max_shard_bytes or lower nlist")
    # a sharded flat/HNSW index gains an IDMap (8 B per vector); IVF lists store ids already
    id_extra = 8 if plan.kind in ("flat", "hnsw") and cfg.shards == 1 else 0
    shards = max(cfg.shards, math.ceil(n * (plan.bytes_per_vector + id_extra) / room))
    plan = _make_plan(n, dim, cfg, gpu, shards)
    plan.reason += (f"; {shards} shards of <= {plan.shard_bytes() / 2**20:.0f} MiB "
                    f"(max_shard_bytes={cfg.max_shard_bytes})")
    return plan


def _make_plan(n: int, dim: int, cfg: IndexConfig, gpu: bool, shards: int) -> IndexPlan:
    kind = select_kind(n, cfg, gpu)
    fsize = 4 * dim
    id_bytes = 8  # IVF lists and the IDMap of a sharded flat/HNSW index store an int64 per vector
    extra_id = id_bytes if shards > 1 else 0
    if kind == "flat":
        return IndexPlan(kind=kind, expected_count=n, dim=dim, factory="Flat", bytes_per_vector=fsize + extra_id,
                         reason=f"{n} < exact_below={cfg.exact_below}: exact search", shards=shards)
    if kind == "hnsw":
        m = cfg.hnsw_m
        ef = cfg.ef_search or hnsw_ef_search(n)
        return IndexPlan(kind=kind, expected_count=n, dim=dim, factory=f"HNSW{m}", hnsw_m=m,
                         ef_construction=cfg.ef_construction, ef_search=ef,
                         bytes_per_vector=fsize + 2 * 4 * m + extra_id, shards=shards,
                         reason=f"exact_below={cfg.exact_below} <= {n} <= compressed_above={cfg.compressed_above}: "
                                f"HNSW (M={m}, efSearch={ef})")
    nlist = cfg.nlist or ivf_nlist(n)
    nprobe = min(nlist, cfg.nprobe or ivf_nprobe(nlist))
    train = cfg.train_size or IVF_TRAIN_POINTS_PER_LIST * nlist
    if kind == "ivf":
        return IndexPlan(kind=kind, expected_count=n, dim=dim, factory=f"IVF{nlist},Flat", nlist=nlist, nprobe=nprobe,
                         train_size=min(n, train), bytes_per_vector=fsize + id_bytes, fixed_bytes=nlist * fsize,
                         shards=shards, reason=f"exact_below={cfg.exact_below} <= {n} <= compressed_above={cfg.compressed_above}: "
                                f"IVF (nlist={nlist}, nprobe={nprobe})")
    pq_m = _largest_divisor_at_most(dim, cfg.pq_bytes * 8 // cfg.pq_nbits)
    if cfg.train_size is None:
        train = max(train, IVF_MIN_POINTS_PER_LIST * (1 << cfg.pq_nbits))
    code = math.ceil(pq_m * cfg.pq_nbits / 8)
    return IndexPlan(kind=kind, expected_count=n, dim=dim, factory=f"IVF{nlist},PQ{pq_m}x{cfg.pq_nbits}", nlist=nlist,
                     nprobe=nprobe, pq_m=pq_m, pq_nbits=cfg.pq_nbits, train_size=min(n, train),
                     bytes_per_vector=code + id_bytes, fixed_bytes=nlist * fsize + (1 << cfg.pq_nbits) * fsize,
                     shards=shards, reason=f"{n} > compressed_above={cfg.compressed_above}: IVF-PQ, {code} B codes "
                            f"(nlist={nlist}, nprobe={nprobe})")


# -- GPU ----------------------------------------------------------------------------------------

def gpu_count() -> int:
    """GPUs FAISS can use: 0 with faiss-cpu (where get_num_gpus exists but reports 0)."""
    get = getattr(faiss, "get_num_gpus", None)
    if get is None:
        return 0
    try:
        return int(get())
    except Exception:  # a faiss-gpu wheel on a machine without a driver
        return 0


# -- input checks -------------------------------------------------------------------------------

def _rows_list(rows: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    return f"[{shown}{', ...' if len(rows) > limit else ''}]"


def _as_matrix(x: Any, what: str, dim: int | None, allow_vector: bool = False) -> np.ndarray:
    """A float32 C-contiguous [N, D] view or copy of `x`, or an actionable error."""
    a = np.asarray(x)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise VectorIndexError(f"{what} must be a numeric array, got dtype {a.dtype}")
    if a.ndim == 1 and allow_vector:
        a = a[None, :]
    if a.ndim != 2:
        raise VectorIndexError(f"{what} must be a 2-D array [N, D], got shape {a.shape}")
    if dim is not None and a.shape[1] != dim:
        noun = "query has" if what.startswith("quer") else f"{what} have"
        raise VectorIndexError(f"{noun} {a.shape[1]} dims, index has {dim}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _check_finite(x: np.ndarray, what: str, row_offset: int = 0) -> None:
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if len(bad):
        raise VectorIndexError(f"{what} contain NaN or inf in {len(bad)} row(s) {_rows_list(bad + row_offset)}; "
                               "drop or fix those rows before indexing or searching")


def _check_nonzero(x: np.ndarray, what: str, row_offset: int = 0, norms: np.ndarray | None = None) -> None:
    if norms is None:
        norms = np.einsum("ij,ij->i", x, x)
    zero = np.flatnonzero(norms == 0)
    if len(zero):
        raise VectorIndexError(f"{what} have zero norm in {len(zero)} row(s) {_rows_list(zero + row_offset)}; "
                               "cosine similarity is undefined for them: drop them, or use metric='l2'")


def _normalized(x: np.ndarray, what: str, row_offset: int = 0) -> np.ndarray:
    """A unit-norm copy of x; zero rows are an error (they have no direction to compare)."""
    norms = np.linalg.norm(x, axis=1)
    _check_nonzero(x, what, row_offset, norms)
    return (x / norms[:, None]).astype(np.float32, copy=False)


def _as_rows(x: Any, what: str, dim: int | None) -> np.ndarray:
    """`x` as an [N, D] array without converting it (a memmap stays on disk); chunks are
    converted to float32 later, one at a time."""
    a = x if isinstance(x, np.ndarray) else np.asarray(x)
    if a.ndim != 2:
        raise VectorIndexError(f"{what} must be a 2-D array [N, D], got shape {a.shape}")
    if a.dtype == object or not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise VectorIndexError(f"{what} must be a numeric array, got dtype {a.dtype}")
    if dim is not None and a.shape[1] != dim:
        raise VectorIndexError(f"{what} have {a.shape[1]} dims, index has {dim}")
    return a


def recall_from_positions(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / |exact top-k| (k-recall@k).

    Entries < 0 are missing results (FAISS pads with -1) and never count as hits; a query whose
    exact list is shorter than k (index smaller than k) is scored against what exists.
    """
    approx = np.asarray(approx)
    exact = np.asarray(exact)
    if approx.shape[0] != exact.shape[0]:
        raise VectorIndexError(f"approx has {approx.shape[0]} queries, exact has {exact.shape[0]}")
    if approx.shape[0] == 0:
        raise VectorIndexError("recall needs at least one query")
    scores = []
    for a, e in zip(approx, exact):
        truth = set(int(v) for v in e if v >= 0)
        if not truth:
            continue
        scores.append(len(truth.intersection(int(v) for v in a if v >= 0)) / len(truth))
    if not scores:
        raise VectorIndexError("no query has any exact neighbour: is the index empty?")
    return float(np.mean(scores))


@contextlib.contextmanager
def _omp_threads(n: int) -> Iterator[None]:
    """Temporarily run FAISS's OpenMP regions on n threads (0 = leave as is).

    omp_set_num_threads changes the calling thread's setting only, so concurrent searches from
    other threads (e.g. a dashboard's) are not affected.
    """
    if n <= 0:
        yield
        return
    old = faiss.omp_get_max_threads()
    if old == n:
        yield
        return
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


# -- the index ----------------------------------------------------------------------------------

class VectorIndex:
    """A FAISS index chosen by size, with the caller's ids, validated inputs and atomic save/load.

    One-shot: `VectorIndex(cfg).build(vectors, ids)`. Bounded memory: `prepare(dim,
    expected_count, train_vectors=sample)` then `add(chunk, chunk_ids)` per chunk.
    """

    def __init__(self, config: IndexConfig | None = None):
        self.config = config or IndexConfig()
        self._clear()

    def _clear(self) -> None:
        """Forget everything indexed (the config stays)."""
        self._plan: IndexPlan | None = None
        self._parts: list[Any] = []  # one FAISS index per shard (CPU or GPU)
        self._index: Any = None  # parts[0], or an IndexShards over the parts
        self._on_gpu = False
        self._gpu_res: list[Any] = []
        self._count = 0
        self._id_type: str | None = None  # "positions" | "int" | "str"
        self._int_ids: list[np.ndarray] = []
        self._int_cache: np.ndarray | None = None
        self._str_ids: list[str] = []
        self._str_set: set[str] = set()
        self._str_table: np.ndarray | None = None
        self._recall: dict[str, Any] | None = None
        self._notes: list[str] = []
        self._rerank_source: np.ndarray | None = None

    # -- properties -----------------------------------------------------------------------------
    @property
    def dim(self) -> int | None:
        return self._plan.dim if self._plan else None

    @property
    def kind(self) -> str | None:
        return self._plan.kind if self._plan else None

    @property
    def plan(self) -> IndexPlan | None:
        return self._plan

    def __len__(self) -> int:
        return self._count

    @property
    def _ip(self) -> bool:
        return self.config.metric == "ip"

    @property
    def _faiss_metric(self) -> int:
        return faiss.METRIC_INNER_PRODUCT if self._ip else faiss.METRIC_L2

    # -- build ----------------------------------------------------------------------------------
    def build(self, vectors: np.ndarray, ids: np.ndarray | Sequence[int] | Sequence[str] | None = None
              ) -> "VectorIndex":
        """Index `vectors` [N, D] (ids: N int64 or N str; None = positions 0..N-1), replacing
        anything indexed before. Chooses the index type from N; trains IVF on a sample; adds in
        chunks; for an approximate index measures recall@`recall_k` on a sample (see info()).

        `vectors` may be a np.memmap: it is read a chunk (and a training sample) at a time.
        """
        x = _as_rows(vectors, "vectors", None)
        if len(x) == 0:
            raise VectorIndexError("cannot build an index from 0 vectors")
        self._clear()
        checked = self._check_ids(ids, len(x))  # before training, so bad ids fail fast
        self.prepare(x.shape[1], len(x), train_vectors=x)
        self._add(x, checked)
        if self._plan is not None and self._plan.kind != "flat" and self.config.recall_queries > 0:
            rng = np.random.default_rng(self.config.seed + 1)
            sample = np.sort(rng.choice(len(x), size=min(len(x), self.config.recall_queries), replace=False))
            r = self.recall_at_k(np.asarray(x[sample]), self.config.recall_k, reference=x)
            log.info("built %s index over %d vectors: recall@%d = %.3f on %d of its vectors",
                     self._plan.kind, self._count, self.config.recall_k, r, len(sample))
        return self

    def prepare(self, dim: int, expected_count: int, train_vectors: np.ndarray | None = None) -> "VectorIndex":
        """Create an empty index for about `expected_count` vectors of `dim` dims.

        The type is chosen from `expected_count`. IVF and IVF-PQ are trained here on a seeded
        sample of `train_vectors` (`plan.train_size` rows; a sample of the data is enough, so
        the full set never has to be in memory); flat and HNSW need no training vectors.
        """
        if dim < 1:
            raise VectorIndexError(f"dim must be >= 1, got {dim}")
        if expected_count < 1:
            raise VectorIndexError(f"expected_count must be >= 1, got {expected_count}")
        self._clear()
        plan = make_plan(expected_count, dim, self.config, gpu=self._gpu_available())
        self._plan = plan
        use_gpu = self._use_gpu_for(plan)
        if plan.needs_training:
            if train_vectors is None:
                raise VectorIndexError(
                    f"a {plan.kind} index for {expected_count} vectors needs training: pass train_vectors "
                    f"(a sample of at least {plan.train_size} vectors) to prepare()")
            sample = self._training_sample(train_vectors, plan)
            template = faiss.index_factory(dim, plan.factory, self._faiss_metric)
            ivf = faiss.extract_index_ivf(template)
            ivf.cp.seed = self.config.seed
            if plan.kind == "ivfpq":
                ivfpq = faiss.downcast_index(template)
                ivfpq.pq.cp.seed = self.config.seed
                # The factory turns on polysemous training (a Hamming-filter codebook reordering that
                # costs 40 s even on 10k points) although we never search in polysemous mode.
                ivfpq.do_polysemous_training = False
            self._train(template, sample, use_gpu)
            parts = [template] + [faiss.clone_index(template) for _ in range(plan.shards - 1)]
        else:
            factory = ("IDMap," if plan.shards > 1 else "") + plan.factory
            parts = [faiss.index_factory(dim, factory, self._faiss_metric) for _ in range(plan.shards)]
            if plan.kind == "hnsw":
                for p in parts:
                    _hnsw_of(p).hnsw.efConstruction = plan.ef_construction
        self._assemble(parts, use_gpu)
        return self

    def _training_sample(self, train_vectors: np.ndarray, plan: IndexPlan) -> np.ndarray:
        t = _as_rows(train_vectors, "training vectors", plan.dim)
        n_train = min(len(t), plan.train_size or len(t))
        need = plan.nlist or 1
        if plan.kind == "ivfpq":
            need = max(need, 1 << (plan.pq_nbits or 8))
        if n_train < need:
            raise VectorIndexError(f"{plan.kind} with {plan.factory} needs at least {need} training vectors, "
                                   f"got {len(t)}; pass more, or lower nlist/pq_nbits")
        rng = np.random.default_rng(self.config.seed)
        rows = np.sort(rng.choice(len(t), size=n_train, replace=False)) if n_train < len(t) else slice(None)
        s = _as_matrix(t[rows], "training vectors", plan.dim)
        _check_finite(s, "training vectors")
        return _normalized(s, "training vectors") if (self._ip and self.config.normalize) else s

    def _train(self, template: Any, sample: np.ndarray, use_gpu: bool) -> None:
        """Train IVF/IVF-PQ; on a GPU the k-means assignment runs there (FAISS wiki: train on GPU)."""
        ivf = faiss.extract_index_ivf(template)
        clustering = None
        if use_gpu:
            clustering = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(template.d))
            ivf.clustering_index = clustering
        template.train(sample)
        if clustering is not None:
            ivf.clustering_index = None

    def _assemble(self, parts: list[Any], use_gpu: bool) -> None:
        """Optionally move the (CPU) parts to GPUs, wrap shards, apply search parameters."""
        self._on_gpu = False
        if use_gpu:
            parts = self._parts_to_gpu(parts)
            self._on_gpu = True
        self._parts = parts
        if len(parts) == 1:
            self._index = parts[0]
        else:
            # CPU shards are searched one after another, each with FAISS's OpenMP threads (a thread
            # per shard would not see the single-query thread limit); GPU shards run concurrently.
            shards = faiss.IndexShards(parts[0].d, self._on_gpu, False)
            for p in parts:
                shards.add_shard(p)
            self._index = shards
        self._apply_search_params()

    def _parts_to_gpu(self, parts: list[Any]) -> list[Any]:
        n = gpu_count()
        # IVF-PQ with 64 sub-quantizers x 256 centroids needs float16 lookup tables to fit the GPU's
        # shared memory; flat and IVF-Flat keep float32 so scores match the CPU.
        f16 = self._plan is not None and self._plan.kind == "ivfpq"
        if len(parts) == 1 and n > 1:
            co = faiss.GpuMultipleClonerOptions()
            co.shard = True
            co.useFloat16 = f16
            return [faiss.index_cpu_to_all_gpus(parts[0], co=co)]
        co = faiss.GpuClonerOptions()
        co.useFloat16 = f16
        self._gpu_res = [faiss.StandardGpuResources() for _ in range(min(n, len(parts)))]
        return [faiss.index_cpu_to_gpu(self._gpu_res[i % n], i % n, p, co) for i, p in enumerate(parts)]

    def _gpu_available(self) -> bool:
        mode = self.config.use_gpu
        if mode == "never":
            return False
        if gpu_count() == 0:
            if mode == "always":
                raise VectorIndexError("use_gpu='always' but FAISS sees no GPU: install the `gpu` extra "
                                       "(faiss-gpu) on a machine with CUDA, or set use_gpu='auto'")
            return False
        return True

    def _use_gpu_for(self, plan: IndexPlan) -> bool:
        if not self._gpu_available():
            return False
        if plan.kind == "hnsw":
            note = "HNSW has no FAISS GPU implementation: it is built and searched on the CPU"
            if note not in self._notes:
                self._notes.append(note)
            return False
        return True

    def _apply_search_params(self) -> None:
        plan = self._plan
        if plan is None or self._index is None:
            return
        ps = faiss.GpuParameterSpace() if self._on_gpu else faiss.ParameterSpace()
        if plan.kind in ("ivf", "ivfpq"):
            ps.set_index_parameter(self._index, "nprobe", int(plan.nprobe))
        elif plan.kind == "hnsw":
            ps.set_index_parameter(self._index, "efSearch", int(plan.ef_search))

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Trade speed for recall after building (e.g. from a recall_at_k sweep); saved with the index."""
        plan = self._require_plan()
        if nprobe is not None:
            if plan.kind not in ("ivf", "ivfpq"):
                raise VectorIndexError(f"nprobe applies to IVF indices, this one is {plan.kind}")
            plan.nprobe = max(1, min(int(nprobe), int(plan.nlist or 1)))
        if ef_search is not None:
            if plan.kind != "hnsw":
                raise VectorIndexError(f"ef_search applies to HNSW indices, this one is {plan.kind}")
            plan.ef_search = max(1, int(ef_search))
        self._recall = None  # measured under the old parameters
        self._apply_search_params()

    # -- add ------------------------------------------------------------------------------------
    def add(self, vectors: np.ndarray, ids: np.ndarray | Sequence[int] | Sequence[str] | None = None) -> None:
        """Append vectors [n, D] with their ids (None = positions, only if all adds use None).

        Inputs are checked completely (dims, NaN/inf, zero norms, ids) before anything is added,
        so a rejected call leaves the index as it was; the vectors are then normalised and added
        `add_batch` rows at a time (np.memmap inputs are read a chunk at a time).
        """
        plan = self._require_plan()
        x = _as_rows(vectors, "vectors", plan.dim)
        if len(x) == 0:
            return
        self._add(x, self._check_ids(ids, len(x)))

    def _add(self, x: np.ndarray, checked_ids: Any) -> None:
        plan = self._require_plan()
        n, b = len(x), self.config.add_batch
        normalize = self._ip and self.config.normalize
        for s in range(0, n, b):  # validation pass
            c = _as_matrix(x[s:s + b], "vectors", plan.dim)
            _check_finite(c, "vectors", s)
            if normalize:
                _check_nonzero(c, "vectors", s)
        for s in range(0, n, b):
            c = _as_matrix(x[s:s + b], "vectors", plan.dim)
            if normalize:
                c = _normalized(c, "vectors", s)
            if len(self._parts) > 1:
                self._index.add_with_ids(c, np.arange(self._count, self._count + len(c), dtype=np.int64))
            else:
                self._index.add(c)
            self._append_ids(checked_ids, s, len(c))
            self._count += len(c)
        if self._rerank_source is not None:
            log.warning("vectors were added after attach_vectors(): re-ranking is off until the vectors are "
                        "attached again (all %d, in insertion order)", self._count)
            self._rerank_source = None

    def _check_ids(self, ids: Any, n: int) -> Any:
        """Validate ids for n new vectors against the id type and ids already in the index."""
        if ids is None:
            if self._id_type not in (None, "positions"):
                raise VectorIndexError(f"this index has {self._id_type} ids: pass ids for the added vectors too")
            return None
        if isinstance(ids, (str, bytes)):
            raise VectorIndexError("ids must be a sequence with one id per vector, got a single string")
        if len(ids) != n:
            raise VectorIndexError(f"got {n} vectors but {len(ids)} ids")
        if self._id_type == "positions" and self._count:
            raise VectorIndexError("this index was built without ids (ids are positions): add without ids too")
        arr = np.asarray(ids)
        if arr.dtype.kind in "iu":
            if self._id_type == "str":
                raise VectorIndexError("this index has string ids: pass string ids for the added vectors too")
            if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
                raise VectorIndexError("ids must fit in int64")
            arr = arr.astype(np.int64)
            if arr.size and arr.min() < 0:
                raise VectorIndexError(f"ids must be >= 0 (-1 marks a missing result), got {int(arr.min())}")
            uniq, counts = np.unique(arr, return_counts=True)
            if (counts > 1).any():
                raise VectorIndexError(f"ids must be unique: {int(uniq[counts > 1][0])} appears "
                                       f"{int(counts[counts > 1][0])} times")
            if self._count:
                clash = arr[np.isin(arr, self._all_int_ids())]
                if len(clash):
                    raise VectorIndexError(f"id {int(clash[0])} is already in the index")
            return ("int", arr)
        if all(isinstance(v, str) for v in ids):
            if self._id_type == "int":
                raise VectorIndexError("this index has int ids: pass int64 ids for the added vectors too")
            seen: set[str] = set()
            for v in ids:
                if v in seen:
                    raise VectorIndexError(f"ids must be unique: {v!r} appears more than once")
                if v in self._str_set:
                    raise VectorIndexError(f"id {v!r} is already in the index")
                seen.add(v)
            return ("str", [str(v) for v in ids])  # plain str, also from a numpy string array
        raise VectorIndexError(f"ids must be all int or all str, got dtype {arr.dtype}")

    def _append_ids(self, new_ids: Any, start: int, n: int) -> None:
        if new_ids is None:
            self._id_type = "positions"
            return
        kind, values = new_ids
        self._id_type = kind
        if kind == "int":
            self._int_ids.append(values[start:start + n])
            self._int_cache = None
        else:
            chunk = values[start:start + n]
            self._str_ids.extend(chunk)
            self._str_set.update(chunk)
            self._str_table = None

    def _all_int_ids(self) -> np.ndarray:
        if self._int_cache is None or len(self._int_cache) != self._count:
            self._int_cache = (np.concatenate(self._int_ids) if self._int_ids else np.zeros(0, np.int64))
            self._int_ids = [self._int_cache]
        return self._int_cache

    def ids(self) -> np.ndarray | list[str]:
        """All ids in insertion order (positions when the index was built without ids)."""
        if self._id_type == "str":
            return list(self._str_ids)
        if self._id_type == "int":
            return self._all_int_ids().copy()
        return np.arange(self._count, dtype=np.int64)

    # -- search ---------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k neighbours of each query [Q, D] (a single [D] vector is one query).

        Returns scores [Q, k'] float32 (cosine/inner product, higher is closer; or squared L2,
        lower is closer) and ids [Q, k'] in the caller's ids: int64 with -1, or an object array of
        str with None, where an approximate index found fewer than k (their scores are -inf for
        ip, +inf for l2). k' = min(k, len(index)): a larger k is clamped with a logged note.
        """
        plan = self._require_plan()
        if self._count == 0:
            raise VectorIndexError("the index is empty: build() or add() vectors before searching")
        q = self._queries(queries, plan.dim)
        k = self._check_k(k)
        scores, pos = self._search_positions(q, k)
        missing = pos < 0
        if missing.any():  # FAISS pads with -FLT_MAX (ip) / FLT_MAX (l2); make "no result" unmistakable
            scores = scores.copy()
            scores[missing] = -np.inf if self._ip else np.inf
        return scores, self._map_ids(pos)

    def _queries(self, queries: Any, dim: int) -> np.ndarray:
        q = _as_matrix(queries, "query", dim, allow_vector=True)
        _check_finite(q, "queries")
        if self._ip and self.config.normalize:
            q = _normalized(q, "queries")
        return q

    def _check_k(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise VectorIndexError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        if k > self._count:
            log.warning("k=%d is larger than the index (%d vectors): returning %d neighbours per query",
                        k, self._count, self._count)
            k = self._count
        if self._on_gpu and k > GPU_MAX_K:
            raise VectorIndexError(f"FAISS GPU indices return at most k={GPU_MAX_K}; ask for fewer, "
                                   "or load the index with use_gpu='never'")
        return k

    def _raw_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search returning (scores, positions); the only place the FAISS index is queried."""
        threads = self.config.single_query_threads if (len(q) <= self.config.small_batch and not self._on_gpu) else 0
        with _omp_threads(threads):
            d, p = self._index.search(q, k)
        return d, p

    def attach_vectors(self, vectors: np.ndarray) -> None:
        """Attach the original vectors [N, D] (array or np.memmap, insertion order) so that IVF-PQ
        searches re-rank `rerank_factor` x k candidates exactly. Not saved: attach after load."""
        plan = self._require_plan()
        x = _as_rows(vectors, "attached vectors", plan.dim)
        if len(x) != self._count:
            raise VectorIndexError(f"attached vectors have {len(x)} rows, the index has {self._count}: attach "
                                   "all the indexed vectors, in insertion order")
        if plan.kind != "ivfpq":
            log.info("attach_vectors: a %s index stores exact vectors already; re-ranking only applies to ivfpq",
                     plan.kind)
        self._rerank_source = x

    def _search_positions(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Search as served: the FAISS search, plus exact re-ranking for IVF-PQ with vectors attached."""
        src, factor = self._rerank_source, self.config.rerank_factor
        if src is None or factor <= 0 or self._plan is None or self._plan.kind != "ivfpq":
            return self._raw_search(q, k)
        k2 = min(self._count, k * factor)
        _, cand = self._raw_search(q, k2)
        scores = np.empty((len(q), k), np.float32)
        pos = np.empty((len(q), k), np.int64)
        block = max(1, (1 << 22) // (k2 * q.shape[1]))  # ~16 MB of gathered floats per block
        for b in range(0, len(q), block):
            c = cand[b:b + block]
            valid = c >= 0
            rows, inverse = np.unique(np.where(valid, c, 0).ravel(), return_inverse=True)
            v = _as_matrix(src[rows], "attached vectors", q.shape[1])  # sorted rows: sequential reads
            if self._ip and self.config.normalize:
                v = _normalized(v, "attached vectors")
            v = v[inverse.ravel()].reshape(len(c), k2, -1)
            qb = q[b:b + block]
            sim = np.einsum("qd,qkd->qk", qb, v) if self._ip else -np.sum((qb[:, None, :] - v) ** 2, axis=2)
            sim[~valid] = -np.inf
            top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
            s_top = np.take_along_axis(sim, top, axis=1)
            p_top = np.take_along_axis(c, top, axis=1)
            p_top[np.isneginf(s_top)] = -1
            scores[b:b + block] = s_top if self._ip else -s_top
            pos[b:b + block] = p_top
        return scores, pos

    def _map_ids(self, pos: np.ndarray) -> np.ndarray:
        missing = pos < 0
        safe = np.where(missing, 0, pos)
        if self._id_type == "str":
            if self._str_table is None or len(self._str_table) != len(self._str_ids):
                self._str_table = np.empty(len(self._str_ids), dtype=object)
                self._str_table[:] = self._str_ids
            out = self._str_table[safe]
            out[missing] = None
            return out
        if self._id_type == "int":
            out = self._all_int_ids()[safe]
            out[missing] = -1
            return out
        return pos.astype(np.int64, copy=True)

    # -- recall ---------------------------------------------------------------------------------
    def recall_at_k(self, queries: np.ndarray, k: int = 20,
                    reference: np.ndarray | Iterable[np.ndarray] | None = None) -> float:
        """k-recall@k of this index against exact search, on sample `queries` [Q, D].

        Exact neighbours come from the vectors the index stores (flat, HNSW, IVF-Flat keep them
        losslessly) or, for IVF-PQ, from `reference`: the original vectors in insertion order, as
        one array or an iterable of chunks. The result is kept in the metadata (info, sidecar).
        """
        plan = self._require_plan()
        if self._count == 0:
            raise VectorIndexError("the index is empty: build() or add() vectors before measuring recall")
        q = self._queries(queries, plan.dim)
        if len(q) == 0:
            raise VectorIndexError("recall needs at least one query")
        k = self._check_k(k)
        _, approx = self._search_positions(q, k)
        _, exact = self._exact(q, k, reference)
        r = recall_from_positions(approx, exact)
        self._recall = {"k": k, "recall": round(r, 4), "queries": int(len(q)),
                        "exact_from": "stored vectors" if reference is None else "reference vectors",
                        "measured": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                        "search_params": {"nprobe": plan.nprobe, "ef_search": plan.ef_search}}
        return r

    def exact_search(self, queries: np.ndarray, k: int,
                     reference: np.ndarray | Iterable[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force top-k over the stored (or `reference`) vectors, chunk by chunk in bounded
        memory. Returns (scores, positions): positions index insertion order, not caller ids."""
        plan = self._require_plan()
        if self._count == 0:
            raise VectorIndexError("the index is empty: build() or add() vectors before searching")
        return self._exact(self._queries(queries, plan.dim), self._check_k(k), reference)

    def _exact(self, q: np.ndarray, k: int, reference: np.ndarray | Iterable[np.ndarray] | None
               ) -> tuple[np.ndarray, np.ndarray]:
        plan = self._require_plan()
        if reference is None:
            chunks = self._stored_chunks()
        else:
            chunks = self._reference_chunks(reference, plan.dim)
        best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
        best_p = np.full((len(q), k), -1, dtype=np.int64)
        qn = np.einsum("ij,ij->i", q, q)[:, None]
        for pos, v in chunks:
            s = q @ v.T
            if not self._ip:
                s = -(qn - 2 * s + np.einsum("ij,ij->i", v, v)[None, :])  # higher is closer
            all_s = np.concatenate([best_s, s.astype(np.float32)], axis=1)
            all_p = np.concatenate([best_p, np.broadcast_to(pos, s.shape)], axis=1)
            top = np.argpartition(-all_s, k - 1, axis=1)[:, :k]  # all_s has k + len(v) > k columns
            best_s = np.take_along_axis(all_s, top, axis=1)
            best_p = np.take_along_axis(all_p, top, axis=1)
        order = np.argsort(-best_s, axis=1, kind="stable")
        best_s = np.take_along_axis(best_s, order, axis=1)
        best_p = np.take_along_axis(best_p, order, axis=1)
        return (best_s if self._ip else -best_s), best_p

    def _reference_chunks(self, reference: Any, dim: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if isinstance(reference, np.ndarray):
            blocks: Iterable[Any] = (reference[s:s + self.config.add_batch]
                                     for s in range(0, len(reference), self.config.add_batch))
        else:
            blocks = reference
        offset = 0
        for block in blocks:
            v = _as_matrix(block, "reference vectors", dim)
            _check_finite(v, "reference vectors", offset)
            if self._ip and self.config.normalize:
                v = _normalized(v, "reference vectors", offset)
            yield np.arange(offset, offset + len(v), dtype=np.int64), v
            offset += len(v)
        if offset != self._count:
            raise VectorIndexError(f"reference has {offset} vectors, the index has {self._count}: pass the "
                                   "vectors that were added, in the same order")

    def _stored_chunks(self, block: int = 65_536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions, vectors) of everything stored, read back from the CPU parts."""
        plan = self._require_plan()
        if plan.kind == "ivfpq":
            raise VectorIndexError("IVF-PQ stores compressed codes, not the vectors: pass reference=<the original "
                                   "vectors in insertion order> (an array or an iterable of chunks)")
        from faiss.contrib.inspect_tools import get_invlist

        for part in self._cpu_parts():
            id_map = None
            inner = faiss.downcast_index(part)
            if isinstance(inner, faiss.IndexIDMap):
                id_map = faiss.vector_to_array(inner.id_map)
                inner = faiss.downcast_index(inner.index)
            if isinstance(inner, faiss.IndexHNSW):
                inner = faiss.downcast_index(inner.storage)
            if isinstance(inner, faiss.IndexFlat):
                for s in range(0, inner.ntotal, block):
                    v = inner.reconstruct_n(s, min(block, inner.ntotal - s))
                    pos = id_map[s:s + len(v)] if id_map is not None else np.arange(s, s + len(v), dtype=np.int64)
                    yield pos, v
            elif isinstance(inner, faiss.IndexIVFFlat):
                inv = inner.invlists
                buf_p: list[np.ndarray] = []
                buf_v: list[np.ndarray] = []
                size = 0
                for lst in range(inner.nlist):
                    if inv.list_size(lst) == 0:
                        continue
                    lids, codes = get_invlist(inv, lst)
                    buf_p.append(np.asarray(lids, dtype=np.int64))
                    buf_v.append(np.asarray(codes).view(np.float32).reshape(-1, inner.d))
                    size += len(lids)
                    if size >= block:
                        yield np.concatenate(buf_p), np.concatenate(buf_v)
                        buf_p, buf_v, size = [], [], 0
                if size:
                    yield np.concatenate(buf_p), np.concatenate(buf_v)
            else:  # pragma: no cover - every kind this module builds is handled above
                raise VectorIndexError(f"cannot read vectors back from {type(inner).__name__}")

    def _cpu_parts(self) -> list[Any]:
        if not self._on_gpu:
            return list(self._parts)
        return [faiss.index_gpu_to_cpu(p) for p in self._parts]

    # -- persistence ----------------------------------------------------------------------------
    @staticmethod
    def sidecar_path(path: str | os.PathLike) -> Path:
        p = Path(path)
        return p.with_name(p.name + SIDECAR_SUFFIX)

    def save(self, path: str | os.PathLike) -> list[Path]:
        """Write the CPU index to `path` (<name>.faiss; shards to <name>.shardI-of-N.faiss) and the
        sidecar <name>.faiss.json, each atomically, the sidecar last. Returns the files written."""
        plan = self._require_plan()
        p = Path(path)
        if p.suffix != ".faiss":
            raise VectorIndexError(f"index path must end in .faiss, got {p.name!r}")
        parts = self._cpu_parts()
        n = len(parts)
        names = [p.name] if n == 1 else [f"{p.stem}.shard{i}-of-{n}.faiss" for i in range(n)]
        files = []
        written = []
        for part, name in zip(parts, names):
            target = p.with_name(name)
            with atomic_path(target) as tmp:
                faiss.write_index(part, str(tmp))
            files.append({"name": name, "bytes": target.stat().st_size, "sha256": sha256_file(target),
                          "count": int(part.ntotal)})
            written.append(target)
        ids: Any
        if self._id_type == "str":
            ids = list(self._str_ids)
        elif self._id_type == "int":
            ids = self._all_int_ids().tolist()
        else:
            ids = None
        meta = {
            "format": FORMAT_VERSION,
            "kind": plan.kind,
            "dim": plan.dim,
            "count": self._count,
            "metric": self.config.metric,
            "normalized": bool(self._ip and self.config.normalize),
            "config": asdict(self.config),
            "plan": asdict(plan),
            "id_type": self._id_type or "positions",
            "ids": ids,
            "files": files,
            "recall": self._recall,
            "faiss_version": faiss.__version__,
            "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        side = self.sidecar_path(p)
        write_json_atomic(side, meta)
        self._remove_stale_files(p, set(names))
        return written + [side]

    @staticmethod
    def _remove_stale_files(p: Path, keep: set[str]) -> None:
        """Delete index files of an earlier save under the same name with another shard count, so a
        run directory holds only what the sidecar lists (and its hashes cover no dead files)."""
        pattern = re.compile(rf"^{re.escape(p.stem)}(\.shard\d+-of-\d+)?\.faiss$")
        for f in p.parent.iterdir():
            if f.name not in keep and pattern.match(f.name):
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()

    @classmethod
    def load(cls, path: str | os.PathLike, use_gpu: str | None = None, verify: bool = False) -> "VectorIndex":
        """Read an index written by `save` (the .faiss path or its .faiss.json sidecar).

        File sizes are always checked against the sidecar; `verify=True` also checks sha256.
        `use_gpu` overrides the saved setting ("never" to keep a GPU machine's index on the CPU).
        """
        p = Path(path)
        if p.name.endswith(".faiss" + SIDECAR_SUFFIX):
            side, p = p, p.with_name(p.name[: -len(SIDECAR_SUFFIX)])
        else:
            side = cls.sidecar_path(p)
        if not side.exists():
            raise VectorIndexError(f"{side} not found: an index is saved as <name>.faiss plus its sidecar "
                                   "<name>.faiss.json by VectorIndex.save")
        try:
            meta = json.loads(side.read_text())
        except json.JSONDecodeError as e:
            raise VectorIndexError(f"{side} is not valid JSON ({e}); rewrite the index") from None
        if meta.get("format") != FORMAT_VERSION or meta.get("kind") not in KINDS:
            raise VectorIndexError(f"{side} has format {meta.get('format')!r} and kind {meta.get('kind')!r}; this "
                                   f"code reads format {FORMAT_VERSION} with kinds {list(KINDS)}")
        cfg_data = dict(meta["config"])
        if use_gpu is not None:
            cfg_data["use_gpu"] = use_gpu
        ix = cls(IndexConfig.from_json(cfg_data))
        ix._plan = IndexPlan(**meta["plan"])
        parts = []
        for f in meta["files"]:
            fp = p.with_name(f["name"])
            if not fp.exists():
                raise VectorIndexError(f"{fp} is missing (listed in {side.name}); rewrite the index")
            if fp.stat().st_size != f["bytes"] or (verify and sha256_file(fp) != f["sha256"]):
                raise VectorIndexError(f"{fp} does not match its sidecar {side.name} (changed or truncated after "
                                       "saving); rewrite the index")
            parts.append(faiss.read_index(str(fp)))
        total = sum(int(part.ntotal) for part in parts)
        if total != meta["count"]:
            raise VectorIndexError(f"{p} holds {total} vectors but its sidecar says {meta['count']}; rewrite the index")
        ix._count = int(meta["count"])
        ix._id_type = meta["id_type"] if ix._count else None
        ids = meta["ids"]
        if ix._id_type == "str":
            ix._str_ids = list(ids)
            ix._str_set = set(ix._str_ids)
        elif ix._id_type == "int":
            ix._int_ids = [np.asarray(ids, dtype=np.int64)]
        ix._recall = meta.get("recall")
        ix._assemble(parts, ix._use_gpu_for(ix._plan))
        return ix

    # -- metadata -------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """What the index is, how big, where it runs, its parameters and its measured recall."""
        plan = self._plan
        mem = int(plan.fixed_bytes * (len(self._parts) if plan and plan.needs_training else 1)
                  + plan.bytes_per_vector * self._count) if plan else 0
        if plan and self._id_type == "str":
            mem_ids = sum(len(s) for s in self._str_ids) + 60 * self._count  # python str objects
        else:
            mem_ids = 8 * self._count if self._id_type == "int" else 0
        return {
            "kind": plan.kind if plan else None,
            "count": self._count,
            "dim": plan.dim if plan else None,
            "metric": self.config.metric,
            "normalized": bool(self._ip and self.config.normalize),
            "shards": len(self._parts),
            "device": "gpu" if self._on_gpu else "cpu",
            "id_type": self._id_type or "positions",
            "plan": asdict(plan) if plan else None,
            "memory_bytes": mem,
            "id_table_bytes": mem_ids,
            "recall": self._recall,
            "rerank": {"attached": self._rerank_source is not None, "factor": self.config.rerank_factor}
            if plan and plan.kind == "ivfpq" else None,
            "notes": list(self._notes),
        }

    # -- helpers --------------------------------------------------------------------------------
    def _require_plan(self) -> IndexPlan:
        if self._plan is None or self._index is None:
            raise VectorIndexError("index not prepared: call build(vectors, ids), or prepare(dim, expected_count, "
                                   "train_vectors) before add()")
        return self._plan


def _hnsw_of(index: Any) -> Any:
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexIDMap):
        inner = faiss.downcast_index(inner.index)
    return inner


# -- synthetic data for tests and benchmarks ----------------------------------------------------

def clustered_unit_vectors(n: int, dim: int = 512, clusters: int = 1000, seed: int = 0, latent: int = 64,
                           spread: float = 0.8, noise: float = 0.35, zipf: float = 0.7
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors shaped like image embeddings: [n, dim] float32 and their cluster labels.

    Points are cluster centre + within-cluster spread in a `latent`-dim subspace (embeddings have
    a low intrinsic dimension), randomly embedded in `dim` dims, plus isotropic noise, plus a
    shared mean direction (CLIP embeddings are anisotropic), then normalised. Cluster sizes
    follow a Zipf law with exponent `zipf` so some findings are common and most rare.
    """
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, clusters + 1) ** zipf
    labels = rng.choice(clusters, size=n, p=w / w.sum())
    centres = rng.standard_normal((clusters, latent)).astype(np.float32)
    proj = (rng.standard_normal((latent, dim)) / math.sqrt(latent)).astype(np.float32)
    mean_dir = rng.standard_normal(dim).astype(np.float32)
    mean_dir *= 0.6 / np.linalg.norm(mean_dir)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 65_536):
        lab = labels[s:s + 65_536]
        z = centres[lab] + spread * rng.standard_normal((len(lab), latent), dtype=np.float32)
        x = z @ proj
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x += (noise / math.sqrt(dim)) * rng.standard_normal((len(lab), dim), dtype=np.float32) + mean_dir
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s:s + len(lab)] = x
    return out, labels.astype(np.int64)
