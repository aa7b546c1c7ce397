"""Vector index layer: size-based selection, ids, search, recall, chunked builds, persistence, errors."""

from __future__ import annotations

import json
import logging

import faiss
import numpy as np
import pytest

import sae_cxr.index as vi
from sae_cxr.index import (IndexConfig, VectorIndex, VectorIndexError, clustered_unit_vectors, ivf_nlist,
                           ivf_nprobe, make_plan, recall_from_positions, select_kind)

# Tiny thresholds so every kind is reachable with a few thousand vectors.
SMALL = dict(exact_below=300, compressed_above=3000, recall_queries=0)


@pytest.fixture(autouse=True)
def one_thread():
    """Tests are not benchmarks: one OpenMP thread avoids waiting on descheduled workers."""
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(old)


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray]:
    x, _ = clustered_unit_vectors(4200, dim=32, clusters=40, seed=3)
    return x[:4000], x[4000:]  # database, held-out queries


def rand(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


# -- exact search -------------------------------------------------------------------------------

def test_exact_returns_planted_near_duplicate_first():
    x = rand(2000, 64)
    query = rand(1, 64, seed=1)[0]
    planted = query + 0.01 * rand(1, 64, seed=2)[0]
    x[777] = planted
    ids = [f"img{i}" for i in range(len(x))]
    ix = VectorIndex().build(x, ids)
    assert ix.kind == "flat"
    scores, found = ix.search(query, 5)
    assert scores.shape == (1, 5) and found.shape == (1, 5)
    assert found[0, 0] == "img777"
    assert scores[0, 0] == pytest.approx(float(query @ planted / np.linalg.norm(query) / np.linalg.norm(planted)),
                                         abs=1e-5)
    assert scores[0, 0] > 0.99 > scores[0, 1]  # the rest are random directions


def test_ip_normalises_so_scale_does_not_matter_and_l2_returns_squared_distances():
    x = rand(500, 16)
    ix = VectorIndex().build(x)
    s1, i1 = ix.search(x[:3], 4)
    s2, i2 = ix.search(10 * x[:3], 4)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=1e-5)
    np.testing.assert_allclose(s1[:, 0], 1.0, rtol=1e-5)  # cosine with itself

    raw = VectorIndex(IndexConfig(normalize=False)).build(x)
    s, i = raw.search(x[:1], 1)
    assert s[0, 0] == pytest.approx(float(np.max(x @ x[0])), rel=1e-5)

    l2 = VectorIndex(IndexConfig(metric="l2")).build(x)
    s, i = l2.search(x[:2], 3)
    assert i[0, 0] == 0 and s[0, 0] == pytest.approx(0.0, abs=1e-4)
    assert s[1, 1] == pytest.approx(float(np.sum((x[1] - x[i[1, 1]]) ** 2)), rel=1e-4)


# -- size rules ---------------------------------------------------------------------------------

def test_size_rules_pick_flat_approximate_and_ivfpq_at_the_thresholds():
    cfg = IndexConfig(**SMALL)
    assert select_kind(299, cfg) == "flat"
    assert select_kind(300, cfg) == "hnsw"
    assert select_kind(3000, cfg) == "hnsw"
    assert select_kind(3001, cfg) == "ivfpq"
    assert select_kind(300, cfg, gpu=True) == "ivf"  # "auto": FAISS has no GPU HNSW
    assert select_kind(300, IndexConfig(**SMALL, approximate="ivf")) == "ivf"
    assert select_kind(300, IndexConfig(**SMALL, approximate="hnsw"), gpu=True) == "hnsw"
    # nlist: power of two nearest 4 sqrt(N), >= 39 training points per list; nprobe >= 32
    assert ivf_nlist(100_000) == 1024 and ivf_nlist(1_000_000) == 4096 and ivf_nlist(1000) == 16
    assert ivf_nprobe(4096) == 128 and ivf_nprobe(1024) == 32 and ivf_nprobe(64) == 32 and ivf_nprobe(8) == 8
    plan = make_plan(2_500_000, 512, IndexConfig())
    assert plan.kind == "ivfpq" and plan.pq_m == 64 and plan.bytes_per_vector == 64 + 8
    assert make_plan(100_000, 512, IndexConfig()).factory == "HNSW32"


@pytest.mark.parametrize("n,approximate,expected", [
    (200, "hnsw", faiss.IndexFlat),
    (1000, "hnsw", faiss.IndexHNSWFlat),
    (1000, "ivf", faiss.IndexIVFFlat),
    (3500, "hnsw", faiss.IndexIVFPQ),
])
def test_built_index_type_follows_the_size(n, approximate, expected):
    x = rand(n, 32, seed=n)
    ix = VectorIndex(IndexConfig(**SMALL, approximate=approximate, pq_bytes=4, pq_nbits=4)).build(x)
    assert isinstance(faiss.downcast_index(ix._index), expected)
    assert ix.info()["count"] == n and len(ix) == n


# -- approximate recall -------------------------------------------------------------------------

@pytest.mark.parametrize("approximate", ["hnsw", "ivf"])
def test_approximate_recall_at_10_on_clustered_set(clustered, approximate):
    x, queries = clustered
    ix = VectorIndex(IndexConfig(**SMALL | {"compressed_above": 10_000}, approximate=approximate)).build(x)
    assert ix.kind == approximate
    r = ix.recall_at_k(queries, 10)
    assert r >= 0.9
    assert ix.info()["recall"]["recall"] == pytest.approx(r, abs=1e-4)
    assert ix.info()["recall"]["k"] == 10


def test_build_records_recall_and_ivfpq_needs_reference(clustered):
    x, queries = clustered
    ix = VectorIndex(IndexConfig(exact_below=300, compressed_above=1000, pq_bytes=8, pq_nbits=4,
                                 recall_queries=50, recall_k=10)).build(x)
    assert ix.kind == "ivfpq"
    rec = ix.info()["recall"]
    assert rec["k"] == 10 and rec["queries"] == 50 and 0.0 < rec["recall"] <= 1.0
    with pytest.raises(VectorIndexError, match="IVF-PQ stores compressed codes.*pass reference"):
        ix.recall_at_k(queries, 10)
    # reference as an iterable of chunks equals reference as one array
    r_arr = ix.recall_at_k(queries, 10, reference=x)
    r_chunks = ix.recall_at_k(queries, 10, reference=(x[s:s + 1000] for s in range(0, len(x), 1000)))
    assert r_arr == r_chunks
    with pytest.raises(VectorIndexError, match="reference has 3999 vectors, the index has 4000"):
        ix.recall_at_k(queries, 10, reference=x[:-1])


def test_ivfpq_reranks_exactly_from_attached_vectors(tmp_path, clustered, caplog):
    x, queries = clustered
    cfg = IndexConfig(exact_below=300, compressed_above=1000, pq_bytes=8, pq_nbits=4, rerank_factor=8)
    ix = VectorIndex(cfg).build(x)
    raw = ix.recall_at_k(queries, 10, reference=x)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=x.shape)
    mm[:] = x
    ix.attach_vectors(np.load(tmp_path / "x.npy", mmap_mode="r"))
    reranked = ix.recall_at_k(queries, 10, reference=x)
    assert raw < 0.8 and reranked >= 0.98 and ix.info()["rerank"]["attached"]  # 0.62 -> 0.99 here
    s, i = ix.search(queries[:3], 10)
    exact_s, exact_i = ix.exact_search(queries[:3], 10, reference=x)
    np.testing.assert_allclose(s[:, 0], exact_s[:, 0], rtol=1e-5)  # re-ranked scores are exact cosines
    with pytest.raises(VectorIndexError, match="attached vectors have 10 rows, the index has 4000"):
        ix.attach_vectors(x[:10])
    with caplog.at_level(logging.WARNING, logger="sae_cxr.index"):
        ix.add(x[:5])
    assert "re-ranking is off" in caplog.text and not ix.info()["rerank"]["attached"]


def test_recall_from_positions_hand_worked():
    approx = np.array([[0, 1, 2, 9], [5, -1, -1, -1]])
    exact = np.array([[0, 1, 2, 3], [5, 6, -1, -1]])
    # query 0: 3 of 4 found; query 1: 1 of its 2 exact neighbours (index smaller than k) found
    assert recall_from_positions(approx, exact) == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert recall_from_positions(exact, exact) == 1.0


def test_recall_at_k_pinned_on_an_index_that_returns_a_known_subset():
    x = rand(50, 8, seed=4)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)

    class BestThreeThenWorstTwo(VectorIndex):
        """Returns the true best 3 of 5, then the 2 farthest vectors: recall@5 is 3/5 exactly."""

        def _raw_search(self, q, k):
            order = np.argsort(-(q @ xn.T), axis=1)
            pos = np.concatenate([order[:, :3], order[:, -2:]], axis=1)
            return np.take_along_axis(q @ xn.T, pos, axis=1), pos

    ix = BestThreeThenWorstTwo(IndexConfig()).build(x)
    assert ix.recall_at_k(rand(6, 8, seed=5), 5) == pytest.approx(0.6)
    assert ix.info()["recall"]["recall"] == pytest.approx(0.6)
    assert ix.info()["recall"]["queries"] == 6


# -- sharding, chunked builds -------------------------------------------------------------------

def test_sharded_index_returns_the_same_top_k_as_exact():
    x = rand(900, 24, seed=5)
    q = rand(20, 24, seed=6)
    exact_s, exact_i = VectorIndex().build(x).search(q, 10)
    flat3 = VectorIndex(IndexConfig(shards=3)).build(x)
    assert isinstance(flat3._index, faiss.IndexShards) and flat3.info()["shards"] == 3
    s, i = flat3.search(q, 10)
    np.testing.assert_array_equal(i, exact_i)
    np.testing.assert_allclose(s, exact_s, rtol=1e-5)
    # IVF shards share one quantizer; probing every list is exhaustive, hence exact
    ivf = VectorIndex(IndexConfig(**SMALL, approximate="ivf", shards=2, nlist=8, nprobe=8)).build(x)
    assert ivf.kind == "ivf"
    s, i = ivf.search(q, 10)
    np.testing.assert_array_equal(i, exact_i)


def test_max_shard_bytes_splits_by_size_and_search_stays_exact():
    """An index beyond one machine's budget becomes IndexShards, each shard within the budget."""
    x = rand(1000, 16, seed=7)
    q = rand(15, 16, seed=8)
    _, exact_i = VectorIndex().build(x).search(q, 10)
    per_vector = 4 * 16 + 8  # float32 vector + the IDMap's int64 id
    cfg = IndexConfig(max_shard_bytes=400 * per_vector)
    plan = make_plan(1000, 16, cfg)
    assert plan.kind == "flat" and plan.shards == 3 and plan.shard_bytes() <= cfg.max_shard_bytes
    assert "3 shards" in plan.reason
    ix = VectorIndex(cfg).build(x)
    assert ix.info()["shards"] == 3
    np.testing.assert_array_equal(ix.search(q, 10)[1], exact_i)
    # a budget that fits everything keeps one shard; one below the fixed part is refused
    assert make_plan(1000, 16, IndexConfig(max_shard_bytes=10**9)).shards == 1
    with pytest.raises(VectorIndexError, match="fixed part"):
        make_plan(5000, 32, IndexConfig(**SMALL, nlist=64, max_shard_bytes=1000))


def test_sharded_ivfpq_by_size_records_its_recall_against_exact(clustered):
    x, queries = clustered
    cfg = IndexConfig(exact_below=300, compressed_above=3000, nlist=16, nprobe=16, pq_bytes=8,
                      recall_queries=50, recall_k=10, max_shard_bytes=60_000, rerank_factor=0)
    ix = VectorIndex(cfg).build(x)
    info = ix.info()
    assert info["kind"] == "ivfpq" and info["shards"] >= 2
    assert info["memory_bytes"] / info["shards"] <= cfg.max_shard_bytes * 1.01
    assert 0.3 < info["recall"]["recall"] <= 1.0 and info["recall"]["queries"] == 50
    assert ix.recall_at_k(queries, 10, reference=x) > 0.3


def test_chunked_add_equals_one_shot_build_for_flat():
    x = rand(1000, 16, seed=7)
    ids = np.arange(1000, dtype=np.int64) * 10 + 3
    one = VectorIndex().build(x, ids)
    chunked = VectorIndex(IndexConfig(add_batch=64)).prepare(16, expected_count=1000)
    for s, e in ((0, 1), (1, 350), (350, 1000)):
        chunked.add(x[s:e], ids[s:e])
    q = rand(7, 16, seed=8)
    s1, i1 = one.search(q, 12)
    s2, i2 = chunked.search(q, 12)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(chunked.ids(), ids)


def test_ivf_trains_on_a_sample_then_adds_chunks_from_a_memmap(tmp_path, clustered):
    x, queries = clustered
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=x.shape)
    mm[:] = x
    mm.flush()
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    cfg = IndexConfig(**SMALL | {"compressed_above": 10_000}, approximate="ivf", add_batch=512)
    ix = VectorIndex(cfg).prepare(32, expected_count=len(mm), train_vectors=mm[:1500])
    assert ix.plan is not None and ix.plan.train_size == min(4000, 64 * ix.plan.nlist)
    for s in range(0, len(mm), 1000):
        ix.add(mm[s:s + 1000])
    ref = VectorIndex(cfg).build(np.asarray(mm))
    assert len(ix) == len(ref) == 4000
    assert ix.recall_at_k(queries, 10) >= 0.9


# -- ids ----------------------------------------------------------------------------------------

def test_ids_map_back_for_int_and_str_and_missing_results_are_marked():
    x = rand(400, 8, seed=9)
    ints = VectorIndex().build(x, np.arange(400) + 1_000_000)
    _, i = ints.search(x[5], 1)
    assert i.dtype == np.int64 and i[0, 0] == 1_000_005
    # an IVF probing one list of many finds fewer than k: -1 / None pads the rest
    cfg = IndexConfig(exact_below=10, approximate="ivf", nlist=8, nprobe=1, recall_queries=0)
    strs = VectorIndex(cfg).build(x, [f"p{j}" for j in range(400)])
    s, i = strs.search(x[:3], 399)
    assert i.dtype == object and None in i[0].tolist()
    assert all(v is None or v.startswith("p") for v in i.ravel())
    assert np.isneginf(s[i == None]).all()  # noqa: E711 (elementwise comparison)


# -- persistence --------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg,ids", [
    (IndexConfig(), "str"),
    (IndexConfig(**SMALL, hnsw_m=8), "int"),
    (IndexConfig(**SMALL, approximate="ivf", shards=2), "str"),
    (IndexConfig(**SMALL | {"compressed_above": 500}, pq_bytes=4, pq_nbits=4), None),
])
def test_save_load_round_trip_returns_identical_results(tmp_path, clustered, cfg, ids):
    x, queries = clustered
    x = x[:1500]
    id_list = {"str": [f"study/{j}.jpg" for j in range(len(x))], "int": np.arange(len(x)) * 7, None: None}[ids]
    ix = VectorIndex(cfg).build(x, id_list)
    ix.recall_at_k(queries, 5, reference=x)
    s, i = ix.search(queries, 8)
    files = ix.save(tmp_path / "images.faiss")
    side = tmp_path / "images.faiss.json"
    assert side in files and all(f.exists() for f in files)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    meta = json.loads(side.read_text())
    assert meta["kind"] == ix.kind and meta["count"] == 1500 and meta["dim"] == 32
    assert meta["normalized"] is True and meta["config"]["shards"] == cfg.shards
    back = VectorIndex.load(tmp_path / "images.faiss", verify=True)
    s2, i2 = back.search(queries, 8)
    np.testing.assert_array_equal(i2, i)
    np.testing.assert_array_equal(s2, s)
    assert back.info()["recall"] == ix.info()["recall"]
    assert back.info()["plan"] == ix.info()["plan"]
    got_ids = back.ids()
    assert (list(got_ids) == list(id_list)) if id_list is not None else (got_ids == np.arange(1500)).all()
    VectorIndex.load(side)  # the sidecar path works too


def test_resave_with_other_shard_count_leaves_only_listed_files(tmp_path):
    x = rand(300, 8)
    VectorIndex(IndexConfig(shards=3)).build(x).save(tmp_path / "p.faiss")
    assert len(list(tmp_path.glob("p.shard*-of-3.faiss"))) == 3
    VectorIndex().build(x).save(tmp_path / "p.faiss")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.faiss", "p.faiss.json"]


def test_load_detects_missing_or_mismatched_files(tmp_path):
    x = rand(300, 8)
    VectorIndex().build(x).save(tmp_path / "a.faiss")
    with pytest.raises(VectorIndexError, match="b.faiss.json not found"):
        VectorIndex.load(tmp_path / "b.faiss")
    with open(tmp_path / "a.faiss", "ab") as f:
        f.write(b"junk")
    with pytest.raises(VectorIndexError, match="does not match its sidecar"):
        VectorIndex.load(tmp_path / "a.faiss")
    with pytest.raises(VectorIndexError, match="must end in .faiss"):
        VectorIndex().build(x).save(tmp_path / "a.index")


# -- errors -------------------------------------------------------------------------------------

def test_errors_have_actionable_messages(caplog):
    x = rand(100, 512)
    ix = VectorIndex().build(x)
    with pytest.raises(VectorIndexError, match=r"^query has 256 dims, index has 512$"):
        ix.search(rand(2, 256), 5)
    with pytest.raises(VectorIndexError, match=r"vectors have 256 dims, index has 512"):
        ix.add(rand(2, 256))
    bad = rand(10, 512)
    bad[3, 0] = np.nan
    bad[7, 5] = np.inf
    with pytest.raises(VectorIndexError, match=r"NaN or inf in 2 row\(s\) \[3, 7\]"):
        VectorIndex().build(bad)
    with pytest.raises(VectorIndexError, match=r"NaN or inf in 2 row\(s\) \[3, 7\]"):
        ix.add(bad)
    assert len(ix) == 100  # a rejected add leaves the index as it was
    with pytest.raises(VectorIndexError, match=r"queries contain NaN or inf in 1 row\(s\) \[3\]"):
        ix.search(bad[:4], 5)
    zero = rand(5, 512)
    zero[2] = 0
    with pytest.raises(VectorIndexError, match=r"zero norm in 1 row\(s\) \[2\]"):
        VectorIndex().build(zero)
    with pytest.raises(VectorIndexError, match="cannot build an index from 0 vectors"):
        VectorIndex().build(np.zeros((0, 512), np.float32))
    empty = VectorIndex().prepare(512, expected_count=10)
    with pytest.raises(VectorIndexError, match="the index is empty"):
        empty.search(x[0], 3)
    with pytest.raises(VectorIndexError, match="index not prepared"):
        VectorIndex().add(x)
    with pytest.raises(VectorIndexError, match="needs training: pass train_vectors"):
        VectorIndex(IndexConfig(**SMALL, approximate="ivf")).prepare(512, expected_count=1000)
    with pytest.raises(VectorIndexError, match="got 100 vectors but 99 ids"):
        VectorIndex().build(x, list(range(99)))
    with pytest.raises(VectorIndexError, match="ids must be unique: 'a' appears more than once"):
        VectorIndex().build(x[:3], ["a", "b", "a"])
    with pytest.raises(VectorIndexError, match="this index was built without ids"):
        ix.add(x[:2], ["x", "y"])
    with pytest.raises(VectorIndexError, match="k must be a positive integer"):
        ix.search(x[0], 0)
    with pytest.raises(VectorIndexError, match="metric must be 'ip' or 'l2'"):
        IndexConfig(metric="cosine")
    with caplog.at_level(logging.WARNING, logger="sae_cxr.index"):
        s, i = ix.search(x[:2], 500)
    assert s.shape == (2, 100) and "k=500 is larger than the index (100 vectors)" in caplog.text
    strs = VectorIndex().build(x[:3], ["a", "b", "c"])
    with pytest.raises(VectorIndexError, match="id 'b' is already in the index"):
        strs.add(x[3:5], ["d", "b"])
    with pytest.raises(VectorIndexError, match="this index has str ids"):
        strs.add(x[3:5])


# -- threads and GPU ----------------------------------------------------------------------------

def test_small_query_batches_run_single_threaded_and_restore_the_setting(monkeypatch):
    seen = []
    ix = VectorIndex(IndexConfig(single_query_threads=1, small_batch=4)).build(rand(200, 8))
    real = ix._index

    class Spy:
        def search(self, q, k):
            seen.append(faiss.omp_get_max_threads())
            return real.search(q, k)

    ix._index = Spy()
    faiss.omp_set_num_threads(2)
    ix.search(rand(1, 8), 3)
    ix.search(rand(50, 8), 3)
    assert seen == [1, 2]
    assert faiss.omp_get_max_threads() == 2


@pytest.fixture()
def fake_gpu(monkeypatch):
    """faiss with one pretend GPU: 'GPU' copies are CPU clones, so the GPU code path runs here."""
    calls = {"to_gpu": 0, "to_cpu": 0, "all_gpus": 0}

    def to_gpu(res, device, index, co=None):
        calls["to_gpu"] += 1
        return faiss.clone_index(index)

    def to_cpu(index):
        calls["to_cpu"] += 1
        return faiss.clone_index(index)

    def all_gpus(index, co=None, ngpu=-1):
        calls["all_gpus"] += 1
        return index

    class Options:
        useFloat16 = False
        shard = False

    monkeypatch.setattr(vi.faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(vi.faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(vi.faiss, "GpuClonerOptions", Options, raising=False)
    monkeypatch.setattr(vi.faiss, "GpuMultipleClonerOptions", Options, raising=False)
    monkeypatch.setattr(vi.faiss, "GpuParameterSpace", faiss.ParameterSpace, raising=False)
    monkeypatch.setattr(vi.faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    monkeypatch.setattr(vi.faiss, "index_gpu_to_cpu", to_cpu, raising=False)
    monkeypatch.setattr(vi.faiss, "index_cpu_to_all_gpus", all_gpus, raising=False)
    return calls


def test_gpu_path_builds_on_gpu_and_saves_the_cpu_version(tmp_path, fake_gpu, clustered):
    x, queries = clustered
    ix = VectorIndex(IndexConfig(**SMALL | {"compressed_above": 10_000})).build(x)
    assert ix.kind == "ivf"  # approximate="auto" picks IVF when the index goes to a GPU
    assert ix.info()["device"] == "gpu"
    assert fake_gpu["all_gpus"] == 1 and fake_gpu["to_gpu"] == 1  # k-means on GPU, index moved
    s, i = ix.search(queries, 5)
    ix.save(tmp_path / "g.faiss")
    assert fake_gpu["to_cpu"] == 1
    cpu = VectorIndex.load(tmp_path / "g.faiss", use_gpu="never")
    assert cpu.info()["device"] == "cpu"
    s2, i2 = cpu.search(queries, 5)
    np.testing.assert_array_equal(i2, i)
    hnsw = VectorIndex(IndexConfig(**SMALL | {"compressed_above": 10_000}, approximate="hnsw")).build(x[:500])
    assert hnsw.info()["device"] == "cpu" and "no FAISS GPU implementation" in hnsw.info()["notes"][0]


def test_use_gpu_always_without_a_gpu_fails_clearly():
    if vi.gpu_count() > 0:
        pytest.skip("this machine has a GPU")
    with pytest.raises(VectorIndexError, match="use_gpu='always' but FAISS sees no GPU"):
        VectorIndex(IndexConfig(use_gpu="always")).build(rand(10, 4))
