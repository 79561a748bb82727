"""The web page at `/`, in a real headless Chromium against the tiny app under the route prefix /page: its files
(public, out of the schema, an allow-list), a job from the form to the player (live progress over the event stream,
a reconnect with Last-Event-ID, waveform and spectrogram drawn, a download), cancel, the server's 4xx detail, a
phone-size screen, and the API-key flow on an app with keys."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest

from tests.conftest import deployed

KEY = "page-s3cret"
SHORT = {"caption": "calm piano, warm", "audio_duration": "3", "inference_steps": "8"}  # about a second on a CPU
# Several seconds: still running when the page reconnects after its first stream broke off.
LONGER = {"caption": "calm piano, warm", "audio_duration": "30", "inference_steps": "100"}

# Every change of the job panel, as the page showed it: the progress bar's value, the stage line and the status.
RECORD_PROGRESS = """
window.seen = [];
document.addEventListener("DOMContentLoaded", () => {
  const panel = document.getElementById("job-panel");
  new MutationObserver(() => window.seen.push({
    value: document.getElementById("job-progress").value,
    stage: document.getElementById("job-stage").textContent,
    status: document.getElementById("job-status").textContent,
  })).observe(panel, {subtree: true, childList: true, attributes: true, characterData: true});
});
"""

# (pixels drawn, distinct colours) of a canvas: a blank one has (0, <=1).
CANVAS_INK = """canvas => {
  const {data} = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
  let drawn = 0;
  const colours = new Set();
  for (let i = 0; i < data.length; i += 4) {
    if (data[i + 3] > 0) drawn++;
    colours.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
  }
  return [drawn, colours.size, canvas.width * canvas.height];
}"""


def fill_form(page, fields: dict[str, str]) -> None:
    page.wait_for_selector("#model option", state="attached")  # v1/models answered
    for name, value in fields.items():
        element = page.locator(f"#{name}")
        if element.evaluate("e => e.tagName") == "SELECT":
            element.select_option(value)
        else:
            element.fill(value)


def wait_for_player(page, outputs: int = 1) -> None:
    page.wait_for_function(f"document.querySelectorAll('figure.output[data-drawn]').length === {outputs}",
                           timeout=180_000)


def save_screenshot(page, artifacts, name: str, capsys, record_property) -> None:
    path = artifacts / name
    page.screenshot(path=str(path), full_page=True)
    record_property(name, str(path))
    with capsys.disabled():
        print(f"\nscreenshot: {path}")


def assert_drawn(page) -> None:
    for figure in page.locator("figure.output").all():
        drawn, _, area = figure.locator("canvas.waveform").evaluate(CANVAS_INK)
        assert 0.02 * area < drawn < area, f"waveform: {drawn} of {area} pixels drawn"
        drawn, colours, area = figure.locator("canvas.spectrogram").evaluate(CANVAS_INK)
        assert drawn == area and colours > 20, f"spectrogram: {colours} colours"


# -- the files ----------------------------------------------------------------------------------------------------
def test_the_page_and_its_files_are_an_allow_list_kept_out_of_the_schema(web_app):
    page = httpx.get(web_app + "/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["cache-control"] == "no-cache" and '<script src="web/app.js"' in page.text
    assert httpx.get(web_app + "/", headers={"If-None-Match": page.headers["etag"]}).status_code == 304
    root = httpx.get(web_app)  # the prefix root without its slash: relative URLs need the slash
    assert root.status_code == 307 and root.headers["location"] == web_app + "/"
    for name, media in (("app.js", "javascript"), ("style.css", "text/css")):
        answer = httpx.get(f"{web_app}/web/{name}")
        assert answer.status_code == 200 and media in answer.headers["content-type"]
    for name in ("nope.js", "..%2Fweb.py", "%2E%2E/web.py", "../web.py", "", "index.html/x"):
        answer = httpx.get(f"{web_app}/web/{name}")
        assert answer.status_code == 404 and "detail" in answer.json(), name
    assert httpx.get(f"{web_app}/web/index.html").status_code == 200
    paths = httpx.get(web_app + "/openapi.json").json()["paths"]
    assert "/" not in paths and not any(path.startswith("/web") for path in paths)


# -- a job, from the form to the player ---------------------------------------------------------------------------
def test_a_job_runs_from_the_form_to_its_player(web_app, open_page, artifacts, capsys, record_property):
    page, _ = open_page(web_app + "/", init_script=RECORD_PROGRESS)
    # The first event stream breaks off after one event (id 7): the page reconnects with Last-Event-ID: 7.
    streams = []

    def first_stream_breaks(route):
        streams.append(route.request.headers.get("last-event-id"))
        if len(streams) > 1:
            return route.continue_()
        job_id = route.request.url.split("/jobs/")[1].split("/")[0]
        view = {"job_id": job_id, "status": "queued", "queue_position": 0, "eta_seconds": 1.0, "error": None,
                "result": None, "progress": {"stage": "queued", "step": 0, "total": 0}}
        route.fulfill(status=200, content_type="text/event-stream",
                      body=f"event: job\ndata: {json.dumps(view)}\nid: 7\n\n")

    page.route("**/events", first_stream_breaks)
    fill_form(page, {**LONGER, "seed": "11", "audio_format": "mp3"})
    page.click("#submit")
    wait_for_player(page)

    assert streams[:2] == [None, "7"]
    seen = page.evaluate("window.seen")
    assert any(0 < s["value"] < 1 for s in seen), seen  # the bar moved
    assert any("step" in s["stage"] for s in seen), seen  # "diffusion, step 3 of 100"
    assert page.text_content("#job-status") == "succeeded" and page.is_hidden("#cancel")
    assert page.locator("#job-progress").evaluate("e => e.value") == 1
    assert_drawn(page)
    job_id = page.text_content("#job-id")
    assert page.text_content(f'#jobs [data-job-id="{job_id}"]').startswith("succeeded")

    link = page.locator("figure.output a.download")
    served = httpx.get(f"{web_app}/{link.get_attribute('data-src')}")
    assert served.status_code == 200 and served.headers["content-type"] == "audio/mpeg"
    with page.expect_download() as download:
        link.click()
    assert download.value.suggested_filename == f"acestep-{job_id[:8]}-1.mp3"
    assert open(download.value.path(), "rb").read() == served.content
    assert page.locator("figure.output audio").evaluate("a => a.src").startswith("blob:")
    save_screenshot(page, artifacts, "page-desktop.png", capsys, record_property)

    # The session's list survives a reload, and shows the job again when clicked.
    page.reload()
    page.click(f'#jobs [data-job-id="{job_id}"]')
    wait_for_player(page)
    assert page.text_content("#job-id") == job_id


def test_cancel_stops_a_running_job(web_app, open_page):
    page, _ = open_page(web_app + "/")
    fill_form(page, {"caption": "long", "audio_duration": "60", "inference_steps": "200"})
    page.click("#submit")
    page.wait_for_function("document.getElementById('job-status').textContent === 'running'")
    page.click("#cancel")
    page.wait_for_function("document.getElementById('job-status').textContent === 'canceled'")
    job_id = page.text_content("#job-id")
    assert httpx.get(f"{web_app}/v1/jobs/{job_id}").json()["status"] == "canceled"
    assert page.text_content(f'#jobs [data-job-id="{job_id}"]').startswith("canceled")
    assert page.is_hidden("#cancel") and page.locator("figure.output").count() == 0


def test_bad_input_shows_the_server_detail(web_app, open_page):
    page, log = open_page(web_app + "/")
    log.expect_status(422)
    fill_form(page, {"audio_duration": "9999"})
    page.click("#submit")
    page.wait_for_selector("#form-error:not([hidden])")
    answer = httpx.post(web_app + "/v1/music/generate", data={"audio_duration": "9999"})  # what the server says
    assert answer.status_code == 422 and answer.json()["detail"].startswith("audio_duration: ")
    assert page.text_content("#form-error") == answer.json()["detail"]
    assert page.is_hidden("#job-panel") and page.is_enabled("#submit")


def test_the_page_fits_a_phone(web_app, open_page, artifacts, capsys, record_property):
    page, _ = open_page(web_app + "/", viewport={"width": 390, "height": 844}, device_scale_factor=3,
                        is_mobile=True, has_touch=True)
    fill_form(page, {**SHORT, "audio_format": "wav"})
    page.click("#submit")
    wait_for_player(page)
    assert_drawn(page)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    width = page.locator("canvas.spectrogram").evaluate("c => c.width")
    assert width == 3 * page.locator("canvas.spectrogram").evaluate("c => c.clientWidth")  # sharp: device pixels
    save_screenshot(page, artifacts, "page-phone.png", capsys, record_property)


# -- API keys -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed_app(serve_http, tmp_path_factory):
    root = tmp_path_factory.mktemp("web-keys")
    args = {"name": "web-keys", "queue": {"default_duration_s": 2.0},
            "files": {"output_dir": str(root / "results"), "upload_dir": str(root / "uploads"),
                      "journal_path": str(root / "registry.sqlite3")},
            "auth": {"api_key_sha256": [hashlib.sha256(KEY.encode()).hexdigest()]}}
    with deployed(args, "web-keys", "/keyed", serve_http) as url:
        yield url


def test_with_api_keys_the_page_loads_and_asks_for_one(keyed_app, open_page):
    for path in ("", "/", "/web/app.js", "/web/style.css", "/health"):  # no data in them: no key needed
        assert httpx.get(keyed_app + path, follow_redirects=True).status_code == 200, path
    for path in ("/web/nope.js", "/web/index.html/x", "/v1/models", "/v1/audio?path=x", "/x/"):
        assert httpx.get(keyed_app + path).status_code == 401, path

    page, log = open_page(keyed_app + "/")
    log.expect_status(401)
    page.wait_for_selector("#key-panel:not([hidden])")
    page.fill("#api-key", "wrong")
    page.click("#key-form button")
    page.wait_for_function("document.getElementById('key-message').textContent.includes('refused')")
    assert page.locator("#model option").count() == 0

    page.fill("#api-key", KEY)
    page.click("#key-form button")
    fill_form(page, {**SHORT, "audio_format": "flac"})
    assert page.is_hidden("#key-panel")
    page.click("#submit")
    wait_for_player(page)  # the event stream and the audio, fetched with the key
    assert_drawn(page)
    assert page.evaluate("sessionStorage.getItem('acestep.apiKey')") == KEY
