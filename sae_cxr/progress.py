"""Progress bars for long work: tqdm on a terminal, quiet in tests and when piped."""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", disable: bool | None = None,
                 **kwargs: Any) -> tqdm:
    """A tqdm bar; disabled when SAE_CXR_NO_PROGRESS is set or stderr is not a terminal and not forced."""
    if disable is None:
        disable = bool(os.environ.get("SAE_CXR_NO_PROGRESS"))
    elif not disable and os.environ.get("SAE_CXR_NO_PROGRESS"):
        disable = True
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, file=sys.stderr,
                mininterval=0.5, **kwargs)
