"""Read-only data access for the dashboard (app/): everything it shows comes through here.

The app only looks down at the package: these helpers call the stage modules' loaders
(`load_patterns`, `load_galleries`, `DecompositionReader`, `RunSearch`, ...) and never write into
a run. Two kinds of helpers:

- functions of a `RunDir` that return small tables and dicts (the app caches them per run with
  `st.cache_data`, keyed by the run path and the manifest's modification time);
- `RunModels`, the models, indices and readers of one run, loaded lazily and once (the app keeps
  one per run with `st.cache_resource`), with the computations that need them: decompositions of
  any image (stored, or computed for images outside the attributed splits and for uploads),
  spatial maps, gallery tiles and searches.

Uploaded images are decoded from memory and never written anywhere.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from sae_cxr.findings import CONCEPTS, FINDINGS, NUISANCE_CATEGORIES
from sae_cxr.run import MANIFEST, RunDir, check_run_name, list_runs

RUN_ENV = "SAE_CXR_RUN"
"""Environment variable naming the run the dashboard opens (like `--run`)."""
ARTIFACTS_ENV = "SAE_CXR_ARTIFACTS"
"""Environment variable naming the folder whose runs the sidebar picker lists (default ./artifacts)."""
MAX_UPLOAD_MB = 25
"""Uploads above this size are refused before decoding."""
TILE_PX = 224
"""Side of a rendered gallery tile, in pixels."""
STAGE_HINTS = {
    "data": "sae-cxr data", "extract": "sae-cxr extract", "train-classifier": "sae-cxr train-classifier",
    "train-transcoders": "sae-cxr train-transcoders", "patterns": "sae-cxr patterns",
    "galleries": "sae-cxr galleries", "attribute": "sae-cxr attribute", "label": "sae-cxr label",
    "explain": "sae-cxr explain",
}


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------
def run_stamp(path: str | os.PathLike) -> int:
    """The manifest's modification time (ns): part of every cache key, so a rerun stage is seen."""
    try:
        return (Path(path) / MANIFEST).stat().st_mtime_ns
    except OSError:
        return 0


def run_choices(root: str | os.PathLike) -> dict[str, Path]:
    """Run name -> resolved path for the runs directly under `root` whose names are valid run names
    and whose resolved directory is still inside `root` (a symlink out of it is left out)."""
    base = Path(root).resolve()
    out: dict[str, Path] = {}
    for p in list_runs(base):
        try:
            check_run_name(p.name)
        except ValueError:
            continue
        real = p.resolve()
        if real.parent == base:
            out[p.name] = real
    return out


def stage_done(run: RunDir, name: str) -> bool:
    s = run.stage(name)
    return s is not None and s.status == "done"


def missing_stage_message(run: RunDir, name: str) -> str:
    """An actionable message for a page that needs a stage this run has not finished."""
    return (f"Stage '{name}' has not finished in run {run.path.name}. Run "
            f"`{STAGE_HINTS.get(name, 'sae-cxr ' + name)} --run {run.path}` (or `sae-cxr demo --out {run.path}`).")


def stage_table(run: RunDir) -> pd.DataFrame:
    """One row per pipeline stage: status, finish time, seconds."""
    from sae_cxr.pipeline import stage_names

    rows = []
    for name in stage_names():
        s = run.stage(name)
        rows.append({"stage": name, "status": s.status if s else "not run",
                     "finished": (s.finished or "") if s else "",
                     "seconds": s.summary.get("seconds") if s else None})
    return pd.DataFrame(rows)


def _json(run: RunDir, rel: str) -> Any:
    """A JSON output of a stage, checksum-verified."""
    return json.loads(run.verify(rel).read_text())


# ----------------------------------------------------------------------------------------------
# Overview
# ----------------------------------------------------------------------------------------------
def dataset_summary(run: RunDir) -> dict[str, Any]:
    """Source, image count, split sizes, label prevalence per split, and a planted shortcut."""
    from sae_cxr.ingest import read_records_table
    from sae_cxr.pipeline import config_from_run

    table = read_records_table(run)
    spec = run.manifest().get("dataset") or {}
    cfg = config_from_run(run).data
    prevalence = (table.groupby("split")[list(FINDINGS)].mean().T if len(table) else pd.DataFrame())
    out: dict[str, Any] = {"source": cfg.source, "path": cfg.path, "records": int(len(table)),
                           "splits": table["split"].value_counts().to_dict(),
                           "prevalence": prevalence, "spec_kind": spec.get("kind"), "shortcut": None}
    if cfg.source == "phantom":
        out["shortcut"] = cfg.phantom.shortcut
        out["phantom"] = {"n": cfg.phantom.n, "size": cfg.phantom.size, "seed": cfg.phantom.seed}
    return out


def planted_shortcut(run: RunDir):
    """The run's planted `Shortcut` (phantom world), or None."""
    from sae_cxr.findings import Shortcut
    from sae_cxr.pipeline import config_from_run

    cfg = config_from_run(run).data
    if cfg.source != "phantom" or not cfg.phantom.shortcut:
        return None
    return Shortcut.parse(cfg.phantom.shortcut)


def backbone_summary(run: RunDir) -> dict[str, Any]:
    """The backbone as the embeddings record it: name, weights digest, dims, patch grid, mode."""
    from sae_cxr.extract import EmbeddingStore
    from sae_cxr.pipeline import config_from_run

    store = EmbeddingStore(run, verify=False)
    info = dict(store.backbone_info)
    return {"spec": config_from_run(run).extract.backbone, "name": info.get("name"),
            "weights_sha256": str(info.get("weights_sha256", ""))[:16], "embed_dim": store.embed_dim,
            "input_dim": store.dim, "mode": store.mode, "image_size": info.get("image_size"),
            "has_text": info.get("has_text"), "grid": store.grid, "patches": store.index.get("patches")}


def classifier_metrics(run: RunDir) -> pd.DataFrame:
    """AUROC and AUPRC with bootstrap intervals per split and finding (classifier/metrics.json)."""
    from sae_cxr.classifier import METRICS

    run.require("train-classifier")
    m = _json(run, METRICS)
    rows = []
    for split, per in m.get("metrics", {}).items():
        for f, d in per.items():
            row: dict[str, Any] = {"split": split, "finding": f, "n": d["auroc"].get("n"),
                                   "positives": d["auroc"].get("n_pos")}
            for k in ("auroc", "auprc"):
                row[k], row[f"{k}_low"], row[f"{k}_high"] = d[k].get("value"), d[k].get("low"), d[k].get("high")
            rows.append(row)
    return pd.DataFrame(rows)


def ensemble_health(run: RunDir) -> pd.DataFrame:
    """Per member: FVU, L0, dead and dense fractions, loss recovered (held-out images)."""
    from sae_cxr.transcoders.stage import METRICS

    run.require("train-transcoders")
    m = _json(run, METRICS)
    n = len(m["fvu"])
    df = pd.DataFrame({"member": np.arange(n)})
    for k in ("fvu", "l0", "dead_fraction", "dense_fraction", "loss_recovered"):
        if k in m and len(m[k]) == n:
            df[k] = np.asarray(m[k], dtype=float)
    return df


def ensemble_config(run: RunDir) -> dict[str, Any]:
    from sae_cxr.transcoders.stage import TC_DIR

    return _json(run, f"{TC_DIR}/config.json").get("config", {})


def training_history(run: RunDir) -> pd.DataFrame:
    """The ensemble's training curve (transcoders/history.json): FVU, L0, dead share per logged step."""
    from sae_cxr.transcoders.stage import HISTORY

    return pd.DataFrame(_json(run, HISTORY).get("records", []))


def patterns_summary(run: RunDir) -> dict[str, Any]:
    from sae_cxr.patterns import SUMMARY

    run.require("patterns")
    return _json(run, SUMMARY)


def concept_recovery(run: RunDir) -> pd.DataFrame:
    """Planted concept -> best pattern and its AUROC (phantom runs; empty otherwise); once eval has run,
    also the linear-probe ceiling and the device/artifact under which the pattern detects it worst."""
    rec = patterns_summary(run).get("concept_recovery", {})
    judged: dict[str, Any] = {}
    if stage_done(run, "eval"):
        from sae_cxr.evaluate import METRICS

        judged = _json(run, METRICS).get("patterns", {}).get("concept_recovery", {}).get("per_concept", {})
    rows = []
    for c, v in rec.get("per_concept", {}).items():
        row = {"concept": c, "category": CONCEPTS[c].category if c in CONCEPTS else None, **v}
        if judged:
            e = judged.get(c, {})
            w = e.get("weakest_stratum") or {}
            row.update({"probe_auroc": e.get("probe_auroc"), "weakest_under": w.get("nuisance"),
                        "auroc_with_it": w.get("auroc_with"), "auroc_without_it": w.get("auroc_without")})
        rows.append(row)
    return pd.DataFrame(rows)


def attribution_summary(run: RunDir) -> dict[str, Any]:
    from sae_cxr.attribution import SUMMARY

    run.require("attribute")
    return _json(run, SUMMARY)


def labels_eval(run: RunDir) -> pd.DataFrame:
    """Per labeler: how many patterns have a planted concept to be named after (phantom runs), and
    the share it named correctly and put in the right category (labels/eval.json; empty otherwise)."""
    from sae_cxr.labeling.stage import LABEL_EVAL

    if not stage_done(run, "label") or not run.sub(LABEL_EVAL).exists():
        return pd.DataFrame()
    rows = [{"labeler": name, "patterns": d.get("n"), "named_correctly": d.get("named_correctly"),
             "category_correct": d.get("category_correct")}
            for name, d in _json(run, LABEL_EVAL).items() if isinstance(d, dict)]
    return pd.DataFrame(rows)


def run_png(run: RunDir, rel: str) -> bytes | None:
    """A plot a stage saved (patterns/threshold.png, attributions/deletion.png), or None."""
    p = run.sub(rel)
    return run.verify(rel).read_bytes() if p.exists() else None


# ----------------------------------------------------------------------------------------------
# Patterns
# ----------------------------------------------------------------------------------------------
PATTERN_COLUMNS = ("pattern_id", "label", "category", "stability", "frequency", "monosemanticity",
                   "verification", "flagged")


def pattern_table(run: RunDir) -> pd.DataFrame:
    """One row per pattern: its label (name, category, description, verification) next to the
    patterns stage's scores (stability, frequency, monosemanticity, logit effect per finding, ...)."""
    from sae_cxr.labeling.stage import load_labels
    from sae_cxr.patterns import load_patterns

    table, _ = load_patterns(run)
    labels = load_labels(run)
    df = table.copy()
    get = lambda p, attr, default=None: getattr(labels[p], attr) if p in labels else default  # noqa: E731
    ids = df["pattern_id"].astype(int).tolist()
    df["label"] = [get(p, "label", f"pattern {p}") for p in ids]
    df["category"] = [get(p, "category", "unlabelled") for p in ids]
    df["description"] = [get(p, "description", "") for p in ids]
    df["verification"] = [get(p, "verification") for p in ids]
    df["flagged"] = [bool(get(p, "flagged", False)) for p in ids]
    df["labeler"] = [get(p, "labeler", "") for p in ids]
    df["verification"] = pd.to_numeric(df["verification"], errors="coerce")
    lead = list(PATTERN_COLUMNS) + [f"effect:{f}" for f in FINDINGS]
    return df[lead + [c for c in df.columns if c not in lead and c != "members"]]


def category_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Patterns per category (labelled categories in findings.CATEGORIES order first)."""
    from sae_cxr.findings import CATEGORIES

    counts = table["category"].value_counts()
    order = [c for c in CATEGORIES if c in counts] + [c for c in counts.index if c not in CATEGORIES]
    return pd.DataFrame({"category": order, "patterns": [int(counts[c]) for c in order]})


def pattern_density(run: RunDir, pattern_id: int) -> dict[str, Any]:
    """Density histogram of the pattern's log10 activations and the share of images where it is silent."""
    from sae_cxr.gallery import load_histograms

    h = load_histograms(run)
    p = int(pattern_id)
    edges = np.asarray(h["log10_edges"], dtype=float)
    return {"log10_edges": edges, "centers": (edges[:-1] + edges[1:]) / 2,
            "counts": np.asarray(h["counts"][p], dtype=np.int64), "silent_fraction": float(h["silent_fraction"][p])}


def pattern_enrichment(run: RunDir, pattern_id: int) -> pd.DataFrame:
    """Findings and concepts over-represented among the pattern's top images (lift over base rate)."""
    from sae_cxr.gallery import load_enrichment

    return pd.DataFrame(load_enrichment(run).get(int(pattern_id), []))


def pattern_effects(row: pd.Series) -> pd.DataFrame:
    """Logit change per unit of activation of the pattern, per finding."""
    return pd.DataFrame({"finding": list(FINDINGS), "effect": [float(row[f"effect:{f}"]) for f in FINDINGS]})


def label_concepts(label: str | None) -> list[str]:
    """The planted-concept names a label text names (for choosing which boxes to draw)."""
    if not label:
        return []
    from sae_cxr.explain import default_extractor

    return default_extractor().concepts_in(label)


# ----------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------
def render_tile(image: np.ndarray, heat: np.ndarray | None = None, boxes: Sequence = (), size: int = TILE_PX,
                alpha: float = 0.5):
    """A PIL image of `image` (float [H, W]) scaled to `size` on its long side, with an optional
    heatmap overlay (any resolution; drawn where it exceeds its median, scaled to its maximum) and
    ground-truth boxes (source pixels)."""
    from PIL import Image

    from sae_cxr.viz import draw_boxes, heatmap_overlay, to_rgb

    img = np.asarray(image, dtype=np.float32)
    if heat is not None:  # show where the map rises above its own median over the image
        heat = np.asarray(heat, dtype=np.float32)
        heat = heat - float(np.median(heat))
    h, w = img.shape
    s = size / max(h, w)
    small = np.asarray(Image.fromarray(img, mode="F").resize((max(1, round(w * s)), max(1, round(h * s))),
                                                             Image.BILINEAR), dtype=np.float32)
    im = heatmap_overlay(small, heat, alpha=alpha) if heat is not None else to_rgb(small)
    return draw_boxes(im, list(boxes), scale=s, labels=True) if boxes else im


def encode(im, quality: int = 88) -> bytes:
    """A picture for the browser as JPEG: ten times faster to encode than PNG and smaller to send,
    which is what keeps a page of gallery tiles fast."""
    import io

    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass
class Tile:
    """A rendered gallery image."""

    record_id: str
    split: str
    activation: float
    image: bytes  # JPEG
    caption: str


@dataclass
class ImageAnalysis:
    """One image made ready for decomposition: the run's own image or an upload."""

    record_id: str
    image: np.ndarray
    x: np.ndarray  # [d_in] the classifier input
    patches: np.ndarray | None  # [P, D_img] patch tokens (None when the backbone gives none)
    letterbox: Any  # backbones.base.Letterbox
    labels: np.ndarray | None = None  # [5] ground truth (1/0/NaN), None for an upload
    boxes: tuple = ()
    split: str | None = None
    report: str = ""
    concepts: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    uploaded: bool = False


class UploadError(ValueError):
    """An upload that cannot be analysed (too large, not an image, undecodable)."""


# ----------------------------------------------------------------------------------------------
# One run's models
# ----------------------------------------------------------------------------------------------
class RunModels:
    """The models, readers and indices of one run, each loaded on first use and kept."""

    TOKEN_CACHE_MB = 256
    """Patch tokens computed through the backbone are kept (least recently used out) up to this size."""

    def __init__(self, path: str | os.PathLike):
        self.run = RunDir(path)
        self._lock = threading.RLock()
        self._tokens: OrderedDict[int, np.ndarray] = OrderedDict()

    # -- loaded once -----------------------------------------------------------------------------
    @cached_property
    def config(self):
        from sae_cxr.pipeline import config_from_run

        return config_from_run(self.run)

    @cached_property
    def store(self):
        from sae_cxr.extract import EmbeddingStore

        self.run.require("extract")
        return EmbeddingStore(self.run)

    @cached_property
    def features(self) -> np.ndarray:
        return self.store.features()

    @cached_property
    def patch_rows(self) -> frozenset[int]:
        return frozenset(int(r) for r in self.store.patch_rows())

    @cached_property
    def dataset(self):
        from sae_cxr.ingest import open_run_dataset

        return open_run_dataset(self.run)

    @cached_property
    def row_of(self) -> dict[str, int]:
        return {r.id: i for i, r in enumerate(self.dataset.records)}

    @cached_property
    def ensemble(self):
        from sae_cxr.transcoders.stage import load_ensemble

        return load_ensemble(self.run)

    @cached_property
    def head(self):
        from sae_cxr.classifier import load_head

        return load_head(self.run)

    @cached_property
    def patterns(self) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
        from sae_cxr.patterns import load_patterns

        return load_patterns(self.run)

    @cached_property
    def members(self) -> dict[int, list[tuple[int, int]]]:
        table, _ = self.patterns
        return {int(p): [tuple(x) for x in json.loads(m)] for p, m in zip(table["pattern_id"], table["members"])}

    @cached_property
    def W_enc(self) -> np.ndarray:
        return self.ensemble.W_enc.detach().cpu().numpy()

    @cached_property
    def attributor(self):
        from sae_cxr.attribution import Attributor

        return Attributor(self.ensemble, self.head, self.patterns[1]["latent_pattern"])

    @cached_property
    def labels(self) -> dict[int, Any]:
        from sae_cxr.labeling.stage import load_labels

        return load_labels(self.run)

    @cached_property
    def reader(self):
        """The stored decompositions (None before the attribute stage)."""
        if not stage_done(self.run, "attribute"):
            return None
        from sae_cxr.attribution import DecompositionReader

        return DecompositionReader(self.run)

    @cached_property
    def galleries(self) -> dict[int, pd.DataFrame]:
        """Pattern id -> its gallery entries (sorted by kind and rank)."""
        from sae_cxr.gallery import load_galleries

        g = load_galleries(self.run).sort_values(["pattern_id", "kind", "rank"])
        return {int(p): d.reset_index(drop=True) for p, d in g.groupby("pattern_id", sort=False)}

    @cached_property
    def search(self):
        from sae_cxr.search import RunSearch

        return RunSearch(self.run)

    @cached_property
    def image_index(self):
        from sae_cxr.index import VectorIndex
        from sae_cxr.search import IMAGES

        self.run.require("galleries")
        return VectorIndex.load(self.run.verify(IMAGES))

    @cached_property
    def backbone(self):
        """The run's backbone (for uploads and for patch tokens the run did not store)."""
        from sae_cxr.backbones.base import load_backbone

        with self._lock:
            return load_backbone(self.config.extract.backbone)

    @property
    def image_size(self) -> int:
        return int(self.store.backbone_info.get("image_size") or 224)

    @property
    def n_members(self) -> int:
        return int(self.ensemble.cfg.n_members)

    # -- images ----------------------------------------------------------------------------------
    def label_of(self, pattern_id: int):
        return self.labels.get(int(pattern_id))

    def pattern_name(self, pattern_id: int) -> str:
        lab = self.label_of(pattern_id)
        return lab.label if lab is not None else f"pattern {pattern_id}"

    def record(self, record_id: str):
        if record_id not in self.row_of:
            raise KeyError(f"image {record_id!r} is not in run {self.run.path.name}")
        return self.dataset.records[self.row_of[record_id]]

    def _letterbox(self, image: np.ndarray):
        import torch

        from sae_cxr.backbones.base import letterbox

        return letterbox(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), self.image_size)[1]

    def patch_tokens(self, rows: Sequence[int], images: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """Patch tokens [B, P, D] for run rows: stored ones, remembered ones, the rest through the
        backbone in one batch (a forward pass costs about as much for one image as for fifty)."""
        rows = [int(r) for r in rows]
        out: list[np.ndarray | None] = [None] * len(rows)
        stored = [j for j, r in enumerate(rows) if r in self.patch_rows]
        if stored:
            got = self.store.patches([rows[j] for j in stored])
            for j, arr in zip(stored, got):
                out[j] = arr
        with self._lock:
            for j, r in enumerate(rows):
                if out[j] is None and r in self._tokens:
                    self._tokens.move_to_end(r)
                    out[j] = self._tokens[r]
            todo = [j for j in range(len(rows)) if out[j] is None]
            if todo:
                imgs = [images[j] if images is not None else self.dataset.records[rows[j]].load_image() for j in todo]
                enc = self.backbone.encode_images(imgs, with_patches=True)
                if enc.patches is None:
                    raise ValueError(f"backbone {self.backbone.name} gives no patch tokens: maps are unavailable")
                arr = enc.patches.float().cpu().numpy()
                for j, a in zip(todo, arr):
                    out[j] = a
                    self._tokens[rows[j]] = a
                budget = self.TOKEN_CACHE_MB * 2 ** 20 // max(arr[0].nbytes, 1)
                while len(self._tokens) > budget:
                    self._tokens.popitem(last=False)
        return np.stack(out) if out else np.zeros((0,), np.float32)

    def gallery_rows(self, pattern_id: int, kind: str = "top", limit: int = 20) -> list[int]:
        """The run rows of a pattern's gallery where it fires (the ones whose tiles need a map)."""
        g = self.galleries.get(int(pattern_id))
        if g is None:
            return []
        g = g[g["kind"] == kind].head(limit)
        return [int(r) for r, a in zip(g["row"], g["activation"]) if a > 0]

    def warm(self, rows: Sequence[int]) -> None:
        """Compute the patch tokens of many rows in one batch ahead of drawing their tiles."""
        with self._lock:
            rows = [r for r in dict.fromkeys(int(r) for r in rows) if r not in self.patch_rows and r not in self._tokens]
        for i in range(0, len(rows), 64):
            self.patch_tokens(rows[i:i + 64])

    def pattern_grid(self, pattern_id: int, patches: np.ndarray) -> np.ndarray:
        """The pattern's map [B, rows, cols] over patch tokens [B, P, D]."""
        from sae_cxr.maps import pattern_patch_maps

        grid = self.store.grid
        if grid is None:
            side = int(round(math.sqrt(patches.shape[1])))
            grid = (side, patches.shape[1] // side)
        m = pattern_patch_maps(self.W_enc, self.members[int(pattern_id)], patches, self.n_members)
        return m.reshape(len(patches), *grid)

    def pattern_heat(self, pattern_id: int, analysis: ImageAnalysis) -> np.ndarray | None:
        """The pattern's map upsampled to the source image of `analysis` (None without patch tokens)."""
        from sae_cxr.maps import to_image

        if analysis.patches is None:
            return None
        g = self.pattern_grid(pattern_id, analysis.patches[None])[0]
        return to_image(g, analysis.letterbox, self.image_size)

    def boxes_for(self, record, pattern_id: int | None, which: str = "pattern") -> tuple:
        """Ground-truth boxes to draw: those of the concept the pattern's label names ("pattern"),
        all of the record's ("all"), or none."""
        if which == "none" or not record.boxes:
            return ()
        if which == "all" or pattern_id is None:
            return tuple(record.boxes)
        wanted = set(label_concepts(self.pattern_name(pattern_id)))
        return tuple(b for b in record.boxes if b.label in wanted)

    def gallery_tiles(self, pattern_id: int, kind: str = "top", limit: int = 20, boxes: str = "pattern",
                      size: int = TILE_PX) -> list[Tile]:
        """The pattern's gallery of one kind (top, quantile, heldout_top, negative, ...) rendered with
        its spatial map overlaid and ground-truth boxes."""
        g = self.galleries.get(int(pattern_id))
        if g is None:
            return []
        g = g[g["kind"] == kind].head(limit)
        if g.empty:
            return []
        if kind == "quantile":  # read weak to strong
            g = g.sort_values("activation", kind="stable")
        records = [self.dataset.records[int(r)] for r in g["row"]]
        images = [rec.load_image() for rec in records]
        firing = [j for j, a in enumerate(g["activation"]) if a > 0]  # silent images get no map
        grids: list[np.ndarray | None] = [None] * len(records)
        if firing:
            patches = self.patch_tokens([int(g["row"].iloc[j]) for j in firing], [images[j] for j in firing])
            for j, m in zip(firing, self.pattern_grid(pattern_id, patches)):
                grids[j] = m
        from sae_cxr.maps import to_image

        tiles = []
        for rec, img, grid, act in zip(records, images, grids, g["activation"]):
            heat = to_image(grid, self._letterbox(img), self.image_size) if grid is not None else None
            im = render_tile(img, heat, self.boxes_for(rec, pattern_id, boxes), size)
            tiles.append(Tile(rec.id, rec.split, float(act), encode(im), f"{rec.id} · {act:.3g}"))
        return tiles

    # -- decompositions ----------------------------------------------------------------------------
    def analyse_record(self, record_id: str) -> ImageAnalysis:
        """A run image with its classifier input and patch tokens."""
        rec = self.record(record_id)
        row = self.row_of[record_id]
        if not bool(self.store.valid[row]):
            raise ValueError(f"image {record_id} was unreadable at extraction (skipped); nothing to explain")
        img = rec.load_image()
        try:
            patches = self.patch_tokens([row], [img])[0]
        except ValueError:
            patches = None
        return ImageAnalysis(record_id=rec.id, image=img, x=self.features[row], patches=patches,
                             letterbox=self._letterbox(img), labels=np.asarray(rec.labels, dtype=float),
                             boxes=tuple(rec.boxes), split=rec.split, report=rec.report,
                             concepts=tuple(rec.concepts))

    def analyse_upload(self, data: bytes, name: str, report: str = "") -> ImageAnalysis:
        """Decode an uploaded PNG/JPEG/DICOM (in memory) and embed it with the run's backbone."""
        from sae_cxr.data.images import ImageReadError, decode_image

        if len(data) > MAX_UPLOAD_MB * 2 ** 20:
            raise UploadError(f"{name} is {len(data) / 2 ** 20:.1f} MB; the limit is {MAX_UPLOAD_MB} MB")
        try:
            img = decode_image(data, name=name)
        except ImageReadError as e:
            raise UploadError(f"{name} could not be read as a PNG, JPEG or DICOM image: {e.reason}") from None
        notes: list[str] = []
        with self._lock:
            bb = self.backbone
            want = self.store.backbone_info.get("weights_sha256")
            if want and bb.weights_sha256 != want:
                notes.append("the backbone loaded now differs from the one that embedded this run "
                             "(weights digest mismatch): predictions may not match the run's")
            enc = bb.encode_images([img], with_patches=True)
            emb = enc.embedding.float().cpu().numpy()[0]
            x = emb
            if self.store.mode == "multimodal":
                if report.strip() and bb.has_text:
                    text = bb.encode_texts([report]).float().cpu().numpy()[0]
                else:
                    text = np.zeros_like(emb)
                    notes.append("this run's classifier reads the image AND its report; no report was given, "
                                 "so the report half of the input is zeros and predictions lean on the image only")
                x = np.concatenate([emb, text])
        patches = enc.patches.float().cpu().numpy()[0] if enc.patches is not None else None
        return ImageAnalysis(record_id=f"upload:{name}", image=img, x=x.astype(np.float32), patches=patches,
                             letterbox=self._letterbox(img), report=report, notes=notes, uploaded=True)

    def predictions(self, analysis: ImageAnalysis) -> pd.DataFrame:
        """Probability and logit of the five findings (with the ground truth where known)."""
        batch = self.attributor.decompose(analysis.x[None])
        logit = batch.logit[0]
        return pd.DataFrame({"finding": list(FINDINGS), "logit": logit, "probability": 1 / (1 + np.exp(-logit)),
                             "label": analysis.labels if analysis.labels is not None else [np.nan] * len(FINDINGS)})

    def decomposition(self, analysis: ImageAnalysis, finding: str, located: int = 5):
        """The exact decomposition of `finding` on the image: the stored one when the attribute stage
        covered the image, else computed now with the same attributor and reporting settings."""
        from sae_cxr.attribution import reported_patterns
        from sae_cxr.attribution_types import Decomposition, PatternEvidence
        from sae_cxr.findings import canonical_finding
        from sae_cxr.maps import peak_location

        finding = canonical_finding(finding)
        if not analysis.uploaded and self.reader is not None:
            try:
                return self.reader.get(analysis.record_id, finding)
            except KeyError:
                pass
        c = FINDINGS.index(finding)
        b = self.attributor.decompose(analysis.x[None])
        contrib = b.contributions[0, :, c]
        cfg = self.config.attribution
        rep, cov = reported_patterns(contrib, cfg.coverage, cfg.max_patterns)
        total = float(np.abs(contrib).sum())
        evidence = []
        for rank, p in enumerate(rep):
            lab = self.label_of(int(p))
            loc = None
            if rank < located and analysis.patches is not None:
                g = self.pattern_grid(int(p), analysis.patches[None])[0]
                loc = peak_location(g, analysis.letterbox, self.image_size)
            evidence.append(PatternEvidence(
                pattern_id=int(p), contribution=float(contrib[p]), activation=float(b.activations[0, p]),
                label=None if lab is None or lab.unresolved else lab.label,
                category=None if lab is None else lab.category,
                description=None if lab is None else lab.description,
                verification=None if lab is None else lab.verification,
                flagged=False if lab is None else bool(lab.flagged), location=loc,
                share=min(1.0, abs(float(contrib[p])) / total) if total > 0 else 0.0))
        label = None if analysis.labels is None or np.isnan(analysis.labels[c]) else float(analysis.labels[c])
        logit = float(b.logit[0, c])
        return Decomposition(record_id=analysis.record_id, finding=finding, logit=logit,
                             probability=float(1 / (1 + math.exp(-logit))), label=label, patterns=evidence,
                             unassigned=float(b.unassigned[0, c]), skip=float(b.skip[0, c]), bias=float(b.bias[c]),
                             error=float(b.error[0, c]), n_active_patterns=int((contrib != 0).sum()),
                             coverage=float(cov))

    def explanations(self, decomp) -> dict[str, Any]:
        """The deterministic explanation for both audiences, with the run's explain settings."""
        from sae_cxr.explain import compose

        cfg = self.config.explain.compose
        return {a: compose(decomp, a, cfg) for a in ("clinician", "lay")}

    # -- search ------------------------------------------------------------------------------------
    def similar_to_upload(self, analysis: ImageAnalysis, k: int = 12) -> pd.DataFrame:
        """Run images nearest to an uploaded image's embedding (cosine)."""
        D = self.store.embed_dim
        scores, ids = self.image_index.search(analysis.x[None, :D].astype(np.float32), k)
        return hits_frame([{"kind": "image", "id": str(i), "score": float(s)} for s, i in zip(scores[0], ids[0])])


def hits_frame(hits: Sequence[Any]) -> pd.DataFrame:
    """Search hits (search.Hit or dicts) as a table."""
    rows = [h.to_dict() if hasattr(h, "to_dict") else dict(h) for h in hits]
    return pd.DataFrame(rows, columns=["kind", "id", "score", "label", "category"])


# ----------------------------------------------------------------------------------------------
# Waterfall
# ----------------------------------------------------------------------------------------------
def waterfall_terms(decomp, max_patterns: int = 12, names: dict[int, str] | None = None) -> pd.DataFrame:
    """The decomposition as ordered additive terms that sum to the logit: bias, the strongest reported
    patterns one by one, the other reported patterns, the unreported active ones, unassigned latents,
    the skip path and the error term. Columns: term, value, kind, category, pattern_id."""
    rows: list[dict[str, Any]] = [{"term": "bias (image-independent)", "value": decomp.bias, "kind": "bias",
                                   "category": None, "pattern_id": None}]
    ranked = sorted(decomp.patterns, key=lambda p: -abs(p.contribution))
    for p in ranked[:max_patterns]:
        name = p.label or (names or {}).get(p.pattern_id) or "unnamed"
        rows.append({"term": f"#{p.pattern_id} {name}", "value": p.contribution, "kind": "pattern",
                     "category": p.category, "pattern_id": p.pattern_id})
    rest = ranked[max_patterns:]
    if rest:
        rows.append({"term": f"{len(rest)} more reported patterns", "value": float(sum(p.contribution for p in rest)),
                     "kind": "patterns", "category": None, "pattern_id": None})
    n_unrep = max(decomp.n_active_patterns - len(decomp.patterns), 0)
    rows.append({"term": f"{n_unrep} unreported active patterns", "value": decomp.unreported, "kind": "unreported",
                 "category": None, "pattern_id": None})
    rows.append({"term": "unassigned latents", "value": decomp.unassigned, "kind": "unassigned",
                 "category": None, "pattern_id": None})
    if decomp.skip != 0:
        rows.append({"term": "skip path", "value": decomp.skip, "kind": "skip", "category": None, "pattern_id": None})
    rows.append({"term": "error (not reconstructed)", "value": decomp.error, "kind": "error", "category": None,
                 "pattern_id": None})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Audit
# ----------------------------------------------------------------------------------------------
@dataclass
class Audit:
    """Where device and artifact patterns carry a finding's evidence (one split)."""

    split: str
    findings: pd.DataFrame  # one row per finding
    links: pd.DataFrame  # one row per (nuisance name, finding), strongest push first
    patterns: pd.DataFrame  # one row per (finding, nuisance pattern)
    planted: str | None  # "pacemaker:Cardiomegaly:0.9" on a phantom run with a shortcut
    planted_rank: int | None  # 1-based rank of the planted link among `links`, None if absent


def audit_contributions(run: RunDir, split: str) -> pd.DataFrame:
    """The stored contributions of one split (`all` = every attributed split) with each pattern's
    name and category and the prediction's probability."""
    from sae_cxr.attribution import load_predictions
    from sae_cxr.labeling.stage import load_labels

    preds, con = load_predictions(run)
    if split != "all":
        preds = preds[preds["split"] == split]
    labels = load_labels(run)
    con = con.merge(preds[["record_id", "finding", "split", "probability", "label"]], on=["record_id", "finding"])
    con["name"] = con["pattern_id"].map(lambda p: labels[p].label if p in labels else f"pattern {p}")
    con["category"] = con["pattern_id"].map(lambda p: labels[p].category if p in labels else None)
    return con


def nuisance_audit(run: RunDir, split: str = "test") -> Audit:
    """For each finding, the share of its evidence carried by device and artifact patterns, linked by
    the patterns' NAMES (all pacemaker patterns together) so that a shortcut spread over many similar
    patterns adds up; `full_audit` gives the batch report's per-pattern view next to it.

    Over the split's stored decompositions (the reported patterns of every prediction), with
    E_f = sum of |contribution| over all patterns and predictions of finding f:
    - carried share: sum of |contribution| of device/artifact patterns / E_f (either direction);
    - net push of a nuisance NAME towards f (all patterns with that label together): the sum of
      their signed contributions / E_f. Patterns that push both ways, as incidental artifacts do,
      cancel; a shortcut pushes one way. Links (name -> finding) are ranked by it;
    - the finding's shortcut share: the sum of the positive net pushes of its nuisance names.
    """
    con = audit_contributions(run, split)
    if con.empty:
        raise ValueError(f"no stored attributions for split {split!r}; attribute it first "
                         f"(`sae-cxr attribute --run {run.path}` with that split in attribution.splits)")
    con["abs"] = con["contribution"].abs()
    evidence = con.groupby("finding")["abs"].sum()
    n_pred = con.groupby("finding")["record_id"].nunique()
    nu = con[con["category"].isin(NUISANCE_CATEGORIES)]
    pats = (nu.groupby(["finding", "pattern_id", "name", "category"])
            .agg(net=("contribution", "sum"), carried=("abs", "sum"), images=("record_id", "nunique"),
                 mean_contribution=("contribution", "mean")).reset_index())
    pats["net_share"] = pats["net"] / pats["finding"].map(evidence)
    pats["carried_share"] = pats["carried"] / pats["finding"].map(evidence)
    pats = pats.sort_values(["finding", "net"], ascending=[True, False]).reset_index(drop=True)
    links = (pats.groupby(["name", "category", "finding"])
             .agg(net_share=("net_share", "sum"), carried_share=("carried_share", "sum"),
                  patterns=("pattern_id", lambda s: sorted(int(x) for x in s)))
             .reset_index())
    imgs = nu.groupby(["name", "finding"])["record_id"].nunique()
    links["images"] = [int(imgs.get((n, f), 0)) for n, f in zip(links["name"], links["finding"])]
    links["predictions"] = links["finding"].map(n_pred).astype(int)
    links = links.sort_values("net_share", ascending=False).reset_index(drop=True)
    planted = planted_shortcut(run)
    links["planted"] = False
    rank = None
    if planted is not None:
        hit = [planted.nuisance in label_concepts(n) and f == planted.finding
               for n, f in zip(links["name"], links["finding"])]
        links["planted"] = hit
        if any(hit):
            rank = int(np.flatnonzero(hit)[0]) + 1
    rows = []
    for f in FINDINGS:
        if f not in evidence:
            continue
        d = nu[nu["finding"] == f]
        lk = links[links["finding"] == f]
        rows.append({"finding": f, "predictions": int(n_pred.get(f, 0)),
                     "carried_share": float(d["abs"].sum() / evidence[f]),
                     "device_share": float(d.loc[d["category"] == "device", "abs"].sum() / evidence[f]),
                     "artifact_share": float(d.loc[d["category"] == "artifact", "abs"].sum() / evidence[f]),
                     "shortcut_share": float(lk["net_share"].clip(lower=0).sum()),
                     "top_link": lk.iloc[0]["name"] if len(lk) and lk.iloc[0]["net_share"] > 0 else None,
                     "top_link_share": float(lk.iloc[0]["net_share"]) if len(lk) else 0.0})
    findings = pd.DataFrame(rows)
    order = {f: i for i, f in enumerate(links.loc[links["net_share"] > 0, "finding"].drop_duplicates())}
    findings["_o"] = findings["finding"].map(lambda f: order.get(f, len(order)))
    findings = findings.sort_values(["_o", "shortcut_share"], ascending=[True, False]).drop(columns="_o")
    return Audit(split=split, findings=findings.reset_index(drop=True), links=links, patterns=pats,
                 planted=str(planted) if planted is not None else None, planted_rank=rank)


def _audit_splits(run: RunDir, split: str) -> tuple[str, ...]:
    """The splits an audit view covers: one split, or every attributed split for "all"."""
    return tuple(sorted(set(stored_predictions(run)["split"]))) if split == "all" else (split,)


def full_audit(run: RunDir, split: str = "test", top: int = 5) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The batch report's audit (`sae_cxr.audit`: full decompositions of every image of the split), computed
    once and shown two ways:

    - patterns: per finding, the top device/artifact patterns ranked by swing, with their separation and
      the rank of the planted shortcut's patterns on a phantom run (planted_rank, phantom ground truth);
    - labels: the graded view, per finding the device/artifact LABELS (patterns sharing a label summed
      image by image) ranked by swing, with their separation (mean term on the finding's positives
      minus negatives) and whether the label holds the planted shortcut's patterns (planted)."""
    from sae_cxr.audit import audit_run, shortcut_patterns, shortcut_rank
    from sae_cxr.patterns import load_patterns

    audit = audit_run(run, _audit_splits(run, split))
    planted = planted_shortcut(run)
    truth = None
    if planted is not None:
        try:
            truth = shortcut_patterns(load_patterns(run)[0], planted.nuisance)
        except ValueError:
            truth = None
    patterns, labels = [], []
    for fa in audit.ranked():
        on_planted = truth is not None and planted.finding == fa.finding
        rank = shortcut_rank(fa, truth) if on_planted else None
        for i, r in enumerate(fa.patterns.head(top).itertuples()):
            patterns.append({"finding": fa.finding, "nuisance_share": fa.nuisance_share, "rank": i + 1,
                             "pattern_id": int(r.pattern_id), "label": r.label, "category": r.category,
                             "swing": float(r.swing), "separation": float(r.separation), "mean": float(r.mean),
                             "share": float(r.share), "images": int(r.n_active), "planted_rank": rank})
        if fa.groups is None:
            continue
        for i, g in enumerate(fa.groups.head(top).itertuples()):
            labels.append({"finding": fa.finding, "rank": i + 1, "label": g.label, "category": g.category,
                           "patterns": int(g.n_patterns), "swing": float(g.swing), "separation": float(g.separation),
                           "share": float(g.share), "planted": bool(on_planted and np.isin(g.pattern_ids, truth).any())})
    return pd.DataFrame(patterns), pd.DataFrame(labels, columns=["finding", "rank", "label", "category", "patterns",
                                                                 "swing", "separation", "share", "planted"])


def label_contrasts(run: RunDir, split: str = "test", top: int = 5) -> pd.DataFrame:
    """The graded audit (`sae_cxr.contrast`, pattern detectors): per finding, the device/artifact labels
    ranked by how far the logit moves, among the finding's negative images and with the other findings
    held fixed, when the label's most stable pattern detects its nuisance; with the patterns that carry
    the move and, on a phantom run, whether the label holds the planted shortcut's patterns."""
    from sae_cxr.audit import label_table, shortcut_label, shortcut_patterns
    from sae_cxr.contrast import run_contrasts
    from sae_cxr.patterns import load_patterns

    cols = ["finding", "rank", "label", "category", "contrast", "se", "z", "n_with", "n_without", "carried_by",
            "planted"]
    tables = run_contrasts(run, _audit_splits(run, split), sources=("patterns",)).get("patterns", {})
    planted = planted_shortcut(run)
    planted_label = None
    if planted is not None:
        try:
            table = load_patterns(run)[0]
            planted_label = shortcut_label(label_table(run), len(table), shortcut_patterns(table, planted.nuisance))
        except ValueError:  # not a phantom run: no ground truth to mark
            planted_label = None
    rows = []
    for finding, t in tables.items():
        for i, r in enumerate(t.head(top).itertuples()):
            carried = ", ".join(("rest of the logit" if c["pattern_id"] == -1 else f"#{c['pattern_id']} {c['label'] or ''}")
                                + f" {c['share']:.0%}" for c in r.carriers[:3] if c["share"] is not None)
            rows.append({"finding": finding, "rank": i + 1, "label": r.display, "category": r.category,
                         "contrast": float(r.contrast), "se": float(r.se), "z": float(r.z), "n_with": int(r.n_with),
                         "n_without": int(r.n_without), "carried_by": carried,
                         "planted": bool(planted is not None and finding == planted.finding and r.display == planted_label)})
    return pd.DataFrame(rows, columns=cols)


def audit_examples(run: RunDir, finding: str, split: str = "test", names: Sequence[str] | None = None,
                   n: int = 8) -> pd.DataFrame:
    """The split's images where device/artifact patterns (optionally only those named `names`) push
    `finding` hardest: record_id, push (logit units), probability, label, top pattern."""
    con = audit_contributions(run, split)
    d = con[(con["finding"] == finding) & con["category"].isin(NUISANCE_CATEGORIES)]
    if names:
        d = d[d["name"].isin(list(names))]
    if d.empty:
        return pd.DataFrame(columns=["record_id", "push", "probability", "label", "top_pattern", "top_name"])
    top = d.sort_values("contribution", ascending=False).drop_duplicates("record_id").set_index("record_id")
    agg = d.groupby("record_id").agg(push=("contribution", "sum"), probability=("probability", "first"),
                                     label=("label", "first"))
    agg["top_pattern"] = top["pattern_id"].reindex(agg.index).astype(int)
    agg["top_name"] = top["name"].reindex(agg.index)
    return agg.sort_values("push", ascending=False).head(n).reset_index()


# ----------------------------------------------------------------------------------------------
# Images and reports
# ----------------------------------------------------------------------------------------------
def records_table(run: RunDir) -> pd.DataFrame:
    """id, split, the five labels, concepts and report of every record (for pickers)."""
    from sae_cxr.ingest import read_records_table

    t = read_records_table(run)
    return t[["id", "split", *FINDINGS, "concepts", "report"]].copy()


def stored_predictions(run: RunDir) -> pd.DataFrame:
    """The attribute stage's predictions table (record_id, split, finding, probability, label, ...)."""
    from sae_cxr.attribution import load_predictions

    return load_predictions(run)[0]


REPORT_SUFFIXES = (".html", ".htm")


@dataclass
class ReportSet:
    """One batch report: a folder of reports/ (the report stage writes one per split), or the loose
    files at the top of reports/ (name '.')."""

    name: str
    pages: list[str]  # run-relative paths of its HTML pages, index first
    files: list[dict[str, Any]]  # its other top-level files: path, name, bytes
    documents: int  # per-image documents under json/ (not listed one by one)
    mtime: float


def list_reports(run: RunDir) -> list[ReportSet]:
    """The run's batch reports under reports/, newest first. Paths that leave the run (symlinks) are left out."""
    root = run.path / "reports"
    if not root.is_dir():
        return []

    def inside(p: Path) -> str | None:
        try:
            rel = run.rel(p)  # resolves symlinks: one that leads out of the run raises
            run.sub(rel)
            return rel
        except ValueError:
            return None

    def collect(folder: Path, name: str) -> ReportSet | None:
        html, files = [], []
        for p in sorted(folder.iterdir()):
            if not p.is_file() or p.name.startswith("."):
                continue
            rel = inside(p)
            if rel is None:
                continue
            if p.suffix.lower() in REPORT_SUFFIXES:
                html.append(rel)
            else:
                files.append({"path": rel, "name": p.name, "bytes": p.stat().st_size})
        docs = sum(1 for _ in (folder / "json").glob("*.json")) if (folder / "json").is_dir() else 0
        if not html and not files:
            return None
        html.sort(key=lambda r: (not r.endswith("/index.html"), r))
        return ReportSet(name, html, files, docs, folder.stat().st_mtime)

    sets = [collect(d, d.name) for d in sorted(root.iterdir())
            if d.is_dir() and not d.name.startswith(".") and inside(d) is not None]
    sets.append(collect(root, "."))
    return sorted([s for s in sets if s is not None], key=lambda s: -s.mtime)


def read_report(run: RunDir, rel: str) -> bytes:
    """The bytes of a report file inside the run's reports/ (checked against the manifest when recorded)."""
    p = run.sub(rel)
    if (run.path / "reports") not in p.parents:
        raise ValueError(f"{rel} is not under reports/")
    return run.verify(rel).read_bytes()

