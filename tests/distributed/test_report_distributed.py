"""`sae-cxr report` under torchrun with 2 gloo ranks writes the report one process writes: every
page, JSON document and table, byte for byte once the build time, timings, run path and manifest
checksum and plotly's random div ids (which differ between any two builds) are normalised; the summary's audit sums equal up
to float rounding (each rank adds its own pages)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from sae_cxr.config import RunConfig
from sae_cxr.pipeline import run_stage
from sae_cxr.run import RunDir
from tests.distributed.harness import copy_run, one_thread, stage_summary, torchrun

TIMINGS = ("build_seconds", "images_per_s", "world_size")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _report_config(cfg_path: Path, out: Path, per_page: int) -> Path:
    d = json.loads(cfg_path.read_text())
    d["label"]["labelers"] = ["evidence"]
    d["label"]["verification"]["n_pos"] = d["label"]["verification"]["n_neg"] = 5
    d["explain"]["max_predictions"] = 20
    d["report"]["splits"] = ["test"]
    d["report"]["per_page"] = per_page
    out.write_text(json.dumps(d, indent=1))
    return out


def _normalised_text(path: Path, run: Path, summary: dict) -> str:
    text = path.read_text(encoding="utf-8")
    text = text.replace(str(run), "<run>").replace(summary["run"]["manifest_sha256"], "<sha>")
    text = text.replace(summary["built_at"], "<built>")
    text = re.sub(r"built <built> in [0-9.]+ s", "built <built> in <s> s", text)
    return UUID.sub("<uuid>", text)  # plotly's figure div ids, random in every build


def _strip(summary: dict, run: Path) -> dict:
    kept = {k: v for k, v in summary.items() if k not in TIMINGS and k != "built_at"}
    text = json.dumps(kept).replace(str(run), "<run>").replace(summary["run"]["manifest_sha256"], "<sha>")
    return json.loads(text)


def _close(a, b, where: str) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), f"{where}: {a} vs {b}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def test_two_ranks_report_like_one(base_run, tmp_path):
    base, cfg_path = base_run
    cfg_path = _report_config(cfg_path, tmp_path / "config.json", per_page=3)
    cfg = RunConfig.load(cfg_path)
    prep = copy_run(base, tmp_path / "prep")
    with one_thread():
        for s in ("attribute", "label", "explain"):
            run_stage(RunDir(prep), s, cfg)
    one, two = copy_run(prep, tmp_path / "one"), copy_run(prep, tmp_path / "two")
    with one_thread():
        run_stage(RunDir(one), "report", cfg)
    proc, _ = torchrun(2, ["report", "--run", str(two), "--config", str(cfg_path)])
    assert proc.stdout.count("report: done") == 1, proc.stdout

    r1, r2 = one / "reports/test", two / "reports/test"
    s1 = json.loads((r1 / "report.json").read_text())
    s2 = json.loads((r2 / "report.json").read_text())
    n_pages = len(s1["pages"])
    assert n_pages >= 3, f"the test needs pages for both ranks (and an uneven split), got {n_pages}"
    files1 = sorted(p.relative_to(r1).as_posix() for p in r1.rglob("*") if p.is_file())
    files2 = sorted(p.relative_to(r2).as_posix() for p in r2.rglob("*") if p.is_file())
    assert files1 == files2  # no rank parts, build folders or stray files left behind
    assert not list((two / "reports").glob(".*"))

    for rel in files1:
        if rel == "report.json":
            continue
        if rel.endswith(".parquet"):
            a, b = pd.read_parquet(r1 / rel), pd.read_parquet(r2 / rel)
            assert len(a) > 0
            pd.testing.assert_frame_equal(a, b, check_exact=True)
            assert pq.ParquetFile(r1 / rel).num_row_groups == pq.ParquetFile(r2 / rel).num_row_groups
            continue
        t1, t2 = _normalised_text(r1 / rel, one, s1), _normalised_text(r2 / rel, two, s2)
        assert t1 == t2, f"{rel} differs between 1 and 2 ranks"

    assert s2["world_size"] == 2 and "world_size" not in s1
    _close(_strip(s1, one), _strip(s2, two), "report.json")

    st1, st2 = stage_summary(one, "report"), stage_summary(two, "report")
    assert st1["status"] == st2["status"] == "done"
    assert st2["summary"]["world_size"] == 2
    assert st1["summary"]["test"]["pages"] == st2["summary"]["test"]["pages"] == n_pages
