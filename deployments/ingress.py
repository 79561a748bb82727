"""HTTP ingress: parse and validate, store uploads, talk to the registry, serve result files. No model code."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import tempfile
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import parse_qs

from fastapi import HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import ValidationError
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments import docs_ui, envs, upstream_api, web
from deployments.events import EVENTS_RESPONSE, LAST_EVENT_ID, open_job_events
from deployments.logs import configure_replica_logging
from jobs.registry import MAX_WAIT_S, TERMINAL, RegistryClient
from jobs.schemas import (MAX_SEED, SOURCE_TASKS, ErrorResponse, GenerateRequest, JobSubmitted, JobView,
                          ReadyResponse, describe_validation_error, generate_request_schema, normalize_payload)
from jobs.storage import ResultStore, UploadStore
from jobs.webhooks import WebhookRefused, check_target, signing_secret
from models.audio_io import MEDIA_TYPES, AudioDecodeError, AudioTooLongError, media_type, probe_audio
from models.loading import (COVER_FROM_SOURCE_PARTS, VARIANT_TASKS, AudioCodeSpec, ModelConfig, audio_code_spec,
                            has_parts, model_variant)
from models.lora import UnknownAdapterError, adapter_path, available_adapters

if TYPE_CHECKING:
    from deployments.app import AppArgs

logger = logging.getLogger(__name__)

UPLOAD_FIELDS = {"reference_audio": "reference_audio", "src_audio": "src_audio",
                 "ref_audio": "reference_audio", "ctx_audio": "src_audio"}  # upstream HEAD's spellings too
PROBES = ("/health", "/readyz")
BODY_TOKEN = "acestep.body_token"  # scope key: the middleware found no valid key in the header; the body's ai_token
FINISHED_CACHE_SIZE = 10_000  # finished jobs' views kept in each ingress replica (a few KB each)
UNSUPPORTED = ("Unsupported Content-Type: {}; use application/json, application/x-www-form-urlencoded, or "
               "multipart/form-data")

# /docs (Swagger UI) and /redoc load their files from this app, not a CDN (deployments/docs_ui.py).
api = docs_ui.docs_app(title="ACE-Step API", version="1.0", description="ACE-Step 1.5 music generation jobs.")


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _route(scope: dict[str, Any]) -> str:
    return scope["path"].removeprefix(scope.get("root_path", ""))  # the app may sit under a prefix


def _error_at(scope: dict[str, Any], status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """`{"detail"}`; on upstream v2's own routes also its envelope, with `code` and `error`."""
    if _route(scope) in upstream_api.ROUTES:
        return JSONResponse(upstream_api.error_envelope(status, detail), status_code=status, headers=headers)
    return _error(status, detail, headers)


@api.exception_handler(RequestValidationError)
async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"][1:]) or "request"
    return _error_at(request.scope, 422, f"{field}: {first['msg']}")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error_at(request.scope, exc.status_code, str(exc.detail), getattr(exc, "headers", None))


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error")
    return _error_at(request.scope, 500, "Internal Server Error")


@api.exception_handler(ray.exceptions.RayActorError)
@api.exception_handler(ray.exceptions.ActorUnavailableError)
async def _registry_down(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("job registry unavailable: %s", exc)
    return _error_at(request.scope, 503, "Job registry unavailable; retry shortly", {"Retry-After": "2"})


def _unauthorized() -> HTTPException:
    return HTTPException(401, "Missing or invalid API key", {"WWW-Authenticate": "Bearer"})


def _key_ok(key: Any) -> bool:
    """Whether `key` is one of the configured API keys (compared as SHA-256 digests, in constant time)."""
    if not isinstance(key, str):
        return False
    digest = hashlib.sha256(key.strip().encode("utf-8", "surrogatepass")).hexdigest()  # JSON may carry "\ud800"
    return any(hmac.compare_digest(digest, d) for d in envs.API_KEY_SHA256)


class RequireApiKey:
    """With API keys configured, everything but the probes (/health, /readyz: load balancers and kubelets send no
    key), the web page's files (`web.is_public`) and the API docs (`docs_ui.PUBLIC_PATHS`), which hold no data, needs
    `Authorization: Bearer <key>`; on upstream v2's `/release_task` and `/query_result` the key may come as the body's
    `ai_token` instead, which the route checks once it has read the body. A plain ASGI middleware: without keys a
    request passes straight through (Starlette's `@app.middleware("http")` costs a task group and a stream per
    request, ~5 % of a poll)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        digests = envs.API_KEY_SHA256  # module state: Serve runs a frozen copy of `api`, so not `api.state`
        if scope["type"] == "http" and digests:
            path = _route(scope)
            if path not in PROBES and not web.is_public(path) and path not in docs_ui.PUBLIC_PATHS:
                header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
                scheme, _, key = header.partition(" ")
                if scheme.lower() != "bearer" or not _key_ok(key):
                    if path in upstream_api.BODY_TOKEN_ROUTES:
                        scope[BODY_TOKEN] = True
                    else:
                        response = _error_at(scope, 401, "Missing or invalid API key", {"WWW-Authenticate": "Bearer"})
                        return await response(scope, receive, send)
        await self.app(scope, receive, send)


api.add_middleware(RequireApiKey)
api.include_router(web.router)  # the web page at `/` (deployments/web.py)


def _request_body(schema: dict[str, Any], files: dict[str, str] | None = None, multipart: bool = True,
                  examples: dict[str, Any] | None = None) -> dict[str, Any]:
    """An OpenAPI requestBody: `schema` as JSON and as a form, and as multipart with `files` (name: description)
    added; `examples` (OpenAPI Example Objects by name) for each: the first is the JSON body Swagger UI's "Try it out"
    starts from (its form views start from each field's own example)."""
    content = {"application/json": {"schema": schema}, "application/x-www-form-urlencoded": {"schema": schema}}
    if multipart:
        uploads = {name: {"type": "string", "format": "binary", "description": text}
                   for name, text in (files or {}).items()}
        content["multipart/form-data"] = {"schema": {**schema, "properties": {**schema["properties"], **uploads}}}
    if examples:
        for media in content.values():
            media["examples"] = examples
    return {"required": True, "content": content}  # no body, no Content-Type: 415


_REQUEST_SCHEMA = generate_request_schema()  # GenerateRequest's, widened to what the server accepts (upstream's)
_UPLOAD = "at most the server's files.max_upload_bytes (413 above), of no more than its queue.max_duration_s seconds"
_UPLOADS = {"reference_audio": f"Reference audio for timbre (cover), as a file upload: {_UPLOAD}.",
            "src_audio": f"Source audio (cover, repaint, lego, extract, complete), as a file upload: {_UPLOAD}."}
# "Try it out"'s body in /docs: a short, cheap job (the tiny preset makes it in seconds on a CPU).
QUICK_JOB = {"caption": "upbeat lo-fi hip hop with mellow piano", "audio_duration": 10, "inference_steps": 8,
             "batch_size": 1, "audio_format": "mp3"}
_EXAMPLES = {"quick": {"summary": "10 s of music, one output", "value": QUICK_JOB}}
_REQUEST_BODY = _request_body(_REQUEST_SCHEMA, _UPLOADS, examples=_EXAMPLES)
# Upstream v2 reads any value of `ai_token` (it matters only with API keys configured, as the key).
_AI_TOKEN = {"description": "The API key, instead of `Authorization: Bearer <key>` (only with API keys configured).",
             "examples": ["my-api-key"]}
_RELEASE_TASK_BODY = _request_body(
    {**_REQUEST_SCHEMA, "properties": {**_REQUEST_SCHEMA["properties"], "ai_token": _AI_TOKEN}},
    {**_UPLOADS, "ref_audio": "Upstream's name for reference_audio.", "ctx_audio": "Upstream's name for src_audio."},
    examples=_EXAMPLES)
_QUERY_RESULT_BODY = _request_body({"type": "object", "properties": {
    "task_id_list": {"description": "Task ids: a JSON array, or a string holding one (as a form field); absent "
                                    f"or null: none. At most {upstream_api.MAX_TASK_IDS}.",
                     "anyOf": [{"type": "array", "items": {"type": "string"}, "maxItems": upstream_api.MAX_TASK_IDS},
                               {"type": "string"}, {"type": "null"}],
                     "examples": [["7c9e6679-7425-40de-944b-e07fc1f90ae7"]]},
    "ai_token": _AI_TOKEN}}, multipart=False)


# Parameters, as defaults rather than `Annotated` aliases (Serve pickles the ingress' methods; see deployments/events).
JOB_ID = PathParam(description="The job's id, as `POST /v1/music/generate` (or `/release_task`) answered it. Ids are "
                               "at most 64 characters; an id this server does not know is a 404.",
                   openapi_examples={"job": {"value": "7c9e6679-7425-40de-944b-e07fc1f90ae7"}})


def _errors(described: dict[int, str]) -> dict[int, dict[str, Any]]:
    """`responses=` entries for error statuses: each answers an ErrorResponse (`{"detail": "..."}`)."""
    return {status: {"model": ErrorResponse, "description": text} for status, text in described.items()}


def _submit_errors(also_400: str) -> dict[int, dict[str, Any]]:
    """The error answers of a submit route (both APIs'), its own last kind of 400 named."""
    return _errors({400: "Bad input: malformed body, unknown choice (audio_format, task_type, model), unreadable "
                         f"audio, a task the model does not serve or without the audio it needs, {also_400}",
                    403: "A *_audio_path outside the allowed input directories",
                    409: "Idempotency-Key already used with a different request",
                    413: "Body, upload or *_audio_path file over the limit",
                    415: "Unsupported Content-Type",
                    422: "A value out of range or of the wrong type, or over this server's limits",
                    429: "Queue full; retry after Retry-After seconds"})


# 401: every route but the probes, once API keys are configured (the middleware). Every error body is an
# ErrorResponse, 422 included (our one-line detail, not FastAPI's HTTPValidationError list).
_AUTH = _errors({401: "Missing or invalid API key (only when API keys are configured)"})
_BODY_ERRORS = {413: "Body over the limit", 415: "Unsupported Content-Type"}
_LM_ERRORS = {503: "The language model failed; retry"}
_REGISTRY = _errors({503: "Job registry unavailable; retry after Retry-After seconds"})


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (never buffered past it)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"Request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"Request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json(body: bytes, message: str) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise HTTPException(400, f"{message}: {str(exc)[:120]}") from exc
    if not isinstance(payload, dict):
        raise HTTPException(400, "JSON payload must be an object")
    return payload


def _parse_urlencoded(body: bytes) -> dict[str, Any]:
    try:
        parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=256)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HTTPException(400, f"Invalid form body: {exc}") from exc
    return {key: values[0] for key, values in parsed.items()}


def _idempotency(request: Request, params: GenerateRequest, uploads: dict[str, "Upload"]) -> tuple[str, str] | None:
    """(Idempotency-Key, fingerprint of the request): the normalised parameters and the uploaded bytes."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255:
        raise HTTPException(400, "Idempotency-Key must be 1 to 255 characters")
    digest = hashlib.sha256(json.dumps(params.model_dump(mode="json"), sort_keys=True).encode())
    for field in sorted(uploads):
        digest.update(field.encode() + uploads[field].sha256)
    return key, digest.hexdigest()


class Upload:
    """An uploaded file, copied in chunks from the request's spooled part to a local temporary file (hashed on the
    way), never held in memory whole; probed there, then copied to the upload store."""

    def __init__(self, field: str, part: UploadFile, limit: int):
        self.file = tempfile.NamedTemporaryFile(prefix="acestep-upload-")
        digest, size = hashlib.sha256(), 0
        part.file.seek(0)
        while chunk := part.file.read(1024 * 1024):
            size += len(chunk)
            if size > limit:
                self.close()
                raise HTTPException(413, f"{field}: upload exceeds the limit of {limit} bytes")
            digest.update(chunk)
            self.file.write(chunk)
        self.file.flush()
        self.path, self.sha256 = Path(self.file.name), digest.digest()

    def close(self) -> None:
        self.file.close()


class FinishedViews:
    """The JSON of finished jobs' views, which never change again: polls of a finished job are answered here, not by
    the registry. Least recently used out first; an entry lasts as long as the registry keeps the job."""

    def __init__(self, retention_s: float, size: int = FINISHED_CACHE_SIZE):
        self.retention_s, self.size = retention_s, size
        self.views: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    def get(self, job_id: str) -> bytes | None:
        entry = self.views.get(job_id)
        if entry is None:
            return None
        if entry[1] + self.retention_s < time.time():  # the registry has forgotten it by now
            del self.views[job_id]
            return None
        self.views.move_to_end(job_id)
        return entry[0]

    def put(self, job_id: str, body: bytes, finished_at: float) -> None:
        self.views[job_id] = (body, finished_at)
        if len(self.views) > self.size:
            self.views.popitem(last=False)


def _seeds(params: GenerateRequest) -> list[int]:
    """`seed, seed+1, ...` when the client fixed one, or upstream's list of one seed per output (-1 or a missing one
    random); otherwise fresh random seeds (reported in seed_value)."""
    n = params.num_outputs
    if isinstance(params.seed, list):
        chosen = [] if params.use_random_seed else params.seed
        return [chosen[i] if i < len(chosen) and chosen[i] >= 0 else secrets.randbelow(MAX_SEED + 1) for i in range(n)]
    if params.use_random_seed or params.seed < 0:
        return [secrets.randbelow(MAX_SEED + 1) for _ in range(n)]
    return [params.seed + i for i in range(n)]


@dataclass(frozen=True)
class ServedModel:
    """What the ingress checks a request against, per model: the task types its variant serves, whether it reads
    audio codes (None: it cannot) and covers from a source."""

    name: str
    variant: str  # turbo, sft or base
    tasks: tuple[str, ...]
    audio_codes: AudioCodeSpec | None
    can_cover_from_source: bool
    lora_dir: str | None  # its LoRA adapters, one subdirectory each (None: it serves none)

    @classmethod
    def of(cls, model: ModelConfig) -> "ServedModel":
        variant = model_variant(model)
        return cls(model.name, variant, tuple(VARIANT_TASKS[variant]), audio_code_spec(model),
                   has_parts(model, COVER_FROM_SOURCE_PARTS), model.lora_dir)


# Long-polls (`GET /v1/jobs/{id}?wait=S`) hold a request each while they wait: room for many.
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(api)
class Ingress:
    async def __init__(self, args: AppArgs, driver: DeploymentHandle, stages: dict[str, DeploymentHandle]):
        configure_replica_logging()
        self.args = args
        self.driver = driver  # keeps the driver in the application graph; the ingress never calls it
        self.stages = stages
        self.registry = RegistryClient(args.name, args.queue, args.files)
        await self.registry.call("configure", args.queue, args.files)  # it may have outlived an older config
        envs.API_KEY_SHA256[:] = [d.lower() for d in args.auth.api_key_sha256] + envs.ACESTEP_API_KEY_SHA256
        self.store = ResultStore(args.files.output_dir, args.files.storage_options)
        self.uploads = UploadStore(args.files.upload_dir, args.files.storage_options)
        self.served = {m.name: ServedModel.of(m) for m in args.served_models()}  # the default first
        self.default = args.model.name
        self.lm_name = args.lm.name if args.lm else None  # the 5 Hz LM, when the app runs one
        self.allowed_inputs = [Path(d).resolve() for d in args.files.allowed_input_dirs]
        self.finished = FinishedViews(args.queue.retention_s)
        self.models_loaded = False  # every stage has loaded its model (`_models_loaded`)

    # -- endpoints ------------------------------------------------------------------------------------------------
    @api.post("/v1/music/generate", openapi_extra={"requestBody": _REQUEST_BODY}, responses={
        200: {"model": JobSubmitted, "description": "Queued (or, for a repeated Idempotency-Key, the existing job)",
              "links": {"GetJob": {"operationId": "job_v1_jobs__job_id__get",
                                   "parameters": {"job_id": "$response.body#/job_id"}},
                        "CancelJob": {"operationId": "cancel_v1_jobs__job_id__cancel_post",
                                      "parameters": {"job_id": "$response.body#/job_id"}}}},
        **_submit_errors("a bad Idempotency-Key"), **_AUTH, **_REGISTRY})
    async def generate(self, request: Request) -> JSONResponse:
        answer = await self._submit(request, *await self._parse_body(request))
        return JSONResponse({k: answer[k] for k in ("job_id", "status", "queue_position")})

    async def _submit(self, request: Request, raw: dict[str, Any], uploads: dict[str, Upload],
                      check: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Both APIs' submit: `check` the raw body (a route's own rules), validate, check limits and inputs, store the
        uploads, enqueue; the registry's answer (`job_id`, `status`, `queue_position`). Errors raise, and each route
        answers them in its shape (`_error_at`). Closes the uploads."""
        try:
            if check is not None:
                check(raw)
            return await self._enqueue(request, raw, uploads)
        finally:
            for upload in uploads.values():
                upload.close()

    async def _enqueue(self, request: Request, raw: dict[str, Any], uploads: dict[str, Upload]) -> dict[str, Any]:
        try:
            params = GenerateRequest.model_validate(normalize_payload(raw))
        except ValidationError as exc:
            raise HTTPException(*describe_validation_error(exc)) from None
        self._check_limits(params)
        if params.webhook is not None:
            await self._check_webhook(params.webhook)
        idempotency = _idempotency(request, params, uploads)
        job_id = str(uuid.uuid4())
        inputs, seconds = {}, {}
        for field in ("src_audio", "reference_audio"):
            inputs[field], seconds[field] = await self._input_audio(field, uploads.get(field),
                                                                    getattr(params, f"{field}_path"))
        self._check_task(params, inputs)
        if params.audio_duration is None and not params.audio_code_string:  # the source's length is the job's
            self._check_cost(params, seconds["src_audio"])
        stored = [field for field in uploads if inputs.get(field)]
        try:
            for field in stored:
                key = self.uploads.key(job_id, field)
                await asyncio.to_thread(self._store_upload, key, uploads[field].path)
                inputs[field] = {"upload": key}
            # `model`: a further model's name (its stages run the job), None for the default model's.
            model = self._model(params).name
            spec = {"request": params.model_dump(mode="json"), "seeds": _seeds(params),
                    "model": None if model == self.default else model, **inputs}
            answer = await self.registry.call("submit", job_id, spec,
                                              f"{self.args.files.upload_dir}/{job_id}" if stored else None,
                                              idempotency)
        except BaseException:
            if stored:
                await asyncio.to_thread(self.uploads.delete_job, job_id)
            raise
        if stored and (not answer["accepted"] or answer.get("duplicate")):  # refused, or the key's job exists
            await asyncio.to_thread(self.uploads.delete_job, job_id)
        if "conflict" in answer:
            raise HTTPException(409, f"Idempotency-Key already used for job {answer['conflict']} with a different "
                                     f"request")
        if not answer["accepted"]:
            raise HTTPException(429, "Server busy: queue is full", {"Retry-After": str(answer["retry_after_s"])})
        return answer

    def _store_upload(self, key: str, path: Path) -> None:
        with path.open("rb") as handle:
            self.uploads.put(key, handle)

    @api.get("/v1/jobs/{job_id}", response_model=JobView, responses={
        **_errors({404: "Job not found", 422: "Invalid parameters"}), **_AUTH, **_REGISTRY})
    async def job(self, job_id: str = JOB_ID, wait: float = Query(0.0, ge=0.0, le=MAX_WAIT_S, description=(
            f"Long-poll, 0 to {MAX_WAIT_S:g} s: answer as soon as the job's status, place in line, stage or step "
            "changes, or after this many seconds (a finished job at once). 0: answer at once."),
            openapi_examples={"now": {"summary": "at once", "value": 0}, "long-poll": {"value": 10}})) -> Response:
        """The job's status, place in line, ETA, progress and result."""
        cached = self.finished.get(job_id)
        if cached is not None:
            return Response(cached, media_type="application/json")
        view = await self.registry.call("view", job_id, wait) if len(job_id) <= 64 else None
        if view is None:
            return _error(404, "Job not found")
        response = JSONResponse(view)
        if view["status"] in TERMINAL:
            self.finished.put(job_id, response.body, view["finished_at"])
        return response

    # Each open stream holds one of this deployment's max_ongoing_requests (1024) until the job ends.
    @api.get("/v1/jobs/{job_id}/events", response_class=Response, responses={
        200: EVENTS_RESPONSE, **_errors({404: "Job not found", 422: "Invalid parameters"}), **_AUTH, **_REGISTRY})
    async def job_events(self, job_id: str = JOB_ID, last_event_id: str | None = LAST_EVENT_ID) -> Response:
        """Server-Sent Events: the job's view at once and on every change, ending with its final view."""
        stream = await open_job_events(self.registry, self.finished, job_id, last_event_id)
        return _error(404, "Job not found") if stream is None else stream

    @api.post("/v1/jobs/{job_id}/cancel", response_model=JobView, responses={
        **_errors({404: "Job not found", 409: "Job already finished", 422: "Invalid parameters"}), **_AUTH,
        **_REGISTRY})
    async def cancel(self, job_id: str = JOB_ID) -> JSONResponse:
        """Cancel a queued or running job; a running one stops at its next diffusion step."""
        status = await self.registry.call("cancel", job_id) if len(job_id) <= 64 else None
        if status is None:
            return _error(404, "Job not found")
        if status != "canceled":
            return _error(409, f"Job already {status}")
        return JSONResponse(await self.registry.call("view", job_id))

    @api.get("/v1/audio", response_class=Response, responses={
        200: {"description": "The audio file", "content": {media: {} for media in MEDIA_TYPES.values()}},
        **_errors({403: "Not a result of this service", 404: "Audio file not found",
                   422: "Missing or too long `path`"}), **_AUTH})
    async def audio(self, path: str = Query(..., max_length=256, description=(
            "A result file's key, `<job_id>/<index>.<extension>`, as the job's `result.audio_paths` links to it "
            "(403 for anything else, 404 once its job has expired)."),
            openapi_examples={"first output": {"value": "7c9e6679-7425-40de-944b-e07fc1f90ae7/0.mp3"}})) -> Response:
        if not self.store.is_key(path):
            return _error(403, "Access denied: path is not a result of this service")
        mime = media_type(path.rsplit(".", 1)[1])
        if self.store.is_local:
            file = self.store.local_path(path)
            return _error(404, "Audio file not found") if file is None else FileResponse(file, media_type=mime)
        data = await asyncio.to_thread(self.store.get, path)
        return _error(404, "Audio file not found") if data is None else Response(data, media_type=mime)

    # Paths both APIs share answer in one shape: the seed API's fields, and upstream v2's envelope beside them.
    @api.get("/health", responses={200: {"model": upstream_api.HealthResponse, "description": "Alive"}},
             openapi_extra={"security": []})  # the probes need no key, even where the server has keys
    async def health(self) -> JSONResponse:
        """Liveness (no key needed). `data` is upstream v2's health record: `models_initialized` says whether every
        stage has loaded its model (`/readyz` is the readiness probe)."""
        seed = {"status": "ok", "service": "ACE-Step API", "version": "1.0"}
        loaded = await self._models_loaded()
        data = {**seed, "models_initialized": loaded, "llm_initialized": loaded and self.lm_name is not None,
                "loaded_model": self.default, "loaded_lm_model": self.lm_name}
        return JSONResponse(upstream_api.shared(seed, data))

    @api.get("/readyz", responses={200: {"model": ReadyResponse, "description": "Ready"},
                                   **_errors({503: "A stage has no ready replica"})}, openapi_extra={"security": []})
    async def readyz(self) -> JSONResponse:
        """200 once every stage has a replica that loaded its model and ran a warm-up step; 503 before."""
        missing = await self._not_ready(2.0)
        if missing:
            return _error(503, f"not ready: {', '.join(missing)}")
        self.models_loaded = True
        return JSONResponse({"status": "ready", "stages": list(self.stages)})

    @api.get("/v1/models", responses={200: {"model": upstream_api.ModelsResponse, "description": "The models"},
                                      **_AUTH})
    async def models(self) -> JSONResponse:
        seed = {"models": [self._model_entry(name) for name in self.served], "default_model": self.default}
        return JSONResponse(upstream_api.shared(seed, seed))

    def _model_entry(self, name: str) -> dict[str, Any]:
        return {"name": name, "is_default": name == self.default,
                "supported_task_types": list(self.served[name].tasks)}

    @api.get("/v1/stats", responses={200: {"model": upstream_api.StatsResponse, "description": "Counts"},
                                     **_AUTH, **_REGISTRY})
    async def stats(self) -> JSONResponse:
        """Upstream HEAD's counts, plus running replicas per deployment of this application; `data` holds upstream
        v2's counts."""
        stats = await self.registry.call("stats")
        app = serve.get_replica_context().app_name
        status = await asyncio.to_thread(serve.status)
        deployments = status.applications[app].deployments if app in status.applications else {}
        stats["replicas"] = {name: d.replica_states.get("RUNNING", 0) for name, d in deployments.items()}
        data = {key: stats[key] for key in ("jobs", "queue_size", "queue_maxsize", "avg_job_seconds")}
        return JSONResponse(upstream_api.shared(stats, data))

    async def _not_ready(self, timeout_s: float) -> list[str]:
        """The stages without a replica that loaded its model and ran a warm-up step."""
        names = list(self.stages)
        answers = await asyncio.gather(*(asyncio.wait_for(self.stages[n].ready.remote(), timeout_s) for n in names),
                                       return_exceptions=True)
        return [n for n, ok in zip(names, answers) if ok is not True]

    async def _models_loaded(self) -> bool:
        """Whether every stage has loaded its model; once true, remembered (models are not unloaded; a replica that
        dies is `/readyz`'s to report), so a probe of `/health` costs no stage calls."""
        if not self.models_loaded:
            self.models_loaded = not await self._not_ready(0.5)
        return self.models_loaded

    # -- upstream ACE-Step 1.5's current API ("v2"): the same jobs, in its envelope (deployments/upstream_api.py) --
    @api.post("/release_task", openapi_extra={"requestBody": _RELEASE_TASK_BODY}, responses={
        200: {"model": upstream_api.ReleaseTaskResponse, "description": "Queued: poll it with /query_result"},
        **_submit_errors("a parameter needing upstream's language model"), **_AUTH, **_REGISTRY})
    async def release_task(self, request: Request) -> JSONResponse:
        """Upstream v2's submit: the parameters of `POST /v1/music/generate` under upstream's names (`prompt`,
        `duration`, `keyscale`, camelCase, nested `metas`, `seed` as "11,12", uploads `ref_audio`/`ctx_audio`).
        Errors come in the envelope, `code` = the HTTP status, `error` = `detail`."""
        answer = await self._submit(request, *await self._parse_authorized(request), upstream_api.check_supported)
        return JSONResponse(upstream_api.envelope(upstream_api.submitted(answer)))

    @api.post("/query_result", openapi_extra={"requestBody": _QUERY_RESULT_BODY}, responses={
        200: {"model": upstream_api.QueryResultResponse, "description": "One item per asked id, in order"},
        **_errors({400: "task_id_list is not a JSON array of ids, or has too many", **_BODY_ERRORS}), **_AUTH,
        **_REGISTRY})
    async def query_result(self, request: Request) -> JSONResponse:
        """Upstream v2's poll of any jobs, submitted by either API: status 0 queued or running, 1 succeeded, 2 failed,
        canceled or unknown; `result` a JSON string of per-file items."""
        raw, uploads = await self._parse_authorized(request)
        for upload in uploads.values():
            upload.close()
        task_ids = upstream_api.parse_task_ids(raw.get("task_id_list"))
        known = [task_id for task_id in task_ids if len(task_id) <= 64]  # longer ones were never ids of ours
        views = dict(zip(known, await self.registry.call("views", known))) if known else {}
        return JSONResponse(upstream_api.envelope([upstream_api.query_item(t, views.get(t)) for t in task_ids]))

    @api.get("/v1/model_inventory", responses={
        200: {"model": upstream_api.ModelInventoryResponse, "description": "The models"}, **_AUTH})
    async def model_inventory(self) -> JSONResponse:
        loaded = await self._models_loaded()
        models = [{**self._model_entry(name), "is_loaded": loaded} for name in self.served]
        return JSONResponse(upstream_api.envelope({"models": models, "default_model": self.default,
                                                   "lm_models": [self.lm_name] if self.lm_name else [],
                                                   "loaded_lm_model": self.lm_name,
                                                   "llm_initialized": loaded and self.lm_name is not None}))

    # Upstream's /v1/lora/* change the one model of its one process. Here adapters are per job (`lora`,
    # `lora_scale`) on every replica, so nothing global changes: `status` lists each model's adapters, `load` checks
    # that one is in the adapter directory (jobs may then name it), `unload` and `toggle` off answer what a job without
    # `lora` gets (the model as it is), and a global `toggle` on or `scale` is a 400 saying to set it per job.
    @api.get("/v1/lora/status", responses={200: {"description": "The adapters of each model"}, **_AUTH})
    async def lora_status(self) -> JSONResponse:
        adapters = {name: await asyncio.to_thread(available_adapters, model.lora_dir)
                    for name, model in self.served.items()}
        default = adapters[self.default]
        return JSONResponse(upstream_api.envelope({
            "lora_loaded": bool(default), "use_lora": False, "lora_scale": 1.0, "adapter_type": "lora",
            "scales": {}, "active_adapter": None, "adapters": default, "synthetic_default_mode": False,
            "per_request": True, "adapters_by_model": adapters}))

    @api.post("/v1/lora/load", responses={200: {"description": "The adapter is there: jobs may name it"},
                                          **_errors({400: "Not an adapter of the model's adapter directory",
                                                     **_BODY_ERRORS}), **_AUTH})
    async def lora_load(self, request: Request) -> JSONResponse:
        """Upstream's `{lora_path, adapter_name}`: `lora_path` is an adapter's name (or its directory inside the
        model's `lora_dir`; nothing outside it is read); `model` picks the model (default: the default one)."""
        raw, uploads = await self._parse_body(request)
        for upload in uploads.values():
            upload.close()
        asked = raw.get("model") or self.default
        model = self.served.get(asked) if isinstance(asked, str) else None
        if model is None:
            raise HTTPException(400, f"model: unknown model {asked!r}; available: {list(self.served)}")
        path = str(raw.get("lora_path") or raw.get("adapter_name") or "")
        name = path
        if model.lora_dir and "/" in path:  # a directory inside lora_dir names its adapter; any other path, none
            target = Path(path.replace("\0", "")).resolve()
            if target.parent != Path(model.lora_dir).resolve() or "\0" in path:
                raise HTTPException(400, f"lora_path: {path!r} is not an adapter directory of model {model.name!r}'s "
                                         f"lora_dir; adapters are read from there only")
            name = target.name
        try:
            await asyncio.to_thread(adapter_path, model.lora_dir, name)
        except UnknownAdapterError as exc:
            raise HTTPException(400, f"lora_path: {exc} (model {model.name!r})") from None
        return JSONResponse(upstream_api.envelope({
            "message": f"adapter {name!r} of model {model.name!r} is available: name it in a job's `lora` (with "
                       f"`lora_scale`); it loads on each DiT replica when a job needs it",
            "lora_path": path, "adapter_name": name}))

    @api.post("/v1/lora/unload", responses={200: {"description": "Jobs without `lora` run the model as it is"},
                                            **_AUTH})
    async def lora_unload(self) -> JSONResponse:
        return JSONResponse(upstream_api.envelope({"message": "adapters are per job here: a job without `lora` runs "
                                                              "the model without one"}))

    @api.post("/v1/lora/toggle", responses={200: {"description": "use_lora false: jobs without `lora` run none"},
                                            **_errors({400: "use_lora true: there is no global adapter to enable",
                                                       **_BODY_ERRORS}), **_AUTH})
    async def lora_toggle(self, request: Request) -> JSONResponse:
        raw, uploads = await self._parse_body(request)
        for upload in uploads.values():
            upload.close()
        if str(raw.get("use_lora")).lower() in ("false", "0"):
            return await self.lora_unload()
        raise HTTPException(400, "use_lora: adapters are per job here; name one in a job's `lora`")

    @api.post("/v1/lora/scale", responses={**_errors({400: "There is no global scale: set `lora_scale` per job"}),
                                           **_AUTH})
    async def lora_scale(self) -> JSONResponse:
        raise HTTPException(400, "scale: adapters are per job here; set the job's `lora_scale` (0 to 2)")

    # The LM's own routes (upstream's shapes, in its envelope): one LM job each, batched with the running jobs.
    @api.post("/format_input", responses={200: {"description": "The LM's caption, lyrics and metadata"},
                                          **_errors({400: "No LM on this server, or a malformed param_obj",
                                                     422: "A value out of range", **_BODY_ERRORS, **_LM_ERRORS}),
                                          **_AUTH})
    async def format_input(self, request: Request) -> JSONResponse:
        """Upstream's `{prompt, lyrics, temperature, param_obj}`: the LM rewrites caption and lyrics and adds the
        metadata `param_obj` leaves empty (what it gives is kept)."""
        raw = await self._lm_body(request)
        lm_request, given = upstream_api.format_request(raw, f"format-{uuid.uuid4().hex[:12]}")
        return JSONResponse(upstream_api.envelope(upstream_api.formatted(await self._run_lm(lm_request), given)))

    @api.post("/v1/create_sample", responses={200: {"description": "The LM's caption, lyrics and metadata"},
                                              **_errors({400: "No LM on this server", 422: "A value out of range",
                                                         **_BODY_ERRORS, **_LM_ERRORS}), **_AUTH})
    async def create_sample(self, request: Request) -> JSONResponse:
        """Upstream's `{query, instrumental, vocal_language, temperature}`: the LM writes a song's caption, lyrics
        and metadata from a description (sample mode)."""
        raw = await self._lm_body(request)
        lm_request, given = upstream_api.sample_request(raw, f"sample-{uuid.uuid4().hex[:12]}")
        return JSONResponse(upstream_api.envelope(upstream_api.sampled(await self._run_lm(lm_request), given)))

    @api.post("/create_random_sample", responses={200: {"description": "A built-in example"},
                                                  **_errors({400: "Unknown sample_type", **_BODY_ERRORS}), **_AUTH})
    async def create_random_sample(self, request: Request) -> JSONResponse:
        """Upstream's `{sample_type}`: a built-in example, `simple_mode` (a description for sample mode, the
        default) or `custom_mode` (a whole request). No LM needed."""
        raw, uploads = await self._parse_authorized(request)
        for upload in uploads.values():
            upload.close()
        return JSONResponse(upstream_api.envelope(upstream_api.random_sample(raw)))

    async def _lm_body(self, request: Request) -> dict[str, Any]:
        raw, uploads = await self._parse_authorized(request)
        for upload in uploads.values():
            upload.close()
        if self.lm_name is None:
            raise HTTPException(400, f"{request.url.path} needs the 5 Hz language model, which this server does not "
                                     f"run (its config has no `lm`)")
        return raw

    async def _run_lm(self, lm_request: Any) -> Any:
        try:
            result, _ = await self.stages["LanguageModel"].generate.remote(lm_request, 0, False)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, Exception) else exc
            if isinstance(cause, ValueError):  # the engine refused the request's values
                raise HTTPException(422, str(cause).splitlines()[0]) from None
            logger.error("language model call failed: %s", cause)
            raise HTTPException(503, "the language model failed; try again") from None
        return result

    async def _parse_authorized(self, request: Request) -> tuple[dict[str, Any], dict[str, Upload]]:
        """`_parse_body`, and where the middleware found no valid key in the header, the body's `ai_token` must be
        one (upstream v2's routes); a client without a key learns nothing about its body."""
        deferred = request.scope.get(BODY_TOKEN, False)
        try:
            raw, uploads = await self._parse_body(request)
        except HTTPException:
            if deferred:
                raise _unauthorized() from None
            raise
        if deferred and not _key_ok(raw.get("ai_token")):
            for upload in uploads.values():
                upload.close()
            raise _unauthorized()
        return raw, uploads

    # -- request parsing ------------------------------------------------------------------------------------------
    async def _parse_body(self, request: Request) -> tuple[dict[str, Any], dict[str, Upload]]:
        """Upstream's content-type dispatch (JSON, +json, multipart, urlencoded, header-less sniffing), bounded."""
        files = self.args.files
        content_type = (request.headers.get("content-type") or "").lower()
        media = content_type.split(";")[0].strip()
        if media == "multipart/form-data":
            return await self._parse_multipart(request, 2 * files.max_upload_bytes + files.max_body_bytes)
        body = await _read_body(request, files.max_body_bytes)
        if media == "application/json" or media.endswith("+json"):
            return _parse_json(body, "Invalid JSON body"), {}
        if media == "application/x-www-form-urlencoded":
            return _parse_urlencoded(body), {}
        stripped = body.lstrip()
        if stripped[:1] in (b"{", b"["):
            return _parse_json(stripped, "Invalid JSON body (hint: set 'Content-Type: application/json')"), {}
        if stripped and b"=" in stripped:
            return _parse_urlencoded(stripped), {}
        raise HTTPException(415, UNSUPPORTED.format(content_type or "(missing)"))

    async def _parse_multipart(self, request: Request, limit: int) -> tuple[dict[str, Any], dict[str, Upload]]:
        """Parsed as it streams in (Starlette spools file parts to disk past 1 MB), refused with 413 as soon as the
        body passes `limit` bytes."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"Request body of {declared} bytes exceeds the limit of {limit} bytes")
        size = 0

        async def receive() -> dict[str, Any]:
            nonlocal size
            message = await request.receive()
            size += len(message.get("body", b""))
            if size > limit:
                raise HTTPException(413, f"Request body exceeds the limit of {limit} bytes")
            return message

        try:
            form = await Request(request.scope, receive).form(max_files=4, max_fields=256)
        except HTTPException:
            raise
        except Exception as exc:  # malformed multipart framing
            raise HTTPException(400, f"Invalid multipart body: {exc}") from exc
        raw: dict[str, Any] = {}
        uploads: dict[str, Upload] = {}
        try:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key in UPLOAD_FIELDS and UPLOAD_FIELDS[key] not in uploads:
                        uploads[UPLOAD_FIELDS[key]] = await asyncio.to_thread(
                            Upload, key, value, self.args.files.max_upload_bytes)
                elif key not in UPLOAD_FIELDS:  # a text field named like an upload is ignored, as upstream
                    raw.setdefault(key, value)
        except BaseException:
            for upload in uploads.values():
                upload.close()
            raise
        finally:
            await form.close()
        return raw, uploads

    async def _check_webhook(self, url: str) -> None:
        """A target this server may call (`jobs.webhooks.check_target`), and a secret to sign with: 400 otherwise."""
        config = self.args.queue.webhooks
        try:
            await check_target(url, config)
        except WebhookRefused as exc:
            raise HTTPException(400, f"webhook: {exc}") from None
        if signing_secret(config) is None:
            raise HTTPException(400, "webhook: this server has no webhook secret (queue.webhooks.secret or "
                                     "ACESTEP_WEBHOOK_SECRET), and it sends no unsigned callbacks")

    def _check_limits(self, params: GenerateRequest) -> None:
        queue = self.args.queue
        if params.audio_duration is not None and params.audio_duration > queue.max_duration_s:
            raise HTTPException(422, f"audio_duration: must be <= {queue.max_duration_s} on this server "
                                     f"(got {params.audio_duration})")
        if params.num_outputs > queue.max_outputs_per_job:
            raise HTTPException(422, f"batch_size: must be <= {queue.max_outputs_per_job} on this server "
                                     f"(got {params.batch_size})")
        self._check_cost(params, params.audio_duration)
        if params.needs_lm and self.lm_name is None:
            field = next(f for f in ("thinking", "sample_mode", "sample_query", "use_format") if getattr(params, f))
            raise HTTPException(400, f"{field}: needs the 5 Hz language model, which this server does not run "
                                     f"(its config has no `lm`)")
        model = self._model(params)
        if params.task_type not in model.tasks:
            raise HTTPException(400, f"task_type: model {model.name!r} ({model.variant} variant) does not "
                                     f"serve {params.task_type}; it serves {', '.join(model.tasks)}")
        if params.audio_code_string:
            self._check_audio_codes(params, model)
        if params.lora is not None:
            try:
                adapter_path(model.lora_dir, params.lora)
            except UnknownAdapterError as exc:
                raise HTTPException(400, f"lora: {exc} (model {model.name!r})") from None

    def _model(self, params: GenerateRequest) -> "ServedModel":
        """The model the request names (the default when it names none); an unknown one is a 400."""
        name = params.model or self.default
        if name not in self.served:
            raise HTTPException(400, f"model: unknown model {params.model!r}; available: {list(self.served)}")
        return self.served[name]

    def _check_audio_codes(self, params: GenerateRequest, model: "ServedModel") -> None:
        """Codes the model can read (its audio tokenizer's codebook), and the audio they make within the limits: its
        length is the codes' (the pipeline's), whatever `audio_duration` says."""
        spec, name = model.audio_codes, model.name
        if spec is None:
            raise HTTPException(400, f"audio_code_string needs the checkpoint's audio_tokenizer and "
                                     f"audio_token_detokenizer, which model {name!r} does not have")
        codes = params.audio_codes
        outside = next((code for code in codes if code >= spec.codebook_size), None)
        if outside is not None:
            raise HTTPException(422, f"audio_code_string: code {outside} is outside model {name!r}'s codebook "
                                     f"(0 to {spec.codebook_size - 1})")
        seconds = len(codes) * spec.seconds_per_code
        if seconds > self.args.queue.max_duration_s:
            raise HTTPException(422, f"audio_code_string: {len(codes)} codes make {seconds:g} s of audio, more than "
                                     f"this server's {self.args.queue.max_duration_s:g} s")
        self._check_cost(params, seconds)

    def _check_cost(self, params: GenerateRequest, seconds: float | None) -> None:
        """What the job costs the AudioCodec (outputs x seconds of audio) within what this server admits."""
        limit = self.args.queue.max_audio_seconds_per_job
        if seconds is not None and seconds * params.num_outputs > limit:
            raise HTTPException(422, f"audio_duration x batch_size: {seconds:g} s x {params.num_outputs} exceeds "
                                     f"this server's {limit:g} s of audio per job")

    def _check_task(self, params: GenerateRequest, inputs: dict[str, Any]) -> None:
        """What the task needs, and whether the loaded model can do it: a 400 now, not a failure inside a batch."""
        if params.task_type in SOURCE_TASKS and not inputs["src_audio"]:
            raise HTTPException(400, f"task_type {params.task_type} needs src_audio (upload) or src_audio_path")
        if params.task_type == "cover" and not (inputs["src_audio"] or inputs["reference_audio"]
                                                or params.audio_code_string):
            raise HTTPException(400, "task_type cover needs src_audio or reference_audio (upload or *_path), or "
                                     "audio_code_string")
        model = self._model(params)
        if (params.task_type == "cover" and inputs["src_audio"] and not params.audio_code_string
                and not model.can_cover_from_source):
            raise HTTPException(400, f"task_type cover from src_audio needs the checkpoint's audio_tokenizer and "
                                     f"audio_token_detokenizer, which model {model.name!r} does not have; "
                                     f"send reference_audio instead")

    async def _input_audio(self, field: str, upload: Upload | None, server_path: str | None
                           ) -> tuple[dict[str, str] | None, float | None]:
        """Validate an upload or a server path (within the limits): where the codec will read it from, and its
        length in seconds."""
        if upload is not None:
            return {"upload": ""}, await self._probe(field, upload.path)  # stored once every check has passed
        if server_path is None:
            return None, None
        name = f"{field}_path"
        resolved = Path(server_path).expanduser().resolve()
        if not any(resolved.is_relative_to(root) for root in self.allowed_inputs):
            raise HTTPException(403, f"{name}: {server_path!r} is outside the allowed input directories")
        if not resolved.is_file():
            raise HTTPException(400, f"{name}: no such file {server_path!r}")
        if resolved.stat().st_size > self.args.files.max_upload_bytes:
            raise HTTPException(413, f"{name}: file exceeds the limit of {self.args.files.max_upload_bytes} bytes")
        return {"path": str(resolved)}, await self._probe(name, resolved)

    async def _probe(self, name: str, source: Path) -> float:
        """Readable audio, and no longer than `max_duration_s` (read from its header before decoding it whole); its
        length in seconds."""
        try:
            return await asyncio.to_thread(probe_audio, source, self.args.queue.max_duration_s)
        except AudioTooLongError as exc:
            raise HTTPException(422, f"{name}: {exc}") from exc
        except AudioDecodeError as exc:
            raise HTTPException(400, f"{name}: {exc}") from exc
