"""The web page end to end in headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by selenium).

The page is served by the in-process app (``build_local_app``: the same routes and model classes as the
Serve application, without Ray) on a real socket. A user types a prompt, generates, and the clip must
play (``currentTime`` advances or ``ended`` fires) with a spectrogram drawn; the story editor adds and
removes rows; a melody file goes up through the upload field.
"""

import io
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from musiclm.orchestration.serve import ServeConfig, build_local_app, save_random_system

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if CHROMIUM is None or DRIVER is None:
    pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

TIMEOUT_S = 240


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The in-process app on 127.0.0.1:<free port>, served by uvicorn in a thread."""
    import uvicorn

    root = save_random_system(tmp_path_factory.mktemp("web_system"), "tiny", melody=True)
    app = build_local_app(ServeConfig(checkpoints=str(root), torch_threads=1, max_seconds=3.0))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--autoplay-policy=no-user-gesture-required", "--mute-audio"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _generate(browser, expect_error: bool = False) -> dict:
    """Click Generate; wait until a clip is shown (or the status reports an error); the page's state."""
    browser.execute_script("document.getElementById('spectrogram').dataset.drawn = 'false';")
    browser.find_element(By.ID, "generate").click()

    def finished(driver) -> bool:
        status = driver.find_element(By.ID, "status")
        if "error" in (status.get_attribute("class") or ""):
            return True
        return driver.execute_script("return document.getElementById('spectrogram').dataset.drawn") == "true"

    WebDriverWait(browser, TIMEOUT_S).until(finished)
    state = browser.execute_script("""
        const a = document.getElementById('player'), c = document.getElementById('spectrogram');
        return {src: a.currentSrc, duration: a.duration, readyState: a.readyState, error: a.error && a.error.code,
                drawn: c.dataset.drawn, painted: parseInt(c.dataset.painted || '0'),
                status: document.getElementById('status').textContent,
                failed: document.getElementById('status').className === 'error'};
    """)
    assert state["failed"] == expect_error, state
    return state


def _plays(browser) -> dict:
    """Play the clip from the start; wait for currentTime to advance or 'ended' to fire."""
    return browser.execute_async_script("""
        const done = arguments[arguments.length - 1], a = document.getElementById('player');
        let ended = false;
        a.addEventListener('ended', () => { ended = true; }, {once: true});
        a.currentTime = 0;
        a.play().then(() => {
            const start = performance.now();
            const poll = () => {
                if (ended || a.currentTime > 0.05 || performance.now() - start > 20000)
                    done({ended: ended, currentTime: a.currentTime, paused: a.paused});
                else setTimeout(poll, 50);
            };
            poll();
        }).catch((e) => done({error: String(e)}));
    """)


def test_type_a_prompt_generate_and_play(site, browser):
    browser.get(site)
    assert browser.title == "MusicLM"
    browser.find_element(By.ID, "prompt").send_keys("a calm piano melody")
    seconds = browser.find_element(By.ID, "seconds")
    seconds.clear()
    seconds.send_keys("0.4")
    state = _generate(browser)
    assert state["src"].startswith("blob:") and state["error"] is None
    assert state["readyState"] >= 1 and state["duration"] == pytest.approx(0.4, abs=0.01)
    assert state["painted"] > 1000, "the spectrogram canvas stayed blank"
    assert "request" in state["status"]
    played = _plays(browser)
    assert "error" not in played, played
    assert played["ended"] or played["currentTime"] > 0.05, played
    # the canvas really holds an image: not a single colour
    pixels = browser.execute_script("""
        const c = document.getElementById('spectrogram');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const seen = new Set();
        for (let i = 0; i < d.length; i += 4 * 97) seen.add(d[i] * 65536 + d[i + 1] * 256 + d[i + 2]);
        return seen.size;
    """)
    assert pixels > 10


def test_story_editor_adds_and_removes_rows(site, browser):
    browser.get(site)
    add = browser.find_element(By.ID, "add-segment")
    for _ in range(3):
        add.click()
    rows = browser.find_elements(By.CSS_SELECTOR, "#story .segment")
    assert len(rows) == 3
    rows[1].find_element(By.CSS_SELECTOR, ".remove-segment").click()
    rows = browser.find_elements(By.CSS_SELECTOR, "#story .segment")
    assert len(rows) == 2
    for row, (prompt, seconds) in zip(rows, [("calm piano", "0.2"), ("loud drums", "0.16")]):
        row.find_element(By.CSS_SELECTOR, ".segment-prompt").send_keys(prompt)
        field = row.find_element(By.CSS_SELECTOR, ".segment-seconds")
        field.clear()
        field.send_keys(seconds)
    request = browser.execute_script("return buildRequest();")
    assert request["story"] == [{"prompt": "calm piano", "seconds": 0.2}, {"prompt": "loud drums", "seconds": 0.16}]
    assert "prompt" not in request
    state = _generate(browser)
    assert state["duration"] == pytest.approx(0.36, abs=0.01)
    # a refused request shows the server's message, naming the field
    rows[0].find_element(By.CSS_SELECTOR, ".segment-prompt").clear()
    state = _generate(browser, expect_error=True)
    assert "story.0.prompt" in state["status"]


def test_melody_upload_and_streaming(site, browser, tmp_path):
    t = np.arange(16000) / 16000
    path = Path(tmp_path) / "hum.wav"
    sf.write(path, (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), 16000)
    browser.get(site)
    browser.find_element(By.ID, "prompt").send_keys("a hummed tune")
    seconds = browser.find_element(By.ID, "seconds")
    seconds.clear()
    seconds.send_keys("0.2")
    browser.find_element(By.ID, "melody").send_keys(str(path))
    state = _generate(browser)
    assert state["duration"] == pytest.approx(0.2, abs=0.01) and state["painted"] > 0
    # pitch guidance goes up with the melody; this system cannot be steered (no probe): the 422 names the field
    browser.find_element(By.ID, "pitch-guidance").clear()
    browser.find_element(By.ID, "pitch-guidance").send_keys("10")
    state = _generate(browser, expect_error=True)
    assert "pitch_guidance" in state["status"]
    browser.find_element(By.ID, "pitch-guidance").clear()
    browser.find_element(By.ID, "pitch-guidance").send_keys("0")
    # a file that is not audio: the 415 is shown
    (Path(tmp_path) / "notes.txt").write_text("not audio" * 20)
    browser.execute_script("document.getElementById('melody').value = '';")
    browser.find_element(By.ID, "melody").send_keys(str(Path(tmp_path) / "notes.txt"))
    state = _generate(browser, expect_error=True)
    assert "melody" in state["status"]
    # streaming: the chunked WAV plays like the whole one and the page reports the time to first audio
    browser.execute_script("document.getElementById('melody').value = '';")
    browser.find_element(By.ID, "stream").click()
    state = _generate(browser)
    assert "first audio after" in state["status"] and state["duration"] == pytest.approx(0.2, abs=0.01)


def test_page_requests_match_the_api(site):
    """What the page sends is what the API documents (the same JSON through the same validation)."""
    import httpx

    with httpx.Client(base_url=site, timeout=120) as client:
        page = client.get("/").text
        assert 'fetch("generate"' in page and 'fetch("generate/melody"' in page
        body = {"prompt": "a calm piano melody", "seconds": 0.2, "seed": 0, "stream": False}
        response = client.post("/generate", content=json.dumps(body), headers={"content-type": "application/json"})
        assert response.status_code == 200
        audio, rate = sf.read(io.BytesIO(response.content))
        assert rate == 24000 and len(audio) == 4800
