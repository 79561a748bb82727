"""Stage 2: flow-matching sampling with the ACE-Step DiT (`AceStepPipeline.__call__` steps 6-10).

Requests from different jobs run in one forward pass when they can share it: same step schedule, shift, guidance and
(because the diffusers DiT applies no padding masks) the same latent and condition lengths. Each request keeps its
own seeds, so a job's latents do not depend on what it was batched with.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance
from diffusers.utils.torch_utils import randn_tensor

from models.condition import ConditionResult
from models.loading import ModelConfig, load_components, load_vae_config, pipeline_view

logger = logging.getLogger(__name__)

PARTS = ["transformer", "scheduler"]


@dataclass
class DiTRequest:
    """One job's sampling request: its conditions and one seed per output."""

    condition: ConditionResult
    seeds: list[int]
    num_inference_steps: int = 8
    shift: float = 3.0
    guidance_scale: float = 7.0
    cfg_interval_start: float = 0.0
    cfg_interval_end: float = 1.0
    audio_cover_strength: float = 1.0
    timesteps: list[float] | None = None
    tag: str = field(default="", compare=False)  # the job id, for progress reports and logs


# (job tags, step, total, step seconds) -> tags to drop from the batch now
StepCallback = Callable[[list[str], int, int, float], "set[str] | list[str] | None"]


class DiTEngine:
    """`AceStepTransformer1DModel` + the ACE-Step timestep schedule + Euler steps (+ APG guidance for base models)."""

    def __init__(self, config: ModelConfig):
        self.config = config = config.for_stage("dit")
        self.components = load_components(config, PARTS)
        self.pipe = pipeline_view(self.components, load_vae_config(config))
        self.transformer = self.components["transformer"]
        self.device = config.torch_device()
        if config.compiled("dit"):
            self.transformer.compile()

    @property
    def is_turbo(self) -> bool:
        return self.pipe.is_turbo

    def effective_guidance(self, guidance_scale: float) -> float:
        """Turbo checkpoints have guidance distilled in: the pipeline runs them at 1.0 whatever was asked."""
        return 1.0 if self.is_turbo else guidance_scale

    def batch_key(self, request: DiTRequest) -> tuple:
        """Requests with equal keys can share every DiT forward pass."""
        c = request.condition
        return (c.latent_length, c.encoder_hidden_states.shape[0],
                None if c.non_cover_hidden_states is None else c.non_cover_hidden_states.shape[0],
                request.num_inference_steps, request.shift, self.effective_guidance(request.guidance_scale),
                request.cfg_interval_start, request.cfg_interval_end, request.audio_cover_strength,
                tuple(request.timesteps) if request.timesteps else None)

    def warm_up(self) -> None:
        """One step on one second of zeros: allocations (and compilation, if on) happen before traffic does."""
        frames, cfg = math.ceil(self.pipe.latents_per_second), self.transformer.config
        width = cfg.encoder_hidden_size or cfg.hidden_size
        condition = ConditionResult(encoder_hidden_states=np.zeros((8, width), np.float32),
                                    context_latents=np.zeros((frames, 2 * cfg.audio_acoustic_hidden_dim), np.float32),
                                    null_embedding=np.zeros((width,), np.float32))
        self.generate([DiTRequest(condition=condition, seeds=[0], num_inference_steps=1, tag="warm-up")])

    def generate(self, requests: list[DiTRequest], on_step: StepCallback | None = None) -> list[np.ndarray | None]:
        """Latents `(len(seeds), frames, latent_channels)` per request, in order.

        `on_step` is called after every step with the tags still in the batch; the tags it returns (canceled jobs)
        leave the batch at once and get None.
        """
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[self.batch_key(request)].append(index)
        results: list[np.ndarray | None] = [None] * len(requests)
        for indices in groups.values():
            for i, latents in zip(indices, self._denoise([requests[i] for i in indices], on_step)):
                results[i] = latents
        return results

    @torch.no_grad()
    def _denoise(self, requests: list[DiTRequest], on_step: StepCallback | None) -> list[np.ndarray | None]:
        """One shared forward batch: all requests have the same `batch_key`."""
        pipe, device, dtype = self.pipe, self.device, self.transformer.dtype
        first = requests[0]
        tags = [r.tag for r in requests]
        start = time.perf_counter()

        def stacked(get) -> torch.Tensor:
            # Each request's condition, repeated once per seed: (batch, ...).
            return torch.cat([torch.from_numpy(get(r.condition)).to(device=device, dtype=dtype)[None]
                              .expand(len(r.seeds), *get(r.condition).shape) for r in requests])

        encoder_hidden_states = stacked(lambda c: c.encoder_hidden_states)
        context_latents = stacked(lambda c: c.context_latents)
        blend_cover = first.audio_cover_strength < 1.0 and first.condition.non_cover_hidden_states is not None
        non_cover_hidden_states = stacked(lambda c: c.non_cover_hidden_states) if blend_cover else None
        batch_size, latent_length = context_latents.shape[0], context_latents.shape[1]

        # 1. Prepare latents: one generator per output, so each output's noise depends on its seed only.
        generators = [torch.Generator(device="cpu").manual_seed(s) for r in requests for s in r.seeds]
        shape = (batch_size, latent_length, self.transformer.config.audio_acoustic_hidden_dim)
        xt = randn_tensor(shape, generator=generators, device=device, dtype=dtype)

        # 2. Timesteps: the shifted ACE-Step schedule, fed verbatim to an unshifted Euler scheduler.
        guidance_scale = self.effective_guidance(first.guidance_scale)
        do_cfg = guidance_scale > 1.0 and not self.is_turbo
        null_hidden_states = None
        if do_cfg:
            null_hidden_states = stacked(lambda c: c.null_embedding[None]).expand_as(encoder_hidden_states)
        schedule = pipe._get_timestep_schedule(num_inference_steps=first.num_inference_steps, shift=first.shift,
                                               device=device, dtype=torch.float32, timesteps=first.timesteps)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.components["scheduler"].config)
        scheduler.set_timesteps(sigmas=schedule.tolist(), device=device)
        total = len(scheduler.timesteps)

        # 3. Denoise. `alive` lists the requests still in the batch; their rows are contiguous, in that order.
        momentum_buffer = MomentumBuffer(momentum=-0.75) if do_cfg else None
        alive = list(range(len(requests)))

        def row_starts() -> np.ndarray:
            return np.cumsum([0] + [len(requests[i].seeds) for i in alive])
        for step, t in enumerate(scheduler.timesteps):
            step_start = time.perf_counter()
            t_batch = float(t) * torch.ones((batch_size,), device=device, dtype=dtype)
            apply_cfg = do_cfg and first.cfg_interval_start <= 1.0 - float(t) <= first.cfg_interval_end
            if apply_cfg:
                cond, uncond = self._forward(
                    torch.cat([xt, xt]), torch.cat([t_batch, t_batch]),
                    torch.cat([encoder_hidden_states, null_hidden_states]),
                    torch.cat([context_latents, context_latents])).chunk(2)
                velocity = normalized_guidance(pred_cond=cond, pred_uncond=uncond, guidance_scale=guidance_scale - 1.0,
                                               momentum_buffer=momentum_buffer, eta=0.0, norm_threshold=2.5,
                                               use_original_formulation=True, norm_dim=(1,))
            else:
                velocity = self._forward(xt, t_batch, encoder_hidden_states, context_latents)
            if blend_cover:
                text2music = self._forward(xt, t_batch, non_cover_hidden_states, context_latents)
                strength = first.audio_cover_strength
                velocity = strength * velocity + (1.0 - strength) * text2music
            xt = scheduler.step(velocity, t, xt, return_dict=False)[0]
            stopped = set(on_step(tags, step + 1, total, time.perf_counter() - step_start) or ()) if on_step else set()
            if stopped & set(tags):
                # Canceled jobs leave the batch here; the others go on with their own rows unchanged.
                keep, starts = [k for k, tag in enumerate(tags) if tag not in stopped], row_starts()
                rows = torch.tensor([row for k in keep for row in range(starts[k], starts[k + 1])], dtype=torch.long,
                                    device=device)
                xt, encoder_hidden_states, context_latents = xt[rows], encoder_hidden_states[rows], context_latents[rows]
                null_hidden_states = null_hidden_states[rows] if null_hidden_states is not None else None
                non_cover_hidden_states = non_cover_hidden_states[rows] if non_cover_hidden_states is not None else None
                if momentum_buffer is not None and torch.is_tensor(momentum_buffer.running_average):
                    momentum_buffer.running_average = momentum_buffer.running_average[rows]
                tags, alive = [tags[k] for k in keep], [alive[k] for k in keep]
                batch_size = len(rows)
                logger.info("dropped jobs %s from a dit batch at step %d", sorted(stopped), step + 1)
                if batch_size == 0:
                    break
        logger.info("dit batch of %d outputs x %d frames x %d steps in %.2f s, jobs %s",
                    batch_size, latent_length, total, time.perf_counter() - start, tags)
        latents = xt.float().cpu().numpy()
        results: list[np.ndarray | None] = [None] * len(requests)
        starts = row_starts()
        for k, index in enumerate(alive):
            results[index] = latents[starts[k]:starts[k + 1]]
        return results

    def _forward(self, hidden_states, timestep, encoder_hidden_states, context_latents) -> torch.Tensor:
        return self.transformer(hidden_states=hidden_states, timestep=timestep, timestep_r=timestep,
                                encoder_hidden_states=encoder_hidden_states, context_latents=context_latents,
                                return_dict=False)[0]
