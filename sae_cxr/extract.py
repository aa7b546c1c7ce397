"""Extraction: backbone -> cached embeddings (and patch tokens) in the run directory.

Layout (embeddings/):
    index.json                 backbone info, mode, dims, grid, shard list with row ranges
    shard-00000.safetensors    rows [start, stop) of records.parquet:
                                 image [n, D] f32, text [n, D] f32 (when reports and a text tower exist),
                                 valid [n] u8 (0 = image unreadable, skipped under --skip-bad),
                                 patches [n_p, P, D] f16 + patch_rows [n_p] i64 (rows that kept patch tokens)

Shards are written atomically, one at a time; each records the hash of the settings that made it,
so a killed extraction rerun keeps its finished shards and does only the rest. Memory is bounded
by the shard size and the batch size, never by the data set.

Under torchrun (sae_cxr.distributed) the shards still to do are divided among the ranks in
contiguous blocks; each rank writes its own shard files, and rank 0 writes index.json once every
rank has finished. A shard is the same record range with the same batches whichever rank embeds
it, so the files are the ones a single process writes.

Records come from `sae_cxr.ingest.RunRecords` (the pipeline's path): ids and splits of every record,
Record objects only for the shard being embedded, so not even the record list grows with the data set.
A plain list of Records is accepted too (tests, callers that hold one).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sae_cxr.backbones.base import Backbone, Preprocessor, load_backbone
from sae_cxr.data.base import Record
from sae_cxr.data.images import ImageReadError
from sae_cxr.progress import progress_bar
from sae_cxr.run import RunDir, atomic_path, sha256_json, write_json_atomic

log = logging.getLogger("sae_cxr.extract")

EMB_DIR = "embeddings"
INDEX = "embeddings/index.json"
PATCH_SPLITS = {"all": None, "eval": ("test", "test_shifted"), "none": ()}


@dataclass
class ExtractConfig:
    """How images become classifier inputs."""

    backbone: str = "phantom"
    """phantom | biomedclip | hf-hub:ORG/REPO | local-dir:PATH | an open_clip MODEL/PRETRAINED pair."""
    mode: str = "image"
    """image: x is the image embedding; multimodal: x = [image embedding, report embedding] (CXR-LanIC)."""
    patches: str = "eval"
    """Which records keep patch tokens (float16): all | eval (test and test_shifted) | none.
    Maps for other images are computed on demand from the image."""
    batch_size: int = 64
    shard_size: int = 4096
    """Records per shard file: the unit of resume and of memory."""
    num_workers: int = -1
    """DataLoader processes decoding images; -1 = one per core up to 4, 0 = in the main process."""
    device: str = "auto"
    """auto picks CUDA when present (with bf16 autocast), else the CPU."""

    def __post_init__(self) -> None:
        if self.mode not in ("image", "multimodal"):
            raise ValueError(f"extract mode must be 'image' or 'multimodal', got {self.mode!r}")
        if self.patches not in PATCH_SPLITS:
            raise ValueError(f"extract patches must be one of {sorted(PATCH_SPLITS)}, got {self.patches!r}")
        if self.batch_size < 1 or self.shard_size < 1:
            raise ValueError("batch_size and shard_size must be positive")


def resolve_device(name: str) -> torch.device:
    """auto = CUDA when present; under torchrun each rank on a machine gets its own GPU (LOCAL_RANK)."""
    from sae_cxr import distributed as dist

    return dist.device(name)


class _ImageSet(Dataset):
    """Decodes and preprocesses records in DataLoader workers; unreadable images come back flagged."""

    def __init__(self, records: Sequence[Record], prep: Preprocessor, skip_bad: bool):
        self.records = records
        self.prep = prep
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool, str]:
        rec = self.records[i]
        try:
            pixels, _ = self.prep(rec.load_image())
            return pixels, True, ""
        except (ImageReadError, ValueError) as e:
            if not self.skip_bad:
                raise ImageReadError(rec.path or rec.id, f"record {rec.id}: {e}") from None
            S = self.prep.image_size
            return torch.zeros(3, S, S), False, str(e)


def _collate(batch):
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch]), [b[2] for b in batch]


class RecordSource(Protocol):
    """What extraction needs of the records: every id and split, and Record objects by row range."""

    ids: Sequence[str]
    splits: Sequence[str]

    def __len__(self) -> int: ...

    def iter_ranges(self, ranges: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int, Sequence[Record]]]: ...


class ListRecords:
    """A RecordSource over Records already in memory."""

    def __init__(self, records: Sequence[Record]):
        self.records = records
        self.ids = [r.id for r in records]
        self.splits = [r.split for r in records]

    def __len__(self) -> int:
        return len(self.records)

    def iter_ranges(self, ranges: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int, Sequence[Record]]]:
        for s, e in ranges:
            yield s, e, self.records[s:e]


def as_record_source(records: Sequence[Record] | RecordSource) -> RecordSource:
    return records if hasattr(records, "iter_ranges") else ListRecords(records)  # type: ignore[return-value]


@dataclass
class ShardTiming:
    decode_wait_s: float = 0.0  # time the model waited for decoded batches
    model_s: float = 0.0  # time in the backbone
    images: int = 0


def encode_records(backbone: Backbone, records: Sequence[Record], cfg: ExtractConfig, keep_patches: np.ndarray,
                   skip_bad: bool, bar=None, timing: ShardTiming | None = None) -> dict[str, np.ndarray]:
    """Embed `records` (a shard); returns the arrays of one shard file."""
    from sae_cxr import distributed as dist

    # ranks on one machine share its cores: split the decoding processes among them
    workers = cfg.num_workers if cfg.num_workers >= 0 else min(4, max(1, (os.cpu_count() or 1)
                                                                       // dist.local_world_size()))
    ds = _ImageSet(records, backbone.preprocessor, skip_bad)
    loader = DataLoader(ds, batch_size=cfg.batch_size, num_workers=workers, collate_fn=_collate,
                        persistent_workers=False, prefetch_factor=4 if workers else None)
    n, D = len(records), backbone.embed_dim
    image = np.zeros((n, D), dtype=np.float32)
    valid = np.zeros(n, dtype=np.uint8)
    patch_rows = np.flatnonzero(keep_patches)
    patches: np.ndarray | None = None
    patch_pos = {int(r): j for j, r in enumerate(patch_rows)}
    dev = backbone.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else _null()
    start = 0
    t_wait = time.perf_counter()
    for pixels, ok, _ in loader:
        t_model = time.perf_counter()
        if timing:
            timing.decode_wait_s += t_model - t_wait
        b = len(pixels)
        rows = np.arange(start, start + b)
        want = keep_patches[rows].any()
        with autocast:
            enc = backbone.encode_pixels(pixels.to(dev, non_blocking=True), with_patches=bool(want))
        image[rows] = enc.embedding.float().cpu().numpy()
        valid[rows] = ok.numpy().astype(np.uint8)
        if want and enc.patches is not None:
            if patches is None:
                patches = np.zeros((len(patch_rows), *enc.patches.shape[1:]), dtype=np.float16)
            p = enc.patches.float().cpu().numpy().astype(np.float16)
            for j, r in enumerate(rows):
                if keep_patches[r]:
                    patches[patch_pos[int(r)]] = p[j]
        start += b
        if bar is not None:
            bar.update(b)
        if timing:
            timing.model_s += time.perf_counter() - t_model
            timing.images += b
        t_wait = time.perf_counter()
    image[valid == 0] = 0.0
    _check_finite(image, valid, records, "image", skip_bad)
    out = {"image": image, "valid": valid}
    if backbone.has_text:
        reports = [r.report for r in records]
        text = np.zeros((n, D), dtype=np.float32)
        have = [i for i, t in enumerate(reports) if t.strip()]
        for s in range(0, len(have), 256):
            idx = have[s:s + 256]
            text[idx] = backbone.encode_texts([reports[i] for i in idx]).float().cpu().numpy()
        _check_finite(text, valid, records, "report", skip_bad)
        out["text"] = text
        out["has_text"] = np.array([1 if t.strip() else 0 for t in reports], dtype=np.uint8)
    if patches is not None:
        out["patches"] = patches
        out["patch_rows"] = patch_rows.astype(np.int64)
    return out


def _check_finite(emb: np.ndarray, valid: np.ndarray, records: Sequence[Record], what: str, skip_bad: bool) -> None:
    """NaN/Inf embeddings (a backbone overflowing in half precision, a degenerate image) enter here:
    name the records, or with skip_bad mark them unusable (valid = 0) and zero them, as for unreadable images."""
    bad = np.flatnonzero((valid == 1) & ~np.isfinite(emb).all(axis=1))
    if not len(bad):
        return
    ids = [records[i].id for i in bad[:10]]
    more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
    if not skip_bad:
        raise ValueError(f"the backbone returned NaN/Inf {what} embeddings for {len(bad)} record(s): "
                         f"{', '.join(ids)}{more}; check those images (or the backbone's precision), "
                         "or use --skip-bad to leave them out")
    log.warning("NaN/Inf %s embeddings for %d record(s), marked unusable: %s%s", what, len(bad), ", ".join(ids), more)
    valid[bad] = 0
    emb[bad] = 0.0


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def run_extract(run: RunDir, cfg: ExtractConfig, records: Sequence[Record] | RecordSource, skip_bad: bool = False,
                backbone: Backbone | None = None, progress: bool = True) -> tuple[list[str], dict[str, Any]]:
    """Write embeddings/ for `records` (in records.parquet order; a RunRecords or a list), resuming from
    finished shards.

    Under torchrun every rank calls this with the same arguments (see the module docstring)."""
    from safetensors.numpy import save_file

    from sae_cxr import distributed as dist

    if backbone is None:
        backbone = load_backbone(cfg.backbone, device=resolve_device(cfg.device))
    else:
        backbone.to(resolve_device(cfg.device))
    if cfg.mode == "multimodal" and not backbone.has_text:
        raise ValueError(f"multimodal mode needs a text tower; backbone {backbone.name} has none")
    info = backbone.info()
    source = as_record_source(records)
    ids = [str(i) for i in source.ids]
    settings = {"backbone": info, "mode": cfg.mode, "patches": cfg.patches, "ids": sha256_json(ids)}
    settings_hash = sha256_json(settings)
    keep_splits = PATCH_SPLITS[cfg.patches]
    keep = np.array([keep_splits is None or str(sp) in keep_splits for sp in source.splits], dtype=bool)
    out_dir = run.sub(EMB_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.glob(".shard-*.tmp"):  # a killed extraction's half-written shard, never renamed
        leftover.unlink(missing_ok=True)
    n = len(source)
    bounds = [(s, min(s + cfg.shard_size, n)) for s in range(0, n, cfg.shard_size)]
    names = [f"shard-{k:05d}.safetensors" for k in range(len(bounds))]
    # rank 0 decides which shards are still to do, so that all ranks divide the same list
    done = dist.on_main(lambda: [_shard_matches(out_dir / nm, settings_hash, s, e)
                                 for nm, (s, e) in zip(names, bounds)], what="checking finished shards")
    todo = [k for k, ok in enumerate(done) if not ok]
    mine = list(dist.shard(todo))
    reused = len(bounds) - len(todo)
    timing = ShardTiming()
    t0 = time.perf_counter()
    total = n if not dist.is_distributed() else sum(bounds[k][1] - bounds[k][0] for k in mine)
    with dist.all_ranks("extraction"):
        with progress_bar(total=total, desc=f"extract ({backbone.name})", unit="img", disable=not progress) as bar:
            if not dist.is_distributed():
                bar.update(sum(e - s for ok, (s, e) in zip(done, bounds) if ok))
            for k, (s, e, shard_records) in zip(mine, source.iter_ranges([bounds[k] for k in mine])):
                arrays = encode_records(backbone, shard_records, cfg, keep[s:e], skip_bad, bar, timing)
                del shard_records
                meta = {"settings": settings_hash, "start": str(s), "stop": str(e)}
                with atomic_path(out_dir / names[k]) as tmp:
                    save_file(arrays, str(tmp), metadata=meta)
    shards = [{"file": nm, "start": s, "stop": e} for nm, (s, e) in zip(names, bounds)]
    per_rank = dist.all_gather((timing.images, timing.decode_wait_s, timing.model_s))
    computed = sum(p[0] for p in per_rank)
    decode_wait = sum(p[1] for p in per_rank)
    model_s = sum(p[2] for p in per_rank)

    def finish() -> tuple[list[str], dict[str, Any]]:
        """Rank 0, after every rank wrote its shards: index.json, the unreadable list, the summary."""
        for stale in out_dir.glob("shard-*.safetensors"):
            if stale.name not in set(names):
                stale.unlink()
        grid = None
        if any(keep):
            enc = backbone.encode_images([np.zeros((32, 32), np.float32)], with_patches=True)
            grid = list(enc.grid)
        dim = backbone.embed_dim * (2 if cfg.mode == "multimodal" else 1)
        index = {"backbone": info, "mode": cfg.mode, "dim": dim, "embed_dim": backbone.embed_dim, "grid": grid,
                 "n": n, "shards": shards, "settings": settings_hash, "patches": cfg.patches}
        write_json_atomic(run.sub(INDEX), index)
        store = EmbeddingStore(run, verify=False)
        invalid = int((~store.valid).sum())
        seconds = time.perf_counter() - t0
        summary = {"images": n, "dim": dim, "backbone": info["name"], "mode": cfg.mode, "shards": len(shards),
                   "shards_reused": reused, "unreadable": invalid,
                   "images_per_s": round(computed / seconds, 1) if computed else None,
                   "decode_wait_share": round(decode_wait / max(decode_wait + model_s, 1e-9), 3)
                   if computed else None}
        if dist.is_distributed():
            summary["shards_per_rank"] = [len(dist.shard(todo, r)) for r in range(dist.world_size())]
        if invalid:
            bad = [ids[i] for i in np.flatnonzero(~store.valid)[:20]]
            write_json_atomic(run.sub("embeddings/unreadable.json"), {"count": invalid, "first_ids": bad})
        return [EMB_DIR], summary

    return dist.on_main(finish, what="writing embeddings/index.json")


def _shard_matches(path: Path, settings_hash: str, start: int, stop: int) -> bool:
    if not path.exists():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            m = f.metadata() or {}
            return m.get("settings") == settings_hash and m.get("start") == str(start) and m.get("stop") == str(stop)
    except Exception:  # a damaged shard is simply redone
        return False


class EmbeddingStore:
    """Read access to embeddings/: arrays for chosen rows, loading one shard at a time."""

    def __init__(self, run: RunDir, verify: bool = True):
        self.run = run
        idx_path = run.sub(INDEX)
        if not verify and not idx_path.exists():
            raise FileNotFoundError(f"{idx_path} not found: run `sae-cxr extract --run {run.path}` first")
        if verify:
            run.require("extract")
        self.index = run.load_verified(INDEX, _read_json) if verify else _read_json(idx_path)
        self.verify = verify
        self.n: int = self.index["n"]
        self.dim: int = self.index["dim"]
        self.embed_dim: int = self.index["embed_dim"]
        self.mode: str = self.index["mode"]
        self.grid: tuple[int, int] | None = tuple(self.index["grid"]) if self.index.get("grid") else None
        self.backbone_info: dict[str, Any] = self.index["backbone"]
        self._cache: dict[str, np.ndarray] = {}
        self._verified: dict[str, Path] = {}

    def _shard_path(self, sh: dict[str, Any]) -> Path:
        """The shard's path, its checksum verified once per store (not on every read)."""
        rel = f"{EMB_DIR}/{sh['file']}"
        if not self.verify:
            return self.run.sub(rel)
        if rel not in self._verified:
            self._verified[rel] = self.run.verify_identity(rel)
        return self._verified[rel][0]

    @contextlib.contextmanager
    def _open(self, sh: dict[str, Any]) -> Iterator[Any]:
        """safe_open on a shard; on leaving, check that it is still the file whose checksum was verified
        (a stage redone next to a reader replaces files: the reader must not mix old and new bytes)."""
        from safetensors import safe_open

        path = self._shard_path(sh)
        with safe_open(str(path), framework="np") as f:
            yield f
        self._check(sh)

    def _check(self, sh: dict[str, Any]) -> None:
        if self.verify:
            path, ident = self._verified[f"{EMB_DIR}/{sh['file']}"]
            if ident is not None:
                self.run.check_unchanged(path, ident)

    def _column(self, key: str) -> np.ndarray:
        if key not in self._cache:
            parts = []
            for sh in self.index["shards"]:
                with self._open(sh) as f:
                    if key not in f.keys():
                        raise KeyError(f"embeddings have no {key!r} array (backbone without text tower?)")
                    parts.append(f.get_tensor(key))
            self._cache[key] = np.concatenate(parts) if parts else np.zeros((0,))
        return self._cache[key]

    @property
    def valid(self) -> np.ndarray:
        return self._column("valid").astype(bool)

    def image(self, rows: np.ndarray | None = None) -> np.ndarray:
        a = self._column("image")
        return a if rows is None else a[rows]

    def text(self, rows: np.ndarray | None = None) -> np.ndarray:
        a = self._column("text")
        return a if rows is None else a[rows]

    @property
    def has_text(self) -> bool:
        try:
            self._column("text")
            return True
        except KeyError:
            return False

    def features(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The classifier input x: the image embedding, or [image, report] in multimodal mode."""
        if self.mode == "multimodal":
            return np.concatenate([self.image(rows), self.text(rows)], axis=1)
        return self.image(rows)

    def _shard_features(self, f: Any, local: np.ndarray) -> np.ndarray:
        x = f.get_tensor("image")[local]
        if self.mode == "multimodal":
            x = np.concatenate([x, f.get_tensor("text")[local]], axis=1)
        return x

    def iter_features(self, rows: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rows, x) batches for ascending `rows`, one shard in memory at a time and nothing cached:
        a pass over 100k images then holds a shard, not the data set (`features()` caches it all)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) > 1 and (np.diff(rows) <= 0).any():
            raise ValueError("iter_features needs strictly ascending rows")
        for sh in self.index["shards"]:
            lo, hi = np.searchsorted(rows, [sh["start"], sh["stop"]])
            if lo == hi:
                continue
            mine = rows[lo:hi]
            with self._open(sh) as f:
                x = self._shard_features(f, mine - sh["start"])
            for s in range(0, len(mine), batch_size):
                yield mine[s:s + batch_size], x[s:s + batch_size]

    def read_features(self, rows: Sequence[int]) -> np.ndarray:
        """Features of a few rows in the given order, read shard by shard without caching the column."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        for sh in self.index["shards"]:
            hit = np.flatnonzero((rows >= sh["start"]) & (rows < sh["stop"]))
            if len(hit):
                with self._open(sh) as f:
                    out[hit] = self._shard_features(f, rows[hit] - sh["start"])
        return out

    def patch_rows(self) -> np.ndarray:
        """Rows that have stored patch tokens."""
        out = []
        for sh in self.index["shards"]:
            with self._open(sh) as f:
                if "patch_rows" in f.keys():
                    out.append(f.get_tensor("patch_rows") + sh["start"])
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def patches(self, rows: Sequence[int]) -> np.ndarray:
        """Patch tokens [len(rows), P, D] float32 for rows that kept them (KeyError otherwise)."""
        rows = [int(r) for r in rows]
        out: list[np.ndarray | None] = [None] * len(rows)
        for sh in self.index["shards"]:
            want = [(j, r - sh["start"]) for j, r in enumerate(rows) if sh["start"] <= r < sh["stop"]]
            if not want:
                continue
            with self._open(sh) as f:
                if "patch_rows" not in f.keys():
                    raise KeyError(f"no patch tokens stored for rows {[rows[j] for j, _ in want][:5]}")
                local = f.get_tensor("patch_rows")
                pos = {int(v): i for i, v in enumerate(local)}
                sl = f.get_slice("patches")
                for j, lr in want:
                    if lr not in pos:
                        raise KeyError(f"no patch tokens stored for row {rows[j]}")
                    out[j] = sl[pos[lr]:pos[lr] + 1][0].astype(np.float32)
        return np.stack(out) if out else np.zeros((0,), np.float32)

    def iter_shards(self) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        """(start, stop, arrays) per shard: for passes over data too large to hold at once."""
        from safetensors.numpy import load_file

        for sh in self.index["shards"]:
            arrays = load_file(str(self._shard_path(sh)))
            self._check(sh)
            yield sh["start"], sh["stop"], arrays


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def config_dict(cfg: ExtractConfig) -> dict[str, Any]:
    return asdict(cfg)
