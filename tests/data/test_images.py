"""Image decoding: every format lands in float32 [H, W], [0, 1], brighter = denser.

Each test writes a tiny file in the format a public data set ships (8/16-bit PNG, JPEG, DICOM
with its photometric, rescale and window attributes) and checks the decoded values, or that a
broken file fails with an ImageReadError naming it.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sae_cxr.data.images import ImageReadError, decode_image, load_image, save_png
from tests.data.dicom_fixtures import write_dicom, write_jpeg_dicom


def ramp(h: int = 16, w: int = 20, top: int = 4095, dtype=np.uint16) -> np.ndarray:
    """A ramp from 0 to `top` over the image: every value is distinct enough to check mapping."""
    return np.linspace(0, top, h * w).round().astype(dtype).reshape(h, w)


def assert_convention(img: np.ndarray, shape: tuple[int, int]) -> None:
    assert img.dtype == np.float32
    assert img.shape == shape
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0


# --- PNG and JPEG ------------------------------------------------------------------------------

def test_png_8bit_gray_maps_by_255(tmp_path: Path) -> None:
    arr = ramp(top=255, dtype=np.uint8)
    Image.fromarray(arr, mode="L").save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert_convention(img, arr.shape)
    np.testing.assert_allclose(img, arr / 255.0, atol=1e-6)


def test_png_16bit_full_range_maps_by_65535(tmp_path: Path) -> None:
    arr = ramp(top=65535)
    Image.fromarray(arr).save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert_convention(img, arr.shape)
    np.testing.assert_allclose(img, arr / 65535.0, atol=1e-6)


def test_png_12bit_data_in_16bit_container_is_not_left_black(tmp_path: Path) -> None:
    arr = ramp(top=4095)
    Image.fromarray(arr).save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    np.testing.assert_allclose(img, arr / 4095.0, atol=1e-6)
    assert img.max() == pytest.approx(1.0)


def test_save_png_round_trips_8_and_16_bit(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((12, 10)).astype(np.float32)
    x[0, 0], x[0, 1] = 0.0, 1.0  # the full range, so the 16-bit file is read as 16-bit
    save_png(x, tmp_path / "a8.png", bits=8)
    save_png(x, tmp_path / "a16.png", bits=16)
    np.testing.assert_allclose(load_image(tmp_path / "a8.png"), x, atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(load_image(tmp_path / "a16.png"), x, atol=0.5 / 65535 + 1e-6)
    with pytest.raises(ValueError, match="bits must be 8 or 16"):
        save_png(x, tmp_path / "bad.png", bits=12)


def test_jpeg_gray(tmp_path: Path) -> None:
    arr = np.full((16, 16), 60, np.uint8)
    arr[4:12, 4:12] = 200
    Image.fromarray(arr, mode="L").save(tmp_path / "a.jpg", quality=95)
    img = load_image(tmp_path / "a.jpg")
    assert_convention(img, arr.shape)
    assert abs(float(img[8, 8]) - 200 / 255) < 0.05 and abs(float(img[0, 0]) - 60 / 255) < 0.05


def test_rgb_of_equal_channels_equals_gray(tmp_path: Path) -> None:
    gray = ramp(top=255, dtype=np.uint8)
    Image.fromarray(np.stack([gray] * 3, axis=-1), mode="RGB").save(tmp_path / "rgb.png")
    np.testing.assert_allclose(load_image(tmp_path / "rgb.png"), gray / 255.0, atol=1e-5)


def test_rgb_uses_luminance_weights(tmp_path: Path) -> None:
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[..., 1] = 255  # pure green
    Image.fromarray(arr, mode="RGB").save(tmp_path / "g.png")
    np.testing.assert_allclose(load_image(tmp_path / "g.png"), 0.587, atol=1e-5)


def test_rgba_composites_over_black(tmp_path: Path) -> None:
    arr = np.full((8, 8, 4), 255, np.uint8)
    arr[:4, :, 3] = 0  # top half fully transparent
    arr[4:, :, 3] = 255
    Image.fromarray(arr, mode="RGBA").save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert_convention(img, (8, 8))
    np.testing.assert_allclose(img[:4], 0.0, atol=1e-6)
    np.testing.assert_allclose(img[4:], 1.0, atol=1e-5)


def test_gray_with_alpha(tmp_path: Path) -> None:
    la = np.zeros((8, 8, 2), np.uint8)
    la[..., 0] = 200
    la[..., 1] = 255
    la[0, :, 1] = 0
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    img = load_image(tmp_path / "la.png")
    np.testing.assert_allclose(img[1:], 200 / 255, atol=1e-5)
    np.testing.assert_allclose(img[0], 0.0, atol=1e-6)


def test_palette_png_maps_through_its_palette(tmp_path: Path) -> None:
    idx = np.zeros((8, 8), np.uint8)
    idx[:, 4:] = 1
    im = Image.fromarray(idx, mode="P")
    im.putpalette([10, 10, 10, 250, 250, 250] + [0, 0, 0] * 254)
    im.save(tmp_path / "p.png")
    img = load_image(tmp_path / "p.png")
    np.testing.assert_allclose(img[:, :4], 10 / 255, atol=1e-5)
    np.testing.assert_allclose(img[:, 4:], 250 / 255, atol=1e-5)


def test_palette_png_with_transparent_index_reads_as_air(tmp_path: Path) -> None:
    idx = np.zeros((8, 8), np.uint8)
    idx[:, 4:] = 1
    im = Image.fromarray(idx, mode="P")
    im.putpalette([250, 250, 250, 250, 250, 250] + [0, 0, 0] * 254)
    im.save(tmp_path / "p.png", transparency=1)
    img = load_image(tmp_path / "p.png")
    np.testing.assert_allclose(img[:, :4], 250 / 255, atol=1e-5)
    np.testing.assert_allclose(img[:, 4:], 0.0, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(h=st.integers(8, 24), w=st.integers(8, 24), seed=st.integers(0, 2 ** 16), sixteen=st.booleans())
def test_any_png_decodes_into_the_convention(h: int, w: int, seed: int, sixteen: bool) -> None:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 65536 if sixteen else 256, size=(h, w)).astype(np.uint16 if sixteen else np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    img = decode_image(buf.getvalue(), name="x.png")
    assert_convention(img, (h, w))
    # Order is preserved: decoding is a monotone map of the stored values.
    flat, vals = arr.ravel().astype(np.int64), img.ravel()
    order = np.argsort(flat, kind="stable")
    assert np.all(np.diff(vals[order]) >= -1e-7)


# --- DICOM --------------------------------------------------------------------------------------

def test_dicom_monochrome2_without_window_uses_its_range(tmp_path: Path) -> None:
    arr = ramp(top=3000) + 500
    img = load_image(write_dicom(tmp_path / "a.dcm", arr))
    assert_convention(img, arr.shape)
    np.testing.assert_allclose(img, (arr - 500.0) / 3000.0, atol=1e-6)


def test_dicom_monochrome1_equals_monochrome2_after_inversion(tmp_path: Path) -> None:
    arr = ramp(top=4095)
    m2 = load_image(write_dicom(tmp_path / "m2.dcm", arr, photometric="MONOCHROME2"))
    m1 = load_image(write_dicom(tmp_path / "m1.dcm", (4095 - arr).astype(np.uint16), photometric="MONOCHROME1"))
    np.testing.assert_allclose(m1, m2, atol=1e-6)
    assert m1[-1, -1] > m1[0, 0]  # bone stays white


def test_dicom_monochrome1_equals_monochrome2_with_window(tmp_path: Path) -> None:
    arr = ramp(top=4095)
    # A LINEAR window on inverted data is centred at 4096 - c (PS3.3 C.11.2.1.2.1 uses c - 0.5).
    m2 = load_image(write_dicom(tmp_path / "m2.dcm", arr, WindowCenter=1500, WindowWidth=2001))
    m1 = load_image(write_dicom(tmp_path / "m1.dcm", (4095 - arr).astype(np.uint16), photometric="MONOCHROME1",
                                WindowCenter=4096 - 1500, WindowWidth=2001))
    np.testing.assert_allclose(m1, m2, atol=1e-6)
    assert (m2 == 0).any() and (m2 == 1).any()  # the window clips both ends


def test_dicom_linear_window_follows_the_standard(tmp_path: Path) -> None:
    arr = ramp(top=4095)
    img = load_image(write_dicom(tmp_path / "w.dcm", arr, WindowCenter=2048, WindowWidth=1025))
    expected = np.clip((arr - 2047.5) / 1024.0 + 0.5, 0, 1)
    np.testing.assert_allclose(img, expected, atol=1e-6)


def test_dicom_multivalued_window_uses_the_first(tmp_path: Path) -> None:
    arr = ramp(top=4095)
    img = load_image(write_dicom(tmp_path / "w.dcm", arr, WindowCenter=[2048, 100], WindowWidth=[1025, 50]))
    np.testing.assert_allclose(img, np.clip((arr - 2047.5) / 1024.0 + 0.5, 0, 1), atol=1e-6)


def test_dicom_linear_exact_and_sigmoid_windows(tmp_path: Path) -> None:
    arr = ramp(top=4095)
    exact = load_image(write_dicom(tmp_path / "e.dcm", arr, WindowCenter=2000, WindowWidth=1000,
                                   VOILUTFunction="LINEAR_EXACT"))
    np.testing.assert_allclose(exact, np.clip((arr - 2000.0) / 1000.0 + 0.5, 0, 1), atol=1e-6)
    sig = load_image(write_dicom(tmp_path / "s.dcm", arr, WindowCenter=2000, WindowWidth=1000,
                                 VOILUTFunction="SIGMOID"))
    np.testing.assert_allclose(sig, 1 / (1 + np.exp(-4 * (arr - 2000.0) / 1000.0)), atol=1e-6)


def test_dicom_window_is_applied_in_rescaled_units(tmp_path: Path) -> None:
    """Regression: the window is given in modality units (after slope/intercept), and the output
    range must not depend on the stored bit depth; the old code left such images clipped."""
    stored = ramp(top=4095)
    hu = 2.0 * stored - 1000.0
    img = load_image(write_dicom(tmp_path / "r.dcm", stored, RescaleSlope=2, RescaleIntercept=-1000,
                                 WindowCenter=0, WindowWidth=2001))
    np.testing.assert_allclose(img, np.clip((hu + 0.5) / 2000.0 + 0.5, 0, 1), atol=1e-6)
    assert ((img > 0) & (img < 1)).mean() > 0.2  # a quarter of the ramp lies inside the window


def test_dicom_negative_rescale_slope_inverts(tmp_path: Path) -> None:
    stored = ramp(top=4095)
    img = load_image(write_dicom(tmp_path / "n.dcm", stored, RescaleSlope=-1, RescaleIntercept=4095))
    np.testing.assert_allclose(img, 1.0 - stored / 4095.0, atol=1e-6)


def test_dicom_signed_pixels(tmp_path: Path) -> None:
    stored = (ramp(top=4000).astype(np.int32) - 2000).astype(np.int16)
    img = load_image(write_dicom(tmp_path / "s.dcm", stored, bits_stored=16, WindowCenter=0, WindowWidth=2001))
    np.testing.assert_allclose(img, np.clip((stored + 0.5) / 2000.0 + 0.5, 0, 1), atol=1e-6)


def test_dicom_unusable_window_falls_back_to_full_range(tmp_path: Path) -> None:
    arr = ramp(top=4095)
    img = load_image(write_dicom(tmp_path / "z.dcm", arr, WindowCenter=2048, WindowWidth=0))
    np.testing.assert_allclose(img, arr / 4095.0, atol=1e-6)


def test_dicom_voi_lut_sequence(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    arr = ramp(top=255)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 10]
    lut = np.minimum(1023, 8 * np.arange(256)).astype("<u2")  # steep LUT, saturating at 128
    item.add_new(0x00283006, "OW", lut.tobytes())  # LUT Data, as most writers store it
    img = load_image(write_dicom(tmp_path / "l.dcm", arr, bits_stored=8, VOILUTSequence=Sequence([item])))
    np.testing.assert_allclose(img, np.minimum(1023, 8 * arr.astype(float)) / 1023.0, atol=1e-6)


def test_dicom_jpeg_baseline_decodes(tmp_path: Path) -> None:
    arr = np.full((16, 16), 40, np.uint8)
    arr[4:12, 4:12] = 220
    img = load_image(write_jpeg_dicom(tmp_path / "j.dcm", arr))
    assert_convention(img, arr.shape)
    assert float(img[8, 8]) > 0.9 and float(img[0, 0]) < 0.1  # min-max of 40..220


def test_dicom_recognised_by_magic_whatever_the_name(tmp_path: Path) -> None:
    arr = ramp(top=4095)
    data = write_dicom(tmp_path / "a.dcm", arr).read_bytes()
    np.testing.assert_allclose(decode_image(data, name="noext"), arr / 4095.0, atol=1e-6)


# --- broken input -------------------------------------------------------------------------------

def _raises_naming(path: Path, match: str) -> ImageReadError:
    with pytest.raises(ImageReadError, match=match) as info:
        load_image(path)
    assert str(path) in str(info.value) and info.value.path == str(path)
    return info.value


def test_missing_file_directory_and_empty_file(tmp_path: Path) -> None:
    _raises_naming(tmp_path / "nope.png", "does not exist")
    (tmp_path / "dir.png").mkdir()
    _raises_naming(tmp_path / "dir.png", "not a regular file")
    (tmp_path / "empty.png").write_bytes(b"")
    _raises_naming(tmp_path / "empty.png", "empty")


def test_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_text("Image Index,Finding Labels\n")
    _raises_naming(tmp_path / "a.png", "not a PNG, JPEG or DICOM")


@pytest.mark.parametrize("fmt,suffix", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_png_and_jpeg(tmp_path: Path, fmt: str, suffix: str) -> None:
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64)).astype(np.uint8), mode="L").save(buf, format=fmt)
    path = tmp_path / f"t.{suffix}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _raises_naming(path, "corrupt or truncated")


def test_corrupt_png_data(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(ramp(top=255, dtype=np.uint8), mode="L").save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    idat = data.index(b"IDAT") + 4
    data[idat:idat + 20] = b"\xff" * 20  # garbage in the compressed stream
    path = tmp_path / "c.png"
    path.write_bytes(bytes(data))
    _raises_naming(path, "corrupt or truncated")


def test_truncated_dicom_pixel_data(tmp_path: Path) -> None:
    data = write_dicom(tmp_path / "a.dcm", ramp(top=4095)).read_bytes()
    path = tmp_path / "t.dcm"
    path.write_bytes(data[:-200])
    _raises_naming(path, "DICOM")


def test_garbage_with_dicom_suffix(tmp_path: Path) -> None:
    path = tmp_path / "g.dcm"
    path.write_bytes(bytes(np.random.default_rng(2).integers(0, 256, 300, dtype=np.uint8)))
    _raises_naming(path, "DICOM")


def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    src = write_dicom(tmp_path / "a.dcm", ramp(top=4095))
    import pydicom

    ds = pydicom.dcmread(src)
    del ds.PixelData
    ds.save_as(tmp_path / "np.dcm")
    _raises_naming(tmp_path / "np.dcm", "no pixel data")


def test_tiny_images_refused(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 30), np.uint8), mode="L").save(tmp_path / "t.png")
    _raises_naming(tmp_path / "t.png", "at least 8x8")
    write_dicom(tmp_path / "t.dcm", np.zeros((30, 4), np.uint16))
    _raises_naming(tmp_path / "t.dcm", "at least 8x8")


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [12_000, 20_000])
def test_huge_images_refused_before_decoding(tmp_path: Path, side: int) -> None:
    """12k x 12k passes Pillow's own bomb check but not ours; 20k x 20k trips Pillow's first."""
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header_only(side, side))
    _raises_naming(path, "limit|too large")


def test_unreadable_file_is_an_image_read_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Permission and I/O errors (which root never sees from chmod) surface as ImageReadError."""
    path = tmp_path / "locked.png"
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(path)

    def refuse(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    _raises_naming(path, "cannot read the file \\(Permission denied\\)")
