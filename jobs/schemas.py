"""The HTTP contract's data: the generate request (seed parameters + upstream L's aliases) and the job view."""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal, Mapping

from pydantic import (BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, WithJsonSchema, field_validator,
                      model_validator)
from pydantic.alias_generators import to_camel

# Every task diffusers' AceStepPipeline runs; which of them a model serves depends on its variant
# (`models.loading.VARIANT_TASKS`), checked at submit.
TASK_TYPES = ("text2music", "cover", "repaint", "lego", "extract", "complete")
# Tasks that run on the source audio (`src_audio` upload or `src_audio_path`), as the pipeline's `src_audio`.
SOURCE_TASKS = ("repaint", "lego", "extract", "complete")
AUDIO_CODE = re.compile(r"<\|audio_code_(\d+)\|>")  # the 5 Hz LM's code tokens, as diffusers parses them
MAX_AUDIO_CODES = 12_000  # 40 minutes at 5 Hz: far above any duration a server admits (checked at submit)
AUDIO_FORMATS = ("mp3", "wav", "flac", "opus", "aac", "wav32")  # written as models.audio_io.FORMATS says
# MPEG-1 Layer III bitrates (kbps) from 64: a 48 kHz frame at 32-56 kbps has no room for LAME's Info tag, without
# which decoders keep the encoder's delay and padding (about 1,500 samples more than the requested duration).
MP3_BITRATES = (64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
WEBHOOK_EVENTS = ("start", "completed")  # what a job's webhook may be sent (jobs.webhooks)
MAX_SEED = 2**31 - 1
Seed = Annotated[int, Field(ge=-1, le=MAX_SEED)]
TrackName = Annotated[str, Field(min_length=1, max_length=64)]
# The list first: its errors (which entry, why) are the ones reported for a list that fails both.
AudioCodes = (Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_AUDIO_CODES)]
              | Annotated[str, Field(max_length=MAX_AUDIO_CODES * 24)])
# A timestep's range, (0, 1], published; `_check_timesteps` checks it, with its own message.
Timestep = Annotated[float, WithJsonSchema({"type": "number", "exclusiveMinimum": 0.0, "maximum": 1.0})]

# Canonical name -> other keys upstream L (and HEAD) accepted for it, tried in this order after the canonical one.
ALIASES: dict[str, tuple[str, ...]] = {
    "caption": ("prompt",),
    "vocal_language": ("vocalLanguage", "language"),
    "key_scale": ("keyscale", "keyScale", "key"),
    "time_signature": ("timesignature", "timeSignature"),
    "audio_duration": ("duration", "audioDuration", "target_duration", "targetDuration"),
    "inference_steps": ("inferenceSteps",),
    "guidance_scale": ("guidanceScale",),
    "use_random_seed": ("useRandomSeed",),
    "batch_size": ("batchSize",),
    "reference_audio_path": ("ref_audio_path", "referenceAudioPath", "refAudioPath"),
    "src_audio_path": ("ctx_audio_path", "sourceAudioPath", "srcAudioPath", "ctxAudioPath"),
    "task_type": ("taskType",),
    "audio_cover_strength": ("audioCoverStrength", "cover_strength", "coverStrength"),
    "repainting_start": ("repaintingStart",),
    "repainting_end": ("repaintingEnd",),
    "model": ("dit_model", "ditModel", "model_name", "modelName"),
    "lora": ("lora_name", "adapter_name"),
    "sample_query": ("description", "desc"),
    "webhook": ("webhook_url", "webhookUrl", "callback_url", "callbackUrl"),
}
# Where upstream L looked for nested metadata: the first truthy of these keys, a dict or a JSON object string.
NESTED_KEYS = ("metas", "meta", "metadata", "user_metadata", "userMetadata")
# Fields whose bad value is an unknown choice rather than a malformed value: 400, as the design asks.
CHOICE_FIELDS = {"audio_format", "task_type", "model"}
NUMBER_FIELDS = ("bpm", "audio_duration", "inference_steps", "guidance_scale", "shift", "cfg_interval_start",
                 "cfg_interval_end", "seed", "batch_size", "repainting_start", "repainting_end",
                 "audio_cover_strength", "timesteps", "mp3_bitrate")
_INTEGER = TypeAdapter(int)
_SEED = TypeAdapter(Seed)


class GenerateRequest(BaseModel):
    """`POST /v1/music/generate` parameters, with the seed document's defaults. Unknown keys are ignored."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=False)

    caption: str = Field("", max_length=4096, description="Music description prompt.", examples=[
        "upbeat lo-fi hip hop with mellow piano and vinyl crackle"])
    lyrics: str = Field("", max_length=16384, description="Lyrics; empty for instrumental.", examples=[
        "[verse]\nCity lights are fading slow\n[chorus]\nHold on, hold on"])
    vocal_language: str = Field("en", max_length=16, description="Lyrics language code (en, zh, ja, ...).",
                                examples=["en"])
    audio_format: Literal[AUDIO_FORMATS] = Field("mp3", description=(
        "Output file format: mp3 (audio/mpeg), wav (16-bit PCM, audio/wav), flac (16-bit, audio/flac), opus (Ogg "
        "Opus, .opus, audio/ogg; codecs=opus), aac (ADTS AAC-LC, .aac, audio/aac) or wav32 (32-bit float, .wav, "
        "audio/wav)."), examples=["mp3"])
    mp3_bitrate: Literal[MP3_BITRATES] | None = Field(None, description=(
        "MP3 bitrate in kbps, constant (CBR): " + ", ".join(map(str, MP3_BITRATES)) + ". Null: variable bitrate at "
        "LAME's default quality (V4, about 165 kbps on average), as before. Formats other than mp3 ignore it."),
        examples=[192])
    bpm: int | None = Field(None, ge=30, le=300, description="Tempo in beats per minute (30 to 300).", examples=[90])
    key_scale: str = Field("", max_length=64, description='Key and scale, e.g. "C Major".', examples=["C Major"])
    time_signature: str = Field("", max_length=16, description='Time signature, e.g. "4".', examples=["4"])
    audio_duration: float | None = Field(None, ge=1.0, le=600.0, allow_inf_nan=False, description=(
        "Seconds of audio, 1 to 600, and at most this server's `queue.max_duration_s` (422 above it; so is "
        "audio_duration x outputs above its `queue.max_audio_seconds_per_job`). Null: the source audio's length, or "
        "the server's default duration."), examples=[10.0])
    inference_steps: int = Field(8, ge=1, le=200, description="Diffusion steps, 1 to 200 (turbo models: 8).",
                                 examples=[8])
    guidance_scale: float = Field(7.0, ge=0.0, le=30.0, allow_inf_nan=False, description=(
        "Guidance (APG) scale for base models, 0 to 30; turbo models ignore it, as upstream."), examples=[7.0])
    shift: float = Field(3.0, ge=0.01, le=10.0, allow_inf_nan=False, description=(
        "Timestep schedule shift (0.01 to 10). Below about 6e-8 the float32 schedule divides by zero and the job "
        "could only fail, so the bound is set well clear of it."), examples=[3.0])
    cfg_interval_start: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False, description=(
        "Guidance from here: a fraction of the schedule, 0 to 1, at most cfg_interval_end."), examples=[0.0])
    cfg_interval_end: float = Field(1.0, ge=0.0, le=1.0, allow_inf_nan=False, description=(
        "Guidance up to here: a fraction of the schedule, 0 to 1."), examples=[1.0])
    use_random_seed: bool = Field(True, description="Draw random seeds; false uses `seed`, `seed+1`, ...",
                                  examples=[False])
    seed: Seed | list[Seed] = Field(-1, description=(
        "First seed when use_random_seed is false (then `seed`, `seed+1`, ... per output); -1: random. Or upstream's "
        "list, as a JSON array or comma-separated text (\"11,12\"): one seed per output, -1 or a missing one random. "
        f"Each -1 to {MAX_SEED}."), examples=[42])
    batch_size: int | None = Field(None, ge=1, le=8, description=(
        "Number of outputs, 1 to 8, and at most this server's `queue.max_outputs_per_job` (422 above it). Null: 2."),
        examples=[1])
    reference_audio_path: str | None = Field(None, max_length=4096, description=(
        "Server-side reference audio for timbre (cover); must lie in an allowed input directory."),
        examples=["/data/inputs/voice.wav"])
    src_audio_path: str | None = Field(None, max_length=4096, description=(
        "Server-side source audio (cover, repaint, lego, extract, complete); must lie in an allowed input directory."),
        examples=["/data/inputs/song.wav"])
    task_type: Literal[TASK_TYPES] = Field("text2music", description=(
        "text2music, cover, repaint, lego, extract or complete. repaint, lego, extract and complete need source audio; "
        "lego, extract and complete need a base model (each model's tasks: /v1/model_inventory)."),
        examples=["text2music"])
    track_name: TrackName | None = Field(None, description=(
        'extract: the track to take out of the source audio; lego: the track to generate over it (e.g. "vocals", '
        '"drums", "bass", "guitar"). Null: the task\'s generic instruction. Other tasks ignore it.'),
        examples=["vocals"])
    track_classes: list[TrackName] | None = Field(None, max_length=16, description=(
        'complete: the tracks to add to the source audio, a list or comma-separated text ("drums, bass"). Null: the '
        "task's generic instruction. Other tasks ignore it. At most 16 tracks."), examples=[["drums", "bass"]])
    audio_code_string: AudioCodes | None = Field(None, description=(
        "5 Hz semantic audio codes (what upstream's language model writes): a string of `<|audio_code_N|>` tokens, "
        "or a list of the integers N. The model's audio detokenizer turns them into the source latents, and their "
        "count sets the length (5 codes a second); text2music with codes runs as cover. Needs a model with an audio "
        "tokenizer and detokenizer; every N must be in its codebook (422 otherwise). At most "
        f"{MAX_AUDIO_CODES} codes."),
        examples=[[101, 2048, 7]])
    instruction: str | None = Field(None, max_length=1024, description="DiT instruction; null: the task's own.",
                                     examples=["Fill the audio semantic mask based on the given conditions:"])
    repainting_start: float = Field(0.0, ge=0.0, le=600.0, allow_inf_nan=False, description=(
        "Repaint from (s), 0 to 600."), examples=[2.0])
    repainting_end: float | None = Field(None, le=600.0, allow_inf_nan=False, description=(
        "Repaint until (s), at most 600 and greater than repainting_start; null or negative: the end of the source."),
        examples=[6.0])
    audio_cover_strength: float = Field(1.0, ge=0.0, le=1.0, allow_inf_nan=False, description=(
        "Cover, 0 to 1: 1 follows the source fully; lower blends in text2music conditions."), examples=[0.8])
    timesteps: list[Timestep] | None = Field(None, min_length=1, max_length=200, description=(
        "Custom timestep schedule, 1 to 200 values in (0, 1], strictly descending; overrides inference_steps and "
        "shift."), examples=[[1.0, 0.75, 0.5, 0.25]])
    model: str | None = Field(None, max_length=256, description="DiT model name from /v1/models; null: default.",
                              examples=["acestep-v15-tiny"])
    thinking: bool = Field(False, description=(
        "Run the 5 Hz language model's plan: its metadata for what you left empty (phase 1), then duration x 5 audio "
        "codes that the DiT follows (phase 2). Needs the server's `lm`; cover, repaint and extract skip the LM."),
        examples=[False])
    use_cot_metas: bool = Field(True, description="When the LM runs: it writes the metadata you left empty.",
                                examples=[True])
    use_cot_caption: bool = Field(True, description=(
        "When the LM runs: it rewrites the caption. With no LM on the server these three are ignored, as upstream."),
        examples=[True])
    use_cot_language: bool = Field(True, description="When the LM runs: it chooses the vocal language.",
                                   examples=[True])
    sample_mode: bool = Field(False, description=(
        "The LM writes caption, lyrics and metadata from `sample_query` (a description). Needs the server's `lm`."),
        examples=[False])
    sample_query: str = Field("", max_length=4096, description="Sample mode's description of the song.",
                              examples=["a calm piano piece for a rainy evening"])
    use_format: bool = Field(False, description=(
        "The LM rewrites the given caption and lyrics into its format and adds metadata. Needs the server's `lm`."),
        examples=[False])
    lm_temperature: float = Field(0.85, ge=0.0, le=2.0, allow_inf_nan=False, description=(
        "LM sampling temperature, 0 to 2; 0 is greedy."), examples=[0.85])
    lm_cfg_scale: float = Field(2.5, ge=0.0, le=10.0, allow_inf_nan=False, description=(
        "LM classifier-free guidance for the codes, 0 to 10; above 1 it runs an unconditional row beside each "
        "answer."), examples=[2.5])
    lm_negative_prompt: str = Field("NO USER INPUT", max_length=4096, description="The unconditional row's prompt.",
                                    examples=["NO USER INPUT"])
    lm_top_k: int | None = Field(None, ge=0, le=1000, description="LM top-k, 0 to 1000; null or 0: off.",
                                 examples=[50])
    lm_top_p: float | None = Field(0.9, gt=0.0, le=1.0, allow_inf_nan=False, description=(
        "LM nucleus, above 0 and at most 1; 1: off."), examples=[0.9])
    lm_repetition_penalty: float = Field(1.0, ge=0.5, le=2.0, allow_inf_nan=False, description=(
        "LM repetition penalty, 0.5 to 2; 1: off."), examples=[1.0])
    lora: str | None = Field(None, max_length=128, description=(
        "A LoRA adapter of the model, by name (GET /v1/lora/status lists them): the job's DiT passes run with it. "
        "Null: the model as it is."), examples=["my-style"])
    lora_scale: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False, description=(
        "The adapter's strength, 0 to 2 (0 runs as no adapter). Jobs with different adapters or scales never share a "
        "forward pass."), examples=[0.8])
    webhook: str | None = Field(None, max_length=2048, description=(
        "http(s) URL the server POSTs the job's events to, signed (X-ACEStep-Signature, see the README). The host "
        "must resolve to public addresses (unless the server allows private ones) and be in its allowed hosts."),
        examples=["https://hooks.example.com/acestep"])
    webhook_events: list[Literal[WEBHOOK_EVENTS]] = Field(list(WEBHOOK_EVENTS), min_length=1, description=(
        "Which events go to the webhook: start (first leased, status running), completed (succeeded, failed or "
        "canceled). A list or comma-separated text."), examples=[["completed"]])

    @field_validator("webhook_events", mode="before")
    @classmethod
    def _split_webhook_events(cls, value: Any) -> Any:
        """A form field's "start,completed" is the list ["start", "completed"]."""
        if isinstance(value, str):
            value = [part.strip().lower() for part in value.split(",") if part.strip()]
        return value

    @field_validator("audio_format", "task_type", mode="before")
    @classmethod
    def _lowercase(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("mp3_bitrate", mode="before")
    @classmethod
    def _bitrate_text(cls, value: Any) -> Any:
        """A form field's "192" is the number 192, read as any integer field reads text (a Literal takes no text)."""
        if isinstance(value, str):
            try:
                return _INTEGER.validate_python(value)
            except ValidationError:
                pass  # the Literal refuses it, listing the bitrates
        return value

    @field_validator(*NUMBER_FIELDS, "audio_code_string", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any) -> Any:
        """JSON true/false is not a number: pydantic would read it as 1/0, which the published schema forbids."""
        if isinstance(value, bool) or (isinstance(value, list) and any(isinstance(v, bool) for v in value)):
            raise ValueError("must be a number, not a boolean")
        return value

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_list(cls, value: Any) -> Any:
        """Upstream's one seed per output, "11,12" or [11, 12]; each checked here, so an error says which one."""
        if isinstance(value, str) and "," in value:
            value = [part.strip() for part in value.split(",")]
        if not isinstance(value, list):
            return value
        seeds = []
        for number, part in enumerate(value, 1):
            try:
                if isinstance(part, bool):
                    raise ValueError("must be a number, not a boolean")
                seeds.append(-1 if part == "" else _SEED.validate_python(part))  # upstream: "" is a random one
            except (ValueError, ValidationError) as exc:
                why = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
                raise ValueError(f"entry {number} of {len(value)}, {part!r}: {why}") from None
        return seeds

    @field_validator("track_classes", mode="before")
    @classmethod
    def _split_track_classes(cls, value: Any) -> Any:
        """A form field's "drums, bass" is the list ["drums", "bass"]."""
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value or None

    @field_validator("audio_code_string")
    @classmethod
    def _canonical_audio_codes(cls, value: str | list[int] | None) -> str | None:
        """One spelling for both forms: the token string the pipeline parses. Text other than the tokens (and
        whitespace) is refused rather than skipped, as a list of no codes is absent."""
        if value is None or value == []:
            return None
        if isinstance(value, str):
            if AUDIO_CODE.sub("", value).strip():
                raise ValueError("must be <|audio_code_N|> tokens only, or a list of integers")
            value = [int(n) for n in AUDIO_CODE.findall(value)]
        if not value:  # whitespace only
            return None
        if len(value) > MAX_AUDIO_CODES:
            raise ValueError(f"at most {MAX_AUDIO_CODES} codes (got {len(value)})")
        return "".join(f"<|audio_code_{n}|>" for n in value)

    @property
    def audio_codes(self) -> list[int]:
        """The codes of `audio_code_string` (empty without)."""
        return [int(n) for n in AUDIO_CODE.findall(self.audio_code_string or "")]

    @field_validator("timesteps", mode="before")
    @classmethod
    def _split_timesteps(cls, value: Any) -> Any:
        return [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    @field_validator("timesteps")
    @classmethod
    def _check_timesteps(cls, value: list[float] | None) -> list[float] | None:
        if value is not None:
            if any(not (math.isfinite(t) and 0.0 < t <= 1.0) for t in value):
                raise ValueError("every timestep must be in (0, 1]")
            if any(b >= a for a, b in zip(value, value[1:])):
                raise ValueError("timesteps must be strictly descending")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> "GenerateRequest":
        if self.repainting_end is not None and self.repainting_end < 0:
            self.repainting_end = None  # upstream: negative means "to the end of the source"
        if self.repainting_end is not None and self.repainting_end <= self.repainting_start:
            raise ValueError(f"repainting_end ({self.repainting_end}) must be greater than repainting_start "
                             f"({self.repainting_start})")
        if isinstance(self.seed, list) and len(self.seed) > self.num_outputs:
            raise ValueError(f"seed lists {len(self.seed)} seeds for {self.num_outputs} outputs; send batch_size "
                             f"{len(self.seed)}, or fewer seeds")
        if self.cfg_interval_start > self.cfg_interval_end:
            raise ValueError(f"cfg_interval_start ({self.cfg_interval_start}) must be <= cfg_interval_end "
                             f"({self.cfg_interval_end})")
        return self

    @property
    def num_outputs(self) -> int:
        return 2 if self.batch_size is None else self.batch_size

    @property
    def needs_lm(self) -> bool:
        """Asks for what only the LM does (upstream's `require_llm`); `use_cot_*` alone only shape it when it runs."""
        return self.thinking or self.sample_mode or bool(self.sample_query.strip()) or self.use_format


def normalize_payload(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Map upstream's spellings onto canonical names: canonical key, then aliases, then the same inside `metas`.

    A null or empty-string value counts as absent (upstream fell back to the default for both), so the field's default
    applies. Unknown keys are dropped.
    """
    nested: Mapping[str, Any] = {}
    for key in NESTED_KEYS:
        value = raw.get(key)
        if isinstance(value, str) and value.strip().startswith("{"):
            try:
                value = json.loads(value)
            except ValueError:
                value = None
        if isinstance(value, Mapping) and value:
            nested = value
            break
    out: dict[str, Any] = {}
    for name in GenerateRequest.model_fields:
        for source in (raw, nested):
            for key in (name, *ALIASES.get(name, ()), to_camel(name)):  # camelCase of every field, as upstream
                value = source.get(key)
                if value is not None and value != "":
                    out[name] = value
                    break
            if name in out:
                break
    return out


def describe_validation_error(error: ValidationError) -> tuple[int, str]:
    """(status, one-line detail) naming the field and the value it got."""
    first = error.errors()[0]
    # The field and list indexes; not the member of a union that failed (seed: "constrained-int").
    field = ".".join(str(p) for i, p in enumerate(first["loc"]) if i == 0 or isinstance(p, int)) or "body"
    message = first["msg"].removeprefix("Value error, ")
    status = 400 if first["loc"] and first["loc"][0] in CHOICE_FIELDS else 422
    if first["type"] in ("missing",) or not first["loc"]:
        return status, f"{field}: {message}"
    return status, f"{field}: {message} (got {_short(first.get('input'))})"


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class JobProgress(BaseModel):
    stage: str = Field(description="queued, starting, encode_audio, lm, condition, diffusion, decode, write, "
                       "retry_wait, done")
    step: int = Field(0, description="Diffusion steps done; in stage lm, tokens (codes, while it writes them) done.")
    total: int = Field(0, description="Diffusion steps in all; in stage lm, the codes to write (0 while it writes "
                       "text).")


class JobView(BaseModel):
    """`GET /v1/jobs/{job_id}`: every key is always present."""

    job_id: str
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    created_at: float
    started_at: float | None
    finished_at: float | None
    queue_position: int
    eta_seconds: float | None
    avg_job_seconds: float
    result: dict[str, Any] | None
    error: str | None
    attempts: int = Field(description="Attempts so far: a lost driver or replica lease is retried, up to the "
                          "server's max_attempts.")
    progress: JobProgress | None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer of the service (and of its framework: 404, 405, 422): one human-readable line."""

    detail: str = Field(description="What was wrong, naming the field and the value it got where there is one.")


class JobSubmitted(BaseModel):
    """`POST /v1/music/generate`'s answer: the job to poll at `GET /v1/jobs/{job_id}`."""

    job_id: str
    status: Literal["queued", "running", "succeeded", "failed", "canceled"] = Field(description=(
        "queued for a new job; an Idempotency-Key replay answers the existing job's status."))
    queue_position: int


class ReadyResponse(BaseModel):
    """`GET /readyz` once every stage is ready."""

    status: Literal["ready"]
    stages: list[str]


_SCHEMA_METADATA = ("title", "description", "default", "examples")
_ABSENT = [{"type": "null"}, {"const": ""}]
_SPACE = r"[\s\x85]*"  # what pydantic strips around a number (Unicode White_Space)


def _any_case(word: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in word)


# Text pydantic reads as a number or a boolean: what form fields carry, and what upstream's JSON clients may send.
_NUMBER_TEXT = {"type": "string",
                "pattern": rf"^{_SPACE}[+-]?([0-9_]+\.?[0-9_]*|\.[0-9_]+)([eE][+-]?[0-9_]+)?{_SPACE}$"}
_BOOLEAN_TEXT = {"type": "string", "pattern": "^(" + "|".join(_any_case(w) for w in (
    "0", "1", "true", "false", "t", "f", "yes", "no", "y", "n", "on", "off")) + ")$"}


def _lenient(option: dict[str, Any]) -> list[dict[str, Any]]:
    """`option` and the other spellings of it that the server accepts."""
    kind = option.get("type")
    if "enum" in option and kind == "integer":  # mp3_bitrate: also as text, as any number
        return [option, _NUMBER_TEXT]
    if "enum" in option:  # audio_format, task_type: stripped and lower-cased first
        space = r"[\s\x1c-\x1f\x85]*"  # what str.strip() removes
        words = "|".join(_any_case(v) for v in option["enum"])
        return [option, {"type": "string", "pattern": f"^{space}({words}){space}$"}]
    if kind in ("integer", "number"):
        return [option, _NUMBER_TEXT]
    if kind == "boolean":
        return [option, {"enum": [0, 1]}, _BOOLEAN_TEXT]
    if kind == "array":  # timesteps: also "0.9,0.5,0.2"
        items = {"anyOf": _lenient(option["items"])} if "items" in option else {}
        return [{**option, "items": items}, {"type": "string"}]
    return [option]


def generate_request_schema() -> dict[str, Any]:
    """The published JSON Schema of the generate request: `GenerateRequest`'s, widened to what the server accepts
    before validating it (`normalize_payload`, pydantic's lax mode), as upstream did:

    - null and "" in any field mean "absent: use the default", e.g. `audio_format: ""` is mp3;
    - numbers and booleans may be sent as text ("30", "true", "0"), as every form field is, and 0/1 as booleans;
    - audio_format and task_type are case-insensitive; timesteps may be a comma-separated string.
    Cross-field rules (repainting_end > repainting_start, ...) and this server's limits are not in it (422)."""
    schema = GenerateRequest.model_json_schema()
    properties = {}
    for name, prop in schema["properties"].items():
        meta = {k: prop[k] for k in _SCHEMA_METADATA if k in prop}
        rule = {k: v for k, v in prop.items() if k not in _SCHEMA_METADATA}
        options = [o for o in rule.get("anyOf", [rule]) if o != {"type": "null"}]
        meta["description"] = (meta.get("description", "") + " Null or empty: the default.").strip()
        properties[name] = {**meta, "anyOf": [*(x for o in options for x in _lenient(o)), *_ABSENT]}
    return {**schema, "properties": properties}
