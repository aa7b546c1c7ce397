"""Pictures people look at: contact sheets with labelled boxes, heatmap overlays, PNG bytes.

Shared by the CLI previews, the batch reports and the dashboard, so an image, its boxes and
its heatmaps look the same everywhere.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sae_cxr.data.base import Box
from sae_cxr.findings import CONCEPTS

CATEGORY_COLORS: dict[str, tuple[int, int, int]] = {
    "cardiac": (230, 57, 70), "pulmonary": (69, 123, 157), "pleural": (42, 157, 143),
    "structural": (233, 196, 106), "device": (244, 162, 97), "artifact": (181, 101, 208),
    "finding": (255, 80, 80), "other": (200, 200, 200),
}


def box_color(label: str) -> tuple[int, int, int]:
    c = CONCEPTS.get(label)
    return CATEGORY_COLORS[c.category] if c else CATEGORY_COLORS["finding"]


def to_rgb(image: np.ndarray, scale: int = 1) -> Image.Image:
    """A [H, W] float image in [0, 1] as an RGB PIL image, nearest-neighbour upscaled."""
    arr = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    im = Image.fromarray(arr, mode="L").convert("RGB")
    if scale != 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    return im


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_boxes(im: Image.Image, boxes: Sequence[Box], scale: float = 1.0, labels: bool = True) -> Image.Image:
    """Draw boxes (in source-image pixels) with their labels onto a copy of `im`."""
    im = im.copy()
    d = ImageDraw.Draw(im)
    font = _font(max(9, int(10 * max(scale, 1) / 1.5)))
    for b in boxes:
        col = box_color(b.label)
        x0, y0 = b.x * scale, b.y * scale
        x1, y1 = (b.x + b.w) * scale, (b.y + b.h) * scale
        d.rectangle([x0, y0, x1, y1], outline=col, width=max(1, int(scale)))
        if labels:
            text = b.label.replace("_", " ")
            tw = d.textlength(text, font=font)
            ty = max(y0 - 11, 0)
            d.rectangle([x0, ty, x0 + tw + 3, ty + 11], fill=(0, 0, 0))
            d.text((x0 + 1, ty), text, fill=col, font=font)
    return im


def heatmap_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45, scale: int = 1,
                    vmax: float | None = None) -> Image.Image:
    """Overlay a non-negative heatmap (any resolution) on a grayscale image with a perceptual colormap."""
    from matplotlib import colormaps

    base = to_rgb(image, scale)
    h = np.asarray(heat, dtype=np.float32)
    h = np.clip(h, 0, None)
    top = vmax if vmax is not None else float(h.max())
    h = h / top if top > 0 else np.zeros_like(h)
    hm = Image.fromarray((np.clip(h, 0, 1) * 255).astype(np.uint8), mode="L").resize(base.size, Image.BILINEAR)
    rgba = colormaps["inferno"](np.asarray(hm, dtype=np.float32) / 255.0)
    color = Image.fromarray((rgba[..., :3] * 255).astype(np.uint8), mode="RGB")
    mask = Image.fromarray((np.asarray(hm, dtype=np.float32) * alpha).astype(np.uint8), mode="L")
    return Image.composite(color, base, mask)


def contact_sheet(tiles: Sequence[Image.Image], titles: Sequence[str] | None = None, cols: int = 4,
                  pad: int = 4, title_height: int = 14, background: tuple[int, int, int] = (24, 24, 24)) -> Image.Image:
    """Lay tiles out in a grid with an optional title above each."""
    if not tiles:
        raise ValueError("a contact sheet needs at least one tile")
    tw = max(t.width for t in tiles)
    th = max(t.height for t in tiles)
    cols = max(1, min(cols, len(tiles)))
    rows = (len(tiles) + cols - 1) // cols
    cell_h = th + (title_height if titles else 0)
    sheet = Image.new("RGB", (cols * (tw + pad) + pad, rows * (cell_h + pad) + pad), background)
    d = ImageDraw.Draw(sheet)
    font = _font(11)
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        x = pad + c * (tw + pad)
        y = pad + r * (cell_h + pad)
        if titles:
            d.text((x + 2, y), titles[k][: max(8, tw // 6)], fill=(235, 235, 235), font=font)
            y += title_height
        sheet.paste(t, (x, y))
    return sheet


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
