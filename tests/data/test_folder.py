"""The generic folder+CSV adapter: columns, label parsing, errors that name the row, --skip-bad."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sae_cxr.data.folder import load_folder
from sae_cxr.data.images import save_png
from sae_cxr.data.tables import DataError


def _write(tmp_path, header: str, rows: list[str], images: list[str] = ("a.png", "b.png")):
    for name in images:
        save_png(np.full((16, 16), 0.5, dtype=np.float32), tmp_path / name)
    p = tmp_path / "scans.csv"
    p.write_text("\n".join([header, *rows]) + "\n")
    return p


def test_minimal_table_gets_ids_and_stable_splits(tmp_path):
    p = _write(tmp_path, "filename", ["a.png", "b.png"])
    ds = load_folder(p)
    assert [r.id for r in ds] == ["a", "b"]
    assert all(r.split in ("train", "val", "test") for r in ds)
    assert [r.split for r in load_folder(p)] == [r.split for r in ds]
    assert np.isnan(ds[0].labels).all()


def test_labels_uncertainty_and_extra_columns(tmp_path):
    p = _write(tmp_path, "Path,Split,cardiomegaly,Pleural_Effusion,age",
               ["a.png,validation,1,-1,71", "b.png,test,0,,45"])
    ds = load_folder(p, uncertainty="ones")
    a, b = ds
    assert a.split == "val" and b.split == "test"
    assert a.labels[1] == 1 and a.labels[4] == 1 and a.uncertain[4]
    assert b.labels[1] == 0 and math.isnan(b.labels[4]) and not b.uncertain[4]
    assert a.meta["age"] == "71"
    assert math.isnan(load_folder(p, uncertainty="ignore")[0].labels[4])
    assert load_folder(p, uncertainty="zeros")[0].labels[4] == 0


def test_bad_label_names_row_and_column(tmp_path):
    p = _write(tmp_path, "path,Edema", ["a.png,1", "b.png,maybe"])
    with pytest.raises(DataError, match=r"row 3 .*'Edema'.*scans.csv.*'maybe'"):
        load_folder(p)


def test_missing_path_column_lists_columns(tmp_path):
    p = _write(tmp_path, "name,Edema", ["a.png,1"])
    with pytest.raises(DataError, match=r"needs a column with the image path.*columns present: \['name', 'Edema'\]"):
        load_folder(p)


def test_missing_image_errors_or_is_skipped_and_reported(tmp_path):
    p = _write(tmp_path, "path", ["a.png", "gone.png", "b.png"])
    with pytest.raises(DataError, match=r"row 3 of scans.csv: image .*gone.png does not exist.*--skip-bad"):
        load_folder(p)
    ds = load_folder(p, skip_bad=True)
    assert [r.id for r in ds] == ["a", "b"]
    assert len(ds.skipped) == 1 and ds.skipped[0].path.endswith("gone.png")
    assert ds.skipped[0].source == "row 3 of scans.csv"


def test_undecodable_image_is_caught_when_decoding(tmp_path):
    p = _write(tmp_path, "path", ["a.png", "bad.png"])
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match="bad.png is not readable"):
        load_folder(p, decode_images=True)
    assert len(load_folder(p, decode_images=True, skip_bad=True)) == 1


def test_duplicate_ids_are_refused(tmp_path):
    p = _write(tmp_path, "id,path", ["x,a.png", "x,b.png"])
    with pytest.raises(DataError, match="duplicate record ids"):
        load_folder(p)


def test_latin1_csv_is_read(tmp_path):
    save_png(np.zeros((16, 16), np.float32), tmp_path / "a.png")
    p = tmp_path / "scans.csv"
    p.write_bytes("path,report\na.png,Épanchement pleural\n".encode("latin-1"))
    assert load_folder(p)[0].report == "Épanchement pleural"


def test_bad_split_and_bad_boxes_name_the_cell(tmp_path):
    p = _write(tmp_path, "path,split", ["a.png,holdout"])
    with pytest.raises(DataError, match=r"row 2 .*'split'.*'holdout'"):
        load_folder(p)
    p = _write(tmp_path, "path,boxes", ['a.png,"[{""label"": ""x""}]"'])
    with pytest.raises(DataError, match=r"row 2 .*'boxes'.*bad box"):
        load_folder(p)
