"""Batch attribution reports: what an auditor reads after a run, and what a program consumes.

`build_report(run, ReportConfig(split="test"))` writes, to <run>/reports/<split>/ by default:

    index.html          summary: per-finding AUROC with intervals, the shortcut audit, the patterns
                        most often among the top evidence, the worst-explained predictions, and an
                        index of the pages; plotly.js is embedded here ONCE (offline bundle)
    page-0001.html ...  one section per image (50 per page by default): five predictions, one
                        waterfall per finding (inline SVG), the top patterns with their gallery
                        thumbnails, heatmaps on this image and labels, the explanation for the
                        clinician and for the lay reader
    evidence.parquet    the long table: one row per image x finding x reported pattern
    evidence.csv        the same rows as CSV
    json/<id>.json      one document per image: the five decompositions (Decomposition.to_dict,
                        so Decomposition.from_dict reads them back), the terms that sum to the
                        logit, the nuisance shares and both explanations
    images.csv          record id -> page, anchor and JSON file
    report.json         the summary tables, the run's manifest sha256 at build time, build time

Why image pages carry no JavaScript: a page of 50 images holds 250 waterfalls; as plotly figures
they would cost a 4.8 MB bundle per page (34 GB for the 7,500 pages of a MIMIC-CXR-sized split)
or pages that depend on a shared script file. Inline SVG waterfalls keep every page self-contained,
small and instant to open, print and archive; exact values show as native SVG tooltips. The
summary page, of which there is one, embeds plotly.js for its interactive charts. Every page
carries a Content-Security-Policy that forbids the browser any network request, so "opens offline"
is enforced by the browser, not merely promised.

Atomicity: a report is built in a private folder next to its destination and renamed into place
when complete (`_swap_into_place`): nobody ever sees a half-built report or a mix of two builds,
and a build that fails leaves the previous report untouched. The summary files and the streamed
tables go through run.atomic_path; the thousands of per-image JSON files and pages are written
plainly inside the private folder (the folder's rename is their commit) and flushed with one
sync before the rename, because an fsync per file (atomic_path) costs ~14 ms each on this disk,
more than everything else an image costs.

Images are embedded once per page (as a CSS class, reused as the background of every heatmap tile
of that image), heatmaps are small RGBA overlays the browser scales smoothly, and each pattern's
gallery thumbnail is embedded once per page. Pages are built and written one at a time, so memory
is bounded by one page, not by the batch.

Under torchrun (the `report` stage, or `sae-cxr report --split ...` launched with torchrun) each rank
builds a contiguous block of pages into the same build folder, with its own part of the evidence
table and images.csv; rank 0 merges the parts in page order, adds up the ranks' audit sums, writes
the summary files and swaps the folder into place. The files equal one process's (the audit sums up
to float rounding: each rank adds its own pages).

The shortcut audit uses the FULL decomposition (`Attributor` over the report's images, every active
pattern), not only the reported patterns: a nuisance pattern below the reporting cut still carries
evidence, and an audit that only counts the reported ones would under-state it.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import hashlib
import html
import io
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from sae_cxr.findings import FINDINGS, NUISANCE_CATEGORIES
from sae_cxr.run import MANIFEST, RunDir, RunError, atomic_path, sha256_file, write_bytes_atomic, write_json_atomic

log = logging.getLogger("sae_cxr.report")

REPORTS_DIR = "reports"
SCHEMA = "sae-cxr/report/1"
IMAGE_SCHEMA = "sae-cxr/report-image/1"
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CSP_PAGE = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_CSP_INDEX = ("default-src 'none'; img-src data: blob:; style-src 'unsafe-inline'; font-src data:; "
              "script-src 'unsafe-inline' 'unsafe-eval'")

LONG_COLUMNS: tuple[str, ...] = ("record_id", "split", "finding", "probability", "logit", "label", "pattern_id",
                                 "contribution", "activation", "share", "rank", "pattern_label", "category",
                                 "verification", "flagged")


@dataclass
class ReportConfig:
    """What a batch report covers and how much of each prediction it shows."""

    split: str = "test"
    """The split whose attributed predictions are reported (it must be in attribution.splits)."""
    ids: tuple[str, ...] | None = None
    """Record ids to report, in this order; None = every attributed image of the split."""
    max_images: int | None = None
    """Report at most this many images (the first ones of the selection)."""
    per_page: int = 50
    """Images per HTML page: a page stays quick to open however large the batch."""
    top_patterns: int = 6
    """Patterns per finding shown with heatmap, gallery thumbnail and label (all reported ones go to
    the tables and JSON)."""
    waterfall_patterns: int = 8
    """Patterns drawn as their own waterfall step; the rest of the active patterns form one step."""
    top_evidence_rank: int = 5
    """The summary's 'most often among the top evidence' counts a pattern when its rank is below this."""
    summary_rows: int = 20
    """Rows of the summary's ranked tables (top patterns, worst-explained predictions)."""
    thumb_size: int = 160
    """Longest side of an image thumbnail, pixels (images smaller than this are shown as they are)."""
    tile_size: int = 64
    """Longest side of a heatmap tile, pixels."""
    gallery_images: int = 4
    """Top-activating gallery images in a pattern's thumbnail (a 2 x 2 montage for 4)."""
    located: int = 5
    """Top patterns per prediction whose map peak is named (as the attribution reader does)."""
    contrast_min_images: int = 10
    """The audit's nuisance contrast fits a device/artifact label only where at least this many of the
    finding's negative images have its detector on, and as many have it off (fewer give no estimate)."""
    progress: bool = True

    def __post_init__(self) -> None:
        if not _SPLIT_RE.match(self.split):
            raise ValueError(f"split {self.split!r} is not a split name (letters, digits, '_' or '-')")
        if self.ids is not None:
            self.ids = tuple(str(i) for i in self.ids)
            if not self.ids:
                raise ValueError("ids is empty: give at least one record id, or None for the whole split")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {self.max_images}")
        for name in ("per_page", "top_patterns", "waterfall_patterns", "top_evidence_rank", "summary_rows",
                     "thumb_size", "tile_size", "gallery_images", "contrast_min_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class ReportStageConfig:
    """The `report` pipeline stage: which splits get a full report, and how each is laid out."""

    splits: tuple[str, ...] = ("test",)
    """Splits to report (each must be attributed: attribution.splits)."""
    max_images: int | None = None
    """Report at most this many images per split (None = all)."""
    per_page: int = 50
    top_patterns: int = 6
    contrast_min_images: int = 10
    """See `ReportConfig.contrast_min_images`."""

    def __post_init__(self) -> None:
        self.splits = tuple(str(s) for s in self.splits)
        if not self.splits:
            raise ValueError("report.splits is empty: name at least one attributed split, e.g. [\"test\"]")
        for s in self.splits:  # the same checks a standalone report makes, at config time
            self.report_config(s, progress=False)

    def report_config(self, split: str, progress: bool = True) -> ReportConfig:
        return ReportConfig(split=split, max_images=self.max_images, per_page=self.per_page,
                            top_patterns=self.top_patterns, contrast_min_images=self.contrast_min_images,
                            progress=progress)


@dataclass
class ReportResult:
    """Where a report went and how long it took."""

    out: Path
    images: int
    pages: int
    seconds: float
    images_per_s: float
    manifest_sha256: str
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
def default_out(run: RunDir, split: str, ids: Sequence[str] | None = None) -> Path:
    """<run>/reports/<split>/, or <split>-subset-<digest>/ for an id list (never overwrites the full report)."""
    if ids is None:
        return run.sub(f"{REPORTS_DIR}/{split}")
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:8]
    return run.sub(f"{REPORTS_DIR}/{split}-subset-{digest}")


def read_ids_file(path: str | os.PathLike) -> list[str]:
    """Record ids, one per line; blank lines, '#' comments and an 'id'/'record_id' header are ignored."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"ids file not found: {p} (one record id per line)")
    out: list[str] = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        s = line.split("#", 1)[0].strip().strip('"')
        if "," in s:
            s = s.split(",", 1)[0].strip().strip('"')
        if not s or (n == 1 and s.lower() in ("id", "record_id")):
            continue
        out.append(s)
    if not out:
        raise ValueError(f"ids file {p} lists no record ids (one per line expected)")
    return out


def safe_name(record_id: str) -> str:
    """A file and anchor name for a record id; ids with other characters get a digest so none collide."""
    s = re.sub(r"[^A-Za-z0-9._-]", "_", record_id)
    if s != record_id or s.startswith("."):
        s = f"{s.lstrip('.')[:80]}-{hashlib.sha1(record_id.encode()).hexdigest()[:8]}"
    return s


@dataclass
class _Selection:
    ids: list[str]
    rows: np.ndarray  # run row per id
    preds: pd.DataFrame  # the split's predictions for the selected ids
    pred: dict[tuple[str, str], dict[str, Any]]  # (record_id, finding) -> prediction row
    contrib: dict[str, np.ndarray]  # sorted arrays of the reported patterns
    spans: dict[tuple[str, str], tuple[int, int]]


def _select(run: RunDir, cfg: ReportConfig) -> _Selection:
    from sae_cxr.attribution import CONTRIBUTIONS, PREDICTIONS

    run.require("attribute", hint=f"run `sae-cxr attribute --run {run.path}` first")
    preds = pd.read_parquet(run.verify(PREDICTIONS), filters=[("split", "==", cfg.split)])
    if preds.empty:
        attributed = sorted(pd.read_parquet(run.verify(PREDICTIONS), columns=["split"])["split"].unique())
        raise ValueError(f"split {cfg.split!r} has no attributed predictions in {run.path}; attributed splits: "
                         f"{attributed or 'none'} (add it to attribution.splits and rerun `sae-cxr attribute`)")
    in_split = list(dict.fromkeys(preds["record_id"].astype(str)))
    if cfg.ids is not None:
        known = set(in_split)
        ids = list(dict.fromkeys(cfg.ids))
        missing = [i for i in ids if i not in known]
        if missing:
            raise ValueError(f"{len(missing)} of the requested ids have no attribution in split {cfg.split!r}, e.g. "
                             f"{missing[:5]}; check the split (--split) or attribute them first")
    else:
        ids = in_split
    if cfg.max_images is not None:
        ids = ids[: cfg.max_images]
    chosen = set(ids)
    preds = preds[preds["record_id"].isin(chosen)]
    c = pd.read_parquet(run.verify(CONTRIBUTIONS), filters=[("record_id", "in", list(chosen))])
    c = c.sort_values(["record_id", "finding", "rank"], kind="stable").reset_index(drop=True)
    arrays = {k: c[k].to_numpy() for k in ("pattern_id", "contribution", "activation", "rank")}
    keys = (c["record_id"].astype(str) + "\x00" + c["finding"].astype(str)).to_numpy()
    spans: dict[tuple[str, str], tuple[int, int]] = {}
    if len(keys):
        change = np.flatnonzero(keys[1:] != keys[:-1]) + 1
        starts = np.concatenate([[0], change])
        stops = np.concatenate([change, [len(keys)]])
        for s, e in zip(starts, stops):
            rid, f = str(keys[s]).split("\x00", 1)
            spans[(rid, f)] = (int(s), int(e))
    pred = {(str(r["record_id"]), str(r["finding"])): r for r in preds.to_dict("records")}
    rows = np.array([pred[(rid, FINDINGS[0])]["row"] for rid in ids], dtype=np.int64)
    return _Selection(ids=ids, rows=rows, preds=preds.reset_index(drop=True), pred=pred, contrib=arrays, spans=spans)


class _Context:
    """Everything a page needs that does not depend on the page: loaded once per report."""

    def __init__(self, run: RunDir, cfg: ReportConfig, sel: _Selection):
        from sae_cxr.attribution import Attributor
        from sae_cxr.classifier import load_head
        from sae_cxr.explain import ExplainConfig, default_extractor
        from sae_cxr.extract import EmbeddingStore
        from sae_cxr.ingest import open_run_dataset
        from sae_cxr.labeling.stage import load_labels
        from sae_cxr.patterns import load_patterns
        from sae_cxr.transcoders.stage import load_ensemble

        self.run, self.cfg, self.sel = run, cfg, sel
        ds = open_run_dataset(run)
        self.records = {r.id: r for r in ds.records}
        self.labels = load_labels(run)
        table, arrays = load_patterns(run)
        self.members = {int(p): [tuple(x) for x in json.loads(m)] for p, m in zip(table["pattern_id"], table["members"])}
        ens, head = load_ensemble(run), load_head(run)
        self.attr = Attributor(ens, head, arrays["latent_pattern"])
        self.P = self.attr.n_patterns
        self.W_enc = ens.W_enc.detach().cpu().numpy()
        self.E = ens.cfg.n_members
        self.store = EmbeddingStore(run)
        self.grid = self.store.grid
        self.image_size = int(self.store.backbone_info.get("image_size") or 0)
        self.has_patches = set(int(r) for r in self.store.patch_rows()) if self.grid is not None else set()
        self.x = self.store.features(sel.rows)
        self._dirs: dict[int, np.ndarray] = {}
        # categories of every pattern (from the primary labeler); unnamed = no label or an unresolved one
        self.category = np.array([(self.labels[p].category if p in self.labels else "") for p in range(self.P)],
                                 dtype=object)
        self.named = np.array([p in self.labels and not self.labels[p].unresolved for p in range(self.P)], bool)
        self.device = self.category == "device"
        self.artifact = self.category == "artifact"
        self.nuisance = np.isin(self.category, list(NUISANCE_CATEGORIES))
        from sae_cxr.audit import label_groups

        named_rows = [{"pattern_id": p, "label": lab.label, "category": lab.category}
                      for p, lab in self.labels.items() if not lab.unresolved]
        self.label_frame = pd.DataFrame(named_rows, columns=["pattern_id", "label", "category"]).set_index("pattern_id")
        self.label_groups, self.label_group_keys = label_groups(self.label_frame, self.P)
        self.detectors = None  # one presence detector per device/artifact label, for the nuisance contrast
        if len(self.label_frame):
            from sae_cxr.contrast import run_pattern_detectors

            det = run_pattern_detectors(run, self.label_frame)
            self.detectors = det if len(det.terms) else None
        explain_cfg = (run.config("explain") or {}).get("compose") or {}
        from sae_cxr.config import from_dict

        self.compose_cfg = from_dict(ExplainConfig, explain_cfg, "explain.compose")
        self.extractor = default_extractor()
        self.audiences = ("clinician", "lay")
        self.explanations = self._stored_explanations(set(sel.ids))
        self.gallery = self._gallery_rows()
        self._gallery_png: dict[int, str | None] = {}

    def direction(self, pid: int) -> np.ndarray:
        """The pattern's encoder direction on patch tokens: the same arithmetic as maps.pattern_patch_maps."""
        w = self._dirs.get(pid)
        if w is None:
            D = self.store.embed_dim
            mem = self.members[pid]
            e = np.array([a for a, _ in mem])
            j = np.array([b for _, b in mem])
            w = self.W_enc[e, j, :D].sum(axis=0) / self.E
            self._dirs[pid] = w
        return w

    def _stored_explanations(self, ids: set[str]) -> dict[tuple[str, str, str], Any]:
        """Explanations the explain stage wrote (possibly LLM-rewritten and guarded) for the selected images."""
        from sae_cxr.explain import EXPLANATIONS, Explanation

        info = self.run.stage("explain")
        if info is None or info.status != "done" or not self.run.sub(EXPLANATIONS).exists():
            return {}
        out: dict[tuple[str, str, str], Any] = {}
        with open(self.run.verify(EXPLANATIONS), encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                d = json.loads(line)
                if d.get("record_id") in ids:
                    e = Explanation.from_dict(d)
                    out[(e.record_id, e.finding, e.audience)] = e
        return out

    def _gallery_rows(self) -> dict[int, list[str]]:
        from sae_cxr.gallery import GALLERIES

        if self.run.stage("galleries") is None or not self.run.sub(GALLERIES).exists():
            return {}
        g = pd.read_parquet(self.run.verify(GALLERIES), columns=["pattern_id", "kind", "rank", "record_id"],
                            filters=[("kind", "==", "top"), ("rank", "<", self.cfg.gallery_images)])
        g = g.sort_values(["pattern_id", "rank"])
        return {int(p): [str(r) for r in grp["record_id"]] for p, grp in g.groupby("pattern_id", sort=False)}

    def gallery_png(self, pid: int) -> str | None:
        """Base64 PNG montage of a pattern's top gallery images (cached: a pattern recurs on many pages)."""
        if pid not in self._gallery_png:
            ids = self.gallery.get(pid, [])
            tiles = []
            for rid in ids:
                rec = self.records.get(rid)
                if rec is None:
                    continue
                thumb = _load_thumb(rec, 48)
                if thumb is not None:
                    tiles.append(_pad_square(thumb[0], 40))
            self._gallery_png[pid] = _b64png(_montage(tiles)) if tiles else None
        return self._gallery_png[pid]


# ------------------------------------------------------------------------------------------------
# Pictures
# ------------------------------------------------------------------------------------------------
_LUT: np.ndarray | None = None


def _inferno() -> np.ndarray:
    global _LUT
    if _LUT is None:
        from matplotlib import colormaps

        _LUT = (colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255 + 0.5).astype(np.uint8)
    return _LUT


def _b64png(im: Any) -> str:
    """PNG (fast compression: thumbnails are small, build speed matters more than bytes) as base64 text."""
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _load_thumb(rec: Any, max_side: int) -> tuple[np.ndarray, tuple[int, int]] | None:
    """(uint8 [h, w] thumbnail, (source width, source height)), or None if the image cannot be read.

    8-bit PNGs and JPEGs are read straight through Pillow (a thumbnail needs no float image), large
    JPEGs (MIMIC-CXR-JPG films are ~3000 px) at reduced scale in the DCT domain (draft mode, several
    times faster than a full decode and a resize); anything else (16-bit PNG, DICOM, a phantom loader)
    goes through the pipeline's own decoder."""
    from PIL import Image

    try:
        g = None
        if rec.loader is None and rec.path and str(rec.path).lower().endswith((".png", ".jpg", ".jpeg")):
            with Image.open(rec.path) as im:
                size = im.size
                if im.format == "JPEG" and im.mode in ("L", "RGB", "YCbCr", "CMYK"):
                    im.draft("L", (max_side, max_side))
                    g = im.convert("L")
                elif im.mode in ("L", "RGB"):
                    g = im.convert("L")
        if g is None:
            arr = rec.load_image()
            size = (int(arr.shape[1]), int(arr.shape[0]))
            g = Image.fromarray((np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8), mode="L")
        if max(g.size) > max_side:
            s = max_side / max(g.size)
            g = g.resize((max(1, round(g.width * s)), max(1, round(g.height * s))), Image.BILINEAR, reducing_gap=2.0)
        return np.asarray(g), size
    except Exception as e:  # an unreadable image must not sink a report of thousands
        log.warning("report: image of %s cannot be read (%s); shown as missing", rec.id, e)
        return None


def _pad_square(a: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray(a, mode="L")
    s = side / max(im.size)
    im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BILINEAR)
    out = np.zeros((side, side), np.uint8)
    y, x = (side - im.height) // 2, (side - im.width) // 2
    out[y:y + im.height, x:x + im.width] = np.asarray(im)
    return out


def _montage(tiles: list[np.ndarray]) -> Any:
    from PIL import Image

    n = len(tiles)
    cols = 2 if n > 1 else 1
    rows = (n + cols - 1) // cols
    side = tiles[0].shape[0]
    sheet = np.zeros((rows * side + rows - 1, cols * side + cols - 1), np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        sheet[r * (side + 1):r * (side + 1) + side, c * (side + 1):c * (side + 1) + side] = t
    return Image.fromarray(sheet, mode="L")


def heat_sprite(maps: np.ndarray, src_w: int, src_h: int, out_side: int) -> tuple[str | None, list[bool]]:
    """Heat overlays for maps [K, rows, cols] over the letterboxed model input, as ONE RGBA sprite
    (base64 PNG, the K overlays stacked vertically) and whether each map has a positive response.

    The model saw the film letterboxed into a square: each map is upsampled over that square and the
    padding is cropped off, as maps.to_image does, but at overlay resolution rather than in source
    pixels (the browser scales the overlay smoothly). Each map is scaled to its own maximum; negative
    responses are not drawn. One PNG per image instead of one per map: encoding dominates the cost."""
    from PIL import Image

    K = len(maps)
    if K == 0:
        return None, []
    if src_w >= src_h:
        ow, oh = out_side, max(1, round(out_side * src_h / src_w))
    else:
        ow, oh = max(1, round(out_side * src_w / src_h)), out_side
    side = max(ow, oh)
    y0, x0 = (side - oh) // 2, (side - ow) // 2
    lut = _inferno()
    sprite = np.zeros((K * oh, ow, 4), np.uint8)
    ok: list[bool] = []
    for k in range(K):
        m = np.ascontiguousarray(maps[k], dtype=np.float32)
        up = np.asarray(Image.fromarray(m, mode="F").resize((side, side), Image.BILINEAR))[y0:y0 + oh, x0:x0 + ow]
        h = np.clip(up, 0, None)
        top = float(h.max())
        if not np.isfinite(top) or top <= 0:
            ok.append(False)
            continue
        h = h / top
        tile = sprite[k * oh:(k + 1) * oh]
        tile[..., :3] = lut[(h * 255).astype(np.uint8)]
        tile[..., 3] = (np.sqrt(h) * 215).astype(np.uint8)
        ok.append(True)
    if not any(ok):
        return None, ok
    return _b64png(Image.fromarray(sprite, mode="RGBA")), ok


# ------------------------------------------------------------------------------------------------
# One image
# ------------------------------------------------------------------------------------------------
@dataclass
class _ImageDoc:
    """One image's data, as the page, the JSON and the long table see it."""

    rid: str
    row: int
    anchor: str
    decomps: dict[str, Any]  # finding -> Decomposition
    terms: dict[str, dict[str, float]]
    nuisance: dict[str, dict[str, float]]
    explanations: dict[str, dict[str, Any]]  # finding -> audience -> Explanation
    explanation_source: dict[str, str]
    maps: dict[int, np.ndarray]  # pattern -> grid map (only with patch tokens)


def _decompose_image(ctx: _Context, rid: str, row: int, full: Any, b: int, patches: np.ndarray | None) -> _ImageDoc:
    """The five decompositions of one image, built from the attribution tables exactly as
    attribution.DecompositionReader.get does (shares, labels, located map peaks)."""
    from sae_cxr.attribution_types import Decomposition, PatternEvidence
    from sae_cxr.explain import compose, decision_of
    from sae_cxr.maps import peak_location

    sel, cfg = ctx.sel, ctx.cfg
    maps: dict[int, np.ndarray] = {}

    def grid_map(pid: int) -> np.ndarray | None:
        if patches is None:
            return None
        if pid not in maps:
            maps[pid] = (patches @ ctx.direction(pid)).reshape(ctx.grid)
        return maps[pid]

    decomps: dict[str, Any] = {}
    terms: dict[str, dict[str, float]] = {}
    nuis: dict[str, dict[str, float]] = {}
    exps: dict[str, dict[str, Any]] = {}
    source: dict[str, str] = {}
    C = full.contributions[b]  # [P, C]
    for c, f in enumerate(FINDINGS):
        p = sel.pred[(rid, f)]
        span = sel.spans.get((rid, f))
        pats: list[PatternEvidence] = []
        if span is not None:
            s, e = span
            con = sel.contrib["contribution"][s:e]
            total = float(np.abs(con).sum() / max(float(p["coverage"]), 1e-12))
            for rank in range(e - s):
                pid = int(sel.contrib["pattern_id"][s + rank])
                lab = ctx.labels.get(pid)
                loc = None
                if rank < cfg.located:
                    g = grid_map(pid)
                    loc = peak_location(g) if g is not None else None
                cv = float(con[rank])
                pats.append(PatternEvidence(
                    pattern_id=pid, contribution=cv, activation=float(sel.contrib["activation"][s + rank]),
                    label=None if lab is None or lab.unresolved else lab.label,
                    category=None if lab is None else lab.category,
                    description=None if lab is None else lab.description,
                    verification=None if lab is None else lab.verification,
                    flagged=False if lab is None else bool(lab.flagged),
                    location=loc, share=min(1.0, abs(cv) / total) if total > 0 else 0.0))
        d = Decomposition(record_id=rid, finding=f, logit=float(p["logit"]), probability=float(p["probability"]),
                          label=float(p["label"]), patterns=pats, unassigned=float(p["unassigned"]),
                          skip=float(p["skip"]), bias=float(p["bias"]), error=float(p["error"]),
                          n_active_patterns=int(p["n_active_patterns"]), coverage=float(p["coverage"]))
        decomps[f] = d
        col = C[:, c]
        patterns_total = float(col.sum())
        terms[f] = {"patterns": patterns_total, "unassigned": d.unassigned, "skip": d.skip, "bias": d.bias,
                    "error": d.error}
        mag = np.abs(col)
        tot = float(mag.sum())
        decision = decision_of(d, ctx.compose_cfg)
        aligned = (col > 0) if decision else (col < 0)
        aligned_share = float(mag[ctx.nuisance & aligned].sum() / tot) if tot > 0 else 0.0
        nuis[f] = {"device_share": float(mag[ctx.device].sum() / tot) if tot > 0 else 0.0,
                   "artifact_share": float(mag[ctx.artifact].sum() / tot) if tot > 0 else 0.0,
                   "decision_aligned_nuisance_share": aligned_share,
                   "shortcut": bool(aligned_share > ctx.compose_cfg.shortcut_share)}
        exps[f] = {}
        src = "explain stage"
        for a in ctx.audiences:
            ex = ctx.explanations.get((rid, f, a))
            if ex is None:
                ex = compose(d, a, ctx.compose_cfg, ctx.extractor)
                src = "composed by the report"
            exps[f][a] = ex
        source[f] = src
        # maps for every pattern the page shows (located ones are already computed)
        for pe in pats[: cfg.top_patterns]:
            grid_map(pe.pattern_id)
    return _ImageDoc(rid=rid, row=row, anchor=f"img-{safe_name(rid)}", decomps=decomps, terms=terms,
                     nuisance=nuis, explanations=exps, explanation_source=source, maps=maps)


_FIELDS: dict[type, tuple[str, ...]] = {}


def _shallow(obj: Any) -> dict[str, Any]:
    names = _FIELDS.get(type(obj))
    if names is None:
        names = _FIELDS[type(obj)] = tuple(f.name for f in fields(obj))
    return {n: getattr(obj, n) for n in names}


def decomposition_dict(d: Any) -> dict[str, Any]:
    """Decomposition.to_dict without the deep copy (same keys and values; Decomposition.from_dict reads it)."""
    out = _shallow(d)
    out["patterns"] = [_shallow(p) for p in d.patterns]
    return out


def explanation_dict(e: Any) -> dict[str, Any]:
    """Explanation.to_dict without the deep copy."""
    out = _shallow(e)
    out["parts"] = [list(p) for p in e.parts]
    return out


def _image_json(ctx: _Context, doc: _ImageDoc, rec: Any, manifest_sha: str, size: tuple[int, int] | None,
                page_file: str) -> dict[str, Any]:
    findings: dict[str, Any] = {}
    for f in FINDINGS:
        d = doc.decomps[f]
        reported = sum(p.contribution for p in d.patterns)
        t = doc.terms[f]
        findings[f] = {
            "probability": d.probability, "logit": d.logit, "label": d.label,
            "decision": bool(doc.explanations[f][ctx.audiences[0]].decision),
            "terms": t,
            "terms_sum": t["patterns"] + t["unassigned"] + t["skip"] + t["bias"] + t["error"],
            "reported_sum": reported,
            "unreported": t["patterns"] - reported,
            "nuisance": doc.nuisance[f],
            "decomposition": decomposition_dict(d),
            "explanations": {a: explanation_dict(e) for a, e in doc.explanations[f].items()},
            "explanation_source": doc.explanation_source[f],
        }
    return {
        "schema": IMAGE_SCHEMA, "record_id": doc.rid, "split": rec.split, "row": doc.row,
        "run": {"path": str(ctx.run.path), "manifest_sha256": manifest_sha},
        "page": page_file, "anchor": doc.anchor,
        "image": {"path": rec.path, "width": size[0] if size else None, "height": size[1] if size else None},
        "ground_truth": {"labels": {f: (None if math.isnan(v) else float(v)) for f, v in zip(FINDINGS, rec.labels)},
                         "concepts": list(rec.concepts), "boxes": [b.to_dict() for b in rec.boxes],
                         "report": rec.report},
        "terms_note": "terms.patterns + unassigned + skip + bias + error = logit (patterns: ALL active patterns, "
                      "from the full decomposition); reported_sum + unreported = terms.patterns",
        "findings": findings,
    }


def _long_rows(doc: _ImageDoc, split: str) -> dict[str, list]:
    out: dict[str, list] = {k: [] for k in LONG_COLUMNS}
    for f in FINDINGS:
        d = doc.decomps[f]
        for rank, p in enumerate(d.patterns):
            for k, v in (("record_id", doc.rid), ("split", split), ("finding", f), ("probability", d.probability),
                         ("logit", d.logit), ("label", np.nan if d.label is None else d.label),
                         ("pattern_id", p.pattern_id), ("contribution", p.contribution),
                         ("activation", p.activation), ("share", p.share), ("rank", rank),
                         ("pattern_label", p.label), ("category", p.category),
                         ("verification", p.verification), ("flagged", p.flagged)):
                out[k].append(v)
    return out


def _long_schema():
    import pyarrow as pa

    return pa.schema([("record_id", pa.string()), ("split", pa.string()), ("finding", pa.string()),
                      ("probability", pa.float64()), ("logit", pa.float64()), ("label", pa.float64()),
                      ("pattern_id", pa.int64()), ("contribution", pa.float64()), ("activation", pa.float64()),
                      ("share", pa.float64()), ("rank", pa.int32()), ("pattern_label", pa.string()),
                      ("category", pa.string()), ("verification", pa.float64()), ("flagged", pa.bool_())])


# ------------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------------
_CSS = """
:root{--fg:#1d2430;--muted:#5b6575;--line:#d9dee6;--pos:#c0392b;--neg:#2471a3;--dev:#e67e22;--art:#8e44ad;--bg:#fff}
*{box-sizing:border-box}body{font:13px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);
background:var(--bg);margin:0 auto;max-width:1280px;padding:12px 18px}
h1{font-size:20px;margin:8px 0}h2{font-size:16px;margin:6px 0}h3{font-size:14px;margin:10px 0 4px}
nav{position:sticky;top:0;background:#f5f7fa;border-bottom:1px solid var(--line);padding:6px 8px;z-index:2}
nav a{margin-right:12px}a{color:#1f5fa8;text-decoration:none}a:hover{text-decoration:underline}
.meta{color:var(--muted);font-size:12px}.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:11px}
table{border-collapse:collapse;margin:4px 0}td,th{border-bottom:1px solid var(--line);padding:2px 6px;
text-align:left;vertical-align:middle}th{background:#f5f7fa;font-weight:600}td.n,th.n{text-align:right;
font-variant-numeric:tabular-nums}
section.img{border:1px solid var(--line);border-radius:6px;padding:8px 10px;margin:14px 0}
.top{display:flex;gap:16px;flex-wrap:wrap;align-items:flex-start}
.pic{position:relative;background-size:100% 100%;background-repeat:no-repeat;background-color:#000;flex:none}
.pic svg{position:absolute;left:0;top:0;width:100%;height:100%}
.tile{position:relative;display:inline-block;background-size:100% 100%;background-color:#000;vertical-align:middle}
.hm{position:absolute;left:0;top:0;width:100%;height:100%;background-repeat:no-repeat}
.g{display:inline-block;width:54px;height:54px;background-size:100% 100%;background-color:#000;vertical-align:middle}
.bar{display:inline-block;height:9px;background:var(--pos);vertical-align:middle;margin-right:4px}
.cat{display:inline-block;border-radius:3px;padding:0 4px;font-size:11px;background:#eef1f5}
.cat.device{background:#fbe3cc;color:#8a4a0b}.cat.artifact{background:#ead7f3;color:#5b2a73}
.warn{color:#a04000;font-weight:600}.flag{color:#a04000}
details.finding{border-top:1px dashed var(--line);padding:4px 0}details.finding>summary{cursor:pointer;padding:2px 0}
.fgrid{display:flex;gap:14px;flex-wrap:wrap;align-items:flex-start}
.nle{margin:4px 0;max-width:1100px}.nle b{color:var(--muted)}
.chips span{margin-right:6px}
.plot{width:100%;max-width:900px;height:340px}
"""


def _esc(s: Any) -> str:
    return html.escape("" if s is None else str(s), quote=True)


def _fmt(v: float | None, nd: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:+.{nd}f}" if nd >= 0 else str(v)


def _label_text(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "?"
    return str(int(v))


def _pattern_name(p: Any) -> str:
    return p.label if p.label else f"pattern {p.pattern_id} (unnamed)"


def _cat_chip(cat: str | None) -> str:
    return f'<span class="cat {_esc(cat or "")}">{_esc(cat or "unknown")}</span>'


def _page_head(title: str, csp: str, extra_style: str = "") -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{_CSS}{extra_style}</style></head><body>\n")


def waterfall_svg(d: Any, patterns_total: float | None, n_patterns: int, width: int = 380) -> str:
    """A horizontal waterfall of one finding's logit as inline SVG: bias, skip, unassigned latents, the
    top patterns, the other active patterns, the transcoders' error, and the logit they add up to."""
    shown = d.patterns[:n_patterns]
    steps: list[tuple[str, float, str, str]] = [("bias", d.bias, "term", "W2·b_dec + b2: the image-independent part")]
    if d.skip != 0.0:
        steps.append(("skip path", d.skip, "term", "the transcoders' skip path"))
    steps.append(("unassigned latents", d.unassigned, "term", "active latents in no pattern"))
    for p in shown:
        steps.append((f"#{p.pattern_id} {_pattern_name(p)}", p.contribution, p.category or "",
                      f"pattern {p.pattern_id}: {_pattern_name(p)} [{p.category or 'unknown'}], share {p.share:.1%}"))
    total_patterns = patterns_total if patterns_total is not None else sum(p.contribution for p in d.patterns) + d.unreported
    rest = total_patterns - sum(p.contribution for p in shown)
    n_rest = max(d.n_active_patterns - len(shown), 0)
    steps.append((f"{n_rest} other active patterns", rest, "term", "every other active pattern, summed"))
    steps.append(("error (h − ĥ)", d.error, "term", "what the transcoders fail to reconstruct"))
    run_ = [0.0]
    for _, v, _, _ in steps:
        run_.append(run_[-1] + v)
    lo, hi = min(min(run_), d.logit, 0.0), max(max(run_), d.logit, 0.0)
    if hi - lo < 1e-9:
        hi = lo + 1.0
    lab_w, val_w, row_h = 150, 52, 13
    bar_w = width - lab_w - val_w

    def X(v: float) -> float:
        return lab_w + (v - lo) / (hi - lo) * bar_w

    n = len(steps) + 1
    height = n * row_h + 6
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-size="10" font-family="system-ui,sans-serif">',
             f'<line x1="{X(0):.1f}" y1="0" x2="{X(0):.1f}" y2="{height}" stroke="#999" stroke-width="0.6"/>']
    for i, (name, v, kind, tip) in enumerate(steps):
        y = i * row_h + 2
        a, b = run_[i], run_[i + 1]
        x0, x1 = sorted((X(a), X(b)))
        col = "#c0392b" if v > 0 else "#2471a3"
        mark = {"device": "#e67e22", "artifact": "#8e44ad"}.get(kind)
        label = name if len(name) <= 26 else name[:25] + "…"
        parts.append(f'<g><title>{_esc(tip)}: {v:+.4f}</title>'
                     f'<text x="{lab_w - 4}" y="{y + 9}" text-anchor="end" fill="{mark or "#333"}">{_esc(label)}</text>'
                     f'<rect x="{x0:.1f}" y="{y + 1}" width="{max(x1 - x0, 0.8):.1f}" height="{row_h - 3}" fill="{col}"/>'
                     f'<text x="{width - 2}" y="{y + 9}" text-anchor="end" fill="#333">{v:+.3f}</text></g>')
    y = (n - 1) * row_h + 2
    x0, x1 = sorted((X(0), X(d.logit)))
    parts.append(f'<g><title>logit {d.logit:+.4f} (p = {d.probability:.3f})</title>'
                 f'<text x="{lab_w - 4}" y="{y + 9}" text-anchor="end" font-weight="bold">logit</text>'
                 f'<rect x="{x0:.1f}" y="{y + 1}" width="{max(x1 - x0, 0.8):.1f}" height="{row_h - 3}" fill="#34495e"/>'
                 f'<text x="{width - 2}" y="{y + 9}" text-anchor="end" font-weight="bold">{d.logit:+.3f}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def _boxes_svg(boxes: Sequence[Any], size: tuple[int, int]) -> str:
    if not boxes:
        return ""
    from sae_cxr.viz import box_color

    W, H = size
    sw = max(W, H) / 160
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" preserveAspectRatio="none">']
    for b in boxes:
        r, g, bl = box_color(b.label)
        out.append(f'<rect x="{b.x:.1f}" y="{b.y:.1f}" width="{b.w:.1f}" height="{b.h:.1f}" fill="none" '
                   f'stroke="rgb({r},{g},{bl})" stroke-width="{sw:.2f}"><title>{_esc(b.label)}</title></rect>')
    out.append("</svg>")
    return "".join(out)


def _image_section(ctx: _Context, doc: _ImageDoc, rec: Any, img_class: str | None, size: tuple[int, int] | None,
                   tiles: dict[int, int], n_tiles: int, heat_class: str, styles: dict[str, str]) -> str:
    cfg = ctx.cfg
    W, H = size if size else (1, 1)
    th = cfg.thumb_size if max(W, H) > cfg.thumb_size else max(W, H)
    tw_main = max(1, round(th * W / max(W, H))) if size else th
    th_main = max(1, round(th * H / max(W, H))) if size else th
    scale = 200 / max(tw_main, th_main)  # display at 200 px whatever the thumbnail size
    pw, ph = round(tw_main * scale), round(th_main * scale)
    o: list[str] = [f'<section class="img" id="{doc.anchor}"><h2>{_esc(doc.rid)} '
                    f'<span class="meta">split {_esc(rec.split)} · row {doc.row}</span></h2><div class="top">']
    if img_class:
        o.append(f'<div class="pic {img_class}" style="width:{pw}px;height:{ph}px" role="img" '
                 f'aria-label="image {_esc(doc.rid)}">{_boxes_svg(rec.boxes, size)}</div>')
    else:
        o.append('<div class="pic" style="width:200px;height:200px"></div>')
    # prediction table
    o.append('<div><table><tr><th>finding</th><th class="n">p</th><th></th><th class="n">label</th>'
             '<th class="n">logit</th><th class="n">error</th><th class="n">device+artifact</th>'
             '<th>strongest pattern</th></tr>')
    for f in FINDINGS:
        d = doc.decomps[f]
        nu = doc.nuisance[f]
        top = d.patterns[0] if d.patterns else None
        ns = nu["device_share"] + nu["artifact_share"]
        warn = ' <span class="warn" title="decision-aligned device/artifact evidence above the shortcut threshold">⚠ shortcut</span>' if nu["shortcut"] else ""
        o.append(f'<tr><td><a href="#{doc.anchor}-{_slug(f)}">{_esc(f)}</a></td><td class="n">{d.probability:.3f}</td>'
                 f'<td><span class="bar" style="width:{max(1, round(60 * d.probability))}px"></span></td>'
                 f'<td class="n">{_label_text(d.label)}</td><td class="n">{d.logit:+.2f}</td>'
                 f'<td class="n">{d.error:+.2f}</td><td class="n">{ns:.0%}{warn}</td>'
                 f'<td>{_esc(_pattern_name(top)) + " " + _cat_chip(top.category) if top else "–"}</td></tr>')
    o.append("</table>")
    chips = []
    if rec.concepts:
        chips.append(f'<span><b>concepts:</b> {_esc(", ".join(rec.concepts))}</span>')
    if rec.report:
        chips.append(f'<span><b>report:</b> {_esc(rec.report[:600])}</span>')
    if chips:
        o.append(f'<p class="meta chips">{"".join(chips)}</p>')
    o.append("</div></div>")
    for f in FINDINGS:
        d = doc.decomps[f]
        exps = doc.explanations[f]
        decision = exps[ctx.audiences[0]].decision
        is_open = " open" if (decision or d.label == 1.0) else ""
        nu = doc.nuisance[f]
        o.append(f'<details class="finding" id="{doc.anchor}-{_slug(f)}"{is_open}><summary><b>{_esc(f)}</b> '
                 f'p = {d.probability:.3f} ({"positive" if decision else "negative"} call), label '
                 f'{_label_text(d.label)} · {d.n_active_patterns} active patterns, {len(d.patterns)} reported '
                 f'({d.coverage:.0%} of the evidence) · device {nu["device_share"]:.0%}, artifact '
                 f'{nu["artifact_share"]:.0%}{" · <span class=warn>⚠ shortcut</span>" if nu["shortcut"] else ""}'
                 f'</summary><div class="fgrid"><div>'
                 f'{waterfall_svg(d, doc.terms[f]["patterns"], cfg.waterfall_patterns)}</div>')
        o.append('<table><tr><th class="n">#</th><th>map</th><th>gallery</th><th>pattern</th><th>category</th>'
                 '<th class="n">contribution</th><th class="n">share</th><th>where</th></tr>')
        tw = cfg.tile_size
        tile_w = max(1, round(tw * W / max(W, H)))
        tile_h = max(1, round(tw * H / max(W, H)))
        for rank, p in enumerate(d.patterns[: cfg.top_patterns]):
            k = tiles.get(p.pattern_id)
            if img_class and k is not None:
                pos = 100.0 * k / (n_tiles - 1) if n_tiles > 1 else 0.0
                tile = (f'<span class="tile {img_class}" style="width:{tile_w}px;height:{tile_h}px" role="img" '
                        f'aria-label="map of pattern {p.pattern_id} on this image"><span class="hm {heat_class}" '
                        f'style="background-position:0 {pos:.4f}%"></span></span>')
            else:
                tile = '<span class="meta">no map</span>'
            gal = ctx.gallery_png(p.pattern_id)
            if gal:
                cls = f"g{p.pattern_id}"
                styles.setdefault(cls, gal)
                gal_html = f'<span class="g {cls}" title="top images of pattern {p.pattern_id}"></span>'
            else:
                gal_html = '<span class="meta">–</span>'
            ver = "" if p.verification is None else f' <span class="meta">verified {p.verification:.2f}</span>'
            flag = ' <span class="flag" title="the name failed verification">(tentative)</span>' if p.flagged else ""
            o.append(f'<tr><td class="n">{rank + 1}</td><td>{tile}</td><td>{gal_html}</td>'
                     f'<td><span class="mono">#{p.pattern_id}</span> {_esc(_pattern_name(p))}{flag}{ver}</td>'
                     f'<td>{_cat_chip(p.category)}</td><td class="n" style="color:'
                     f'{"var(--pos)" if p.contribution > 0 else "var(--neg)"}">{p.contribution:+.3f}</td>'
                     f'<td class="n">{p.share:.1%}</td><td>{_esc(p.location or "")}</td></tr>')
        if len(d.patterns) > cfg.top_patterns:
            o.append(f'<tr><td></td><td colspan="7" class="meta">{len(d.patterns) - cfg.top_patterns} more reported '
                     f'patterns in evidence.csv and json/{_esc(safe_name(doc.rid))}.json</td></tr>')
        o.append("</table></div>")
        for a in ctx.audiences:
            e = exps[a]
            cav = "".join(f' <span class="warn">[{_esc(c)}]</span>' for c in e.caveats)
            o.append(f'<p class="nle"><b>{_esc(a)}:</b> {_esc(e.text)}{cav}</p>')
        o.append("</details>")
    o.append("</section>\n")
    return "".join(o)


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def _nav(index: str, prev: str | None, nxt: str | None, label: str) -> str:
    links = [f'<a href="{index}">index &amp; summary</a>']
    links.append(f'<a href="{prev}">← previous page</a>' if prev else '<span class="meta">← previous page</span> ')
    links.append(f'<a href="{nxt}">next page →</a>' if nxt else '<span class="meta">next page →</span>')
    return f"<nav>{''.join(links)} <span class='meta'>{_esc(label)}</span></nav>\n"


# ------------------------------------------------------------------------------------------------
# Summary accumulators
# ------------------------------------------------------------------------------------------------
class _Audit:
    """Shortcut-audit sums over the full decompositions of every reported image: the per-pattern sums
    of `sae_cxr.audit` (category shares are derived from them), plus the positive-call support."""

    def __init__(self, P: int, groups: np.ndarray | None = None, group_keys: Sequence[tuple[str, str]] | None = None,
                 n_terms: int = 0):
        from sae_cxr.audit import EvidenceSums
        from sae_cxr.contrast import ContrastSums

        C = len(FINDINGS)
        self.n_terms = n_terms
        self.sums = EvidenceSums.zeros(P, C, groups=groups, group_keys=group_keys, by_label=True)
        # the adjusted logit contrast of each label detector among each finding's negatives (sae_cxr.contrast)
        self.contrast = [ContrastSums.zeros(c, C, n_terms, P) for c in range(C)] if n_terms else None
        self.pos_support = np.zeros(C)
        self.pos_support_nuisance = np.zeros(C)
        self.n_pos = np.zeros(C, dtype=np.int64)
        self.carried = np.zeros(C, dtype=np.int64)

    def add(self, ctx: _Context, batch: Any, docs: Sequence[_ImageDoc], labels: np.ndarray) -> None:
        """One page: its full decompositions (`AttributionBatch`), documents and finding labels [B, C]."""
        contributions = batch.contributions  # [B, P, C]
        self.sums.add(contributions, labels)
        if self.contrast is not None:
            present = ctx.detectors.present(batch.activations)
            for cs in self.contrast:
                cs.add(contributions, batch.logit, labels, present)
        for b, doc in enumerate(docs):
            for c, f in enumerate(FINDINGS):
                if doc.explanations[f][ctx.audiences[0]].decision:
                    col = contributions[b, :, c]
                    pos = np.clip(col, 0, None)
                    self.n_pos[c] += 1
                    self.pos_support[c] += pos.sum()
                    self.pos_support_nuisance[c] += pos[ctx.nuisance].sum()
                self.carried[c] += int(doc.nuisance[f]["shortcut"])

    @classmethod
    def merged(cls, P: int, parts: Sequence[_Audit]) -> _Audit:
        """The sums over several ranks' blocks of pages, added in rank (= page) order. One part is
        returned as it is; with several, sums equal one process's up to float rounding (order of addition)."""
        if len(parts) == 1:
            return parts[0]
        out = cls(P, parts[0].sums.groups, parts[0].sums.group_keys, parts[0].n_terms)
        for part in parts:
            out.sums.merge(part.sums)
            if out.contrast is not None:
                for mine, theirs in zip(out.contrast, part.contrast):
                    mine.merge(theirs)
            for k in ("pos_support", "pos_support_nuisance", "n_pos", "carried"):
                setattr(out, k, getattr(out, k) + getattr(part, k))
        return out

    def rows(self, ctx: _Context) -> list[dict[str, Any]]:
        from sae_cxr.audit import audit_finding

        mag = self.sums.magnitude  # [P, C] sum of |contribution| per pattern

        def share(part: np.ndarray, c: int, tot: float) -> float:
            return float(mag[part, c].sum() / tot) if tot > 0 else 0.0

        out = []
        for c, f in enumerate(FINDINGS):
            tot = float(mag[:, c].sum())
            nuis = np.flatnonzero(ctx.nuisance)
            top = None
            if len(nuis):
                k = int(nuis[np.argmax(mag[nuis, c])])
                if mag[k, c] > 0:
                    lab = ctx.labels.get(k)
                    top = {"pattern_id": k, "label": None if lab is None else lab.label,
                           "category": None if lab is None else lab.category,
                           "share": float(mag[k, c] / tot) if tot > 0 else 0.0}
            top_label = None
            if self.sums.groups is not None:
                # the label whose patterns together move this logit most from image to image
                grouped = audit_finding(self.sums, c, ctx.label_frame, f).groups
                if len(grouped):
                    g = grouped.iloc[0]
                    top_label = {"label": g["label"], "category": g["category"], "patterns": int(g["n_patterns"]),
                                 "swing": float(g["swing"]),
                                 "separation": float(g["separation"]) if np.isfinite(g["separation"]) else None,
                                 "share": float(g["share"])}
            out.append({
                "finding": f,
                "top_nuisance_contrast": self._top_contrast(ctx, c),
                "device_share": share(ctx.device, c, tot),
                "artifact_share": share(ctx.artifact, c, tot),
                "unnamed_share": share(~ctx.named, c, tot),
                "positive_calls": int(self.n_pos[c]),
                "nuisance_share_of_support_in_positive_calls":
                    float(self.pos_support_nuisance[c] / self.pos_support[c]) if self.pos_support[c] > 0 else None,
                "predictions_with_shortcut": int(self.carried[c]),
                "images": int(self.sums.n_images),
                "top_nuisance_pattern": top,
                "top_nuisance_label": top_label,
            })
        return out

    def _top_contrast(self, ctx: _Context, c: int) -> dict[str, Any] | None:
        """The label detector with the largest adjusted contrast of finding c's logit, and the runner-up."""
        from sae_cxr.contrast import contrast_table

        if self.contrast is None:
            return None
        t = contrast_table(self.contrast[c], ctx.detectors.terms, ctx.label_frame, ctx.cfg.contrast_min_images)
        if not len(t):
            return None
        top = t.iloc[0]
        return {"label": top["display"], "category": top["category"], "contrast": float(top["contrast"]),
                "se": float(top["se"]) if np.isfinite(top["se"]) else None, "n_with": int(top["n_with"]),
                "next_label": t.iloc[1]["display"] if len(t) > 1 else None,
                "gap": float(top["contrast"] - t.iloc[1]["contrast"]) if len(t) > 1 else None}


def _top_contrast_cell(row: dict[str, Any]) -> str:
    """The nuisance whose presence moves the logit most among the finding's negatives (others held fixed)."""
    t = row.get("top_nuisance_contrast")
    if not t:
        return "–"
    se = "" if t["se"] is None else f" ± {t['se']:.2f}"
    nxt = "" if t["next_label"] is None else f', next {_esc(t["next_label"])} ({t["gap"]:.2f} lower)'
    return (f'{_esc(t["label"])} {_cat_chip(t["category"])} <span class="meta">{t["contrast"]:+.2f}{se} logit on '
            f'{t["n_with"]} images{nxt}</span>')


def _top_label_cell(row: dict[str, Any]) -> str:
    """A nuisance split over several patterns (image-wide artifacts often are) is seen whole in its label."""
    t = row.get("top_nuisance_label")
    if not t:
        return "–"
    sep = t.get("separation")
    sep_text = "" if sep is None else f", separation {sep:+.3f}"
    return (f'{_esc(t["label"])} {_cat_chip(t["category"])} <span class="meta">{t["patterns"]} pattern'
            f'{"s" if t["patterns"] != 1 else ""}, swing {t["swing"]:.3f} logit{sep_text}</span>')


def _top_patterns(ctx: _Context, limit: int, max_rank: int) -> list[dict[str, Any]]:
    """Patterns most often among the top `max_rank` of a prediction's reported evidence."""
    sel = ctx.sel
    ranks = sel.contrib["rank"]
    keep = ranks < max_rank
    if not keep.any():
        return []
    pid = sel.contrib["pattern_id"][keep]
    con = sel.contrib["contribution"][keep]
    # finding of each contribution row, from the spans
    fid = np.empty(len(ranks), dtype=np.int16)
    for (rid, f), (s, e) in sel.spans.items():
        fid[s:e] = FINDINGS.index(f)
    fid = fid[keep]
    df = pd.DataFrame({"pattern_id": pid, "contribution": con, "finding": fid})
    g = df.groupby("pattern_id")
    counts = g.size().sort_values(ascending=False, kind="stable").head(limit)
    out = []
    for p, n in counts.items():
        sub = df[df["pattern_id"] == p]
        by_f = sub.groupby("finding").size()
        lab = ctx.labels.get(int(p))
        out.append({"pattern_id": int(p), "count": int(n),
                    "label": None if lab is None or lab.unresolved else lab.label,
                    "category": None if lab is None else lab.category,
                    "verification": None if lab is None else lab.verification,
                    "flagged": bool(lab.flagged) if lab is not None else False,
                    "mean_contribution": float(sub["contribution"].mean()),
                    "positive_share": float((sub["contribution"] > 0).mean()),
                    "by_finding": {FINDINGS[int(k)]: int(v) for k, v in by_f.items()}})
    return out


def _worst_explained(ctx: _Context, limit: int, pages: dict[str, str]) -> list[dict[str, Any]]:
    """Predictions whose transcoder error is largest relative to the logit (|logit| floored, as the
    explanation's error caveat does, so near-zero logits do not crowd the list)."""
    p = ctx.sel.preds
    floor = ctx.compose_cfg.error_logit_floor
    ratio = p["error"].abs() / np.maximum(p["logit"].abs(), floor)
    top = p.assign(ratio=ratio).sort_values("ratio", ascending=False, kind="stable").head(limit)
    return [{"record_id": str(r.record_id), "finding": str(r.finding), "logit": float(r.logit),
             "error": float(r.error), "ratio": float(r.ratio), "probability": float(r.probability),
             "label": None if math.isnan(r.label) else float(r.label),
             "href": f"{pages[str(r.record_id)]}#img-{safe_name(str(r.record_id))}-{_slug(str(r.finding))}"}
            for r in top.itertuples(index=False)]


def _auroc(run: RunDir) -> dict[str, Any]:
    from sae_cxr.classifier import METRICS

    if run.stage("train-classifier") is None or not run.sub(METRICS).exists():
        return {}
    return json.loads(run.verify(METRICS).read_text()).get("metrics", {})


# ------------------------------------------------------------------------------------------------
# Index page
# ------------------------------------------------------------------------------------------------
def _plotly_bundle() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _fig_html(fig: Any) -> str:
    import plotly.io as pio

    return pio.to_html(fig, include_plotlyjs=False, full_html=False, default_height="340px",
                       config={"displaylogo": False, "responsive": True})


def _auroc_figure(metrics: dict[str, Any], split: str) -> str:
    import plotly.graph_objects as go

    fig = go.Figure()
    order = [s for s in ("val", "test", "test_shifted") if s in metrics] + \
            [s for s in metrics if s not in ("val", "test", "test_shifted")]
    for s in order:
        m = metrics[s]
        # a finding with no positives (or no negatives) in a split has no AUROC: leave it out, not as 0
        xs = [f for f in FINDINGS if f in m and m[f].get("auroc", {}).get("value") is not None]
        v = [float(m[f]["auroc"]["value"]) for f in xs]
        lows = [m[f]["auroc"].get("low") for f in xs]
        highs = [m[f]["auroc"].get("high") for f in xs]
        lo = [0.0 if a is None else val - float(a) for val, a in zip(v, lows)]
        hi = [0.0 if b is None else float(b) - val for val, b in zip(v, highs)]
        fig.add_trace(go.Scatter(x=xs, y=v, mode="markers", name=s + (" (this report)" if s == split else ""),
                                 marker={"size": 11 if s == split else 8},
                                 error_y={"type": "data", "array": hi, "arrayminus": lo, "visible": True}))
    fig.update_layout(template="simple_white", margin={"l": 50, "r": 10, "t": 30, "b": 40},
                      yaxis={"title": "AUROC (95% bootstrap interval)"}, title="AUROC per finding and split",
                      legend={"orientation": "h", "y": -0.2})
    return _fig_html(fig)


def _audit_figure(rows: list[dict[str, Any]]) -> str:
    import plotly.graph_objects as go

    xs = [r["finding"] for r in rows]
    fig = go.Figure([
        go.Bar(x=xs, y=[r["device_share"] for r in rows], name="device patterns", marker_color="#e67e22"),
        go.Bar(x=xs, y=[r["artifact_share"] for r in rows], name="artifact patterns", marker_color="#8e44ad"),
    ])
    fig.update_layout(barmode="stack", template="simple_white", margin={"l": 50, "r": 10, "t": 30, "b": 40},
                      yaxis={"title": "share of |evidence|", "tickformat": ".0%"},
                      title="Evidence from device and artifact patterns (all active patterns)",
                      legend={"orientation": "h", "y": -0.2})
    return _fig_html(fig)


def _index_html(ctx: _Context, info: dict[str, Any], metrics: dict[str, Any], audit: list[dict[str, Any]],
                top: list[dict[str, Any]], worst: list[dict[str, Any]], pages: list[dict[str, Any]],
                page_of: dict[str, str]) -> str:
    styles: dict[str, str] = {}
    o: list[str] = []
    split = ctx.cfg.split
    o.append(f"<h1>Attribution report: {_esc(info['run_name'])} · split {_esc(split)}</h1>")
    o.append(f'<p class="meta">{info["images"]} images on {len(pages)} pages · built {_esc(info["built_at"])} in '
             f'{info["build_seconds"]:.1f} s · sae-cxr {_esc(info["version"])}<br>run <span class="mono">'
             f'{_esc(info["run_path"])}</span><br>manifest sha256 <span class="mono">{_esc(info["manifest_sha256"])}'
             f'</span> (the run as it was when this report was built)</p>')
    o.append('<p>Tables: <a href="evidence.csv">evidence.csv</a> · <a href="evidence.parquet">evidence.parquet</a> '
             '(one row per image × finding × reported pattern) · <a href="images.csv">images.csv</a> (image → page, '
             'JSON) · <a href="report.json">report.json</a> (this summary) · per-image JSON in json/</p>')
    # AUROC
    o.append("<h2>Classifier: AUROC per finding</h2>")
    m = metrics.get(split)
    if m:
        o.append('<table><tr><th>finding</th><th class="n">AUROC</th><th class="n">95% interval</th>'
                 '<th class="n">AUPRC</th><th class="n">95% interval</th><th class="n">n</th><th class="n">positives</th></tr>')
        for f in FINDINGS:
            if f not in m:
                continue
            a, p = m[f]["auroc"], m[f]["auprc"]

            def ci(x: dict[str, Any]) -> str:
                return "–" if x.get("low") is None else f"[{x['low']:.3f}, {x['high']:.3f}]"

            val = (lambda x: "–" if x.get("value") is None else f"{x['value']:.3f}")
            o.append(f'<tr><td>{_esc(f)}</td><td class="n">{val(a)}</td><td class="n">{ci(a)}</td>'
                     f'<td class="n">{val(p)}</td><td class="n">{ci(p)}</td><td class="n">{a.get("n", "")}</td>'
                     f'<td class="n">{a.get("n_pos", "")}</td></tr>')
        o.append("</table>")
        if ctx.cfg.ids is not None or ctx.cfg.max_images is not None:
            o.append('<p class="meta">AUROC is over the whole split (classifier/metrics.json), not only the images '
                     'of this report.</p>')
    else:
        o.append(f'<p class="meta">No classifier metrics for split {_esc(split)} (metrics exist for '
                 f'{_esc(", ".join(metrics) or "no split")}).</p>')
    if metrics:
        o.append(f'<div class="plot">{_auroc_figure(metrics, split)}</div>')
    # audit
    thr = ctx.compose_cfg.shortcut_share
    o.append("<h2>Shortcut audit</h2>")
    o.append(f'<p class="meta">Share of each finding\'s evidence (sum of |contribution| over ALL active patterns of '
             f'every image in this report, from the full decomposition) that comes from patterns labelled device or '
             f'artifact. "Support in positive calls": of the evidence pushing towards the finding in the images '
             f'called positive, the share from device/artifact patterns. "Shortcut predictions": predictions whose '
             f'decision-aligned device/artifact evidence exceeds {thr:.0%} of their evidence (the explanation\'s '
             f'shortcut caveat, computed over all patterns). "Unnamed": patterns without a resolved label, whose '
             f'category is uncertain. "Nuisance contrast": among the images labelled negative for the finding, the '
             f'change of its logit that goes with each device/artifact label\'s detector (the label\'s most stable '
             f'pattern above its Otsu cut), all labels and the other findings fitted jointly; a shortcut shows as a '
             f'large positive contrast even where the finding\'s own patterns carry its push.</p>')
    if not ctx.labels:
        o.append('<p class="warn">The label stage has not run: no pattern has a category, so the audit cannot '
                 'see device or artifact patterns. Run `sae-cxr label` and rebuild the report.</p>')
    o.append('<table><tr><th>finding</th><th class="n">device</th><th class="n">artifact</th>'
             '<th class="n">support in positive calls</th><th class="n">positive calls</th>'
             '<th class="n">shortcut predictions</th><th class="n">unnamed</th><th>strongest nuisance pattern</th>'
             '<th>strongest nuisance label (patterns, swing, separation)</th>'
             '<th>strongest nuisance contrast (logit, images)</th></tr>')
    for r in audit:
        t = r["top_nuisance_pattern"]
        sup = r["nuisance_share_of_support_in_positive_calls"]
        hot = (sup or 0) > thr
        tp = "–"
        if t:
            cls = f"g{t['pattern_id']}"
            g = ctx.gallery_png(t["pattern_id"])
            if g:
                styles.setdefault(cls, g)
            thumb = f'<span class="g {cls}"></span> ' if g else ""
            tp = (f'{thumb}<span class="mono">#{t["pattern_id"]}</span> {_esc(t["label"] or "unnamed")} '
                  f'{_cat_chip(t["category"])} {t["share"]:.1%}')
        o.append(f'<tr><td>{_esc(r["finding"])}</td><td class="n">{r["device_share"]:.1%}</td>'
                 f'<td class="n">{r["artifact_share"]:.1%}</td>'
                 f'<td class="n{" warn" if hot else ""}">{"–" if sup is None else f"{sup:.1%}"}{" ⚠" if hot else ""}</td>'
                 f'<td class="n">{r["positive_calls"]}</td><td class="n">{r["predictions_with_shortcut"]}</td>'
                 f'<td class="n">{r["unnamed_share"]:.1%}</td><td>{tp}</td><td>{_top_label_cell(r)}</td>'
                 f'<td>{_top_contrast_cell(r)}</td></tr>')
    o.append("</table>")
    o.append(f'<div class="plot">{_audit_figure(audit)}</div>')
    # top patterns
    o.append(f"<h2>Patterns most often among the top {ctx.cfg.top_evidence_rank} of a prediction's evidence</h2>")
    o.append('<table><tr><th class="n">#</th><th>gallery</th><th>pattern</th><th>category</th>'
             '<th class="n">predictions</th><th class="n">mean contribution</th><th class="n">pushes towards</th>'
             '<th>by finding</th></tr>')
    for i, t in enumerate(top, 1):
        g = ctx.gallery_png(t["pattern_id"])
        cls = f"g{t['pattern_id']}"
        if g:
            styles.setdefault(cls, g)
        ver = "" if t["verification"] is None else f' <span class="meta">verified {t["verification"]:.2f}</span>'
        flag = ' <span class="flag">(tentative)</span>' if t["flagged"] else ""
        thumb = f'<span class="g {cls}"></span>' if g else "–"
        o.append(f'<tr><td class="n">{i}</td><td>{thumb}</td>'
                 f'<td><span class="mono">#{t["pattern_id"]}</span> {_esc(t["label"] or "unnamed")}{flag}{ver}</td>'
                 f'<td>{_cat_chip(t["category"])}</td><td class="n">{t["count"]}</td>'
                 f'<td class="n">{t["mean_contribution"]:+.3f}</td><td class="n">{t["positive_share"]:.0%}</td>'
                 f'<td class="meta">{_esc(", ".join(f"{k} {v}" for k, v in t["by_finding"].items()))}</td></tr>')
    o.append("</table>")
    # worst explained
    o.append("<h2>Worst-explained predictions</h2>")
    o.append(f'<p class="meta">Ranked by |error| / max(|logit|, {ctx.compose_cfg.error_logit_floor:g}): the share of '
             'the logit the transcoders fail to reconstruct (the floor keeps near-zero logits from crowding the list).</p>')
    o.append('<table><tr><th>image</th><th>finding</th><th class="n">logit</th><th class="n">error</th>'
             '<th class="n">ratio</th><th class="n">p</th><th class="n">label</th></tr>')
    for w in worst:
        o.append(f'<tr><td><a href="{_esc(w["href"])}">{_esc(w["record_id"])}</a></td><td>{_esc(w["finding"])}</td>'
                 f'<td class="n">{w["logit"]:+.3f}</td><td class="n">{w["error"]:+.3f}</td>'
                 f'<td class="n">{w["ratio"]:.2f}</td><td class="n">{w["probability"]:.3f}</td>'
                 f'<td class="n">{_label_text(w["label"])}</td></tr>')
    o.append("</table>")
    # pages
    o.append("<h2>Pages</h2><table><tr><th>page</th><th class='n'>images</th><th>first</th><th>last</th></tr>")
    for pg in pages:
        o.append(f'<tr><td><a href="{pg["file"]}">{pg["file"]}</a></td><td class="n">{pg["images"]}</td>'
                 f'<td class="mono">{_esc(pg["first"])}</td><td class="mono">{_esc(pg["last"])}</td></tr>')
    o.append("</table>")
    if len(page_of) <= 5000:
        o.append(f"<details><summary>All {len(page_of)} images</summary><p class='mono'>")
        o.append(" · ".join(f'<a href="{pf}#img-{safe_name(rid)}">{_esc(rid)}</a>' for rid, pf in page_of.items()))
        o.append("</p></details>")
    else:
        o.append('<p class="meta">images.csv maps every image to its page.</p>')
    css = "".join(f".{k}{{background-image:url(data:image/png;base64,{v})}}" for k, v in styles.items())
    head = _page_head(f"sae-cxr report · {info['run_name']} · {split}", _CSP_INDEX, css)
    bundle = f"<script>{_plotly_bundle()}</script>\n"
    return head + bundle + "".join(o) + "</body></html>\n"


# ------------------------------------------------------------------------------------------------
# Build
# ------------------------------------------------------------------------------------------------
class _TableWriters:
    """Streams the long table into Parquet (one row group per page) and CSV."""

    def __init__(self, parquet_path: Path, csv_path: Path | None):
        import pyarrow.csv as pcsv
        import pyarrow.parquet as pq

        self.schema = _long_schema()
        self.pq = pq.ParquetWriter(str(parquet_path), self.schema)
        self.csv = pcsv.CSVWriter(str(csv_path), self.schema) if csv_path is not None else None  # None: a rank's part
        self.rows = 0

    def write(self, cols: dict[str, list]) -> None:
        import pyarrow as pa

        if not cols["record_id"]:
            return
        self.write_table(pa.table({k: pa.array(cols[k], type=self.schema.field(k).type) for k in LONG_COLUMNS},
                                  schema=self.schema))

    def write_table(self, table: Any) -> None:
        """One page's rows (an Arrow table of the long schema) as one row group and CSV rows."""
        table = table.cast(self.schema)
        self.pq.write_table(table)
        if self.csv is not None:
            self.csv.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        self.pq.close()
        if self.csv is not None:
            self.csv.close()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (Path, tuple)):
        return str(obj) if isinstance(obj, Path) else list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def build_report(run: RunDir, cfg: ReportConfig | None = None, out: str | os.PathLike | None = None) -> ReportResult:
    """Build the report for one split (or an id list) of a finished run; see the module docstring."""
    import torch

    cfg = cfg or ReportConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # page-sized matmuls: fork/join of a thread pool costs more than it saves,
    try:                      # 5x more on a busy machine (measured: 11.8 s vs 2.2 s for 900 decompositions)
        return _build(run, cfg, out)
    finally:
        torch.set_num_threads(threads)


def _build(run: RunDir, cfg: ReportConfig, out: str | os.PathLike | None) -> ReportResult:
    """Under torchrun every rank calls this with the same arguments: each rank builds a contiguous
    block of pages (`dist.shard_range` over the pages, so numbering and links are those of one process)
    into the shared build folder, with its own part of the evidence table and images.csv; rank 0
    combines the summary accumulators (gathered in rank order), merges the parts in page order, writes
    index.html and report.json and swaps the folder into place. One process: no parts, no collectives."""
    from sae_cxr import __version__
    from sae_cxr import distributed as dist

    t0 = time.perf_counter()
    # one build time, manifest checksum and build folder for every rank (the pages carry them)
    manifest_sha, built_at, pid = dist.broadcast((sha256_file(run.path / MANIFEST), _now(), os.getpid()))
    with dist.all_ranks(f"report {cfg.split}: loading the run"):  # a rank that fails here stops them all
        sel = _select(run, cfg)
        out_dir = Path(out).resolve() if out is not None else default_out(run, cfg.split, cfg.ids)
        if out_dir == run.path or run.path.is_relative_to(out_dir):
            raise ValueError(f"report output {out_dir} would replace the run directory itself; choose another --out")
        ctx = _Context(run, cfg, sel)
    n = len(sel.ids)
    per = cfg.per_page
    n_pages = (n + per - 1) // per
    page_files = [f"page-{i + 1:04d}.html" for i in range(n_pages)]
    page_of = {rid: page_files[i // per] for i, rid in enumerate(sel.ids)}
    files: list[str] = []
    build = out_dir.parent / f".{out_dir.name}.building-{pid}"
    page = _PageBuilder(run, ctx, build, page_files, manifest_sha, built_at)

    def prepare() -> None:
        if build.exists():
            shutil.rmtree(build)
        build.mkdir(parents=True)
        (build / "json").mkdir()

    try:
        dist.on_main(prepare, what="creating the report's build folder")
        if dist.is_distributed():
            pa, pb = dist.shard_range(n_pages)
            part = build / _PARTS / f"rank-{dist.rank():05d}"
            with dist.all_ranks(f"report {cfg.split}: pages {pa + 1}-{pb}"):
                part.mkdir(parents=True)
                with contextlib.ExitStack() as stack:
                    writers = _TableWriters(part / "evidence.parquet", None)
                    stack.callback(writers.close)
                    idx_f = stack.enter_context(open(part / "images.csv", "w", encoding="utf-8", newline=""))
                    audit, pages_meta = page.write(range(pa, pb), writers, idx_f)
            gathered = dist.all_gather((audit, pages_meta, writers.rows))
        else:
            with _final_tables(build) as (writers, idx_f):
                audit, pages_meta = page.write(range(n_pages), writers, idx_f)
            gathered = [(audit, pages_meta, writers.rows)]

        def finish() -> ReportResult:
            audit = _Audit.merged(ctx.P, [g[0] for g in gathered])
            pages_meta = [m for g in gathered for m in g[1]]
            long_rows = sum(g[2] for g in gathered)
            if len(gathered) > 1:
                merged_rows = _merge_parts(build, len(gathered))
                if merged_rows != long_rows:
                    raise RunError(f"the evidence parts in {build / _PARTS} hold {merged_rows} rows but the ranks "
                                   f"wrote {long_rows}; rerun the report")
            files.extend(page_files + ["evidence.parquet", "evidence.csv", "images.csv"])
            loop_seconds = time.perf_counter() - t0
            metrics = _auroc(run)
            audit_rows = audit.rows(ctx)
            top = _top_patterns(ctx, cfg.summary_rows, cfg.top_evidence_rank)
            worst = _worst_explained(ctx, cfg.summary_rows, page_of)
            seconds = time.perf_counter() - t0
            info = {"run_name": (run.config("run") or {}).get("name") or run.path.name, "run_path": str(run.path),
                    "images": n, "built_at": built_at, "build_seconds": seconds, "version": __version__,
                    "manifest_sha256": manifest_sha}
            write_bytes_atomic(build / "index.html",
                               _index_html(ctx, info, metrics, audit_rows, top, worst, pages_meta,
                                           page_of).encode("utf-8"))
            seconds = time.perf_counter() - t0
            summary = {"schema": SCHEMA, "run": {"path": str(run.path), "name": info["run_name"],
                                                 "manifest_sha256": manifest_sha},
                       "split": cfg.split, "images": n, "pages": pages_meta, "built_at": built_at,
                       "build_seconds": round(seconds, 3), "images_per_s": round(n / max(seconds, 1e-9), 1),
                       "config": asdict(cfg), "auroc": metrics.get(cfg.split, {}), "shortcut_audit": audit_rows,
                       "top_patterns": top, "worst_explained": worst, "long_table_rows": long_rows,
                       "explanations_from_explain_stage": len(ctx.explanations)}
            if len(gathered) > 1:
                summary["world_size"] = len(gathered)
            write_json_atomic(build / "report.json", summary)
            files.extend(["index.html", "report.json"])
            _swap_into_place(build, out_dir)
            log.info("report: %d images, %d pages in %.1f s (page loop %.1f s)", n, n_pages, seconds, loop_seconds)
            return ReportResult(out=out_dir, images=n, pages=n_pages, seconds=seconds,
                                images_per_s=n / max(seconds, 1e-9), manifest_sha256=manifest_sha, files=files)

        return dist.on_main(finish, what=f"merging the report of split {cfg.split!r}")
    except BaseException:
        if dist.is_main():  # every rank has stopped writing: the collectives above failed on all of them
            shutil.rmtree(build, ignore_errors=True)
        raise


_PARTS = ".parts"
_IMAGES_HEADER = "record_id,page,anchor,json\r\n"  # csv.writer's header row, as one process writes it


def _merge_parts(build: Path, world: int) -> int:
    """Rank 0: the ranks' evidence parts, in rank (= page) order, into evidence.parquet (one row group
    per page, as one process writes it), evidence.csv and images.csv; the parts are removed. Rows merged."""
    import pyarrow.parquet as pq

    parts = [build / _PARTS / f"rank-{r:05d}" for r in range(world)]
    with _final_tables(build) as (writers, idx_f):
        for part in parts:
            with pq.ParquetFile(str(part / "evidence.parquet")) as f:
                for g in range(f.num_row_groups):
                    writers.write_table(f.read_row_group(g))
            with open(part / "images.csv", encoding="utf-8", newline="") as src:
                shutil.copyfileobj(src, idx_f)
    shutil.rmtree(build / _PARTS)
    return writers.rows


@contextlib.contextmanager
def _final_tables(build: Path) -> Iterator[tuple[_TableWriters, Any]]:
    """The report's evidence.parquet, evidence.csv and images.csv (header written), each written to a
    temporary name and moved into place on a clean exit; the one place that opens them."""
    with contextlib.ExitStack() as stack:
        pq_path = stack.enter_context(atomic_path(build / "evidence.parquet"))
        csv_path = stack.enter_context(atomic_path(build / "evidence.csv"))
        idx_path = stack.enter_context(atomic_path(build / "images.csv"))
        writers = _TableWriters(pq_path, csv_path)
        stack.callback(writers.close)
        idx_f = stack.enter_context(open(idx_path, "w", encoding="utf-8", newline=""))
        idx_f.write(_IMAGES_HEADER)
        yield writers, idx_f


class _PageBuilder:
    """Builds and writes pages (HTML, JSON per image, rows of the tables) of one report; any subset of
    the pages, in any process, with the page numbering and links of the whole report."""

    def __init__(self, run: RunDir, ctx: _Context, build: Path, page_files: list[str], manifest_sha: str,
                 built_at: str):
        self.run, self.ctx, self.build, self.page_files = run, ctx, build, page_files
        self.manifest_sha, self.built_at = manifest_sha, built_at

    def write(self, pages: range, writers: _TableWriters, idx_f: Any) -> tuple[_Audit, list[dict[str, Any]]]:
        """Write `pages` (0-based) to the build folder, table rows to `writers` and `idx_f` (no header);
        return the audit sums and page metadata of these pages."""
        import csv as _csv

        from sae_cxr.progress import progress_bar

        run, ctx, build, page_files = self.run, self.ctx, self.build, self.page_files
        manifest_sha, built_at = self.manifest_sha, self.built_at
        cfg, sel = ctx.cfg, ctx.sel
        n, per, n_pages = len(sel.ids), cfg.per_page, len(page_files)
        audit = _Audit(ctx.P, ctx.label_groups, ctx.label_group_keys,
                       len(ctx.detectors.terms) if ctx.detectors is not None else 0)
        pages_meta: list[dict[str, Any]] = []
        idx_w = _csv.writer(idx_f)
        worst_logit = 0.0
        n_mine = min(n, pages.stop * per) - pages.start * per if len(pages) else 0
        with progress_bar(total=n_mine, desc=f"report {cfg.split}", unit="img", disable=not cfg.progress) as bar:
            for pi in pages:
                lo, hi = pi * per, min(n, (pi + 1) * per)
                ids, rows = sel.ids[lo:hi], sel.rows[lo:hi]
                full = ctx.attr.decompose(ctx.x[lo:hi])
                with_patches = [int(r) for r in rows if int(r) in ctx.has_patches]
                page_patches = ctx.store.patches(with_patches) if with_patches else None
                patch_pos = {r: i for i, r in enumerate(with_patches)}
                docs: list[_ImageDoc] = []
                sections: list[str] = []
                styles: dict[str, str] = {}
                sizes: dict[str, int] = {}
                long_cols: dict[str, list] = {k: [] for k in LONG_COLUMNS}
                for b, (rid, row) in enumerate(zip(ids, rows)):
                    rec = ctx.records[rid]
                    pp = patch_pos.get(int(row))
                    doc = _decompose_image(ctx, rid, int(row), full, b,
                                           page_patches[pp] if pp is not None else None)
                    for c, f in enumerate(FINDINGS):
                        worst_logit = max(worst_logit, abs(full.logit[b, c] - doc.decomps[f].logit))
                    docs.append(doc)
                    thumb = _load_thumb(rec, cfg.thumb_size)
                    size = thumb[1] if thumb else None
                    img_class, heat_class = None, f"h{b}"
                    tiles: dict[int, int] = {}
                    n_tiles = 0
                    if thumb is not None:
                        from PIL import Image

                        img_class = f"i{b}"
                        styles[img_class] = _b64png(Image.fromarray(thumb[0], mode="L"))
                        shown = list(dict.fromkeys(p.pattern_id for f in FINDINGS
                                                   for p in doc.decomps[f].patterns[: cfg.top_patterns]
                                                   if p.pattern_id in doc.maps))
                        if shown:
                            sprite, ok = heat_sprite(np.stack([doc.maps[p] for p in shown]), size[0], size[1],
                                                     max(cfg.tile_size // 2, 4 * max(ctx.grid or (8, 8))))
                            if sprite is not None:
                                n_tiles = len(shown)
                                tiles = {p: k for k, (p, good) in enumerate(zip(shown, ok)) if good}
                                styles[heat_class] = sprite
                                sizes[heat_class] = n_tiles
                    sections.append(_image_section(ctx, doc, rec, img_class, size, tiles, n_tiles, heat_class, styles))
                    jname = f"json/{safe_name(rid)}.json"
                    (build / jname).write_bytes(json.dumps(
                        _image_json(ctx, doc, rec, manifest_sha, size, page_files[pi]),
                        separators=(",", ":"), allow_nan=False, default=_jsonable).encode("utf-8"))
                    for k, v in _long_rows(doc, rec.split).items():
                        long_cols[k].extend(v)
                    idx_w.writerow([rid, page_files[pi], doc.anchor, jname])
                    bar.update(1)
                if worst_logit > 1e-3:
                    raise RunError(f"the attribution tables of {run.path} do not match its classifier and "
                                   f"transcoders (logits differ by {worst_logit:.3g}); rerun `sae-cxr attribute "
                                   f"--run {run.path} --force`")
                audit.add(ctx, full, docs, np.stack([ctx.records[rid].labels for rid in ids]))
                writers.write(long_cols)
                css = "".join(f".{k}{{background-image:url(data:image/png;base64,{v})"
                              + (f";background-size:100% {100 * sizes[k]}%" if k in sizes else "") + "}"
                              for k, v in styles.items())
                label = f"page {pi + 1} of {n_pages} · images {lo + 1}-{hi} of {n} · split {cfg.split}"
                nav = _nav("index.html", page_files[pi - 1] if pi > 0 else None,
                           page_files[pi + 1] if pi + 1 < n_pages else None, label)
                body = (_page_head(f"sae-cxr report · {cfg.split} · page {pi + 1}", _CSP_PAGE, css) + nav
                        + f'<p class="meta">run {_esc(run.path)} · manifest sha256 <span class="mono">{manifest_sha}'
                          f'</span> · built {built_at}</p>' + "".join(sections) + nav + "</body></html>\n")
                (build / page_files[pi]).write_bytes(body.encode("utf-8"))
                pages_meta.append({"file": page_files[pi], "images": hi - lo, "first": ids[0], "last": ids[-1]})
        return audit, pages_meta


def _swap_into_place(build: Path, out_dir: Path) -> None:
    """Replace `out_dir` by the finished build: a reader sees the old report or the new one, never a mix,
    and files of an earlier, larger report (page-0042.html) do not linger."""
    os.sync()  # one flush for the whole build, so the rename below cannot outlive the files' contents
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ValueError(f"report output {out_dir} exists and is not a directory")
        if not (out_dir / "report.json").exists() and any(out_dir.iterdir()):
            raise ValueError(f"report output {out_dir} is a non-empty folder that holds no report "
                             "(no report.json); choose an empty or new folder with --out")
        os.replace(out_dir, old)
    os.replace(build, out_dir)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# The pipeline stage
# ------------------------------------------------------------------------------------------------
def run_report_stage(run: RunDir, cfg: ReportStageConfig, progress: bool = True
                     ) -> tuple[list[str], dict[str, Any]]:
    """The `report` stage: a full report for every configured split, in <run>/reports/<split>/."""
    outputs: list[str] = []
    summary: dict[str, Any] = {}
    for split in cfg.splits:
        res = build_report(run, cfg.report_config(split, progress=progress))
        outputs.append(run.rel(res.out))
        summary[split] = {"images": res.images, "pages": res.pages, "images_per_s": round(res.images_per_s, 1),
                          "index": run.rel(res.out / "index.html")}
    return outputs, summary


def rerecord_stage_outputs(run: RunDir, out: Path) -> bool:
    """After a standalone build into a folder the `report` stage recorded, refresh the stage's checksums,
    so `RunDir.verify` does not take the rebuilt report for a corrupted one. True if it did."""
    info = run.stage("report")
    if info is None or info.status != "done":
        return False
    try:
        rel = run.rel(out)
    except ValueError:
        return False
    tops = sorted({"/".join(k.split("/")[:2]) for k in info.outputs})
    if rel not in tops:
        return False
    run.finish_stage("report", [t for t in tops if run.sub(t).exists()], info.summary)
    return True


def iter_report_html(out: str | os.PathLike) -> Iterator[Path]:
    """The HTML files of a report folder (index first)."""
    d = Path(out)
    yield d / "index.html"
    yield from sorted(d.glob("page-*.html"))
