"""`JobDriver`: leases jobs from the registry and moves each through the stages (the decoder writes the audio).

It holds no job state of its own: a lease kept alive by heartbeats. If this replica dies, its leases lapse and the
registry hands the jobs to another driver (or fails them after `max_attempts`). Each lease is one attempt, whose id
(`<job_id>#<n>`) every stage call carries; when the registry says the attempt is no longer ours (canceled, timed
out, lease lost), the stage call in flight is canceled on its replica.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
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
from models.dit import DiTRequest
from models.loading import ModelConfig, load_vae_config

logger = logging.getLogger(__name__)

# A replica or actor that went away mid-call: the job did nothing wrong, so it may run again.
RETRYABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, BackPressureError)


class StageError(Exception):
    """A stage failed this job; the message is the one line the client sees."""


@serve.deployment(ray_actor_options={"num_cpus": 0}, health_check_period_s=10)
class JobDriver:
    async def __init__(self, model: ModelConfig, queue: QueueConfig, files: FilesConfig, registry_name: str,
                       condition: DeploymentHandle, dit: DeploymentHandle, codec: DeploymentHandle):
        configure_replica_logging()
        self.model, self.queue = model, queue
        self.condition, self.dit, self.codec = condition, dit, codec
        self.registry = RegistryClient(registry_name, queue, files)
        vae = load_vae_config(model)
        self.sample_rate, self.hop_length = int(vae["sampling_rate"]), math.prod(vae["downsampling_ratios"])
        self.driver_id = f"driver-{uuid.uuid4().hex[:12]}"
        self.running: set[asyncio.Task] = set()
        self.loop = asyncio.get_running_loop().create_task(self._lease_loop())

    def check_health(self) -> None:
        if self.loop.done():
            raise RuntimeError(f"lease loop stopped: {self.loop.exception()!r}")

    async def _lease_loop(self) -> None:
        while True:
            try:
                room = self.queue.max_running_jobs - len(self.running)
                if room <= 0:
                    await asyncio.wait(self.running, return_when=asyncio.FIRST_COMPLETED)
                    continue
                for job in await self.registry.call("lease", self.driver_id, room, 1.0):
                    task = asyncio.create_task(self._run_job(job))
                    self.running.add(task)
                    task.add_done_callback(self.running.discard)
            except Exception:  # the registry restarting, say: keep trying, never exit the loop
                logger.exception("lease loop error; retrying in 1 s")
                await asyncio.sleep(1.0)

    async def _run_job(self, job: dict[str, Any]) -> None:
        attempt, spec = job["attempt_id"], job["spec"]
        progress = {"stage": "starting", "step": 0, "total": 0}
        work = asyncio.create_task(self._generate(job["job_id"], attempt, spec, progress))
        beat = min(self.queue.lease_seconds / 3, 1.0)
        while not work.done():
            await asyncio.wait({work}, timeout=beat)
            if work.done():
                break
            try:
                still_ours = await self.registry.call("heartbeat", attempt, self.driver_id,
                                                      None if progress["stage"] == "diffusion" else progress)
            except Exception:  # registry briefly unreachable: the lease has slack for a missed beat
                continue
            if not still_ours:
                work.cancel()  # cancels the stage call in flight too (see `_generate.stage`)
                logger.warning("job %s: no longer ours (canceled, timed out or lease lost); stopping", attempt)
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
            await self.registry.call("finish", attempt, self.driver_id, result)

    async def _generate(self, job_id: str, attempt: str, spec: dict[str, Any],
                        progress: dict[str, Any]) -> dict[str, Any]:
        request = GenerateRequest.model_validate(spec["request"])
        seeds: list[int] = spec["seeds"]
        timings: dict[str, float] = {}

        async def stage(name: str, call: Callable[[], DeploymentResponse]):
            """One stage call. Canceling the job cancels the call on the stage's replica (Serve cancels a callee
            only for callers inside an HTTP request). A replica that went away (scaled down, redeployed, died)
            gets the call again elsewhere, up to `stage_retries` times, without spending one of the job's
            attempts."""
            progress.update(stage=name, step=0, total=0)
            start = time.perf_counter()
            try:
                for retry in range(self.queue.stage_retries + 1):
                    response = call()
                    try:
                        return await response
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
                latents_in[kind], seconds = await stage("encode_audio", lambda: self.codec.encode.remote(
                    source, kind, seeds[0], attempt))
                if kind == "source":
                    source_seconds = seconds
        duration = request.audio_duration or source_seconds or self.queue.default_duration_s

        # 2. Conditions, 3. sampling, 4. decode, encode and write the files (next to the decoder).
        condition_request = ConditionRequest(
            caption=request.caption, lyrics=request.lyrics, audio_duration=duration, task_type=request.task_type,
            vocal_language=request.vocal_language, instruction=request.instruction, bpm=request.bpm,
            keyscale=request.key_scale or None, timesignature=request.time_signature or None,
            src_latents=latents_in.get("source"), reference_latents=latents_in.get("reference"),
            repainting_start=request.repainting_start, repainting_end=request.repainting_end,
            audio_cover_strength=request.audio_cover_strength, tag=attempt)
        condition = await stage("condition", lambda: self.condition.encode.remote(condition_request))
        dit_request = DiTRequest(
            condition=condition, seeds=seeds, num_inference_steps=request.inference_steps, shift=request.shift,
            guidance_scale=request.guidance_scale, cfg_interval_start=request.cfg_interval_start,
            cfg_interval_end=request.cfg_interval_end, audio_cover_strength=request.audio_cover_strength,
            timesteps=request.timesteps, tag=attempt)
        latents, max_jobs_per_pass = await stage("diffusion", lambda: self.dit.generate.remote(dit_request))
        if latents is None:  # the DiT dropped the job mid-batch: it was canceled or ran out of time
            raise StageError("diffusion: stopped before the last step")
        samples = round(duration * self.sample_rate)
        decode_request = DecodeRequest(job_id=job_id, attempt_id=attempt, latents=latents, samples=samples,
                                       audio_format=request.audio_format)
        keys = await stage("decode", lambda: self.codec.decode.remote(decode_request))

        seconds = min(samples, latents.shape[1] * self.hop_length) / self.sample_rate
        metrics().audio_seconds.inc(seconds * len(keys))
        logger.info("job %s: %d x %.1f s of audio; stage seconds %s", attempt, len(keys), seconds,
                    {k: round(v, 3) for k, v in timings.items()})
        result = build_result(request, seeds, keys, seconds, self.model.name, timings)
        result["batching"] = {"dit_max_jobs_per_pass": max_jobs_per_pass}
        return result


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
        "stage_seconds": {name: round(value, 4) for name, value in timings.items()},
    }


def _one_line(exc: BaseException) -> str:
    """`Type: first line of the message`, with Ray's wrapper (and its remote traceback) peeled off."""
    cause = getattr(exc, "cause", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")
