"""Serve shim for stage 3 (`models.codec.AudioCodecEngine`): batched VAE decode, then the audio files encoded and
written next to the decoder (only their keys travel back, never the waveforms), and VAE encode of input audio."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ray import serve

from deployments.stage import FrameBudget, ItemFailure, StageReplica, stamped
from jobs.config import FilesConfig, QueueConfig
from jobs.metrics import metrics
from jobs.storage import ResultStore, UploadStore
from models.audio_io import FORMATS, encode_audio, load_audio
from models.codec import AudioCodecEngine
from models.loading import ModelConfig

logger = logging.getLogger(__name__)


@dataclass
class DecodeRequest:
    """One job's latents `(outputs, frames, channels)`, to decode and write as `<job_id>/<index>.<extension>`, the
    extension of `audio_format` (wav32 writes .wav)."""

    job_id: str
    attempt_id: str
    latents: np.ndarray
    samples: int  # audio samples per output to keep: the requested duration (the latent grid is 1/25 s)
    audio_format: str
    mp3_bitrate: int | None = None  # kbps, constant; None: variable (see `encode_audio`)


# Items are latents (outputs, frames, channels): their work is outputs x frames.
_budget = FrameBudget(lambda latents: latents.shape[0] * latents.shape[1])


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32, health_check_period_s=10)
class AudioCodec(StageReplica):
    engine_class, stage, batched, budget = AudioCodecEngine, "codec", "decode_batch", _budget

    async def __init__(self, model: ModelConfig, registry_name: str, queue: QueueConfig, files: FilesConfig,
                       simulate: dict | None = None):
        await self.start(model, registry_name, queue, files, simulate)
        self.store = ResultStore(files.output_dir, files.storage_options)
        self.uploads = UploadStore(files.upload_dir, files.storage_options)

    async def decode(self, request: DecodeRequest, company: int = 1) -> tuple[list[str], dict]:
        """Decode, trim to the requested duration, encode and store each output: the keys, in output order, and
        the job's stamps for the timeline (`written`: the files are stored)."""
        audio, stamps = await self.one(self.decode_batch, request.latents, company)
        start = time.perf_counter()
        keys = await asyncio.to_thread(self._write, request, audio[..., : request.samples])
        stamps["written"] = time.time()
        self.observe_latency(stamps["written"] - stamps["arrived"])
        logger.info("job %s: wrote %d files in %.3f s", request.attempt_id, len(keys), time.perf_counter() - start)
        return keys, stamps

    @serve.batch(max_batch_size=16384, batch_wait_timeout_s=0.02, batch_size_fn=_budget)
    async def decode_batch(self, items: list[np.ndarray]) -> list[tuple | ItemFailure]:
        """Items are latents `(n, frames, channels)`; answers `(n, channels, samples)` each, `stamped`."""
        metrics().stage_batch_size.observe(len(items), tags={"stage": "decode"})
        start, started = time.perf_counter(), time.time()
        audio = await self.guard.run_batch(self.engine.decode, items)
        self.jobs_done += len(items)
        logger.info("decode batch of %d in %.3f s", len(items), time.perf_counter() - start)
        return stamped(audio, started)

    def _write(self, request: DecodeRequest, audio: np.ndarray) -> list[str]:
        keys = []
        for index, waveform in enumerate(audio):
            key = self.store.key(request.job_id, index, FORMATS[request.audio_format].extension)
            self.store.put(key, encode_audio(waveform, self.engine.sample_rate, request.audio_format,
                                             request.mp3_bitrate))
            keys.append(key)
        return keys

    async def encode(self, source: dict[str, str], kind: str, seed: int | None, attempt_id: str = ""
                     ) -> tuple[tuple[np.ndarray, float], dict]:
        """Input audio (`{"upload": key}` in the upload store, or `{"path": file}` on a server path) -> its latents
        `(frames, channels)` and its length in seconds, and the stamps for the timeline. Read here, so the waveform
        never travels between replicas."""
        self.calls_in_flight += 1
        arrived, start = time.time(), time.perf_counter()
        try:
            waveform = await asyncio.to_thread(self._load, source)
            started = time.time()
            latents = await self.guard.run(self.engine.encode, waveform, kind, seed)
        finally:
            self.calls_in_flight -= 1
        logger.info("job %s: encoded %s audio (%d samples) in %.3f s", attempt_id, kind, waveform.shape[-1],
                    time.perf_counter() - start)
        stamps = {"arrived": arrived, "started": started, "finished": time.time()}
        return (latents, waveform.shape[-1] / self.engine.sample_rate), stamps

    def _load(self, source: dict[str, str]) -> np.ndarray:
        data = self.uploads.get(source["upload"]) if "upload" in source else Path(source["path"]).read_bytes()
        if data is None:
            raise ValueError("the uploaded audio is gone from the upload store")
        return load_audio(data, self.engine.sample_rate, self.engine.channels)
