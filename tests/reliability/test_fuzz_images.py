"""The image loader under fuzzing: it returns an image in the convention or raises ImageReadError
naming the file; never another exception type, never a hang, never a huge allocation.

Inputs: random bytes (with and without image magic), truncations and byte flips of valid PNG,
JPEG and DICOM files, and valid images of random modes, sizes and bit depths.
"""

from __future__ import annotations

import contextlib
import io
import signal
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sae_cxr.data.images import ImageReadError, decode_image
from tests.data.dicom_fixtures import write_dicom

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff\xe0"
DICOM_PREAMBLE = b"\x00" * 128 + b"DICM"


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail instead of hanging: decoding one small input must never take this long."""
    def fire(*_):
        raise Hang(f"decoding took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def decode_or_refuse(data: bytes, name: str) -> np.ndarray | None:
    """The property every input must satisfy; returns the image when it decoded."""
    try:
        with time_limit(20):
            img = decode_image(data, name=name)
    except ImageReadError as e:
        assert name in str(e) and e.path == name and e.reason
        return None
    assert isinstance(img, np.ndarray) and img.dtype == np.float32 and img.ndim == 2
    assert img.shape[0] >= 8 and img.shape[1] >= 8
    assert np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0
    return img


# --- valid images, then broken ones ---------------------------------------------------------------

PNG_MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"]  # Pillow cannot write mode I as PNG


@st.composite
def pil_images(draw, formats=("PNG", "JPEG")):
    fmt = draw(st.sampled_from(formats))
    mode = draw(st.sampled_from(PNG_MODES if fmt == "PNG" else ["L", "RGB", "CMYK"]))
    h, w = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2 ** 16))
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        bits = draw(st.sampled_from([8, 10, 12, 14, 16]))
        arr = rng.integers(0, 2 ** bits, size=(h, w)).astype(np.uint16)
        im = Image.fromarray(arr)
    else:
        bands = {"1": 1, "L": 1, "P": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
        arr = rng.integers(0, 256, size=(h, w, bands)).astype(np.uint8)
        im = Image.fromarray(arr[..., 0] if bands == 1 else arr, mode="L" if bands == 1 else
                             {2: "LA", 3: "RGB", 4: "RGBA" if mode == "RGBA" else "CMYK"}[bands])
        if mode in ("1", "P"):
            im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return fmt, mode, (h, w), buf.getvalue(), im


@st.composite
def dicom_images(draw, tmp_dir):
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    bits = draw(st.sampled_from([8, 10, 12, 16]))
    signed = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    dtype = np.int16 if signed else (np.uint8 if bits == 8 else np.uint16)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2 ** bits)
    arr = rng.integers(lo, hi, size=(h, w)).astype(dtype)
    attrs = {}
    if draw(st.booleans()):
        attrs.update(WindowCenter=str(draw(st.integers(-100, 5000))), WindowWidth=str(draw(st.integers(-5, 5000))))
    if draw(st.booleans()):
        attrs.update(RescaleSlope=str(draw(st.sampled_from([1, 2, -1, 0.5]))), RescaleIntercept="-1024")
    path = write_dicom(tmp_dir / "f.dcm", arr, photometric=draw(st.sampled_from(["MONOCHROME1", "MONOCHROME2"])),
                       bits_stored=bits, **attrs)
    return (h, w), path.read_bytes()


@FUZZ
@given(item=pil_images())
def test_valid_png_and_jpeg_of_any_mode_size_and_depth(item):
    fmt, mode, (h, w), data, im = item
    img = decode_or_refuse(data, f"x.{fmt.lower()}")
    if h < 8 or w < 8:
        assert img is None  # refused with "at least 8x8"
        return
    assert img is not None and img.shape == (h, w)
    if fmt == "PNG" and mode == "L":  # lossless 8-bit: exactly value / 255
        np.testing.assert_allclose(img, np.asarray(im, np.float32) / 255.0, atol=1e-6)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_valid_dicom_of_any_depth_sign_window_and_rescale(tmp_path, data):
    (h, w), raw = data.draw(dicom_images(tmp_path))
    img = decode_or_refuse(raw, "x.dcm")
    assert (img is None) == (h < 8 or w < 8)
    if img is not None:
        assert img.shape == (h, w)


@FUZZ
@given(item=pil_images(), cut=st.floats(0.0, 1.0), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)),
                                                                   max_size=4))
def test_truncated_or_bit_flipped_png_and_jpeg(item, cut, flips):
    fmt, _, _, data, _ = item
    b = bytearray(data[: max(1, int(len(data) * cut))])
    for pos, x in flips:
        b[min(len(b) - 1, int(pos * len(b)))] ^= x
    decode_or_refuse(bytes(b), f"broken.{fmt.lower()}")


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data(), cut=st.floats(0.0, 1.0),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=4))
def test_truncated_or_bit_flipped_dicom(tmp_path, data, cut, flips):
    _, raw = data.draw(dicom_images(tmp_path))
    b = bytearray(raw[: max(1, int(len(raw) * cut))])
    for pos, x in flips:
        b[min(len(b) - 1, int(pos * len(b)))] ^= x
    decode_or_refuse(bytes(b), "broken.dcm")


@FUZZ
@given(prefix=st.sampled_from([b"", PNG_MAGIC, JPEG_MAGIC, DICOM_PREAMBLE, b"%!PS-Adobe-3.0 EPSF-3.0\n",
                               b"GIF89a", b"BM", b"II*\x00"]),
       body=st.binary(max_size=600), suffix=st.sampled_from([".png", ".jpg", ".dcm", ""]))
def test_random_bytes(prefix, body, suffix):
    decode_or_refuse(prefix + body, f"random{suffix}")


# --- formats outside PNG/JPEG/DICOM and decompression bombs ---------------------------------------

@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP", "EPS"])
def test_other_formats_are_refused_not_decoded(fmt):
    """Only PNG, JPEG and DICOM reach a decoder: no TIFF/WebP parser, and no Ghostscript behind EPS."""
    im = Image.fromarray(np.full((16, 16), 128, np.uint8), mode="L")
    buf = io.BytesIO()
    if fmt == "EPS":
        buf.write(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n")
    else:
        im.save(buf, format=fmt)
    with pytest.raises(ImageReadError, match="not a PNG, JPEG or DICOM image"):
        decode_image(buf.getvalue(), name=f"x.{fmt.lower()}")


def _png_header(width: int, height: int, bit_depth: int = 16, color: int = 0) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color, 0, 0, 0)
    return PNG_MAGIC + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _jpeg_header(width: int, height: int) -> bytes:
    sof = struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("make", [
    lambda: ("bomb.png", _png_header(60_000, 60_000)),
    lambda: ("bomb.png", _png_header(2 ** 31 - 1, 2 ** 31 - 1, 8, 6)),
    lambda: ("bomb.jpg", _jpeg_header(65_500, 65_500)),
    lambda: ("bomb.png", _png_header(10_001, 10_000)),
], ids=["png-60k", "png-2^31", "jpeg-65k", "png-just-over-limit"])
def test_decompression_bomb_headers_do_not_allocate(make):
    name, data = make()
    tracemalloc.start()
    try:
        with time_limit(20), pytest.raises(ImageReadError, match="limit|too large"):
            decode_image(data, name=name)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2 ** 20, f"refusing {name} allocated {peak / 2 ** 20:.0f} MiB"


def test_dicom_bomb_header_does_not_allocate(tmp_path):
    """A DICOM whose Rows x Columns x NumberOfFrames claims gigapixels is refused from the header."""
    raw = write_dicom(tmp_path / "b.dcm", np.zeros((8, 8), np.uint16), NumberOfFrames="100000000").read_bytes()
    tracemalloc.start()
    try:
        with time_limit(20), pytest.raises(ImageReadError, match="limit"):
            decode_image(raw, name="b.dcm")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2 ** 20
