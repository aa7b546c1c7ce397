"""Batch reports and `sae-cxr run --config` on tiny real-format data sets built here.

One module-scoped run (a folder + CSV of phantom PNGs, some of them DICOM, a tiny offline
backbone, every stage at toy size) goes end to end through `sae-cxr run --config`; the report
tests read that run. A second run reads an NIH ChestX-ray14-style folder (Data_Entry, split
lists, BBox_List) through the public adapter.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sae_cxr.cli import main
from sae_cxr.config import RunConfig
from sae_cxr.findings import FINDINGS
from sae_cxr.run import RunDir
from tests.helpers import tiny_phantom_clip

REPO = Path(__file__).resolve().parents[1]

# every stage at toy size: the whole pipeline runs in seconds on one CPU core
TOY_STAGES = """
[classifier]
hidden = 16
max_epochs = 5
n_boot = 20
device = "cpu"

[transcoders]
n_members = 3
n_latents = 32
k = 4
device = "cpu"

[transcoders.train]
epochs = 2.0
min_samples = 0
batch_size = 32

[patterns]
probe_size = 256
profile_dims = 16
top_k = 5

[galleries]
top_k = 5
heldout_top = 5
heldout_negatives = 5

[label]
labelers = ["evidence"]

[label.verification]
n_pos = 5
n_neg = 5

[explain]
max_predictions = 40

[report]
splits = ["test"]
per_page = 7
"""


def _extract_section(backbone: str) -> str:
    return f'[extract]\nbackbone = "{backbone}"\nbatch_size = 32\nnum_workers = 0\ndevice = "cpu"\n'


def _to_dicom(png: Path) -> Path:
    """The same picture as a 12-bit MONOCHROME2 DICOM (what a PACS export holds)."""
    from PIL import Image

    from tests.data.dicom_fixtures import write_dicom

    pixels = (np.asarray(Image.open(png).convert("L"), dtype=np.uint16) * 16).astype(np.uint16)
    return write_dicom(png.with_suffix(".dcm"), pixels)


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """`sae-cxr run --config` on a folder + CSV of 100 phantom images (every 10th one a DICOM)."""
    from sae_cxr.data.phantom import PhantomConfig, PhantomWorld, export_folder

    root = tmp_path_factory.mktemp("folder")
    weights = tiny_phantom_clip(root / "backbone")
    csv = export_folder(PhantomWorld(PhantomConfig(n=100, size=64, seed=3, shortcut="pacemaker:Cardiomegaly:0.9")),
                        root / "world", workers=1)
    table = pd.read_csv(csv)
    for i in range(0, len(table), 10):
        table.loc[i, "path"] = str(_to_dicom(csv.parent / table.loc[i, "path"]).relative_to(csv.parent))
    table.to_csv(csv, index=False)
    config = root / "folder.toml"
    config.write_text(f'name = "tiny-folder"\n\n[data]\nsource = "folder"\npath = "{csv}"\n\n'
                      + _extract_section(f"phantom:{weights}") + TOY_STAGES)
    run_dir = root / "run"
    rc = main(["run", "--config", str(config), "--run", str(run_dir)])
    assert rc == 0
    return RunDir(run_dir), config


def _attributed_test_ids(run: RunDir) -> list[str]:
    preds = pd.read_parquet(run.sub("attributions/predictions.parquet"))
    return list(dict.fromkeys(preds.loc[preds["split"] == "test", "record_id"].astype(str)))


# -- the real-data pipeline -------------------------------------------------------------------------
def test_run_config_goes_end_to_end_then_skips_and_force_redoes_one(folder_run, capsys):
    run, config = folder_run
    stages = run.manifest()["stages"]
    assert [s for s in stages if stages[s]["status"] == "done"] and all(
        stages[s]["status"] == "done" for s in ("data", "extract", "attribute", "label", "explain", "report"))
    assert run.stage("data").summary["records"] == 100  # the DICOM rows were read, none skipped
    assert (run.path / "reports/test/index.html").is_file()
    capsys.readouterr()
    assert main(["run", "--config", str(config), "--run", str(run.path)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[")]
    from sae_cxr.pipeline import stage_names

    assert len(lines) == len(stage_names()) and all("skipped (up to date)" in ln for ln in lines), lines
    before = run.stage("explain").finished
    assert main(["run", "--config", str(config), "--run", str(run.path), "--force", "report"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"report\s+\d+\.\d s", out) and "explain            skipped" in out
    assert run.stage("explain").finished == before
    run.verify_all()  # every recorded output (the rebuilt report included) matches its checksum


def test_example_configs_load_and_say_what_to_download():
    from sae_cxr.data.public import source_options

    configs = sorted((REPO / "configs").glob("*.toml"))
    names = {p.stem for p in configs}
    assert {"mimic-cxr-jpg-biomedclip", "mimic-cxr-jpg-biomedclip-multimodal", "chexpert", "nih-chestxray14",
            "rsna-pneumonia", "folder-csv"} <= names
    for p in configs:
        cfg = RunConfig.load(p)  # strict: a misspelt key in a shipped config fails here
        text = p.read_text()
        assert "download" in text.lower(), f"{p.name} does not say what to download"
        assert cfg.data.source in ("folder", "mimic-cxr-jpg", "chexpert", "nih", "rsna")
        if cfg.data.source != "folder":  # options are checked only when the data stage opens the set: check now
            assert set(cfg.data.options) <= set(source_options(cfg.data.source)), p.name
    multimodal = RunConfig.load(REPO / "configs/mimic-cxr-jpg-biomedclip-multimodal.toml")
    assert multimodal.extract.mode == "multimodal" and multimodal.extract.backbone == "biomedclip"


def test_run_config_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[data]\nsorce = "folder"\n')
    assert main(["run", "--config", str(bad), "--run", str(tmp_path / "r")]) == 2
    assert "unknown key(s) ['sorce']" in capsys.readouterr().err
    good = tmp_path / "good.toml"
    good.write_text("")
    assert main(["run", "--config", str(good), "--run", str(tmp_path / "r"), "--until", "extrakt"]) == 2
    assert "--until 'extrakt' is not a stage" in capsys.readouterr().err


def test_nih_style_folder_with_boxes_runs_through_the_public_adapter(tmp_path):
    """An NIH ChestX-ray14 layout (Data_Entry_2017.csv, split lists, BBox_List_2017.csv, images in
    images_00N/images/) holding phantom films, through `sae-cxr run --config` up to attribution."""
    from PIL import Image

    from sae_cxr.data.phantom import PhantomConfig, PhantomWorld

    world = PhantomWorld(PhantomConfig(n=60, size=64, seed=5)).dataset()
    root = tmp_path / "nih"
    nih_name = {"Pleural Effusion": "Effusion"}
    entries, train_val, test, boxes = [], [], [], []
    for k, rec in enumerate(world.records):
        name = f"{k + 1:08d}_000.png"
        folder = root / f"images_{1 + k % 2:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rec.load_image() * 255).astype(np.uint8)).save(folder / name)
        found = [nih_name.get(f, f) for f, v in zip(FINDINGS, rec.labels) if v == 1]
        entries.append(f"{name},{'|'.join(found) or 'No Finding'},0,{k + 1},060Y,M,PA,64,64,0.143,0.143,")
        (test if k % 3 == 0 else train_val).append(name)
        for b in rec.boxes:
            if b.label == "pleural_effusion":
                boxes.append(f"{name},Effusion,{b.x},{b.y},{b.w},{b.h}")
    (root / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n" + "\n".join(entries) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    (root / "BBox_List_2017.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n" + "\n".join(boxes) + "\n")
    weights = tiny_phantom_clip(tmp_path / "backbone")
    config = tmp_path / "nih.toml"
    config.write_text(f'name = "tiny-nih"\n\n[data]\nsource = "nih"\npath = "{root}"\n\n[data.options]\n'
                      f"val_fraction = 0.25\nboxes = true\n\n" + _extract_section(f"phantom:{weights}")
                      + TOY_STAGES + '\n[attribution]\nsplits = ["test"]\nfaithfulness_samples = 10\n'
                      "localization_images = 10\n")
    assert main(["run", "--config", str(config), "--run", str(tmp_path / "run"), "--until", "attribute"]) == 0
    run = RunDir(tmp_path / "run")
    assert run.stage("data").summary["splits"]["test"] == len(test)
    assert run.stage("attribute").summary["images"] == len(test)
    assert run.stage("label") is None  # --until stops where it says
    records = pd.read_parquet(run.sub("records.parquet"))
    assert records["boxes"].astype(str).str.contains("Effusion").sum() == len({b.split(",")[0] for b in boxes})


# -- the report ---------------------------------------------------------------------------------------
class _Page(HTMLParser):
    """Collects what a browser would fetch (src/href/srcset/data, CSS url()) and the image sections."""

    def __init__(self) -> None:
        super().__init__()
        self.fetched: list[str] = []
        self.sections: list[str] = []
        self.csp: str | None = None
        self._style = False
        self.scripts_with_src: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href", "srcset", "data", "poster", "action"):
            if a.get(key):
                self.fetched.append(a[key])
        if tag == "script" and a.get("src"):
            self.scripts_with_src.append(a["src"])
        if tag == "section" and "img" in (a.get("class") or "").split():
            self.sections.append(a["id"])
        if tag == "meta" and a.get("http-equiv", "").lower() == "content-security-policy":
            self.csp = a.get("content")
        if a.get("style"):
            self.fetched += re.findall(r"url\(([^)]*)\)", a["style"])
        self._style = tag == "style"

    def handle_data(self, data):
        if self._style:
            self.fetched += re.findall(r"url\(([^)]*)\)", data)

    def handle_endtag(self, tag):
        self._style = False


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def test_report_html_opens_offline_with_a_section_per_image(folder_run):
    run, _ = folder_run
    out = run.path / "reports" / "test"
    ids = _attributed_test_ids(run)
    pages = sorted(out.glob("page-*.html"))
    assert len(pages) == -(-len(ids) // 7)  # per_page = 7 in the config
    sections: list[str] = []
    for p in [out / "index.html", *pages]:
        page = _parse(p)
        remote = [u for u in page.fetched if re.match(r"\s*['\"]?\s*(https?:)?//", u)]
        assert not remote and not page.scripts_with_src, (p.name, remote)
        assert page.csp and "default-src 'none'" in page.csp and "http" not in page.csp
        sections += page.sections
    assert sections == [f"img-{i}" for i in ids]  # phantom ids are safe names already
    index = (out / "index.html").read_text(encoding="utf-8")
    assert "Plotly" in index and "Shortcut audit" in index and "Worst-explained" in index
    summary = json.loads((out / "report.json").read_text())
    manifest_sha = summary["run"]["manifest_sha256"]
    assert re.fullmatch(r"[0-9a-f]{64}", manifest_sha) and manifest_sha in index
    assert {r["finding"] for r in summary["shortcut_audit"]} == set(FINDINGS)
    # the report's per-label audit is sae_cxr.audit's, when the report covers the audit's images
    from sae_cxr.audit import audit_run

    audit = audit_run(run, ("test",))
    compared = 0
    for r in summary["shortcut_audit"]:
        fa = audit.findings[r["finding"]]
        if r["images"] != fa.n_images:
            continue
        t = r["top_nuisance_label"]
        compared += t is not None
        if fa.groups is None or fa.groups.empty:
            assert t is None
        else:
            top = fa.groups.iloc[0]
            assert (t["label"], t["category"], t["patterns"]) == (top["label"], top["category"], top["n_patterns"])
            assert t["swing"] == pytest.approx(top["swing"], rel=1e-6, abs=1e-9)
            assert t["separation"] == pytest.approx(top["separation"], rel=1e-6, abs=1e-9, nan_ok=True)
    assert compared >= 1  # the fixture's world has device/artifact labels on the test split


def test_report_nuisance_contrast_is_the_contrast_stage_over_the_same_images(tiny_pipeline_run, tmp_path):
    """The report accumulates the label detectors' contrast page by page; it must equal the one-pass fit."""
    from sae_cxr.contrast import run_contrasts
    from sae_cxr.report import ReportConfig, build_report

    run = tiny_pipeline_run
    res = build_report(run, ReportConfig(split="test", per_page=9, contrast_min_images=5, progress=False),
                       out=tmp_path / "report")
    summary = json.loads((res.out / "report.json").read_text())
    tables = run_contrasts(run, ("test",), sources=("patterns",), min_images=5)["patterns"]
    compared = 0
    for r in summary["shortcut_audit"]:
        t, table = r["top_nuisance_contrast"], tables[r["finding"]]
        assert r["images"] == res.images
        if table.empty:
            assert t is None
            continue
        compared += 1
        assert (t["label"], t["n_with"]) == (table["display"].iloc[0], table["n_with"].iloc[0])
        assert t["contrast"] == pytest.approx(table["contrast"].iloc[0], rel=1e-6, abs=1e-9)
        assert t["se"] == pytest.approx(table["se"].iloc[0], rel=1e-6, abs=1e-9)
        if len(table) > 1:
            assert t["next_label"] == table["display"].iloc[1]
            assert t["gap"] == pytest.approx(table["contrast"].iloc[0] - table["contrast"].iloc[1], rel=1e-6, abs=1e-9)
    assert compared >= 1, "the tiny world has a pacemaker detector: some finding must get a contrast"
    index = (res.out / "index.html").read_text(encoding="utf-8")
    assert "strongest nuisance contrast" in index


def test_report_tables_and_json_agree_with_the_attribution(folder_run):
    from sae_cxr.attribution import DecompositionReader
    from sae_cxr.attribution_types import Decomposition

    run, _ = folder_run
    out = run.path / "reports" / "test"
    ids = _attributed_test_ids(run)
    long = pd.read_parquet(out / "evidence.parquet")
    csv = pd.read_csv(out / "evidence.csv", keep_default_na=True)
    assert len(csv) == len(long) and list(csv.columns) == list(long.columns)
    np.testing.assert_allclose(csv["contribution"], long["contribution"], rtol=1e-12)
    assert (csv["record_id"].astype(str) == long["record_id"]).all()

    contrib = pd.read_parquet(run.sub("attributions/contributions.parquet"))
    contrib = contrib[contrib["record_id"].isin(ids)]
    key = ["record_id", "finding", "pattern_id"]
    merged = long.merge(contrib, on=key, how="outer", suffixes=("", "_attr"), indicator=True)
    assert (merged["_merge"] == "both").all()  # one row per image x finding x reported pattern, no more
    np.testing.assert_allclose(merged["contribution"], merged["contribution_attr"], rtol=1e-6, atol=1e-9)
    assert (merged["rank"] == merged["rank_attr"]).all()
    assert set(long["category"].dropna()) <= {"cardiac", "pulmonary", "pleural", "structural", "device", "artifact"}

    reader = DecompositionReader(run)
    for rid in ids:
        doc = json.loads((out / "json" / f"{rid}.json").read_text())
        assert doc["record_id"] == rid and set(doc["findings"]) == set(FINDINGS)
        for f in FINDINGS:
            entry = doc["findings"][f]
            d = Decomposition.from_dict(entry["decomposition"])
            assert d == reader.get(rid, f)  # the same decomposition the attribution reader builds
            assert entry["terms_sum"] == pytest.approx(d.logit, abs=1e-4)
            assert entry["reported_sum"] + entry["unreported"] == pytest.approx(entry["terms"]["patterns"], abs=1e-6)
            assert {"clinician", "lay"} == set(entry["explanations"])


def test_report_for_listed_ids_and_its_errors(folder_run, tmp_path, capsys):
    run, _ = folder_run
    ids = _attributed_test_ids(run)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text(f"record_id\n{ids[2]}\n# a comment\n{ids[0]}\n")
    out = tmp_path / "subset"
    assert main(["report", "--run", str(run.path), "--split", "test", "--ids", str(ids_file), "--out", str(out),
                 "--no-progress"]) == 0
    sections = _parse(out / "page-0001.html").sections
    assert sections == [f"img-{ids[2]}", f"img-{ids[0]}"]  # the file's order
    assert sorted(p.name for p in (out / "json").iterdir()) == sorted([f"{ids[0]}.json", f"{ids[2]}.json"])
    assert "images/s" in capsys.readouterr().out

    ids_file.write_text("no-such-image\n")
    assert main(["report", "--run", str(run.path), "--ids", str(ids_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no attribution in split 'test'" in err and "no-such-image" in err
    assert (out / "report.json").is_file()  # a failed build leaves the previous report untouched
    assert main(["report", "--run", str(run.path), "--split", "train", "--out", str(tmp_path / "x")]) == 2
    assert "attributed splits: ['test', 'test_shifted']" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    assert main(["report", "--run", str(run.path), "--max-images", "1", "--out", str(tmp_path / "notes")]) == 2
    assert "holds no report" in capsys.readouterr().err and (tmp_path / "notes" / "mine.txt").exists()
