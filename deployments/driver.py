"""`JobDriver`: leases jobs from the registry and moves each through the stages (the decoder writes the audio).

It holds no job state of its own: leases kept alive by one heartbeat call for all its jobs. If this replica dies,
its leases lapse and the registry hands the jobs to another driver (or fails them after `max_attempts`). Each lease
is one attempt, whose id (`<job_id>#<n>`) every stage call carries; when the registry says the attempt is no longer
ours (canceled, timed out, lease lost), the stage call in flight is canceled on its replica.

Each stage call also carries `company`: how many of this driver's other jobs are on their way to that stage. With
none, and nothing inside the stage, the stage does not wait for batch-mates that are not coming. Every job's result
has a `timeline`: when each stage call was sent, arrived, started, finished and returned (wall clock), and the Ray
calls the job cost.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from deployments.audio_codec import DecodeRequest
from deployments.logs import configure_replica_logging
from jobs.config import FilesConfig, QueueConfig
from jobs.metrics import metrics
from jobs.registry import RegistryClient
from jobs.schemas import GenerateRequest
from jobs.storage import ResultStore
from models.condition import ConditionRequest
from models.lm import LMRequest, LMResult
from models.dit import DiTRequest
from models.loading import ModelConfig, audio_code_spec, load_vae_config

logger = logging.getLogger(__name__)

# A replica or actor that went away mid-call: the job did nothing wrong, so it may run again.
RETRYABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, BackPressureError)


# The stages a job passes before each stage: its possible batch-mates there are the jobs in these now.
UPSTREAM = {"encode_audio": ("starting",), "lm": ("starting", "encode_audio"),
            "condition": ("starting", "encode_audio", "lm"), "diffusion": ("starting", "encode_audio", "lm", "condition"),
            "decode": ("diffusion",)}
# The tasks the 5 Hz LM plans (upstream skips it for cover, repaint and extract); its codes guide text2music alone.
LM_TASKS = ("text2music", "lego", "complete")


class StageError(Exception):
    """A stage failed this job; the message is the one line the client sees."""


@dataclass(eq=False)
class Running:
    """One attempt this driver runs: its work, its progress (sent with the next heartbeat when it changed) and the
    Ray calls it has cost."""

    progress: dict[str, Any] = field(default_factory=lambda: {"stage": "starting", "step": 0, "total": 0})
    work: asyncio.Task | None = None
    sent: dict[str, Any] | None = None  # the progress the registry has
    calls: Counter = field(default_factory=Counter)
    model: str = ""  # the name of the model it runs on


@serve.deployment(ray_actor_options={"num_cpus": 0}, health_check_period_s=10)
class JobDriver:
    async def __init__(self, models: list[ModelConfig], queue: QueueConfig, files: FilesConfig, registry_name: str,
                       conditions: dict[str, DeploymentHandle], dits: dict[str, DeploymentHandle],
                       codec: DeploymentHandle, lm: tuple[str, DeploymentHandle] | None = None):
        """`models`: every model served, the default first; `conditions` and `dits`: their stages, by model name;
        `lm`: the 5 Hz language model's name and stage, when the app runs one."""
        configure_replica_logging()
        self.lm_name, self.lm = lm or ("", None)
        self.models, self.queue = {m.name: m for m in models}, queue
        self.default = models[0].name
        self.conditions, self.dits, self.codec = conditions, dits, codec
        self.registry = RegistryClient(registry_name, queue, files)
        vae = load_vae_config(models[0])  # one VAE for all models (`deployments.app.check_models`)
        self.sample_rate, self.hop_length = int(vae["sampling_rate"]), math.prod(vae["downsampling_ratios"])
        # The ingress refuses codes for a model without them (None).
        self.audio_codes = {m.name: audio_code_spec(m) for m in models}
        self.driver_id = f"driver-{uuid.uuid4().hex[:12]}"
        self.running: set[asyncio.Task] = set()
        self.attempts: dict[str, Running] = {}
        self.loop = asyncio.get_running_loop().create_task(self._lease_loop())
        self.beats = asyncio.get_running_loop().create_task(self._heartbeat_loop())

    def check_health(self) -> None:
        for name, task in (("lease loop", self.loop), ("heartbeat loop", self.beats)):
            if task.done():
                raise RuntimeError(f"{name} stopped: {task.exception()!r}")

    async def _lease_loop(self) -> None:
        while True:
            try:
                room = self.queue.max_running_jobs - len(self.running)
                if room <= 0:
                    await asyncio.wait(self.running, return_when=asyncio.FIRST_COMPLETED)
                    continue
                leased = await self.registry.call("lease", self.driver_id, room, 1.0)
                for job in leased:  # all registered first: each one's company counts the others
                    self.attempts[job["attempt_id"]] = Running(model=job["spec"].get("model") or self.default)
                    self.attempts[job["attempt_id"]].calls["registry"] += 1 / len(leased)
                for job in leased:
                    task = asyncio.create_task(self._run_job(job))
                    self.running.add(task)
                    task.add_done_callback(self.running.discard)
            except Exception:  # the registry restarting, say: keep trying, never exit the loop
                logger.exception("lease loop error; retrying in 1 s")
                await asyncio.sleep(1.0)

    async def _heartbeat_loop(self) -> None:
        """One call for all of this driver's attempts, every `lease_seconds / 3` (at most 1 s); it carries the
        progress that changed (the DiT reports diffusion steps itself). An attempt the registry no longer counts as
        ours is stopped: its stage call in flight is canceled too (see `_generate.stage`)."""
        beat = min(self.queue.lease_seconds / 3, 1.0)
        while True:
            await asyncio.sleep(beat)
            if not self.attempts:
                continue
            sent = {attempt: None if run.progress["stage"] in ("lm", "diffusion") or run.progress == run.sent
                    else dict(run.progress) for attempt, run in self.attempts.items()}
            try:
                lost = await self.registry.call("heartbeats", self.driver_id, sent)
            except Exception:  # registry briefly unreachable: the lease has slack for a missed beat
                logger.warning("heartbeat failed; retrying", exc_info=True)
                continue
            for attempt, progress in sent.items():
                run = self.attempts.get(attempt)
                if run is not None:
                    run.calls["registry"] += 1 / len(sent)
                    run.sent = progress or run.sent
            for attempt in lost:
                run = self.attempts.get(attempt)
                if run is not None and run.work is not None and not run.work.done():
                    logger.warning("job %s: no longer ours (canceled, timed out or lease lost); stopping", attempt)
                    run.work.cancel()

    async def _run_job(self, job: dict[str, Any]) -> None:
        attempt = job["attempt_id"]
        run = self.attempts[attempt]
        try:
            run.work = asyncio.create_task(self._generate(job["job_id"], attempt, job["spec"], run))
            await asyncio.wait({run.work})
            await self._report(attempt, run)
        finally:
            del self.attempts[attempt]

    async def _report(self, attempt: str, run: Running) -> None:
        """The attempt's outcome to the registry (nothing when it was stopped for no longer being ours)."""
        work, progress = run.work, run.progress
        if work.cancelled():
            return
        try:
            result = work.result()
        except RETRYABLE as exc:
            await self.registry.call("fail", attempt, self.driver_id, f"{progress['stage']}: {_one_line(exc)}",
                                     retry=True)
        except StageError as exc:
            await self.registry.call("fail", attempt, self.driver_id, str(exc))
        except Exception as exc:
            logger.exception("job %s failed unexpectedly", attempt)
            await self.registry.call("fail", attempt, self.driver_id, f"{progress['stage']}: {_one_line(exc)}")
        else:
            run.calls["registry"] += 1
            result["timeline"]["ray_calls"] = {kind: round(n, 2) for kind, n in run.calls.items()}
            await self.registry.call("finish", attempt, self.driver_id, result)

    def _company(self, stage: str, attempt: str) -> int:
        """This driver's other jobs on their way to `stage` now (to the same model's, for its own stages)."""
        upstream, me = UPSTREAM[stage], self.attempts[attempt]
        same_stage = (lambda run: run.model == me.model) if stage in ("condition", "diffusion") else lambda run: True
        return sum(1 for other, run in self.attempts.items()
                   if other != attempt and run.progress["stage"] in upstream and same_stage(run))

    async def _generate(self, job_id: str, attempt: str, spec: dict[str, Any], run: Running) -> dict[str, Any]:
        request = GenerateRequest.model_validate(spec["request"])
        model = run.model  # the spec names a further model; none means the default
        if model not in self.models:  # journaled before a redeploy that dropped the model
            raise StageError(f"model {model!r} is no longer served; available: {sorted(self.models)}")
        seeds: list[int] = spec["seeds"]
        progress = run.progress
        timings: dict[str, float] = {}
        timeline: dict[str, dict[str, float]] = {}

        async def stage(name: str, call: Callable[[int], DeploymentResponse], label: str | None = None):
            """One stage call, `call(company)`, whose answer is `(value, stamps)`: the value is returned, the
            stage's stamps (arrived, started, finished...) go into the timeline between `sent` and `returned`.
            Canceling the job cancels the call on the stage's replica (Serve cancels a callee only for callers
            inside an HTTP request). A replica that went away (scaled down, redeployed, died) gets the call again
            elsewhere, up to `stage_retries` times, without spending one of the job's attempts."""
            company = self._company(name, attempt)
            progress.update(stage=name, step=0, total=0)
            start = time.perf_counter()
            entry = timeline.setdefault(label or name, {})
            entry["sent"] = time.time()
            try:
                for retry in range(self.queue.stage_retries + 1):
                    response = call(company)
                    run.calls["stages"] += 1
                    try:
                        value, stamps = await response
                        entry.update(stamps, returned=time.time())
                        return value
                    except asyncio.CancelledError:
                        response.cancel()
                        raise
                    except RETRYABLE as exc:
                        if retry == self.queue.stage_retries:
                            raise
                        logger.warning("job %s: %s replica went away (%s); calling it again", attempt, name,
                                       _one_line(exc))
                        await asyncio.sleep(0.5 * 2**retry)  # the router learns of the dead replica meanwhile
            except RETRYABLE:
                raise
            except Exception as exc:
                logger.exception("job %s: stage %s failed", attempt, name)
                raise StageError(f"{name}: {_one_line(exc)}") from exc
            finally:
                elapsed = time.perf_counter() - start
                timings[name] = timings.get(name, 0.0) + elapsed
                metrics().stage_seconds.observe(elapsed, tags={"stage": name})

        # 1. Input audio -> latents (the source's length is the default duration).
        latents_in: dict[str, Any] = {}
        source_seconds = None
        for field, kind in (("src_audio", "source"), ("reference_audio", "reference")):
            source = spec.get(field)
            if source:
                source = {"path": source} if isinstance(source, str) else source  # an older spec: a path
                latents_in[kind], seconds = await stage("encode_audio", lambda company: self.codec.encode.remote(
                    source, kind, seeds[0], attempt), f"encode_{kind}")
                if kind == "source":
                    source_seconds = seconds
        lm = None
        if self.lm is not None and request.task_type in LM_TASKS and (
                request.needs_lm or request.use_cot_metas or request.use_cot_caption or request.use_cot_language):
            lm_request = _lm_request(request, seeds[:1], source_seconds, attempt)
            lm = await stage("lm", lambda company: self.lm.generate.remote(lm_request, company))
            request = _planned(request, lm, source_seconds is not None)
        # As the pipeline: audio codes set the length before a source does.
        codes_seconds = (len(request.audio_codes) * self.audio_codes[model].seconds_per_code if request.audio_codes
                         else None)
        duration = request.audio_duration or codes_seconds or source_seconds or self.queue.default_duration_s

        # 2. Conditions, 3. sampling, 4. decode, encode and write the files (next to the decoder).
        condition_request = ConditionRequest(
            caption=request.caption, lyrics=request.lyrics, audio_duration=duration, task_type=request.task_type,
            vocal_language=request.vocal_language, instruction=request.instruction, bpm=request.bpm,
            keyscale=request.key_scale or None, timesignature=request.time_signature or None,
            src_latents=latents_in.get("source"), reference_latents=latents_in.get("reference"),
            repainting_start=request.repainting_start, repainting_end=request.repainting_end,
            audio_cover_strength=request.audio_cover_strength, track_name=request.track_name,
            track_classes=request.track_classes, audio_codes=request.audio_code_string, tag=attempt)
        condition = await stage("condition", lambda company: self.conditions[model].encode.remote(
            condition_request, company))
        dit_request = DiTRequest(
            condition=condition, seeds=seeds, num_inference_steps=request.inference_steps, shift=request.shift,
            guidance_scale=request.guidance_scale, cfg_interval_start=request.cfg_interval_start,
            cfg_interval_end=request.cfg_interval_end, audio_cover_strength=request.audio_cover_strength,
            timesteps=request.timesteps, lora=request.lora, lora_scale=request.lora_scale, tag=attempt)
        latents = await stage("diffusion", lambda company: self.dits[model].generate.remote(dit_request, company))
        if latents is None:  # the DiT dropped the job mid-batch: it was canceled or ran out of time
            raise StageError("diffusion: stopped before the last step")
        samples = round(duration * self.sample_rate)
        decode_request = DecodeRequest(job_id=job_id, attempt_id=attempt, latents=latents, samples=samples,
                                       audio_format=request.audio_format, mp3_bitrate=request.mp3_bitrate)
        keys = await stage("decode", lambda company: self.codec.decode.remote(decode_request, company))

        seconds = min(samples, latents.shape[1] * self.hop_length) / self.sample_rate
        metrics().audio_seconds.inc(seconds * len(keys))
        logger.info("job %s: %d x %.1f s of audio; stage seconds %s", attempt, len(keys), seconds,
                    {k: round(v, 3) for k, v in timings.items()})
        result = build_result(request, seeds, keys, seconds, model, timings)
        if lm is not None:
            result["lm_model"] = self.lm_name
            result["lm"] = {"fields": list(lm.lm_fields), "codes": len(request.audio_codes), "tokens": lm.tokens}
        result["batching"] = {"dit_max_jobs_per_pass": timeline["diffusion"].pop("max_jobs_per_pass", 0)}
        run.calls["dit_to_registry"] = timeline["diffusion"].pop("reports", 0)
        result["timeline"] = {"stages": timeline}
        return result


def _lm_request(request: GenerateRequest, seeds: list[int], source_seconds: float | None, tag: str) -> LMRequest:
    """What the LM is asked: the user's fields (empty ones for it to fill), and phase 2's codes only for text2music
    without codes of the client's own."""
    return LMRequest(
        caption=request.caption, lyrics=request.lyrics, bpm=request.bpm, keyscale=request.key_scale or None,
        timesignature=request.time_signature or None, duration=request.audio_duration or source_seconds,
        language=None if request.vocal_language in ("", "unknown") else request.vocal_language,
        thinking=request.thinking and request.task_type == "text2music" and not request.audio_code_string,
        use_cot_metas=request.use_cot_metas, use_cot_caption=request.use_cot_caption,
        use_cot_language=request.use_cot_language, sample_mode=request.sample_mode or bool(request.sample_query),
        sample_query=request.sample_query, use_format=request.use_format, lm_temperature=request.lm_temperature,
        lm_cfg_scale=request.lm_cfg_scale, lm_negative_prompt=request.lm_negative_prompt,
        lm_top_k=request.lm_top_k, lm_top_p=request.lm_top_p, lm_repetition_penalty=request.lm_repetition_penalty,
        seeds=seeds, tag=tag)


def _planned(request: GenerateRequest, lm: LMResult, has_source: bool) -> GenerateRequest:
    """The request with the LM's plan: its caption and lyrics, the metadata the user left empty (the user's own
    values are never replaced), and its codes."""
    meta, updates = lm.metadata, {"caption": lm.caption, "lyrics": lm.lyrics}
    for field, value, empty in (("bpm", meta.bpm, request.bpm is None),
                                ("key_scale", meta.keyscale, not request.key_scale),
                                ("time_signature", meta.timesignature, not request.time_signature),
                                ("audio_duration", meta.duration, request.audio_duration is None and not has_source),
                                ("vocal_language", meta.language, request.vocal_language in ("", "unknown"))):
        if empty and value not in (None, ""):
            updates[field] = value
    if lm.codes and lm.codes[0]:
        updates["audio_code_string"] = lm.audio_code_strings[0]
    return request.model_copy(update=updates)


def build_result(request: GenerateRequest, seeds: list[int], keys: list[str], seconds: float, model_name: str,
                 timings: dict[str, float]) -> dict[str, Any]:
    """The `result` object of upstream L: URLs, seeds really used, metas, and the stage timings."""
    urls = [ResultStore.url(key) for key in keys]
    metas = {"bpm": request.bpm if request.bpm is not None else "N/A", "duration": round(seconds, 3),
             "genres": "N/A", "keyscale": request.key_scale or "N/A",
             "timesignature": request.time_signature or "N/A"}
    if request.caption:
        metas["caption"] = request.caption
    if request.lyrics:
        metas["lyrics"] = request.lyrics
    times = ", ".join(f"{name} {value:.2f}s" for name, value in timings.items())
    return {
        "first_audio_path": urls[0] if urls else None,
        "second_audio_path": urls[1] if len(urls) > 1 else None,
        "audio_paths": urls,
        "generation_info": (f"Steps: {request.inference_steps}, Scale: {request.guidance_scale}, Shift: "
                            f"{request.shift}, Task: {request.task_type}, Seeds: {','.join(map(str, seeds))}, "
                            f"Duration: {seconds:.2f}s, Model: {model_name}, Time: {times}"),
        "status_message": "Generation completed successfully!",
        "seed_value": ",".join(str(s) for s in seeds),
        "metas": metas,
        "bpm": request.bpm, "duration": round(seconds, 3), "keyscale": request.key_scale or None,
        "timesignature": request.time_signature or None, "genres": None, "dit_model": model_name,
        "lora": {"name": request.lora, "scale": request.lora_scale} if request.lora else None,
        "stage_seconds": {name: round(value, 4) for name, value in timings.items()},
    }


def _one_line(exc: BaseException) -> str:
    """`Type: first line of the message`, with Ray's wrapper (and its remote traceback) peeled off."""
    cause = getattr(exc, "cause", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")
