"""One record type for every image source, and the data set that holds them.

A record loads its image lazily: a data set of 377k MIMIC-CXR records costs the memory of its
metadata, not of its pixels. Images are always returned in one convention (see `images.py`):
float32, shape [H, W], values in [0, 1], brighter = denser (bone white, air black).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from sae_cxr.findings import CONCEPT_NAMES, FINDINGS

SPLITS: tuple[str, ...] = ("train", "val", "test", "test_shifted")


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixels of the record's original image."""

    label: str  # a concept name (phantom) or a source label (NIH "Cardiomegaly", RSNA "Lung Opacity")
    x: float
    y: float
    w: float
    h: float

    def __post_init__(self) -> None:
        if not all(math.isfinite(v) for v in (self.x, self.y, self.w, self.h)):
            raise ValueError(f"box {self.label!r} has a non-finite coordinate: {self}")
        if self.w < 0 or self.h < 0:
            raise ValueError(f"box {self.label!r} has a negative size: w={self.w}, h={self.h}")

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "x": self.x, "y": self.y, "w": self.w, "h": self.h}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Box":
        return cls(str(d["label"]), float(d["x"]), float(d["y"]), float(d["w"]), float(d["h"]))


ImageLoader = Callable[[], np.ndarray]


@dataclass
class Record:
    """One image with everything known about it.

    `labels` holds one value per finding in FINDINGS order: 1.0 positive, 0.0 negative, NaN
    unknown (not mentioned, or uncertain under the `ignore` policy). `uncertain` marks the
    findings that the source reported as uncertain, whatever policy mapped them.
    """

    id: str
    split: str
    labels: np.ndarray
    loader: ImageLoader | None = field(default=None, repr=False, compare=False)
    path: str | None = None
    uncertain: np.ndarray | None = None
    concepts: tuple[str, ...] = ()
    boxes: tuple[Box, ...] = ()
    report: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.float32)
        if self.labels.shape != (len(FINDINGS),):
            raise ValueError(f"record {self.id}: labels must have {len(FINDINGS)} values "
                             f"({', '.join(FINDINGS)}), got shape {self.labels.shape}")
        bad = ~np.isnan(self.labels) & (self.labels != 0) & (self.labels != 1)
        if bad.any():
            raise ValueError(f"record {self.id}: labels must be 0, 1 or NaN, got {self.labels.tolist()}")
        if self.uncertain is None:
            self.uncertain = np.zeros(len(FINDINGS), dtype=bool)
        else:
            self.uncertain = np.asarray(self.uncertain, dtype=bool)
        if self.split not in SPLITS:
            raise ValueError(f"record {self.id}: split {self.split!r} is not one of {', '.join(SPLITS)}")

    def load_image(self) -> np.ndarray:
        """The image as float32 [H, W] in [0, 1]."""
        if self.loader is not None:
            return self.loader()
        if self.path is None:
            raise ValueError(f"record {self.id} has neither an image path nor a loader")
        from sae_cxr.data.images import load_image

        return load_image(self.path)

    def label_dict(self) -> dict[str, float]:
        return {f: float(v) for f, v in zip(FINDINGS, self.labels)}

    def to_row(self) -> dict[str, Any]:
        """A flat, JSON-friendly row: what the run directory stores about a record."""
        row: dict[str, Any] = {"id": self.id, "split": self.split, "path": self.path or ""}
        for f, v, u in zip(FINDINGS, self.labels, self.uncertain):
            row[f] = float(v)
            row[f"{f} (uncertain)"] = bool(u)
        row["concepts"] = json.dumps(list(self.concepts))
        row["boxes"] = json.dumps([b.to_dict() for b in self.boxes])
        row["report"] = self.report
        row["meta"] = json.dumps(self.meta, default=_json_default, sort_keys=True)
        return row


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot store {type(obj).__name__} in record metadata")


def record_from_row(row: dict[str, Any], loader: ImageLoader | None = None) -> Record:
    """Inverse of `Record.to_row`."""
    labels = np.array([row[f] for f in FINDINGS], dtype=np.float32)
    uncertain = np.array([bool(row.get(f"{f} (uncertain)", False)) for f in FINDINGS])
    return Record(
        id=str(row["id"]), split=str(row["split"]), labels=labels, uncertain=uncertain,
        loader=loader, path=(str(row["path"]) or None) if row.get("path") is not None else None,
        concepts=tuple(json.loads(row["concepts"])) if row.get("concepts") else (),
        boxes=tuple(Box.from_dict(b) for b in json.loads(row["boxes"])) if row.get("boxes") else (),
        report=str(row.get("report") or ""), meta=json.loads(row["meta"]) if row.get("meta") else {},
    )


@dataclass
class SkippedItem:
    """An input that `--skip-bad` left out, and why."""

    source: str  # e.g. "scans.csv row 17"
    path: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"source": self.source, "path": self.path, "reason": self.reason}


class DataSet(Sequence[Record]):
    """An ordered collection of records from one source, with the spec that reopens it.

    `spec` is a JSON-able dict (`{"kind": "phantom", ...}`, `{"kind": "folder", ...}`) stored in
    the run manifest, so later stages and the dashboard can reload images without the CLI flags.
    """

    def __init__(self, records: Iterable[Record], spec: dict[str, Any], name: str | None = None,
                 skipped: Sequence[SkippedItem] = ()):
        self.records: list[Record] = list(records)
        self.spec = dict(spec)
        self.name = name or str(spec.get("kind", "dataset"))
        self.skipped: list[SkippedItem] = list(skipped)
        dup = [k for k, n in Counter(r.id for r in self.records).items() if n > 1]
        if dup:
            raise ValueError(f"data set {self.name!r} has duplicate record ids, e.g. {dup[:5]}; "
                             "ids must be unique")
        self._index = {r.id: i for i, r in enumerate(self.records)}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return self.records[i]
        return self.records[i]

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def by_id(self, record_id: str) -> Record:
        try:
            return self.records[self._index[record_id]]
        except KeyError:
            raise KeyError(f"no record with id {record_id!r} in data set {self.name!r}") from None

    def split(self, name: str) -> list[Record]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return [r for r in self.records if r.split == name]

    def split_counts(self) -> dict[str, int]:
        counts = Counter(r.split for r in self.records)
        return {s: counts.get(s, 0) for s in SPLITS}

    def require_split(self, name: str) -> list[Record]:
        recs = self.split(name)
        if not recs:
            raise ValueError(f"split {name!r} of data set {self.name!r} is empty "
                             f"(splits present: {self.split_counts()})")
        return recs

    def labels(self) -> np.ndarray:
        """[N, 5] labels in record order."""
        if not self.records:
            return np.zeros((0, len(FINDINGS)), dtype=np.float32)
        return np.stack([r.labels for r in self.records])

    def concept_truth(self) -> np.ndarray:
        """[N, 18] 1.0 where the record carries the planted concept (CONCEPT_NAMES order), in record order."""
        return np.array([[c in r.concepts for c in CONCEPT_NAMES] for r in self.records],
                        dtype=np.float64).reshape(len(self.records), len(CONCEPT_NAMES))
