"""The page at / in a real headless browser (Debian's chromium, driven by Playwright's Python API):
it lists the voices, streams speech into its <audio> element and plays it, and uploads a voice.
Skips, saying why, where no chromium or Playwright is installed (.ci/run installs both)."""
import shutil

import httpx
import pytest

from server_support import API_KEY

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the page test drives "
                                     "Debian's chromium with it)")
CHROMIUM = next((p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium") or "",
                             shutil.which("chromium-browser") or "") if p and shutil.os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium: apt-get install chromium (Debian)")


@pytest.fixture(scope="module")
def page(server):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--autoplay-policy=no-user-gesture-required", "--mute-audio"])
        page = browser.new_page()
        page.goto(server.url + "/")
        page.fill("#key", API_KEY)
        page.dispatch_event("#key", "change")  # the server wants a key: the page loads voices with it
        page.wait_for_function("document.querySelectorAll('#voice option').length > 1", timeout=30_000)
        yield page
        browser.close()


def test_the_page_streams_and_plays_speech(page):
    assert "default" in page.eval_on_selector_all("#voice option", "els => els.map(e => e.value)")
    page.fill("#text", "Hello from the browser.")
    page.select_option("#format", "mp3")
    page.click("#speak")
    page.wait_for_function("document.body.dataset.played > 0", timeout=120_000)
    assert page.inner_text("#status").startswith("done: first audio after")
    # it plays: the element has decodable audio and its clock moves
    page.wait_for_function("document.getElementById('player').currentTime > 0", timeout=30_000)
    assert page.evaluate("document.getElementById('player').error") is None


def test_the_page_uploads_a_voice(page, server, voice_wav):
    page.fill("#vname", "from-page")
    page.set_input_files("#vfile", str(voice_wav))
    page.click("#upload")
    page.wait_for_function("document.getElementById('status').textContent.includes('from-page')", timeout=60_000)
    assert page.inner_text("#status") == "voice from-page added", page.inner_text("#status")
    page.wait_for_function("document.getElementById('voice').value === 'from-page'", timeout=10_000)
    assert httpx.delete(f"{server.url}/v1/audio/voices/from-page", headers=server.auth).status_code == 200


def test_the_page_shows_errors(page):
    page.fill("#text", "x" * 4097)
    page.click("#speak")
    page.wait_for_function("document.getElementById('status').className === 'error'", timeout=30_000)
    assert page.inner_text("#status").startswith("400")
