"""Serving safety: run names and upload names cannot leave artifacts/ or the upload directory,
uploads are limited, the dashboard binds to localhost, and secrets are masked in logs."""

from __future__ import annotations

import io
import logging
import os
import stat

import numpy as np
import pytest
from PIL import Image

from sae_cxr.run import RunDir
from sae_cxr.serving import (SecretFilter, UploadDir, UploadError, UploadLimits, bind_address, decode_upload,
                             open_run_checked, redact, safe_upload_name, streamlit_flags)

KEY = "sk-test-PLANTED-7f3a9c1e5b2d4f60"


def _png(size: tuple[int, int] = (16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full(size[::-1], 90, np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def artifacts(tmp_path):
    root = tmp_path / "artifacts"
    RunDir(root / "good", create=True)
    outside = RunDir(tmp_path / "secret-run", create=True)
    (root / "link").symlink_to(outside.path)  # a symlink inside artifacts/ leading out of it
    return root


@pytest.mark.parametrize("name", ["../secret-run", "..", ".", "/etc", "a/b", "good/../../secret-run", "",
                                  "good\x00", "link", "-rf", "good\n"])
def test_run_names_cannot_escape_artifacts(artifacts, name):
    with pytest.raises(ValueError) as info:
        open_run_checked(artifacts, name)
    msg = str(info.value)
    assert any(why in msg for why in ("is not allowed", "outside", "does not exist")), msg


def test_a_real_run_opens_and_a_missing_one_is_named(artifacts):
    assert open_run_checked(artifacts, "good").path == (artifacts / "good").resolve()
    with pytest.raises(ValueError, match="'nope' does not exist"):
        open_run_checked(artifacts, "nope")


def test_run_subpaths_cannot_escape_the_run(artifacts):
    run = open_run_checked(artifacts, "good")
    for rel in ("../link", "../../secret-run/manifest.json", "/etc/passwd"):
        with pytest.raises(ValueError, match="escapes the run directory"):
            run.sub(rel)


@pytest.mark.parametrize("name, expected", [
    ("chest.png", "chest.png"),
    ("../../etc/cron.d/evil.png", "evil.png"),
    ("..\\..\\windows\\evil.JPG", "evil.jpg"),
    ("/abs/path/scan.dcm", "scan.dcm"),
    ("...hidden.png", "hidden.png"),
    ("my scan (1).jpeg", "my_scan_1_.jpeg"),
    ("radiografía.png", "radiografia.png"),
    ("nul\x00byte.png", "nulbyte.png"),
    ("ctrl\n\r\tchars.png", "ctrl_chars.png"),
    ("a" * 500 + ".png", "a" * 96 + ".png"),
    (".png", "upload.png"),
])
def test_upload_names_are_reduced_to_a_safe_base_name(name, expected):
    assert safe_upload_name(name) == expected


@pytest.mark.parametrize("name", ["evil.sh", "x.png.exe", "noext", "", "   ", "../", "x.svg", "x.html"])
def test_upload_names_without_an_image_suffix_are_refused(name):
    with pytest.raises(UploadError, match="upload"):
        safe_upload_name(name)


def test_uploads_stay_in_a_private_directory_that_is_removed(tmp_path):
    with UploadDir(parent=str(tmp_path)) as d:
        assert stat.S_IMODE(os.stat(d.path).st_mode) == 0o700
        paths = [d.save(n, _png()) for n in ("../../escape.png", "escape.png", "/tmp/escape.png")]
        assert [p.name for p in paths] == ["escape.png", "escape-1.png", "escape-2.png"]
        assert all(p.parent == d.path for p in paths)
        assert stat.S_IMODE(os.stat(paths[0]).st_mode) == 0o600
        where = d.path
    assert not where.exists()
    assert not (tmp_path / "escape.png").exists() and list(tmp_path.iterdir()) == []


def test_a_planted_symlink_in_the_upload_directory_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    with UploadDir(parent=str(tmp_path)) as d:
        (d.path / "scan.png").symlink_to(victim)
        p = d.save("scan.png", _png())
        assert p.name == "scan-1.png" and not p.is_symlink()
    assert victim.read_text() == "keep me"


def test_upload_size_and_count_limits(tmp_path):
    limits = UploadLimits(max_bytes=1000, max_files=2)
    with UploadDir(limits=limits, parent=str(tmp_path)) as d:
        with pytest.raises(UploadError, match=r"big.png is .* above the limit of 0 MiB; downscale"):
            d.save("big.png", b"\x00" * 1001)
        with pytest.raises(UploadError, match="empty.png is empty"):
            d.save("empty.png", b"")
        d.save("a.png", _png())
        d.save("b.png", _png())
        with pytest.raises(UploadError, match="at most 2 uploads"):
            d.save("c.png", _png())


def test_decode_upload_in_memory_and_refusals():
    img = decode_upload("../x.png", _png((20, 12)))
    assert img.shape == (12, 20) and img.dtype == np.float32
    with pytest.raises(UploadError, match="x.png cannot be used: .*corrupt or truncated"):
        decode_upload("x.png", _png((64, 64))[:60])
    with pytest.raises(UploadError, match="not a PNG, JPEG or DICOM"):
        decode_upload("x.png", b"GIF89a" + b"\x00" * 100)


def test_dashboard_binds_to_localhost_unless_remote_is_named(monkeypatch):
    monkeypatch.delenv("SAE_CXR_HOST", raising=False)
    assert bind_address() == "127.0.0.1"
    with pytest.raises(ValueError, match="refusing to serve on '0.0.0.0'"):
        bind_address("0.0.0.0")
    monkeypatch.setenv("SAE_CXR_HOST", "0.0.0.0")
    with pytest.raises(ValueError, match="allow-remote"):
        bind_address()
    assert bind_address("0.0.0.0", allow_remote=True) == "0.0.0.0"
    flags = streamlit_flags("localhost", limits=UploadLimits(max_bytes=20 * 2 ** 20))
    assert flags[flags.index("--server.address") + 1] == "localhost"
    assert flags[flags.index("--server.maxUploadSize") + 1] == "20"


def test_secrets_are_masked_in_logs_and_text(monkeypatch, caplog):
    monkeypatch.setenv("SAE_CXR_TEST_API_KEY", KEY)
    assert KEY not in redact(f"calling with {KEY}") and "***" in redact(f"x {KEY} y")
    assert redact("Authorization: Bearer abcdefghijklmnop123") == "Authorization: Bearer ***"
    assert redact("pattern 17 fires on pacemakers") == "pattern 17 fires on pacemakers"
    log = logging.getLogger("sae_cxr.test_secrets")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(SecretFilter())
    log.addHandler(handler)
    try:
        log.warning("request failed with key %s", KEY)
        try:
            raise RuntimeError(f"server said: Incorrect API key provided: {KEY}")
        except RuntimeError:
            log.exception("labeling failed")
    finally:
        log.removeHandler(handler)
    out = stream.getvalue()
    assert "request failed with key ***" in out and "Incorrect API key provided: ***" in out
    assert KEY not in out
