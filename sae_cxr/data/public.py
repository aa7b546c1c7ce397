"""Adapters for the public chest X-ray data sets, each mapped onto `Record`.

Every adapter reads the source's own files from `spec["path"]` as they are distributed, maps
its labels onto the five FINDINGS, keeps the source's full label set in `meta["labels"]` with
the source's spelling ({label: 1.0 | 0.0 | -1.0 (uncertain) | None (not mentioned)}), and
returns a DataSet whose spec, stored in a run manifest, reopens the same records.

mimic-cxr-jpg  (MIMIC-CXR-JPG 2.x; `path` holds the tables and files/)
  mimic-cxr-2.0.0-{chexpert|negbio}.csv[.gz]  labels per study (subject_id, study_id)
  mimic-cxr-2.0.0-metadata.csv[.gz]           one row per image: dicom_id, ViewPosition, ...
  mimic-cxr-2.0.0-split.csv[.gz]              dicom_id -> train | validate | test
  files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg      XX = first two digits of the subject id
  options: frontal_only (True: ViewPosition PA or AP), labeler ("chexpert" | "negbio"),
           reports (folder holding MIMIC-CXR's files/pXX/pSUBJECT/sSTUDY.txt; default: `path`
           when such files exist there). A study without a label row gets NaN labels.
  splits: the official split (validate -> val).

chexpert  (CheXpert-v1.0 or CheXpert-v1.0-small; `path` is the folder with train.csv)
  train.csv, valid.csv with Path = "<dataset folder>/train/patientNNNNN/studyN/viewN_frontal.jpg"
  The first component of Path names the dataset folder as published; it is replaced by `path`,
  so a renamed folder still resolves. options: frontal_only (True: Frontal/Lateral == Frontal),
  val_fraction (0.1).
  splits: valid.csv (200 patients, labelled by radiologists) -> test; train.csv patients ->
  val with probability val_fraction by a stable hash of the patient id, else train. The
  official CheXpert test set is not part of the public download and is not read.

nih  (NIH ChestX-ray14; `path` holds the tables and the images in any sub-folders)
  Data_Entry_2017_v2020.csv (preferred) or Data_Entry_2017.csv; option `entries` picks one.
  train_val_list.txt, test_list.txt; BBox_List_2017.csv (optional, option boxes=True).
  Images are found by name anywhere under `path` (images/, images_001/images/, ...).
  Labels: NIH's text-mined labels are binary, so an absent label is 0, never NaN
  (Effusion -> Pleural Effusion). Boxes keep the NIH spelling ("Infiltrate" -> "Infiltration").
  splits: test_list.txt -> test; train_val_list.txt patients -> val with probability
  val_fraction (0.1) by a stable hash of the Patient ID, else train.

rsna  (RSNA Pneumonia Detection Challenge, stage 2; `path` holds the tables)
  stage_2_train_labels.csv (patientId, x, y, width, height, Target; one row per box),
  stage_2_detailed_class_info.csv (optional: Normal | No Lung Opacity / Not Normal | Lung Opacity),
  stage_2_train_images/<patientId>.dcm (options image_dir, image_suffix for converted copies).
  Labels: Target 1 (lung opacity) -> Consolidation 1, the other findings NaN (an opacity
  suspicious for pneumonia says nothing of them); Target 0 -> Consolidation 0, and when the
  class is "Normal" all five findings 0 (RSNA's Normal means no abnormality at all); "No Lung
  Opacity / Not Normal" leaves the other four NaN. Boxes are labelled "Lung Opacity".
  splits: none in the source (the stage 2 test images have no labels and are not read); a
  stable hash of the patientId assigns train/val/test by split_fractions (0.7, 0.1, 0.2).

All sources: uncertainty ("ignore" | "ones" | "zeros"; only CheXpert-labelled sources have
uncertain labels), skip_bad (leave out rows whose image is missing or unreadable, listed in
DataSet.skipped), decode_images (decode every image once at open time instead of only
checking that it exists).

torchxrayvision has dataset classes for these sources; they are not used because they return
preprocessed tensors rather than records, map labels onto their own 18-label vocabulary, and
would bring torchvision and scikit-image into the data layer.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from sae_cxr.data.base import Box, DataSet, Record, SkippedItem
from sae_cxr.data.images import image_problem
from sae_cxr.data.tables import (DataError, check_policy, hash_split, labels_array, normalise_split, parse_label,
                                 parse_source_label, read_table, rows_of, stable_unit, where)
from sae_cxr.findings import CHEXPERT_LABELS, FINDINGS, NIH_LABEL_ALIASES, NIH_LABELS, NIH_TO_FINDING

log = logging.getLogger(__name__)

FRONTAL_VIEWS = ("PA", "AP")
RSNA_OPACITY = "Lung Opacity"
RSNA_CLASSES = ("Normal", "No Lung Opacity / Not Normal", RSNA_OPACITY)


# --- shared plumbing ----------------------------------------------------------------------------

@dataclass
class _Collector:
    """Records and skipped rows of one adapter run, with the image check every row goes through."""

    skip_bad: bool
    decode_images: bool
    records: list[Record] = field(default_factory=list)
    skipped: list[SkippedItem] = field(default_factory=list)
    filtered: int = 0  # rows left out on purpose by an option (frontal_only), reported in the log

    def image_ok(self, path: str | Path | None, source: str, unlocated: tuple[str, str] = ("", "")) -> bool:
        """Whether a row's image is usable; if not, skip the row (skip_bad) or raise naming it.

        `path` None means the image could not be located at all: `unlocated` is then (image
        name, where it was looked for).
        """
        if path is None:
            shown, problem = unlocated
        else:
            problem = image_problem(path, self.decode_images)
            if problem is None:
                return True
            shown = str(path)
        if self.skip_bad:
            self.skipped.append(SkippedItem(source, shown, problem))
            return False
        raise DataError(f"{source}: image {shown} {problem} (set skip_bad to leave such rows out)")

    def finish(self, spec: dict[str, Any], what: str) -> DataSet:
        if self.skipped:
            log.warning("%s: skipped %d unreadable or missing image(s), e.g. %s: %s", what, len(self.skipped),
                        self.skipped[0].path, self.skipped[0].reason)
        if self.filtered:
            log.info("%s: left out %d image(s) by the view filter", what, self.filtered)
        if not self.records:
            detail = []
            if self.skipped:
                detail.append(f"{len(self.skipped)} skipped as missing or unreadable")
            if self.filtered:
                detail.append(f"{self.filtered} left out by the view filter")
            raise DataError(f"{what} yields no usable images" + (f" ({'; '.join(detail)})" if detail else ""))
        try:
            return DataSet(self.records, spec=spec, name=str(spec["kind"]), skipped=self.skipped)
        except ValueError as e:
            raise DataError(f"{what}: {e}") from None


def _root(path: str | os.PathLike, what: str) -> Path:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"{what} folder not found: {root} (spec 'path' must be the data set's root folder)")
    return root


def _find_table(root: Path, name: str, what: str) -> Path:
    """`name` or `name.gz` in `root`: MIMIC ships its tables gzipped, people often unpack them."""
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise DataError(f"{what} not found: neither {name}.gz nor {name} is in {root}")


def _require_rows(df: pd.DataFrame, path: Path, what: str) -> None:
    if df.empty:
        raise DataError(f"{what} {path} has a header but no rows")


def _cell(row: dict[str, Any], column: str, path: Path, i: int, what: str = "value") -> str:
    v = str(row[column]).strip()
    if not v:
        raise DataError(f"{where(path, i, column)}: empty {what}")
    return v


def _common(uncertainty: str, skip_bad: Any, decode_images: Any) -> tuple[str, bool, bool]:
    """The options every source shares, checked where they enter."""
    try:
        check_policy(uncertainty)
    except ValueError as e:
        raise DataError(str(e)) from None
    return uncertainty, _as_bool(skip_bad, "skip_bad"), _as_bool(decode_images, "decode_images")


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise DataError(f"option {name!r} must be true or false, got {value!r}")


def _as_fraction(value: Any, name: str, upper: float = 1.0) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise DataError(f"option {name!r} must be a number, got {value!r}") from None
    if not (0.0 <= f < upper):
        raise DataError(f"option {name!r} must lie in [0, {upper}), got {f}")
    return f


def _chexpert_style_labels(row: dict[str, Any], columns: Sequence[str], policy: str, path: Path,
                           i: int) -> tuple[np.ndarray, np.ndarray, dict[str, float | None]]:
    """Five findings (policy applied), their uncertain flags and the raw source labels."""
    values: dict[str, float] = {}
    uncertain: dict[str, bool] = {}
    raw: dict[str, float | None] = {}
    for col in columns:
        raw[col] = parse_source_label(row[col], path, i, col)
        if col in FINDINGS:
            values[col], uncertain[col] = parse_label(row[col], policy, path, i, col)
    return labels_array(values, FINDINGS), np.array([uncertain.get(f, False) for f in FINDINGS]), raw


def _label_columns(df: pd.DataFrame, path: Path, what: str) -> list[str]:
    """The CheXpert label columns of a table; the five findings must all be there."""
    missing = [f for f in FINDINGS if f not in df.columns]
    if missing:
        raise DataError(f"{what} {path} is missing label column(s) {missing}; columns present: {list(df.columns)}")
    return [c for c in CHEXPERT_LABELS if c in df.columns]


def _val_carve(key: str, val_fraction: float, source: str) -> str:
    """train or val for a training-pool patient: a stable hash, so a patient never straddles them."""
    return "val" if stable_unit(key, salt=f"sae-cxr:{source}:val") < val_fraction else "train"


def _read_report(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DataError(f"report {path} cannot be read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.strip()


def _extra_meta(row: dict[str, Any], used: set[str]) -> dict[str, str]:
    """Columns an adapter does not interpret, kept as text; blank 'Unnamed' columns (trailing commas) dropped."""
    return {c: str(v) for c, v in row.items()
            if c not in used and not (str(c).startswith("Unnamed:") and not str(v).strip())}


# --- MIMIC-CXR-JPG ------------------------------------------------------------------------------

MIMIC_PREFIX = "mimic-cxr-2.0.0"


def load_mimic_cxr_jpg(path: str | os.PathLike, *, uncertainty: str = "ignore", skip_bad: bool = False,
                       frontal_only: bool = True, labeler: str = "chexpert", reports: str | None = None,
                       decode_images: bool = False) -> DataSet:
    """MIMIC-CXR-JPG: per-study labels joined onto per-image metadata and the official split."""
    uncertainty, skip_bad, decode_images = _common(uncertainty, skip_bad, decode_images)
    frontal_only = _as_bool(frontal_only, "frontal_only")
    if labeler not in ("chexpert", "negbio"):
        raise DataError(f"option 'labeler' must be 'chexpert' or 'negbio', got {labeler!r}")
    root = _root(path, "MIMIC-CXR-JPG")
    label_path = _find_table(root, f"{MIMIC_PREFIX}-{labeler}.csv", f"MIMIC-CXR-JPG {labeler} label table")
    meta_path = _find_table(root, f"{MIMIC_PREFIX}-metadata.csv", "MIMIC-CXR-JPG metadata table")
    split_path = _find_table(root, f"{MIMIC_PREFIX}-split.csv", "MIMIC-CXR-JPG split table")
    labels_df = read_table(label_path, ("subject_id", "study_id"), what="label table")
    meta_df = read_table(meta_path, ("dicom_id", "subject_id", "study_id", "ViewPosition"), what="metadata table")
    split_df = read_table(split_path, ("dicom_id", "split"), what="split table")
    for df, p in ((labels_df, label_path), (meta_df, meta_path), (split_df, split_path)):
        _require_rows(df, p, "table")
    label_cols = _label_columns(labels_df, label_path, "label table")

    studies: dict[tuple[str, str], int] = {}
    label_rows = rows_of(labels_df)
    for i, row in enumerate(label_rows):
        key = (_cell(row, "subject_id", label_path, i, "subject id"), _cell(row, "study_id", label_path, i, "study id"))
        if key in studies:
            raise DataError(f"{where(label_path, i)}: study {key[1]} of subject {key[0]} is labelled twice "
                            f"(also {where(label_path, studies[key])})")
        studies[key] = i
    study_labels: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, dict[str, float | None]]] = {}
    splits: dict[str, tuple[str, int]] = {}
    for i, row in enumerate(rows_of(split_df)):
        dicom_id = _cell(row, "dicom_id", split_path, i, "dicom id")
        if dicom_id in splits:
            raise DataError(f"{where(split_path, i)}: image {dicom_id} appears twice "
                            f"(also {where(split_path, splits[dicom_id][1])})")
        splits[dicom_id] = (normalise_split(row["split"], split_path, i, "split"), i)

    report_root = Path(reports).expanduser() if reports else root
    if reports and not report_root.is_dir():
        raise DataError(f"MIMIC-CXR reports folder not found: {report_root} (option 'reports')")
    report_cache: dict[tuple[str, str], str | None] = {}
    missing_reports = 0

    out = _Collector(skip_bad, decode_images)
    files = str(root / "files")
    used = {"dicom_id", "subject_id", "study_id", "ViewPosition"}
    for i, row in enumerate(rows_of(meta_df)):
        source = where(meta_path, i)
        dicom_id = _cell(row, "dicom_id", meta_path, i, "dicom id")
        subject = _cell(row, "subject_id", meta_path, i, "subject id")
        study = _cell(row, "study_id", meta_path, i, "study id")
        if not (subject.isdigit() and study.isdigit() and len(subject) >= 2):
            raise DataError(f"{source}: subject_id {subject!r} and study_id {study!r} must be numbers "
                            "(they name the image folders)")
        view = str(row["ViewPosition"]).strip()
        if frontal_only and view.upper() not in FRONTAL_VIEWS:
            out.filtered += 1
            continue
        if dicom_id not in splits:
            raise DataError(f"{source}: image {dicom_id} has no row in {split_path.name}")
        split = splits[dicom_id][0]
        image = os.path.join(files, f"p{subject[:2]}", f"p{subject}", f"s{study}", f"{dicom_id}.jpg")
        if not out.image_ok(image, source):
            continue
        key = (subject, study)
        if key not in study_labels:  # a study's images share its labels: parse them once
            if key in studies:
                j = studies[key]
                study_labels[key] = _chexpert_style_labels(label_rows[j], label_cols, uncertainty, label_path, j)
            else:  # MIMIC leaves some studies unlabelled (no findings or impression section)
                study_labels[key] = (labels_array({}, FINDINGS), np.zeros(len(FINDINGS), bool), {})
        labels, uncertain, raw = study_labels[key]
        if key not in report_cache:
            report_cache[key] = _read_report(report_root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt")
            missing_reports += report_cache[key] is None
        meta: dict[str, Any] = {"subject_id": subject, "study_id": study, "view": view, "labeler": labeler,
                                "labelled": key in studies, "labels": dict(raw)}
        meta.update(_extra_meta(row, used))
        out.records.append(Record(id=dicom_id, split=split, labels=labels.copy(), uncertain=uncertain.copy(),
                                  path=image, report=report_cache[key] or "", meta=meta))
    if reports and missing_reports:
        log.warning("MIMIC-CXR-JPG: %d of %d studies have no report under %s", missing_reports,
                    len(report_cache), report_root)
    spec = {"kind": "mimic-cxr-jpg", "path": str(root.resolve()), "uncertainty": uncertainty, "skip_bad": skip_bad,
            "frontal_only": frontal_only, "labeler": labeler,
            "reports": str(report_root.resolve()) if reports else None, "decode_images": decode_images}
    return out.finish(spec, f"MIMIC-CXR-JPG at {root}")


# --- CheXpert -----------------------------------------------------------------------------------

CHEXPERT_SPLIT_DIRS = ("train", "valid", "test")
_PATIENT = re.compile(r"^patient\d+$")


def load_chexpert(path: str | os.PathLike, *, uncertainty: str = "ignore", skip_bad: bool = False,
                  frontal_only: bool = True, val_fraction: float = 0.1, decode_images: bool = False) -> DataSet:
    """CheXpert v1.0 (full or small): valid.csv is the test split, val is carved from train by patient."""
    uncertainty, skip_bad, decode_images = _common(uncertainty, skip_bad, decode_images)
    frontal_only = _as_bool(frontal_only, "frontal_only")
    val_fraction = _as_fraction(val_fraction, "val_fraction")
    root = _root(path, "CheXpert")
    out = _Collector(skip_bad, decode_images)
    for table_name, pool in (("train.csv", "train"), ("valid.csv", "test")):
        table = root / table_name
        if not table.is_file():
            raise DataError(f"CheXpert table not found: {table} (the folder should hold train.csv and valid.csv)")
        df = read_table(table, ("Path",), what="CheXpert table")
        _require_rows(df, table, "CheXpert table")
        label_cols = _label_columns(df, table, "CheXpert table")
        if frontal_only and "Frontal/Lateral" not in df.columns:
            raise DataError(f"CheXpert table {table} has no 'Frontal/Lateral' column; set frontal_only to false "
                            "to keep every view")
        used = {"Path", *label_cols}
        before, skipped_before, filtered_before = len(out.records), len(out.skipped), out.filtered
        for i, row in enumerate(rows_of(df)):
            source = where(table, i)
            rel = _chexpert_relative(_cell(row, "Path", table, i, "image path"), table, i)
            patient = next((p for p in rel.parts if _PATIENT.match(p)), None)
            if patient is None:
                raise DataError(f"{where(table, i, 'Path')}: no patientNNNNN folder in {row['Path']!r}")
            if frontal_only and str(row["Frontal/Lateral"]).strip().lower() != "frontal":
                out.filtered += 1
                continue
            image = root.joinpath(*rel.parts)
            if not out.image_ok(image, source):
                continue
            labels, uncertain, raw = _chexpert_style_labels(row, label_cols, uncertainty, table, i)
            split = "test" if pool == "test" else _val_carve(patient, val_fraction, "chexpert")
            meta: dict[str, Any] = {"patient_id": patient, "table": table_name, "labels": raw}
            meta.update(_extra_meta(row, used))
            out.records.append(Record(id=rel.with_suffix("").as_posix(), split=split, labels=labels,
                                      uncertain=uncertain, path=str(image), meta=meta))
        if pool == "test" and len(out.records) == before:
            raise DataError(f"CheXpert table {table} yields no images for the test split "
                            f"({out.filtered - filtered_before} left out by frontal_only, "
                            f"{len(out.skipped) - skipped_before} skipped as missing or unreadable)")
    spec = {"kind": "chexpert", "path": str(root.resolve()), "uncertainty": uncertainty, "skip_bad": skip_bad,
            "frontal_only": frontal_only, "val_fraction": val_fraction, "decode_images": decode_images}
    return out.finish(spec, f"CheXpert at {root}")


def _chexpert_relative(value: str, table: Path, i: int) -> PurePosixPath:
    """The image path below the dataset folder: "CheXpert-v1.0-small/train/..." -> "train/..."."""
    rel = PurePosixPath(value.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts:
        raise DataError(f"{where(table, i, 'Path')}: {value!r} must be a relative path inside the data set")
    parts = rel.parts
    if parts and parts[0] not in CHEXPERT_SPLIT_DIRS:
        parts = parts[1:]
    if len(parts) < 2 or parts[0] not in CHEXPERT_SPLIT_DIRS:
        raise DataError(f"{where(table, i, 'Path')}: {value!r} is not <dataset folder>/train|valid/patient.../"
                        "study.../view...")
    return PurePosixPath(*parts)


# --- NIH ChestX-ray14 ---------------------------------------------------------------------------

NIH_ENTRIES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")


def load_nih(path: str | os.PathLike, *, uncertainty: str = "ignore", skip_bad: bool = False,
             entries: str | None = None, val_fraction: float = 0.1, boxes: bool = True,
             decode_images: bool = False) -> DataSet:
    """NIH ChestX-ray14 with the official train_val/test lists and BBox_List_2017 boxes."""
    # NIH has no uncertain labels; the policy is checked and kept so every spec reads alike
    uncertainty, skip_bad, decode_images = _common(uncertainty, skip_bad, decode_images)
    val_fraction = _as_fraction(val_fraction, "val_fraction")
    boxes = _as_bool(boxes, "boxes")
    root = _root(path, "NIH ChestX-ray14")
    if entries is None:
        entries = next((n for n in NIH_ENTRIES if (root / n).is_file()), NIH_ENTRIES[-1])
    entry_path = root / entries
    if not entry_path.is_file():
        raise DataError(f"NIH table not found: {entry_path} (expected one of {list(NIH_ENTRIES)})")
    df = read_table(entry_path, ("Image Index", "Finding Labels", "Patient ID"), what="NIH table")
    _require_rows(df, entry_path, "NIH table")
    test_set = _read_list(root / "test_list.txt")
    trainval_set = _read_list(root / "train_val_list.txt")
    both = test_set.keys() & trainval_set.keys()
    if both:
        name = sorted(both)[0]
        raise DataError(f"line {test_set[name]} of test_list.txt: {name} is also on line {trainval_set[name]} of "
                        f"train_val_list.txt; an image belongs to one list")
    index = _index_images(root)

    out = _Collector(skip_bad, decode_images)
    seen: dict[str, int] = {}
    skipped_names: set[str] = set()
    used = {"Image Index", "Finding Labels", "Patient ID"}
    vocabulary = set(NIH_LABELS)
    for i, row in enumerate(rows_of(df)):
        source = where(entry_path, i)
        name = _cell(row, "Image Index", entry_path, i, "image name")
        if name in seen:
            raise DataError(f"{source}: image {name} is listed twice (also {where(entry_path, seen[name])})")
        seen[name] = i
        patient = _cell(row, "Patient ID", entry_path, i, "patient id")
        found = [lab.strip() for lab in str(row["Finding Labels"]).split("|") if lab.strip()]
        found = [NIH_LABEL_ALIASES.get(lab, lab) for lab in found]
        unknown = [lab for lab in found if lab not in vocabulary]
        if unknown or not found:
            raise DataError(f"{where(entry_path, i, 'Finding Labels')}: "
                            + (f"label {unknown[0]!r} is not an NIH label ({', '.join(NIH_LABELS)})" if unknown
                               else "no label (NIH writes 'No Finding' for a normal image)"))
        if "No Finding" in found and len(found) > 1:
            raise DataError(f"{where(entry_path, i, 'Finding Labels')}: 'No Finding' together with other labels "
                            f"({row['Finding Labels']!r})")
        if name in test_set:
            split = "test"
        elif name in trainval_set:
            split = _val_carve(patient, val_fraction, "nih")
        else:
            raise DataError(f"{source}: image {name} is on neither test_list.txt nor train_val_list.txt")
        image = index.get(name)
        if not out.image_ok(image, source, unlocated=(name, f"is in no folder under {root}")):
            skipped_names.add(name)
            continue
        present = set(found)
        values = {NIH_TO_FINDING[lab]: 1.0 for lab in present if lab in NIH_TO_FINDING}
        labels = np.array([values.get(f, 0.0) for f in FINDINGS], dtype=np.float32)
        meta: dict[str, Any] = {"patient_id": patient, "finding_labels": str(row["Finding Labels"]),
                                "labels": {lab: float(lab in present) for lab in NIH_LABELS}}
        meta.update(_extra_meta(row, used))
        out.records.append(Record(id=name, split=split, labels=labels, path=str(image), meta=meta))
    if not any(r.split == "test" for r in out.records):
        raise DataError(f"the test split is empty: test_list.txt names none of the usable images in {entries}"
                        + (f" ({len(out.skipped)} skipped as missing or unreadable)" if out.skipped else ""))
    bbox_path = root / "BBox_List_2017.csv"
    if boxes and bbox_path.is_file():
        by_id = {r.id: r for r in out.records}
        for name, box, row_name in _read_nih_boxes(bbox_path):
            if name in by_id:
                by_id[name].boxes = by_id[name].boxes + (box,)
            elif name not in skipped_names:
                raise DataError(f"{row_name}: image {name} is not in {entries}")
    spec = {"kind": "nih", "path": str(root.resolve()), "uncertainty": uncertainty, "skip_bad": skip_bad,
            "entries": entries, "val_fraction": val_fraction, "boxes": boxes, "decode_images": decode_images}
    return out.finish(spec, f"NIH ChestX-ray14 at {root}")


def _read_list(path: Path) -> dict[str, int]:
    """Image names of a split list, with their 1-based line numbers."""
    if not path.is_file():
        raise DataError(f"NIH split list not found: {path} (the official train_val_list.txt and test_list.txt "
                        "define the test split)")
    names: dict[str, int] = {}
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise DataError(f"NIH split list {path} cannot be read ({e.strerror or e})") from None
    for n, line in enumerate(lines, start=1):
        name = line.strip()
        if not name:
            continue
        if name in names:
            raise DataError(f"line {n} of {path.name}: {name} is already on line {names[name]}")
        names[name] = n
    if not names:
        raise DataError(f"NIH split list {path} lists no images")
    return names


def _index_images(root: Path) -> dict[str, Path]:
    """Every PNG under `root` by file name: NIH ships twelve archives that unpack to different folders."""
    index: dict[str, Path] = {}
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for f in files:
            if f.lower().endswith(".png"):
                p = Path(folder) / f
                if f in index:
                    raise DataError(f"image {f} is in two folders: {index[f]} and {p}; remove one copy")
                index[f] = p
    return index


def _read_nih_boxes(path: Path) -> list[tuple[str, Box, str]]:
    """BBox_List_2017.csv rows as (image, Box, 'row N of ...').

    Its header is `Image Index,Finding Label,Bbox [x,y,w,h],,,`: the four numbers spread over
    four unnamed columns, so the table is read by position, not by name.
    """
    df = read_table(path, what="NIH box table", header=None)
    head = [str(c).strip() for c in df.iloc[0].tolist()]
    if head[:2] != ["Image Index", "Finding Label"] or len(head) < 6:
        raise DataError(f"NIH box table {path} does not start with 'Image Index,Finding Label,Bbox [x,y,w,h]'; "
                        f"header read: {','.join(head)}")
    out: list[tuple[str, Box, str]] = []
    names = ("x", "y", "w", "h")
    box_vocabulary = set(NIH_LABELS) - {"No Finding"}
    for j in range(1, len(df)):
        cells = [str(c).strip() for c in df.iloc[j].tolist()]
        if not any(cells):
            continue
        row_name = where(path, j - 1)
        if any(cells[6:]):
            raise DataError(f"{row_name}: expected 6 values (image, label, x, y, w, h), got {len([c for c in cells if c])}")
        name, raw_label = cells[0], cells[1]
        if not name:
            raise DataError(f"{row_name}: empty image name")
        label = NIH_LABEL_ALIASES.get(raw_label, raw_label)
        if label not in box_vocabulary:
            raise DataError(f"{row_name}: box label {raw_label!r} is not an NIH finding ({', '.join(sorted(box_vocabulary))})")
        coords = []
        for k, cname in enumerate(names):
            try:
                coords.append(float(cells[2 + k]))
            except ValueError:
                raise DataError(f"{row_name}: box {cname} {cells[2 + k]!r} is not a number") from None
        try:
            out.append((name, Box(label, *coords), row_name))
        except ValueError as e:
            raise DataError(f"{row_name}: {e}") from None
    return out


# --- RSNA Pneumonia -----------------------------------------------------------------------------

def load_rsna(path: str | os.PathLike, *, uncertainty: str = "ignore", skip_bad: bool = False,
              split_fractions: Sequence[float] = (0.7, 0.1, 0.2), image_dir: str = "stage_2_train_images",
              image_suffix: str = ".dcm", decode_images: bool = False) -> DataSet:
    """RSNA Pneumonia stage 2 training set: one record per patientId, one box per positive row."""
    # RSNA has no uncertain labels; the policy is checked and kept so every spec reads alike
    uncertainty, skip_bad, decode_images = _common(uncertainty, skip_bad, decode_images)
    fractions = _check_fractions(split_fractions)
    root = _root(path, "RSNA Pneumonia")
    labels_path = root / "stage_2_train_labels.csv"
    if not labels_path.is_file():
        raise DataError(f"RSNA label table not found: {labels_path}")
    df = read_table(labels_path, ("patientId", "x", "y", "width", "height", "Target"), what="RSNA label table")
    _require_rows(df, labels_path, "RSNA label table")
    classes = _read_rsna_classes(root / "stage_2_detailed_class_info.csv")
    images = root / image_dir
    if not images.is_dir():
        raise DataError(f"RSNA image folder not found: {images} (option image_dir)")

    patients: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(rows_of(df)):
        pid = _cell(row, "patientId", labels_path, i, "patientId")
        target_text = str(row["Target"]).strip()
        if target_text not in ("0", "1"):
            raise DataError(f"{where(labels_path, i, 'Target')}: Target {row['Target']!r} is not 0 or 1")
        target = int(target_text)
        entry = patients.setdefault(pid, {"target": target, "row": i, "boxes": []})
        if entry["target"] != target:
            raise DataError(f"{where(labels_path, i, 'Target')}: patient {pid} has Target {target} here and "
                            f"{entry['target']} on {where(labels_path, entry['row'])}")
        coords = [str(row[c]).strip() for c in ("x", "y", "width", "height")]
        if target == 0:
            if any(coords):
                raise DataError(f"{where(labels_path, i)}: Target 0 row has box coordinates; "
                                "a negative patient has no box")
            continue
        try:
            entry["boxes"].append(Box(RSNA_OPACITY, *(float(c) for c in coords)))
        except ValueError as e:
            raise DataError(f"{where(labels_path, i)}: bad box {coords} for a Target 1 row ({e})") from None

    out = _Collector(skip_bad, decode_images)
    class_path = root / "stage_2_detailed_class_info.csv"
    for pid, entry in patients.items():
        source = where(labels_path, entry["row"])
        target = entry["target"]
        cls = None
        if classes is not None:
            if pid not in classes:
                raise DataError(f"{source}: patient {pid} has no row in {class_path.name}")
            cls = classes[pid][0]
            if (cls == RSNA_OPACITY) != (target == 1):
                raise DataError(f"{where(class_path, classes[pid][1])}: class {cls!r} contradicts Target {target} "
                                f"on {source}")
        image = images / f"{pid}{image_suffix}"
        if not out.image_ok(image, source):
            continue
        values = {"Consolidation": float(target)}
        if cls == "Normal":
            values = {f: 0.0 for f in FINDINGS}
        raw: dict[str, float | None] = {RSNA_OPACITY: float(target)}
        if cls is not None:
            raw = {c: float(c == cls) for c in RSNA_CLASSES}
        meta = {"patient_id": pid, "target": target, "class": cls, "labels": raw}
        out.records.append(Record(id=pid, split=hash_split(pid, fractions), labels=labels_array(values, FINDINGS),
                                  path=str(image), boxes=tuple(entry["boxes"]), meta=meta))
    spec = {"kind": "rsna", "path": str(root.resolve()), "uncertainty": uncertainty, "skip_bad": skip_bad,
            "split_fractions": list(fractions), "image_dir": image_dir, "image_suffix": image_suffix,
            "decode_images": decode_images}
    return out.finish(spec, f"RSNA Pneumonia at {root}")


def _read_rsna_classes(path: Path) -> dict[str, tuple[str, int]] | None:
    """patientId -> (class, row); the file repeats a patient once per box, always with one class."""
    if not path.is_file():
        return None
    df = read_table(path, ("patientId", "class"), what="RSNA class table")
    classes: dict[str, tuple[str, int]] = {}
    for i, row in enumerate(rows_of(df)):
        pid = _cell(row, "patientId", path, i, "patientId")
        cls = str(row["class"]).strip()
        if cls not in RSNA_CLASSES:
            raise DataError(f"{where(path, i, 'class')}: class {cls!r} is not one of {list(RSNA_CLASSES)}")
        if pid in classes and classes[pid][0] != cls:
            raise DataError(f"{where(path, i, 'class')}: patient {pid} is {cls!r} here and {classes[pid][0]!r} "
                            f"on {where(path, classes[pid][1])}")
        classes.setdefault(pid, (cls, i))
    return classes


def _check_fractions(value: Sequence[float]) -> tuple[float, float, float]:
    try:
        fr = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise DataError(f"option 'split_fractions' must be three numbers (train, val, test), got {value!r}") from None
    if len(fr) != 3 or any(f < 0 for f in fr) or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
        raise DataError(f"option 'split_fractions' must be three non-negative numbers summing to 1, got {value!r}")
    return fr  # type: ignore[return-value]


# --- dispatch -----------------------------------------------------------------------------------

LOADERS: dict[str, Callable[..., DataSet]] = {
    "mimic-cxr-jpg": load_mimic_cxr_jpg,
    "chexpert": load_chexpert,
    "nih": load_nih,
    "rsna": load_rsna,
}
PUBLIC_KINDS: tuple[str, ...] = tuple(LOADERS)


def source_options(kind: str) -> dict[str, Any]:
    """The options a source accepts, with their defaults (for help texts and config checks)."""
    if kind not in LOADERS:
        raise DataError(f"unknown data source {kind!r}; expected phantom, folder or one of {', '.join(PUBLIC_KINDS)}")
    sig = inspect.signature(LOADERS[kind])
    return {n: p.default for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def open_public(spec: dict[str, Any]) -> DataSet:
    """Open a public data set from its spec: {"kind", "path", "uncertainty", "skip_bad", options...}."""
    kind = str(spec.get("kind"))
    allowed = source_options(kind)
    if not spec.get("path"):
        raise DataError(f"data source {kind!r} needs 'path', the data set's root folder")
    options = {k: v for k, v in spec.items() if k not in ("kind", "path")}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DataError(f"data source {kind!r} has no option(s) {unknown}; its options are {sorted(allowed)}")
    try:
        return LOADERS[kind](spec["path"], **options)
    except ValueError as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{kind} data set at {spec['path']}: {e}") from None
