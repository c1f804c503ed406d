"""The live page in a real headless browser: it plays a model's example through a streaming session over
the WebSocket, and the label it ends on is /v1/classify's for the same frames; with API keys too."""

import csv
import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT

SCREENSHOT = os.environ.get("LSTM_SERVE_SCREENSHOT")  # set to a path to write the page's picture there


def browser():
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    assert chromium and driver, (
        "no chromium and chromedriver: make test installs them (apt-get install chromium chromium-driver)"
    )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(driver))


def play(driver, url: str, model: str, key: str | None = None, upload: Path | None = None) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver.get(url + "/")
    if upload is not None:
        driver.find_element(By.ID, "file").send_keys(str(upload))
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "sequence").get_attribute("value") == "file")
    if key:
        field = driver.find_element(By.ID, "key")
        field.send_keys(key)
        driver.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
    wait = WebDriverWait(driver, 30)
    wait.until(lambda d: model in [o.text for o in d.find_elements(By.CSS_SELECTOR, "#model option")])
    Select(driver.find_element(By.ID, "model")).select_by_visible_text(model)
    driver.find_element(By.ID, "rate").clear()
    driver.find_element(By.ID, "rate").send_keys("200")
    driver.find_element(By.ID, "play").click()
    wait.until(
        lambda d: (
            d.find_element(By.ID, "final-label").get_attribute("textContent")
            or d.find_element(By.ID, "status").text.startswith("failed")
        )
    )
    return driver.find_element(By.ID, "final-label").get_attribute("textContent")


@pytest.mark.parametrize("model", ["japanese-vowels", "basic-motions"])
def test_the_live_page_streams_an_example_to_classify_s_answer(server, client, model):
    driver = browser()
    try:
        final = play(driver, server.url, model)
        if SCREENSHOT and model == "basic-motions":
            driver.save_screenshot(SCREENSHOT)
        status = driver.find_element("id", "status").text
    finally:
        driver.quit()
    example = client.get(f"/v1/models/{model}").json()["example"]
    expected = client.post("/v1/classify", json={"model": model, "sequences": [example["frames"]]}).json()
    assert final == expected["predictions"][0]["label"], status
    assert status.startswith(f"done: {len(example['frames'])} frames")


def test_the_live_page_works_with_api_keys(start_server):
    server = start_server(env={"LSTM_SERVE_API_KEYS": "page-key-123"})
    assert httpx.get(f"{server.url}/").status_code == 200, "the page itself holds no data and needs no key"
    driver = browser()
    try:
        final = play(driver, server.url, "japanese-vowels", key="page-key-123")
    finally:
        driver.quit()
    assert final == "speaker-1"


def test_the_readme_shows_the_page():
    assert (ROOT / "docs" / "live-page.png").is_file()
    assert "docs/live-page.png" in (ROOT / "README.md").read_text()


def test_an_uploaded_csv_is_read_by_its_column_names(server, client, tmp_path):
    """Its columns were taken in the file's order: swapped ones streamed other numbers than the model's."""
    rows = list(csv.reader((ROOT / "examples" / "japanese-vowels.csv").open()))
    first = [row for row in rows[1:] if row[0] == rows[1][0]]
    frames = [[float(v) for v in row[2:14]] for row in sorted(first, key=lambda row: int(row[1]))]
    order = [0, 1, 3, 2, *range(4, len(rows[0]))]  # the first two features swapped
    swapped, renamed = tmp_path / "swapped.csv", tmp_path / "renamed.csv"
    csv.writer(swapped.open("w", newline="")).writerows([[row[i] for i in order] for row in [rows[0], *first]])
    header = rows[0][:2] + [f"c{i}" for i in range(12)] + rows[0][14:]
    csv.writer(renamed.open("w", newline="")).writerows([header, *first])
    expected = client.post("/v1/classify", json={"sequences": [frames]}).json()["predictions"][0]
    driver = browser()
    try:
        assert play(driver, server.url, "japanese-vowels", upload=swapped) == expected["label"]
        shown = driver.find_element("id", "probability").text
        assert shown == f"p = {max(expected['probabilities']):.3f}", shown
        play(driver, server.url, "japanese-vowels", upload=renamed)
        status = driver.find_element("id", "status").text
    finally:
        driver.quit()
    assert status.startswith("failed: the file's features c0, c1"), status
