"""Shared pieces of the dashboard pages: the current run, cached data access, links and plots.

Pages stay thin: they ask this module for data (cached per run: `st.cache_resource` for the
models and indices, `st.cache_data` for tables, keyed by the run path and the manifest's
modification time) and draw it. All data access goes through `sae_cxr.app_data`.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import streamlit as st

from sae_cxr import app_data as ad
from sae_cxr.findings import FINDINGS
from sae_cxr.run import RunDir, RunError, StageMissingError
from sae_cxr.viz import CATEGORY_COLORS as VIZ_COLORS

PAGES: dict[str, tuple[str, str]] = {
    "overview": ("Overview", ":material/dashboard:"),
    "patterns": ("Patterns", ":material/grid_view:"),
    "pattern": ("Pattern", ":material/blur_on:"),
    "image": ("Image explorer", ":material/radiology:"),
    "search": ("Search", ":material/search:"),
    "audit": ("Audit", ":material/policy:"),
    "reports": ("Reports", ":material/description:"),
}
"""Page key (also its url_path and the value of ?page=) -> (title, icon)."""

PAGE_OBJECTS: dict[str, Any] = {}
"""Page key -> st.Page, filled by Home.py before the page runs (for links and switches)."""

CATEGORY_COLORS = {k: f"rgb{v}" for k, v in VIZ_COLORS.items()}
CATEGORY_COLORS.setdefault("unlabelled", "rgb(160,160,160)")


# ----------------------------------------------------------------------------------------------
# The current run
# ----------------------------------------------------------------------------------------------
def cli_args() -> argparse.Namespace:
    """`streamlit run app/Home.py -- --run artifacts/demo [--artifacts DIR]` (env: SAE_CXR_RUN, SAE_CXR_ARTIFACTS)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--run", default=os.environ.get(ad.RUN_ENV))
    p.add_argument("--artifacts", default=os.environ.get(ad.ARTIFACTS_ENV))
    args, _ = p.parse_known_args(sys.argv[1:])
    return args


def artifacts_root(args: argparse.Namespace) -> Path:
    if args.artifacts:
        return Path(args.artifacts).resolve()
    if args.run:
        return Path(args.run).resolve().parent
    return Path("artifacts").resolve()


def select_run() -> RunDir | None:
    """The sidebar run picker; returns the chosen run (or None with a message when there is none).

    Choices: the runs directly under the artifacts folder (valid run names only, never a path
    outside it) plus the run given with --run. A `?run=NAME` deep link picks a run by name."""
    args = cli_args()
    root = artifacts_root(args)
    choices = ad.run_choices(root)
    if args.run:
        given = Path(args.run).resolve()
        if (given / "manifest.json").exists() and given not in choices.values():
            choices = {given.name: given, **choices}
    if not choices:
        st.error(f"No run found in {root}. Create one with `make demo` or "
                 f"`python -m sae_cxr.cli demo --out {root / 'demo'}`, then reload.")
        return None
    names = list(choices)
    wanted = st.query_params.get("run")
    if wanted and wanted not in choices:
        st.sidebar.warning(f"?run={wanted!r} is not a run in {root}; showing another run.")
        wanted = None
    if "run_name" not in st.session_state or st.session_state["run_name"] not in choices:
        default = wanted or (Path(args.run).resolve().name if args.run else None)
        st.session_state["run_name"] = default if default in choices else names[0]
    elif wanted and wanted != st.session_state["run_name"]:
        st.session_state["run_name"] = wanted
    st.sidebar.selectbox("Run", names, key="run_name", help=f"runs in {root}")
    path = choices[st.session_state["run_name"]]
    try:
        return RunDir(path)
    except RunError as e:
        st.error(f"{e}")
        return None


def current_run() -> RunDir:
    run = st.session_state.get("_run")
    if run is None:
        st.error("No run is selected: pick one in the sidebar.")
        st.stop()
    return run


def key(run: RunDir) -> tuple[str, int]:
    """The cache key of a run: its path and the manifest's modification time."""
    return str(run.path), ad.run_stamp(run.path)


# ----------------------------------------------------------------------------------------------
# Cached data access
# ----------------------------------------------------------------------------------------------
@st.cache_resource(show_spinner="Loading the run's models and indices…", max_entries=4)
def _models(path: str, stamp: int) -> ad.RunModels:
    return ad.RunModels(path)


def models(run: RunDir) -> ad.RunModels:
    return _models(*key(run))


@st.cache_data(show_spinner=False, max_entries=256)
def _data(fn: str, path: str, stamp: int, *args: Any) -> Any:
    return getattr(ad, fn)(RunDir(path), *args)


def data(fn: str, run: RunDir, *args: Any) -> Any:
    """`app_data.<fn>(run, *args)`, cached per run (path + manifest mtime) and arguments."""
    return _data(fn, *key(run), *args)


@st.cache_data(show_spinner="Rendering the gallery…", max_entries=256)
def _tiles(path: str, stamp: int, pattern_id: int, kind: str, limit: int, boxes: str) -> list[ad.Tile]:
    return _models(path, stamp).gallery_tiles(pattern_id, kind, limit, boxes)


def tiles(run: RunDir, pattern_id: int, kind: str = "top", limit: int = 20, boxes: str = "pattern") -> list[ad.Tile]:
    return _tiles(*key(run), int(pattern_id), kind, int(limit), boxes)


def warm(run: RunDir, galleries: list[tuple[int, str, int]]) -> None:
    """Before drawing many tiles: compute the patch tokens of all their images in one backbone batch
    ((pattern id, gallery kind, how many) each). Cheap when they are known already."""
    m = models(run)
    m.warm([r for pid, kind, limit in galleries for r in m.gallery_rows(pid, kind, limit)])


@st.cache_data(show_spinner="Reading the image…", max_entries=32)  # full-size images: keep few
def _record_analysis(path: str, stamp: int, record_id: str) -> ad.ImageAnalysis:
    return _models(path, stamp).analyse_record(record_id)


def record_analysis(run: RunDir, record_id: str) -> ad.ImageAnalysis:
    return _record_analysis(*key(run), record_id)


@st.cache_data(show_spinner="Analysing the upload…", max_entries=8, ttl=3600)
def _upload_analysis(path: str, stamp: int, data_: bytes, name: str, report: str) -> ad.ImageAnalysis:
    return _models(path, stamp).analyse_upload(data_, name, report)


def upload_analysis(run: RunDir, data_: bytes, name: str, report: str = "") -> ad.ImageAnalysis:
    """Kept in memory only (no disk persistence): uploads are never written anywhere."""
    return _upload_analysis(*key(run), data_, name, report)


@st.cache_data(show_spinner="Decomposing…", max_entries=1024,
               hash_funcs={ad.ImageAnalysis: lambda a: (a.record_id, a.x.tobytes())})
def _decomposition(path: str, stamp: int, analysis: ad.ImageAnalysis, finding: str):
    return _models(path, stamp).decomposition(analysis, finding)


def decomposition(run: RunDir, analysis: ad.ImageAnalysis, finding: str):
    return _decomposition(*key(run), analysis, finding)


@st.cache_data(show_spinner=False, max_entries=1024,
               hash_funcs={ad.ImageAnalysis: lambda a: (a.record_id, a.x.tobytes())})
def _heat_image(path: str, stamp: int, analysis: ad.ImageAnalysis, pattern_id: int, size: int) -> bytes:
    m = _models(path, stamp)
    heat = m.pattern_heat(pattern_id, analysis)
    return ad.encode(ad.render_tile(analysis.image, heat, (), size))


def heat_image(run: RunDir, analysis: ad.ImageAnalysis, pattern_id: int, size: int = 180) -> bytes:
    """The image with one pattern's spatial map overlaid."""
    return _heat_image(*key(run), analysis, int(pattern_id), size)


@st.cache_data(show_spinner=False, max_entries=256)
def _search(path: str, stamp: int, kind: str, query: Any, k: int) -> pd.DataFrame:
    s = _models(path, stamp).search
    if kind == "text":
        hits = s.text_to_patterns(str(query), k)
    elif kind == "pattern":
        hits = s.similar_patterns(int(query), k)
    else:
        hits = s.similar_images(str(query), k)
    return ad.hits_frame(hits)


def search(run: RunDir, kind: str, query: Any, k: int = 12) -> pd.DataFrame:
    return _search(*key(run), kind, query, int(k))


@st.cache_data(show_spinner=False, max_entries=2048)
def _thumb(path: str, stamp: int, record_id: str, size: int) -> bytes:
    rec = _models(path, stamp).record(record_id)
    return ad.encode(ad.render_tile(rec.load_image(), None, (), size))


def thumb(run: RunDir, record_id: str, size: int = 160) -> bytes:
    return _thumb(*key(run), record_id, int(size))


# ----------------------------------------------------------------------------------------------
# Errors, links, layout
# ----------------------------------------------------------------------------------------------
def guard(body: Callable[[], None]) -> None:
    """Run a page body; turn the run's known problems into actionable messages instead of tracebacks."""
    try:
        body()
    except StageMissingError as e:
        st.error(f"{e}")
    except (RunError, FileNotFoundError) as e:
        st.error(f"The run directory is incomplete or damaged: {e}")
    except Exception as e:  # a page must never take the app down (st.stop/st.rerun are BaseExceptions: they pass)
        st.error(f"This page failed: {type(e).__name__}: {e}. If the run was changed while the app was "
                 "running, reload the page; otherwise report this with the details below.")
        with st.expander("details"):
            st.code(traceback.format_exc())


def need(run: RunDir, *stages: str) -> bool:
    """True if every stage is done; otherwise show what to run and return False."""
    missing = [s for s in stages if not ad.stage_done(run, s)]
    for s in missing:
        st.warning(ad.missing_stage_message(run, s))
    return not missing


def page_link(page: str, label: str, icon: str | None = None, **params: Any) -> None:
    """A link to another page of the app with query parameters (a deep link)."""
    st.page_link(PAGE_OBJECTS.get(page, f"views/{page}.py"), label=label, icon=icon,
                 query_params={k: str(v) for k, v in params.items() if v is not None})


def go(page: str, **params: Any) -> None:
    st.switch_page(PAGE_OBJECTS.get(page, f"views/{page}.py"),
                   query_params={k: str(v) for k, v in params.items() if v is not None})


def query_int(name: str, default: int | None = None) -> int | None:
    v = st.query_params.get(name)
    try:
        return int(v) if v is not None else default
    except ValueError:
        st.warning(f"?{name}={v!r} is not a number; ignored.")
        return default


def query_finding(default: str | None = None) -> str | None:
    from sae_cxr.findings import canonical_finding

    v = st.query_params.get("finding")
    if not v:
        return default
    try:
        return canonical_finding(v)
    except ValueError:
        st.warning(f"?finding={v!r} is not one of {', '.join(FINDINGS)}; ignored.")
        return default


def chart(fig, where: Any = None, key: str | None = None) -> None:
    """A plotly figure across the container's width, without the mode bar (zoom by dragging still works)."""
    (where or st).plotly_chart(fig, width="stretch", key=key, config={"displayModeBar": False, "displaylogo": False})


def category_badge(category: str | None) -> str:
    """An HTML badge in the category's colour."""
    c = category or "unlabelled"
    return (f"<span style='background:{CATEGORY_COLORS.get(c, CATEGORY_COLORS['other'])};color:#111;"
            f"padding:2px 8px;border-radius:10px;font-size:0.85em'>{c}</span>")


def fmt(v: Any, digits: int = 3) -> str:
    try:
        if v is None or pd.isna(v):
            return "–"
    except (TypeError, ValueError):
        pass
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)
