"""The stages in order. Each reads and writes the run directory, nothing else.

A stage is skipped when it finished before with the same inputs hash (its config section plus
the output hashes of the stages it depends on); `force` redoes it and invalidates the stages
after it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from sae_cxr.config import RunConfig, to_dict
from sae_cxr.run import RunDir, sha256_json

log = logging.getLogger("sae_cxr")

StageFn = Callable[[RunDir, RunConfig], "StageResult"]


@dataclass
class StageResult:
    outputs: list[str]  # paths relative to the run directory
    summary: dict[str, Any]


@dataclass(frozen=True)
class Stage:
    name: str
    depends: tuple[str, ...]
    config_keys: tuple[str, ...]  # RunConfig sections whose change invalidates the stage
    fn: StageFn
    description: str
    distributed: bool = False
    """Under torchrun every rank runs the stage function (it shards its work by rank and rank 0
    merges); otherwise rank 0 runs it alone and the other ranks wait for its result."""


def _stage_data(run: RunDir, cfg: RunConfig) -> StageResult:
    from sae_cxr.ingest import ingest

    return StageResult(*ingest(run, cfg.data, seed=cfg.seed))


def _stage_extract(run: RunDir, cfg: RunConfig) -> StageResult:
    from sae_cxr.extract import run_extract
    from sae_cxr.ingest import RunRecords

    # records are built shard by shard from records.parquet: memory bounded by the shard, not the data set
    return StageResult(*run_extract(run, cfg.extract, RunRecords(run), skip_bad=cfg.data.skip_bad))


def _stage_classifier(run: RunDir, cfg: RunConfig) -> StageResult:
    from sae_cxr.classifier import run_classifier

    return StageResult(*run_classifier(run, cfg.classifier, seed=cfg.seed))


def _stage_transcoders(run: RunDir, cfg: RunConfig) -> StageResult:
    from sae_cxr.transcoders.stage import run_train_transcoders

    return StageResult(*run_train_transcoders(run, cfg.transcoders, seed=cfg.seed))


def _stage_patterns(run: RunDir, cfg: RunConfig) -> StageResult:
    from sae_cxr.patterns import run_patterns

    return StageResult(*run_patterns(run, cfg.patterns, seed=cfg.seed))


def _stage_galleries(run: RunDir, cfg: RunConfig) -> StageResult:
    from sae_cxr.gallery import run_galleries

    return StageResult(*run_galleries(run, cfg.galleries, seed=cfg.seed))


def _stage_attribute(run: RunDir, cfg: RunConfig) -> StageResult:
    from sae_cxr.attribution import run_attribute

    return StageResult(*run_attribute(run, cfg.attribution, seed=cfg.seed))


def _stage_label(run: RunDir, cfg: RunConfig) -> StageResult:
    from sae_cxr.labeling.stage import run_label

    return StageResult(*run_label(run, cfg.label))


def _stage_explain(run: RunDir, cfg: RunConfig) -> StageResult:
    from sae_cxr.explain import run_explain

    return StageResult(*run_explain(run, cfg.explain, llm_config=cfg.label.lmm))


def _stage_report(run: RunDir, cfg: RunConfig) -> StageResult:
    from sae_cxr.report import run_report_stage

    return StageResult(*run_report_stage(run, cfg.report))


def _stage_eval(run: RunDir, cfg: RunConfig) -> StageResult:
    from sae_cxr.evaluate import run_eval

    return StageResult(*run_eval(run, cfg.eval))


STAGES: list[Stage] = [
    Stage("data", (), ("data",), _stage_data, "load or generate the images and write records.parquet"),
    Stage("extract", ("data",), ("extract",), _stage_extract,
          "embed every image (and report) with the backbone; patch tokens for the evaluation splits",
          distributed=True),
    Stage("train-classifier", ("extract",), ("classifier",), _stage_classifier,
          "train the diagnostic head on the embeddings; AUROC/AUPRC per finding with bootstrap intervals"),
    Stage("train-transcoders", ("train-classifier",), ("transcoders",), _stage_transcoders,
          "train the transcoder ensemble (x -> the head's hidden layer) in one vectorised pass; per-member metrics",
          distributed=True),
    Stage("patterns", ("train-transcoders",), ("patterns",), _stage_patterns,
          "consolidate the members' latents into stable patterns; monosemanticity and concept recovery"),
    Stage("galleries", ("patterns",), ("galleries",), _stage_galleries,
          "activation galleries per pattern and FAISS indices over images and patterns"),
    Stage("attribute", ("galleries",), ("attribution",), _stage_attribute,
          "decompose every prediction exactly into patterns; faithfulness and localization",
          distributed=True),
    Stage("label", ("attribute",), ("label",), _stage_label,
          "name every pattern (evidence, text tower, LMM) and verify the names on held-out images"),
    Stage("explain", ("label",), ("explain",), _stage_explain,
          "natural-language explanations for clinicians and lay readers; NLE metrics"),
    Stage("report", ("explain",), ("report",), _stage_report,
          "batch attribution reports per split: offline HTML, the long evidence table, JSON per image",
          distributed=True),
    Stage("eval", ("explain",), ("eval",), _stage_eval,
          "grade the run against the targets: metrics.json, plots, summary.md, the shortcut audit"),
]


def stage_names() -> list[str]:
    return [s.name for s in STAGES]


def get_stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise ValueError(f"unknown stage {name!r}; stages: {', '.join(stage_names())}")


def inputs_hash(run: RunDir, stage: Stage, cfg: RunConfig) -> str:
    d = to_dict(cfg)
    parts: dict[str, Any] = {k: d.get(k) for k in stage.config_keys}
    if "seed" not in stage.config_keys:
        parts["seed"] = cfg.seed
    for dep in stage.depends:
        parts[f"stage:{dep}"] = run.stage_hash(dep)
    return sha256_json(parts)


def run_stage(run: RunDir, name: str, cfg: RunConfig, force: bool = False) -> dict[str, Any]:
    """Run one stage unless it is already done with the same inputs; return its summary.

    Under torchrun (see sae_cxr.distributed) every rank calls this with the same arguments: rank 0
    alone decides whether to skip and alone touches the manifest; a distributed stage runs on every
    rank, any other stage on rank 0 while the others wait. All ranks return rank 0's summary.
    """
    from sae_cxr import distributed as dist

    stage = get_stage(name)
    for dep in stage.depends:
        run.require(dep, hint=f"stage {name!r} needs it: run `sae-cxr {dep} --run {run.path}` first")
    h = inputs_hash(run, stage, cfg)
    dist.check_same(f"the inputs of stage {name!r} (config and upstream outputs)", h)
    skip = dist.broadcast(not force and run.is_done(name, h))
    if skip:
        log.info("stage %s: up to date, skipped", name)
        info = run.stage(name)
        return {**(info.summary if info else {}), "skipped": True}  # the flag last: a summary key never hides it

    with contextlib.ExitStack() as held:  # rank 0's stage lock, from begin() to finish(); nothing on the others

        def begin() -> None:
            # One writer per stage: a second process running this stage on the same run fails fast. Rank 0
            # alone takes it (the others never touch the manifest); the kernel releases it if we are killed.
            held.enter_context(run.stage_lock(name))
            later = [s.name for s in STAGES[STAGES.index(stage) + 1:]]
            run.invalidate(*later) if force else None
            run.set_config("run", {"name": cfg.name, "seed": cfg.seed})
            for key in stage.config_keys:
                run.set_config(key, to_dict(getattr(cfg, key)))
            run.begin_stage(name, h)

        dist.on_main(begin, what=f"starting stage {name!r}")
        t0 = time.perf_counter()
        if stage.distributed:
            with dist.all_ranks(f"stage {name!r}"):
                result = stage.fn(run, cfg)
        else:
            result = dist.on_main(stage.fn, run, cfg, what=f"stage {name!r}")
        seconds = time.perf_counter() - t0
        summary = {**result.summary, "seconds": round(seconds, 2)}
        if dist.is_distributed():
            summary["world_size"] = dist.world_size()

        def finish() -> dict[str, Any]:
            run.finish_stage(name, result.outputs, summary)
            return summary

        summary = dist.on_main(finish, what=f"recording stage {name!r}")  # the others wait: the next stage reads it
    log.info("stage %s: done in %.1f s", name, seconds)
    return {**summary, "skipped": False}


def run_pipeline(run: RunDir, cfg: RunConfig, stages: Sequence[str] | None = None,
                 force: Sequence[str] = (), on_stage: Callable[[str, dict[str, Any]], None] | None = None
                 ) -> dict[str, dict[str, Any]]:
    """Run stages in order (all by default); `force` names stages to redo."""
    names = list(stages) if stages is not None else stage_names()
    unknown = [f for f in force if f not in stage_names()]
    if unknown:
        raise ValueError(f"--force names unknown stage(s) {unknown}; stages: {', '.join(stage_names())}")
    out: dict[str, dict[str, Any]] = {}
    forced = False
    for name in names:
        forced = forced or name in force
        out[name] = run_stage(run, name, cfg, force=forced)
        if on_stage:
            on_stage(name, out[name])
    return out


def config_from_run(run: RunDir, base: RunConfig | None = None) -> RunConfig:
    """The RunConfig a run was made with (sections from its manifest over `base` or the defaults)."""
    from sae_cxr.config import from_dict

    d = to_dict(base or RunConfig())
    stored = run.manifest().get("config", {})
    for key, value in stored.items():
        if key == "run":
            d["name"], d["seed"] = value.get("name", d["name"]), value.get("seed", d["seed"])
        elif key in d and value is not None:
            d[key] = value
    return from_dict(RunConfig, d)


PATH_OPTIONS = ("image_root", "reports")
"""data.options that name folders (resolved like data.path)."""


def absolute_paths(cfg: RunConfig, base: str | Path) -> RunConfig:
    """Make the config's relative paths absolute against `base` (where the user ran the command).

    The manifest keeps the config, and later stages, reports and the dashboard may run from another
    folder: a relative data path stored there would silently point elsewhere."""
    from dataclasses import replace

    base = Path(base)

    def fix(p: str) -> str:
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (base / q).resolve())

    data = replace(cfg.data, path=fix(cfg.data.path) if cfg.data.path else cfg.data.path,
                   options={k: (fix(v) if k in PATH_OPTIONS and isinstance(v, str) else v)
                            for k, v in cfg.data.options.items()})
    backbone = cfg.extract.backbone
    for prefix in ("local-dir:", "phantom:"):
        if backbone.startswith(prefix):
            backbone = prefix + fix(backbone[len(prefix):])
    return replace(cfg, data=data, extract=replace(cfg.extract, backbone=backbone))


def demo_config(out: str | Path, n: int = 6000, seed: int = 0, size: int = 128,
                shortcut: str | None = "pacemaker:Cardiomegaly:0.9") -> RunConfig:
    """The demo: the phantom world with a planted shortcut, every stage at its defaults."""
    from sae_cxr.config import DataConfig
    from sae_cxr.data.phantom import PhantomConfig

    return RunConfig(name=Path(out).name, seed=seed,
                     data=DataConfig(source="phantom", phantom=PhantomConfig(n=n, seed=seed, size=size,
                                                                             shortcut=shortcut)))
