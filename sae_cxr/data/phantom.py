"""The phantom world: procedural radiograph-like images with planted concepts and ground truth.

Each image is a sum of attenuations (soft tissue, air-filled lungs, mediastinum and heart,
spine, ribs, clavicles, diaphragm domes) mapped to brightness through 1 - exp(-A), with film
noise. Planted concepts (DESIGN.md) are added with a severity, a side where they have one, and
a bounding box per instance. Labels, a synthetic report and a split come with every image.

Conventions
- Coordinates are normalised (u to the image right, v downwards) and scaled to pixels at the
  end, so a world renders at any size.
- Radiological convention: the patient's right is on the image LEFT.
- Image i depends only on (config, i): any image can be regenerated alone, and rendering is
  vectorised over a batch with per-image parameters.
- Pixel values are quantised to 8-bit levels, so a PNG written by `export_folder` reads back
  bit-identically.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from sae_cxr.data.base import Box, DataSet, Record
from sae_cxr.data.glyphs import TEXT_ALPHABET, render_text
from sae_cxr.findings import CONCEPT_NAMES, CONCEPTS, FINDINGS, Shortcut

# Base prevalence of each concept outside the latent clinical states below.
BASE_PREVALENCE: dict[str, float] = {
    "cardiomegaly": 0.12, "consolidation": 0.14, "edema": 0.05, "atelectasis": 0.13, "nodule": 0.15,
    "pleural_effusion": 0.10, "pneumothorax": 0.10, "scoliosis": 0.15, "elevated_hemidiaphragm": 0.12,
    "rotation": 0.18, "pacemaker": 0.10, "et_tube": 0.05, "central_line": 0.08, "sternotomy_wires": 0.10,
    "laterality_marker": 0.45, "burned_in_text": 0.30, "low_exposure": 0.12, "collimation_edge": 0.20,
}
SPLIT_FRACTIONS: dict[str, float] = {"train": 0.6, "val": 0.1, "test": 0.15, "test_shifted": 0.15}
MM_PER_UNIT = 430.0  # a normalised unit spans a 43 cm detector


@dataclass
class PhantomConfig:
    """Everything that defines a phantom world; saved with every run that uses one."""

    n: int = 2000
    """Number of images."""
    seed: int = 0
    """World seed: image i is drawn from (seed, i)."""
    size: int = 128
    """Image side in pixels (square)."""
    shortcut: str | None = None
    """`nuisance:finding:rate`: plant a spurious correlation in train/val/test, broken in test_shifted."""
    prevalence_scale: float = 1.0
    """Multiplies every base prevalence (clipped to 0.95)."""
    prevalence: dict[str, float] = field(default_factory=dict)
    """Per-concept overrides of the base prevalence."""
    label_noise: float = 0.0
    """Probability of flipping each of the five labels (report-derived labels are noisy)."""

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"a phantom world needs at least one image, got n={self.n}")
        if self.size < 32:
            raise ValueError(f"phantom images need at least 32 px, got size={self.size}")
        unknown = set(self.prevalence) - set(CONCEPT_NAMES)
        if unknown:
            raise ValueError(f"unknown concepts in prevalence overrides: {sorted(unknown)}")
        for k, v in self.prevalence.items():
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"prevalence of {k} must lie in [0, 1], got {v}")
        if self.prevalence_scale <= 0:
            raise ValueError(f"prevalence_scale must be positive, got {self.prevalence_scale}")
        if not 0.0 <= self.label_noise < 0.5:
            raise ValueError(f"label_noise must lie in [0, 0.5), got {self.label_noise}")
        if self.shortcut is not None:
            Shortcut.parse(self.shortcut)  # validate early

    @property
    def shortcut_spec(self) -> Shortcut | None:
        return Shortcut.parse(self.shortcut) if self.shortcut else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PhantomConfig":
        return cls(**d)


@dataclass
class PhantomCase:
    """The drawn parameters of one image: enough to render it and to describe it."""

    index: int
    split: str
    geom: dict[str, float]
    concepts: dict[str, dict[str, Any]]  # name -> {"severity", "side", ...render params}
    labels: np.ndarray
    boxes: list[Box] = field(default_factory=list)
    report: str = ""

    @property
    def id(self) -> str:
        return f"phantom-{self.index:07d}"


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
class PhantomWorld:
    """A deterministic world: `case(i)` draws image i's parameters, `render(cases)` draws pixels."""

    def __init__(self, cfg: PhantomConfig):
        self.cfg = cfg
        self.shortcut = cfg.shortcut_spec
        self.prevalence = {c: min(0.95, cfg.prevalence.get(c, BASE_PREVALENCE[c] * cfg.prevalence_scale))
                           for c in CONCEPT_NAMES}
        self._tiles: np.ndarray | None = None
        self._shifted_rate = self._nuisance_marginal() if self.shortcut else None

    # -- concept presence ------------------------------------------------------------------------
    def _draw_presence(self, rng: np.random.Generator) -> dict[str, bool]:
        p = self.prevalence
        scale = self.cfg.prevalence_scale
        heart_failure = rng.random() < min(0.9, 0.10 * scale)
        icu = rng.random() < min(0.9, 0.15 * scale)
        has: dict[str, bool] = {}

        def draw(name: str, boost: float = 0.0) -> bool:
            return bool(rng.random() < min(0.97, p[name] + boost))

        has["cardiomegaly"] = draw("cardiomegaly", 0.55 if heart_failure else 0.0)
        has["edema"] = draw("edema", (0.55 if heart_failure else 0.0) + (0.1 if icu else 0.0))
        has["pleural_effusion"] = draw("pleural_effusion", (0.45 if heart_failure else 0.0) + (0.1 if icu else 0.0))
        has["consolidation"] = draw("consolidation", 0.2 if icu else 0.0)
        has["atelectasis"] = draw("atelectasis", (0.25 if has["pleural_effusion"] else 0.0) + (0.1 if icu else 0.0))
        for name in ("nodule", "pneumothorax", "scoliosis", "elevated_hemidiaphragm", "rotation",
                     "laterality_marker", "burned_in_text", "collimation_edge"):
            has[name] = draw(name)
        has["et_tube"] = draw("et_tube", 0.55 if icu else 0.0)
        has["central_line"] = draw("central_line", 0.55 if icu else 0.0)
        has["low_exposure"] = draw("low_exposure", 0.25 if icu else 0.0)
        has["pacemaker"] = draw("pacemaker", 0.08 if has["cardiomegaly"] else 0.0)
        has["sternotomy_wires"] = draw("sternotomy_wires", 0.08 if has["cardiomegaly"] else 0.0)
        return has

    def _nuisance_marginal(self) -> float:
        """Train prevalence of the shortcut's nuisance: the rate test_shifted draws it at, independently."""
        assert self.shortcut is not None
        rng = np.random.default_rng([self.cfg.seed, 0x5EED, 7])
        fi = FINDINGS.index(self.shortcut.finding)
        concept = next(c.name for c in CONCEPTS.values() if c.finding == FINDINGS[fi])
        pos = np.mean([self._draw_presence(rng)[concept] for _ in range(4000)])
        r = self.shortcut.rate
        return float(r * pos + (1 - r) * (1 - pos))

    def _draw_split(self, rng: np.random.Generator) -> str:
        fr = dict(SPLIT_FRACTIONS)
        if self.shortcut is None:  # without a shortcut the shifted split would equal test
            fr["test"] += fr.pop("test_shifted")
        u = rng.random()
        acc = 0.0
        for name, f in fr.items():
            acc += f
            if u < acc:
                return name
        return "train"

    def case(self, index: int) -> PhantomCase:
        rng = np.random.default_rng([self.cfg.seed, index])
        split = self._draw_split(rng)
        has = self._draw_presence(rng)
        if self.shortcut is not None:
            fconcept = next(c.name for c in CONCEPTS.values() if c.finding == self.shortcut.finding)
            if split == "test_shifted":
                has[self.shortcut.nuisance] = bool(rng.random() < self._shifted_rate)
            else:
                rate = self.shortcut.rate if has[fconcept] else 1.0 - self.shortcut.rate
                has[self.shortcut.nuisance] = bool(rng.random() < rate)
        geom = _draw_geometry(rng)
        concepts: dict[str, dict[str, Any]] = {}
        for name in CONCEPT_NAMES:
            if has[name]:
                concepts[name] = _draw_concept(name, rng, geom)
        _adjust_geometry(geom, concepts)
        labels = np.array([1.0 if any(CONCEPTS[c].finding == f for c in concepts) else 0.0 for f in FINDINGS],
                          dtype=np.float32)
        if self.cfg.label_noise > 0:
            flip = rng.random(len(FINDINGS)) < self.cfg.label_noise
            labels = np.where(flip, 1.0 - labels, labels).astype(np.float32)
        case = PhantomCase(index=index, split=split, geom=geom, concepts=concepts, labels=labels)
        case.boxes = _boxes(case, self.cfg.size)
        case.report = _report(case, rng)
        return case

    def cases(self, indices: Sequence[int] | None = None) -> list[PhantomCase]:
        idx = range(self.cfg.n) if indices is None else indices
        return [self.case(int(i)) for i in idx]

    # -- rendering -------------------------------------------------------------------------------
    @property
    def tiles(self) -> np.ndarray:
        if self._tiles is None:
            self._tiles = _texture_tiles(self.cfg.size, self.cfg.seed)
        return self._tiles

    def render(self, cases: Sequence[PhantomCase]) -> np.ndarray:
        """Pixels of `cases` as float32 [B, S, S] in [0, 1], quantised to 8-bit levels."""
        return _render(list(cases), self.cfg.size, self.tiles)

    def image(self, index: int) -> np.ndarray:
        return self.render([self.case(index)])[0]

    def batches(self, batch_size: int = 64, indices: Sequence[int] | None = None, workers: int = 1
                ) -> Iterator[tuple[list[PhantomCase], np.ndarray]]:
        """Render in batches, in order; `workers` > 1 renders batches in parallel processes."""
        idx = list(range(self.cfg.n)) if indices is None else [int(i) for i in indices]
        chunks = [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
        if workers <= 1 or len(chunks) <= 1:
            for chunk in chunks:
                cases = self.cases(chunk)
                yield cases, self.render(cases)
            return
        import multiprocessing as mp

        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(workers, initializer=_init_worker, initargs=(self.cfg.to_dict(),)) as pool:
            yield from pool.imap(_render_chunk, chunks)

    def record(self, case: PhantomCase) -> Record:
        return Record(id=case.id, split=case.split, labels=case.labels, loader=_ImageLoader(self, case.index),
                      concepts=tuple(case.concepts), boxes=tuple(case.boxes), report=case.report,
                      meta=case_meta(case))

    def dataset(self) -> DataSet:
        return DataSet((self.record(c) for c in self.cases()), spec={"kind": "phantom", **self.cfg.to_dict()},
                       name=f"phantom(seed={self.cfg.seed})")


class _ImageLoader:
    """Picklable lazy loader (DataLoader workers pickle records)."""

    def __init__(self, world: PhantomWorld, index: int):
        self.cfg = world.cfg
        self.index = index

    def __call__(self) -> np.ndarray:
        return _world_for(self.cfg).image(self.index)


_WORLD_CACHE: dict[str, PhantomWorld] = {}


def _init_worker(cfg: dict[str, Any]) -> None:
    _world_for(PhantomConfig.from_dict(cfg))


def _render_chunk(chunk: list[int]) -> tuple[list[PhantomCase], np.ndarray]:
    world = next(iter(_WORLD_CACHE.values()))
    cases = world.cases(chunk)
    return cases, world.render(cases)


def _world_for(cfg: PhantomConfig) -> PhantomWorld:
    key = json.dumps(cfg.to_dict(), sort_keys=True)
    if key not in _WORLD_CACHE:
        _WORLD_CACHE.clear()
        _WORLD_CACHE[key] = PhantomWorld(cfg)
    return _WORLD_CACHE[key]


def case_meta(case: PhantomCase) -> dict[str, Any]:
    """The per-concept severity and side, stored in a record's metadata."""
    return {"phantom_index": case.index,
            "severity": {k: round(float(v["severity"]), 4) for k, v in case.concepts.items()},
            "side": {k: v["side"] for k, v in case.concepts.items() if v.get("side")}}


def _draw_geometry(rng: np.random.Generator) -> dict[str, float]:
    s = rng.uniform(0.92, 1.04)
    dy = rng.normal(0, 0.012)
    cx = 0.5 + rng.normal(0, 0.012)
    dome_r = 0.70 + dy + rng.normal(0, 0.012)
    return {
        "s": s, "cx": cx, "dy": dy, "tw": 0.37 * s, "apex": 0.13 + dy + rng.normal(0, 0.008),
        "dome_r": dome_r, "dome_l": dome_r + 0.03 + rng.normal(0, 0.01),
        "la": 0.145 * s, "ctr": float(np.clip(rng.normal(0.43, 0.025), 0.36, 0.485)),
        "spine_amp": 0.0, "spine_phase": 0.0, "rot": 0.0, "rib_spacing": 0.064 * s * rng.uniform(0.95, 1.05),
        "rib_phase": rng.uniform(0, 1), "gamma": rng.uniform(0.85, 1.15), "katt": rng.uniform(1.35, 1.7),
        "noise": rng.uniform(0.008, 0.018), "tile": float(rng.integers(0, 1 << 30)),
        "tile_ox": rng.uniform(0, 1), "tile_oy": rng.uniform(0, 1), "soft": rng.uniform(0.75, 0.95),
    }


def _side(rng: np.random.Generator, bilateral_p: float = 0.0) -> str:
    u = rng.random()
    if u < bilateral_p:
        return "bilateral"
    return "right" if rng.random() < 0.5 else "left"


def _sign(side: str) -> float:
    """Image-space direction of a patient side (patient right = image left)."""
    return -1.0 if side == "right" else 1.0


def _draw_concept(name: str, rng: np.random.Generator, g: dict[str, float]) -> dict[str, Any]:
    sev = float(rng.uniform(0.0, 1.0))
    c: dict[str, Any] = {"severity": sev, "side": None}
    if name == "cardiomegaly":
        c["ctr"] = 0.5 + 0.16 * sev + rng.uniform(0, 0.01)
    elif name == "consolidation":
        c["side"] = _side(rng)
        zone = rng.choice([0.3, 0.5, 0.72], p=[0.25, 0.35, 0.4])
        c["cu"] = _sign(c["side"]) * rng.uniform(0.12, 0.22)
        c["cv"] = float(zone)
        n = int(rng.integers(3, 7))
        c["lumps"] = [(float(rng.normal(0, 0.03)), float(rng.normal(0, 0.035)), float(rng.uniform(0.02, 0.04)))
                      for _ in range(n)]
        c["bronchograms"] = bool(rng.random() < 0.5)
    elif name == "edema":
        c["spread"] = 0.08 + 0.04 * sev
    elif name == "atelectasis":
        c["side"] = _side(rng)
        c["cu"] = _sign(c["side"]) * rng.uniform(0.11, 0.21)
        c["lift"] = rng.uniform(0.07, 0.15)
        c["length"] = rng.uniform(0.08, 0.15)
        c["thick"] = rng.uniform(0.012, 0.022)
        c["angle"] = rng.normal(0, 0.25)
    elif name == "nodule":
        c["side"] = _side(rng)
        diameter_mm = 5.0 + 25.0 * rng.beta(1.4, 1.8)
        c["r"] = diameter_mm / 2.0 / MM_PER_UNIT
        c["cu"] = _sign(c["side"]) * rng.uniform(0.1, 0.26)
        c["cv"] = rng.uniform(0.22, 0.6)
    elif name == "pleural_effusion":
        c["side"] = _side(rng, bilateral_p=0.3)
        c["height"] = 0.05 + 0.14 * sev
    elif name == "pneumothorax":
        c["side"] = _side(rng)
        c["width"] = 0.22 + 0.3 * sev  # fraction of the lung radius that has collapsed away from the wall
    elif name == "scoliosis":
        c["amp"] = (0.025 + 0.04 * sev) * (1 if rng.random() < 0.5 else -1)
        c["phase"] = rng.uniform(-0.3, 0.3)
    elif name == "elevated_hemidiaphragm":
        c["side"] = _side(rng)
        c["raise"] = 0.05 + 0.06 * sev
    elif name == "rotation":
        c["shift"] = (0.02 + 0.03 * sev) * (1 if rng.random() < 0.5 else -1)
    elif name == "pacemaker":
        c["side"] = "left" if rng.random() < 0.8 else "right"
        c["gu"] = _sign(c["side"]) * rng.uniform(0.2, 0.26)
        c["gv"] = rng.uniform(0.16, 0.23)
        c["leads"] = int(rng.integers(1, 3))
        c["bend"] = rng.uniform(-0.05, 0.05)
    elif name == "et_tube":
        c["tip"] = rng.uniform(0.02, 0.07)  # above the carina
        c["bend"] = rng.uniform(-0.01, 0.01)
    elif name == "central_line":
        c["side"] = "right" if rng.random() < 0.7 else "left"
        c["entry_v"] = rng.uniform(0.08, 0.16)
        c["depth"] = rng.uniform(0.36, 0.46)
    elif name == "sternotomy_wires":
        c["count"] = int(rng.integers(4, 8))
        c["top"] = rng.uniform(0.27, 0.33)
    elif name == "laterality_marker":
        c["letter"] = "L" if rng.random() < 0.5 else "R"
        c["corner"] = str(rng.choice(["tl", "tr", "bl", "br"], p=[0.4, 0.4, 0.1, 0.1]))
        c["height"] = rng.uniform(0.06, 0.1)
        c["inset"] = rng.uniform(0.02, 0.06)
    elif name == "burned_in_text":
        c["edge"] = "top" if rng.random() < 0.5 else "bottom"
        c["text"] = "".join(rng.choice(list(TEXT_ALPHABET), size=int(rng.integers(7, 15))))
        c["height"] = rng.uniform(0.035, 0.055)
        c["start"] = rng.uniform(0.03, 0.2)
    elif name == "low_exposure":
        c["contrast"] = 0.65 - 0.2 * sev
        c["noise"] = 0.035 + 0.04 * sev
    elif name == "collimation_edge":
        n_sides = 1 if rng.random() < 0.7 else 2
        sides = rng.choice(["left", "right", "top", "bottom"], size=n_sides, replace=False)
        c["bands"] = [(str(s), float(rng.uniform(0.04, 0.11))) for s in sides]
        c["bright"] = bool(rng.random() < 0.5)
    return c


def _adjust_geometry(g: dict[str, float], concepts: dict[str, dict[str, Any]]) -> None:
    """Concepts that change anatomy rather than add to it."""
    if "cardiomegaly" in concepts:
        g["ctr"] = concepts["cardiomegaly"]["ctr"]
    if "scoliosis" in concepts:
        g["spine_amp"] = concepts["scoliosis"]["amp"]
        g["spine_phase"] = concepts["scoliosis"]["phase"]
    if "rotation" in concepts:
        g["rot"] = concepts["rotation"]["shift"]
    if "elevated_hemidiaphragm" in concepts:
        c = concepts["elevated_hemidiaphragm"]
        key = "dome_r" if c["side"] == "right" else "dome_l"
        g[key] -= c["raise"]
    if "atelectasis" in concepts:  # volume loss pulls the dome up a little
        c = concepts["atelectasis"]
        key = "dome_r" if c["side"] == "right" else "dome_l"
        g[key] -= 0.015 * c["severity"]


# ----------------------------------------------------------------------------------------------
# Derived anatomy shared by rendering and boxes
# ----------------------------------------------------------------------------------------------
def _lung(g: dict[str, float], side: str) -> dict[str, float]:
    sgn = _sign(side)
    dome = g["dome_r"] if side == "right" else g["dome_l"]
    lb = (dome + 0.07 - g["apex"]) / 2.0
    return {"lc": g["cx"] + sgn * 0.175 * g["s"], "lv": g["apex"] + lb, "la": g["la"], "lb": lb, "dome": dome,
            "sgn": sgn}


def _heart(g: dict[str, float]) -> dict[str, float]:
    hw = g["ctr"] * g["tw"]
    hv = (g["dome_r"] + g["dome_l"]) / 2.0 - 0.1
    hh = 0.115 * g["s"] * (1.0 + 0.6 * max(0.0, g["ctr"] - 0.5))
    return {"hx": g["cx"] + 0.4 * hw, "hv": hv, "hw": hw, "hh": hh}


def _clip_box(label: str, u0: float, v0: float, u1: float, v1: float, size: int) -> Box | None:
    u0, u1 = max(0.0, min(u0, u1)), min(1.0, max(u0, u1))
    v0, v1 = max(0.0, min(v0, v1)), min(1.0, max(v0, v1))
    if u1 - u0 <= 0 or v1 - v0 <= 0:
        return None
    return Box(label, round(u0 * size, 2), round(v0 * size, 2), round((u1 - u0) * size, 2), round((v1 - v0) * size, 2))


def _pacemaker_path(g: dict[str, float], c: dict[str, Any]) -> list[np.ndarray]:
    h = _heart(g)
    gx, gy = g["cx"] + c["gu"], c["gv"]
    paths = []
    for k in range(c["leads"]):
        end = np.array([h["hx"] + 0.45 * h["hw"] - 0.05 * k, h["hv"] + 0.45 * h["hh"] - 0.05 * k])
        mid = np.array([g["cx"] + 0.02 + c["bend"], gy + 0.12 + 0.03 * k])
        paths.append(_bezier(np.array([gx, gy + 0.01]), mid, end))
    return paths


def _central_line_path(g: dict[str, float], c: dict[str, Any]) -> np.ndarray:
    sgn = _sign(c["side"])
    p0 = np.array([g["cx"] + sgn * 0.2, c["entry_v"]])
    p1 = np.array([g["cx"] + sgn * 0.04, c["entry_v"] + 0.1])
    p2 = np.array([g["cx"] - 0.03, c["depth"]])
    return _bezier(p0, p1, p2)


def _et_tube_path(g: dict[str, float], c: dict[str, Any]) -> np.ndarray:
    carina = g["apex"] + 0.12
    tip_v = carina - c["tip"]
    return _bezier(np.array([g["cx"] + c["bend"] * 3, 0.0]), np.array([g["cx"] + c["bend"], tip_v / 2]),
                   np.array([g["cx"], tip_v]))


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, n: int = 64) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def _wire_centers(g: dict[str, float], c: dict[str, Any]) -> np.ndarray:
    h = _heart(g)
    bottom = h["hv"] - 0.02
    return np.stack([np.full(c["count"], g["cx"]), np.linspace(c["top"], bottom, c["count"])], axis=1)


def _boxes(case: PhantomCase, size: int) -> list[Box]:
    g = case.geom
    out: list[Box | None] = []
    for name, c in case.concepts.items():
        if name == "cardiomegaly":
            h = _heart(g)
            out.append(_clip_box(name, h["hx"] - h["hw"], h["hv"] - h["hh"], h["hx"] + h["hw"], h["hv"] + h["hh"], size))
        elif name == "consolidation":
            cu, cv = g["cx"] + c["cu"], c["cv"] + g["dy"]
            us = [cu + du for du, dv, s in c["lumps"]]
            vs = [cv + dv for du, dv, s in c["lumps"]]
            rs = [1.6 * s for du, dv, s in c["lumps"]]
            lung = _lung(g, c["side"])
            u0 = max(min(u - r for u, r in zip(us, rs)), lung["lc"] - lung["la"])
            u1 = min(max(u + r for u, r in zip(us, rs)), lung["lc"] + lung["la"])
            v0 = max(min(v - r for v, r in zip(vs, rs)), g["apex"])
            v1 = min(max(v + r for v, r in zip(vs, rs)), lung["dome"] + 0.04)
            out.append(_clip_box(name, u0, v0, u1, v1, size))
        elif name == "edema":
            h = _heart(g)
            sp = c["spread"]
            out.append(_clip_box(name, g["cx"] - 0.12 - 1.6 * sp, h["hv"] - 0.1 - 1.9 * sp,
                                 g["cx"] + 0.12 + 1.6 * sp, h["hv"] - 0.1 + 1.9 * sp, size))
        elif name == "atelectasis":
            lung = _lung(g, c["side"])
            cu, cv = g["cx"] + c["cu"], lung["dome"] - c["lift"]
            hl, ht, a = c["length"] / 2, c["thick"] / 2, c["angle"]
            du = abs(hl * math.cos(a)) + abs(ht * math.sin(a)) + 0.01
            dv = abs(hl * math.sin(a)) + abs(ht * math.cos(a)) + 0.01
            out.append(_clip_box(name, cu - du, cv - dv, cu + du, cv + dv, size))
        elif name == "nodule":
            cu, cv, r = g["cx"] + c["cu"], c["cv"] + g["dy"], c["r"] * 1.3 + 0.004
            out.append(_clip_box(name, cu - r, cv - r, cu + r, cv + r, size))
        elif name == "pleural_effusion":
            for side in (("right", "left") if c["side"] == "bilateral" else (c["side"],)):
                lung = _lung(g, side)
                out.append(_clip_box(name, lung["lc"] - lung["la"], lung["dome"] - c["height"] - 0.03,
                                     lung["lc"] + lung["la"], lung["dome"] + 0.06, size))
        elif name == "pneumothorax":
            lung = _lung(g, c["side"])
            w = c["width"]
            lateral = lung["lc"] + lung["sgn"] * lung["la"]
            inner = lung["lc"] + lung["sgn"] * lung["la"] * (1 - w) - lung["sgn"] * 0.35 * lung["la"]
            out.append(_clip_box(name, min(lateral, inner), g["apex"] - 0.01, max(lateral, inner),
                                 lung["lv"] + 0.3 * lung["lb"], size))
        elif name == "scoliosis":
            a = abs(c["amp"])
            out.append(_clip_box(name, g["cx"] - a - 0.04, g["apex"] - 0.02, g["cx"] + a + 0.04,
                                 max(g["dome_r"], g["dome_l"]) + 0.06, size))
        elif name == "elevated_hemidiaphragm":
            lung = _lung(g, c["side"])
            out.append(_clip_box(name, lung["lc"] - lung["la"], lung["dome"] - 0.035, lung["lc"] + lung["la"],
                                 lung["dome"] + 0.07, size))
        elif name == "rotation":
            v = 0.19 + g["dy"]
            out.append(_clip_box(name, g["cx"] - 0.1 - abs(c["shift"]), v - 0.05, g["cx"] + 0.1 + abs(c["shift"]),
                                 v + 0.05, size))
        elif name == "pacemaker":
            pts = np.concatenate(_pacemaker_path(g, c))
            gx, gy = g["cx"] + c["gu"], c["gv"]
            u0 = min(pts[:, 0].min(), gx - 0.045) - 0.01
            u1 = max(pts[:, 0].max(), gx + 0.045) + 0.01
            out.append(_clip_box(name, u0, gy - 0.035, u1, pts[:, 1].max() + 0.01, size))
        elif name == "et_tube":
            pts = _et_tube_path(g, c)
            out.append(_clip_box(name, pts[:, 0].min() - 0.02, 0.0, pts[:, 0].max() + 0.02, pts[:, 1].max() + 0.02, size))
        elif name == "central_line":
            pts = _central_line_path(g, c)
            out.append(_clip_box(name, pts[:, 0].min() - 0.01, pts[:, 1].min() - 0.01, pts[:, 0].max() + 0.01,
                                 pts[:, 1].max() + 0.01, size))
        elif name == "sternotomy_wires":
            ctr = _wire_centers(g, c)
            out.append(_clip_box(name, ctr[:, 0].min() - 0.025, ctr[:, 1].min() - 0.02, ctr[:, 0].max() + 0.025,
                                 ctr[:, 1].max() + 0.02, size))
        elif name == "laterality_marker":
            u0, v0, u1, v1 = _marker_extent(c, size)
            out.append(_clip_box(name, u0, v0, u1, v1, size))
        elif name == "burned_in_text":
            u0, v0, u1, v1 = _text_extent(c, size)
            out.append(_clip_box(name, u0, v0, u1, v1, size))
        elif name == "low_exposure":
            out.append(_clip_box(name, 0.0, 0.0, 1.0, 1.0, size))
        elif name == "collimation_edge":
            for side, w in c["bands"]:
                u0, v0, u1, v1 = {"left": (0, 0, w, 1), "right": (1 - w, 0, 1, 1), "top": (0, 0, 1, w),
                                  "bottom": (0, 1 - w, 1, 1)}[side]
                out.append(_clip_box(name, u0, v0, u1, v1, size))
    return [b for b in out if b is not None]


def _marker_extent(c: dict[str, Any], size: int) -> tuple[float, float, float, float]:
    hpx = max(int(round(c["height"] * size)), 7)
    wpx = render_text(c["letter"], hpx).shape[1]
    inset = c["inset"]
    u0 = inset if c["corner"] in ("tl", "bl") else 1 - inset - wpx / size
    v0 = inset if c["corner"] in ("tl", "tr") else 1 - inset - hpx / size
    return u0, v0, u0 + wpx / size, v0 + hpx / size


def _text_extent(c: dict[str, Any], size: int) -> tuple[float, float, float, float]:
    hpx = max(int(round(c["height"] * size)), 5)
    wpx = min(render_text(c["text"], hpx).shape[1], int(size * (1 - c["start"]) - 2))
    v0 = 0.015 if c["edge"] == "top" else 1 - 0.015 - hpx / size
    return c["start"], v0, c["start"] + wpx / size, v0 + hpx / size


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------
def _severity_word(sev: float, words: tuple[str, str, str] = ("Mild", "Moderate", "Severe")) -> str:
    return words[0] if sev < 0.34 else words[1] if sev < 0.67 else words[2]


def _side_word(side: str | None) -> str:
    return {"right": "right", "left": "left", "bilateral": "bilateral"}.get(side or "", "")


def _report(case: PhantomCase, rng: np.random.Generator) -> str:
    c = case.concepts
    s: list[str] = []
    if "low_exposure" in c:
        s.append("Underexposed portable film limits evaluation.")
    if "rotation" in c:
        s.append("Patient is rotated.")
    if "cardiomegaly" in c:
        s.append(f"{_severity_word(c['cardiomegaly']['severity'])} cardiomegaly.")
    elif rng.random() < 0.6:
        s.append("Heart size is normal.")
    if "edema" in c:
        s.append(f"{_severity_word(c['edema']['severity'])} pulmonary edema with perihilar haziness.")
    if "consolidation" in c:
        x = c["consolidation"]
        s.append(f"{_severity_word(x['severity'])} {_side_word(x['side'])} lung consolidation.")
    if "atelectasis" in c:
        x = c["atelectasis"]
        s.append(f"Plate-like atelectasis at the {_side_word(x['side'])} lung base.")
    if "nodule" in c:
        x = c["nodule"]
        mm = int(round(x["r"] * 2 * MM_PER_UNIT))
        s.append(f"A {mm} mm nodule in the {_side_word(x['side'])} lung.")
    if "pleural_effusion" in c:
        x = c["pleural_effusion"]
        size_word = _severity_word(x["severity"], ("Small", "Moderate", "Large"))
        side = x["side"]
        s.append(f"{size_word} bilateral pleural effusions." if side == "bilateral"
                 else f"{size_word} {side} pleural effusion.")
    if "pneumothorax" in c:
        x = c["pneumothorax"]
        s.append(f"{_severity_word(x['severity'], ('Small', 'Moderate', 'Large'))} {_side_word(x['side'])} pneumothorax.")
    if "elevated_hemidiaphragm" in c:
        s.append(f"Elevated {_side_word(c['elevated_hemidiaphragm']['side'])} hemidiaphragm.")
    if "scoliosis" in c:
        s.append("Scoliosis of the thoracic spine.")
    if "et_tube" in c:
        s.append("Endotracheal tube in place, tip above the carina.")
    if "central_line" in c:
        s.append(f"{_side_word(c['central_line']['side']).capitalize()} central venous catheter terminates "
                 "in the superior vena cava.")
    if "pacemaker" in c:
        s.append("Pacemaker in place.")
    if "sternotomy_wires" in c:
        s.append("Median sternotomy wires.")
    negatives = [("edema", "No pulmonary edema."), ("consolidation", "No focal consolidation."),
                 ("pleural_effusion", "No pleural effusion."), ("pneumothorax", "No pneumothorax."),
                 ("atelectasis", "No atelectasis.")]
    for name, sentence in negatives:
        if name not in c and rng.random() < 0.5:
            s.append(sentence)
    if not any(CONCEPTS[k].category in ("cardiac", "pulmonary", "pleural") for k in c):
        s.append("No acute cardiopulmonary process.")
    return " ".join(s)


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------
def _texture_tiles(size: int, seed: int, count: int = 6) -> np.ndarray:
    """Ridged band-pass noise tiles [count, 2S, 2S]: thin branching lines like lung vessels."""
    rng = np.random.default_rng([seed, 0x7E47])
    n = 2 * size
    f = np.fft.fftfreq(n)
    rad = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2) * size  # cycles per image side
    band = np.exp(-((rad - 6.0) / 3.0) ** 2)
    tiles = np.empty((count, n, n), dtype=np.float32)
    for i in range(count):
        noise = rng.standard_normal((n, n))
        field_ = np.real(np.fft.ifft2(np.fft.fft2(noise) * band))
        field_ /= field_.std() + 1e-8
        tiles[i] = np.clip(1.0 - np.abs(field_) / 0.45, 0.0, 1.0)
    return tiles


def _ramp(d: np.ndarray, soft: float) -> np.ndarray:
    """A soft step: 1 where d <= -soft/2, 0 where d >= soft/2, linear between."""
    return np.clip(0.5 - d / soft, 0.0, 1.0)


def _col(values: Sequence[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)[:, None, None]


class _Canvas:
    """Per-batch grids and a splatting helper for thin curves."""

    def __init__(self, b: int, size: int):
        self.b, self.size = b, size
        grid = (np.arange(size, dtype=np.float32) + 0.5) / size
        self.U = grid[None, None, :]
        self.V = grid[None, :, None]

    def splat(self, out: np.ndarray, image: int, pts: np.ndarray, weight: float) -> None:
        """Add `weight` at normalised points pts [P, 2] of image `image` of `out` (bilinear)."""
        S = self.size
        x = pts[:, 0] * S - 0.5
        y = pts[:, 1] * S - 0.5
        x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
        fx, fy = x - x0, y - y0
        flat = out[image].reshape(-1)
        for dx, dy, ww in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
            xi, yi = x0 + dx, y0 + dy
            ok = (xi >= 0) & (xi < S) & (yi >= 0) & (yi < S)
            np.add.at(flat, yi[ok] * S + xi[ok], (weight * ww[ok]).astype(np.float32))


def _dense_curve(path: np.ndarray, size: int, step_px: float = 0.4) -> np.ndarray:
    """Resample a polyline so consecutive points are at most `step_px` pixels apart."""
    seg = np.linalg.norm(np.diff(path, axis=0), axis=1)
    total = seg.sum() * size
    n = max(int(total / step_px), 2)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.linspace(0, cum[-1], n)
    return np.stack([np.interp(t, cum, path[:, 0]), np.interp(t, cum, path[:, 1])], axis=1)


def _blur3(x: np.ndarray, passes: int = 1) -> np.ndarray:
    """Separable [1, 2, 1]/4 blur over the last two axes, edge-replicated."""
    for _ in range(passes):
        p = np.pad(x, ((0, 0), (1, 1), (0, 0)), mode="edge")
        x = (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) * 0.25
        p = np.pad(x, ((0, 0), (0, 0), (1, 1)), mode="edge")
        x = (p[:, :, :-2] + 2 * p[:, :, 1:-1] + p[:, :, 2:]) * 0.25
    return x


def _render(cases: list[PhantomCase], size: int, tiles: np.ndarray) -> np.ndarray:
    B, S = len(cases), size
    if B == 0:
        return np.zeros((0, S, S), dtype=np.float32)
    cv = _Canvas(B, S)
    U, V = cv.U, cv.V
    G = {k: _col([c.geom[k] for c in cases]) for k in cases[0].geom}
    cx, s, dy = G["cx"], G["s"], G["dy"]

    # Textures: a per-image crop of a shared tile bank.
    n_t, T2 = tiles.shape[0], tiles.shape[1]
    tid = np.array([int(c.geom["tile"]) % n_t for c in cases])
    ox = np.array([int(c.geom["tile_ox"] * (T2 - S)) for c in cases])
    oy = np.array([int(c.geom["tile_oy"] * (T2 - S)) for c in cases])
    ar = np.arange(S)
    vessels = tiles[tid[:, None, None], (oy[:, None, None] + ar[None, :, None]), (ox[:, None, None] + ar[None, None, :])]
    mottle = tiles[(tid[:, None, None] + 1) % n_t, (oy[:, None, None] + ar[None, :, None]),
                   (ox[:, None, None] + ar[None, None, :])]

    # Body: chest wall, shoulders sloping into the arms, neck; thicker in the centre.
    du = U - cx
    adu = np.abs(du)
    wall = G["tw"] + 0.055
    shoulder = wall + 0.12 * np.clip((0.24 - V) / 0.1, 0, 1) * np.clip((V - 0.02) / 0.06, 0, 1)
    body = _ramp(adu - np.maximum(wall, shoulder), 0.035) * _ramp(0.045 - V, 0.03)
    neck = _ramp(adu - 0.075, 0.03)
    body = np.maximum(body, neck)
    thickness = body * (0.62 + 0.3 * np.clip(1 - (du / wall) ** 2, 0, 1)) * G["soft"]
    liver = _ramp(V - (G["dome_r"] + 0.02), 0.06) * body
    A = 0.72 * thickness + 0.15 * liver

    # Lungs: a rounded apex widening to a sharp lateral costophrenic angle, a concave medial
    # border, cut below by the diaphragm dome.
    lungs_total = np.zeros((B, S, S), dtype=np.float32)
    lung_masks = {}
    for side in ("right", "left"):
        L = {k: _col([_lung(c.geom, side)[k] for c in cases]) for k in ("lc", "lv", "la", "lb", "dome", "sgn")}
        xl = (U - L["lc"]) * L["sgn"]  # lateral is positive
        yl = np.clip((V - G["apex"]) / (L["dome"] - G["apex"]), 0.0, 1.3)
        lat_edge = L["la"] * (0.25 + 0.8 * np.sqrt(yl))
        med_edge = L["la"] * (0.75 + 0.25 * yl)
        apex_curve = G["apex"] + 2.2 * (U - L["lc"] - 0.25 * L["sgn"] * L["la"]) ** 2
        dome_curve = L["dome"] - 0.02 + 1.3 * (xl + 0.1 * L["la"]) ** 2
        lateral = _ramp(xl - lat_edge, 0.018)
        medial = _ramp(-xl - med_edge, 0.02)
        top = _ramp(apex_curve - V, 0.02)
        below = _ramp(V - dome_curve, 0.012)
        envelope = lateral * medial * top
        mask = envelope * below
        q = ((U - L["lc"]) / L["la"]) ** 2 + ((V - L["lv"]) / L["lb"]) ** 2
        lung_masks[side] = (mask, q, L, dome_curve, envelope)
        lungs_total += mask
    A -= 0.5 * lungs_total

    # Lung markings, strongest near the hila.
    h = {k: _col([_heart(c.geom)[k] for c in cases]) for k in ("hx", "hv", "hw", "hh")}
    hil_v = h["hv"] - 0.1
    hil_dist = np.sqrt((np.abs(du) - 0.08) ** 2 + (V - hil_v) ** 2)
    markings = vessels * np.clip(1.0 - hil_dist / 0.32, 0.15, 1.0)

    # Pneumothorax: a lucent rim without markings, bounded by the visceral pleural line.
    marking_keep = np.ones((B, S, S), dtype=np.float32)
    idx, C = _having(cases, "pneumothorax")
    for j, (i, c) in enumerate(zip(idx, C)):
        mask, q, L, _, _ = lung_masks[c["side"]]
        r = np.sqrt(q[i])
        lat = (U[0] - L["lc"][i]) * L["sgn"][i] > -0.35 * L["la"][i]
        upper = V[0] < L["lv"][i] + 0.3 * L["lb"][i]
        region = (lat & upper).astype(np.float32)
        inner = 1.0 - c["width"]
        rim = np.clip((r - inner) / 0.04, 0, 1) * region * mask[i]
        marking_keep[i] -= rim
        A[i] -= 0.13 * rim
        A[i] += 0.22 * np.exp(-((r - inner) / 0.02) ** 2) * region * (r < 1.0)
    A += 0.2 * markings * lungs_total * np.clip(marking_keep, 0, 1)

    # Mediastinum, trachea, aortic knob, heart resting on the diaphragm.
    med_hw = 0.05 + 0.02 * np.clip((V - 0.2) / 0.3, 0, 1)
    med = _ramp(adu - med_hw, 0.025) * (V > 0.05) * _ramp(V - h["hv"], 0.06)
    A += 0.5 * med
    trachea = _ramp(adu - 0.012, 0.008) * (V > 0.03) * _ramp(V - (G["apex"] + 0.12), 0.02)
    A -= 0.3 * trachea
    knob = np.exp(-(((U - cx - 0.05) / 0.028) ** 2 + ((V - 0.27 - dy) / 0.03) ** 2))
    A += 0.3 * knob
    qh = ((U - h["hx"]) / h["hw"]) ** 2 + ((V - h["hv"]) / h["hh"]) ** 2
    A += 0.5 * _ramp(qh - 1.0, 0.25)

    # Spine with vertebral bodies; scoliosis curves it.
    t = (V - G["apex"]) / 0.75
    spine_u = cx + G["spine_amp"] * np.sin(np.pi * np.clip(t, 0, 1) + G["spine_phase"])
    spine = _ramp(np.abs(U - spine_u) - 0.026, 0.012) * (V > 0.04)
    pedicles = _ramp(np.abs(np.abs(U - spine_u) - 0.02) - 0.004, 0.006)
    A += spine * (0.3 + 0.14 * np.cos(np.pi * V / 0.042) ** 2) + 0.12 * pedicles * (V > 0.1)

    # Posterior ribs arch up from the spine and fall laterally; anterior ribs slope the other way.
    thorax = _ramp(adu - G["tw"] + 0.005, 0.03) * (adu > 0.03) * (V > G["apex"] - 0.04)
    thorax = thorax * _ramp(V - (G["dome_l"] + 0.06), 0.05)
    rib_v = V + 1.0 * adu - 3.5 * adu ** 2 - G["rib_phase"] * G["rib_spacing"]
    phase = (rib_v / G["rib_spacing"]) % 1.0
    ribs = np.clip(1.0 - np.abs(phase - 0.5) / 0.14, 0, 1)
    edge = np.clip(1.0 - np.abs(np.abs(phase - 0.5) - 0.12) / 0.03, 0, 1)  # cortical rims
    ant_v = V - 0.45 * adu - 0.5 * G["rib_phase"] * G["rib_spacing"]
    ant = np.clip(1.0 - np.abs((ant_v / (1.1 * G["rib_spacing"])) % 1.0 - 0.5) / 0.12, 0, 1)
    A += (0.12 * ribs + 0.07 * edge) * thorax + 0.05 * ant * thorax * (adu > 0.08)

    # Clavicles: S-shaped, from the medial heads beside the spine out to the shoulders;
    # rotation shifts both heads off the midline.
    for sgn in (-1.0, 1.0):
        mu = cx + G["rot"] + sgn * 0.04
        lu = cx + sgn * 0.3
        mv, lv = 0.2 + dy, 0.125 + dy
        tt = np.clip((U - mu) / (lu - mu), 0, 1)
        cv_line = mv + (lv - mv) * tt - 0.025 * np.sin(2 * np.pi * tt) * 0.5
        inside = _ramp(-(U - mu) * sgn - 0.005, 0.01) * _ramp((U - lu) * sgn, 0.02)
        width = 0.012 + 0.004 * (1 - tt)
        A += 0.4 * _ramp(np.abs(V - cv_line) - width, 0.008) * inside

    # Pathology.
    idx, C = _having(cases, "consolidation")
    for i, c in zip(idx, C):
        mask = lung_masks[c["side"]][0][i]
        blob = np.zeros((S, S), dtype=np.float32)
        cu, cvv = float(cases[i].geom["cx"] + c["cu"]), float(c["cv"] + cases[i].geom["dy"])
        for du_, dv_, sg in c["lumps"]:
            blob += np.exp(-(((U[0] - cu - du_) ** 2 + (V[0] - cvv - dv_) ** 2) / (2 * sg ** 2)))
        blob = np.clip(blob, 0, 1) * (0.65 + 0.35 * mottle[i])
        if c["bronchograms"]:
            blob = blob * (1 - 0.45 * vessels[i] * (blob > 0.5))
        A[i] += (0.3 + 0.35 * c["severity"]) * blob * mask

    idx, C = _having(cases, "edema")
    for i, c in zip(idx, C):
        g = cases[i].geom
        hv = _heart(g)["hv"] - 0.1
        sp = c["spread"]
        haze = sum(np.exp(-(((U[0] - g["cx"] - sg * 0.1) / (1.3 * sp)) ** 2 + ((V[0] - hv) / (1.8 * sp)) ** 2))
                   for sg in (-1, 1))
        kerley = (((V[0] * S / 3.0) % 1.0) < 0.34) * (V[0] > g["dome_r"] - 0.15)
        lat = np.abs(U[0] - g["cx"]) > g["tw"] - 0.09
        A[i] += ((0.18 + 0.22 * c["severity"]) * haze + 0.12 * kerley * lat) * lungs_total[i]

    idx, C = _having(cases, "atelectasis")
    for i, c in zip(idx, C):
        g = cases[i].geom
        lung = _lung(g, c["side"])
        cu, cvv = g["cx"] + c["cu"], lung["dome"] - c["lift"]
        ca, sa = math.cos(c["angle"]), math.sin(c["angle"])
        along = (U[0] - cu) * ca + (V[0] - cvv) * sa
        across = -(U[0] - cu) * sa + (V[0] - cvv) * ca
        plate = _ramp(np.abs(along) - c["length"] / 2, 0.02) * _ramp(np.abs(across) - c["thick"] / 2, 0.008)
        A[i] += (0.35 + 0.3 * c["severity"]) * plate * lung_masks[c["side"]][4][i]

    idx, C = _having(cases, "nodule")
    for i, c in zip(idx, C):
        g = cases[i].geom
        d = np.sqrt((U[0] - g["cx"] - c["cu"]) ** 2 + (V[0] - c["cv"] - g["dy"]) ** 2)
        A[i] += (0.7 + 0.25 * c["severity"]) * _ramp(d - c["r"], max(0.6 / S, 0.25 * c["r"]))

    idx, C = _having(cases, "pleural_effusion")
    for i, c in zip(idx, C):
        for side in (("right", "left") if c["side"] == "bilateral" else (c["side"],)):
            _, q, L, dome_curve, ellm = lung_masks[side]
            lateral = np.clip((U[0] - L["lc"][i]) * L["sgn"][i] / L["la"][i], -1, 1)
            level = dome_curve[i] - c["height"] * (0.55 + 0.45 * (lateral + 1) / 2) - 0.03 * (lateral + 1)
            fluid = _ramp(level - V[0], 0.015) * ellm[i] * (V[0] < dome_curve[i] + 0.02)
            A[i] += 0.75 * fluid

    # Devices: metal is far denser than anything else.
    metal = np.zeros((B, S, S), dtype=np.float32)
    idx, C = _having(cases, "pacemaker")
    for i, c in zip(idx, C):
        g = cases[i].geom
        gx, gy = g["cx"] + c["gu"], c["gv"]
        box = _ramp(np.maximum(np.abs(U[0] - gx) - 0.035, np.abs(V[0] - gy) - 0.024), 0.01)
        metal[i] += 2.2 * box
        for path in _pacemaker_path(g, c):
            pts = _dense_curve(path, S)
            cv.splat(metal, i, pts, 0.9)
    idx, C = _having(cases, "et_tube")
    for i, c in zip(idx, C):
        pts = _dense_curve(_et_tube_path(cases[i].geom, c), S)
        for off in (-0.009, 0.009):
            cv.splat(metal, i, pts + np.array([off, 0.0]), 0.55)
        tip = pts[-max(len(pts) // 12, 3):]
        cv.splat(metal, i, tip, 1.6)
    idx, C = _having(cases, "central_line")
    for i, c in zip(idx, C):
        pts = _dense_curve(_central_line_path(cases[i].geom, c), S)
        cv.splat(metal, i, pts, 0.75)
    idx, C = _having(cases, "sternotomy_wires")
    for i, c in zip(idx, C):
        ang = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        for u0, v0 in _wire_centers(cases[i].geom, c):
            loop = np.stack([u0 + 0.011 * np.cos(ang), v0 + 0.008 * np.sin(ang)], axis=1)
            cv.splat(metal, i, _dense_curve(np.concatenate([loop, loop[:1]]), S), 0.8)
    A += _blur3(metal)

    # Attenuation to brightness, per-image exposure.
    img = 1.0 - np.exp(-G["katt"] * np.clip(A, 0, None))
    img = np.clip(img, 0, 1) ** G["gamma"]
    img = _blur3(img)

    idx, C = _having(cases, "low_exposure")
    low_noise = np.zeros(B, dtype=np.float32)
    for i, c in zip(idx, C):
        m = img[i].mean()
        img[i] = (m + (img[i] - m) * c["contrast"]) * 0.85
        low_noise[i] = c["noise"]

    # Artifacts drawn on the film.
    for i, c in zip(*_having(cases, "laterality_marker")):
        u0, v0, _, _ = _marker_extent(c, S)
        glyph = render_text(c["letter"], max(int(round(c["height"] * S)), 7))
        _stamp(img[i], glyph, int(round(v0 * S)), int(round(u0 * S)), 0.97)
    for i, c in zip(*_having(cases, "burned_in_text")):
        u0, v0, u1, _ = _text_extent(c, S)
        glyph = render_text(c["text"], max(int(round(c["height"] * S)), 5))
        glyph = glyph[:, : int(round((u1 - u0) * S))]
        _stamp(img[i], glyph, int(round(v0 * S)), int(round(u0 * S)), 0.95)

    # Film noise, seeded per image so a batch renders exactly as its images would alone.
    for i, c in enumerate(cases):
        nrng = np.random.default_rng([c.index, 0x40153, int(c.geom["tile"]) & 0xFFFF])
        sigma = c.geom["noise"] + low_noise[i]
        img[i] += nrng.standard_normal((S, S), dtype=np.float32) * sigma

    for i, c in zip(*_having(cases, "collimation_edge")):
        value = 0.93 if c["bright"] else 0.03
        for side, w in c["bands"]:
            k = max(int(round(w * S)), 1)
            if side == "left":
                img[i, :, :k] = value
            elif side == "right":
                img[i, :, S - k:] = value
            elif side == "top":
                img[i, :k, :] = value
            else:
                img[i, S - k:, :] = value

    img = np.clip(img, 0.0, 1.0)
    return (np.round(img * 255.0) / 255.0).astype(np.float32)


def _having(cases: Sequence[PhantomCase], name: str) -> tuple[list[int], list[dict[str, Any]]]:
    idx = [i for i, c in enumerate(cases) if name in c.concepts]
    return idx, [cases[i].concepts[name] for i in idx]


def _stamp(img: np.ndarray, glyph: np.ndarray, top: int, left: int, value: float) -> None:
    S = img.shape[0]
    h, w = glyph.shape
    t0, l0 = max(top, 0), max(left, 0)
    t1, l1 = min(top + h, S), min(left + w, img.shape[1])
    if t1 <= t0 or l1 <= l0:
        return
    g = glyph[t0 - top:t1 - top, l0 - left:l1 - left]
    region = img[t0:t1, l0:l1]
    img[t0:t1, l0:l1] = np.where(g > 0, value, region)


# ----------------------------------------------------------------------------------------------
# Export: PNGs + a metadata table that the folder+CSV adapter reads back identically
# ----------------------------------------------------------------------------------------------
METADATA_COLUMNS = ("id", "path", "split", *FINDINGS, "concepts", "boxes", "report", "meta")


def export_folder(world: PhantomWorld, out: str | Path, batch_size: int = 64, progress: bool = True,
                  indices: Sequence[int] | None = None, workers: int = 1) -> Path:
    """Write images/<id>.png and metadata.csv under `out`; return the CSV path."""
    from sae_cxr.data.images import save_png
    from sae_cxr.progress import progress_bar
    from sae_cxr.run import atomic_path

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    idx = list(range(world.cfg.n)) if indices is None else list(indices)
    rows = []
    with progress_bar(total=len(idx), desc="phantom images", unit="img", disable=not progress) as bar:
        for cases, imgs in world.batches(batch_size, idx, workers=workers):
            for case, img in zip(cases, imgs):
                rel = f"images/{case.id}.png"
                with atomic_path(out / rel) as tmp:
                    save_png(img, tmp)
                rows.append(metadata_row(case, rel))
            bar.update(len(cases))
    csv_path = out / "metadata.csv"
    with atomic_path(csv_path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(METADATA_COLUMNS))
            w.writeheader()
            w.writerows(rows)
    world_path = out / "world.json"
    with atomic_path(world_path) as tmp:
        tmp.write_text(json.dumps({"kind": "phantom", **world.cfg.to_dict()}, indent=2, sort_keys=True))
    return csv_path


def metadata_row(case: PhantomCase, rel_path: str) -> dict[str, str]:
    row = {"id": case.id, "path": rel_path, "split": case.split}
    for f, v in zip(FINDINGS, case.labels):
        row[f] = str(int(v))
    row["concepts"] = ";".join(case.concepts)
    row["boxes"] = json.dumps([b.to_dict() for b in case.boxes])
    row["report"] = case.report
    row["meta"] = json.dumps(case_meta(case), sort_keys=True)
    return row


def preview_sheet(world: PhantomWorld, path: str | Path, n: int = 16, cols: int = 4, scale: int = 2) -> Path:
    """A contact sheet of the first `n` images with their concept boxes drawn and labelled."""
    from sae_cxr.viz import contact_sheet, draw_boxes, to_rgb

    n = min(n, world.cfg.n)
    cases = world.cases(range(n))
    imgs = world.render(cases)
    tiles = [draw_boxes(to_rgb(img, scale), case.boxes, scale=scale) for case, img in zip(cases, imgs)]
    titles = [f"{case.id[-4:]} {case.split}: " + ", ".join(f for f, v in zip(FINDINGS, case.labels) if v > 0)
              for case in cases]
    sheet = contact_sheet(tiles, titles, cols=cols)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
