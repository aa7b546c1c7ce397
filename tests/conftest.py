"""Shared test settings: quiet progress bars, offline hubs, deterministic torch threads."""

from __future__ import annotations

import os

os.environ.setdefault("SAE_CXR_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
