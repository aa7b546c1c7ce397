"""The data stage: load (or generate) the images and store what is known about them.

Writes `records.parquet` (one row per record) and the data set spec in the manifest, so every
later stage, the reports and the dashboard reopen the same images without the CLI flags. A
phantom world is written to `data/` as PNGs plus metadata.csv and read back through the
folder+CSV adapter: the demo runs the same path a user's own folder of images does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd

from sae_cxr.config import DataConfig
from sae_cxr.data import open_dataset
from sae_cxr.data.base import DataSet, Record, record_from_row
from sae_cxr.findings import FINDINGS
from sae_cxr.run import RECORDS, RunDir, atomic_path

PHANTOM_DIR = "data"
SKIPPED = "data/skipped.json"


def load_dataset(cfg: DataConfig, run: RunDir | None = None, workers: int | None = None) -> DataSet:
    """Build the data set a DataConfig describes (generating a phantom world into the run if needed)."""
    if cfg.source == "phantom":
        from sae_cxr.data.folder import load_folder
        from sae_cxr.data.phantom import PhantomWorld, export_folder

        if run is None:
            return PhantomWorld(cfg.phantom).dataset()
        world = PhantomWorld(cfg.phantom)
        csv_path = export_folder(world, run.sub(PHANTOM_DIR), workers=workers or min(2, os.cpu_count() or 1))
        return load_folder(csv_path)
    if cfg.path is None:
        raise ValueError(f"data source {cfg.source!r} needs a path (data.path in the config, --data on the CLI)")
    if cfg.source == "folder":
        from sae_cxr.data.folder import load_folder

        return load_folder(cfg.path, cfg.options.get("image_root"), uncertainty=cfg.uncertainty,
                           skip_bad=cfg.skip_bad, decode_images=bool(cfg.options.get("decode_images", False)))
    spec = {"kind": cfg.source, "path": cfg.path, "uncertainty": cfg.uncertainty, "skip_bad": cfg.skip_bad,
            **cfg.options}
    return open_dataset(spec)


def ingest(run: RunDir, cfg: DataConfig, seed: int = 0) -> tuple[list[str], dict[str, Any]]:
    ds = load_dataset(cfg, run)
    if cfg.source == "phantom":  # the images live inside the run: store paths relative to it (relocatable)
        for r in ds.records:
            r.path = run.rel(r.path) if r.path else r.path
        ds.spec = {"kind": "folder", "csv": f"{PHANTOM_DIR}/metadata.csv", "image_root": PHANTOM_DIR,
                   "uncertainty": "ignore", "skip_bad": False, "relative_to_run": True,
                   "phantom": cfg.phantom.to_dict()}
    write_records(run, ds)
    outputs = [RECORDS]
    if cfg.source == "phantom":
        outputs.append(PHANTOM_DIR)
    if ds.skipped:
        with atomic_path(run.sub(SKIPPED)) as tmp:
            tmp.write_text(json.dumps([s.to_dict() for s in ds.skipped], indent=2))
        if SKIPPED not in outputs and PHANTOM_DIR not in outputs:
            outputs.append(SKIPPED)
    run.update_manifest(dataset=ds.spec)
    summary = {"records": len(ds), "splits": ds.split_counts(), "unreadable_skipped": len(ds.skipped), "source": cfg.source}
    return outputs, summary


def write_records(run: RunDir, ds: DataSet) -> Path:
    df = pd.DataFrame([r.to_row() for r in ds])
    path = run.sub(RECORDS)
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return path


def read_records_table(run: RunDir) -> pd.DataFrame:
    run.require("data")
    return run.load_verified(RECORDS, pd.read_parquet)


@dataclass
class RecordIndex:
    """The columns a batch stage needs for every record (id, split, the five labels) read straight from
    records.parquet, without building Record objects (boxes, reports, metadata, image loaders): at 100k
    images a few MB instead of hundreds."""

    ids: np.ndarray  # [N] object (str)
    splits: np.ndarray  # [N] object (str)
    labels: np.ndarray  # [N, C] float32 in FINDINGS order, NaN where unknown

    def __post_init__(self) -> None:
        if not (len(self.ids) == len(self.splits) == len(self.labels)):
            raise ValueError("ids, splits and labels must have one row per record")

    def __len__(self) -> int:
        return len(self.ids)

    def split_counts(self) -> dict[str, int]:
        values, counts = np.unique(self.splits.astype(str), return_counts=True)
        return {str(v): int(c) for v, c in zip(values, counts)}


def record_index(run: RunDir) -> RecordIndex:
    """The run's RecordIndex (same row order as open_run_dataset)."""
    run.require("data")
    cols = ["id", "split", *FINDINGS]
    df = run.load_verified(RECORDS, lambda p: pd.read_parquet(p, columns=cols))
    return RecordIndex(ids=df["id"].astype(str).to_numpy(dtype=object), splits=df["split"].astype(str).to_numpy(dtype=object),
                       labels=df[list(FINDINGS)].to_numpy(dtype=np.float32))


def open_run_dataset(run: RunDir) -> DataSet:
    """The run's data set: records from records.parquet, images through the stored spec."""
    spec = _dataset_spec(run)
    df = read_records_table(run)
    loaders = _loaders_for(spec, df)
    return DataSet(_records_from_df(run, spec, df, lambda i, rid: loaders.get(rid)), spec=spec)


def _dataset_spec(run: RunDir) -> dict[str, Any]:
    spec = run.manifest().get("dataset")
    if not spec:
        raise ValueError(f"run {run.path} has no data set yet; run the data stage first")
    return spec


def _records_from_df(run: RunDir, spec: dict[str, Any], df: pd.DataFrame, loader: Callable[[int, str], Any],
                     offset: int = 0) -> list[Record]:
    """Records for the rows of `df` (rows offset, offset + 1, ... of records.parquet)."""
    records = [record_from_row(row, loader(offset + i, str(row["id"]))) for i, row in enumerate(df.to_dict("records"))]
    if spec.get("relative_to_run"):
        for r in records:
            if r.path and not os.path.isabs(r.path):
                r.path = str(run.path / r.path)
    return records


def _loaders_for(spec: dict[str, Any], df: pd.DataFrame | None = None) -> dict[str, Any]:
    """Lazy loaders for records that have no image file (an in-memory phantom world).

    This regenerates the whole phantom world (its cases, not its pixels): memory grows with the number
    of records. Runs made by the data stage store their phantom images as files, so this path is only
    taken for data sets opened from an in-memory spec."""
    if spec.get("kind") != "phantom":
        return {}
    return {r.id: r.loader for r in open_dataset(spec)}


class RunRecords:
    """The run's records read lazily from records.parquet: ids and splits of every record up front
    (a RecordIndex, a few MB at 100k images), Record objects only for the row ranges asked for, streamed
    from the file in chunks (`iter_ranges`). What extraction uses, so its memory is bounded by a shard,
    not by the data set; the records are the ones `open_run_dataset` builds, row for row.

    `loader(row, id)` overrides where pixels come from (default: the stored spec, as open_run_dataset).
    A spec of kind "phantom" (images regenerated in memory, no files) builds the whole world's loaders
    on first use: that path is correct but not memory-bounded."""

    def __init__(self, run: RunDir, loader: Callable[[int, str], Any] | None = None, chunk_rows: int = 4096):
        self.run = run
        self.spec = _dataset_spec(run)
        self.index = record_index(run)
        self.chunk_rows = chunk_rows
        self._loader = loader
        self._loaders: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.index)

    @property
    def ids(self) -> np.ndarray:
        return self.index.ids

    @property
    def splits(self) -> np.ndarray:
        return self.index.splits

    def _loader_fn(self) -> Callable[[int, str], Any]:
        if self._loader is not None:
            return self._loader
        if self._loaders is None:
            self._loaders = _loaders_for(self.spec)
        loaders = self._loaders
        return lambda i, rid: loaders.get(rid)

    def iter_ranges(self, ranges: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int, list[Record]]]:
        """(start, stop, records) for each [start, stop) of `ranges` (ascending, not overlapping), reading
        records.parquet once from the front and holding at most one range plus one chunk of rows."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        ranges = [(int(s), int(e)) for s, e in ranges]
        for (s0, e0), (s1, _) in zip(ranges, ranges[1:]):
            if s1 < e0:
                raise ValueError("iter_ranges needs ascending, non-overlapping ranges")
        if not ranges:
            return
        path, ident = self.run.verify_identity(RECORDS)
        loader = self._loader_fn()
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        batches = pf.iter_batches(batch_size=self.chunk_rows)
        buf: list[Any] = []  # record batches covering rows [buf_start, buf_stop)
        buf_start = buf_stop = 0
        try:
            for s, e in ranges:
                if not 0 <= s <= e <= len(self):
                    raise IndexError(f"rows [{s}, {e}) outside records.parquet's {len(self)} rows")
                while buf_stop < e:
                    b = next(batches)
                    buf.append(b)
                    buf_stop += b.num_rows
                while buf and buf_start + buf[0].num_rows <= s:  # rows before this range: not needed again
                    buf_start += buf.pop(0).num_rows
                table = pa.Table.from_batches(buf, schema=schema).slice(s - buf_start, e - s)
                df = table.to_pandas()
                if ident is not None:
                    self.run.check_unchanged(path, ident)
                yield s, e, _records_from_df(self.run, self.spec, df, loader, offset=s)
        finally:
            pf.close()
