"""The CSV adapters under fuzzing: any table either loads or raises DataError naming the file; never
another exception type. Inputs: random bytes, generated folder+CSV tables mixing valid and broken
cells in every column, odd encodings, duplicate ids, and a mutated NIH Data_Entry table."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sae_cxr.data.base import DataSet
from sae_cxr.data.folder import load_folder
from sae_cxr.data.public import load_nih
from sae_cxr.data.tables import DataError, read_table
from sae_cxr.findings import FINDINGS
from tests.data.test_public import NIH_HEADER_2017, make_nih

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
LABELS = st.sampled_from(["1", "0", "-1", "", "1.0", "0.0", "yes", "2", "nan", "-1.0", " 1 "]) | TEXT
SPLITS = st.sampled_from(["train", "val", "test", "test_shifted", "Validation", "TEST", "", "holdout"]) | TEXT
BOXES = st.sampled_from(['[{"label": "nodule", "x": 1, "y": 2, "w": 3, "h": 4}]', "[]", "", "{}", "[1, 2]",
                         '[{"x": 1}]', '[{"label": "a", "x": -1, "y": 0, "w": 0, "h": 1}]', "not json"]) | TEXT
META = st.sampled_from(['{"view": "PA"}', "", "[]", "{", '"x"']) | TEXT
ENCODINGS = ["utf-8", "utf-8-sig", "latin-1", "cp1252", "utf-16"]


def _png(path: Path) -> None:
    Image.fromarray(np.full((16, 16), 100, np.uint8), mode="L").save(path)


def _check(load, csv_path: Path):
    """The property: a DataSet, or a DataError whose message names the table."""
    try:
        ds = load()
    except DataError as e:
        assert csv_path.name in str(e), str(e)
        return None
    assert isinstance(ds, DataSet) and len(ds) > 0
    assert len({r.id for r in ds}) == len(ds)  # duplicate ids never get through
    for r in ds:
        assert r.split in ("train", "val", "test", "test_shifted")
        assert r.labels.shape == (len(FINDINGS),)
    return ds


@FUZZ
@given(data=st.binary(max_size=400))
def test_read_table_on_random_bytes(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("t") / "scans.csv"
    p.write_bytes(data)
    try:
        df = read_table(p, required=("path",))
    except DataError as e:
        assert "scans.csv" in str(e)
    else:
        assert "path" in df.columns


@st.composite
def folder_tables(draw):
    columns = draw(st.lists(st.sampled_from(["path", "id", "split", "report", "concepts", "boxes", "meta",
                                             *FINDINGS, "extra", "Path", "file name"]),
                            min_size=1, max_size=8, unique=True))
    n = draw(st.integers(1, 6))
    cell = {"path": st.sampled_from(["a.png", "b.png", "missing.png", "", "../a.png", "sub/../a.png", "bad.png"]),
            "Path": st.sampled_from(["a.png", "b.png"]), "file name": st.sampled_from(["a.png", "nope.png"]),
            "id": st.sampled_from(["x1", "x2", "x1", ""]) | TEXT, "split": SPLITS, "report": TEXT,
            "concepts": st.sampled_from(["pacemaker;nodule", "", ";;", "unknown_concept"]) | TEXT,
            "boxes": BOXES, "meta": META, "extra": TEXT}
    rows = [[draw(cell.get(c, LABELS)) for c in columns] for _ in range(n)]
    encoding = draw(st.sampled_from(ENCODINGS))
    return columns, rows, encoding


@FUZZ
@given(table=folder_tables(), skip_bad=st.booleans(), decode=st.booleans())
def test_folder_adapter_loads_or_names_the_problem(tmp_path_factory, table, skip_bad, decode):
    root = tmp_path_factory.mktemp("folder")
    _png(root / "a.png")
    _png(root / "b.png")
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    columns, rows, encoding = table
    buf = io.StringIO()
    csv.writer(buf).writerows([columns, *rows])
    csv_path = root / "scans.csv"
    try:
        csv_path.write_bytes(buf.getvalue().encode(encoding))
    except UnicodeEncodeError:
        csv_path.write_bytes(buf.getvalue().encode(encoding, errors="replace"))
    ds = _check(lambda: load_folder(csv_path, skip_bad=skip_bad, decode_images=decode), csv_path)
    if ds is not None:
        assert all(Path(r.path).resolve().parent == root.resolve() for r in ds)  # no path leaves the folder's images
        if decode:
            assert all(Path(r.path).name != "bad.png" for r in ds)


@FUZZ
@given(labels=st.lists(st.sampled_from(["No Finding", "Effusion", "Atelectasis|Edema", "Infiltrate", "", "Tumor",
                                        "Effusion|", "|", "cardiomegaly"]) | TEXT, min_size=5, max_size=5),
       follow=st.lists(st.sampled_from(["0", "1", "", "x", "-3"]), min_size=5, max_size=5),
       names=st.lists(st.sampled_from(["00000001_000.png", "00000002_000.png", "00000003_000.png",
                                       "00000004_000.png", "00000009_000.png", "", "../x.png"]),
                      min_size=5, max_size=5))
def test_nih_adapter_loads_or_names_the_problem(tmp_path_factory, labels, follow, names):
    root = make_nih(tmp_path_factory.mktemp("nih") / "nih")
    lines = [NIH_HEADER_2017] + [
        f"{n},{lab.replace(',', ' ').replace(chr(10), ' ').replace(chr(13), ' ')},{fu},{k},058Y,M,PA,2682,2749,0.143,0.143,"
        for k, (n, lab, fu) in enumerate(zip(names, labels, follow))]
    table = root / "Data_Entry_2017.csv"
    table.write_text("\n".join(lines) + "\n")
    try:
        ds = load_nih(root)
    except DataError as e:
        assert any(s in str(e) for s in ("Data_Entry_2017.csv", "nih", "NIH")), str(e)
    else:
        assert len(ds) > 0 and len({r.id for r in ds}) == len(ds)


def test_duplicate_ids_and_unknown_labels_are_named_with_row(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "scans.csv").write_text("path,id,Edema\na.png,x,1\na.png,x,0\n")
    with pytest.raises(DataError, match="scans.csv.*duplicate.*x|scans.csv.*x.*twice|duplicate.*'x'"):
        load_folder(tmp_path / "scans.csv")
    (tmp_path / "scans.csv").write_text("path,id,Edema\na.png,x,maybe\n")
    with pytest.raises(DataError, match="row 2 column 'Edema' of scans.csv: label value 'maybe' is not 1, 0, -1"):
        load_folder(tmp_path / "scans.csv")
