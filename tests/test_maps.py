"""Localization metrics pinned on hand-built maps and boxes."""

from __future__ import annotations

import numpy as np
import pytest

from sae_cxr.backbones.base import Letterbox
from sae_cxr.data.base import Box
from sae_cxr.maps import (LocalizationScores, describe_location, iobb, peak_location, pixel_auprc, pointing_game,
                          predicted_box, to_image)


def test_pointing_game_and_iobb():
    heat = np.zeros((10, 10))
    heat[2:4, 6:8] = 1.0
    box = [Box("x", 5, 1, 4, 4)]  # covers columns 5..8, rows 1..4
    assert pointing_game(heat, box)
    assert not pointing_game(heat, [Box("x", 0, 0, 3, 3)])
    assert predicted_box(heat) == (6, 2, 8, 4)
    assert iobb((6, 2, 8, 4), box) == pytest.approx(1.0)  # predicted box fully inside
    # predicted box 4x2=8 px, half of it inside a GT box covering columns 6..7
    assert iobb((4, 2, 8, 4), [Box("x", 6, 0, 2, 10)]) == pytest.approx(0.5)


def test_pixel_auprc_perfect_and_chance():
    heat = np.zeros((8, 8))
    heat[:4] = 1.0
    assert pixel_auprc(heat, [Box("x", 0, 0, 8, 4)]) == pytest.approx(1.0)
    flat = np.ones((8, 8))
    assert pixel_auprc(flat, [Box("x", 0, 0, 8, 4)]) == pytest.approx(0.5)


def test_scores_accumulate():
    s = LocalizationScores.empty()
    heat = np.zeros((10, 10))
    heat[5, 5] = 1
    s.add(heat, [Box("x", 4, 4, 3, 3)])
    s.add(heat, [Box("x", 0, 0, 2, 2)])
    out = s.summary()
    assert out["n"] == 2 and out["pointing_game"] == 0.5


def test_upsampling_undoes_the_letterbox():
    # a 20x40 source letterboxed into 40x40: 10 px of padding above and below
    lb = Letterbox(scale=1.0, pad_x=0.0, pad_y=10.0, src_w=40, src_h=20)
    grid = np.zeros((4, 4))
    grid[1, 3] = 1.0  # model rows 10..20 -> source rows 0..10, right column
    img = to_image(grid, lb, 40)
    assert img.shape == (20, 40)
    y, x = np.unravel_index(np.argmax(img), img.shape)
    assert x >= 30 and y < 10


def test_location_names_follow_radiological_convention():
    assert describe_location(0.3, 0.7) == "right lower zone"  # image left = patient right
    assert describe_location(0.7, 0.2) == "left upper zone"
    assert describe_location(0.5, 0.45).startswith("midline")
    assert describe_location(0.95, 0.03).startswith("image border")
    g = np.zeros((4, 4))
    g[3, 0] = 2.0
    assert peak_location(g) == "right lower zone"
    assert peak_location(np.zeros((4, 4))) is None
