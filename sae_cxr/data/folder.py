"""The generic source: a folder of images and a CSV that describes them.

Columns (names matched ignoring case, spaces and underscores):
  path (or image, file, filename)   required; relative to the CSV's folder unless absolute
  id                                optional; defaults to the image path without its suffix
  split                             optional; train/val/test/test_shifted (aliases accepted);
                                    without it a stable hash of the id assigns train/val/test 70/10/20
  Atelectasis, Cardiomegaly, ...    optional; 1, 0, -1 (uncertain) or blank, one per finding
  concepts                          optional; ';'-separated concept names
  boxes                             optional; JSON list of {label, x, y, w, h} in pixels
  report                            optional; free text
  meta                              optional; a JSON object
Any other column is kept, as text, in the record's metadata.

The phantom world's `export_folder` writes exactly this format, so a phantom world written to
disk and read back here gives the same records.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sae_cxr.data.base import Box, DataSet, Record, SkippedItem
from sae_cxr.data.images import image_problem
from sae_cxr.data.tables import (DataError, check_policy, find_column, hash_split, labels_array,
                                 normalise_split, parse_label, read_table, resolve_image, where)
from sae_cxr.findings import FINDINGS

PATH_COLUMNS = ("path", "image", "image_path", "file", "filename", "file_name")


def load_folder(csv_path: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
                uncertainty: str = "ignore", skip_bad: bool = False, decode_images: bool = False) -> DataSet:
    """Read a folder+CSV data set.

    Images are checked to exist; with `decode_images` each is also decoded once (slow on large
    sets). With `skip_bad`, rows whose image is missing or unreadable are left out and listed in
    `DataSet.skipped`; without it the first such row raises a DataError naming it.
    """
    csv_path = Path(csv_path)
    check_policy(uncertainty)
    df = read_table(csv_path, what="image table")
    root = Path(image_root) if image_root is not None else csv_path.parent
    path_col = find_column(df, PATH_COLUMNS)
    if path_col is None:
        raise DataError(f"image table {csv_path} needs a column with the image path (one of {list(PATH_COLUMNS)}); "
                        f"columns present: {list(df.columns)}")
    id_col = find_column(df, ("id", "image_id", "dicom_id"))
    split_col = find_column(df, ("split",))
    report_col = find_column(df, ("report", "text", "findings_text"))
    concept_col = find_column(df, ("concepts",))
    box_col = find_column(df, ("boxes",))
    meta_col = find_column(df, ("meta", "metadata"))
    label_cols = {f: find_column(df, (f,)) for f in FINDINGS}
    used = {c for c in (path_col, id_col, split_col, report_col, concept_col, box_col, meta_col) if c}
    used |= {c for c in label_cols.values() if c}
    extra_cols = [c for c in df.columns if c not in used]

    records: list[Record] = []
    skipped: list[SkippedItem] = []
    for i, row in enumerate(df.to_dict("records")):
        image_path = resolve_image(root, row[path_col], csv_path, i, path_col)
        rid = str(row[id_col]).strip() if id_col and str(row[id_col]).strip() else Path(row[path_col]).with_suffix("").as_posix()
        problem = image_problem(image_path, decode_images)
        if problem is not None:
            if skip_bad:
                skipped.append(SkippedItem(where(csv_path, i), str(image_path), problem))
                continue
            raise DataError(f"{where(csv_path, i)}: image {image_path} {problem} (use --skip-bad to leave such rows out)")
        labels: dict[str, float] = {}
        uncertain: dict[str, bool] = {}
        for f, col in label_cols.items():
            if col is not None:
                labels[f], uncertain[f] = parse_label(row[col], uncertainty, csv_path, i, col)
        split = normalise_split(row[split_col], csv_path, i, split_col) if split_col else hash_split(rid)
        meta: dict[str, Any] = {}
        if meta_col and str(row[meta_col]).strip():
            meta = _json_cell(row[meta_col], csv_path, i, meta_col, dict)
        for c in extra_cols:
            meta.setdefault(c, row[c])
        concepts: tuple[str, ...] = ()
        if concept_col and str(row[concept_col]).strip():
            concepts = tuple(x.strip() for x in str(row[concept_col]).split(";") if x.strip())
        boxes: tuple[Box, ...] = ()
        if box_col and str(row[box_col]).strip():
            raw = _json_cell(row[box_col], csv_path, i, box_col, list)
            try:
                boxes = tuple(Box.from_dict(b) for b in raw)
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{where(csv_path, i, box_col)}: bad box ({e}); expected {{label, x, y, w, h}}") from None
        records.append(Record(
            id=rid, split=split, labels=labels_array(labels, FINDINGS),
            uncertain=[uncertain.get(f, False) for f in FINDINGS], path=str(image_path),
            concepts=concepts, boxes=boxes, report=str(row[report_col]) if report_col else "", meta=meta))
    if not records:
        raise DataError(f"image table {csv_path} yields no usable rows"
                        + (f" ({len(skipped)} skipped as unreadable)" if skipped else ""))
    try:
        spec = {"kind": "folder", "csv": str(csv_path.resolve()), "image_root": str(root.resolve()),
                "uncertainty": uncertainty, "skip_bad": skip_bad}
        return DataSet(records, spec=spec, name=csv_path.parent.name or "folder", skipped=skipped)
    except ValueError as e:
        raise DataError(f"image table {csv_path}: {e}") from None


def _json_cell(value: str, path: Path, row: int, column: str, kind: type) -> Any:
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(f"{where(path, row, column)}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, kind):
        raise DataError(f"{where(path, row, column)}: expected a JSON {kind.__name__}, got {type(obj).__name__}")
    return obj
