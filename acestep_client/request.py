"""The generate request as the client builds it: typed fields, checked locally by the server's own
`jobs.schemas.GenerateRequest`, sent as JSON or, with uploads, as multipart."""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict, Union

from pydantic import ValidationError

from acestep_client.errors import InvalidRequestError, UnknownFieldError
from jobs.schemas import GenerateRequest, describe_validation_error

AudioInput = Union[str, os.PathLike, bytes]  # a file to upload: its path, or its bytes
UPLOAD_FIELDS = ("src_audio", "reference_audio")


class GenerateFields(TypedDict, total=False):
    """Every field of `POST /v1/music/generate` under its canonical name, typed for the editor; `GenerateRequest`
    (jobs/schemas.py) documents each and is what checks them (tests/client/test_client.py keeps the two in step)."""

    caption: str
    lyrics: str
    vocal_language: str
    audio_format: Literal["mp3", "wav", "flac", "opus", "aac", "wav32"]
    mp3_bitrate: Literal[64, 80, 96, 112, 128, 160, 192, 224, 256, 320] | None
    bpm: int | None
    key_scale: str
    time_signature: str
    audio_duration: float | None
    inference_steps: int
    guidance_scale: float
    shift: float
    cfg_interval_start: float
    cfg_interval_end: float
    use_random_seed: bool
    seed: int | list[int] | str
    batch_size: int | None
    reference_audio_path: str | None
    src_audio_path: str | None
    task_type: Literal["text2music", "cover", "repaint", "lego", "extract", "complete"]
    track_name: str | None
    track_classes: list[str] | str | None
    audio_code_string: str | list[int] | None
    instruction: str | None
    repainting_start: float
    repainting_end: float | None
    audio_cover_strength: float
    timesteps: list[float] | str | None
    model: str | None
    thinking: bool
    use_cot_metas: bool
    use_cot_caption: bool
    use_cot_language: bool
    sample_mode: bool
    sample_query: str
    use_format: bool
    lm_temperature: float
    lm_cfg_scale: float
    lm_negative_prompt: str
    lm_top_k: int | None
    lm_top_p: float | None
    lm_repetition_penalty: float
    lora: str | None
    lora_scale: float
    webhook: str | None
    webhook_events: list[Literal["start", "completed"]] | str


@dataclass(frozen=True)
class SubmitRequest:
    """A checked request, ready to send as often as a retry needs: `params` (canonical JSON values of the fields the
    caller set) and `uploads` (field -> (filename, bytes))."""

    params: dict[str, Any]
    uploads: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    num_outputs: int = 2

    def httpx_kwargs(self) -> dict[str, Any]:
        """`json=` without uploads; otherwise multipart, every field as the text a form field carries."""
        if not self.uploads:
            return {"json": self.params}
        return {"data": {name: _form_text(value) for name, value in self.params.items()},
                "files": {name: (filename, data, "application/octet-stream")
                          for name, (filename, data) in self.uploads.items()}}


def build_submit(fields: dict[str, Any], src_audio: AudioInput | None = None,
                 reference_audio: AudioInput | None = None) -> SubmitRequest:
    """Check `fields` as the server will (`GenerateRequest`), before anything is sent; read the uploads.

    Raises `UnknownFieldError` (a `TypeError`) for a name that is no field (the server would ignore it silently),
    `InvalidRequestError` with the server's own wording for a bad value, `OSError` for an upload path that cannot be
    read."""
    unknown = [name for name in fields if name not in GenerateRequest.model_fields]
    if unknown:
        hints = {name: difflib.get_close_matches(name, GenerateRequest.model_fields, n=1) for name in unknown}
        named = ", ".join(f"{name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                          for name, hint in hints.items())
        raise UnknownFieldError(f"unknown generate field {named}")
    try:
        request = GenerateRequest.model_validate(fields)
    except ValidationError as exc:
        status, detail = describe_validation_error(exc)
        raise InvalidRequestError(detail, status) from None
    # Only what the caller set, in the canonical spelling the validators made of it ("11,12" -> [11, 12]); None is
    # "the server's default", as null is on the wire.
    dumped = request.model_dump(mode="json", include=set(fields))
    params = {name: value for name, value in dumped.items() if value is not None}
    uploads = {name: _read_upload(name, source)
               for name, source in (("src_audio", src_audio), ("reference_audio", reference_audio))
               if source is not None}
    return SubmitRequest(params, uploads, request.num_outputs)


def _read_upload(name: str, source: AudioInput) -> tuple[str, bytes]:
    """(filename, bytes): read once, so that every retry sends the same bytes (the Idempotency-Key's fingerprint
    covers them)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return name, bytes(source)
    path = Path(source)
    return path.name, path.read_bytes()


def _form_text(value: Any) -> str:
    """A canonical JSON value as the form field the server reads back to the same value: lists comma-joined (seed,
    timesteps, track_classes), booleans as true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(_form_text(v) for v in value)
    if isinstance(value, (int, float)):
        return json.dumps(value)
    return str(value)
