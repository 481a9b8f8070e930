"""report.html in a real headless Chromium: it loads without console errors, runs no script, fetches
nothing, and decodes every chart image.

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package; skipped with the reason
when one of them is missing.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from loopscope.reports.report import write_report
from tests.test_report import EVIL, RunSpec, write_run

pytestmark = pytest.mark.browser

CHROMIUM_FLAGS: tuple[str, ...] = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1280,2000",
)
# Every <img>: decoded means complete with a natural width.
IMAGES_JS = "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);"


def _chromium() -> tuple[str, str]:
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("headless browser test needs Chromium and chromedriver "
                    "(Debian: apt-get install chromium chromium-driver)")
    return browser, driver


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    pytest.importorskip("selenium", reason="headless browser test needs selenium (pip install selenium)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _chromium()
    profile = tempfile.mkdtemp(prefix="loopscope-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _load(driver, path: Path) -> list[dict]:
    """Open a file, wait for it to finish loading, and return the console entries it produced."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("browser")  # drop entries from earlier pages
    driver.get(path.resolve().as_uri())
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
    return driver.get_log("browser")


def _undecoded(driver) -> list[str]:
    return [alt for alt, complete, width in driver.execute_script(IMAGES_JS) if not (complete and width > 0)]


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> Path:
    spec = RunSpec(lrs=(1e-3, 4e-3), diverge={("rdm-micro", 4e-3): 30}, evil_name=True)
    run_dir = write_run(tmp_path_factory.mktemp("browser") / "run", spec)
    return write_report(run_dir)["html"]


def test_report_loads_cleanly_and_every_chart_is_decoded(browser, report_html):
    console = _load(browser, report_html)
    assert [e for e in console if e["level"] in ("SEVERE", "WARNING")] == []
    images = browser.execute_script(IMAGES_JS)
    assert len(images) == report_html.read_text().count("<img "), images
    assert len(images) >= 9
    assert _undecoded(browser) == []
    # nothing was fetched: the only resources are the inlined data URIs
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
    assert [u for u in fetched if not u.startswith("data:")] == []


def test_strings_from_the_run_render_as_text_not_markup(browser, report_html):
    _load(browser, report_html)
    assert browser.execute_script("return document.scripts.length;") == 0
    text = browser.execute_script("return document.body.innerText;")
    assert EVIL in text  # shown literally, neither run nor dropped
    assert "Synthetic CPU <b>bold</b>" in text
    assert browser.execute_script("return document.querySelectorAll('b').length;") == 0


def test_the_checks_catch_a_broken_image_and_a_console_error(browser, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><img alt='bad' src='data:image/svg+xml;base64,bm90IGFuIHN2Zw=='>"
                    "<img alt='good' src='data:image/svg+xml;base64,PHN2ZyB4bWxucz0iaHR0cDovL3d3dy53My5vcmcvMjAw"
                    "MC9zdmciIHdpZHRoPSI0IiBoZWlnaHQ9IjQiLz4='>"
                    "<script>console.error('planted error')</script></body></html>")
    console = _load(browser, page)
    assert _undecoded(browser) == ["bad"]
    assert any("planted error" in e["message"] and e["level"] == "SEVERE" for e in console)
