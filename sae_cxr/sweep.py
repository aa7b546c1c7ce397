"""Robustness sweep: the whole pipeline at its defaults on several phantom worlds, graded per world.

A method tuned to one world shows up here: the worlds differ in seed, image size, concept prevalence
and the kind of planted shortcut (a device, burned-in text, an acquisition artifact), and every
world is graded against the same targets (`sae_cxr.evaluate`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from sae_cxr.run import RunDir, atomic_path, write_json_atomic


@dataclass(frozen=True)
class World:
    """One phantom world of the sweep."""

    name: str
    seed: int
    size: int = 128
    prevalence_scale: float = 1.0
    shortcut: str | None = None
    """nuisance:finding:rate (see `sae_cxr.findings.Shortcut`)."""


WORLDS: tuple[World, ...] = (
    World("demo", seed=0, size=128, prevalence_scale=1.0, shortcut="pacemaker:Cardiomegaly:0.9"),
    World("text-marker", seed=11, size=160, prevalence_scale=0.7, shortcut="burned_in_text:Consolidation:0.9"),
    World("artifact", seed=23, size=96, prevalence_scale=1.4, shortcut="low_exposure:Edema:0.9"),
    World("device-2", seed=37, size=128, prevalence_scale=1.0, shortcut="central_line:Atelectasis:0.9"),
    World("marker", seed=51, size=112, prevalence_scale=1.0, shortcut="laterality_marker:Pleural Effusion:0.9"),
)
"""The default worlds: the demo's, then one per kind of shortcut, a second device on another finding, and a
nuisance that is common without the shortcut (a laterality marker, on about half of all films) planted on
a finding the classifier sees perfectly anyway."""

HEADLINE = ("concept_recovery", "labeler_named", "labeler_category", "pointing_pattern_gradcam",
            "pointing_patch_map", "pointing_logit_gradcam",
            "deletion_area_top", "deletion_area_random", "shortcut_rank", "shortcut_swing_rank", "shortcut_pattern_rank", "shortcut_reliance", "fvu", "dead", "spliced_auroc_drop",
            "patterns", "patterns_per_prediction", "targets_passed")


def world_config(world: World, out: Path, n: int):
    """The pipeline's default RunConfig on this world (nothing but the world changes)."""
    from sae_cxr.pipeline import demo_config

    cfg = demo_config(out, n=n, seed=world.seed, size=world.size, shortcut=world.shortcut)
    cfg.data.phantom.prevalence_scale = world.prevalence_scale
    return cfg


def headline(m: dict[str, Any]) -> dict[str, Any]:
    """The per-world row of the sweep table, from an eval/metrics.json."""
    t = m.get("targets", {})
    ens = m.get("ensemble", {})
    att = m.get("attribution", {})
    loc = att.get("localization", {})
    f = att.get("faithfulness", {})
    cr = m.get("patterns", {}).get("concept_recovery", {})
    acc = m.get("labels", {}).get("accuracy", {}).get("evidence", {})
    planted = m.get("shortcut", {}).get("planted", {})
    return {
        "concept_recovery": (f"{cr['recovered']}/{cr['concepts']}"
                             + (f" (+{len(cr['recovered_as_absence'])} as absence)" if cr.get("recovered_as_absence") else "")
                             if cr else None),
        "labeler_named": acc.get("named_correctly"), "labeler_category": acc.get("category_correct"),
        "pointing_pattern_gradcam": loc.get("with_baseline/pattern_gradcam", {}).get("pointing_game"),
        "pointing_patch_map": loc.get("with_baseline/pattern_map", {}).get("pointing_game"),
        "pointing_logit_gradcam": loc.get("with_baseline/logit_gradcam", {}).get("pointing_game"),
        "deletion_area_top": f.get("deletion_area_top"), "deletion_area_random": f.get("deletion_area_random"),
        "shortcut_rank": planted.get("rank"), "shortcut_swing_rank": planted.get("swing_rank"),
        "shortcut_pattern_rank": planted.get("pattern_rank"),
        "shortcut_reliance": planted.get("reliance"),
        "fvu": ens.get("fvu", {}).get("median"), "dead": ens.get("dead_fraction", {}).get("median"),
        "spliced_auroc_drop": ens.get("spliced_auroc_drop_worst_median"),
        "patterns": m.get("patterns", {}).get("patterns"),
        "patterns_per_prediction": (att.get("patterns_per_prediction") or {}).get("median"),
        "targets_passed": f"{sum(v['pass'] for v in t.values())}/{len(t)}",
        "failed": [k for k, v in t.items() if not v["pass"]],
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "" if v is None else str(v)


def sweep_markdown(rows: dict[str, dict[str, Any]], worlds: Sequence[World]) -> str:
    lines = ["# Phantom sweep", "", "| world | seed | size | prevalence | shortcut | " + " | ".join(HEADLINE) + " | failed |",
             "|" + "---|" * (6 + len(HEADLINE))]
    for w in worlds:
        r = rows.get(w.name)
        if r is None:
            continue
        cells = [w.name, str(w.seed), str(w.size), f"x{w.prevalence_scale:g}", f"`{w.shortcut}`"]
        cells += [_fmt(r.get(k)) for k in HEADLINE] + [", ".join(r.get("failed", [])) or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_sweep(out: str | Path, worlds: Sequence[World] = WORLDS, n: int = 6000,
              configure: Callable[[Any], Any] | None = None,
              on_world: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, dict[str, Any]]:
    """Run every stage on every world under `out/<world>`, then write out/sweep.json and out/sweep.md.

    `configure` may change the config of every world alike (the reduced test sweep shrinks the
    stages); finished stages are reused, so an interrupted sweep resumes."""
    from sae_cxr.pipeline import run_pipeline

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    for w in worlds:
        path = root / w.name
        cfg = world_config(w, path, n)
        if configure is not None:
            cfg = configure(cfg) or cfg
        run = RunDir(path, create=True)
        t0 = time.perf_counter()
        run_pipeline(run, cfg)
        m = json.loads(run.sub("eval/metrics.json").read_text())
        rows[w.name] = {**headline(m), "seconds": round(time.perf_counter() - t0, 1)}
        if on_world:
            on_world(w.name, rows[w.name])
    write_json_atomic(root / "sweep.json", {"worlds": [asdict(w) for w in worlds], "n": n, "rows": rows})
    with atomic_path(root / "sweep.md") as tmp:
        tmp.write_text(sweep_markdown(rows, worlds))
    return rows
