"""The phantom world: determinism, planted concepts, labels, shortcut, boxes, round trip."""

from __future__ import annotations

import numpy as np
import pytest

from sae_cxr.data.folder import load_folder
from sae_cxr.data.phantom import PhantomConfig, PhantomWorld, export_folder, preview_sheet
from sae_cxr.findings import CONCEPT_NAMES, CONCEPTS, FINDINGS


@pytest.fixture(scope="module")
def world() -> PhantomWorld:
    return PhantomWorld(PhantomConfig(n=400, seed=3, size=64, shortcut="pacemaker:Cardiomegaly:0.9"))


def test_image_depends_only_on_seed_and_index(world):
    cases = world.cases(range(10))
    batch = world.render(cases)
    alone = np.stack([world.image(i) for i in range(10)])
    np.testing.assert_array_equal(batch, alone)
    again = PhantomWorld(PhantomConfig(n=400, seed=3, size=64, shortcut="pacemaker:Cardiomegaly:0.9"))
    np.testing.assert_array_equal(again.render(again.cases(range(10))), batch)
    other = PhantomWorld(PhantomConfig(n=400, seed=4, size=64))
    assert not np.array_equal(other.render(other.cases(range(10))), batch)


def test_images_are_quantised_grayscale_in_unit_range(world):
    imgs = world.render(world.cases(range(16)))
    assert imgs.shape == (16, 64, 64) and imgs.dtype == np.float32
    assert imgs.min() >= 0.0 and imgs.max() <= 1.0
    np.testing.assert_allclose(imgs * 255.0, np.round(imgs * 255.0), atol=1e-3)


def test_anatomy_lungs_darker_than_mediastinum():
    """A normal film: lung fields dark, the midline (mediastinum, spine) bright, air outside the body dark."""
    w = PhantomWorld(PhantomConfig(n=50, seed=0, size=128, prevalence_scale=0.01))
    cases = [c for c in w.cases(range(50)) if not c.concepts][:5]
    assert cases, "expected some normal films at a tiny prevalence"
    for case, img in zip(cases, w.render(cases)):
        g = case.geom
        lung_u = int((g["cx"] - 0.2) * 128)
        lung = img[45:60, lung_u - 4:lung_u + 4].mean()
        mid = img[45:60, int(g["cx"] * 128) - 3:int(g["cx"] * 128) + 3].mean()
        assert mid > lung + 0.2, (mid, lung)


def test_every_concept_occurs_with_a_box_inside_the_image(world):
    cases = world.cases()
    seen = {name: 0 for name in CONCEPT_NAMES}
    for c in cases:
        labels = {b.label for b in c.boxes}
        for name in c.concepts:
            seen[name] += 1
            assert name in labels, f"{c.id}: {name} has no box"
        for b in c.boxes:
            assert 0 <= b.x and 0 <= b.y and b.x + b.w <= 64 + 1e-6 and b.y + b.h <= 64 + 1e-6
            assert b.w > 0 and b.h > 0
    assert all(v > 0 for v in seen.values()), seen


def test_labels_follow_concepts_and_reports_mention_findings(world):
    for c in world.cases(range(200)):
        for i, f in enumerate(FINDINGS):
            implied = any(CONCEPTS[k].finding == f for k in c.concepts)
            assert c.labels[i] == float(implied)
        if "pleural_effusion" in c.concepts:
            assert "pleural effusion" in c.report.lower()
        else:
            assert "pleural effusions." not in c.report.lower() or "no pleural effusion" in c.report.lower()
        if "pacemaker" in c.concepts:
            assert "Pacemaker in place." in c.report


def test_edema_co_occurs_with_cardiomegaly():
    w = PhantomWorld(PhantomConfig(n=3000, seed=1, size=32))
    cases = w.cases()
    edema = np.array(["edema" in c.concepts for c in cases])
    cardio = np.array(["cardiomegaly" in c.concepts for c in cases])
    assert cardio[edema].mean() > 2 * cardio[~edema].mean()


def test_shortcut_holds_in_train_and_breaks_in_test_shifted():
    w = PhantomWorld(PhantomConfig(n=4000, seed=2, size=32, shortcut="pacemaker:Cardiomegaly:0.9"))
    cases = w.cases()

    def agreement(split: str) -> float:
        sel = [c for c in cases if c.split == split]
        pm = np.array(["pacemaker" in c.concepts for c in sel])
        cm = np.array([c.labels[FINDINGS.index("Cardiomegaly")] == 1 for c in sel])
        return float(pm[cm].mean()), float(pm[~cm].mean())

    pos, neg = agreement("train")
    assert pos == pytest.approx(0.9, abs=0.05) and neg == pytest.approx(0.1, abs=0.03)
    pos_s, neg_s = agreement("test_shifted")
    assert abs(pos_s - neg_s) < 0.1, "test_shifted must break the correlation"


def test_no_shifted_split_without_shortcut():
    w = PhantomWorld(PhantomConfig(n=300, seed=0, size=32))
    assert {c.split for c in w.cases()} == {"train", "val", "test"}


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="unknown concepts"):
        PhantomConfig(prevalence={"dragon": 0.5})
    with pytest.raises(ValueError, match="nuisance:finding:rate"):
        PhantomConfig(shortcut="pacemaker")
    with pytest.raises(ValueError, match="not a phantom concept"):
        PhantomConfig(shortcut="dragon:Edema:0.9")
    with pytest.raises(ValueError, match="unknown finding"):
        PhantomConfig(shortcut="pacemaker:Flu:0.9")


def test_parallel_rendering_matches_serial(world):
    serial = [img for _, imgs in world.batches(16, range(40)) for img in imgs]
    parallel = [img for _, imgs in world.batches(16, range(40), workers=2) for img in imgs]
    np.testing.assert_array_equal(np.stack(serial), np.stack(parallel))


def test_export_round_trips_through_the_folder_adapter(tmp_path, world):
    csv_path = export_folder(world, tmp_path / "w", indices=range(30), progress=False)
    ds = load_folder(csv_path)
    assert len(ds) == 30
    for rec in ds:
        case = world.case(int(rec.id.split("-")[1]))
        mem = world.record(case)
        assert rec.id == mem.id and rec.split == mem.split and rec.report == mem.report
        np.testing.assert_array_equal(rec.labels, mem.labels)
        assert rec.concepts == mem.concepts
        assert rec.boxes == mem.boxes
        assert rec.meta == mem.meta
        np.testing.assert_array_equal(rec.load_image(), mem.load_image())


def test_preview_sheet_is_written(tmp_path, world):
    from PIL import Image

    out = preview_sheet(world, tmp_path / "sheet.png", n=8, cols=4, scale=2)
    im = Image.open(out)
    assert im.width >= 4 * 128 and im.height >= 2 * 128
