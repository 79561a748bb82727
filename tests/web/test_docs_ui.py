"""/docs as a person uses it, in a real headless Chromium against the tiny app under the route prefix /page: Swagger UI
loads from the app alone, POST /v1/music/generate's "Try it out" and "Execute" submit its example job, GET
/v1/jobs/{job_id} shows it, and the job finishes."""

from __future__ import annotations

import re

import httpx

from tests.deployments.conftest import wait_for

UUID = re.compile(r'"job_id":\s*"([0-9a-f-]{36})"')


def execute(operation) -> str:
    """Expand an operation, "Try it out", "Execute": the response body Swagger UI shows."""
    operation.locator(".opblock-summary").click()
    operation.get_by_role("button", name="Try it out").click()
    operation.get_by_role("button", name="Execute").click()
    body = operation.locator(".live-responses-table .response-col_description pre").first
    body.wait_for()
    return body.inner_text()


def test_swagger_ui_runs_a_job(open_page, web_app, artifacts):
    outside = []
    page, _ = open_page(web_app + "/docs")
    page.on("request", lambda request: request.url.startswith(web_app) or outside.append(request.url))
    page.reload()  # with the listener: every request the page makes
    page.locator(".information-container .title").wait_for()
    assert "ACE-Step API" in page.locator(".information-container .title").inner_text()
    assert page.get_by_role("button", name=re.compile("Authorize")).is_visible()  # the bearer scheme

    submitted = execute(page.locator("#operations-default-generate_v1_music_generate_post"))
    job_id = UUID.search(submitted).group(1)
    page.screenshot(path=artifacts / "docs-generate-executed.png")

    job = page.locator("#operations-default-job_v1_jobs__job_id__get")
    job.locator(".opblock-summary").click()
    job.get_by_role("button", name="Try it out").click()
    job.locator('input[placeholder="job_id"]').fill(job_id)
    job.get_by_role("button", name="Execute").click()
    shown = job.locator(".live-responses-table .response-col_description pre").first
    shown.wait_for()
    assert f'"job_id": "{job_id}"' in shown.inner_text()
    assert outside == []  # nothing from a CDN, nothing outside the app's prefix

    with httpx.Client(base_url=web_app, timeout=30) as client:
        view = wait_for(client, job_id)
        assert view["status"] == "succeeded", view
        assert view["result"]["audio_paths"] and client.get(view["result"]["audio_paths"][0]).status_code == 200
