"""End to end: the served dashboard in a real headless Chromium (Debian's chromium + chromedriver,
driven by selenium). Opens a pattern page and an image page by deep link, checks what a user sees,
follows a link between patterns, and saves screenshots (to $SAE_CXR_SCREENSHOTS, default
artifacts/screenshots). `make test` installs the browser; without it this test is skipped, saying why."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.app.conftest import APP

pytestmark = pytest.mark.slow
REPO = Path(APP).parents[1]


def _browser() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        reason = ("Chromium or chromedriver is not installed (Debian: apt-get install chromium chromium-driver; "
                  "`make test` does this)")
        print(f"SKIP: {reason}", file=sys.stderr)
        pytest.skip(reason)
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (it is in the dev extra: pip install -e '.[dev]')")
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run):
    """`streamlit run app/Home.py -- --run RUN` on a free local port; stopped after the tests."""
    _browser()
    port = _free_port()
    log = open(tiny_run.path.parent / "streamlit.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", APP, "--server.headless", "true", "--server.address", "127.0.0.1",
         "--server.port", str(port), "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
         "--client.toolbarMode", "viewer",
         "--", "--run", str(tiny_run.path)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"the dashboard did not start:\n{log.read()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    chromium, driver = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,2200"):
        opts.add_argument(a)
    try:
        b = webdriver.Chrome(service=Service(driver), options=opts)
    except Exception as e:  # a browser that is installed but cannot start is a failure, not a skip
        pytest.fail(f"Chromium did not start under chromedriver: {e}")
    b.set_page_load_timeout(60)
    yield b
    b.quit()


@pytest.fixture(scope="module")
def shots() -> Path:
    d = Path(os.environ.get("SAE_CXR_SCREENSHOTS", REPO / "artifacts" / "screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _texts(b, css: str) -> list[str]:
    """The text of every element matching `css`, read in one go in the page (the app re-renders freely)."""
    return b.execute_script("return Array.from(document.querySelectorAll(arguments[0])).map(e => e.textContent)", css)


def _wait_for(b, css: str, text: str | None = None, count: int = 1, timeout: float = 90) -> list[str]:
    """The texts of the elements matching `css` (containing `text`) once the app shows at least `count`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [t for t in _texts(b, css) if text is None or text in t]
        if len(found) >= count:
            return found
        time.sleep(0.3)
    raise AssertionError(f"fewer than {count} {css!r} with {text!r} after {timeout} s; the page says:\n"
                         + "\n".join(_texts(b, "h1, h2, h3, [data-testid='stAlertContainer']"))[:2000])


def _settle(b, timeout: float = 90) -> None:
    """Wait until the script run is over (streamlit shows a Stop button in its status widget meanwhile)."""
    deadline = time.monotonic() + timeout
    time.sleep(1.0)
    while time.monotonic() < deadline and _texts(b, "[data-testid='stStatusWidget']"):
        time.sleep(0.3)


def _no_exception(b) -> None:
    errs = _texts(b, "[data-testid='stException'], [data-testid='stAlertContentError']")
    assert not errs, errs


PATTERN_LINKS = "[data-testid='stPageLink-NavLink'][href^='?id='] p"
"""Links from a pattern page to other patterns (a link to the page being shown carries only its query)."""


def test_pattern_and_image_pages_by_deep_link_in_chromium(server, browser, shots, tiny_run):
    from sae_cxr.attribution import load_predictions

    b = browser
    b.get(f"{server}/?page=pattern&id=2")
    title = _wait_for(b, "h1", "Pattern 2:")[0]
    _wait_for(b, "h3", "Similar patterns")
    _wait_for(b, ".js-plotly-plot", "Activation density")
    _wait_for(b, "[data-testid='stImage'] img", count=6)  # the gallery with its maps
    similar = _wait_for(b, PATTERN_LINKS, "#", count=3)
    _settle(b)
    _no_exception(b)
    assert "Top activating images" in b.find_element("tag name", "body").text
    b.save_screenshot(str(shots / "pattern.png"))
    print(f"\nscreenshots in {shots}: pattern page {title!r}")

    # a similar pattern's link opens that pattern, and the address bar follows (a deep link again)
    target = similar[0].split()[0][1:]
    b.execute_script("""const p = Array.from(document.querySelectorAll(arguments[0])).find(e => e.textContent === arguments[1]);
                        p.closest('a').click();""", PATTERN_LINKS, similar[0])
    _wait_for(b, "h1", f"Pattern {target}:")
    _settle(b)
    _no_exception(b)
    assert f"id={target}" in b.current_url

    rid = str(load_predictions(tiny_run)[0]["record_id"].iloc[0])
    b.get(f"{server}/?page=image&id={rid}&finding=Edema")
    _wait_for(b, "h1", "Image explorer")
    _wait_for(b, ".js-plotly-plot", "Edema: the logit")
    _wait_for(b, "p", "For a clinician")
    _wait_for(b, "p", "For a lay reader")
    _settle(b)
    _no_exception(b)
    text = b.find_element("tag name", "body").text
    assert "error (not reconstructed)" in text and "The patterns behind it" in text
    assert f"id={rid}" in b.current_url and "finding=Edema" in b.current_url
    b.save_screenshot(str(shots / "image.png"))
    assert (shots / "pattern.png").stat().st_size > 10_000 and (shots / "image.png").stat().st_size > 10_000


def test_uploads_in_chromium_are_explained_or_refused_with_a_message(server, browser, shots, tiny_run, tmp_path):
    """An uploaded PNG is explained like a run image; an undecodable file gets a message, not a crash."""
    from PIL import Image

    from sae_cxr.ingest import open_run_dataset

    img = open_run_dataset(tiny_run).records[0].load_image()
    good = tmp_path / "chest.png"
    Image.fromarray((img.clip(0, 1) * 255).astype("uint8")).save(good)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")

    b = browser
    b.get(f"{server}/?page=image")
    _wait_for(b, "h1", "Image explorer")
    _settle(b)
    b.execute_script("""const l = Array.from(document.querySelectorAll("[data-testid='stRadio'] label"))
                          .find(e => e.textContent.trim() === 'upload'); l.click();""")
    _wait_for(b, "[data-testid='stFileUploaderDropzoneInput']", count=1)
    b.find_element("css selector", "[data-testid='stFileUploaderDropzoneInput']").send_keys(str(good))
    _wait_for(b, ".js-plotly-plot", "the logit, term by term")
    _wait_for(b, "p", "For a clinician")
    _settle(b)
    _no_exception(b)
    b.save_screenshot(str(shots / "upload.png"))

    b.find_element("css selector", "[data-testid='stFileUploaderDropzoneInput']").send_keys(str(bad))
    msg = _wait_for(b, "[data-testid='stAlertContentError']", "could not be read")[0]
    assert "broken.png" in msg
    assert not _texts(b, "[data-testid='stException']")

