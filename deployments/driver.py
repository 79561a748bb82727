"""`JobDriver`: leases jobs from the registry and moves each through the stages, then writes the audio.

It holds no job state of its own: a lease kept alive by heartbeats. If this replica dies, its leases lapse and the
registry hands the jobs to another driver (or fails them after `max_attempts`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import ray
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from jobs.config import FilesConfig, QueueConfig
from jobs.metrics import metrics
from jobs.registry import RegistryClient
from jobs.schemas import GenerateRequest
from jobs.storage import ResultStore
from models.audio_io import encode_audio, load_audio
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
        self.model, self.queue = model, queue
        self.condition, self.dit, self.codec = condition, dit, codec
        self.registry = RegistryClient(registry_name, queue, files)
        self.store = ResultStore(files.output_dir, files.storage_options)
        vae = load_vae_config(model)
        self.sample_rate, self.channels = int(vae["sampling_rate"]), int(vae["audio_channels"])
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
        job_id, spec = job["job_id"], job["spec"]
        progress = {"stage": "starting", "step": 0, "total": 0}
        work = asyncio.create_task(self._generate(job_id, spec, progress))
        beat = min(self.queue.lease_seconds / 3, 1.0)
        while not work.done():
            await asyncio.wait({work}, timeout=beat)
            if work.done():
                break
            try:
                still_ours = await self.registry.call("heartbeat", job_id, self.driver_id,
                                                      None if progress["stage"] == "diffusion" else progress)
            except Exception:  # registry briefly unreachable: the lease has slack for a missed beat
                continue
            if not still_ours:
                work.cancel()
                logger.warning("job %s: no longer ours (canceled, timed out or lease lost); stopping", job_id)
                return
        try:
            result = work.result()
        except RETRYABLE as exc:
            await self.registry.call("fail", job_id, self.driver_id, f"{progress['stage']}: {_one_line(exc)}",
                                     retry=True)
        except StageError as exc:
            await self.registry.call("fail", job_id, self.driver_id, str(exc))
        except Exception as exc:
            logger.exception("job %s failed unexpectedly", job_id)
            await self.registry.call("fail", job_id, self.driver_id, f"{progress['stage']}: {_one_line(exc)}")
        else:
            await self.registry.call("finish", job_id, self.driver_id, result)

    async def _generate(self, job_id: str, spec: dict[str, Any], progress: dict[str, Any]) -> dict[str, Any]:
        request = GenerateRequest.model_validate(spec["request"])
        seeds: list[int] = spec["seeds"]
        timings: dict[str, float] = {}

        async def stage(name: str, call):
            progress.update(stage=name, step=0, total=0)
            start = time.perf_counter()
            try:
                return await call
            except RETRYABLE:
                raise
            except Exception as exc:
                logger.exception("job %s: stage %s failed", job_id, name)
                raise StageError(f"{name}: {_one_line(exc)}") from exc
            finally:
                elapsed = time.perf_counter() - start
                timings[name] = timings.get(name, 0.0) + elapsed
                metrics().stage_seconds.observe(elapsed, tags={"stage": name})

        # 1. Input audio -> latents (the source's length is the default duration).
        latents_in: dict[str, Any] = {}
        source_seconds = None
        for field, kind in (("src_audio", "source"), ("reference_audio", "reference")):
            if spec.get(field):
                waveform = await stage("encode_audio", asyncio.to_thread(load_audio, spec[field], self.sample_rate,
                                                                         self.channels))
                if kind == "source":
                    source_seconds = waveform.shape[1] / self.sample_rate
                latents_in[kind] = await stage("encode_audio", self.codec.encode.remote(waveform, kind, seeds[0],
                                                                                       job_id))
        duration = request.audio_duration or source_seconds or self.queue.default_duration_s

        # 2. Conditions, 3. sampling, 4. decode.
        condition = await stage("condition", self.condition.encode.remote(ConditionRequest(
            caption=request.caption, lyrics=request.lyrics, audio_duration=duration, task_type=request.task_type,
            vocal_language=request.vocal_language, instruction=request.instruction, bpm=request.bpm,
            keyscale=request.key_scale or None, timesignature=request.time_signature or None,
            src_latents=latents_in.get("source"), reference_latents=latents_in.get("reference"),
            repainting_start=request.repainting_start, repainting_end=request.repainting_end,
            audio_cover_strength=request.audio_cover_strength, tag=job_id)))
        latents = await stage("diffusion", self.dit.generate.remote(DiTRequest(
            condition=condition, seeds=seeds, num_inference_steps=request.inference_steps, shift=request.shift,
            guidance_scale=request.guidance_scale, cfg_interval_start=request.cfg_interval_start,
            cfg_interval_end=request.cfg_interval_end, audio_cover_strength=request.audio_cover_strength,
            timesteps=request.timesteps, tag=job_id)))
        if latents is None:  # the DiT dropped the job mid-batch: it was canceled or ran out of time
            raise StageError("diffusion: stopped before the last step")
        audio = await stage("decode", self.codec.decode.remote((job_id, latents)))
        # The latent grid is 1/25 s; the client asked for a duration, so cut the padding of the last frame.
        audio = audio[..., : round(duration * self.sample_rate)]

        # 5. Files.
        keys = await stage("write", asyncio.to_thread(self._write, job_id, audio, request.audio_format))
        seconds = audio.shape[-1] / self.sample_rate
        metrics().audio_seconds.inc(seconds * len(keys))
        logger.info("job %s: %d x %.1f s of audio; stage seconds %s", job_id, len(keys), seconds,
                    {k: round(v, 3) for k, v in timings.items()})
        return build_result(request, seeds, keys, seconds, self.model.name, timings)

    def _write(self, job_id: str, audio, fmt: str) -> list[str]:
        keys = []
        for index, waveform in enumerate(audio):
            key = self.store.key(job_id, index, fmt)
            self.store.put(key, encode_audio(waveform, self.sample_rate, fmt))
            keys.append(key)
        return keys


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
