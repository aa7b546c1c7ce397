"""Image decoding into one convention: float32 [H, W] in [0, 1], brighter = denser.

PNG and JPEG (8- or 16-bit, grayscale, RGB, RGBA, palette) go through Pillow; DICOM goes
through pydicom with the modality LUT, the file's VOI windowing and MONOCHROME1 inversion, so
a DICOM from RSNA and a PNG from NIH land in the same convention. Any failure to decode,
whatever the library raised, becomes an ImageReadError that names the file.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np

DICOM_SUFFIXES = {".dcm", ".dicom"}
PILLOW_FORMATS = ("PNG", "JPEG")
"""The only formats handed to Pillow: its other parsers (TIFF, WebP, PSD, ...) are attack surface a
radiograph does not need, and EPS would run Ghostscript on the bytes."""
MAX_PIXELS = 10_000 * 10_000  # larger images are refused rather than exhausting memory


class ImageReadError(ValueError):
    """An image that cannot be decoded; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"image is not readable: {self.path}: {reason}")


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file (PNG, JPEG, DICOM) into float32 [H, W] in [0, 1]."""
    p = Path(path)
    if not p.exists():
        raise ImageReadError(p, "file does not exist")
    if not p.is_file():
        raise ImageReadError(p, "not a regular file")
    try:
        data = p.read_bytes()
    except OSError as e:  # permissions, a file vanishing mid-run, I/O errors on network storage
        raise ImageReadError(p, f"cannot read the file ({e.strerror or e})") from None
    return decode_image(data, name=str(p))


def image_problem(path: str | os.PathLike, decode: bool = False) -> str | None:
    """Why an image cannot be used ("does not exist", "is not readable (...)"), or None.

    Adapters call this for every row: a stat by default (cheap on 377k files), a full decode
    when asked, so bad files are found when the data set is opened rather than mid-training.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        return f"cannot be accessed ({e.strerror or e})"
    if not stat.S_ISREG(st.st_mode):
        return "is not a file"
    if decode:
        try:
            load_image(path)
        except ImageReadError as e:
            return f"is not readable ({e.reason})"
    return None


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode image bytes; `name` is used in error messages and to recognise DICOM by suffix."""
    if len(data) == 0:
        raise ImageReadError(name, "file is empty")
    if _looks_like_dicom(data) or Path(name).suffix.lower() in DICOM_SUFFIXES:
        return _decode_dicom(data, name)
    return _decode_pillow(data, name)


def _looks_like_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def _decode_pillow(data: bytes, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ImageReadError(name, f"image is {im.width}x{im.height}, above the limit of "
                                           f"{MAX_PIXELS} pixels")
            im.load()
            arr = _pillow_to_gray(im)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(name, "not a PNG, JPEG or DICOM image") from None
    except Image.DecompressionBombError as e:  # Pillow refuses very large images before we can
        raise ImageReadError(name, f"image is too large to decode ({e})") from None
    except Exception as e:  # corrupt bytes surface as OSError, SyntaxError, struct.error, EOFError, ...
        raise ImageReadError(name, f"corrupt or truncated image ({type(e).__name__}: {e})") from None
    return _finish(arr, name)


def _pillow_to_gray(im) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(im, dtype=np.uint16).astype(np.float32)
        return arr / _integer_range(arr)
    if mode == "I":
        arr = np.asarray(im, dtype=np.int64).astype(np.float64)
        lo = min(float(arr.min()), 0.0)
        return ((arr - lo) / max(_integer_range(arr - lo), 1.0)).astype(np.float32)
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if mode == "P" and "transparency" in im.info:
        mode = "PA"  # a palette with a transparent index composites like RGBA
    if mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA" if mode != "LA" else "LA")
        arr = np.asarray(im, dtype=np.float32) / 255.0
        alpha = arr[..., -1:]
        color = arr[..., :-1]
        gray = color.mean(axis=-1) if color.shape[-1] == 1 else _luminance(color)
        return gray * alpha[..., 0]  # composite over black: transparent areas read as air
    if mode == "L":
        return np.asarray(im, dtype=np.float32) / 255.0
    if mode == "1":
        return np.asarray(im, dtype=np.float32)
    rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return _luminance(rgb)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _integer_range(arr: np.ndarray) -> float:
    """Full scale of integer pixel data: 8, 10, 12, 14 or 16 bits, inferred from the maximum.

    Many 16-bit radiographs store 12 bits; dividing those by 65535 would leave them black.
    """
    peak = float(arr.max()) if arr.size else 0.0
    bits = 8
    while (2 ** bits - 1) < peak and bits < 16:
        bits += 2
    return float(2 ** bits - 1)


def _decode_dicom(data: bytes, name: str) -> np.ndarray:
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut
    except ImportError as e:  # pragma: no cover - pydicom is a dependency
        raise ImageReadError(name, f"pydicom is required to read DICOM ({e})") from None
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as e:  # force=True parses arbitrary bytes: struct, EOF, value and type errors all occur
        raise ImageReadError(name, f"corrupt DICOM header ({type(e).__name__}: {e})") from None
    if "PixelData" not in ds:
        raise ImageReadError(name, "DICOM file has no pixel data")
    try:
        rows, cols = int(getattr(ds, "Rows", 0)), int(getattr(ds, "Columns", 0))
        frames = max(1, int(getattr(ds, "NumberOfFrames", 1) or 1))
        samples = max(1, int(getattr(ds, "SamplesPerPixel", 1) or 1))
    except (TypeError, ValueError):
        raise ImageReadError(name, "DICOM Rows/Columns/NumberOfFrames/SamplesPerPixel are not integers") from None
    if rows * cols * frames * samples > MAX_PIXELS:  # pydicom would allocate all frames before we pick one
        raise ImageReadError(name, f"image is {cols}x{rows} x {frames} frame(s) x {samples} sample(s), above the "
                                   f"limit of {MAX_PIXELS} pixels")
    try:
        raw = ds.pixel_array
    except Exception as e:  # pydicom raises many types for truncated or unsupported pixel data
        raise ImageReadError(name, f"cannot decode DICOM pixel data ({type(e).__name__}: {e})") from None
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if raw.ndim == 3 and raw.shape[-1] in (3, 4) and not photometric.startswith("MONOCHROME"):
        arr = _luminance(raw[..., :3].astype(np.float32))
        lo, hi = float(arr.min()), float(arr.max())
        return _finish((arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr), name)
    if raw.ndim == 3:  # multi-frame: the first frame is the radiograph
        raw = raw[0]
    try:
        arr = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
        out = _apply_voi(arr, ds)
    except ImageReadError:
        raise
    except Exception as e:  # malformed LUT or window attributes
        raise ImageReadError(name, f"cannot apply the DICOM rescale/LUT ({type(e).__name__}: {e})") from None
    if photometric == "MONOCHROME1":  # high values are dark: invert into our convention
        out = 1.0 - out
    return _finish(out.astype(np.float32), name)


def _apply_voi(arr: np.ndarray, ds) -> np.ndarray:
    """The VOI transform (PS3.3 C.11.2) into [0, 1], applied to modality-LUT output.

    We compute the window ourselves instead of rescaling pydicom's output: pydicom maps a
    window onto the rescaled stored-value range, which depends on slope, intercept and bit
    depth, and getting that range wrong silently clips or darkens the image. A VOI LUT
    sequence is preferred over a window (as pydicom does); a window whose width is unusable is
    ignored and the image's own range is used, because a bad display hint should not make a
    readable radiograph unreadable.
    """
    if ds.get("VOILUTSequence"):
        from pydicom.pixels import apply_voi

        item = ds.VOILUTSequence[0]
        n_entries = int(item.LUTDescriptor[0]) or 2 ** 16
        first = int(item.LUTDescriptor[1])
        table = np.asarray(apply_voi(np.arange(first, first + n_entries, dtype=np.int64), ds), dtype=np.float64)
        mapped = np.asarray(apply_voi(np.rint(arr).astype(np.int64), ds), dtype=np.float64)
        return _scale(mapped, float(table.min()), float(table.max()))
    window = _window_of(ds)
    if window is None:
        return _scale(arr, float(arr.min()), float(arr.max()))
    center, width, func = window
    if func == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (arr - center) / width))
    if func == "LINEAR_EXACT":
        return np.clip((arr - center) / width + 0.5, 0.0, 1.0)
    # LINEAR: PS3.3 C.11.2.1.2.1, with width 1 a threshold at center - 0.5
    if width == 1.0:
        return (arr > center - 0.5).astype(np.float64)
    return np.clip((arr - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _window_of(ds) -> tuple[float, float, str] | None:
    """(center, width, function) of the first window in the file, or None when absent or unusable."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    try:
        center = float(_first(ds.WindowCenter))
        width = float(_first(ds.WindowWidth))
    except (TypeError, ValueError, IndexError):
        return None
    func = str(getattr(ds, "VOILUTFunction", "") or "LINEAR").strip().upper()
    if func not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        func = "LINEAR"
    min_width = 1.0 if func == "LINEAR" else 0.0
    if not (np.isfinite(center) and np.isfinite(width)) or width < min_width or width == 0.0:
        return None
    return center, width, func


def _first(value):
    from pydicom.multival import MultiValue

    return value[0] if isinstance(value, (MultiValue, list, tuple)) else value


def _scale(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(arr)


def _finish(arr: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim != 2:
        raise ImageReadError(name, f"expected a 2-D image after conversion, got shape {arr.shape}")
    if arr.shape[0] < 8 or arr.shape[1] < 8:
        raise ImageReadError(name, f"image is {arr.shape[1]}x{arr.shape[0]} pixels; at least 8x8 is needed")
    if not np.isfinite(arr).all():
        raise ImageReadError(name, "image contains NaN or infinite pixel values")
    return np.clip(arr, 0.0, 1.0, out=arr)


def save_png(image: np.ndarray, path: str | os.PathLike, bits: int = 8) -> None:
    """Write a [H, W] float image in [0, 1] as an 8- or 16-bit grayscale PNG."""
    from PIL import Image

    img = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    if bits == 8:
        Image.fromarray((img * 255.0 + 0.5).astype(np.uint8), mode="L").save(path, format="PNG")
    elif bits == 16:
        Image.fromarray((img * 65535.0 + 0.5).astype(np.uint16)).save(path, format="PNG")
    else:
        raise ValueError(f"bits must be 8 or 16, got {bits}")
