"""Upstream ACE-Step 1.5's current HTTP API ("v2"): its envelope, its integer statuses and its result items, built
from the same job views the seed API answers with. The routes themselves sit in `deployments/ingress.py`; what a
v2 client sends is parsed and validated on the seed route's one path (`jobs.schemas`).

Every v2 answer is `{"data": ..., "code": 200, "error": null, "timestamp": <ms>, "extra": null}`. Upstream's
`/query_result` reports a task as `status` 0 (queued or running), 1 (succeeded) or 2 (failed), and its `result` as a
JSON *string* holding one item per output file.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Literal, Mapping

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobs.schemas import describe_validation_error
from models.lm import LMRequest, LMResult

# Routes only v2 clients call: their answers, errors included, are enveloped.
ROUTES = ("/release_task", "/query_result", "/v1/model_inventory", "/v1/lora/status", "/v1/lora/load",
          "/v1/lora/unload", "/v1/lora/toggle", "/v1/lora/scale", "/format_input", "/v1/create_sample",
          "/create_random_sample")
# Routes whose body may carry the API key as `ai_token` (upstream's "Method A").
BODY_TOKEN_ROUTES = ("/release_task", "/query_result", "/format_input", "/v1/create_sample", "/create_random_sample")
STATUS_CODES = {"queued": 0, "running": 0, "succeeded": 1, "failed": 2, "canceled": 2}
MAX_TASK_IDS = 100  # per /query_result: one registry call answers them all
ENV = "development"  # upstream's default `env` of a result item; it carries no meaning here
# Rough share of a job's run done when it enters each stage (upstream reports a float progress per task).
STAGE_PROGRESS = {"queued": 0.0, "starting": 0.02, "retry_wait": 0.02, "encode_audio": 0.05, "lm": 0.07,
                  "condition": 0.1, "diffusion": 0.15, "decode": 0.9, "write": 0.97, "done": 1.0}
DIFFUSION_SHARE = STAGE_PROGRESS["decode"] - STAGE_PROGRESS["diffusion"]
TRUE_TEXT = {"1", "true", "yes", "y", "on"}  # upstream's `_to_bool`
# Upstream flags that would change what a job makes and need what this server does not run: a 400 naming them, not
# music made from something else.
UNSUPPORTED_FLAGS: dict[str, str] = dict.fromkeys(
    ("analysis_only", "analysisOnly", "full_analysis_only", "fullAnalysisOnly", "extract_codes_only",
     "extractCodesOnly"), "audio analysis and code extraction are not served here")


# -- the wire shapes (OpenAPI documentation; the answers are built as plain dicts below) -------------------------
class Envelope(BaseModel):
    """Upstream v2's wrapper around every answer."""

    data: Any = Field(None, description="The answer; null on an error.")
    code: int = Field(200, description="200, or on an error its HTTP status.")
    error: str | None = Field(None, description="null, or on an error what was wrong (also in `detail`).")
    timestamp: int = Field(description="When the answer was made: milliseconds since the Unix epoch.")
    extra: Any = Field(None, description="Always null.")


class TaskSubmitted(BaseModel):
    task_id: str = Field(description="The job's id; also its id at `GET /v1/jobs/{job_id}`.")
    status: Literal["queued", "running", "succeeded", "failed", "canceled"] = Field(description=(
        "queued for a new job; an Idempotency-Key replay answers the existing job's status."))
    queue_position: int = Field(description="1 = next to start; 0 once started.")


class ReleaseTaskResponse(Envelope):
    """`POST /release_task`'s answer."""

    data: TaskSubmitted


class QueryItem(BaseModel):
    task_id: str = Field(description="As asked.")
    status: Literal[0, 1, 2] = Field(description="0 queued or running, 1 succeeded, 2 failed, canceled or unknown.")
    result: str = Field(description="A JSON string: a list with one item per output file (while queued or running, "
                        "or after a failure, one item without a file).")
    progress_text: str = Field(description="One line on where the job is, or why it failed.")
    progress: float = Field(description="0 to 1 (approximate; 0 after a failure).")
    stage: str = Field(description="queued, starting, encode_audio, condition, diffusion, decode, write, "
                       "retry_wait, succeeded, failed, canceled.")
    error: str | None = Field(description="Why the job failed, was canceled or is unknown; null otherwise.")


class QueryResultResponse(Envelope):
    """`POST /query_result`'s answer: one item per asked id, in the order asked."""

    data: list[QueryItem]


class ModelEntry(BaseModel):
    name: str = Field(description="The DiT model's name, as `model` takes it.")
    is_default: bool = Field(description="Used when a request names no model.")
    supported_task_types: list[str] = Field(description="The `task_type`s it serves.")


class ModelList(BaseModel):
    models: list[ModelEntry] = Field(description="The models this deployment serves (`models:` in its config).")
    default_model: str = Field(description="The model used when a request names none.")


class ModelsResponse(Envelope):
    """`GET /v1/models`: the seed API's fields, and upstream v2's envelope holding the same list."""

    models: list[ModelEntry]
    default_model: str
    data: ModelList


class InventoryModel(ModelEntry):
    is_loaded: bool = Field(description="Its stages have loaded it and run a warm-up step.")


class ModelInventory(BaseModel):
    models: list[InventoryModel] = Field(description="The DiT models, with their load state and tasks.")
    default_model: str = Field(description="The model used when a request names none.")
    lm_models: list[Any] = Field(description="The 5 Hz language model's name, when the app runs one (`lm`).")
    loaded_lm_model: str | None = Field(description="The 5 Hz language model, or null without one.")
    llm_initialized: bool = Field(description="The 5 Hz language model is loaded (false without one).")


class ModelInventoryResponse(Envelope):
    """`GET /v1/model_inventory`."""

    data: ModelInventory


class HealthData(BaseModel):
    status: Literal["ok"] = Field(description="The service answers (liveness).")
    service: str = Field(description='"ACE-Step API".')
    version: str = Field(description="The API's version.")
    models_initialized: bool = Field(description="Every stage has loaded its model (as `/readyz` checks).")
    llm_initialized: bool = Field(description="The 5 Hz language model is loaded (false without one).")
    loaded_model: str | None = Field(description="The DiT model this deployment serves.")
    loaded_lm_model: str | None = Field(description="The 5 Hz language model, or null without one.")


class HealthResponse(Envelope):
    """`GET /health`: the seed API's three fields, and upstream v2's envelope with its longer health record."""

    status: Literal["ok"]
    service: str
    version: str
    data: HealthData


class StatsData(BaseModel):
    jobs: dict[str, int] = Field(description="Jobs by status: total, queued, running, succeeded, failed, canceled.")
    queue_size: int = Field(description="Jobs waiting to start.")
    queue_maxsize: int = Field(description="Waiting jobs before a submit is refused with 429.")
    avg_job_seconds: float = Field(description="Seconds between job ends at the current parallelism (the ETA's).")


class StatsResponse(Envelope):
    """`GET /v1/stats`: the seed API's counts (and this server's `running_capacity`, `stages` and `replicas`), and
    upstream v2's envelope with its counts."""

    jobs: dict[str, int]
    queue_size: int
    queue_maxsize: int
    avg_job_seconds: float
    data: StatsData


# -- building answers ---------------------------------------------------------------------------------------------
def envelope(data: Any, code: int = 200, error: str | None = None) -> dict[str, Any]:
    return {"data": data, "code": code, "error": error, "timestamp": int(time.time() * 1000), "extra": None}


def error_envelope(status: int, detail: str) -> dict[str, Any]:
    """An error on a v2 route: the envelope with `code` and `error`, plus the `detail` every other error of this
    service carries (upstream's own server answers its errors as FastAPI's `{"detail"}`, so its clients read both)."""
    return {**envelope(None, status, detail), "detail": detail}


def shared(seed_answer: Mapping[str, Any], data: Any) -> dict[str, Any]:
    """An answer of a path both APIs share: the seed API's fields as they are, and upstream v2's envelope."""
    return {**seed_answer, **envelope(data)}


def submitted(answer: Mapping[str, Any]) -> dict[str, Any]:
    """The registry's answer to a submit, as `/release_task`'s `data`."""
    return {"task_id": answer["job_id"], "status": answer["status"], "queue_position": answer["queue_position"]}


def check_supported(raw: Mapping[str, Any]) -> None:
    """400 for an upstream flag asking for what this server does not do (`UNSUPPORTED_FLAGS`)."""
    for key, value in raw.items():
        if key in UNSUPPORTED_FLAGS and (value if isinstance(value, bool) else isinstance(value, (str, int, float))
                                         and str(value).strip().lower() in TRUE_TEXT):
            raise HTTPException(400, f"{key}: {UNSUPPORTED_FLAGS[key]} (got {_shown(value)})")


def parse_task_ids(value: Any) -> list[str]:
    """`task_id_list`: a JSON array of ids, or a string holding one (as a form field must); absent means none.
    Anything else is a 400 (upstream read it as an empty list)."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise HTTPException(400, f"task_id_list: must be a JSON array of task ids (got {_shown(value)})") from None
    if not isinstance(value, list) or not all(isinstance(task_id, str) for task_id in value):
        raise HTTPException(400, f"task_id_list: must be an array of task id strings (got {_shown(value)})")
    for task_id in value:  # echoed in the answer, which must encode as UTF-8
        try:
            task_id.encode()
        except UnicodeEncodeError:
            raise HTTPException(400, f"task_id_list: not valid text (got {_shown(task_id)})") from None
    if len(value) > MAX_TASK_IDS:
        raise HTTPException(400, f"task_id_list: at most {MAX_TASK_IDS} ids per query (got {len(value)})")
    return value


def _shown(value: Any) -> str:
    """A value for an error message: short, and never walked deeply (a body may nest as deep as its parser took)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        text = json.dumps(value)
        return text if len(text) <= 80 else text[:77] + "..."
    if isinstance(value, list):
        return f"an array of {len(value)}: " + ", ".join(_shown(v) if isinstance(v, (str, int, float, bool)) or
                                                         v is None else type(v).__name__ for v in value[:3])
    return f"a JSON {'object' if isinstance(value, dict) else type(value).__name__}"


def query_item(task_id: str, view: Mapping[str, Any] | None) -> dict[str, Any]:
    """One `/query_result` entry from a job view (`JobView`, as `GET /v1/jobs/{id}` answers it); None: unknown."""
    if view is None:
        error = "unknown task_id: never submitted here, or expired after the server's retention period"
        item = _item(2, 0, progress=0.0, stage="failed", error=error)
        return {"task_id": task_id, "status": 2, "result": json.dumps([item]), "progress_text": error,
                "progress": 0.0, "stage": "failed", "error": error}
    status = STATUS_CODES[view["status"]]
    progress, stage = _progress(view)
    items = result_items(view, progress, stage)
    return {"task_id": task_id, "status": status, "result": json.dumps(items, ensure_ascii=False),
            "progress_text": _progress_text(view), "progress": progress, "stage": stage, "error": view["error"]}


def result_items(view: Mapping[str, Any], progress: float, stage: str) -> list[dict[str, Any]]:
    """Upstream's per-file items: one per output of a succeeded job, else one without a file."""
    status, created = STATUS_CODES[view["status"]], int(view["created_at"])
    result = view["result"]
    if view["status"] != "succeeded" or not result:
        return [_item(status, created, progress=progress, stage=stage, error=view["error"])]
    metas = result.get("metas") or {}
    prompt, lyrics = metas.get("caption", ""), metas.get("lyrics", "")
    common = {
        "prompt": prompt, "lyrics": lyrics,
        "metas": {**{key: metas.get(key, "N/A") for key in ("bpm", "duration", "genres", "keyscale",
                                                               "timesignature")},
                  "prompt": prompt, "lyrics": lyrics},
        "generation_info": result.get("generation_info", ""), "seed_value": result.get("seed_value", ""),
        "lm_model": result.get("lm_model", ""), "dit_model": result.get("dit_model", ""),
    }
    return [_item(status, created, file=url, progress=progress, stage=stage, error=None, **common)
            for url in result.get("audio_paths") or [""]]


def _item(status: int, created: int, file: str = "", **fields: Any) -> dict[str, Any]:
    base = {"file": file, "wave": "", "status": status, "create_time": created, "env": ENV, "prompt": "",
            "lyrics": "", "metas": {}, "generation_info": "", "seed_value": "", "lm_model": "", "dit_model": ""}
    return {**base, **fields}


def _progress(view: Mapping[str, Any]) -> tuple[float, str]:
    """(fraction done, stage name) as upstream reports them: finished jobs are at 1.0 "succeeded", or 0.0 and
    their status."""
    if view["status"] == "succeeded":
        return 1.0, "succeeded"
    if view["status"] in ("failed", "canceled"):
        return 0.0, view["status"]
    progress = view["progress"] or {"stage": "starting", "step": 0, "total": 0}
    stage = progress["stage"]
    fraction = STAGE_PROGRESS.get(stage, 0.0)
    if stage == "diffusion" and progress.get("total"):
        fraction += DIFFUSION_SHARE * min(progress["step"], progress["total"]) / progress["total"]
    return round(fraction, 4), stage


def _progress_text(view: Mapping[str, Any]) -> str:
    status = view["status"]
    if status in ("failed", "canceled"):
        return view["error"] or status
    if status == "succeeded":
        return (view["result"] or {}).get("status_message") or "succeeded"
    if status == "queued":
        eta = view["eta_seconds"]
        return f"queued: position {view['queue_position']}" + (f", starts in about {eta:.0f} s" if eta else "")
    progress = view["progress"] or {}
    if progress.get("stage") == "diffusion" and progress.get("total"):
        return f"running: diffusion step {progress['step']}/{progress['total']}"
    return f"running: {progress.get('stage', 'starting')}"


# -- the LM's own routes: /format_input, /v1/create_sample, /create_random_sample ----------------------------------
EXAMPLES = Path(__file__).parent / "examples" / "samples.json"


class FormatInput(BaseModel):
    """`/format_input`'s body (`param_obj`'s keys flattened in): what the LM rewrites, and what it must keep."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field("", max_length=4096, description="The caption to rewrite.", examples=["dreamy synth pop"])
    lyrics: str = Field("", max_length=16384, description="The lyrics to rewrite.", examples=[
        "city lights fading slow, hold on"])
    temperature: float = Field(0.85, ge=0.0, le=2.0, allow_inf_nan=False, description=(
        "LM sampling temperature, 0 to 2."), examples=[0.85])
    bpm: int | None = Field(None, ge=30, le=300, description="Kept as given (param_obj), 30 to 300.", examples=[120])
    duration: float | None = Field(None, ge=1.0, le=600.0, allow_inf_nan=False, description=(
        "Kept (param_obj): seconds, 1 to 600."), examples=[30.0])
    key_scale: str = Field("", max_length=64, description="Kept as given (param_obj `key` or `key_scale`).",
                           examples=["A Minor"])
    time_signature: str = Field("", max_length=16, description="Kept as given (param_obj).", examples=["4"])
    language: str = Field("", max_length=16, description="Kept as given (param_obj); empty or unknown: the LM's.",
                          examples=["en"])


class CreateSample(BaseModel):
    """`/v1/create_sample`'s body."""

    model_config = ConfigDict(extra="ignore")

    query: str = Field("", max_length=4096, description="The song, described in words (empty: the LM's own idea).",
                       examples=["a calm piano piece for a rainy evening"])
    instrumental: bool = Field(False, description="No vocals.", examples=[True])
    vocal_language: str = Field("unknown", max_length=16, description="Lyrics language code; unknown: the LM "
                                "chooses.", examples=["en"])
    temperature: float = Field(0.85, ge=0.0, le=2.0, allow_inf_nan=False, description=(
        "LM sampling temperature, 0 to 2."), examples=[0.85])


def _validated(model: type[BaseModel], raw: Mapping[str, Any]) -> Any:
    values = {k: v for k, v in raw.items() if v not in (None, "")}  # upstream: empty means absent
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise HTTPException(*describe_validation_error(exc)) from None


def format_request(raw: Mapping[str, Any], tag: str) -> tuple[LMRequest, FormatInput]:
    """The LM job `/format_input` asks for: format alone (no phase 1, no codes), the user's metadata kept."""
    params = raw.get("param_obj") or {}
    if isinstance(params, str):
        try:
            params = json.loads(params)
        except (ValueError, RecursionError):
            raise HTTPException(400, f"param_obj: must be a JSON object (got {_shown(params)})") from None
    if not isinstance(params, Mapping):
        raise HTTPException(400, f"param_obj: must be a JSON object (got {_shown(params)})")
    given = _validated(FormatInput, {**raw, "key_scale": params.get("key") or params.get("key_scale"),
                                     **{k: params.get(k) for k in ("bpm", "duration", "language")},
                                     "time_signature": params.get("time_signature") or raw.get("time_signature")})
    request = LMRequest(caption=given.prompt, lyrics=given.lyrics, bpm=given.bpm, keyscale=given.key_scale or None,
                        timesignature=given.time_signature or None, duration=given.duration,
                        language=None if given.language in ("", "unknown") else given.language, use_format=True,
                        use_cot_metas=False, use_cot_caption=False, use_cot_language=False,
                        lm_temperature=given.temperature, tag=tag)
    return request, given


def formatted(result: LMResult, given: FormatInput) -> dict[str, Any]:
    meta = result.metadata
    return {"caption": result.caption or given.prompt, "lyrics": result.lyrics or given.lyrics,
            "bpm": meta.bpm or given.bpm, "key_scale": meta.keyscale or given.key_scale,
            "time_signature": meta.timesignature or given.time_signature, "duration": meta.duration or given.duration,
            "vocal_language": meta.language or given.language or "unknown"}


def sample_request(raw: Mapping[str, Any], tag: str) -> tuple[LMRequest, CreateSample]:
    """The LM job `/v1/create_sample` asks for: sample mode alone."""
    given = _validated(CreateSample, raw)
    request = LMRequest(sample_mode=True, sample_query=given.query, instrumental=given.instrumental,
                        language=None if given.vocal_language in ("", "unknown") else given.vocal_language,
                        use_cot_metas=False, use_cot_caption=False, use_cot_language=False,
                        lm_temperature=given.temperature, tag=tag)
    return request, given


def sampled(result: LMResult, given: CreateSample) -> dict[str, Any]:
    meta = result.metadata
    return {"caption": result.caption, "lyrics": result.lyrics, "bpm": meta.bpm, "keyscale": meta.keyscale or "",
            "duration": meta.duration, "timesignature": meta.timesignature or "",
            "vocal_language": meta.language or given.vocal_language}


def random_sample(raw: Mapping[str, Any]) -> dict[str, Any]:
    """`/create_random_sample`: one of the built-in examples (`sample_type` simple_mode, the default, is a
    description for sample mode; custom_mode a full request)."""
    kind = raw.get("sample_type") or "simple_mode"
    examples = json.loads(EXAMPLES.read_text())
    if kind not in examples:
        raise HTTPException(400, f"sample_type: must be one of {sorted(examples)} (got {_shown(kind)})")
    return random.choice(examples[kind])
