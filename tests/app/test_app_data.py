"""The dashboard's data access (sae_cxr.app_data) on the tiny run: what the pages show must agree with
the stages' own outputs, uploads must be safe, and the run picker and report reader must stay inside
their folders."""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
import pytest

from sae_cxr import app_data as ad
from sae_cxr.findings import FINDINGS, NUISANCE_CATEGORIES
from tests.app.conftest import SHORTCUT


@pytest.fixture(scope="module")
def models(tiny_run) -> ad.RunModels:
    return ad.RunModels(tiny_run.path)


@pytest.fixture(scope="module")
def stored_id(tiny_run) -> str:
    return str(ad.stored_predictions(tiny_run)["record_id"].iloc[0])


def _tree(path) -> dict[str, float]:
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(path) for f in fs}


def test_decomposition_computed_now_equals_the_stored_one(models, stored_id):
    """An image outside the stored attributions (an upload) is decomposed the way the stage did it."""
    a = models.analyse_record(stored_id)
    fresh = dataclasses.replace(a, uploaded=True)  # forces the live path
    for finding in FINDINGS:
        s, f = models.decomposition(a, finding), models.decomposition(fresh, finding)
        for attr in ("logit", "bias", "skip", "error", "unassigned"):
            assert getattr(f, attr) == pytest.approx(getattr(s, attr), abs=1e-4), (finding, attr)
        assert [p.pattern_id for p in f.patterns] == [p.pattern_id for p in s.patterns]
        np.testing.assert_allclose([p.contribution for p in f.patterns], [p.contribution for p in s.patterns],
                                   atol=1e-4)


def test_waterfall_terms_add_up_to_the_logit(models, stored_id):
    a = models.analyse_record(stored_id)
    for finding in FINDINGS:
        d = models.decomposition(a, finding)
        terms = ad.waterfall_terms(d, max_patterns=4)
        assert terms["value"].sum() == pytest.approx(d.logit, abs=1e-3)
        assert terms["kind"].iloc[0] == "bias" and terms["kind"].iloc[-1] == "error"
        assert (terms["kind"] == "pattern").sum() == min(4, len(d.patterns))


def test_predictions_match_the_stored_probabilities(tiny_run, models, stored_id):
    preds = models.predictions(models.analyse_record(stored_id))
    stored = ad.stored_predictions(tiny_run)
    stored = stored[stored["record_id"] == stored_id].set_index("finding")["probability"]
    for f, p in zip(preds["finding"], preds["probability"]):
        assert p == pytest.approx(stored[f], abs=1e-4)


def test_upload_of_a_png_is_analysed_in_memory_like_the_run_image(tiny_run, models, stored_id):
    from PIL import Image

    rec = models.record(stored_id)
    img = rec.load_image()
    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    before = _tree(tiny_run.path)
    up = models.analyse_upload(buf.getvalue(), "chest.png")
    assert _tree(tiny_run.path) == before  # nothing written into the run
    assert up.uploaded and up.record_id == "upload:chest.png" and up.labels is None
    ours = models.predictions(models.analyse_record(stored_id))["probability"].to_numpy()
    theirs = models.predictions(up)["probability"].to_numpy()
    np.testing.assert_allclose(theirs, ours, atol=0.05)  # 8-bit re-encoding moves it a little at most
    d = models.decomposition(up, "Edema")
    assert d.record_id == "upload:chest.png" and d.patterns
    assert models.similar_to_upload(up, 3)["kind"].eq("image").all()


def test_upload_of_a_dicom_is_decoded(models, tmp_path):
    from tests.data.dicom_fixtures import write_dicom

    px = (np.linspace(0, 4000, 96 * 80).reshape(96, 80)).astype(np.uint16)
    data = write_dicom(tmp_path / "x.dcm", px).read_bytes()
    up = models.analyse_upload(data, "x.dcm")
    assert up.image.shape == (96, 80) and np.isfinite(up.x).all()


@pytest.mark.parametrize("data, message", [
    (b"not an image at all", "could not be read as a PNG, JPEG or DICOM"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "could not be read"),
    (b"\x00" * (ad.MAX_UPLOAD_MB * 2 ** 20 + 1), "the limit is"),
])
def test_bad_uploads_are_refused_with_a_message(models, data, message):
    with pytest.raises(ad.UploadError, match=message):
        models.analyse_upload(data, "scan.png")


def test_audit_shares_are_shares_and_the_planted_link_is_marked(tiny_run):
    audit = ad.nuisance_audit(tiny_run, "test")
    assert audit.planted == SHORTCUT
    assert set(audit.links["category"]) <= set(NUISANCE_CATEGORIES)
    f = audit.findings
    assert ((f["carried_share"] >= 0) & (f["carried_share"] <= 1 + 1e-9)).all()
    assert np.allclose(f["device_share"] + f["artifact_share"], f["carried_share"])
    assert list(audit.links["net_share"]) == sorted(audit.links["net_share"], reverse=True)
    assert audit.planted_rank == 1  # the planted shortcut is the strongest link
    hit = audit.links.iloc[0]
    assert hit["planted"] and hit["finding"] == "Cardiomegaly" and hit["name"] == "pacemaker"
    ex = ad.audit_examples(tiny_run, "Cardiomegaly", "test", n=3)
    assert len(ex) <= 3 and list(ex["push"]) == sorted(ex["push"], reverse=True)


def test_label_contrasts_rank_each_findings_detectors_and_mark_the_planted_label(tiny_run):
    t = ad.label_contrasts(tiny_run, "test")
    assert len(t) and t["category"].isin(NUISANCE_CATEGORIES).all()
    for _, g in t.groupby("finding"):
        assert list(g["contrast"]) == sorted(g["contrast"], reverse=True)
    assert ((t["n_with"] >= 10) & (t["n_without"] >= 10)).all()  # contrast_table's min_images
    assert "pacemaker" in set(t["label"])  # the labels' own detectors are the terms
    marked = t[t["planted"]]  # the tiny run's pacemaker sits on too few Cardiomegaly negatives to be fitted there
    assert ((marked["finding"] == "Cardiomegaly") & (marked["label"] == "pacemaker")).all()
    assert t["carried_by"].str.len().gt(0).all()


def test_concept_recovery_table_carries_the_evals_ceiling_and_weakest_stratum(tiny_run):
    import json

    rec = ad.concept_recovery(tiny_run)
    per = json.loads(tiny_run.sub("eval/metrics.json").read_text())["patterns"]["concept_recovery"]["per_concept"]
    assert len(rec) == len(per)
    for _, r in rec.iterrows():
        w = per[r["concept"]].get("weakest_stratum")
        if w:
            assert (r["weakest_under"], r["auroc_with_it"]) == (w["nuisance"], w["auroc_with"])
        else:
            assert r["weakest_under"] is None or r["weakest_under"] != r["weakest_under"]  # None or NaN
    assert rec["weakest_under"].notna().any() and rec["probe_auroc"].notna().any()


def test_audit_of_a_split_without_attributions_says_how_to_get_them(tiny_run):
    with pytest.raises(ValueError, match="sae-cxr attribute"):
        ad.nuisance_audit(tiny_run, "train")


def test_run_picker_lists_only_runs_inside_the_folder(tiny_run, partial_run, tmp_path):
    root = tiny_run.path.parent
    choices = ad.run_choices(root)
    assert {"tiny", "partial"} <= set(choices)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "manifest.json").write_text("{}")
    link = root / "sneaky"
    link.symlink_to(outside)
    bad_name = root / "-dash"
    bad_name.mkdir()
    (bad_name / "manifest.json").write_text("{}")
    try:
        assert not {"sneaky", "-dash"} & set(ad.run_choices(root))
    finally:
        link.unlink()
        (bad_name / "manifest.json").unlink()
        bad_name.rmdir()


def test_reports_are_listed_and_read_only_inside_reports(tiny_run, tmp_path):
    sets = {r.name: r for r in ad.list_reports(tiny_run)}
    test = sets["test"]  # written by the report stage
    assert test.pages[0] == "reports/test/index.html" and test.documents > 0
    assert "evidence.csv" in [f["name"] for f in test.files]
    assert ad.read_report(tiny_run, test.pages[0]).startswith(b"<!")
    reports = tiny_run.path / "reports"
    secret = tmp_path / "secret.html"
    secret.write_text("secret")
    extra, link = reports / "extra.html", reports / "out.html"
    try:
        extra.write_text("<p>ok</p>")
        link.symlink_to(secret)
        loose = {r.name: r for r in ad.list_reports(tiny_run)}["."]
        assert loose.pages == ["reports/extra.html"]  # the symlink out of the run is not listed
        with pytest.raises(ValueError):
            ad.read_report(tiny_run, "manifest.json")
        with pytest.raises(ValueError):
            ad.read_report(tiny_run, "reports/../../secret.html")
    finally:
        extra.unlink()
        link.unlink()
