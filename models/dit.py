"""Stage 2: flow-matching sampling with the ACE-Step DiT (`AceStepPipeline.__call__` steps 6-10), one step at a time.

A job's sampling state (`Sampling`: its latents, its own timestep schedule, its guidance momentum) advances one Euler
step per `DiTEngine.step` call, and one call runs a single forward pass over every state given to it, whatever
their step, length or prompt length. The diffusers DiT applies no padding masks, so `_forward` pads the batch and
runs diffusers' own forward with `KeyPaddingAttnProcessor` in every attention layer, which masks the padding out of
self- and cross-attention: a job's velocity then does not depend on what it was batched with (within float
tolerance). Jobs whose requests differ in what a forward pass shares (step schedule, shift, guidance, cover blend,
LoRA adapter and scale: `batch_key`) never share one; before each pass the engine activates the pass's adapter
(`models.lora.AdapterRegistry`), which it loads from `model.lora_dir` when a job that needs it starts.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from models.condition import ConditionResult
from models.loading import ModelConfig, load_components, load_vae_config, no_grad, pipeline_view
from models.lora import AdapterRegistry, lora_key

# torch and diffusers are imported where the engine uses them, not here: the request types and `batch_key` are also
# what the driver and a simulated DiT replica (deployments/simulate.py) import, and those libraries take seconds.
if TYPE_CHECKING:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

    from models.dit_attention import KeyPaddingAttnProcessor, PaddingMasks

logger = logging.getLogger(__name__)

PARTS = ["transformer", "scheduler"]


CALIBRATION_SECONDS = (1.0, 30.0)  # a DiT replica times passes of these lengths at start (`calibrate`)
CALIBRATION_PASSES = 4  # ... this many of each

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
    lora: str | None = None  # an adapter of `model.lora_dir`, by name
    lora_scale: float = 1.0  # its strength (peft's adapter weight); 0 runs as no adapter
    tag: str = field(default="", compare=False)  # the job id, for progress reports and logs


@dataclass(eq=False)
class Sampling:
    """One job in flight: its latents `xt` `(outputs, frames, channels)` and where it is in its own schedule."""

    request: DiTRequest
    key: tuple
    xt: torch.Tensor
    conditions: torch.Tensor  # (cond_tokens, hidden)
    context: torch.Tensor  # (frames, 2 * channels)
    null: torch.Tensor | None  # (cond_tokens, hidden): the unconditional sequence, when CFG runs
    non_cover: torch.Tensor | None  # (tokens, hidden): text2music conditions, blended in when cover strength < 1
    scheduler: FlowMatchEulerDiscreteScheduler
    momentum: MomentumBuffer | None
    step: int = 0
    result: np.ndarray | None = None  # the final latents, once a scheduler has collected them

    @property
    def total(self) -> int:
        return len(self.scheduler.timesteps)

    @property
    def done(self) -> bool:
        return self.step >= self.total

    @property
    def frames(self) -> int:
        return self.xt.shape[1]

    @property
    def rows(self) -> int:
        """Forward-pass rows this job adds to a batch: one per output (x2 with CFG, +1 per output to blend)."""
        per_output = 1 + (self.null is not None) + (self.non_cover is not None)
        return per_output * self.xt.shape[0]

    def cost(self) -> int:
        """Latent frames this job adds to a forward pass (the unit of `max_batch_frames`)."""
        return self.rows * self.frames

    def latents(self) -> np.ndarray:
        return self.xt.float().cpu().numpy()


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
        self._processor()  # before compiling: the compiled forward traces this processor
        self.adapters = AdapterRegistry(self.transformer, config.lora_dir, config.max_loaded_adapters)
        if config.compiled("dit"):
            self.transformer.compile()

    @property
    def is_turbo(self) -> bool:
        return self.pipe.is_turbo

    @property
    def latents_per_second(self) -> float:
        return self.pipe.latents_per_second

    def effective_guidance(self, guidance_scale: float) -> float:
        """Turbo checkpoints have guidance distilled in: the pipeline runs them at 1.0 whatever was asked."""
        return 1.0 if self.is_turbo else guidance_scale

    def batch_key(self, request: DiTRequest) -> tuple:
        """Requests with equal keys may share a forward pass; lengths may differ (the padding is masked)."""
        blend = request.audio_cover_strength < 1.0 and request.condition.non_cover_hidden_states is not None
        return (request.num_inference_steps, request.shift, self.effective_guidance(request.guidance_scale),
                request.cfg_interval_start, request.cfg_interval_end, request.audio_cover_strength if blend else 1.0,
                tuple(request.timesteps) if request.timesteps else None, lora_key(request.lora, request.lora_scale))

    def warm_up(self) -> None:
        """One step on one second of zeros: allocations (and compilation, if on) happen before traffic does."""
        self.generate([self._zeros(1.0, steps=1)])

    def calibrate(self) -> list[tuple[int, float]]:
        """`CALIBRATION_PASSES` forward passes on zeros of each of `CALIBRATION_SECONDS` (of audio), timed:
        `(rows x frames, seconds)` of each, so that the pass cost is known before the first job."""
        timed = []
        for seconds in CALIBRATION_SECONDS:
            state = self.start(self._zeros(seconds, steps=CALIBRATION_PASSES))
            for _ in range(CALIBRATION_PASSES):
                start = time.perf_counter()
                self.step([state])
                if self.device.type == "cuda":
                    import torch

                    torch.cuda.synchronize(self.device)
                timed.append((state.rows * state.frames, time.perf_counter() - start))
        return timed

    def _zeros(self, seconds: float, steps: int) -> DiTRequest:
        frames, cfg = math.ceil(seconds * self.pipe.latents_per_second), self.transformer.config
        width = cfg.encoder_hidden_size or cfg.hidden_size
        condition = ConditionResult(encoder_hidden_states=np.zeros((8, width), np.float32),
                                    context_latents=np.zeros((frames, 2 * cfg.audio_acoustic_hidden_dim), np.float32),
                                    null_embedding=np.zeros((width,), np.float32))
        return DiTRequest(condition=condition, seeds=[0], num_inference_steps=steps, tag="warm-up")

    @no_grad
    def start(self, request: DiTRequest) -> Sampling:
        """A job's initial state: seeded noise (one generator per output) and its own scheduler. Its LoRA adapter is
        loaded now, so that a missing or bad one fails this job alone (`models.lora.AdapterError`)."""
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer
        from diffusers.utils.torch_utils import randn_tensor

        device, dtype, c = self.device, self.transformer.dtype, request.condition
        if request.lora is not None:
            self._adapters().check(request.lora)
            if lora_key(request.lora, request.lora_scale) is not None:
                self._adapters().load(request.lora)

        def tensor(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array).to(device=device, dtype=dtype)

        conditions, context = tensor(c.encoder_hidden_states), tensor(c.context_latents)
        # 1. Prepare latents: one generator per output, so each output's noise depends on its seed only.
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in request.seeds]
        shape = (len(request.seeds), context.shape[0], self.transformer.config.audio_acoustic_hidden_dim)
        xt = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
        do_cfg = self.effective_guidance(request.guidance_scale) > 1.0 and not self.is_turbo
        blend = request.audio_cover_strength < 1.0 and c.non_cover_hidden_states is not None
        # 2. Timesteps: the shifted ACE-Step schedule, fed verbatim to an unshifted Euler scheduler of its own.
        schedule = self.pipe._get_timestep_schedule(num_inference_steps=request.num_inference_steps,
                                                    shift=request.shift, device=device, dtype=torch.float32,
                                                    timesteps=request.timesteps)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.components["scheduler"].config)
        scheduler.set_timesteps(sigmas=schedule.tolist(), device=device)
        return Sampling(request=request, key=self.batch_key(request), xt=xt, conditions=conditions, context=context,
                        null=tensor(c.null_embedding)[None].expand_as(conditions) if do_cfg else None,
                        non_cover=tensor(c.non_cover_hidden_states) if blend else None, scheduler=scheduler,
                        momentum=MomentumBuffer(momentum=-0.75) if do_cfg else None)

    @no_grad
    def step(self, states: list[Sampling]) -> None:
        """Advance every state by one Euler step with one forward pass. All states must share a `batch_key`."""
        from diffusers.guiders.adaptive_projected_guidance import normalized_guidance

        assert len({s.key for s in states}) == 1, "states with different batch keys cannot share a forward pass"
        request = states[0].request
        guidance = self.effective_guidance(request.guidance_scale)
        # 3. Denoise, one step. Rows: per state, its outputs against its conditions, then (CFG) against the null
        # sequence, then (cover blend) against the text2music conditions. Each entry: (x, t, conditions, context, n).
        rows, plan = [], []
        for s in states:
            t = s.scheduler.timesteps[s.step]
            n = s.xt.shape[0]
            apply_cfg = s.null is not None and request.cfg_interval_start <= 1.0 - float(t) <= request.cfg_interval_end
            sequences = [s.conditions] + ([s.null] if apply_cfg else []) + ([s.non_cover] if s.non_cover is not None
                                                                              else [])
            plan.append((len(rows), apply_cfg))
            rows.extend((s.xt, float(t), seq, s.context, n) for seq in sequences)
        self._adapters().activate(lora_key(request.lora, request.lora_scale))  # reloaded if evicted since start
        out = self._forward(rows)
        for s, (first, apply_cfg) in zip(states, plan):
            t, frames = s.scheduler.timesteps[s.step], s.frames
            velocity = out[first][:, :frames]
            if apply_cfg:
                velocity = normalized_guidance(pred_cond=velocity, pred_uncond=out[first + 1][:, :frames],
                                               guidance_scale=guidance - 1.0, momentum_buffer=s.momentum, eta=0.0,
                                               norm_threshold=2.5, use_original_formulation=True, norm_dim=(1,))
            if s.non_cover is not None:
                strength = request.audio_cover_strength
                velocity = strength * velocity + (1.0 - strength) * out[first + 1 + apply_cfg][:, :frames]
            s.xt = s.scheduler.step(velocity, t, s.xt, return_dict=False)[0]
            s.step += 1

    def _forward(self, rows: list[tuple]) -> list[torch.Tensor]:
        """One DiT pass over row groups `(x (n, T, C), t, conditions (S, H), context (T, 2C), n)`; velocity per group.

        Always diffusers' own forward (so `torch.compile`, LoRA scales and attention backends apply to every batch).
        Rows of different lengths are right-padded with zeros and the padding is masked as keys (`PaddingMasks`):
        latent padding in self-attention (within the sliding band on sliding layers), condition padding in
        cross-attention. Padded query positions compute garbage that is cut off; nothing reads them.
        """
        import torch
        import torch.nn.functional as F

        device, dtype = self.device, self.transformer.dtype
        frames = [r[0].shape[1] for r in rows]
        tokens = [r[2].shape[0] for r in rows]
        counts = [r[4] for r in rows]
        length, width = max(frames), max(tokens)

        def padded(tensor: torch.Tensor, size: int, n: int) -> torch.Tensor:
            tensor = tensor if tensor.dim() == 3 else tensor[None].expand(n, *tensor.shape)
            return F.pad(tensor, (0, 0, 0, size - tensor.shape[1]))

        x = torch.cat([padded(r[0], length, n) for r, n in zip(rows, counts)])
        enc = torch.cat([padded(r[2], width, n) for r, n in zip(rows, counts)])
        ctx = torch.cat([padded(r[3], length, n) for r, n in zip(rows, counts)])
        t = torch.cat([torch.full((n,), r[1], device=device, dtype=dtype) for r, n in zip(rows, counts)])
        per_row = lambda values: [v for v, n in zip(values, counts) for _ in range(n)]  # noqa: E731
        masks = self._padding_masks(per_row(frames), per_row(tokens))
        with self._masked(masks):
            out = self.transformer(hidden_states=x, timestep=t, timestep_r=t, encoder_hidden_states=enc,
                                   context_latents=ctx, return_dict=False)[0]
        return list(out.split(counts))

    def _processor(self) -> KeyPaddingAttnProcessor:
        """The transformer's shared `KeyPaddingAttnProcessor`, installed in every attention layer if it is not there
        (a new engine, or a transformer swapped in; a deep copy keeps one shared instance)."""
        from models.dit_attention import KeyPaddingAttnProcessor

        processor = self.transformer.layers[0].self_attn.processor
        if not isinstance(processor, KeyPaddingAttnProcessor):
            processor = KeyPaddingAttnProcessor()
            self.transformer.set_attn_processor(processor)
        return processor

    def _adapters(self) -> AdapterRegistry:
        """The LoRA adapters of the transformer in use (a fresh registry for a transformer swapped in)."""
        if self.adapters.transformer is not self.transformer:
            self.adapters = AdapterRegistry(self.transformer, self.config.lora_dir, self.config.max_loaded_adapters)
        return self.adapters

    @contextmanager
    def _masked(self, masks: PaddingMasks | None) -> Iterator[None]:
        processor = self._processor()
        processor.masks = masks
        try:
            yield
        finally:
            processor.masks = None

    def _padding_masks(self, frames: list[int], tokens: list[int]) -> PaddingMasks | None:
        """Masks for rows of `frames` latent frames and `tokens` condition tokens, padded to the longest; None when
        every row has the same lengths (diffusers' forward exactly as upstream runs it)."""
        import torch
        from diffusers.models.transformers.ace_step_transformer import _create_4d_mask, _is_flash_attention_backend

        from models.dit_attention import PaddingMasks

        frames_differ, tokens_differ = len(set(frames)) > 1, len(set(tokens)) > 1
        if not (frames_differ or tokens_differ):
            return None
        model, device, dtype = self.transformer, self.device, self.transformer.dtype
        keys = sliding = cross = None

        def additive(keep: torch.Tensor) -> torch.Tensor:
            return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, torch.finfo(dtype).min)

        if frames_differ:
            patch = model.patch_size
            length = -(-max(frames) // patch)
            # A patch is real when its first frame is (the model pads a job's own odd frame with zeros, as here).
            valid = torch.arange(length, device=device)[None] * patch < torch.tensor(frames, device=device)[:, None]
            keys = additive(valid[:, None, None, :])
            window = model.config.sliding_window
            if window is None or length - 1 <= window or _is_flash_attention_backend(self._processor()):
                sliding = keys  # the band spans every pair, or flash applies it itself (window_size)
            else:
                # diffusers' band AND the row's keys: a per-row (L, L) mask, built once for every sliding layer. Each
                # query keeps at least its own key, so no row is fully masked (in float16 masked scores can overflow
                # to -inf: a NaN row of padding would reach real rows through 0 * NaN in the next layer).
                sliding = _create_4d_mask(seq_len=length, dtype=dtype, device=device, attention_mask=valid,
                                          sliding_window=window, is_sliding_window=True, is_causal=False)
                sliding.diagonal(dim1=-2, dim2=-1).zero_()
        if tokens_differ:
            valid = torch.arange(max(tokens), device=device)[None] < torch.tensor(tokens, device=device)[:, None]
            cross = additive(valid[:, None, None, :])
        return PaddingMasks(keys=keys, sliding=sliding, cross=cross)

    def generate(self, requests: list[DiTRequest], on_step: StepCallback | None = None) -> list[np.ndarray | None]:
        """Whole-request batching: latents `(len(seeds), frames, latent_channels)` per request, in order.

        `on_step` is called after every step with the tags still in the batch; the tags it returns (canceled jobs)
        leave the batch at once and get None.
        """
        states = [self.start(r) for r in requests]
        groups: dict[tuple, list[Sampling]] = defaultdict(list)
        for s in states:
            groups[s.key].append(s)
        dropped: set[int] = set()
        for alive in groups.values():
            start, jobs = time.perf_counter(), len(alive)
            while alive:
                step_start = time.perf_counter()
                self.step(alive)
                if on_step:
                    stopped = set(on_step([s.request.tag for s in alive], alive[0].step, alive[0].total,
                                          time.perf_counter() - step_start) or ())
                    dropped.update(id(s) for s in alive if s.request.tag in stopped)
                alive = [s for s in alive if not s.done and id(s) not in dropped]
            logger.info("dit batch of %d jobs in %.2f s", jobs, time.perf_counter() - start)
        return [None if id(s) in dropped else s.latents() for s in states]
