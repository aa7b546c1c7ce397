"""The public-data adapters on tiny trees in each source's own layout, quirks included.

Each fixture writes what the real download holds (file names, column names, value spellings:
gzipped MIMIC tables, CheXpert's -1.0 and dataset-folder-prefixed paths, NIH's malformed bbox
header and "Infiltrate", RSNA's one-row-per-box labels and repeated class rows) with a handful
of rows, so a test reads in milliseconds what a user's disk holds in terabytes.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
from PIL import Image

from sae_cxr.data import open_dataset
from sae_cxr.data.base import Box
from sae_cxr.data.public import PUBLIC_KINDS, load_chexpert, load_mimic_cxr_jpg, load_nih, load_rsna, open_public
from sae_cxr.data.tables import DataError
from sae_cxr.findings import CHEXPERT_LABELS, FINDINGS, NIH_LABELS
from tests.data.dicom_fixtures import write_dicom

IDX = {f: i for i, f in enumerate(FINDINGS)}


def write_image(path: Path, value: int = 128, size: int = 12) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size, size), value, np.uint8)
    arr[0, 0] = 0
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.fromarray(arr, mode="L").save(path, format=fmt)
    return path


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]], gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if gz else open
    with opener(path, "wt", newline="", encoding="utf-8") as fh:  # type: ignore[operator]
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def rows(records) -> list[str]:
    """Records as the run directory stores them; JSON text, so NaN labels compare equal."""
    return [json.dumps(r.to_row(), sort_keys=True) for r in records]


def same_records(a, b) -> None:
    assert rows(a) == rows(b)


def reopen(ds):
    """Through JSON, as the run manifest stores it."""
    return open_dataset(json.loads(json.dumps(ds.spec)))


# --- MIMIC-CXR-JPG ------------------------------------------------------------------------------

MIMIC_LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
                "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
                "Pneumothorax", "Support Devices"]
MIMIC_META = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
              "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
              "PatientOrientationCodeSequence_CodeMeaning"]
D1, D2, D3, D4 = ("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962",
                  "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714")


def mimic_label_row(subject: str, study: str, **values: str) -> list[str]:
    return [subject, study] + [values.get(lab, "") for lab in MIMIC_LABELS]


def make_mimic(root: Path, gz: bool = True, reports: bool = True) -> Path:
    sfx = ".csv.gz" if gz else ".csv"
    write_csv(root / f"mimic-cxr-2.0.0-chexpert{sfx}", ["subject_id", "study_id"] + MIMIC_LABELS, [
        mimic_label_row("10000032", "50414267", Atelectasis="-1.0", Cardiomegaly="1.0", Edema="0.0",
                        **{"Pleural Effusion": "1.0", "Support Devices": "1.0"}),
        mimic_label_row("10000764", "57375967", **{"No Finding": "1.0"}),
    ], gz=gz)
    meta_rows = [
        [D1, "10000032", "50414267", "CHEST (PA AND LAT)", "PA", "3056", "2544", "21800506", "213014.531",
         "CHEST (PA AND LAT)", "postero-anterior", "Erect"],
        [D2, "10000032", "50414267", "CHEST (PA AND LAT)", "LATERAL", "3056", "2544", "21800506", "213014.531",
         "CHEST (PA AND LAT)", "lateral", "Erect"],
        [D3, "10000764", "57375967", "CHEST (PORTABLE AP)", "AP", "2705", "2539", "21320509", "10001.0",
         "CHEST (PORTABLE AP)", "antero-posterior", "Erect"],
        [D4, "11000011", "53000001", "CHEST (PA AND LAT)", "PA", "3056", "2544", "21900101", "80000.0",
         "CHEST (PA AND LAT)", "postero-anterior", "Erect"],
    ]
    write_csv(root / f"mimic-cxr-2.0.0-metadata{sfx}", MIMIC_META, meta_rows, gz=gz)
    write_csv(root / f"mimic-cxr-2.0.0-split{sfx}", ["dicom_id", "study_id", "subject_id", "split"], [
        [D1, "50414267", "10000032", "train"], [D2, "50414267", "10000032", "train"],
        [D3, "57375967", "10000764", "validate"], [D4, "53000001", "11000011", "test"]], gz=gz)
    for dicom_id, subject, study, *_ in meta_rows:
        write_image(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom_id}.jpg")
    if reports:
        (root / "files" / "p10" / "p10000032" / "s50414267.txt").write_text(
            "                                 FINAL REPORT\n FINDINGS: Small left effusion.\n"
            " IMPRESSION: Cardiomegaly.\n")
    return root


def test_mimic_labels_splits_views_and_meta(tmp_path: Path) -> None:
    ds = load_mimic_cxr_jpg(make_mimic(tmp_path / "mimic"))
    assert [r.id for r in ds] == [D1, D3, D4]  # the lateral view D2 is left out by default
    r1, r3, r4 = ds.by_id(D1), ds.by_id(D3), ds.by_id(D4)
    assert (r1.split, r3.split, r4.split) == ("train", "val", "test")
    assert math.isnan(r1.labels[IDX["Atelectasis"]]) and r1.uncertain[IDX["Atelectasis"]]
    assert r1.labels[IDX["Cardiomegaly"]] == 1 and r1.labels[IDX["Edema"]] == 0
    assert r1.labels[IDX["Pleural Effusion"]] == 1
    assert math.isnan(r1.labels[IDX["Consolidation"]]) and not r1.uncertain[IDX["Consolidation"]]
    assert r1.meta["labels"]["Atelectasis"] == -1.0 and r1.meta["labels"]["Support Devices"] == 1.0
    assert r1.meta["labels"]["No Finding"] is None and set(r1.meta["labels"]) == set(MIMIC_LABELS)
    assert r1.meta["subject_id"] == "10000032" and r1.meta["study_id"] == "50414267" and r1.meta["view"] == "PA"
    assert r1.meta["ViewCodeSequence_CodeMeaning"] == "postero-anterior"
    assert "Cardiomegaly." in r1.report and r1.report.startswith("FINAL REPORT")
    assert r3.report == "" and np.isnan(r3.labels).all() and r3.meta["labels"]["No Finding"] == 1.0
    assert r4.meta["labelled"] is False and np.isnan(r4.labels).all()  # a study without a label row
    assert r1.path.endswith(f"files/p10/p10000032/s50414267/{D1}.jpg")
    assert r1.load_image().shape == (12, 12)  # decoded on demand, not at open time


def test_mimic_all_views_and_plain_csv(tmp_path: Path) -> None:
    ds = load_mimic_cxr_jpg(make_mimic(tmp_path / "m", gz=False), frontal_only=False)
    assert [r.id for r in ds] == [D1, D2, D3, D4]
    assert ds.by_id(D2).report == ds.by_id(D1).report  # one report per study


@pytest.mark.parametrize("policy,value", [("ones", 1.0), ("zeros", 0.0)])
def test_mimic_uncertainty_policy(tmp_path: Path, policy: str, value: float) -> None:
    r1 = load_mimic_cxr_jpg(make_mimic(tmp_path / "m"), uncertainty=policy).by_id(D1)
    assert r1.labels[IDX["Atelectasis"]] == value and r1.uncertain[IDX["Atelectasis"]]
    assert r1.meta["labels"]["Atelectasis"] == -1.0  # the source's value survives the policy


def test_mimic_reports_from_a_separate_folder(tmp_path: Path) -> None:
    root = make_mimic(tmp_path / "jpg", reports=False)
    rep = tmp_path / "mimic-cxr-reports" / "files" / "p10" / "p10000764" / "s57375967.txt"
    rep.parent.mkdir(parents=True)
    rep.write_text("IMPRESSION: No acute cardiopulmonary process.")
    ds = load_mimic_cxr_jpg(root, reports=str(tmp_path / "mimic-cxr-reports"))
    assert ds.by_id(D3).report == "IMPRESSION: No acute cardiopulmonary process." and ds.by_id(D1).report == ""
    with pytest.raises(DataError, match="reports folder not found"):
        load_mimic_cxr_jpg(root, reports=str(tmp_path / "nowhere"))


def test_mimic_negbio_labeler(tmp_path: Path) -> None:
    root = make_mimic(tmp_path / "m")
    write_csv(root / "mimic-cxr-2.0.0-negbio.csv.gz", ["subject_id", "study_id"] + MIMIC_LABELS,
              [mimic_label_row("10000032", "50414267", Atelectasis="1.0")], gz=True)
    r1 = load_mimic_cxr_jpg(root, labeler="negbio").by_id(D1)
    assert r1.labels[IDX["Atelectasis"]] == 1 and r1.meta["labeler"] == "negbio"


def test_mimic_missing_image_names_row_and_skip_bad_lists_it(tmp_path: Path) -> None:
    root = make_mimic(tmp_path / "m")
    missing = root / "files" / "p10" / "p10000764" / "s57375967" / f"{D3}.jpg"
    missing.unlink()
    with pytest.raises(DataError, match=r"row 4 of mimic-cxr-2\.0\.0-metadata\.csv\.gz: image .* does not exist"):
        load_mimic_cxr_jpg(root)
    ds = load_mimic_cxr_jpg(root, skip_bad=True)
    assert [r.id for r in ds] == [D1, D4]
    assert len(ds.skipped) == 1 and ds.skipped[0].path == str(missing)
    assert ds.skipped[0].source == "row 4 of mimic-cxr-2.0.0-metadata.csv.gz"
    assert ds.skipped[0].reason == "does not exist"


def test_mimic_unreadable_image_with_decode_images(tmp_path: Path) -> None:
    root = make_mimic(tmp_path / "m")
    bad = root / "files" / "p11" / "p11000011" / "s53000001" / f"{D4}.jpg"
    bad.write_bytes(bad.read_bytes()[:40])
    assert len(load_mimic_cxr_jpg(root)) == 3  # existence is all that is checked by default
    with pytest.raises(DataError, match=r"row 5 of .*metadata.*is not readable \(corrupt or truncated"):
        load_mimic_cxr_jpg(root, decode_images=True)
    ds = load_mimic_cxr_jpg(root, decode_images=True, skip_bad=True)
    assert [s.path for s in ds.skipped] == [str(bad)] and D4 not in [r.id for r in ds]


def test_mimic_bad_inputs_name_file_row_and_column(tmp_path: Path) -> None:
    root = make_mimic(tmp_path / "m")
    write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id"] + MIMIC_LABELS,
              [mimic_label_row("10000032", "50414267", Edema="2.0")], gz=True)
    with pytest.raises(DataError, match=r"row 2 column 'Edema' of mimic-cxr-2\.0\.0-chexpert\.csv\.gz.*'2\.0'"):
        load_mimic_cxr_jpg(root)
    write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", "Atelectasis"],
              [["10000032", "50414267", "1.0"]], gz=True)
    with pytest.raises(DataError, match=r"chexpert\.csv\.gz is missing label column\(s\) \['Cardiomegaly'"):
        load_mimic_cxr_jpg(root)


def test_mimic_image_without_split_row(tmp_path: Path) -> None:
    root = make_mimic(tmp_path / "m")
    write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
              [[D1, "50414267", "10000032", "train"]], gz=True)
    with pytest.raises(DataError, match=rf"row 4 of mimic-cxr-2\.0\.0-metadata\.csv\.gz: image {D3} has no row in "
                                        r"mimic-cxr-2\.0\.0-split\.csv\.gz"):
        load_mimic_cxr_jpg(root)


def test_mimic_corrupt_gz_and_missing_table(tmp_path: Path) -> None:
    root = make_mimic(tmp_path / "m")
    split = root / "mimic-cxr-2.0.0-split.csv.gz"
    split.write_bytes(split.read_bytes()[:30])
    with pytest.raises(DataError, match=r"mimic-cxr-2\.0\.0-split\.csv\.gz cannot be read"):
        load_mimic_cxr_jpg(root)
    split.unlink()
    with pytest.raises(DataError, match=r"split table not found: neither mimic-cxr-2\.0\.0-split\.csv\.gz nor"):
        load_mimic_cxr_jpg(root)


def test_mimic_spec_reopens_the_same_records(tmp_path: Path) -> None:
    ds = load_mimic_cxr_jpg(make_mimic(tmp_path / "m"), uncertainty="ones", frontal_only=False)
    assert ds.spec["kind"] == "mimic-cxr-jpg" and ds.spec["frontal_only"] is False
    same_records(reopen(ds), ds)


# --- CheXpert -----------------------------------------------------------------------------------

CHEX_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]


def chex_row(rel: str, view: str = "Frontal", ap: str = "AP", **labels: str) -> list[str]:
    return [rel, "Female", "68", view, ap if view == "Frontal" else ""] + [labels.get(c, "") for c in CHEXPERT_LABELS]


def make_chexpert(root: Path, prefix: str = "CheXpert-v1.0-small", n_extra: int = 0) -> Path:
    train = [
        chex_row(f"{prefix}/train/patient00001/study1/view1_frontal.jpg", Atelectasis="-1.0", Edema="1.0",
                 **{"Pleural Effusion": "0.0", "Support Devices": "1.0"}),
        chex_row(f"{prefix}/train/patient00001/study1/view2_lateral.jpg", view="Lateral", Edema="1.0"),
        chex_row(f"{prefix}/train/patient00002/study2/view1_frontal.jpg", ap="PA", **{"No Finding": "1.0"}),
    ]
    train += [chex_row(f"{prefix}/train/patient{10 + k:05d}/study1/view1_frontal.jpg", Cardiomegaly="1.0")
              for k in range(n_extra)]
    valid = [chex_row(f"{prefix}/valid/patient64541/study1/view1_frontal.jpg", **{f: "0.0" for f in CHEXPERT_LABELS}),
             chex_row(f"{prefix}/valid/patient64542/study1/view1_frontal.jpg", Cardiomegaly="1.0", Edema="0.0")]
    write_csv(root / "train.csv", CHEX_HEADER, train)
    write_csv(root / "valid.csv", CHEX_HEADER, valid)
    for row in train + valid:
        write_image(root / Path(row[0]).relative_to(prefix))
    return root


@pytest.mark.parametrize("policy,value", [("ignore", math.nan), ("ones", 1.0), ("zeros", 0.0)])
def test_chexpert_uncertain_under_each_policy(tmp_path: Path, policy: str, value: float) -> None:
    ds = load_chexpert(make_chexpert(tmp_path / "CheXpert-v1.0-small"), uncertainty=policy)
    r = ds.by_id("train/patient00001/study1/view1_frontal")
    got = r.labels[IDX["Atelectasis"]]
    assert (math.isnan(got) if math.isnan(value) else got == value)
    assert r.uncertain[IDX["Atelectasis"]] and not r.uncertain[IDX["Edema"]]
    assert r.labels[IDX["Edema"]] == 1 and r.labels[IDX["Pleural Effusion"]] == 0
    assert math.isnan(r.labels[IDX["Cardiomegaly"]])  # blank: not mentioned
    assert r.meta["labels"]["Atelectasis"] == -1.0 and r.meta["labels"]["Support Devices"] == 1.0
    assert r.meta["patient_id"] == "patient00001" and r.meta["Sex"] == "Female" and r.meta["AP/PA"] == "AP"


def test_chexpert_splits_views_and_paths(tmp_path: Path) -> None:
    root = make_chexpert(tmp_path / "CheXpert-v1.0-small")
    ds = load_chexpert(root)
    ids = [r.id for r in ds]
    assert "train/patient00001/study1/view2_lateral" not in ids and len(ds) == 4
    assert {r.id for r in ds.split("test")} == {"valid/patient64541/study1/view1_frontal",
                                                 "valid/patient64542/study1/view1_frontal"}
    assert all(r.split in ("train", "val") for r in ds if r.id.startswith("train/"))
    assert ds.by_id("valid/patient64541/study1/view1_frontal").labels.tolist() == [0.0] * 5
    assert Path(ds.by_id(ids[0]).path) == root / "train/patient00001/study1/view1_frontal.jpg"
    assert len(load_chexpert(root, frontal_only=False)) == 5


def test_chexpert_folder_may_be_renamed(tmp_path: Path) -> None:
    make_chexpert(tmp_path / "chexpert_local")  # Path column still says CheXpert-v1.0-small/...
    assert len(load_chexpert(tmp_path / "chexpert_local")) == 4


def test_chexpert_val_is_carved_by_patient(tmp_path: Path) -> None:
    root = tmp_path / "CheXpert-v1.0"
    make_chexpert(root, prefix="CheXpert-v1.0", n_extra=40)
    half = load_chexpert(root, val_fraction=0.5, frontal_only=False)
    by_patient: dict[str, set[str]] = {}
    for r in half.split("train") + half.split("val"):
        by_patient.setdefault(r.meta["patient_id"], set()).add(r.split)
    assert all(len(s) == 1 for s in by_patient.values())  # no patient straddles train and val
    assert 5 <= len(half.split("val")) <= 38
    assert not load_chexpert(root, val_fraction=0.0).split("val")
    same_records(load_chexpert(root, val_fraction=0.5, frontal_only=False), half)  # stable


def test_chexpert_bad_inputs(tmp_path: Path) -> None:
    root = make_chexpert(tmp_path / "CheXpert-v1.0-small")
    write_csv(root / "valid.csv", CHEX_HEADER, [chex_row("CheXpert-v1.0-small/valid/study1/view1_frontal.jpg")])
    with pytest.raises(DataError, match=r"row 2 column 'Path' of valid\.csv: no patientNNNNN folder"):
        load_chexpert(root)
    write_csv(root / "valid.csv", CHEX_HEADER, [chex_row("/abs/valid/patient1/study1/view1_frontal.jpg")])
    with pytest.raises(DataError, match=r"row 2 column 'Path' of valid\.csv.*relative path"):
        load_chexpert(root)
    write_csv(root / "valid.csv", CHEX_HEADER,
              [chex_row("CheXpert-v1.0-small/valid/patient64541/study1/view2_lateral.jpg", view="Lateral")])
    with pytest.raises(DataError, match=r"valid\.csv yields no images for the test split \(1 left out by frontal_only"):
        load_chexpert(root)
    (root / "valid.csv").unlink()
    with pytest.raises(DataError, match=r"CheXpert table not found: .*valid\.csv"):
        load_chexpert(root)


def test_chexpert_missing_image_and_skip_bad(tmp_path: Path) -> None:
    root = make_chexpert(tmp_path / "CheXpert-v1.0-small")
    (root / "train/patient00002/study2/view1_frontal.jpg").unlink()
    with pytest.raises(DataError, match=r"row 4 of train\.csv: image .*view1_frontal\.jpg does not exist"):
        load_chexpert(root)
    ds = load_chexpert(root, skip_bad=True)
    assert [s.source for s in ds.skipped] == ["row 4 of train.csv"] and len(ds) == 3
    same_records(reopen(ds), ds)


# --- NIH ChestX-ray14 ---------------------------------------------------------------------------

NIH_HEADER_2017 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                   "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
NIH_ROWS = [  # name, labels, follow-up, patient
    ("00000001_000.png", "Cardiomegaly", "0", "1"),
    ("00000001_001.png", "Cardiomegaly|Emphysema", "1", "1"),
    ("00000002_000.png", "No Finding", "0", "2"),
    ("00000003_000.png", "Effusion|Infiltration", "0", "3"),
    ("00000004_000.png", "Atelectasis|Consolidation|Edema", "0", "4"),
]
BBOX_TEXT = ("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
             "00000003_000.png,Infiltrate,225.084745762712,547.019216763771,86.7796610169491,79.1864406779661\n"
             "00000003_000.png,Effusion,100.5,200.25,300,150\n"
             "00000004_000.png,Atelectasis,10,20,30,40,,,\n")


def make_nih(root: Path, rows=NIH_ROWS, bbox: str | None = BBOX_TEXT) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = [NIH_HEADER_2017] + [f"{n},{lab},{fu},{pid},0{58 + k}Y,M,PA,2682,2749,0.143,0.143,"
                                 for k, (n, lab, fu, pid) in enumerate(rows)]
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    (root / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n00000002_000.png\n")
    (root / "test_list.txt").write_text("00000003_000.png\n00000004_000.png\n")
    for k, (n, *_rest) in enumerate(rows):
        write_image(root / f"images_{1 + k % 2:03d}" / "images" / n)
    if bbox is not None:
        (root / "BBox_List_2017.csv").write_text(bbox)
    return root


def test_nih_labels_splits_and_meta(tmp_path: Path) -> None:
    ds = load_nih(make_nih(tmp_path / "nih"))
    assert [r.id for r in ds] == [n for n, *_ in NIH_ROWS]
    r3 = ds.by_id("00000003_000.png")
    assert r3.labels.tolist() == [0, 0, 0, 0, 1]  # Effusion -> Pleural Effusion; absent labels are 0, not NaN
    assert ds.by_id("00000004_000.png").labels.tolist() == [1, 0, 1, 1, 0]
    assert ds.by_id("00000002_000.png").labels.tolist() == [0] * 5
    r2 = ds.by_id("00000001_001.png")
    assert r2.meta["labels"]["Emphysema"] == 1.0 and r2.meta["labels"]["Effusion"] == 0.0
    assert set(r2.meta["labels"]) == set(NIH_LABELS) and r2.meta["finding_labels"] == "Cardiomegaly|Emphysema"
    assert r2.meta["patient_id"] == "1" and r2.meta["View Position"] == "PA" and r2.meta["Follow-up #"] == "1"
    assert not any(k.startswith("Unnamed") for k in r2.meta)  # the trailing comma's empty column
    assert {r.id for r in ds.split("test")} == {"00000003_000.png", "00000004_000.png"}
    trainval = [r for r in ds if r.split != "test"]
    assert {r.split for r in trainval if r.meta["patient_id"] == "1"} in ({"train"}, {"val"})
    assert Path(ds.by_id("00000001_001.png").path).parent.parent.name == "images_002"


def test_nih_boxes_from_malformed_header_with_infiltrate(tmp_path: Path) -> None:
    ds = load_nih(make_nih(tmp_path / "nih"))
    r3 = ds.by_id("00000003_000.png")
    assert r3.boxes == (Box("Infiltration", 225.084745762712, 547.019216763771, 86.7796610169491, 79.1864406779661),
                        Box("Effusion", 100.5, 200.25, 300.0, 150.0))
    assert ds.by_id("00000004_000.png").boxes == (Box("Atelectasis", 10, 20, 30, 40),)
    assert ds.by_id("00000001_000.png").boxes == ()
    assert all(not r.boxes for r in load_nih(tmp_path / "nih", boxes=False))


@pytest.mark.parametrize("line,message", [
    ("00000003_000.png,Pneumonitis,1,2,3,4", r"row 3 of BBox_List_2017\.csv: box label 'Pneumonitis' is not an NIH"),
    ("00000003_000.png,Effusion,1,two,3,4", r"row 3 of BBox_List_2017\.csv: box y 'two' is not a number"),
    ("00000003_000.png,Effusion,1,2,-3,4", r"row 3 of BBox_List_2017\.csv: .*negative size"),
    ("00000099_000.png,Effusion,1,2,3,4", r"row 3 of BBox_List_2017\.csv: image 00000099_000\.png is not in "
                                          r"Data_Entry_2017\.csv"),
])
def test_nih_bad_box_rows(tmp_path: Path, line: str, message: str) -> None:
    root = make_nih(tmp_path / "nih", bbox=BBOX_TEXT.splitlines()[0] + "\n" + BBOX_TEXT.splitlines()[1] + "\n"
                    + line + "\n")
    with pytest.raises(DataError, match=message):
        load_nih(root)


def test_nih_bbox_header_checked(tmp_path: Path) -> None:
    root = make_nih(tmp_path / "nih", bbox="image,label,x,y,w,h\n00000003_000.png,Effusion,1,2,3,4\n")
    with pytest.raises(DataError, match=r"BBox_List_2017\.csv does not start with 'Image Index,Finding Label"):
        load_nih(root)


def test_nih_unknown_label_names_row_and_file(tmp_path: Path) -> None:
    rows = NIH_ROWS[:2] + [("00000002_000.png", "Effusion|Pneumonitis", "0", "2")] + NIH_ROWS[3:]
    with pytest.raises(DataError, match=r"row 4 column 'Finding Labels' of Data_Entry_2017\.csv: label "
                                        r"'Pneumonitis' is not an NIH label"):
        load_nih(make_nih(tmp_path / "nih", rows=rows))


def test_nih_infiltrate_alias_accepted_in_entries(tmp_path: Path) -> None:
    rows = NIH_ROWS[:3] + [("00000003_000.png", "Effusion|Infiltrate", "0", "3")] + NIH_ROWS[4:]
    r = load_nih(make_nih(tmp_path / "nih", rows=rows)).by_id("00000003_000.png")
    assert r.meta["labels"]["Infiltration"] == 1.0


def test_nih_split_lists(tmp_path: Path) -> None:
    root = make_nih(tmp_path / "nih")
    (root / "test_list.txt").write_text("00000004_000.png\n")
    with pytest.raises(DataError, match=r"row 5 of Data_Entry_2017\.csv: image 00000003_000\.png is on neither"):
        load_nih(root)
    (root / "test_list.txt").write_text("00000003_000.png\n00000004_000.png\n00000002_000.png\n")
    with pytest.raises(DataError, match=r"line 3 of test_list\.txt: 00000002_000\.png is also on line 3 of "
                                        r"train_val_list\.txt"):
        load_nih(root)
    (root / "test_list.txt").write_text("\n")
    with pytest.raises(DataError, match=r"test_list\.txt lists no images"):
        load_nih(root)
    (root / "test_list.txt").unlink()
    with pytest.raises(DataError, match=r"NIH split list not found: .*test_list\.txt"):
        load_nih(root)


def test_nih_empty_test_split_is_an_error(tmp_path: Path) -> None:
    root = make_nih(tmp_path / "nih", bbox=None)
    for name in ("00000003_000.png", "00000004_000.png"):
        next(root.rglob(name)).unlink()
    with pytest.raises(DataError, match=r"test split is empty.*\(2 skipped as missing"):
        load_nih(root, skip_bad=True)


def test_nih_missing_and_duplicate_images(tmp_path: Path) -> None:
    root = make_nih(tmp_path / "nih")
    next(root.rglob("00000002_000.png")).unlink()
    with pytest.raises(DataError, match=r"row 4 of Data_Entry_2017\.csv: image 00000002_000\.png is in "
                                        r"no folder"):
        load_nih(root)
    ds = load_nih(root, skip_bad=True)
    assert len(ds) == 4 and ds.skipped[0].source == "row 4 of Data_Entry_2017.csv"
    write_image(root / "images_003" / "images" / "00000001_000.png")
    with pytest.raises(DataError, match=r"image 00000001_000\.png is in two folders"):
        load_nih(root)


def test_nih_boxes_of_a_skipped_image_are_dropped_with_it(tmp_path: Path) -> None:
    root = make_nih(tmp_path / "nih")
    next(root.rglob("00000004_000.png")).unlink()
    ds = load_nih(root, skip_bad=True)
    assert "00000004_000.png" not in [r.id for r in ds] and ds.by_id("00000003_000.png").boxes


def test_nih_prefers_v2020_and_reopens(tmp_path: Path) -> None:
    root = make_nih(tmp_path / "nih")
    v2020 = [("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")]
    v2020 += [f"{n},{'Edema' if n == '00000002_000.png' else lab},{fu},{pid},58,M,AP,2500,2048,0.168,0.168"
              for n, lab, fu, pid in NIH_ROWS]
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(v2020) + "\n")
    ds = load_nih(root)
    assert ds.spec["entries"] == "Data_Entry_2017_v2020.csv"
    assert ds.by_id("00000002_000.png").labels[IDX["Edema"]] == 1
    assert load_nih(root, entries="Data_Entry_2017.csv").by_id("00000002_000.png").labels[IDX["Edema"]] == 0
    same_records(reopen(ds), ds)


# --- RSNA Pneumonia -----------------------------------------------------------------------------

RSNA_LABELS = [  # patientId, x, y, width, height, Target
    ["0004cfab-14fd-4e49-80ba-63a80b6bddd6", "", "", "", "", "0"],
    ["00436515-870c-4b36-a041-de91049b9ab4", "264", "152", "213", "379", "1"],
    ["00436515-870c-4b36-a041-de91049b9ab4", "562", "152", "256", "453", "1"],
    ["00313ee0-9eaa-42f4-b0ab-c148ed3241cd", "", "", "", "", "0"],
    ["00704310-78a8-4b38-8475-49f4573b2dbb", "323", "577", "160", "104", "1"],
]
RSNA_CLASS = [
    ["0004cfab-14fd-4e49-80ba-63a80b6bddd6", "No Lung Opacity / Not Normal"],
    ["00436515-870c-4b36-a041-de91049b9ab4", "Lung Opacity"],
    ["00436515-870c-4b36-a041-de91049b9ab4", "Lung Opacity"],
    ["00313ee0-9eaa-42f4-b0ab-c148ed3241cd", "Normal"],
    ["00704310-78a8-4b38-8475-49f4573b2dbb", "Lung Opacity"],
]
P_NOT_NORMAL, P_TWO_BOXES, P_NORMAL, P_MONO1 = (RSNA_LABELS[0][0], RSNA_LABELS[1][0], RSNA_LABELS[3][0],
                                                 RSNA_LABELS[4][0])
RSNA_PIXELS = np.linspace(0, 4095, 16 * 16).round().astype(np.uint16).reshape(16, 16)


def make_rsna(root: Path, labels=RSNA_LABELS, classes: list | None = RSNA_CLASS) -> Path:
    write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], labels)
    if classes is not None:
        write_csv(root / "stage_2_detailed_class_info.csv", ["patientId", "class"], classes)
    for pid in dict.fromkeys(r[0] for r in labels):
        if pid == P_MONO1:  # as some archives write it: inverted pixels, MONOCHROME1
            write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", (4095 - RSNA_PIXELS).astype(np.uint16),
                        photometric="MONOCHROME1", PatientSex="F", ViewPosition="AP")
        else:
            write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", RSNA_PIXELS, PatientSex="M", ViewPosition="PA")
    return root


def test_rsna_labels_boxes_and_classes(tmp_path: Path) -> None:
    ds = load_rsna(make_rsna(tmp_path / "rsna"))
    assert [r.id for r in ds] == [P_NOT_NORMAL, P_TWO_BOXES, P_NORMAL, P_MONO1]  # one record per patient
    two = ds.by_id(P_TWO_BOXES)
    assert two.boxes == (Box("Lung Opacity", 264, 152, 213, 379), Box("Lung Opacity", 562, 152, 256, 453))
    assert two.labels[IDX["Consolidation"]] == 1 and np.isnan(np.delete(two.labels, IDX["Consolidation"])).all()
    assert two.meta["class"] == "Lung Opacity" and two.meta["target"] == 1
    assert two.meta["labels"] == {"Normal": 0.0, "No Lung Opacity / Not Normal": 0.0, "Lung Opacity": 1.0}
    normal = ds.by_id(P_NORMAL)
    assert normal.labels.tolist() == [0.0] * 5 and normal.boxes == ()
    other = ds.by_id(P_NOT_NORMAL)
    assert other.labels[IDX["Consolidation"]] == 0 and np.isnan(np.delete(other.labels, IDX["Consolidation"])).all()
    assert other.meta["class"] == "No Lung Opacity / Not Normal"


def test_rsna_dicoms_decode_lazily_and_monochrome1_matches(tmp_path: Path) -> None:
    ds = load_rsna(make_rsna(tmp_path / "rsna"))
    assert ds.by_id(P_MONO1).path.endswith(f"stage_2_train_images/{P_MONO1}.dcm")
    np.testing.assert_allclose(ds.by_id(P_MONO1).load_image(), ds.by_id(P_NORMAL).load_image(), atol=1e-6)
    np.testing.assert_allclose(ds.by_id(P_NORMAL).load_image(), RSNA_PIXELS / 4095.0, atol=1e-6)


def test_rsna_without_class_file(tmp_path: Path) -> None:
    ds = load_rsna(make_rsna(tmp_path / "rsna", classes=None))
    normal = ds.by_id(P_NORMAL)  # without the class file a negative is only "no opacity"
    assert normal.labels[IDX["Consolidation"]] == 0 and np.isnan(np.delete(normal.labels, IDX["Consolidation"])).all()
    assert normal.meta["class"] is None and normal.meta["labels"] == {"Lung Opacity": 0.0}


def test_rsna_splits_follow_fractions_and_reopen(tmp_path: Path) -> None:
    root = make_rsna(tmp_path / "rsna")
    assert {r.split for r in load_rsna(root, split_fractions=(1, 0, 0))} == {"train"}
    assert {r.split for r in load_rsna(root, split_fractions=[0, 0, 1])} == {"test"}
    ds = load_rsna(root)
    same_records(reopen(ds), ds)
    with pytest.raises(DataError, match="summing to 1"):
        load_rsna(root, split_fractions=(0.5, 0.1, 0.1))


@pytest.mark.parametrize("labels,classes,message", [
    ([RSNA_LABELS[0], [P_TWO_BOXES, "", "152", "213", "379", "1"]], None,
     r"row 3 of stage_2_train_labels\.csv: bad box"),
    ([RSNA_LABELS[0], [P_NORMAL, "1", "2", "3", "4", "0"]], None,
     r"row 3 of stage_2_train_labels\.csv: Target 0 row has box coordinates"),
    ([RSNA_LABELS[1], [P_TWO_BOXES, "", "", "", "", "0"]], None,
     r"row 3 column 'Target' of stage_2_train_labels\.csv: patient .* has Target 0 here and 1 on row 2"),
    ([[P_NORMAL, "", "", "", "", "yes"]], None, r"row 2 column 'Target' of stage_2_train_labels\.csv"),
    ([RSNA_LABELS[3]], [[P_NORMAL, "Lung Opacity"]],
     r"row 2 of stage_2_detailed_class_info\.csv: class 'Lung Opacity' contradicts Target 0"),
    ([RSNA_LABELS[3]], [[P_NORMAL, "Pneumonia"]],
     r"row 2 column 'class' of stage_2_detailed_class_info\.csv: class 'Pneumonia' is not one of"),
    ([RSNA_LABELS[3]], [[P_NOT_NORMAL, "Normal"]],
     r"row 2 of stage_2_train_labels\.csv: patient .* has no row in stage_2_detailed_class_info\.csv"),
])
def test_rsna_bad_rows(tmp_path: Path, labels, classes, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_rsna(make_rsna(tmp_path / "rsna", labels=labels, classes=classes))


def test_rsna_missing_and_corrupt_dicoms(tmp_path: Path) -> None:
    root = make_rsna(tmp_path / "rsna")
    (root / "stage_2_train_images" / f"{P_NORMAL}.dcm").unlink()
    corrupt = root / "stage_2_train_images" / f"{P_MONO1}.dcm"
    corrupt.write_bytes(corrupt.read_bytes()[:-300])
    with pytest.raises(DataError, match=r"row 5 of stage_2_train_labels\.csv: image .*\.dcm does not exist"):
        load_rsna(root)
    ds = load_rsna(root, skip_bad=True, decode_images=True)
    assert [r.id for r in ds] == [P_NOT_NORMAL, P_TWO_BOXES]
    assert [(s.source, Path(s.path).stem) for s in ds.skipped] == [
        ("row 5 of stage_2_train_labels.csv", P_NORMAL), ("row 6 of stage_2_train_labels.csv", P_MONO1)]
    assert "not readable" in ds.skipped[1].reason and "DICOM" in ds.skipped[1].reason


# --- dispatch -----------------------------------------------------------------------------------

def test_open_public_dispatch_and_option_checks(tmp_path: Path) -> None:
    root = make_rsna(tmp_path / "rsna")
    ds = open_dataset({"kind": "rsna", "path": str(root), "uncertainty": "ignore", "skip_bad": "false"})
    assert len(ds) == 4 and ds.spec["skip_bad"] is False and set(PUBLIC_KINDS) == {"mimic-cxr-jpg", "chexpert",
                                                                                     "nih", "rsna"}
    with pytest.raises(DataError, match=r"has no option\(s\) \['frontal-only'\]; its options are"):
        open_public({"kind": "rsna", "path": str(root), "frontal-only": True})
    with pytest.raises(DataError, match=r"unknown data source 'padchest'"):
        open_public({"kind": "padchest", "path": str(root)})
    with pytest.raises(DataError, match=r"needs 'path'"):
        open_public({"kind": "nih"})
    with pytest.raises(DataError, match=r"NIH ChestX-ray14 folder not found"):
        open_public({"kind": "nih", "path": str(tmp_path / "absent")})
    with pytest.raises(DataError, match=r"uncertainty policy 'maybe'"):
        open_public({"kind": "rsna", "path": str(root), "uncertainty": "maybe"})
    with pytest.raises(DataError, match=r"option 'skip_bad' must be true or false"):
        open_public({"kind": "rsna", "path": str(root), "skip_bad": "sometimes"})


def test_records_serialise_for_the_run_directory(tmp_path: Path) -> None:
    """Every adapter's records go through Record.to_row (JSON meta) without loss."""
    from sae_cxr.data.base import record_from_row

    for ds in (load_nih(make_nih(tmp_path / "nih")), load_rsna(make_rsna(tmp_path / "rsna")),
               load_mimic_cxr_jpg(make_mimic(tmp_path / "m"))):
        for r in ds:
            back = record_from_row(r.to_row())
            assert rows([back]) == rows([r]) and back.boxes == r.boxes and back.meta == r.meta
