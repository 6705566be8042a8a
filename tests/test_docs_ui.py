"""/docs (Swagger UI) and /redoc in a real headless Chromium: the pages render the service's
operations from assets the service itself serves (no CDN is reachable here, so a page that
needed one would stay blank), and Authorize with an API key makes "Try it out" work.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them); a screenshot of
each page is saved under the test's tmp dir.
"""

from __future__ import annotations

import shutil

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from tests.server import running_server

KEY = "docs-ui-key"
OPERATIONS = ["/v1/sessions", "/v1/sessions/{session_id}/execute", "/v1/execute", "/run_code"]


@pytest.fixture(scope="module")
def server():
    with running_server(min_idle=0, api_key=[KEY]) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver, "apt-get install chromium chromium-driver (see .ci/run)"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,2000"):
        options.add_argument(arg)
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    yield chrome
    chrome.quit()


def test_assets_are_served_locally_with_their_licences(server):
    with httpx.Client(base_url=server.url) as http:
        for page in ("/docs", "/redoc"):
            html = http.get(page).text
            assert "cdn" not in html.lower()
            assert "https://" not in html
        for asset in (
            "/docs-assets/swagger-ui/swagger-ui-bundle.js",
            "/docs-assets/swagger-ui/swagger-ui.css",
            "/docs-assets/swagger-ui/LICENSE",
            "/docs-assets/redoc/redoc.standalone.js",
            "/docs-assets/redoc/LICENSE",
        ):
            answer = http.get(asset)
            assert answer.status_code == 200, asset
        schemes = http.get("/openapi.json").json()["components"]["securitySchemes"]
        assert schemes == {
            "apiKey": {
                "type": "http",
                "scheme": "bearer",
                "description": schemes["apiKey"]["description"],
            }
        }


def test_swagger_ui_renders_the_operations_and_authorize_works(server, browser, tmp_path):
    browser.get(f"{server.url}/docs")
    wait = WebDriverWait(browser, 60)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".opblock")))
    paths = {
        e.text.replace("\u200b", "")
        for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
    }
    for path in OPERATIONS:
        assert path in paths
    browser.save_screenshot(str(tmp_path / "swagger-ui.png"))

    # Authorize with the key, then try GET /v1/sessions: 200 (without the key it is 401).
    browser.find_element(By.CSS_SELECTOR, ".btn.authorize").click()
    field = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, ".modal-ux input")))
    field.send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, ".modal-ux .auth-btn-wrapper .authorize").click()
    browser.find_element(By.CSS_SELECTOR, ".modal-ux .btn-done").click()
    block = browser.find_element(By.ID, "operations-sessions-list_sessions_v1_sessions_get")
    block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait.until(lambda _: block.find_element(By.CSS_SELECTOR, ".try-out__btn")).click()
    wait.until(lambda _: block.find_element(By.CSS_SELECTOR, ".execute")).click()
    status = wait.until(
        lambda _: block.find_element(
            By.CSS_SELECTOR, ".live-responses-table tr.response .response-col_status"
        )
    )
    assert status.text.strip() == "200"
    browser.save_screenshot(str(tmp_path / "swagger-ui-tried.png"))
    assert (tmp_path / "swagger-ui.png").stat().st_size > 10_000


def test_redoc_renders_the_operations(server, browser, tmp_path):
    browser.get(f"{server.url}/redoc")
    WebDriverWait(browser, 60).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, "[data-section-id^='operation/']"))
    )
    html = browser.page_source
    for path in OPERATIONS:
        assert path in html
    browser.save_screenshot(str(tmp_path / "redoc.png"))
    assert (tmp_path / "redoc.png").stat().st_size > 10_000
