"""The API documents itself (issue 14): in the app's own /openapi.json every request field and parameter has a
description and an example and every number its range, every error a route answers is an ErrorResponse; /docs and
/redoc load nothing from outside, and the body Swagger UI's "Try it out" sends is a job the server runs."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.deployments.conftest import wait_for

ERROR = {"$ref": "#/components/schemas/ErrorResponse"}
# Numbers bounded on one side only, and why: (field, the missing side).
ONE_SIDED = {("repainting_end", "minimum"): "any negative value means the source's end",
             ("audio_code_string", "maximum"): "the codebook is the model's, checked at submit"}
# Operations that call the job registry or the language model: a 503 when it is unavailable or fails.
CALLS_SERVICES = {("post", "/v1/music/generate"), ("get", "/v1/jobs/{job_id}"), ("get", "/v1/jobs/{job_id}/events"),
                  ("post", "/v1/jobs/{job_id}/cancel"), ("get", "/v1/stats"), ("post", "/release_task"),
                  ("post", "/query_result"), ("post", "/format_input"), ("post", "/v1/create_sample")}
# Operations that read a body (documented or not): 400 for a malformed one, 413 and 415.
READS_BODY = {("post", "/v1/music/generate"), ("post", "/release_task"), ("post", "/query_result"),
              ("post", "/v1/lora/load"), ("post", "/v1/lora/toggle"), ("post", "/format_input"),
              ("post", "/v1/create_sample"), ("post", "/create_random_sample")}


@pytest.fixture(scope="module")
def spec(client) -> dict[str, Any]:
    return client.get("/openapi.json").json()


def operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


def numbers(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The numeric (sub)schemas a value may take: through anyOf/oneOf and array items; enums are ranges already."""
    if schema.get("type") in ("integer", "number") and "enum" not in schema:
        yield schema
    for option in schema.get("anyOf", []) + schema.get("oneOf", []):
        yield from numbers(option)
    if isinstance(schema.get("items"), dict):
        yield from numbers(schema["items"])


def unbounded(name: str, schema: dict[str, Any]) -> list[str]:
    """The sides (minimum, maximum) a numeric field leaves open, bar the `ONE_SIDED` ones."""
    open_sides = []
    for number in numbers(schema):
        for side in ("minimum", "maximum"):
            exclusive = "exclusive" + side.capitalize()
            if side not in number and exclusive not in number and (name, side) not in ONE_SIDED:
                open_sides.append(f"{name}: no {side} in {number}")
    return open_sides


def test_every_request_field_has_a_description_an_example_and_its_range(spec):
    problems, fields = [], 0
    for method, path, operation in operations(spec):
        where = f"{method.upper()} {path}"
        for parameter in operation.get("parameters", []):
            fields += 1
            name, schema = parameter["name"], parameter["schema"]
            if not parameter.get("description"):
                problems.append(f"{where} parameter {name}: no description")
            if not ("example" in parameter or parameter.get("examples") or schema.get("examples")):
                problems.append(f"{where} parameter {name}: no example")
            problems += [f"{where} parameter {p}" for p in unbounded(name, schema)]
        for media, content in operation.get("requestBody", {}).get("content", {}).items():
            for name, prop in content["schema"]["properties"].items():
                fields += 1
                if not prop.get("description"):
                    problems.append(f"{where} {media} {name}: no description")
                if not prop.get("examples") and prop.get("format") != "binary":  # a file upload has no example
                    problems.append(f"{where} {media} {name}: no example")
                problems += [f"{where} {media} {p}" for p in unbounded(name, prop)]
    assert not problems, "\n".join(problems)
    assert fields > 150  # the walk saw the generate request's fields, in each of its three media types


def test_ranges_are_published_as_validated(spec):
    """The bounds pydantic checks are the schema's, including one checked in code (timesteps in (0, 1])."""
    body = spec["paths"]["/v1/music/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    first = {name: prop["anyOf"][0] for name, prop in body["properties"].items()}
    assert (first["bpm"]["minimum"], first["bpm"]["maximum"]) == (30, 300)
    assert (first["audio_duration"]["minimum"], first["audio_duration"]["maximum"]) == (1.0, 600.0)
    assert first["lm_top_p"]["exclusiveMinimum"] == 0.0 and first["caption"]["maxLength"] == 4096
    assert first["task_type"]["enum"] == ["text2music", "cover", "repaint", "lego", "extract", "complete"]
    assert first["timesteps"]["items"]["anyOf"][0] == {"type": "number", "exclusiveMinimum": 0.0, "maximum": 1.0}
    wait = spec["paths"]["/v1/jobs/{job_id}"]["get"]["parameters"][1]
    assert (wait["name"], wait["schema"]["minimum"], wait["schema"]["maximum"]) == ("wait", 0.0, 30.0)


def test_every_error_a_route_answers_is_documented(spec):
    problems = []
    for method, path, operation in operations(spec):
        where = f"{method.upper()} {path}"
        errors = {int(status): response for status, response in operation["responses"].items() if int(status) >= 400}
        problems += [f"{where} {status}: not an ErrorResponse" for status, response in errors.items()
                     if response["content"]["application/json"]["schema"] != ERROR]
        expected = set()
        if operation.get("security") != []:  # the API-key middleware
            expected.add(401)
        if operation.get("parameters"):
            expected.add(422)
        if (method, path) in READS_BODY:
            expected |= {400, 413, 415}
        if (method, path) in CALLS_SERVICES:
            expected.add(503)
        problems += [f"{where}: {status} not documented" for status in sorted(expected - set(errors))]
    assert not problems, "\n".join(problems)
    assert {(m, p) for m, p, _ in operations(spec)} >= READS_BODY | CALLS_SERVICES  # the lists name real routes


def test_the_schema_declares_the_api_key(spec):
    scheme = spec["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer") and "Authorization: Bearer" in scheme["description"]
    assert spec["security"] == [{"bearerAuth": []}, {}]  # optional: only a server with keys asks for one
    assert spec["paths"]["/health"]["get"]["security"] == spec["paths"]["/readyz"]["get"]["security"] == []


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_nothing_from_outside(client, page):
    response = client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    urls = re.findall(r'(?:src|href|spec-url)="([^"]+)"|url: \'([^\']+)\'', response.text)
    urls = [a or b for a, b in urls]
    assert "/openapi.json" in urls and len(urls) >= 3, response.text
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url  # this server's, not a CDN's
        loaded = client.get(url)
        assert loaded.status_code == 200 and len(loaded.content) > 1000, url
    assert "cdn" not in response.text.lower()


def test_asset_route_serves_its_files_only(client):
    assert client.get("/docs/assets/swagger-ui-bundle.js").headers["content-type"].startswith("text/javascript")
    for bad in ("/docs/assets/nothing.js", "/docs/assets/../core.py", "/docs/assets/%2e%2e/core.py"):
        assert client.get(bad).status_code == 404, bad


def test_try_it_out_sends_a_quick_job(client, spec):
    """The body Swagger UI fills in for POST /v1/music/generate is one this server runs, quickly."""
    content = spec["paths"]["/v1/music/generate"]["post"]["requestBody"]["content"]["application/json"]
    example = next(iter(content["examples"].values()))["value"]
    assert example["audio_duration"] <= 10 and example["batch_size"] == 1
    response = client.post("/v1/music/generate", json=example)
    assert response.status_code == 200, response.text
    view = wait_for(client, response.json()["job_id"])
    assert view["status"] == "succeeded", view
    assert client.get(view["result"]["audio_paths"][0]).status_code == 200
