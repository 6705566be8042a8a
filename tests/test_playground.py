"""The playground at / in a real headless Chromium against a real service: a newcomer's first
run (the editor's example prints and plots), a table, an interrupted `time.sleep(60)`, an
upload, the renderings, an agent transcript replayed, and the API-key prompt.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them); screenshots are
saved under the test's tmp dir, as the docs UI test does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.scripted_llm import scripted_model
from tests.server import running_server

KEY = "playground-key"
WAIT = 90  # seconds: a kernel starts and matplotlib draws on a loaded machine


@pytest.fixture(scope="module")
def server():
    """As `make serve` runs it: no key, loopback."""
    with running_server(min_idle=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def keyed_server():
    with running_server(min_idle=0, api_key=[KEY]) as srv:
        yield srv


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads):
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver, "apt-get install chromium chromium-driver (see .ci/run)"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1600"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads)})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    yield chrome
    chrome.quit()


def console_errors(browser) -> list[str]:
    """The page's console errors since the last call (a CSP violation is one)."""
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def wait(browser, seconds: float = WAIT) -> WebDriverWait:
    return WebDriverWait(browser, seconds)


def open_page(browser, url: str) -> None:
    browser.get(f"{url}/")
    wait(browser).until(ec.presence_of_element_located((By.CSS_SELECTOR, "body[data-ready]")))


def set_code(browser, code: str) -> None:
    browser.execute_script("ace.edit('editor').setValue(arguments[0], 1)", code)


def last_cell(browser):
    return browser.find_elements(By.CSS_SELECTOR, "#cells article.cell")[-1]


def run_cell(browser, code: str | None = None):
    """Run the editor's code (or `code`) and wait until its cell has finished."""
    if code is not None:
        set_code(browser, code)
    before = len(browser.find_elements(By.CSS_SELECTOR, "#cells article.cell"))
    browser.find_element(By.ID, "run").click()
    wait(browser).until(
        lambda b: len(b.find_elements(By.CSS_SELECTOR, "#cells article.cell[data-status]")) > before
    )
    return last_cell(browser)


def no_notice(browser) -> None:
    notice = browser.find_element(By.ID, "notice")
    assert not notice.is_displayed(), notice.text


def test_page_and_its_assets_are_served_by_the_service(server):
    with httpx.Client(base_url=server.url) as http:
        page = http.get("/")
        assert page.status_code == 200
        assert "https://" not in page.text and "cdn" not in page.text.lower()
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "object-src 'none'" in csp
        for asset in (
            "/playground/app.js",
            "/playground/app.css",
            "/playground/ace/ace.js",
            "/playground/ace/mode-python.js",
            "/playground/ace/LICENSE",
        ):
            assert http.get(asset).status_code == 200, asset
        config = http.get("/playground/config.json").json()
        assert config["auth"] is False
        assert {"qwen", "plain", "tool_response", "openai"} <= set(config["formats"])
        for still in ("/docs", "/redoc", "/openapi.json", "/healthz"):
            assert http.get(still).status_code == 200, still


def test_render_gives_an_execution_in_every_format(server):
    with httpx.Client(base_url=server.url, timeout=WAIT) as http:
        run = http.post("/v1/execute", json={"code": "print(6 * 7)"}).json()
        formats = http.get("/playground/config.json").json()["formats"]
        for fmt in formats:
            answer = http.post("/v1/render", json={"execution": run, "format": fmt})
            assert answer.status_code == 200, (fmt, answer.text)
            assert "42" in answer.json()["text"], fmt
        wrapped = http.post("/v1/render", json={"execution": run, "format": "tool_response"})
        assert wrapped.json()["text"].startswith("<tool_response>")
        message = http.post("/v1/render", json={"execution": run, "format": "openai"}).json()
        assert message["message"]["role"] == "tool"
        # An Execution whose outputs point at results it does not have: refused, not a 500.
        broken = {"status": "ok", "outputs": [{"type": "result", "index": 3}]}
        refused = http.post("/v1/render", json={"execution": broken, "format": "qwen"})
        assert refused.status_code == 422
        assert refused.json()["error"]["code"] == "inconsistent_execution"


def test_a_newcomer_runs_the_example_plot(server, browser, tmp_path):
    """Open the page, press Run: the example prints and plots, in a session made on the way."""
    console_errors(browser)
    open_page(browser, server.url)
    # The editor highlights Python: `import` is a keyword token.
    assert browser.find_elements(By.CSS_SELECTOR, "#editor .ace_keyword")
    cell = run_cell(browser)
    assert cell.get_attribute("data-status") == "ok"
    assert "plotting 200 points" in cell.find_element(By.CSS_SELECTOR, "pre.stdout").text
    image = cell.find_element(By.CSS_SELECTOR, "img.figure")
    assert image.get_attribute("src").startswith("data:image/png;base64,")
    width = browser.execute_script("return arguments[0].naturalWidth", image)
    assert width > 100
    no_notice(browser)
    # The plot was saved in the session's files, which the panel lists.
    wait(browser).until(lambda b: "outputs/fig-001.png" in b.find_element(By.ID, "files").text)
    browser.save_screenshot(str(tmp_path / "playground.png"))
    assert (tmp_path / "playground.png").stat().st_size > 20_000
    print(f"screenshot: {tmp_path / 'playground.png'}")

    # The model's view of that run, in another format, rendered by the service.
    cell.find_element(By.CSS_SELECTOR, "details.renderings summary").click()
    Select(cell.find_element(By.CSS_SELECTOR, "select.format")).select_by_value("tool_response")
    text = cell.find_element(By.CSS_SELECTOR, "pre.model-text")
    wait(browser).until(lambda _: text.text.startswith("<tool_response>"))
    assert "plotting 200 points" in text.text and "fig-001" in text.text
    assert console_errors(browser) == []


def test_typed_code_runs_with_shift_enter_and_state_persists(server, browser):
    open_page(browser, server.url)
    run_cell(browser, "answer = 6 * 7")
    set_code(browser, "")
    field = browser.find_element(By.CSS_SELECTOR, "#editor textarea")
    field.send_keys("print('the answer is', answer)")
    before = len(browser.find_elements(By.CSS_SELECTOR, "#cells article.cell"))
    field.send_keys(Keys.SHIFT, Keys.ENTER)
    wait(browser).until(
        lambda b: len(b.find_elements(By.CSS_SELECTOR, "#cells article.cell[data-status]")) > before
    )
    assert "the answer is 42" in last_cell(browser).find_element(By.CSS_SELECTOR, "pre.stdout").text


def test_a_dataframe_shows_as_a_table(server, browser):
    open_page(browser, server.url)
    cell = run_cell(
        browser,
        "import pandas as pd\npd.DataFrame({'city': ['Lima', 'Oslo'], 'temp': [19, -3]})",
    )
    frame = cell.find_element(By.CSS_SELECTOR, "iframe.html-result")
    # Shown without scripts: the frame is sandboxed without allow-scripts.
    assert "allow-scripts" not in frame.get_attribute("sandbox")
    browser.switch_to.frame(frame)
    try:
        table = browser.find_element(By.TAG_NAME, "table")
        cells = [td.text for td in table.find_elements(By.TAG_NAME, "td")]
        assert cells == ["Lima", "19", "Oslo", "-3"]
    finally:
        browser.switch_to.default_content()


def test_html_from_the_kernel_runs_no_script(server, browser):
    open_page(browser, server.url)
    cell = run_cell(
        browser,
        "from IPython.display import HTML, display\n"
        "display(HTML('<b id=\"bold\">bold</b>'\n"
        "             '<script>parent.document.title = \"owned\"</script>'))",
    )
    frame = cell.find_element(By.CSS_SELECTOR, "iframe.html-result")
    browser.switch_to.frame(frame)
    try:
        assert browser.find_element(By.ID, "bold").text == "bold"
    finally:
        browser.switch_to.default_content()
    assert browser.title == "kernelbox playground"


def test_output_streams_in_and_interrupt_stops_a_sleeping_cell(server, browser):
    open_page(browser, server.url)
    set_code(browser, "import time\nprint('going to sleep', flush=True)\ntime.sleep(60)")
    browser.find_element(By.ID, "run").click()
    cell = last_cell(browser)
    # The first line shows while the code still runs: it streamed in.
    wait(browser).until(
        lambda _: (
            "going to sleep"
            in " ".join(e.text for e in cell.find_elements(By.CSS_SELECTOR, "pre.stdout"))
        )
    )
    assert not cell.get_attribute("data-status")
    assert browser.find_element(By.ID, "run-state").text == "running…"
    started = time.monotonic()
    browser.find_element(By.ID, "interrupt").click()
    wait(browser, 45).until(lambda _: cell.get_attribute("data-status"))
    assert time.monotonic() - started < 45  # well before the sleep's 60 s
    assert cell.get_attribute("data-status") == "error"
    assert "KeyboardInterrupt" in cell.find_element(By.CSS_SELECTOR, "pre.error").text
    # The session goes on.
    assert "still here" in run_cell(browser, "print('still here')").text


def test_a_cell_past_its_timeout_says_so(server, browser):
    open_page(browser, server.url)
    browser.find_element(By.ID, "timeout").send_keys("1")
    try:
        cell = run_cell(browser, "import time\ntime.sleep(30)")
    finally:
        browser.find_element(By.ID, "timeout").clear()
    assert cell.get_attribute("data-status") == "timeout"
    assert cell.find_element(By.CSS_SELECTOR, ".status").text == "timeout"
    # What ended it is the deadline, not the KeyboardInterrupt the kernel raised for it.
    errors = [e.text for e in cell.find_elements(By.CSS_SELECTOR, "pre.error")]
    assert errors == ["TimeoutError: Code execution exceeded the time limit. (1 s)"]


def test_restart_gives_a_fresh_kernel_and_keeps_the_files(server, browser):
    open_page(browser, server.url)
    run_cell(browser, "kept = 1\nopen('kept.txt', 'w').write('yes')")
    browser.find_element(By.ID, "restart").click()
    wait(browser).until(lambda b: "Kernel restarted" in b.find_element(By.ID, "cells").text)
    cell = run_cell(browser, "print(open('kept.txt').read())\nkept")
    assert "yes" in cell.find_element(By.CSS_SELECTOR, "pre.stdout").text
    assert "NameError" in cell.find_element(By.CSS_SELECTOR, "pre.error").text
    assert cell.get_attribute("data-status") == "error"


def test_pause_then_run_resumes_and_the_notebook_downloads(server, browser, downloads):
    open_page(browser, server.url)
    run_cell(browser, "kept = 41")
    browser.find_element(By.ID, "pause").click()
    wait(browser).until(lambda b: "Paused" in b.find_element(By.ID, "cells").text)
    session = browser.execute_script("return sessionStorage.getItem('kernelbox.session')")
    with httpx.Client(base_url=server.url) as http:
        assert http.get(f"/v1/sessions/{session}").json()["status"] == "paused"
    cell = run_cell(browser, "print(kept + 1)")
    assert "42" in cell.find_element(By.CSS_SELECTOR, "pre.stdout").text
    assert "resumed after a pause" in cell.text
    browser.find_element(By.ID, "notebook").click()
    saved = downloads / f"{session}.ipynb"
    wait(browser).until(lambda _: saved.exists() and saved.stat().st_size > 0)
    wait(browser).until(lambda _: "print(kept + 1)" in saved.read_text())


def test_an_uploaded_file_shows_in_the_list(server, browser, tmp_path):
    open_page(browser, server.url)
    upload = tmp_path / "numbers.csv"
    upload.write_text("a,b\n1,2\n")
    browser.find_element(By.ID, "upload").send_keys(str(upload))
    files = browser.find_element(By.ID, "files")
    wait(browser).until(lambda _: "numbers.csv" in files.text)
    session = browser.execute_script("return sessionStorage.getItem('kernelbox.session')")
    with httpx.Client(base_url=server.url) as http:
        body = http.get(f"/v1/sessions/{session}/files/numbers.csv")
        assert body.status_code == 200 and body.text == "a,b\n1,2\n"
    # The code sees it in its working directory.
    assert "1,2" in run_cell(browser, "print(open('numbers.csv').read())").text


def test_a_file_downloads_from_the_list(server, browser, downloads):
    open_page(browser, server.url)
    run_cell(browser, "open('report.txt', 'w').write('made in the kernel')")
    files = browser.find_element(By.ID, "files")
    link = wait(browser).until(
        lambda _: next(
            (
                b
                for b in files.find_elements(By.CSS_SELECTOR, "button.link")
                if b.text == "report.txt"
            ),
            None,
        )
    )
    link.click()
    saved = downloads / "report.txt"
    wait(browser).until(lambda _: saved.exists() and saved.read_text() == "made in the kernel")


def test_a_session_is_made_and_deleted_from_the_page(server, browser):
    open_page(browser, server.url)
    browser.find_element(By.ID, "new-session").click()
    select = browser.find_element(By.ID, "session")
    wait(browser).until(
        lambda _: (
            select.get_attribute("value")
            and select.get_attribute("value")
            == browser.execute_script("return sessionStorage.getItem('kernelbox.session')")
        )
    )
    made = select.get_attribute("value")
    with httpx.Client(base_url=server.url) as http:
        assert http.get(f"/v1/sessions/{made}").status_code == 200
        browser.find_element(By.ID, "delete-session").click()
        # The select may be empty for a moment while its options are rebuilt: what counts is
        # the session gone on the service and none picked on the page, within a deadline.
        wait(browser).until(
            lambda _: (
                http.get(f"/v1/sessions/{made}").status_code == 404
                and select.get_attribute("value") == ""
            )
        )
    assert not browser.find_element(By.ID, "delete-session").is_enabled()


def agent_json(server, tmp_path) -> str:
    """What `kernelbox agent --json` prints for a run that computes and plots (the model is
    the scripted stand-in; everything else is real)."""
    code = "print(2 ** 10)\nplt.plot([1, 2, 4]); plt.show()"
    script = [f"I will compute it.\n```python\n{code}\n```", "2 to the 10th is **1024**."]
    with scripted_model(script) as model:
        command = [sys.executable, "-m", "kernelbox.cli", "agent", "What is 2 to the 10th?"]
        command += ["--base-url", model.url, "--model", "m", "--dialect", "tir", "--json"]
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,  # whatever the command saves stays in the test's directory
            env={**os.environ, "KERNELBOX_URL": server.url, "NO_COLOR": "1"},
        )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_an_agent_transcript_is_replayed_step_by_step(server, browser, tmp_path):
    printed = agent_json(server, tmp_path)
    console_errors(browser)
    open_page(browser, server.url)
    browser.find_element(By.ID, "tab-replay").click()
    transcript = tmp_path / "agent.json"
    transcript.write_text(printed)
    browser.find_element(By.ID, "transcript-file").send_keys(str(transcript))
    browser.find_element(By.ID, "load-transcript").click()
    position = browser.find_element(By.ID, "replay-position")
    wait(browser).until(lambda _: position.text == "1 of 3")
    steps = browser.find_element(By.ID, "replay-steps")
    assert "What is 2 to the 10th?" in steps.text
    assert "1024" not in steps.text  # not shown yet
    browser.find_element(By.ID, "replay-next").click()
    assert position.text == "2 of 3"
    step = browser.find_element(By.CSS_SELECTOR, "#replay-steps .replay-step")
    assert "print(2 ** 10)" in step.find_element(By.CSS_SELECTOR, "pre.code").text
    assert step.find_element(By.CSS_SELECTOR, "pre.stdout").text == "1024"
    image = step.find_element(By.CSS_SELECTOR, "img.figure")
    assert browser.execute_script("return arguments[0].naturalWidth", image) > 100
    browser.find_element(By.ID, "replay-next").click()
    assert "2 to the 10th is **1024**." in steps.text
    assert not browser.find_element(By.ID, "replay-next").is_enabled()
    browser.save_screenshot(str(tmp_path / "playground-replay.png"))

    # The loop's events, one JSON object a line (the last the final result), are taken too.
    result = json.loads(printed)
    execution = result["steps"][0]["execution"]
    lines = [
        json.dumps({"kind": "code", "code": result["steps"][0]["code"], "index": 0}),
        json.dumps({"kind": "output", "execution": execution, "index": 0}),
        json.dumps({"kind": "final", "result": result}),
    ]
    browser.execute_script(
        "document.getElementById('transcript-text').value = arguments[0]", "\n".join(lines)
    )
    browser.find_element(By.ID, "transcript-file").clear()
    browser.find_element(By.ID, "load-transcript").click()
    wait(browser).until(lambda _: position.text == "1 of 3")
    browser.find_element(By.ID, "replay-all").click()
    assert position.text == "3 of 3"
    no_notice(browser)
    assert console_errors(browser) == []


def test_with_a_key_the_page_asks_for_it_and_keeps_it_in_the_tab(keyed_server, browser, tmp_path):
    browser.get(f"{keyed_server.url}/")
    dialog = wait(browser).until(ec.visibility_of_element_located((By.ID, "key-dialog")))
    browser.save_screenshot(str(tmp_path / "playground-key.png"))
    field = browser.find_element(By.ID, "api-key")
    field.send_keys("wrong-key", Keys.ENTER)
    error = browser.find_element(By.ID, "key-error")
    wait(browser).until(lambda _: error.is_displayed() and "refused" in error.text)
    field.send_keys(KEY, Keys.ENTER)
    wait(browser).until(ec.presence_of_element_located((By.CSS_SELECTOR, "body[data-ready]")))
    assert not dialog.is_displayed()
    stored = browser.execute_script(
        "return [sessionStorage.getItem('kernelbox.apiKey'), JSON.stringify(localStorage)]"
    )
    assert stored == [KEY, "{}"]
    assert "6" in run_cell(browser, "print(1 + 5)").text
    assert browser.get_cookies() == []
    with httpx.Client(base_url=keyed_server.url) as http:
        assert http.get("/").status_code == 200  # the page is public; what it calls is not
        assert http.get("/playground/config.json").json()["auth"] is True
        refused = http.post("/v1/render", json={"execution": {"status": "ok"}})
        assert refused.status_code == 401


def test_a_flood_of_output_is_cut_and_says_so(server, browser):
    """600,000 characters printed: the page holds at most 200,000 of them (the kernel's own
    cap, and the page's), and the cell says that output was left out."""
    open_page(browser, server.url)
    cell = run_cell(browser, "for i in range(60):\n    print(str(i % 10) * 9_999)")
    shown = cell.find_element(By.CSS_SELECTOR, "pre.stdout")
    length = browser.execute_script("return arguments[0].textContent.length", shown)
    assert 100_000 < length <= 200_000
    assert cell.get_attribute("data-status") == "ok"
    assert "output truncated" in cell.find_element(By.CSS_SELECTOR, ".cell-footer").text
