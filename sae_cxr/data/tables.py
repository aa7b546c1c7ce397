"""Reading metadata tables with errors that name the file, the row and the column.

Every adapter reads CSVs through `read_table`, so a missing column, an odd encoding or a label
outside the vocabulary is reported the same way whichever data set it comes from.
"""

from __future__ import annotations

import hashlib
import math
import os
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

UNCERTAINTY_POLICIES = ("ones", "zeros", "ignore")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validate": "val",
                 "validation": "val", "dev": "val", "test": "test", "testing": "test",
                 "test_shifted": "test_shifted", "shifted": "test_shifted"}


class DataError(ValueError):
    """Bad input data: the message says which file, which row and what is wrong."""


def where(path: str | os.PathLike, row: int | None = None, column: str | None = None) -> str:
    """"row 17 of scans.csv", with rows counted as a spreadsheet shows them (header = row 1)."""
    name = Path(path).name
    parts = []
    if row is not None:
        parts.append(f"row {row + 2}")
    if column is not None:
        parts.append(f"column {column!r}")
    return f"{' '.join(parts)} of {name}" if parts else str(name)


def read_table(path: str | os.PathLike, required: Sequence[str] = (), what: str = "metadata table",
               header: int | None = 0) -> pd.DataFrame:
    """Read a CSV as strings (no NA guessing), trying UTF-8, UTF-8 with BOM, then Latin-1."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} not found: {p}")
    if p.stat().st_size == 0:
        raise DataError(f"{what} {p} is empty")
    last: Exception | None = None
    df = None
    for enc in ("utf-8-sig", "latin-1"):
        try:
            df = pd.read_csv(p, dtype=str, keep_default_na=False, encoding=enc, header=header,
                             skipinitialspace=True)
            break
        except UnicodeDecodeError as e:
            last = e
        except pd.errors.EmptyDataError:
            raise DataError(f"{what} {p} has no rows") from None
        except pd.errors.ParserError as e:
            raise DataError(f"{what} {p} is not a well-formed CSV: {e}") from None
        except (OSError, EOFError, zlib.error) as e:  # a truncated or corrupt .gz, an unreadable file
            raise DataError(f"{what} {p} cannot be read ({type(e).__name__}: {e})") from None
    if df is None:
        raise DataError(f"{what} {p} could not be decoded: {last}")
    if header is not None:
        df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{what} {p} is missing column(s) {missing}; columns present: {list(df.columns)}")
    return df


def rows_of(df: pd.DataFrame) -> list[dict[str, str]]:
    """The rows of a table read by `read_table`, as dicts; several times faster than
    `DataFrame.to_dict("records")` on string columns, which matters at MIMIC's 377k rows."""
    cols = list(df.columns)
    return [dict(zip(cols, values)) for values in zip(*(df[c].tolist() for c in cols))]


def find_column(df: pd.DataFrame, candidates: Iterable[str]) -> str | None:
    """The first column whose name matches a candidate, ignoring case, spaces and underscores."""
    norm = {_norm(c): c for c in df.columns}
    for cand in candidates:
        hit = norm.get(_norm(cand))
        if hit is not None:
            return hit
    return None


def _norm(s: str) -> str:
    return "".join(ch for ch in str(s).lower() if ch.isalnum())


def parse_label(value: str, policy: str, path: str | os.PathLike, row: int, column: str) -> tuple[float, bool]:
    """Parse one label cell into (value, uncertain): 1/0 -> itself, -1 -> the uncertainty policy,
    blank -> NaN (not mentioned). Anything else is an error naming the cell."""
    v = str(value).strip().lower()
    if v in ("", "nan", "na", "none"):
        return math.nan, False
    if v in ("1", "1.0", "true", "yes", "positive", "pos"):
        return 1.0, False
    if v in ("0", "0.0", "false", "no", "negative", "neg"):
        return 0.0, False
    if v in ("-1", "-1.0", "uncertain", "u"):
        return {"ones": 1.0, "zeros": 0.0, "ignore": math.nan}[policy], True
    raise DataError(f"{where(path, row, column)}: label value {value!r} is not 1, 0, -1 or blank")


def parse_source_label(value: str, path: str | os.PathLike, row: int, column: str) -> float | None:
    """A label cell as the source wrote it: 1.0, 0.0, -1.0 (uncertain) or None (blank).

    Kept in a record's metadata so the source's own labels survive whatever policy mapped them.
    """
    v, uncertain = parse_label(value, "ignore", path, row, column)
    if uncertain:
        return -1.0
    return None if math.isnan(v) else v


def check_policy(policy: str) -> str:
    if policy not in UNCERTAINTY_POLICIES:
        raise ValueError(f"uncertainty policy {policy!r} is not one of {', '.join(UNCERTAINTY_POLICIES)}")
    return policy


def normalise_split(value: str, path: str | os.PathLike, row: int, column: str = "split") -> str:
    v = str(value).strip().lower()
    if v not in SPLIT_ALIASES:
        raise DataError(f"{where(path, row, column)}: split {value!r} is not one of "
                        f"{sorted(set(SPLIT_ALIASES))}")
    return SPLIT_ALIASES[v]


def hash_split(key: str, fractions: tuple[float, float, float] = (0.7, 0.1, 0.2), salt: str = "sae-cxr") -> str:
    """A stable train/val/test assignment from a key (a patient id keeps a patient in one split)."""
    h = stable_unit(key, salt)
    if h < fractions[0]:
        return "train"
    if h < fractions[0] + fractions[1]:
        return "val"
    return "test"


def stable_unit(key: str, salt: str = "sae-cxr") -> float:
    """A number in [0, 1] fixed by `key` and `salt`: the same on every machine and every run."""
    return int(hashlib.sha1(f"{salt}:{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def labels_array(values: dict[str, float], findings: Sequence[str]) -> np.ndarray:
    return np.array([values.get(f, math.nan) for f in findings], dtype=np.float32)


def resolve_image(root: Path, rel: str, path: str | os.PathLike, row: int, column: str) -> Path:
    """An image path from a table cell, relative to `root` unless absolute; it must stay a file path."""
    rel = str(rel).strip()
    if not rel:
        raise DataError(f"{where(path, row, column)}: empty image path")
    p = Path(rel)
    return p if p.is_absolute() else root / p
