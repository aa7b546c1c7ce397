"""`sae-cxr`: one subcommand per stage, plus `phantom`, `demo`, `run` (a config file) and `search`.

The CLI only parses arguments and calls the pipeline or a stage module; errors a user can act
on (bad input, a missing stage) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from sae_cxr import __version__

from sae_cxr.run import RunError

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, KeyError, RunError)


def _add_phantom(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("phantom", help="generate a phantom world: PNGs + metadata.csv (+ a preview sheet)",
                       description="Write N phantom chest radiographs with planted concepts to OUT/images and "
                                   "their labels, concepts, boxes, reports and splits to OUT/metadata.csv.")
    p.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--shortcut", default=None, help="plant a shortcut, nuisance:finding:rate, e.g. pacemaker:Cardiomegaly:0.9")
    p.add_argument("--prevalence-scale", type=float, default=1.0, help="multiply every concept's base prevalence")
    p.add_argument("--preview", default=None, help="also write a contact sheet with labelled boxes to this PNG")
    p.add_argument("--preview-n", type=int, default=16, help="images on the preview sheet (default 16)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="render processes")
    p.set_defaults(func=cmd_phantom)


def cmd_phantom(a: argparse.Namespace) -> int:
    from sae_cxr.data.phantom import PhantomConfig, PhantomWorld, export_folder, preview_sheet

    world = PhantomWorld(PhantomConfig(n=a.n, seed=a.seed, size=a.size, shortcut=a.shortcut,
                                       prevalence_scale=a.prevalence_scale))
    t0 = time.perf_counter()
    csv_path = export_folder(world, a.out, workers=a.workers)
    dt = time.perf_counter() - t0
    print(f"wrote {a.n} images and {csv_path} in {dt:.1f} s ({a.n / dt:.0f} images/s)")
    if a.preview:
        print(f"preview: {preview_sheet(world, a.preview, n=a.preview_n)}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run every stage end to end on the built-in phantom world",
                       description="Generate a phantom world with a planted shortcut and run the whole pipeline on it.")
    p.add_argument("--out", default="artifacts/demo", help="run directory (default artifacts/demo)")
    p.add_argument("--n", type=int, default=None, help="number of phantom images (default: the demo's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--shortcut", default="pacemaker:Cardiomegaly:0.9",
                   help="planted shortcut nuisance:finding:rate, or 'none'")
    p.add_argument("--force", nargs="*", default=[], metavar="STAGE", help="redo these stages (and all after them)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(a: argparse.Namespace) -> int:
    from sae_cxr.pipeline import demo_config, run_pipeline
    from sae_cxr.run import RunDir

    shortcut = None if str(a.shortcut).lower() in ("none", "") else a.shortcut
    kwargs: dict[str, Any] = {"seed": a.seed, "size": a.size, "shortcut": shortcut}
    if a.n is not None:
        kwargs["n"] = a.n
    cfg = demo_config(a.out, **kwargs)
    from sae_cxr import distributed as dist

    dist.on_main(lambda: RunDir(a.out, create=True), what="creating the run directory")
    dist.check_shared_dir(a.out)
    run = RunDir(a.out)
    t0 = time.perf_counter()
    run_pipeline(run, cfg, force=a.force, on_stage=_stage_printer(t0))
    _say(f"demo finished in {time.perf_counter() - t0:.1f} s: {run.path}")
    return 0


def _stage_printer(t0: float) -> Callable[[str, dict[str, Any]], None]:
    """One line per finished stage: elapsed time, the stage's own time (or 'skipped') and its summary."""

    def report(name: str, summary: dict[str, Any]) -> None:
        state = "skipped (up to date)" if summary.get("skipped") else f"{summary.get('seconds', 0):.1f} s"
        _say(f"[{time.perf_counter() - t0:6.1f} s] {name:<18} {state}  {_short(summary)}")

    return report


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run every stage from a config file (real data sets: see configs/)",
                       description="Run the pipeline's stages in order from a RunConfig file (JSON or TOML). A stage "
                                   "whose inputs have not changed since it last finished is skipped; --force redoes "
                                   "a stage (and the stages after it, whose inputs it changes).")
    p.add_argument("--config", required=True, help="a RunConfig JSON/TOML file, e.g. configs/chexpert.toml")
    p.add_argument("--run", default=None, help="run directory (default: artifacts/<name from the config>)")
    p.add_argument("--force", nargs="*", default=[], metavar="STAGE", help="redo these stages (and all after them)")
    p.add_argument("--until", default=None, metavar="STAGE", help="stop after this stage")
    p.add_argument("--from", dest="start", default=None, metavar="STAGE",
                   help="start at this stage (the ones before it must have finished)")
    p.set_defaults(func=cmd_run)


def cmd_run(a: argparse.Namespace) -> int:
    from sae_cxr.config import RunConfig
    from sae_cxr.pipeline import absolute_paths, run_pipeline, stage_names
    from sae_cxr.run import RunDir, check_run_name

    cfg = absolute_paths(RunConfig.load(a.config), Path.cwd())
    names = stage_names()
    for flag, stage in (("--from", a.start), ("--until", a.until)):
        if stage is not None and stage not in names:
            raise ValueError(f"{flag} {stage!r} is not a stage; stages: {', '.join(names)}")
    first = names.index(a.start) if a.start else 0
    last = names.index(a.until) if a.until else len(names) - 1
    if first > last:
        raise ValueError(f"--from {a.start} comes after --until {a.until}")
    run_path = Path(a.run) if a.run else Path("artifacts") / check_run_name(cfg.name)
    run = RunDir(run_path, create=True)
    t0 = time.perf_counter()
    print(f"run {run.path}: stages {names[first]} .. {names[last]} from {a.config}", flush=True)
    run_pipeline(run, cfg, stages=names[first:last + 1], force=a.force, on_stage=_stage_printer(t0))
    print(f"finished in {time.perf_counter() - t0:.1f} s: {run.path}")
    if "report" in names[first:last + 1]:
        for split in cfg.report.splits:
            print(f"report ({split}): {run.path / 'reports' / split / 'index.html'}")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="batch attribution report: offline HTML, evidence table, JSON per image",
                       description="Without --split/--ids/--out: run the 'report' stage (every split in the run's "
                                   "report config, skipped when up to date). With them: build one report now, for "
                                   "a split or a list of images, into --out (default <run>/reports/<split>/).")
    p.add_argument("--run", required=True, help="a run directory whose attribute stage has finished")
    p.add_argument("--split", default=None, help="the split to report (default test)")
    p.add_argument("--ids", default=None, metavar="FILE", help="report only these record ids (one per line)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (replaced if it holds a report)")
    p.add_argument("--max-images", type=int, default=None, help="report at most this many images")
    p.add_argument("--per-page", type=int, default=None, help="images per HTML page (default 50)")
    p.add_argument("--config", default=None, help="a RunConfig JSON/TOML (stage mode; default: the run's own)")
    p.add_argument("--force", action="store_true", help="stage mode: rebuild even if up to date")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_report)


def cmd_report(a: argparse.Namespace) -> int:
    from sae_cxr import distributed as dist
    from sae_cxr.config import RunConfig
    from sae_cxr.pipeline import config_from_run, run_stage
    from sae_cxr.report import ReportConfig, build_report, read_ids_file, rerecord_stage_outputs
    from sae_cxr.run import RunDir

    run = RunDir(a.run)
    if a.split is None and a.ids is None and a.out is None and a.max_images is None and a.per_page is None:
        cfg = RunConfig.load(a.config) if a.config else config_from_run(run)
        summary = run_stage(run, "report", cfg, force=a.force)
        if not dist.is_main():  # one report of the outcome per job, rank 0's
            return 0
        state = "up to date, skipped" if summary.get("skipped") else f"done in {summary.get('seconds', 0):.1f} s"
        print(f"report: {state}")
        for split in cfg.report.splits:
            s = summary.get(split, {})
            print(f"  {split}: {s.get('images')} images, {s.get('pages')} pages, {s.get('images_per_s')} images/s: "
                  f"{run.path / 'reports' / split / 'index.html'}")
        return 0
    if a.config or a.force:
        raise ValueError("--config and --force belong to stage mode (no --split/--ids/--out); a report built with "
                         "--split/--ids/--out is always rebuilt from the run as it is")
    kwargs: dict[str, Any] = {"split": a.split or "test", "progress": not a.no_progress}
    if a.ids:
        kwargs["ids"] = tuple(read_ids_file(a.ids))
    if a.max_images is not None:
        kwargs["max_images"] = a.max_images
    if a.per_page is not None:
        kwargs["per_page"] = a.per_page
    res = build_report(run, ReportConfig(**kwargs), out=a.out)  # under torchrun: pages split among the ranks
    if dist.on_main(rerecord_stage_outputs, run, res.out, what="recording the rebuilt report"):
        print("(the report stage's recorded checksums were refreshed for the rebuilt folder)")
    if not dist.is_main():
        return 0
    print(f"report: {res.images} images on {res.pages} pages in {res.seconds:.1f} s ({res.images_per_s:.0f} images/s)")
    print(f"  {res.out / 'index.html'}")
    print(f"  manifest sha256 {res.manifest_sha256}")
    return 0


def _short(summary: dict[str, Any], limit: int = 160) -> str:
    s = json.dumps({k: v for k, v in summary.items() if k not in ("seconds", "skipped")}, default=str)
    return s if len(s) <= limit else s[: limit - 1] + "…"


# Per-stage flags: (flag, config section, field, type, help). Values override the run's config.
STAGE_FLAGS: dict[str, list[tuple[str, str, str, Any, str]]] = {
    "data": [
        ("--source", "data", "source", str, "phantom | folder | mimic-cxr-jpg | chexpert | nih | rsna"),
        ("--data", "data", "path", str, "data set root, or the CSV of a folder source"),
        ("--uncertainty", "data", "uncertainty", str, "uncertain labels: ones | zeros | ignore"),
        ("--phantom-n", "phantom", "n", int, "phantom world size"),
        ("--phantom-seed", "phantom", "seed", int, "phantom world seed"),
        ("--shortcut", "phantom", "shortcut", str, "phantom shortcut nuisance:finding:rate"),
    ],
    "extract": [
        ("--backbone", "extract", "backbone", str, "phantom | biomedclip | hf-hub:ORG/REPO | local-dir:PATH"),
        ("--mode", "extract", "mode", str, "image | multimodal (image + report, 2x dim)"),
        ("--patches", "extract", "patches", str, "keep patch tokens for: all | eval | none"),
        ("--batch-size", "extract", "batch_size", int, "images per forward pass"),
        ("--shard-size", "extract", "shard_size", int, "records per shard file: the unit of resume and, under "
                                                        "torchrun, of the work given to each rank"),
        ("--workers", "extract", "num_workers", int, "image-decoding processes (-1 = auto)"),
        ("--device", "extract", "device", str, "auto | cpu | cuda | cuda:N"),
    ],
    "train-classifier": [
        ("--hidden", "classifier", "hidden", int, "hidden width (the transcoders' output)"),
        ("--lr", "classifier", "lr", float, "learning rate"),
        ("--max-epochs", "classifier", "max_epochs", int, "epoch limit (early stopping on val mean AUROC)"),
        ("--n-boot", "classifier", "n_boot", int, "bootstrap resamples for the intervals"),
    ],
}


def _add_stage(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=f"Run the {name!r} stage on a run directory: {help_text}.")
    p.add_argument("--run", required=True, help="run directory (created if missing)")
    p.add_argument("--config", default=None, help="a RunConfig JSON/TOML (default: the run's own config)")
    p.add_argument("--force", action="store_true", help="redo the stage even if its inputs are unchanged")
    p.add_argument("--skip-bad", action="store_true", help="leave out unreadable images (they are listed)")
    for flag, section, field_, typ, h in STAGE_FLAGS.get(name, []):
        p.add_argument(flag, dest=f"ov__{section}__{field_}", type=typ, default=None, help=h)
    if name == "extract":
        for flag, section, field_, typ, h in STAGE_FLAGS["data"]:
            p.add_argument(flag, dest=f"ov__{section}__{field_}", type=typ, default=None,
                           help=f"{h} (runs the data stage first)")
        p.add_argument("--dataset", dest="ov__data__source", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_stage, stage=name)


def _apply_overrides(cfg: Any, args: argparse.Namespace) -> tuple[bool, Any]:
    """Apply --flags to the config; True if any data-stage setting changed."""
    touched_data = False
    for key, value in vars(args).items():
        if not key.startswith("ov__") or value is None:
            continue
        _, section, field_ = key.split("__")
        target = cfg.data.phantom if section == "phantom" else getattr(cfg, section)
        setattr(target, field_, value)
        touched_data |= section in ("data", "phantom")
    if getattr(args, "skip_bad", False):
        cfg.data.skip_bad = True
    # re-run dataclass validation on the sections we touched
    from sae_cxr.config import RunConfig

    return touched_data, RunConfig.from_dict(cfg.to_dict())


def cmd_stage(a: argparse.Namespace) -> int:
    from sae_cxr import distributed as dist
    from sae_cxr.config import RunConfig
    from sae_cxr.pipeline import config_from_run, get_stage, run_stage
    from sae_cxr.run import RunDir

    # under torchrun: rank 0 creates the run, every rank must see it (shared file system)
    dist.on_main(lambda: RunDir(a.run, create=True), what="creating the run directory")
    dist.check_shared_dir(a.run)
    run = RunDir(a.run)
    cfg = RunConfig.load(a.config) if a.config else config_from_run(run)
    touched_data, cfg = _apply_overrides(cfg, a)
    stage = get_stage(a.stage)
    if "data" in stage.depends and dist.broadcast(touched_data or run.stage("data") is None):
        _say(f"data: {_short(run_stage(run, 'data', cfg))}")
    summary = run_stage(run, a.stage, cfg, force=a.force)
    state = "up to date, skipped" if summary.get("skipped") else f"done in {summary.get('seconds', 0):.1f} s"
    _say(f"{a.stage}: {state}")
    for k, v in summary.items():
        if k not in ("skipped", "seconds"):
            _say(f"  {k}: {json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}")
    return 0


def _say(msg: str) -> None:
    """Print on rank 0 only: under torchrun every rank runs the command and would repeat it."""
    from sae_cxr import distributed as dist

    if dist.is_main():
        print(msg, flush=True)


def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="search a run: similar patterns, similar images, or patterns for a text",
                       description="Query a run's FAISS indices with exactly one of --pattern, --image or --text.")
    p.add_argument("--run", required=True)
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--pattern", type=int, help="a pattern id: the most similar patterns")
    q.add_argument("--image", help="an image id: the most similar images")
    q.add_argument("--text", help='a phrase, e.g. "pacemaker": the patterns whose labels match it')
    p.add_argument("-k", type=int, default=20, help="results (default 20)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_search)


def cmd_search(a: argparse.Namespace) -> int:
    from sae_cxr.run import RunDir
    from sae_cxr.search import search

    hits = search(RunDir(a.run), pattern=a.pattern, image=a.image, text=a.text, k=a.k)
    if a.json:
        print(json.dumps([h.to_dict() for h in hits], indent=1))
        return 0
    for rank, h in enumerate(hits, 1):
        extra = f"  {h.label} [{h.category}]" if h.label else ""
        print(f"{rank:>3}. {h.kind} {h.id}  score {h.score:.3f}{extra}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sae-cxr", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"sae-cxr {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress and debugging details")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in ADDERS:
        add(sub)
    from sae_cxr.pipeline import STAGES

    for stage in STAGES:
        if stage.name not in CUSTOM_STAGE_COMMANDS:
            _add_stage(sub, stage.name, stage.description)
    return p


ADDERS: list[Callable[[argparse._SubParsersAction], None]] = [_add_phantom, _add_demo, _add_run, _add_search,
                                                              _add_report]
CUSTOM_STAGE_COMMANDS = ("report",)  # stages whose subcommand has its own flags (added by ADDERS)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse and run one command. Under torchrun (WORLD_SIZE > 1) every rank runs it inside one
    torch.distributed process group; ranks other than 0 keep quiet except for errors."""
    from sae_cxr import distributed as dist

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        env = dist.launch_env()
    except dist.DistributedError as e:
        print(f"sae-cxr {args.command}: error: {e}", file=sys.stderr)
        return 2
    quiet = env.rank != 0
    if quiet:
        os.environ["SAE_CXR_NO_PROGRESS"] = "1"  # one progress bar per job, rank 0's
    logging.basicConfig(level=logging.INFO if args.verbose and not quiet else logging.WARNING,
                        format=f"%(asctime)s {'[rank %d] ' % env.rank if env.launched else ''}"
                               "%(name)s %(levelname)s %(message)s")
    prefix = f"[rank {env.rank}/{env.world_size}] " if env.launched else ""
    try:
        with dist.session():
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{prefix}interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS + (dist.DistributedError,) as e:
        if args.verbose:
            raise
        print(f"{prefix}sae-cxr {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
