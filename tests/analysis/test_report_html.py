"""report.html in a real headless browser (Chromium + chromedriver from Debian's packages).

Outside CI, a machine without them skips with one line; under CI=true their absence is a
failure (.ci/run installs them), so CI never silently loses this test.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from loopgolf.analysis.report import PARETO_VIEWS, front_table, report
from loopgolf.analysis.results import load_results
from tests.analysis.synthetic_sweeps import LOOPED, RELAXED, UNIQUE, SweepWriter


def _browser_or_skip() -> tuple[str, str]:
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        chromium = None  # the dev extra is not installed
    if chromium and driver:
        return chromium, driver
    reason = "no chromium/chromedriver/selenium (apt-get install chromium chromium-driver; pip install -e .[dev])"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}: .ci/run should have installed them")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():  # type: ignore[no-untyped-def]
    chromium, driver_path = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    flags = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000")
    for flag in flags:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


def _sweep(root: Path) -> Path:
    """Configurations at different bytes, so the bytes front has several points."""
    w = SweepWriter(root, "html", per_token=False, docs=10, tokens_per_doc=20)
    for k, (overrides, effect) in enumerate(((UNIQUE, 0.0), (LOOPED, -0.1), (RELAXED, -0.2))):
        for seed in range(2):
            w.trial(overrides, seed, effect=effect, row={"artifact_bytes": 500_000 + 200_000 * k})
    return w.write()


def test_report_html_loads_shows_the_front_and_hovers(browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    sweep = _sweep(tmp_path)
    page = report(sweep).parent / "report.html"
    browser.get(page.as_uri())
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.execute_script("return document.readyState") == "complete")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#pareto-bytes .scatterlayer .trace"))

    df = load_results(sweep)
    for name, objectives in PARETO_VIEWS:
        rows = len(front_table(df, objectives))
        # the front is the second trace; count the markers the browser drew
        points = browser.find_elements(By.CSS_SELECTOR, f"#pareto-{name} .scatterlayer .trace:nth-of-type(2) .point")
        assert len(points) == rows >= 1
    assert len(front_table(df, PARETO_VIEWS[0][1])) == 3  # the sweep was built for a 3-point front

    # hover the front's first point with the mouse: its label names the configuration
    marker = browser.find_elements(By.CSS_SELECTOR, "#pareto-bytes .scatterlayer .trace:nth-of-type(2) .point")[0]
    ActionChains(browser).move_to_element(marker).perform()
    label = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#pareto-bytes .hoverlayer").text or False)
    assert "config: d" in label and "seed: " in label and "artifact_bytes: " in label and "arm: " in label

    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    assert browser.execute_script("return document.getElementById('curves').data.length") == 6  # one per trial
