"""One-shot GPU check of the split engines: speed, memory and numerics of the full-size models on one card.

    python -m benchmarks.gpu_check [--preset turbo] [--dtype bfloat16] [--seconds 180] [--out DIR] [--device cuda]

In process, then (--http) the app over HTTP. On the released 2B DiT shape (`turbo`, random weights) in bf16 it
measures:

  env        the card, torch / CUDA / cuDNN / diffusers / transformers versions, the TF32 / bf16-reduction flags
  build      building the three engines (the preset is built once, on the device: see `install_fast_builder`)
  condition  `ConditionEngine.encode` time for one job and for a batch of 8
  dit        one `DiTEngine.step` (synchronised, median of --iters after --warmup) at 1, 4 and 8 jobs of --seconds
             each: same-shape jobs (no masks) and jobs whose prompts differ in length (cross-attention key-padding
             masks, as real traffic runs); per-job speed-up against batch 1
  vae        `AudioCodecEngine.decode` of one --seconds output (float32 VAE, the engine's default) and its peak memory
  invariance a job's latents after a few steps alone vs in a batch of 4 of other lengths, in bf16 and in fp32
  precision  bf16 against fp32 (the same weights upcast, the same inputs) for one DiT forward, on this preset and on
             `tiny` (what tests/models/test_gpu.py runs), and for a few whole sampling steps: the tolerance the
             bf16 tests need
  compile    `torch.compile` of the DiT (what `stages.dit.compile` does) at batch 1, in a subprocess that is killed
             past --compile-budget-s (a compile that does not finish is reported, not waited for)
  http       (--http; on by default with cuda) the real app as `acestep-bench` starts it (Ray + Serve,
             `build_graph`, one replica per stage, step-level batching) with `model: {preset, dtype, device}` from
             the options above: one --seconds song alone end to end over HTTP, then --http-jobs jobs of mixed lengths
             at --http-concurrency (`deployments.bench.drive`), and the peak GPU memory of all processes
             (nvidia-smi). In a subprocess stopped past --http-budget-s (within --total-budget-s of the start).
             With --http-lm PRESET the app also has a LanguageModel stage, and the song and the load run again
             with `thinking` on: the LM writes each job's metadata, caption and codes before its DiT.

plus `torch.cuda.max_memory_allocated` per phase and overall. Every phase records its error and the next one runs.
Prints readable lines, then one `GPU_JSON {...}` line; with --out, writes the same JSON to DIR/gpu_check.json after
every phase (a run killed part-way still leaves what it measured). A CPU dry run of the whole script:

    python -m benchmarks.gpu_check --preset tiny --dtype float32 --seconds 4 --device cpu [--http]

`acestep-bench --gpu-check [options]` runs the same (installed: `benchmarks` is a package of the project). With the
defaults it is bounded to about 8 minutes on one GPU: in-process phases start only within --budget-s (280 s; they
took 74 s in all on an H200), and the HTTP phase is over --total-budget-s (450 s) after the start at the latest.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LATENTS_PER_SECOND = 25  # 48 kHz / 1920-sample hop (every preset keeps it)
LM_CAPTION_TOKENS = 128  # --http-lm: a random-weight LM writes captions up to the limit; a real one writes fewer
CAPTIONS = ["lofi hip hop, mellow piano, vinyl crackle",
            "upbeat synth pop with a driving bassline and bright female vocals",
            "acoustic guitar ballad, warm and intimate male vocals, slow tempo",
            "cinematic orchestral score with strings, brass and timpani building to a climax",
            "drum and bass", "jazz trio, upright bass, brushed drums, smoky late-night club atmosphere",
            "heavy metal, distorted guitars, double kick drums, aggressive vocals",
            "ambient drone, evolving pads"]
VERSE = "[verse]\nwalking down the empty street, the city lights are fading slow\n" \
        "[chorus]\nhold on, hold on, we are never letting go\n"


def _round(value: Any, digits: int = 6) -> Any:
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {k: _round(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_round(v, digits) for v in value]
    return value


def _gib(n: float) -> float:
    return n / 2**30


def _lyrics(index: int) -> str:
    # ~400-500 bytes: the byte-level tokenizer of the presets makes one token per byte, about as many tokens as the
    # real Qwen3 BPE makes of a full song's lyrics (~4 bytes per token), so the condition length is realistic.
    return (VERSE * 6)[: 380 + 20 * index]


def compare(a, b) -> dict[str, float]:
    """`a` against the reference `b`: max abs difference, relative error ||a - b|| / ||b||, and max |b|."""
    import torch

    a = (a.detach().double().cpu() if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a, np.float64)))
    b = (b.detach().double().cpu() if isinstance(b, torch.Tensor) else torch.from_numpy(np.asarray(b, np.float64)))
    diff = a - b
    return {"max_abs": float(diff.abs().max()), "rel": float(diff.norm() / b.norm().clamp(min=1e-30)),
            "ref_max_abs": float(b.abs().max()), "finite": bool(torch.isfinite(a).all())}


class Check:
    """Phases, their results, errors, timings and memory, and the JSON written after each."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.args, self.torch = args, torch
        self.cuda = args.device.startswith("cuda")
        self.start = time.perf_counter()
        self.deadline = self.start + args.budget_s
        self.overall_peak = 0
        self.phase_peak = 0
        self.result: dict[str, Any] = {"args": vars(args), "phases": {}, "errors": {}, "skipped": {}, "memory": {},
                                       "phase_seconds": {}}
        self.ctx: dict[str, Any] = {}

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        """Start a new peak-memory window (the phase's and the overall peaks keep what it saw so far)."""
        if self.cuda:
            self.sync()
            current = self.torch.cuda.max_memory_allocated()
            self.overall_peak = max(self.overall_peak, current)
            self.phase_peak = max(self.phase_peak, current)
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> float | None:
        """GiB: peak allocated since the last `reset_peak`."""
        if not self.cuda:
            return None
        self.sync()
        return _gib(self.torch.cuda.max_memory_allocated())

    def allocated(self) -> float | None:
        return _gib(self.torch.cuda.memory_allocated()) if self.cuda else None

    def timed(self, fn: Callable[[], Any], warmup: int | None = None, iters: int | None = None) -> dict[str, float]:
        """Median / min / max milliseconds of `fn`, synchronised, after warm-up calls."""
        warmup = self.args.warmup if warmup is None else warmup
        iters = self.args.iters if iters is None else iters
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(iters):
            self.sync()
            begin = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - begin) * 1e3)
        return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "n": iters}

    def phase(self, name: str, fn: Callable[[], dict], min_seconds: float = 0.0) -> None:
        if self.remaining() < min_seconds:
            reason = f"{self.remaining():.0f} s of the {self.args.budget_s:.0f} s budget left, needs ~{min_seconds:.0f}"
            self.result["skipped"][name] = reason
            print(f"[gpu_check] {name}: SKIPPED ({reason})", flush=True)
            self.write()
            return
        print(f"[gpu_check] {name} ... (t={time.perf_counter() - self.start:.1f} s)", flush=True)
        self.reset_peak()
        self.phase_peak = 0
        before, begin = self.allocated(), time.perf_counter()
        try:
            self.result["phases"][name] = fn()
        except Exception as exc:  # noqa: BLE001 - one phase must not take the others down
            self.result["errors"][name] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"[gpu_check] {name}: ERROR {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(limit=8)
        finally:
            seconds = time.perf_counter() - begin
            self.result["phase_seconds"][name] = seconds
            try:  # a broken CUDA context must not end the script here either
                if self.cuda:
                    self.reset_peak()
                    self.result["memory"][name] = {"allocated_before_gib": before,
                                                   "peak_allocated_gib": _gib(self.phase_peak),
                                                   "allocated_after_gib": self.allocated()}
                    if name in self.result["errors"]:
                        self.torch.cuda.empty_cache()
            except Exception as exc:  # noqa: BLE001
                self.result["errors"][f"{name}_memory"] = f"{type(exc).__name__}: {exc}"[:500]
            print(f"[gpu_check] {name}: {seconds:.1f} s"
                  + (f", peak {_gib(self.phase_peak):.2f} GiB allocated" if self.cuda else ""), flush=True)
            self.write()

    def finish(self) -> dict:
        try:
            if self.cuda:
                self.reset_peak()
                self.result["memory"]["overall_peak_allocated_gib"] = _gib(self.overall_peak)
                self.result["memory"]["max_reserved_gib"] = _gib(self.torch.cuda.max_memory_reserved())
        except Exception as exc:  # noqa: BLE001
            self.result["errors"]["memory"] = f"{type(exc).__name__}: {exc}"[:500]
        self.result["total_seconds"] = time.perf_counter() - self.start
        self.write()
        return self.result

    def write(self) -> None:
        if self.args.out:
            out = Path(self.args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "gpu_check.json").write_text(json.dumps(_round(self.result), indent=1, default=str))


# -- building ----------------------------------------------------------------------------------------------------------
def install_fast_builder(preset: str, device: str, dtype) -> Callable:
    """Make `models.loading.build_preset(preset)` build the preset once, on `device`, and hand the same modules to
    every engine.

    `build_preset` random-inits in float32 on the CPU; each engine builds the whole set again and keeps its parts.
    For the full-size presets (~3 B parameters) that is three slow CPU inits (~10-20 s per billion parameters on one
    core) plus the copies. Here `build_preset` itself runs once under `torch.device(device)`: the same modules and
    the same float32 init (random values differ from a CPU build: another generator), computed on the device; then
    every module but the VAE is cast to `dtype` (the VAE stays float32, the codec stage's default), so that
    `load_components`' own `.to(device, dtype)` is a no-op. Other presets (e.g. `tiny`) build as before.
    """
    import torch

    from models import loading, presets

    original, cache = presets.build_preset, {}

    def build(name: str, seed: int = 0) -> dict[str, Any]:
        if name != preset:
            return original(name, seed=seed)
        if (name, seed) not in cache:
            begin = time.perf_counter()
            with torch.device(device):
                components = original(name, seed=seed)
            for part, module in components.items():
                if isinstance(module, torch.nn.Module):
                    module.to(dtype=torch.float32 if part == "vae" else dtype)
            cache[(name, seed)] = components
            print(f"[gpu_check]   built preset {name} on {device} in {time.perf_counter() - begin:.1f} s", flush=True)
        return cache[(name, seed)]

    loading.build_preset = build
    return original


def _count(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


# -- phases ------------------------------------------------------------------------------------------------------------
def phase_env(check: Check) -> dict:
    import diffusers
    import torch
    import transformers

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                            "numpy": np.__version__, "device": check.args.device, "cpu_count": os.cpu_count(),
                            "cuda_available": torch.cuda.is_available(),
                            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                            "matmul_allow_bf16_reduced_precision_reduction":
                                torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction}
    try:
        import pydantic

        info["pydantic"] = pydantic.__version__
    except ImportError:
        pass
    if check.cuda:
        index = torch.device(check.args.device).index or 0
        props = torch.cuda.get_device_properties(index)
        info.update(card=torch.cuda.get_device_name(index), capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count, total_memory_gib=_gib(props.total_memory))
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=10, check=False).stdout.strip()
        except Exception as exc:  # noqa: BLE001
            info["driver"] = f"nvidia-smi failed: {exc}"
    for key, value in info.items():
        print(f"  {key:<48}{value}")
    return info


def phase_build(check: Check) -> dict:
    import torch

    from models import loading
    from models.codec import AudioCodecEngine
    from models.condition import ConditionEngine
    from models.dit import DiTEngine
    from models.loading import ModelConfig

    args = check.args
    dtype = getattr(torch, args.dtype)
    out: dict[str, Any] = {"fast_builder": not args.no_fast_build}
    config = ModelConfig(preset=args.preset, dtype=args.dtype, device=args.device)
    check.ctx["config"] = config

    def build_engines() -> None:
        for key, cls in (("condition", ConditionEngine), ("dit", DiTEngine), ("codec", AudioCodecEngine)):
            begin = time.perf_counter()
            check.ctx[key] = cls(config)
            check.sync()
            out[f"{key}_seconds"] = time.perf_counter() - begin
            out[f"{key}_allocated_gib"] = check.allocated()

    if args.no_fast_build:
        build_engines()
    else:
        original = check.ctx["original_build_preset"] = install_fast_builder(args.preset, args.device, dtype)
        try:
            build_engines()
        except Exception as exc:  # noqa: BLE001 - fall back to the engines' own (slow, CPU) build
            out.update(fast_builder=False, fast_builder_error=f"{type(exc).__name__}: {exc}"[:1000])
            print(f"  fast build failed ({type(exc).__name__}: {exc}); building as the engines do", flush=True)
            traceback.print_exc(limit=6)
            loading.build_preset = original
            for key in ("condition", "dit", "codec"):
                check.ctx.pop(key, None)
            if check.cuda:
                torch.cuda.empty_cache()
            build_engines()
    dit, condition, codec = check.ctx["dit"], check.ctx["condition"], check.ctx["codec"]
    out["params_m"] = {"transformer": _count(dit.transformer),
                       "text_encoder": _count(condition.components["text_encoder"]),
                       "condition_encoder": _count(condition.components["condition_encoder"]),
                       "vae": _count(codec.vae)}
    out["dtypes"] = {"transformer": str(dit.transformer.dtype), "condition_encoder": str(condition.dtype),
                     "vae": str(codec.vae.dtype)}
    out["devices"] = {"transformer": str(next(dit.transformer.parameters()).device),
                      "vae": str(next(codec.vae.parameters()).device)}
    print(f"  engines built: condition {out['condition_seconds']:.1f} s, dit {out['dit_seconds']:.1f} s, codec "
          f"{out['codec_seconds']:.1f} s; params (M) {_round(out['params_m'], 5)}; dtypes {out['dtypes']}")
    return out


def _requests(seconds: float, count: int):
    from models.condition import ConditionRequest

    return [ConditionRequest(caption=CAPTIONS[i % len(CAPTIONS)], lyrics=_lyrics(i), audio_duration=seconds,
                             bpm=90 + 5 * i, keyscale="A minor", timesignature="4", tag=f"job{i}")
            for i in range(count)]


def phase_condition(check: Check) -> dict:
    engine, seconds = check.ctx["condition"], check.args.seconds
    requests = _requests(seconds, 8)
    out = {"one": check.timed(lambda: engine.encode(requests[:1]), warmup=1, iters=3),
           "batch8": check.timed(lambda: engine.encode(requests), warmup=1, iters=3)}
    conds = engine.encode(requests)
    check.ctx["conds"] = conds
    out["cond_tokens"] = [c.encoder_hidden_states.shape[0] for c in conds]
    out["latent_frames"] = conds[0].latent_length
    out["batch8_per_job_speedup"] = 8 * out["one"]["median_ms"] / out["batch8"]["median_ms"]
    print(f"  encode 1 job: {out['one']['median_ms']:.1f} ms; 8 jobs: {out['batch8']['median_ms']:.1f} ms "
          f"(per-job speed-up x{out['batch8_per_job_speedup']:.2f}); condition tokens {out['cond_tokens']}, "
          f"{out['latent_frames']} latent frames")
    return out


def _synthetic_condition(dit, frames: int, tokens: int, seed: int):
    """A `ConditionResult` of the right shapes (used when the condition phase failed, and for `tiny`)."""
    from models.condition import ConditionResult

    cfg, rng = dit.transformer.config, np.random.default_rng(seed)
    width, acoustic = cfg.encoder_hidden_size or cfg.hidden_size, cfg.audio_acoustic_hidden_dim
    context = np.concatenate([rng.standard_normal((frames, acoustic)), np.ones((frames, acoustic))], axis=-1)
    return ConditionResult(encoder_hidden_states=rng.standard_normal((tokens, width)).astype(np.float32),
                           context_latents=context.astype(np.float32),
                           null_embedding=rng.standard_normal(width).astype(np.float32))


def _conditions(check: Check, count: int) -> list:
    conds = check.ctx.get("conds")
    if conds:
        return conds
    frames = math.ceil(check.args.seconds * LATENTS_PER_SECOND)
    print("  (no encoded conditions: synthetic ones of the same shapes)")
    return [_synthetic_condition(check.ctx["dit"], frames, 600 + 20 * i, i) for i in range(count)]


def phase_dit(check: Check) -> dict:
    import torch

    from models.dit import DiTRequest

    dit, conds = check.ctx["dit"], _conditions(check, 8)
    tokens = (conds[0].latent_length + 1) // 2  # patches of 2 frames
    params = sum(p.numel() for p in dit.transformer.parameters())
    out: dict[str, Any] = {"latent_frames": conds[0].latent_length, "dit_tokens": tokens,
                           "cond_tokens": [c.encoder_hidden_states.shape[0] for c in conds]}

    def measure(label: str, chosen: list) -> None:
        try:
            check.reset_peak()
            states = [dit.start(DiTRequest(condition=c, seeds=[i], num_inference_steps=64)) for i, c in
                      enumerate(chosen)]
            timing = check.timed(lambda: dit.step(states))
            timing["peak_allocated_gib"] = check.peak()
            # ~2 x parameters x tokens: the linear layers (attention scores and the cross-attention K/V not counted)
            timing["approx_tflops_2PN"] = 2 * params * tokens * len(chosen) / (timing["median_ms"] / 1e3) / 1e12
            out[label] = timing
            print(f"  {label:<14} {timing['median_ms']:8.1f} ms/step (min {timing['min_ms']:.1f}), "
                  f"{timing['median_ms'] / len(chosen):7.1f} ms/job, ~{timing['approx_tflops_2PN']:.0f} TFLOP/s"
                  + (f", peak {timing['peak_allocated_gib']:.2f} GiB" if check.cuda else ""), flush=True)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory at batch 8: keep the smaller batches
            out[label] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
            print(f"  {label}: ERROR {type(exc).__name__}: {exc}", flush=True)
            if check.cuda:
                torch.cuda.empty_cache()

    for batch in (1, 4, 8):
        measure(f"same_b{batch}", [conds[0]] * batch)  # one prompt length: diffusers' own forward
    for batch in (4, 8):
        measure(f"mixed_b{batch}", conds[:batch])  # prompt lengths differ: cross-attention padding masks
    one = out.get("same_b1", {}).get("median_ms")
    if one:
        for label in ("same_b4", "same_b8", "mixed_b4", "mixed_b8"):
            if "median_ms" in out.get(label, {}):
                batch = int(label[-1])
                out[label]["per_job_speedup_vs_b1"] = batch * one / out[label]["median_ms"]
        print("  per-job speed-up vs batch 1: " + ", ".join(
            f"{k} x{v['per_job_speedup_vs_b1']:.2f}" for k, v in out.items()
            if isinstance(v, dict) and "per_job_speedup_vs_b1" in v))
    return out


def phase_vae(check: Check) -> dict:
    codec, seconds = check.ctx["codec"], check.args.seconds
    rng = np.random.default_rng(0)
    frames = math.ceil(seconds * LATENTS_PER_SECOND)
    latents = [rng.standard_normal((1, frames, 64)).astype(np.float32)]
    warm = [rng.standard_normal((1, min(frames, 750), 64)).astype(np.float32)]  # tiled too when frames > 512
    codec.decode(warm)
    check.sync()
    check.reset_peak()
    before, kept = check.allocated(), {}
    timing = check.timed(lambda: kept.__setitem__("audio", codec.decode(latents)), warmup=0, iters=2)
    [audio] = kept["audio"]
    out = {"frames": frames, "audio_shape": list(audio.shape), "vae_dtype": str(codec.vae.dtype),
           "tiling": getattr(codec, "tiling", None), "decode": timing,
           "realtime_factor": seconds / (timing["median_ms"] / 1e3), "audio_peak": float(np.abs(audio).max()),
           "audio_finite": bool(np.isfinite(audio).all())}
    if check.cuda:
        out["peak_allocated_gib"] = check.peak()
        out["peak_over_weights_gib"] = check.peak() - before
    print(f"  decode {seconds:g} s ({frames} frames) -> {tuple(audio.shape)}: {timing['median_ms']:.0f} ms "
          f"(x{out['realtime_factor']:.0f} real time)"
          + (f", peak {out['peak_allocated_gib']:.2f} GiB ({out['peak_over_weights_gib']:.2f} over weights)"
             if check.cuda else ""))
    return out


def _invariance(dit, requests) -> dict:
    """Job 0 alone (`generate`) against job 0 in one batch with the others, every step of the way."""
    [alone] = dit.generate(requests[:1])
    states = [dit.start(r) for r in requests]
    job, alive = states[0], states
    while alive:
        dit.step(alive)
        alive = [s for s in alive if not s.done]
    return compare(job.latents(), alone)


def phase_invariance(check: Check) -> dict:
    import torch

    from models.dit import DiTRequest

    dit, condition, args = check.ctx["dit"], check.ctx.get("condition"), check.args
    base = min(30.0, args.seconds)
    durations = [base, base * 0.7213, base * 1.5, base * 2]  # one odd frame count among them
    try:
        requests = _requests(base, 4)
        for request, duration in zip(requests, durations):
            request.audio_duration = duration
        conds = condition.encode(requests)
    except Exception as exc:  # noqa: BLE001
        print(f"  (condition engine failed: {exc}; synthetic conditions)")
        conds = [_synthetic_condition(dit, math.ceil(d * LATENTS_PER_SECOND), 500 + 37 * i, i)
                 for i, d in enumerate(durations)]
    requests = [DiTRequest(condition=c, seeds=[7 + i], num_inference_steps=args.inv_steps, tag=f"inv{i}")
                for i, c in enumerate(conds)]
    out: dict[str, Any] = {"frames": [c.latent_length for c in conds],
                           "cond_tokens": [c.encoder_hidden_states.shape[0] for c in conds],
                           "steps": args.inv_steps, "dtype": str(dit.transformer.dtype)}
    out["low_precision"] = _invariance(dit, requests)
    print(f"  {args.dtype}: job 0 alone vs in a batch of 4: max abs {out['low_precision']['max_abs']:.3g}, "
          f"rel {out['low_precision']['rel']:.3g} (|ref| max {out['low_precision']['ref_max_abs']:.3g})")
    if dit.transformer.dtype != torch.float32:
        low = dit.transformer
        try:
            dit.transformer = copy.deepcopy(low).to(torch.float32)
            check.ctx["fp32_transformer"] = dit.transformer
            out["float32"] = _invariance(dit, requests)
            print(f"  float32: max abs {out['float32']['max_abs']:.3g}, rel {out['float32']['rel']:.3g}")
        finally:
            dit.transformer = low
    return out


def _velocity(model, x, t, enc, ctx):
    return model(hidden_states=x, timestep=t, timestep_r=t, encoder_hidden_states=enc, context_latents=ctx,
                 return_dict=False)[0].float()


def _forward_precision(low, high, frames: int, tokens: int, device, seed: int = 0) -> dict:
    """One forward of `low` (bf16) against `high` (float32, same weights) on the same float32 inputs."""
    import torch

    cfg = high.config
    width, acoustic = cfg.encoder_hidden_size or cfg.hidden_size, cfg.audio_acoustic_hidden_dim
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, frames, acoustic, generator=g).to(device)
    enc = torch.randn(1, tokens, width, generator=g).to(device)
    ctx = torch.cat([torch.randn(1, frames, acoustic, generator=g), torch.ones(1, frames, acoustic)], -1).to(device)
    out = {}
    with torch.no_grad():
        for t_value in (1.0, 0.5):
            t = torch.full((1,), t_value, device=device)
            reference = _velocity(high, x, t, enc, ctx)
            approx = _velocity(low, x.to(low.dtype), t.to(low.dtype), enc.to(low.dtype), ctx.to(low.dtype))
            out[f"t{t_value:g}"] = compare(approx, reference)
    return out


def _sampling_precision(dit, high, condition, steps: int) -> dict:
    """`steps` whole Euler steps through `DiTEngine.step` with `dit`'s model and with `high`, from the same noise."""
    import torch

    from models.dit import DiTRequest

    request = DiTRequest(condition=condition, seeds=[3], num_inference_steps=steps)
    low = dit.transformer
    state_low = dit.start(request)
    noise = torch.randn(state_low.xt.shape, generator=torch.Generator().manual_seed(3)).to(state_low.xt.device)
    state_low.xt = noise.to(low.dtype)
    while not state_low.done:
        dit.step([state_low])
    try:
        dit.transformer = high
        state_high = dit.start(request)
        state_high.xt = noise.to(high.dtype)
        while not state_high.done:
            dit.step([state_high])
    finally:
        dit.transformer = low
    return compare(state_low.latents(), state_high.latents())


def phase_precision(check: Check) -> dict:
    import torch

    from models.dit import DiTEngine
    from models.loading import ModelConfig

    args, dit = check.args, check.ctx["dit"]
    dtype = getattr(torch, args.dtype)
    out: dict[str, Any] = {"dtype": args.dtype}
    # `tiny` as tests/models/test_gpu.py builds it: float32 weights (CPU init), cast to the low precision. Built with
    # the plain `build_preset`: with --preset tiny the fast builder would hand over the checked engine's own modules.
    from models import loading

    fast = loading.build_preset
    loading.build_preset = check.ctx.get("original_build_preset", fast)
    try:
        tiny = DiTEngine(ModelConfig(preset="tiny", dtype="float32", device=args.device))
    finally:
        loading.build_preset = fast
    tiny_high = tiny.transformer
    tiny_low = copy.deepcopy(tiny_high).to(dtype)
    out["tiny_forward"] = _forward_precision(tiny_low, tiny_high, frames=51, tokens=40, device=tiny.device)
    tiny.transformer = tiny_low
    out["tiny_sampling_8_steps"] = _sampling_precision(
        tiny, tiny_high, _synthetic_condition(tiny, 51, 40, seed=1), steps=8)
    print(f"  tiny: one forward rel {max(v['rel'] for v in out['tiny_forward'].values()):.3g}; 8 steps "
          f"rel {out['tiny_sampling_8_steps']['rel']:.3g} (max abs {out['tiny_sampling_8_steps']['max_abs']:.3g})")
    del tiny, tiny_low, tiny_high
    if dit.transformer.dtype != torch.float32:
        high = check.ctx.pop("fp32_transformer", None)
        if high is None:
            high = copy.deepcopy(dit.transformer).to(torch.float32)
        frames = math.ceil(min(30.0, args.seconds) * LATENTS_PER_SECOND)
        out["preset_forward"] = _forward_precision(dit.transformer, high, frames=frames, tokens=600,
                                                   device=dit.device)
        conds = check.ctx.get("conds")
        condition = _synthetic_condition(dit, frames, 600, seed=2) if not conds else None
        if condition is None:  # the first job's conditions, cut to `frames`
            from models.condition import ConditionResult

            c = conds[0]
            condition = ConditionResult(encoder_hidden_states=c.encoder_hidden_states,
                                        context_latents=c.context_latents[:frames], null_embedding=c.null_embedding)
        out["preset_sampling_8_steps"] = _sampling_precision(dit, high, condition, steps=8)
        print(f"  {args.preset} ({frames} frames): one forward rel "
              f"{max(v['rel'] for v in out['preset_forward'].values()):.3g}; 8 steps rel "
              f"{out['preset_sampling_8_steps']['rel']:.3g}")
        del high
    worst = max([v["rel"] for v in out["tiny_forward"].values()] + [out["tiny_sampling_8_steps"]["rel"]])
    # Two low-precision runs of the same function (engines vs pipeline, batched vs alone, compiled vs eager) each
    # sit ~`worst` from float32, so ~sqrt(2) x worst apart if independent: 3 x worst leaves a margin.
    out["suggested_test_rel_tolerance"] = max(3 * worst, 1e-5)
    print(f"  suggested bf16 test tolerance (relative, norm-wise): {out['suggested_test_rel_tolerance']:.3g}")
    if check.cuda:
        torch.cuda.empty_cache()
    return out


def phase_compile(check: Check) -> dict:
    import torch

    args = check.args
    check.ctx.pop("fp32_transformer", None)  # room for the worker's own model
    if check.cuda:
        torch.cuda.empty_cache()
    budget = min(args.compile_budget_s, check.remaining() - 5)
    conds = check.ctx.get("conds")
    tokens = conds[0].encoder_hidden_states.shape[0] if conds else 600
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--compile-worker", "--preset", args.preset,
               "--dtype", args.dtype, "--seconds", str(args.seconds), "--device", args.device,
               "--tokens", str(tokens), "--iters", str(args.iters), "--warmup", str(args.warmup)]
    if args.no_fast_build:
        command.append("--no-fast-build")
    begin = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, _ = process.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the worker and its compile workers
        stdout, _ = process.communicate()
        reason = f"did not finish within {budget:.0f} s (model build + eager timing + compile): killed"
        check.result["skipped"]["compile"] = reason
        print(f"  compile: {reason}")
        partial = [line for line in (stdout or "").splitlines() if line.startswith("COMPILE_JSON ")]
        out = json.loads(partial[-1][len("COMPILE_JSON "):]) if partial else {}  # the eager numbers, if any
        out.update(finished=False, budget_s=budget, seconds=time.perf_counter() - begin)
        return out
    lines = [line for line in stdout.splitlines() if line.startswith("COMPILE_JSON ")]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"compile worker exited {process.returncode}: {stdout[-1500:]}")
    out = json.loads(lines[-1][len("COMPILE_JSON "):])
    out.update(finished=True, budget_s=budget, seconds=time.perf_counter() - begin)
    return out


def compile_worker(args: argparse.Namespace) -> int:
    """Subprocess of `phase_compile`: DiT step at batch 1, eager then compiled as `stages.dit.compile` does."""
    import torch

    from models.dit import DiTEngine, DiTRequest
    from models.loading import ModelConfig

    device_is_cuda = args.device.startswith("cuda")

    def sync():
        if device_is_cuda:
            torch.cuda.synchronize()

    def timed(fn, warmup, iters):
        for _ in range(warmup):
            fn()
        sync()
        times = []
        for _ in range(iters):
            begin = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - begin) * 1e3)
        return {"median_ms": statistics.median(times), "min_ms": min(times), "n": iters}

    out: dict[str, Any] = {}
    begin = time.perf_counter()
    config = ModelConfig(preset=args.preset, dtype=args.dtype, device=args.device)
    if args.no_fast_build:
        dit = DiTEngine(config)
    else:
        from models import loading

        original = install_fast_builder(args.preset, args.device, getattr(torch, args.dtype))
        try:
            dit = DiTEngine(config)
        except Exception as exc:  # noqa: BLE001
            print(f"[compile worker] fast build failed ({exc}); building as the engine does", file=sys.stderr)
            loading.build_preset = original
            dit = DiTEngine(config)
    out["build_s"] = time.perf_counter() - begin
    frames = math.ceil(args.seconds * LATENTS_PER_SECOND)
    condition = _synthetic_condition(dit, frames, args.tokens, seed=0)
    request = DiTRequest(condition=condition, seeds=[0], num_inference_steps=64)
    state = dit.start(request)
    rows = [(state.xt, 1.0, state.conditions, state.context, 1)]
    with torch.no_grad():
        eager_velocity = dit._forward(rows)[0].float()
        out["eager"] = timed(lambda: dit.step([state]), args.warmup, args.iters)
        print(f"[compile worker] eager step {out['eager']['median_ms']:.1f} ms; compiling ...", file=sys.stderr,
              flush=True)
        print("COMPILE_JSON " + json.dumps(_round(out)), flush=True)  # what is left if the compile is killed
        dit.transformer.compile()  # what DiTEngine does for stages.dit.compile
        first = time.perf_counter()
        compiled_velocity = dit._forward(rows)[0].float()
        sync()
        out["compile_first_call_s"] = time.perf_counter() - first
        out["compiled"] = timed(lambda: dit.step([state]), args.warmup, args.iters)
        # Eager again, now that everything is warm (the first eager timing ran right after start-up)
        compiled_call = dit.transformer._compiled_call_impl
        dit.transformer._compiled_call_impl = None
        try:
            out["eager_again"] = timed(lambda: dit.step([state]), 1, args.iters)
        finally:
            dit.transformer._compiled_call_impl = compiled_call
    eager_ms = min(out["eager"]["median_ms"], out["eager_again"]["median_ms"])
    out["speedup"] = eager_ms / out["compiled"]["median_ms"]
    out["compiled_vs_eager"] = compare(compiled_velocity, eager_velocity)
    print(f"[compile worker] compiled in {out['compile_first_call_s']:.1f} s; step "
          f"{out['compiled']['median_ms']:.1f} ms (x{out['speedup']:.2f}); velocity rel "
          f"{out['compiled_vs_eager']['rel']:.3g}", file=sys.stderr, flush=True)
    print("COMPILE_JSON " + json.dumps(_round(out)), flush=True)
    return 0


# -- the app over HTTP -------------------------------------------------------------------------------------------------
class GpuMemorySampler:
    """Peak `memory.used` (MiB, summed over the visible GPUs) from `nvidia-smi`, every `interval` s in a thread: the
    app's replicas are other processes, so their memory shows only in the driver's count. None without nvidia-smi."""

    def __init__(self, interval: float = 0.5):
        import threading

        self.interval, self.peak, self.error = interval, None, None
        self.first = self.read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def read(self) -> float | None:
        try:
            lines = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                   capture_output=True, text=True, timeout=10, check=True).stdout.split()
            return float(sum(float(x) for x in lines))
        except Exception as exc:  # noqa: BLE001 - no nvidia-smi (CPU), or it failed once
            self.error = f"{type(exc).__name__}: {exc}"[:300]
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            used = self.read()
            if used is not None:
                self.peak = max(self.peak or 0.0, used)
            self._stop.wait(self.interval)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=15)
        return {"gpu_used_before_mib": self.first, "gpu_used_peak_mib": self.peak,
                "gpu_used_peak_over_before_mib": (self.peak - self.first) if self.peak and self.first else None,
                **({"nvidia_smi_error": self.error} if self.peak is None and self.error else {})}


def _http_durations(args: argparse.Namespace) -> list[float]:
    if args.http_durations:
        return [float(d) for d in args.http_durations.split(",")]
    return [round(args.seconds * f, 2) for f in (1.0, 0.9, 0.8, 0.7)]  # mixed lengths: the masked batches


def phase_http(check: Check) -> dict:
    """The real app (Ray + Serve, `build_graph`) on this device, driven over HTTP, in a subprocess that is stopped
    past its budget (a hung deploy or job is reported, not waited for). Runs last: the in-process engines are freed
    first, so that the device holds only the app."""
    import gc

    import torch

    args = check.args
    for key in ("dit", "condition", "codec", "conds", "fp32_transformer"):
        check.ctx.pop(key, None)
    original = check.ctx.pop("original_build_preset", None)
    if original is not None:  # drop the fast builder and the preset modules it caches
        from models import loading

        loading.build_preset = original
    gc.collect()
    if check.cuda:
        torch.cuda.empty_cache()
    # Past `budget`: SIGTERM, up to 20 s to shut down, then SIGKILL (+10 s): all within --total-budget-s.
    budget = min(args.http_budget_s, args.total_budget_s - (time.perf_counter() - check.start) - 35)
    if budget < 60:
        raise TimeoutError(f"only {budget:.0f} s left of --total-budget-s {args.total_budget_s:.0f}: not started")
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--http-worker", "--preset", args.preset,
               "--dtype", args.dtype, "--seconds", str(args.seconds), "--device", args.device,
               "--http-jobs", str(args.http_jobs), "--http-concurrency", str(args.http_concurrency),
               "--http-durations", ",".join(str(d) for d in _http_durations(args)),
               "--http-budget-s", str(budget - 25),  # the worker's own deadline: room to shut Ray down
               *(["--http-lm", args.http_lm] if args.http_lm else [])]
    begin, grace = time.perf_counter(), 20
    import tempfile

    # Output to a file, not a pipe: a process left behind holding a pipe open could block reading it.
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, text=True, start_new_session=True)
        try:
            process.wait(timeout=budget)
            finished = True
        except subprocess.TimeoutExpired:
            finished = False
            process.send_signal(signal.SIGTERM)  # the worker shuts Serve and Ray down, then exits
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)  # the worker and the Ray processes it started
                    process.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    pass
        log.seek(0)
        stdout = log.read()
    lines = [line for line in stdout.splitlines() if line.startswith("HTTP_JSON ")]
    out = json.loads(lines[-1][len("HTTP_JSON "):]) if lines else {}
    out.update(finished=finished, returncode=process.returncode, budget_s=budget,
               seconds=time.perf_counter() - begin)
    if not finished:
        check.result["skipped"]["http_rest"] = f"the HTTP phase did not finish within {budget:.0f} s: stopped"
    for step, error in out.get("errors", {}).items():
        check.result["errors"][f"http.{step}"] = error
    if not lines:
        raise RuntimeError(f"HTTP worker exited {process.returncode} with no result: {stdout[-1500:]}")
    return out


def http_worker(args: argparse.Namespace) -> int:
    """Subprocess of `phase_http`: start Ray + Serve and the app, then one --seconds song alone, then --http-jobs
    jobs at --http-concurrency (`deployments.bench.drive`). Every step has a deadline; errors are recorded and the
    next step runs when the app is up. Prints `HTTP_JSON {...}` after every step (a killed run keeps what it had)."""
    import asyncio
    import shutil
    import tempfile

    os.environ.setdefault("RAY_AUTH_MODE", "token")

    def stop(signum, frame):  # SIGTERM from `phase_http` past its budget: unwind through the finally below
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    deadline = time.perf_counter() + args.http_budget_s
    cuda = args.device.startswith("cuda")
    durations = [float(d) for d in args.http_durations.split(",")]
    out: dict[str, Any] = {"preset": args.preset, "dtype": args.dtype, "device": args.device, "song_s": args.seconds,
                           "load_jobs": args.http_jobs, "concurrency": args.http_concurrency,
                           "load_durations_s": durations, "steps": 8, "errors": {}}

    def emit() -> None:
        print("HTTP_JSON " + json.dumps(_round(out), default=str), flush=True)

    def left() -> float:
        return deadline - time.perf_counter()

    def log(message: str) -> None:
        print(f"[http worker] {message} (t={args.http_budget_s - left():.1f} s)", file=sys.stderr, flush=True)

    sampler = GpuMemorySampler() if cuda else None
    work = Path(tempfile.mkdtemp(prefix="gpu-check-http-"))
    ray = serve = None
    try:
        import httpx
        import ray
        from ray import serve

        from deployments.app import build_graph
        from deployments.bench import _free_port, _stage_options, drive, job_mix

        def run_jobs(step: str, jobs: list[dict], concurrency: int, poll_s: float) -> dict | None:
            """`drive` under the deadline; its result, or None with the error recorded."""
            if left() < 5:
                out["errors"][step] = "no time left"
                return None
            log(f"{step}: {len(jobs)} jobs at concurrency {concurrency} ...")
            try:
                result = asyncio.run(asyncio.wait_for(drive(url, jobs, concurrency, poll_s), timeout=left()))
            except Exception as exc:  # noqa: BLE001 - a timeout or a failed job: record it, go on
                out["errors"][step] = f"{type(exc).__name__}: {exc}"[:1500]
                log(f"{step}: ERROR {out['errors'][step][:300]}")
                return None
            log(f"{step}: {result['jobs']} jobs in {result['seconds']:.2f} s")
            return result

        begin = time.perf_counter()
        longest = max([args.seconds, *durations])
        frames = 8 * math.ceil(longest * LATENTS_PER_SECOND)  # 8 of the longest jobs fit one DiT batch
        ray.init(num_cpus=max(8, os.cpu_count() or 8), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}/gpu-check"
        threads = max(1, (os.cpu_count() or 4) // 4)  # each stage builds the preset on the CPU: more threads, sooner
        app_args = {"name": "gpucheck",
                    "model": {"preset": args.preset, "dtype": args.dtype, "device": args.device,
                              "stages": {stage: {"threads": threads} for stage in ("condition", "dit", "codec")}},
                    "queue": {"max_queued_jobs": 4 * args.http_jobs + 10, "max_running_jobs": 64},
                    "files": {"output_dir": str(work / "results"), "upload_dir": str(work / "uploads"),
                              "journal_path": None}}
        options = _stage_options(8, frames, "step")
        shares = {"ConditionEncoder": 0.25, "DiT": 0.5, "AudioCodec": 0.25}
        if args.http_lm:  # the 5 Hz LM stage too: thinking jobs plan their song on it (continuous batching)
            app_args["lm"] = {"preset": args.http_lm, "dtype": args.dtype, "device": args.device,
                              "max_caption_tokens": LM_CAPTION_TOKENS}
            options["LanguageModel"] = {"num_replicas": 1, "max_ongoing_requests": 64,
                                        "ray_actor_options": {"num_cpus": 0}, "user_config": {"max_batch_size": 16}}
            shares = {"LanguageModel": 0.2, "ConditionEncoder": 0.2, "DiT": 0.4, "AudioCodec": 0.2}
        if cuda:  # what each stage asks of the one GPU (Ray then also sets the replica's CUDA_VISIBLE_DEVICES)
            for name, share in shares.items():
                options[name] = {**options[name], "ray_actor_options": {**options[name]["ray_actor_options"],
                                                                        "num_gpus": share}}
        out["stage_options"] = options
        log(f"deploying {args.preset} {args.dtype} on {args.device} ({threads} CPU threads per stage) ...")
        # serve.run waits for the replicas (each builds the preset): in a thread, so that the deadline holds.
        deployed: dict[str, Any] = {}

        def deploy() -> None:
            try:
                serve.run(build_graph(app_args, options), name="gpucheck", route_prefix="/gpu-check",
                          blocking=False)
            except BaseException as exc:  # noqa: BLE001
                deployed["error"] = exc

        import threading

        thread = threading.Thread(target=deploy, daemon=True)
        thread.start()
        thread.join(timeout=max(1.0, left() - 10))
        if thread.is_alive():
            raise TimeoutError(f"the app was not running after {time.perf_counter() - begin:.0f} s")
        if "error" in deployed:
            raise deployed["error"]
        while True:  # user_config applied in every stage
            try:
                stats = httpx.get(url + "/v1/stats", timeout=5).json()
                slots = {k: v["slots"] for k, v in stats.get("stages", {}).items()}
                if (slots.get("dit") == 16 and slots.get("codec") == 4  # the DiT's: a round of 2 x max_batch_size
                        and (not args.http_lm or slots.get("lm") == 16)):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if left() < 10:
                raise TimeoutError("the app did not report its stages' slots")
            time.sleep(0.5)
        out["startup_s"] = time.perf_counter() - begin
        log(f"app up in {out['startup_s']:.1f} s")
        emit()
        def mix(count: int, seconds: list[float], thinking: bool = False) -> list[dict]:
            """Jobs without `thinking` skip an LM stage (`use_cot_*` off): the same runs as with none."""
            fields = ({"thinking": True} if thinking else
                      dict.fromkeys(("use_cot_metas", "use_cot_caption", "use_cot_language"), False))
            return [{**job, **fields} for job in job_mix(count, seconds, 8, 1, "wav")]

        # Warm-up: a short job through every hop (first HTTP request, first decode of a new length, ...).
        warm = run_jobs("warmup", mix(1, [min(10.0, args.seconds)]), 1, 0.05)
        out["warmup_s"] = warm["seconds"] if warm else None
        song = run_jobs("song", mix(1, [args.seconds]), 1, 0.05)
        if song:
            out["song"] = song
        emit()
        load = run_jobs("load", mix(args.http_jobs, durations), args.http_concurrency, 0.5)
        if load:
            out["load"] = load
        emit()
        if args.http_lm:  # the same song and load with `thinking`: the LM writes metadata, caption and codes first
            song = run_jobs("lm_song", mix(1, [args.seconds], thinking=True), 1, 0.05)
            if song:
                out["lm_song"] = song
            emit()
            load = run_jobs("lm_load", mix(args.http_jobs, durations, thinking=True), args.http_concurrency, 0.5)
            if load:
                out["lm_load"] = load
            emit()
    except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt (SIGTERM) included: report, then shut down
        out["errors"]["app"] = f"{type(exc).__name__}: {exc}"[:1500]
        traceback.print_exc(limit=8)
    finally:
        if sampler is not None:
            out.update(sampler.stop())
        emit()
        for name, shutdown in (("serve", getattr(serve, "shutdown", None)), ("ray", getattr(ray, "shutdown", None))):
            try:
                if shutdown is not None:
                    shutdown()
            except BaseException as exc:  # noqa: BLE001
                out["errors"][f"{name}_shutdown"] = f"{type(exc).__name__}: {exc}"[:300]
        shutil.rmtree(work, ignore_errors=True)
        out["worker_seconds"] = args.http_budget_s - left()
        emit()
    return 0


# -- report ------------------------------------------------------------------------------------------------------------
def summary(result: dict) -> str:
    p, lines = result["phases"], []
    env = p.get("env", {})
    lines.append(f"== gpu_check: {env.get('card', env.get('device'))}, torch {env.get('torch')} (CUDA "
                 f"{env.get('torch_cuda')}), preset {result['args']['preset']} {result['args']['dtype']}, "
                 f"{result['args']['seconds']:g} s songs, {result.get('total_seconds', 0):.0f} s total")
    dit = p.get("dit", {})
    for label in ("same_b1", "same_b4", "same_b8", "mixed_b4", "mixed_b8"):
        t = dit.get(label, {})
        if "median_ms" in t:
            lines.append(f"dit step {label:<9} {t['median_ms']:9.1f} ms  per job {t['median_ms'] / int(label[-1]):8.1f}"
                         f" ms  speed-up/job x{t.get('per_job_speedup_vs_b1', 1.0):.2f}")
    if "condition" in p:
        c = p["condition"]
        lines.append(f"condition encode  1 job {c['one']['median_ms']:.1f} ms, "
                     f"8 jobs {c['batch8']['median_ms']:.1f} ms")
    if "vae" in p:
        v = p["vae"]
        lines.append(f"vae decode {result['args']['seconds']:g} s: {v['decode']['median_ms']:.0f} ms, peak "
                     f"{v.get('peak_allocated_gib') or 0:.2f} GiB")
    if "invariance" in p:
        i = p["invariance"]
        lines.append(f"batch invariance {i['dtype']}: rel {i['low_precision']['rel']:.3g}, max abs "
                     f"{i['low_precision']['max_abs']:.3g}" + (f"; fp32 rel {i['float32']['rel']:.3g}"
                                                              if "float32" in i else ""))
    if "precision" in p:
        lines.append("bf16 vs fp32: suggested test tolerance (rel) "
                     f"{p['precision']['suggested_test_rel_tolerance']:.3g}")
    c = p.get("compile", {})
    if c.get("finished"):
        lines.append(f"compile: {c['compile_first_call_s']:.0f} s to compile, step {c['compiled']['median_ms']:.1f} ms "
                     f"vs eager {c['eager']['median_ms']:.1f} / {c['eager_again']['median_ms']:.1f} ms "
                     f"(x{c['speedup']:.2f}), rel {c['compiled_vs_eager']['rel']:.3g}")
    h = p.get("http", {})
    if h:
        mib = h.get("gpu_used_peak_mib")
        lines.append(f"http ({h.get('preset')} {h.get('dtype')} on {h.get('device')}): app up in "
                     f"{h.get('startup_s') or float('nan'):.0f} s"
                     + (f"; peak GPU memory used {mib / 1024:.2f} GiB (nvidia-smi, all processes; "
                        f"{(h.get('gpu_used_before_mib') or 0) / 1024:.2f} GiB before the app)" if mib else ""))
        for prefix, label in (("", "http"), ("lm_", "http thinking")):
            if prefix + "song" in h:
                song = h[prefix + "song"]
                lines.append(f"{label} {h['song_s']:g} s song alone: {song['seconds']:.2f} s end to end; stage "
                             "medians " + " ".join(f"{k} {v:.2f}" for k, v in song["stage_median_s"].items())
                             + (f"; {song['lm_tokens_median']:.0f} LM tokens" if "lm_tokens_median" in song else ""))
            if prefix + "load" in h:
                load = h[prefix + "load"]
                lines.append(f"{label} load {load['jobs']} jobs ({h['load_durations_s']} s) at concurrency "
                             f"{h['concurrency']}: {load['seconds']:.1f} s, {load['jobs_per_s']:.3f} jobs/s, p50 "
                             f"{load['p50_s']:.1f} s, p95 {load['p95_s']:.1f} s")
    mem = result.get("memory", {})
    if "overall_peak_allocated_gib" in mem:
        lines.append(f"peak allocated overall {mem['overall_peak_allocated_gib']:.2f} GiB; per phase: " + ", ".join(
            f"{k} {v['peak_allocated_gib']:.2f}" for k, v in mem.items() if isinstance(v, dict)))
    if result["errors"]:
        lines.append("ERRORS: " + "; ".join(f"{k}: {v[:200]}" for k, v in result["errors"].items()))
    if result["skipped"]:
        lines.append("SKIPPED: " + "; ".join(f"{k}: {v}" for k, v in result["skipped"].items()))
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="turbo")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seconds", type=float, default=180.0, help="song length (180 s = 4500 latent frames)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--out", default=None, help="folder for gpu_check.json (rewritten after every phase)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--inv-steps", type=int, default=4, help="sampling steps of the batch-invariance check")
    parser.add_argument("--budget-s", type=float, default=280.0, help="skip phases that would start past this")
    parser.add_argument("--compile-budget-s", type=float, default=150.0)
    parser.add_argument("--skip", default="", help="comma-separated phases to skip (e.g. compile)")
    parser.add_argument("--no-fast-build", action="store_true", help="build presets on the CPU, as the engines do")
    parser.add_argument("--http", action=argparse.BooleanOptionalAction, default=None,
                        help="last, the real app (Ray + Serve) on --device over HTTP: one --seconds song alone, then "
                        "--http-jobs jobs at --http-concurrency (default: on with cuda, off on the CPU)")
    parser.add_argument("--http-lm", default="", help="an LM preset (e.g. 0.6B): the app gets a LanguageModel stage "
                        f"(captions of at most {LM_CAPTION_TOKENS} tokens) and runs the song and the load again with "
                        "`thinking` on")
    parser.add_argument("--http-jobs", type=int, default=16)
    parser.add_argument("--http-concurrency", type=int, default=16)
    parser.add_argument("--http-durations", default="", help="seconds, cycled over the load jobs (default: --seconds "
                        "x 1, 0.9, 0.8, 0.7: mixed lengths)")
    parser.add_argument("--http-budget-s", type=float, default=210.0, help="the HTTP phase is stopped past this")
    parser.add_argument("--total-budget-s", type=float, default=450.0,
                        help="the HTTP phase gets at most what is left of this, counted from the start")
    parser.add_argument("--compile-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--http-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=600, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.http is None:
        args.http = args.device.startswith("cuda")
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse(argv)
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" on every cast
    except Exception:  # noqa: BLE001
        pass
    if args.compile_worker:
        return compile_worker(args)
    if args.http_worker:
        return http_worker(args)
    check = Check(args)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    plan = [("env", phase_env, 0), ("build", phase_build, 0), ("condition", phase_condition, 5),
            ("dit", phase_dit, 10), ("vae", phase_vae, 10), ("invariance", phase_invariance, 10),
            ("precision", phase_precision, 10), ("compile", phase_compile, 35)]
    if args.http:  # last (it frees the engines); its own budget: --http-budget-s within --total-budget-s
        plan.append(("http", phase_http, -math.inf))
    for name, fn, min_seconds in plan:
        if name in skip:
            check.result["skipped"][name] = "--skip"
            continue
        if name not in ("env", "build") and "build" in check.result["errors"]:
            check.result["skipped"][name] = "the build failed"
            continue
        check.phase(name, lambda fn=fn: fn(check), min_seconds)
    result = check.finish()
    print(summary(result), flush=True)
    print("GPU_JSON " + json.dumps(_round(result), default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
