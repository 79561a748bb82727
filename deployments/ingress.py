"""HTTP ingress: parse and validate, store uploads, talk to the registry, serve result files. No model code."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import ValidationError
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments import envs
from jobs.registry import RegistryClient
from jobs.schemas import MAX_SEED, GenerateRequest, JobView, describe_validation_error, normalize_payload
from jobs.storage import ResultStore
from models.audio_io import AudioDecodeError, media_type, probe_audio

if TYPE_CHECKING:
    from deployments.app import AppArgs

logger = logging.getLogger(__name__)

UPLOAD_FIELDS = {"reference_audio": "reference_audio", "src_audio": "src_audio",
                 "ref_audio": "reference_audio", "ctx_audio": "src_audio"}  # upstream HEAD's spellings too
UNSUPPORTED = ("Unsupported Content-Type: {}; use application/json, application/x-www-form-urlencoded, or "
               "multipart/form-data")

api = FastAPI(title="ACE-Step API", version="1.0", description="ACE-Step 1.5 music generation jobs.")


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


@api.exception_handler(RequestValidationError)
async def _request_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"][1:]) or "request"
    return _error(422, f"{field}: {first['msg']}")


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


@api.exception_handler(Exception)
async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error")
    return _error(500, "Internal Server Error")


@api.exception_handler(ray.exceptions.RayActorError)
@api.exception_handler(ray.exceptions.ActorUnavailableError)
async def _registry_down(_request: Request, exc: Exception) -> JSONResponse:
    logger.warning("job registry unavailable: %s", exc)
    return _error(503, "Job registry unavailable; retry shortly", {"Retry-After": "2"})


@api.middleware("http")
async def _require_api_key(request: Request, call_next):
    """With API keys configured, everything but /health needs `Authorization: Bearer <key>`."""
    digests = envs.API_KEY_SHA256  # module state: Serve runs a frozen copy of `api`, so not `api.state`
    path = request.url.path.removeprefix(request.scope.get("root_path", ""))  # the app may sit under a prefix
    if digests and path != "/health":
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(key.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(digest, d) for d in digests):
            return _error(401, "Missing or invalid API key", {"WWW-Authenticate": "Bearer"})
    return await call_next(request)


_REQUEST_BODY = {"required": False, "content": {
    "application/json": {"schema": GenerateRequest.model_json_schema()},
    "application/x-www-form-urlencoded": {"schema": GenerateRequest.model_json_schema()},
    "multipart/form-data": {"schema": {**GenerateRequest.model_json_schema(), "properties": {
        **GenerateRequest.model_json_schema()["properties"],
        "reference_audio": {"type": "string", "format": "binary"},
        "src_audio": {"type": "string", "format": "binary"}}}},
}}


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


def _idempotency(request: Request, params: GenerateRequest, uploads: dict[str, bytes]) -> tuple[str, str] | None:
    """(Idempotency-Key, fingerprint of the request): the normalised parameters and the uploaded bytes."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255:
        raise HTTPException(400, "Idempotency-Key must be 1 to 255 characters")
    digest = hashlib.sha256(json.dumps(params.model_dump(mode="json"), sort_keys=True).encode())
    for field in sorted(uploads):
        digest.update(field.encode() + hashlib.sha256(uploads[field]).digest())
    return key, digest.hexdigest()


def _seeds(params: GenerateRequest) -> list[int]:
    """`seed, seed+1, ...` when the client fixed one; otherwise fresh random seeds (reported in seed_value)."""
    n = params.num_outputs
    if params.use_random_seed or params.seed < 0:
        return [secrets.randbelow(MAX_SEED + 1) for _ in range(n)]
    return [params.seed + i for i in range(n)]


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    async def __init__(self, args: AppArgs, driver: DeploymentHandle, stages: dict[str, DeploymentHandle]):
        self.args = args
        self.driver = driver  # keeps the driver in the application graph; the ingress never calls it
        self.stages = stages
        self.registry = RegistryClient(args.name, args.queue, args.files)
        await self.registry.call("configure", args.queue)  # the registry may have outlived an older config
        envs.API_KEY_SHA256[:] = [d.lower() for d in args.auth.api_key_sha256] + envs.ACESTEP_API_KEY_SHA256
        self.store = ResultStore(args.files.output_dir, args.files.storage_options)
        self.upload_root = Path(args.files.upload_dir).resolve()
        self.upload_root.mkdir(parents=True, exist_ok=True)
        self.allowed_inputs = [Path(d).resolve() for d in args.files.allowed_input_dirs]

    # -- endpoints ------------------------------------------------------------------------------------------------
    @api.post("/v1/music/generate", openapi_extra={"requestBody": _REQUEST_BODY}, responses={
        200: {"description": "Queued"}, 400: {"description": "Bad input"}, 403: {"description": "Path denied"},
        413: {"description": "Too large"}, 415: {"description": "Unsupported type"}, 422: {"description": "Invalid"},
        429: {"description": "Queue full"}})
    async def generate(self, request: Request) -> JSONResponse:
        raw, uploads = await self._parse_body(request)
        try:
            params = GenerateRequest.model_validate(normalize_payload(raw))
        except ValidationError as exc:
            return _error(*describe_validation_error(exc))
        self._check_limits(params)
        idempotency = _idempotency(request, params, uploads)
        job_id = str(uuid.uuid4())
        job_dir = self.upload_root / job_id
        try:
            inputs = {}
            for field in ("src_audio", "reference_audio"):
                inputs[field] = await self._input_audio(field, uploads.get(field), getattr(params, f"{field}_path"),
                                                        job_dir)
            if params.task_type == "repaint" and not inputs["src_audio"]:
                raise HTTPException(400, "task_type repaint needs src_audio (upload) or src_audio_path")
            if params.task_type == "cover" and not (inputs["src_audio"] or inputs["reference_audio"]):
                raise HTTPException(400, "task_type cover needs src_audio or reference_audio (upload or *_path)")
            spec = {"request": params.model_dump(mode="json"), "seeds": _seeds(params), **inputs}
            answer = await self.registry.call("submit", job_id, spec, str(job_dir) if job_dir.exists() else None,
                                              idempotency)
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        if not answer["accepted"] or answer.get("duplicate"):  # refused, or the key's job already exists
            shutil.rmtree(job_dir, ignore_errors=True)
        if "conflict" in answer:
            return _error(409, f"Idempotency-Key already used for job {answer['conflict']} with a different request")
        if not answer["accepted"]:
            return _error(429, "Server busy: queue is full", {"Retry-After": str(answer["retry_after_s"])})
        return JSONResponse({k: answer[k] for k in ("job_id", "status", "queue_position")})

    @api.get("/v1/jobs/{job_id}", response_model=JobView, responses={404: {"description": "Job not found"}})
    async def job(self, job_id: str) -> JSONResponse:
        view = await self.registry.call("view", job_id) if len(job_id) <= 64 else None
        if view is None:
            return _error(404, "Job not found")
        return JSONResponse(view)

    @api.post("/v1/jobs/{job_id}/cancel", response_model=JobView, responses={
        404: {"description": "Job not found"}, 409: {"description": "Job already finished"}})
    async def cancel(self, job_id: str) -> JSONResponse:
        """Cancel a queued or running job; a running one stops at its next diffusion step."""
        status = await self.registry.call("cancel", job_id) if len(job_id) <= 64 else None
        if status is None:
            return _error(404, "Job not found")
        if status != "canceled":
            return _error(409, f"Job already {status}")
        return JSONResponse(await self.registry.call("view", job_id))

    @api.get("/v1/audio", responses={403: {"description": "Not a result"}, 404: {"description": "Not found"}})
    async def audio(self, path: str = Query(..., max_length=256)) -> Response:
        if not self.store.is_key(path):
            return _error(403, "Access denied: path is not a result of this service")
        mime = media_type(path.rsplit(".", 1)[1])
        if self.store.is_local:
            file = self.store.local_path(path)
            return _error(404, "Audio file not found") if file is None else FileResponse(file, media_type=mime)
        data = await asyncio.to_thread(self.store.get, path)
        return _error(404, "Audio file not found") if data is None else Response(data, media_type=mime)

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok", "service": "ACE-Step API", "version": "1.0"}

    @api.get("/readyz", responses={503: {"description": "A stage has no ready replica"}})
    async def readyz(self) -> JSONResponse:
        """200 once every stage has a replica that loaded its model and ran a warm-up step; 503 before."""
        names = list(self.stages)
        answers = await asyncio.gather(*(asyncio.wait_for(self.stages[n].ready.remote(), 2.0) for n in names),
                                       return_exceptions=True)
        missing = [n for n, ok in zip(names, answers) if ok is not True]
        if missing:
            return _error(503, f"not ready: {', '.join(missing)}")
        return JSONResponse({"status": "ready", "stages": names})

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        name = self.args.model.name
        return {"models": [{"name": name, "is_default": True}], "default_model": name}

    @api.get("/v1/stats")
    async def stats(self) -> dict[str, Any]:
        """Upstream HEAD's counts, plus running replicas per deployment of this application."""
        stats = await self.registry.call("stats")
        app = serve.get_replica_context().app_name
        status = await asyncio.to_thread(serve.status)
        deployments = status.applications[app].deployments if app in status.applications else {}
        stats["replicas"] = {name: d.replica_states.get("RUNNING", 0) for name, d in deployments.items()}
        return stats

    # -- request parsing ------------------------------------------------------------------------------------------
    async def _parse_body(self, request: Request) -> tuple[dict[str, Any], dict[str, bytes]]:
        """Upstream's content-type dispatch (JSON, +json, multipart, urlencoded, header-less sniffing), bounded."""
        files = self.args.files
        content_type = (request.headers.get("content-type") or "").lower()
        media = content_type.split(";")[0].strip()
        if media == "multipart/form-data":
            body = await _read_body(request, 2 * files.max_upload_bytes + files.max_body_bytes)
            return await self._parse_multipart(request, body)
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

    async def _parse_multipart(self, request: Request, body: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=4, max_fields=256)
        except HTTPException:
            raise
        except Exception as exc:  # malformed multipart framing
            raise HTTPException(400, f"Invalid multipart body: {exc}") from exc
        raw: dict[str, Any] = {}
        uploads: dict[str, bytes] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key in UPLOAD_FIELDS:
                    data = await value.read()
                    if len(data) > self.args.files.max_upload_bytes:
                        raise HTTPException(413, f"{key}: upload of {len(data)} bytes exceeds the limit of "
                                                 f"{self.args.files.max_upload_bytes} bytes")
                    uploads[UPLOAD_FIELDS[key]] = data
            elif key not in UPLOAD_FIELDS:  # a text field named like an upload is ignored, as upstream
                raw.setdefault(key, value)
        await form.close()
        return raw, uploads

    def _check_limits(self, params: GenerateRequest) -> None:
        queue = self.args.queue
        if params.audio_duration is not None and params.audio_duration > queue.max_duration_s:
            raise HTTPException(422, f"audio_duration: must be <= {queue.max_duration_s} on this server "
                                     f"(got {params.audio_duration})")
        if params.num_outputs > queue.max_outputs_per_job:
            raise HTTPException(422, f"batch_size: must be <= {queue.max_outputs_per_job} on this server "
                                     f"(got {params.batch_size})")
        if params.model is not None and params.model != self.args.model.name:
            raise HTTPException(400, f"model: unknown model {params.model!r}; available: {[self.args.model.name]}")

    async def _input_audio(self, field: str, upload: bytes | None, server_path: str | None,
                           job_dir: Path) -> str | None:
        """Validate an upload (stored under the job's upload dir) or a server path; the file path a driver reads."""
        if upload is not None:
            await self._probe(field, upload)
            job_dir.mkdir(parents=True, exist_ok=True)
            target = job_dir / field
            target.write_bytes(upload)
            return str(target)
        if server_path is None:
            return None
        name = f"{field}_path"
        resolved = Path(server_path).expanduser().resolve()
        if not any(resolved.is_relative_to(root) for root in self.allowed_inputs):
            raise HTTPException(403, f"{name}: {server_path!r} is outside the allowed input directories")
        if not resolved.is_file():
            raise HTTPException(400, f"{name}: no such file {server_path!r}")
        if resolved.stat().st_size > self.args.files.max_upload_bytes:
            raise HTTPException(413, f"{name}: file exceeds the limit of {self.args.files.max_upload_bytes} bytes")
        await self._probe(name, resolved)
        return str(resolved)

    @staticmethod
    async def _probe(name: str, source: bytes | Path) -> None:
        try:
            await asyncio.to_thread(probe_audio, source)
        except AudioDecodeError as exc:
            raise HTTPException(400, f"{name}: {exc}") from exc
