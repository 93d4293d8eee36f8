"""Headless Chromium for the browser tests (Debian's chromium + chromium-driver, driven by selenium)."""

import os
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

needs_chromium = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and shutil.which("chromedriver")),
    reason="needs Debian's chromium and chromium-driver (make test installs them as root)")


def chromium(tmp_path, window: str):
    """A headless Chromium WebDriver with a fresh profile under tmp_path and the flags this closed network needs
    (no background networking); window: 'W,H'. The caller quits it."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={window}"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def images_loaded(driver, timeout: float = 10.0) -> tuple[int, int]:
    """(images on the page, images loaded), after making lazy images load and waiting up to `timeout` seconds for
    all of them."""
    import time

    driver.execute_script("document.querySelectorAll('img').forEach(i => i.loading = 'eager')")
    deadline = time.time() + timeout
    while True:
        total, loaded = driver.execute_script(
            "const i = [...document.images]; return [i.length, i.filter(x => x.complete && x.naturalWidth > 0).length]")
        if loaded == total or time.time() > deadline:
            return total, loaded
        time.sleep(0.1)
