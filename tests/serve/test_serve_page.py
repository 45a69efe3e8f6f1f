"""The page at GET /: a real headless Chromium drops a TIFF and shows input, stains and masks with timings."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import tifffile

from tests.serve.conftest import Server, phase_image

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("Debian's chromium and chromium-driver are missing; `make test` installs them (apt-get)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)


@pytest.mark.slow
def test_page_shows_input_stains_and_masks(server: Server, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    image = tmp_path / "phase.tif"
    tifffile.imwrite(image, phase_image((200, 160)))
    browser.get(f"{server.url}/")
    wait = WebDriverWait(browser, 120)
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "Ready: 3 model(s)"))
    Select(browser.find_element(By.ID, "model")).select_by_value("stain2d")
    Select(browser.find_element(By.ID, "method")).select_by_value("classical")
    browser.find_element(By.ID, "file").send_keys(str(image))
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "Done: phase.tif"))
    captions = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "figcaption")]
    assert captions[0] == "input [200,160]"
    assert captions[1:3] == ["Nuclei (predicted)", "Membrane (predicted)"]
    assert captions[3].endswith("Nuclei masks")
    assert "Round trip" in browser.find_element(By.ID, "timing").text
    loaded = browser.execute_script(
        "return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
    assert loaded == [True] * 4
    browser.save_screenshot(str(tmp_path / "page.png"))

    # an error is shown, not swallowed
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not an array")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "Error 400"))
    assert "corrupt .npy" in browser.find_element(By.ID, "status").text
