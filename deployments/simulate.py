"""`acestep-bench --simulate NAME_OR_PATH`: a capacity simulation of the real app. Every line it prints says so.

Everything but the model engines is the real service: Serve's HTTP proxy, the ingress, the job registry actor, the
driver, the stage shims with their batching (`@serve.batch` frame budgets, the DiT step scheduler), their load
reports, and `deployments.autoscaling:backlog_policy`. Only the engines are simulated: each has the interface of the
real one (`ConditionEngine`, `DiTEngine`, `AudioCodecEngine`) and blocks its engine thread with `time.sleep` (as a
real forward pass blocks it) for what a cost model says:

    seconds = a + b x rows x frames (+ c x rows)

`c` (seconds per row, 0 unless a cost file sets it) is there for work that grows with rows but not with audio: the
condition encoder's (text tokens), the DiT's cross-attention keys and values (condition tokens). With c = 0 it is
the plain `a + b x rows x frames`.

- ConditionEncoder, per batch call: rows = condition rows (one per job, +1 per cover blended at strength < 1),
  frames = the longest job's latent frames (25 per second of audio);
- DiT, per forward pass (one `step` call): rows = `Sampling.rows` summed over the pass (outputs, x2 with CFG),
  frames = the longest job's frames in it: the padded work of the pass;
- AudioCodec, per decode batch call: rows and rows x frames summed over its items (the decoder groups equal lengths,
  it never pads); per encode of input audio: 1 x the input's frames (the `encode` costs, else the decode costs).

Outputs are zeros of the real shapes (conditions, latents, audio); the AudioCodec still encodes and writes the
(silent) files, a real CPU cost of its host that the simulation keeps. No weights are built or loaded, and a
simulated replica imports neither torch nor diffusers, transformers or peft: the model modules import those only
where an engine builds its network or computes, so a replica that the autoscaler adds starts in the time Ray and
Serve take, not the seconds of model code a real replica imports too.

The mode exists only in the benchmark: `build_graph(..., simulate=costs)` is a Python-only parameter that `build_app`
(serve_config.yaml, `serve run`) never passes, and `build_app` refuses a config that asks for it.

Cost files: `deployments/sim_costs/<name>.json`, shipped with the package, or any path. `cpu.json` comes from
`python -m deployments.simulate calibrate` (this machine's `small` preset, 1 torch thread, least squares over a few
rows x frames points); `gpu.json` from `python -m deployments.simulate derive-gpu` (the full-size `turbo` model on one
H200, from benchmarks/results/gpu_check-h200.json, with an H100 estimate from FLOPs as a cross-check).

What `run` measures (one Ray instance, app `sim`, then `simcp`), on the cost file's `workload` (job mix, batching
limits, replicas per stage) with the bench options given on the command line on top:

1. `batched`: the job mix through HTTP with batching on (`drive()` of deployments/bench.py), the registry sampled
   every 0.25 s. Achieved jobs/s against the cost model's ideal (`ideal()`): `sim_scheduler_efficiency`; the ETA
   error (first look at a queued job against its real wait, as `drive()` computes it); and each engine's trace
   (`engine_trace()`): how busy it was, how many jobs shared a call, and what its calls cost against the ideal's.
2. `unbatched`: the same with `max_batch_size: 1` in every stage: `sim_batching_gain` against
   `sim_batching_gain_ideal` (the same ratio of the two ideals).
3. `autoscale`: the DiT under `backlog_policy` (min 1, max 4 replicas, `target_ongoing_requests` = max_batch_size,
   `upscale_delay_s` 5, metrics pushed every 0.5 s), a step load of jobs submitted at once; DiT replicas from
   `serve.status()` every 0.25 s, and the seconds from the step to the replicas the load needs (started: all
   states; running).
4. `control plane`: free stages (a = b = 0), 32 stage replicas (fewer if this machine's free memory cannot hold
   them, said so), 1-s jobs (so the files written stay small), 64 clients: the jobs/s the control plane sustains,
   and the CPU of each process meanwhile.

"Achieved" is the steady-state rate: half the phase's jobs (from the 1st to the 3rd quartile of completions) over
the time they took, so the fill and drain of a short run do not count; `drive()`'s whole-run rate is reported too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.condition import ConditionRequest, ConditionResult
from models.dit import CALIBRATION_PASSES, CALIBRATION_SECONDS, DiTEngine, DiTRequest
from models.loading import ModelConfig, load_vae_config
from models.presets import PRESETS

SIM_COSTS_DIR = Path(__file__).parent / "sim_costs"
LABEL = "[SIMULATION]"
APP, CP_APP = "sim", "simcp"
REPLICA_KEYS = {"condition": "ConditionEncoder", "dit": "DiT", "codec": "AudioCodec"}
COST_MODEL = ("seconds per call = a + b x rows x frames + c x rows; a in s, b in s per row x latent frame (25 frames = "
              "1 s of audio), c in s per row. condition: per batch call (rows = jobs, +1 per cover blend; frames = "
              "the longest job's); dit: per forward pass (rows = outputs, x2 with CFG, summed; frames = the longest "
              "job's: padded); codec: per decode batch call (rows and rows x frames summed over its items, unpadded); "
              "encode: per input (1 row x its frames)")
IDEAL_FORMULA = ("ideal_jobs_per_s = min over stages s of R_s / mean_j t_s(j), with t_s(j) = (a_s + b_s * k * w_j + "
                 "c_s * k * rows_j) / k seconds per job (DiT: times steps_j), w_j = rows_j * frames_j of job j in "
                 "that stage, "
                 "k = min(max_batch_size_s, max(1, floor(max_batch_frames_s / w_j))) and R_s the stage's replicas: "
                 "each stage's best service rate at the batch sizes its config allows (batches of k jobs of equal "
                 "length, no padding, never idle); the slowest stage bounds the pipeline")


# -- the cost model -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageCost:
    a: float = 0.0  # seconds per call
    b: float = 0.0  # seconds per row x frame
    c: float = 0.0  # seconds per row

    def seconds(self, rows: int, frames: int) -> float:
        """A call over `rows` rows padded to `frames` frames."""
        return self.work_seconds(rows, rows * frames)

    def work_seconds(self, rows: int, work: int) -> float:
        """A call over `rows` rows of `work` row-frames in all (unpadded)."""
        return self.a + self.b * work + self.c * rows


def stage_costs(costs: dict[str, Any]) -> dict[str, StageCost]:
    """`condition`, `dit`, `codec`, `encode` (the codec's encode: its own entry, else the decode's)."""
    table = costs["costs"]
    out = {}
    for stage in ("condition", "dit", "codec", "encode"):
        entry = table.get(stage, table["codec"]) if stage == "encode" else table[stage]
        out[stage] = StageCost(float(entry["a"]), float(entry["b"]), float(entry.get("c", 0.0)))
    return out


def load_costs(name_or_path: str) -> dict[str, Any]:
    """A cost file by name (`cpu`, `gpu`: deployments/sim_costs/<name>.json) or path, checked."""
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        path = SIM_COSTS_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem for p in SIM_COSTS_DIR.glob("*.json"))
        raise ValueError(f"no cost file {name_or_path!r}: give a path or one of {known}")
    costs = json.loads(path.read_text())
    if costs.get("preset") not in PRESETS:
        raise ValueError(f"{path}: 'preset' must be one of {sorted(PRESETS)}, got {costs.get('preset')!r}")
    for stage, cost in stage_costs(costs).items():
        if not (cost.a >= 0 and cost.b >= 0 and cost.c >= 0):
            raise ValueError(f"{path}: costs.{stage} needs a, b, c >= 0, got {cost}")
    costs["source"] = str(path)
    return costs


def free(costs: dict[str, Any]) -> dict[str, Any]:
    """The same cost file with every stage free (a = b = 0): what the control plane alone can do."""
    return {**costs, "costs": {stage: {"a": 0.0, "b": 0.0} for stage in ("condition", "dit", "codec", "encode")}}


class Sleeper:
    """Sleeps a call's modelled seconds on the engine thread and, when the cost file names a `trace_dir` (the bench
    sets one), appends the call to `<trace_dir>/<stage>-<pid>.jsonl`: start, end, jobs, rows, padded and real
    row-frames, modelled seconds. The bench reads these to see where a phase's time went."""

    def __init__(self, stage: str, costs: dict[str, Any]):
        self.stage = stage
        trace_dir = costs.get("trace_dir")
        self.trace = Path(trace_dir) / f"{stage}-{os.getpid()}.jsonl" if trace_dir else None

    def __call__(self, seconds: float, jobs: int, rows: int, padded: int, real: int) -> None:
        start = time.time()
        time.sleep(seconds)
        if self.trace is not None:
            with open(self.trace, "a") as f:
                f.write(json.dumps({"start": start, "end": time.time(), "jobs": jobs, "rows": rows,
                                    "padded": padded, "real": real, "modelled": seconds}) + "\n")


def _latents_per_second(config: ModelConfig) -> float:
    vae = load_vae_config(config)
    return vae["sampling_rate"] / math.prod(vae["downsampling_ratios"])


# -- the simulated engines ------------------------------------------------------------------------------------------
class SimConditionEngine:
    """`models.condition.ConditionEngine`'s interface: zero conditions of the real shapes after the modelled time."""

    def __init__(self, config: ModelConfig, costs: dict[str, Any]):
        self.config = config.for_stage("condition")
        self.cost = stage_costs(costs)["condition"]
        preset = PRESETS[config.preset]
        self.hidden = preset["condition_encoder"]["hidden_size"]
        self.context = 2 * preset["transformer"]["audio_acoustic_hidden_dim"]
        self.tokens = int(costs.get("shapes", {}).get("condition_tokens", 64))
        self.latents_per_second = _latents_per_second(config)
        self.sleep = Sleeper("condition", costs)

    def warm_up(self) -> None:
        self.encode([ConditionRequest(caption="warm-up", lyrics="", audio_duration=1.0)])

    @staticmethod
    def _blends(request: ConditionRequest) -> bool:
        return request.task_type == "cover" and request.audio_cover_strength < 1.0

    def _frames(self, request: ConditionRequest) -> int:
        if request.src_latents is not None:
            return request.src_latents.shape[0]
        return math.ceil(request.audio_duration * self.latents_per_second)

    def encode(self, requests: list[ConditionRequest]) -> list[ConditionResult]:
        frames = [self._frames(r) for r in requests]
        rows = len(requests) + sum(self._blends(r) for r in requests)
        self.sleep(self.cost.seconds(rows, max(frames)), len(requests), rows, rows * max(frames), sum(frames))
        zeros = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
        return [ConditionResult(encoder_hidden_states=zeros(self.tokens, self.hidden),
                                context_latents=zeros(f, self.context), null_embedding=zeros(self.hidden),
                                non_cover_hidden_states=zeros(self.tokens, self.hidden) if self._blends(r) else None)
                for r, f in zip(requests, frames)]


@dataclass(eq=False)
class SimSampling:
    """`models.dit.Sampling`'s interface for the step scheduler: where a job is, no tensors."""

    request: DiTRequest
    key: tuple
    outputs: int
    frames: int
    rows: int
    total: int
    channels: int
    step: int = 0
    result: np.ndarray | None = None

    @property
    def done(self) -> bool:
        return self.step >= self.total

    def cost(self) -> int:
        return self.rows * self.frames

    def latents(self) -> np.ndarray:
        return np.zeros((self.outputs, self.frames, self.channels), np.float32)


class SimDiTEngine:
    """`models.dit.DiTEngine`'s interface (`start`, `step`, `batch_key`, `warm_up`, `generate`): each `step` sleeps
    `a + b x rows x longest frames` of the states it advances. `batch_key` and `generate` are the real ones."""

    batch_key = DiTEngine.batch_key
    effective_guidance = DiTEngine.effective_guidance
    generate = DiTEngine.generate

    def __init__(self, config: ModelConfig, costs: dict[str, Any]):
        self.config = config.for_stage("dit")
        self.cost = stage_costs(costs)["dit"]
        transformer = PRESETS[config.preset]["transformer"]
        self.is_turbo = bool(transformer.get("is_turbo", False))
        self.channels = transformer["audio_acoustic_hidden_dim"]
        self.latents_per_second = _latents_per_second(config)
        self.forward_passes = 0
        self.modelled_s = 0.0  # the sleeps it was told to take (tests compare them with the stage time)
        self.sleep = Sleeper("dit", costs)

    def warm_up(self) -> None:
        frames = math.ceil(self.latents_per_second)
        condition = ConditionResult(encoder_hidden_states=np.zeros((8, 1), np.float32),
                                    context_latents=np.zeros((frames, 2 * self.channels), np.float32),
                                    null_embedding=np.zeros((1,), np.float32))
        self.generate([DiTRequest(condition=condition, seeds=[0], num_inference_steps=1, tag="warm-up")])
        self.forward_passes, self.modelled_s = 0, 0.0

    def calibrate(self) -> list[tuple[int, float]]:
        """`DiTEngine.calibrate`'s answer without the sleeps: the cost model's seconds for its passes."""
        frames = [math.ceil(s * self.latents_per_second) for s in CALIBRATION_SECONDS]
        return [(f, self.cost.seconds(1, f)) for f in frames for _ in range(CALIBRATION_PASSES)]

    def start(self, request: DiTRequest) -> SimSampling:
        c = request.condition
        do_cfg = self.effective_guidance(request.guidance_scale) > 1.0 and not self.is_turbo
        blend = request.audio_cover_strength < 1.0 and c.non_cover_hidden_states is not None
        outputs = len(request.seeds)
        total = len(request.timesteps) if request.timesteps else request.num_inference_steps
        return SimSampling(request=request, key=self.batch_key(request), outputs=outputs,
                           frames=c.context_latents.shape[0], rows=(1 + do_cfg + blend) * outputs, total=total,
                           channels=self.channels)

    def step(self, states: list[SimSampling]) -> None:
        assert len({s.key for s in states}) == 1, "states with different batch keys cannot share a forward pass"
        rows, frames = sum(s.rows for s in states), max(s.frames for s in states)
        seconds = self.cost.seconds(rows, frames)
        self.sleep(seconds, len(states), rows, rows * frames, sum(s.rows * s.frames for s in states))
        self.forward_passes += 1
        self.modelled_s += seconds
        for s in states:
            s.step += 1


class SimAudioCodecEngine:
    """`models.codec.AudioCodecEngine`'s interface: silence of the real shape after the modelled time."""

    def __init__(self, config: ModelConfig, costs: dict[str, Any]):
        self.config = config.for_stage("codec")
        table = stage_costs(costs)
        self.cost, self.encode_cost = table["codec"], table["encode"]
        vae = load_vae_config(config)
        self.sample_rate, self.channels = int(vae["sampling_rate"]), int(vae["audio_channels"])
        self.hop_length = math.prod(vae["downsampling_ratios"])
        self.latent_channels = int(vae["decoder_input_channels"])
        self.sleep = Sleeper("codec", costs)

    def warm_up(self) -> None:
        frames = math.ceil(self.sample_rate / self.hop_length)
        self.decode([np.zeros((1, frames, self.latent_channels), np.float32)])

    def decode(self, latents: list[np.ndarray]) -> list[np.ndarray]:
        rows = sum(item.shape[0] for item in latents)
        work = sum(item.shape[0] * item.shape[1] for item in latents)
        self.sleep(self.cost.work_seconds(rows, work), len(latents), rows, work, work)
        return [np.zeros((item.shape[0], self.channels, item.shape[1] * self.hop_length), np.float32)
                for item in latents]

    def encode(self, waveform: np.ndarray, kind: str, seed: int | None = None) -> np.ndarray:
        if kind not in ("reference", "source"):
            raise ValueError(f"kind must be 'reference' or 'source', got {kind!r}")
        frames = waveform.shape[-1] // self.hop_length
        if kind == "reference":  # the pipeline's 30 s timbre excerpt
            frames = min(frames, math.ceil(30 * self.sample_rate / self.hop_length))
        self.sleep(self.encode_cost.seconds(1, frames), 1, 1, frames, frames)
        return np.zeros((frames, self.latent_channels), np.float32)


ENGINES = {"condition": SimConditionEngine, "dit": SimDiTEngine, "codec": SimAudioCodecEngine}


def simulated_engine(stage: str) -> type:
    """The simulated engine class of a stage (`StageReplica.stage`)."""
    return ENGINES[stage]


# -- the ideal ------------------------------------------------------------------------------------------------------
def _job_work(job: dict[str, Any], preset: str, lps: float) -> dict[str, Any]:
    """(rows, frames) of one job (a `job_mix` entry) in each stage, and its steps."""
    frames = math.ceil(job["audio_duration"] * lps)
    outputs = job.get("batch_size") or 2
    transformer = PRESETS[preset]["transformer"]
    cfg = not transformer.get("is_turbo", False) and job.get("guidance_scale", 7.0) > 1.0
    return {"condition": (1, frames), "dit": (outputs * (1 + cfg), frames), "codec": (outputs, frames),
            "steps": job.get("inference_steps", 8)}


def ideal(costs: dict[str, Any], jobs: list[dict[str, Any]], limits: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The cost model's best jobs/s for this job mix: see `IDEAL_FORMULA`. `limits[stage]` has `max_batch_size`,
    `max_batch_frames` and `replicas`."""
    table = stage_costs(costs)
    lps = _latents_per_second(ModelConfig(preset=costs["preset"]))
    stages = {}
    for stage in ("condition", "dit", "codec"):
        cost, limit = table[stage], limits[stage]
        per_job, batches = [], []
        for job in jobs:
            work = _job_work(job, costs["preset"], lps)
            rows, frames = work[stage]
            w = rows * frames
            k = min(limit["max_batch_size"], max(1, limit["max_batch_frames"] // w))
            seconds = cost.work_seconds(k * rows, k * w) / k
            per_job.append(seconds * (work["steps"] if stage == "dit" else 1))
            batches.append(k)
        mean = statistics.fmean(per_job)
        stages[stage] = {"seconds_per_job": mean, "batch": statistics.fmean(batches), "replicas": limit["replicas"],
                         "jobs_per_s": limit["replicas"] / mean if mean > 0 else math.inf}
    bottleneck = min(stages, key=lambda s: stages[s]["jobs_per_s"])
    return {"jobs_per_s": stages[bottleneck]["jobs_per_s"], "bottleneck": bottleneck, "stages": stages}


# -- measuring the running app --------------------------------------------------------------------------------------
def say(message: str) -> None:
    print(f"{LABEL} {message}", file=sys.stderr, flush=True)


class RegistrySampler:
    """The registry's stats every `interval` s, straight from its actor (no HTTP), in a thread: completions over
    time, and the jobs in each stage."""

    def __init__(self, name: str, interval: float = 0.25):
        import ray

        from jobs.registry import NAMESPACE

        self.actor = ray.get_actor(f"registry-{name}", namespace=NAMESPACE)
        self.interval, self.samples = interval, []
        self._sample()  # before the phase starts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import ray

        try:
            stats = ray.get(self.actor.stats.remote(), timeout=10)
            self.samples.append((time.time(), stats))
        except Exception:
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self) -> list[tuple[float, dict]]:
        self._stop.set()
        self._thread.join()
        self._sample()  # after the phase
        return sorted(self.samples, key=lambda sample: sample[0])


def steady_rate(samples: list[tuple[float, dict]], jobs: int) -> dict[str, Any]:
    """Jobs/s between the 1st and 3rd quartile of the phase's completions (interpolated between samples), and the
    mean jobs in each stage over that window."""
    if len(samples) < 2 or jobs < 4:
        return {"jobs_per_s": None}
    base = samples[0][1]["jobs"]["succeeded"]
    points = [(t, s["jobs"]["succeeded"] - base) for t, s in samples]

    def crossing(target: float) -> float | None:
        for (t0, d0), (t1, d1) in zip(points, points[1:]):
            if d0 < target <= d1:
                return t0 + (t1 - t0) * (target - d0) / (d1 - d0)
        return None

    low, high = jobs / 4, 3 * jobs / 4
    t_low, t_high = crossing(low), crossing(high)
    if t_low is None or t_high is None or t_high <= t_low:
        return {"jobs_per_s": None}
    window = [s for t, s in samples if t_low <= t <= t_high]
    occupancy = {stage: statistics.fmean(s["stages"].get(stage, {}).get("in_flight", 0) for s in window)
                 for stage in ("condition", "dit", "codec")} if window else {}
    return {"jobs_per_s": (high - low) / (t_high - t_low), "window_s": t_high - t_low,
            "mean_in_flight": occupancy,
            "mean_queue_size": statistics.fmean(s["queue_size"] for s in window) if window else None}


def engine_trace(trace_dir: Path, start: float, end: float, replicas: dict[str, int], jobs: int,
                 ideal_result: dict[str, Any]) -> dict[str, Any]:
    """Where a phase's time went in each stage's engines (their `Sleeper` traces, calls started in [start, end]):
    calls, jobs per call, `busy` (seconds slept over the phase's seconds x replicas), `overshoot` (slept over
    modelled: a sleeping thread woken late on a busy machine), `padding` (padded over real row-frames), and
    `work_vs_ideal` (the ideal's seconds for these jobs over the seconds the calls modelled: what the batches the
    scheduler formed cost against equal-length full batches). For the bottleneck stage, the achieved rate over the
    ideal is about work_vs_ideal / overshoot x busy."""
    wall = max(end - start, 1e-9)
    out = {}
    for stage, deployment in REPLICA_KEYS.items():
        calls = []
        for path in trace_dir.glob(f"{stage}-*.jsonl"):
            for line in path.read_text().splitlines():
                try:
                    call = json.loads(line)
                except ValueError:
                    continue
                if start <= call["start"] <= end:
                    calls.append(call)
        if not calls:
            continue
        modelled = sum(c["modelled"] for c in calls)
        slept = sum(c["end"] - c["start"] for c in calls)
        real = sum(c["real"] for c in calls)
        ideal_s = jobs * ideal_result["stages"][stage]["seconds_per_job"]
        out[stage] = {"calls": len(calls), "jobs_per_call": sum(c["jobs"] for c in calls) / len(calls),
                      "modelled_s": modelled, "slept_s": slept,
                      "busy": slept / (wall * replicas.get(deployment, 1)),
                      "overshoot": slept / modelled if modelled else None,
                      "padding": sum(c["padded"] for c in calls) / real - 1 if real else None,
                      "work_vs_ideal": ideal_s / modelled if modelled else None}
    return out


def _title(process) -> str:
    """A process's role: Ray sets worker titles such as `ray::ServeReplica:sim:DiT.handle_request`."""
    try:
        cmdline = process.cmdline()
    except Exception:
        return "?"
    head = cmdline[0] if cmdline else process.name()
    if head.startswith("ray::"):
        return head.split(".")[0].split(" ")[0]
    if "python" in os.path.basename(head) and len(cmdline) > 1:
        script = next((a for a in cmdline[1:] if a.endswith(".py") or a in ("-m",)), cmdline[1])
        return os.path.basename(script if script != "-m" else cmdline[cmdline.index("-m") + 1])
    return os.path.basename(head)


class CpuMeter:
    """CPU seconds of this process and every descendant (the Ray instance, the app) over a window, by role; and the
    seconds their threads were ready to run but waited for a core (the kernel's run-queue delay, from
    `/proc/<pid>/task/<tid>/schedstat`): on a saturated machine, what a stage loses to the others."""

    def __init__(self):
        import psutil

        self.me = psutil.Process()
        self.start, self.wall, self.system = self._snapshot(), time.time(), psutil.cpu_times()

    def _snapshot(self) -> dict[int, tuple[str, float, float]]:
        out = {}
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                title = "acestep-bench (this process: HTTP load + sampling)" if p.pid == self.me.pid else _title(p)
                out[p.pid] = (title, t.user + t.system, _run_queue_s(p.pid))
            except Exception:
                pass
        return out

    def stop(self) -> dict[str, Any]:
        import psutil

        end, wall, system = self._snapshot(), time.time() - self.wall, psutil.cpu_times()
        roles: dict[str, list[tuple[float, float]]] = {}
        for pid, (title, seconds, queued) in end.items():
            _, cpu0, queued0 = self.start.get(pid, (title, 0.0, 0.0))
            roles.setdefault(title, []).append((seconds - cpu0, queued - queued0))
        busy = sum(getattr(system, f) - getattr(self.system, f) for f in ("user", "system", "nice", "irq", "softirq"))
        ours = sum(c for v in roles.values() for c, _ in v)
        top = sorted(((title, sum(c for c, _ in v), sum(q for _, q in v), len(v)) for title, v in roles.items()),
                     key=lambda r: -r[1])
        return {"seconds": wall, "cores": os.cpu_count(), "machine_busy_cores": busy / wall,
                "ours_cores": ours / wall, "others_cores": max(0.0, busy - ours) / wall,
                "by_role": [{"role": title, "cores": s / wall, "waiting_for_a_core": q / wall, "processes": n}
                            for title, s, q, n in top if s / wall >= 0.01]}


def _run_queue_s(pid: int) -> float:
    """Seconds the process's threads have spent ready to run, waiting for a core (0 where the kernel keeps no
    schedstats)."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as handle:
                    total += int(handle.read().split()[1])
            except (OSError, IndexError, ValueError):
                pass
    except OSError:
        pass
    return total / 1e9


def replica_memory(app: str) -> dict[str, dict[str, float]]:
    """RSS, USS and anonymous RSS (MiB) of this app's stage replicas, median per deployment."""
    import psutil

    found: dict[str, list[dict[str, float]]] = {}
    for p in psutil.Process().children(recursive=True):
        title = _title(p)
        for deployment in REPLICA_KEYS.values():
            if title == f"ray::ServeReplica:{app}:{deployment}":
                try:
                    info = p.memory_full_info()
                    anon = next((int(line.split()[1]) * 1024 for line in open(f"/proc/{p.pid}/status")
                                 if line.startswith("RssAnon:")), 0)
                    found.setdefault(deployment, []).append({"rss": info.rss / 2**20, "uss": info.uss / 2**20,
                                                             "anon": anon / 2**20})
                except Exception:
                    pass
    return {d: {k: statistics.median(v[k] for v in values) for k in ("rss", "uss", "anon")} | {"replicas": len(values)}
            for d, values in found.items()}


# -- the run --------------------------------------------------------------------------------------------------------
WORKLOAD_ARGS = ("jobs", "concurrency", "durations", "steps", "outputs", "format", "max_batch_size",
                 "max_batch_frames", "poll_s")


def workload(costs: dict[str, Any], args: argparse.Namespace,
             parser: argparse.ArgumentParser | None) -> tuple[dict[str, Any], list[str]]:
    """The cost file's `workload`, with the bench options given on the command line (those that differ from the
    bench's defaults) on top."""
    work = dict(costs.get("workload", {}))
    overridden = []
    for key in WORKLOAD_ARGS:
        value = getattr(args, key, None)
        if key == "durations" and isinstance(value, str):
            value = [float(d) for d in value.split(",")]
        default = parser.get_default(key) if parser is not None else None
        if key == "durations" and isinstance(default, str):
            default = [float(d) for d in default.split(",")]
        if value is not None and (key not in work or parser is None or value != default):
            if key in work and work[key] != value:
                overridden.append(key)
            work[key] = value
    work.setdefault("replicas", {"ConditionEncoder": 1, "DiT": 1, "AudioCodec": 1})
    work.setdefault("autoscale", {})
    work.setdefault("control_plane", {})
    return work, overridden


def _limits(options: dict[str, dict], replicas: dict[str, int]) -> dict[str, dict[str, int]]:
    from deployments.stage import BatchingConfig
    from jobs.step_scheduler import StepSchedulingConfig

    out = {}
    for stage, deployment in REPLICA_KEYS.items():
        config = (StepSchedulingConfig if stage == "dit" else BatchingConfig).model_validate(
            {k: v for k, v in options[deployment]["user_config"].items() if k != "fault_injection"})
        out[stage] = {"max_batch_size": config.max_batch_size, "max_batch_frames": config.max_batch_frames,
                      "replicas": replicas[deployment]}
    return out


def _slots(stage: str, user_config: dict[str, Any]) -> int:
    """The job slots a replica of `stage` reports with this `user_config`: the DiT's are its step round's jobs."""
    from jobs.step_scheduler import StepSchedulingConfig

    if stage == "dit":
        return StepSchedulingConfig.model_validate(user_config).round_jobs
    return user_config["max_batch_size"]


def _options(work: dict[str, Any], batch: int, replicas: dict[str, int]) -> dict[str, dict]:
    from deployments.bench import _stage_options

    options = _stage_options(batch, work["max_batch_frames"], "step")
    for deployment, count in replicas.items():
        options[deployment]["num_replicas"] = count
        options[deployment]["max_ongoing_requests"] = max(options[deployment].get("max_ongoing_requests", 32),
                                                          4 * batch)
    return options


def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """`acestep-bench --simulate NAME_OR_PATH`: the four phases in the module docstring, one table, one JSON line."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    fast_metrics = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
                    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}
    os.environ.update(fast_metrics)
    import httpx
    import ray
    from ray import serve

    from deployments.app import build_graph
    from deployments.bench import _free_port, drive, job_mix
    from jobs.registry import NAMESPACE, STAGE_REPORT_TTL_S

    costs = load_costs(args.simulate)
    work, overridden = workload(costs, args, parser)
    jobs = job_mix(work["jobs"], work["durations"], work["steps"], work["outputs"], work["format"])
    batch = work["max_batch_size"]
    replicas = work["replicas"]
    results: dict[str, Any] = {
        "simulation": True, "cost_file": costs["source"], "cost_name": costs.get("name"), "preset": costs["preset"],
        "cost_model": COST_MODEL,
        "costs": {s: {"a": c.a, "b": c.b} for s, c in stage_costs(costs).items()},
        "workload": {k: v for k, v in work.items() if k not in ("autoscale", "control_plane")},
        "workload_overridden_by_options": overridden, "sim_ideal_formula": IDEAL_FORMULA}
    say(f"capacity simulation with cost file {costs['source']} (preset {costs['preset']}): stages sleep "
        "a + b x rows x frames instead of computing; everything else is the real app")
    work_dir = Path(tempfile.mkdtemp(prefix="acestep-sim-"))
    trace_dir = work_dir / "trace"
    trace_dir.mkdir()
    costs = {**costs, "trace_dir": str(trace_dir)}
    port = _free_port()
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             object_store_memory=1024**3,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **fast_metrics}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"

    def app_args(name: str, running: int) -> dict[str, Any]:
        return {"name": name, "model": {"preset": costs["preset"]},
                "queue": {"max_queued_jobs": 100_000, "max_running_jobs": running},
                "files": {"output_dir": str(work_dir / name / "results"), "upload_dir": str(work_dir / name / "up"),
                          "journal_path": None}}

    def deploy(name: str, options: dict, sim_costs: dict, running: int, timeout: float = 600.0,
               restart: tuple[str, ...] = ()) -> str:
        """Deploy and wait until every stage replica reports its slots. One code version for every deploy of an
        app, so that a later deploy retunes (user_config, replicas) in place instead of restarting every replica
        (Serve gives each `serve.run` a random version otherwise; setting it is internal in Ray 2.60,
        `_internal=True`: if that goes away, replicas restart). `restart` names deployments to start afresh."""
        versioned = {d: {**options.get(d, {}), "version": f"{name}-restarted" if d in restart else name,
                         "_internal": True}
                     for d in ("Ingress", "JobDriver", *REPLICA_KEYS.values())}
        try:
            app = build_graph(app_args(name, running), versioned, simulate=sim_costs)
        except (TypeError, ValueError):
            app = build_graph(app_args(name, running), options, simulate=sim_costs)
        serve.run(app, name=name, route_prefix=f"/{name}", blocking=False)
        expect = {stage: (_slots(stage, options[d]["user_config"]), options[d].get("num_replicas"))
                  for stage, d in REPLICA_KEYS.items()}
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                actor = ray.get_actor(f"registry-{name}", namespace=NAMESPACE)
                stages = ray.get(actor.stats.remote(), timeout=10)["stages"]
                if all(stage in stages and (count is None or stages[stage]["replicas"] == count)
                       and stages[stage]["slots"] == slots * (count or stages[stage]["replicas"])
                       for stage, (slots, count) in expect.items()) \
                        and httpx.get(f"{base}/{name}/health", timeout=5).status_code == 200:
                    if restart:  # the replaced replicas' last load reports expire from the registry
                        time.sleep(STAGE_REPORT_TTL_S + 1)
                    return f"{base}/{name}"
            except (ValueError, httpx.HTTPError, ray.exceptions.GetTimeoutError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the simulated app {name} did not come up in {timeout} s")

    def measured(name: str, url: str, phase_jobs: list[dict], concurrency: int, poll_s: float,
                 engines: tuple[dict, dict] | None = None) -> dict[str, Any]:
        """`drive()` with the registry sampled (steady rate), the CPU of every process, and (`engines`: the
        replicas and the ideal) the engines' traces."""
        sampler, cpu = RegistrySampler(name), CpuMeter()
        start = time.time()
        phase = asyncio.run(drive(url, phase_jobs, concurrency, poll_s))
        end = time.time()
        samples, phase["cpu"] = sampler.stop(), cpu.stop()
        phase["steady"] = steady_rate(samples, len(phase_jobs))
        if engines is not None:
            phase["engines"] = engine_trace(trace_dir, start, end, engines[0], len(phase_jobs), engines[1])
        return phase

    def delete(name: str) -> None:
        serve.delete(name)
        try:
            ray.kill(ray.get_actor(f"registry-{name}", namespace=NAMESPACE))
        except ValueError:
            pass

    try:
        # 1. Batching on.
        say(f"phase 1/4 batched: deploying ({replicas}) ...")
        options = _options(work, batch, replicas)
        running = max(64, 4 * batch * sum(replicas.values()))
        url = deploy(APP, options, costs, running)
        asyncio.run(drive(url, jobs[:4], 4, 0.1))  # warm-up: every hop once, and the ETA's first measurements
        limits = _limits(options, replicas)
        ideal_batched = ideal(costs, jobs, limits)
        say(f"phase 1/4 batched: {len(jobs)} jobs, {work['concurrency']} clients ...")
        batched = measured(APP, url, jobs, work["concurrency"], work["poll_s"], (replicas, ideal_batched))
        results["replica_rss_mib"] = replica_memory(APP)  # after traffic

        # 2. max_batch_size 1 everywhere (retuned in place: user_config only).
        say("phase 2/4 unbatched (max_batch_size 1) ...")
        options1 = _options(work, 1, replicas)
        url = deploy(APP, options1, costs, running)
        ideal_unbatched = ideal(costs, jobs, _limits(options1, replicas))
        unbatched = measured(APP, url, jobs, work["concurrency"], work["poll_s"], (replicas, ideal_unbatched))
        results["phases"] = {"batched": batched, "unbatched": unbatched}
        results["sim_ideal"] = {"batched": ideal_batched, "unbatched": ideal_unbatched}

        # 3. Autoscaling of the DiT under a step load.
        results["autoscale"] = _autoscale(work, costs, options, replicas, jobs, deploy, running, base)

        delete(APP)
        # 4. The control plane alone.
        results["control_plane"] = _control_plane(work, {k: v for k, v in costs.items() if k != "trace_dir"}, jobs,
                                                  deploy, measured, results)
        delete(CP_APP)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work_dir, ignore_errors=True)

    _summarise(results)
    print(render(results))
    print("BENCH_JSON " + json.dumps(results, default=_json_default))
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    return str(value)


def _autoscale(work, costs, options, replicas, jobs, deploy, running, base) -> dict[str, Any]:
    from ray import serve

    from deployments.bench import job_mix

    scale = {"max_replicas": 4, "upscale_delay_s": 5.0, "downscale_delay_s": 60.0, "look_back_period_s": 2.0,
             **work["autoscale"]}
    batch = work["max_batch_size"]
    autoscaled = {**options, "DiT": {k: v for k, v in options["DiT"].items() if k != "num_replicas"}}
    autoscaled["DiT"]["autoscaling_config"] = {
        "min_replicas": 1, "max_replicas": scale["max_replicas"], "target_ongoing_requests": batch,
        "upscale_delay_s": scale["upscale_delay_s"], "downscale_delay_s": scale["downscale_delay_s"],
        "look_back_period_s": scale["look_back_period_s"], "metrics_interval_s": 0.5,
        "policy": {"policy_function": "deployments.autoscaling:backlog_policy"}}
    one_replica = ideal(costs, jobs, _limits(options, {**replicas, "DiT": 1}))["stages"]["dit"]["jobs_per_s"]
    target = scale["max_replicas"]
    # Enough jobs to need every replica at once, and to keep one replica busy well past the upscale delay (+30 s).
    step_jobs = scale.get("step_jobs") or min(600, max(target * batch * 2,
                                                       math.ceil(one_replica * (scale["upscale_delay_s"] + 30))))
    say(f"phase 3/4 autoscale: DiT min 1 max {target}, target_ongoing_requests {batch}, upscale_delay_s "
        f"{scale['upscale_delay_s']}; step load of {step_jobs} jobs ...")
    # A fresh DiT: in Ray 2.60 a replica that started without autoscaling and is switched to it in place never pushes
    # its custom metrics (ReplicaMetricsManager.set_autoscaling_config starts no pusher), so backlog_policy would
    # not see the registry's backlog from it.
    deploy(APP, autoscaled, costs, running, restart=("DiT",))
    url = f"{base}/{APP}"

    def dit_states() -> dict[str, int]:
        try:
            status = serve.status().applications[APP].deployments["DiT"]
            return {str(getattr(k, "value", k)): v for k, v in status.replica_states.items()}
        except Exception:
            return {}

    deadline = time.time() + 120
    while dit_states().get("RUNNING", 0) != 1 or sum(dit_states().values()) != 1:
        if time.time() > deadline:
            raise TimeoutError(f"the DiT did not settle at 1 replica: {dit_states()}")
        time.sleep(0.5)
    step = job_mix(step_jobs, work["durations"], work["steps"], work["outputs"], work["format"])
    timeline: list[tuple[float, int, int]] = []
    inputs: list[tuple[float, int, int]] = []  # (t, registry queue, jobs in DiT replicas): what the policy adds up
    done = threading.Event()
    import ray

    from jobs.registry import NAMESPACE

    actor = ray.get_actor(f"registry-{APP}", namespace=NAMESPACE)

    def sample(t0: float) -> None:
        while not done.is_set():
            states = dit_states()
            timeline.append((time.time() - t0, states.get("RUNNING", 0), sum(states.values())))
            try:
                stats = ray.get(actor.stats.remote(), timeout=5)
                inputs.append((time.time() - t0, stats["queue_size"], stats["stages"].get("dit", {}).get(
                    "in_flight", 0)))
            except Exception:
                pass
            done.wait(0.25)

    async def submit_all() -> tuple[float, float, list[str]]:
        import httpx

        limit = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async def one(job):
                async with limit:
                    response = await client.post("/v1/music/generate", json=job)
                    response.raise_for_status()
                    return response.json()["job_id"]
            t0 = time.time()
            threading.Thread(target=sample, args=(t0,), daemon=True).start()
            ids = await asyncio.gather(*(one(job) for job in step))
            return t0, time.time(), ids

    t0, submitted, ids = asyncio.run(submit_all())
    # Until the target replicas run and the load is done (or 10 s more), at most the upscale delay + 90 s. Replicas
    # asked for keep starting after the load is done (the downscale delay is longer), so their start is measured.
    finished, limit = None, t0 + scale["upscale_delay_s"] + 90
    while time.time() < limit:
        counts = ray.get(actor.stats.remote())["jobs"]
        if finished is None and counts["queued"] == 0 and counts["running"] == 0:
            finished = time.time() - t0
        reached = next((t for t, running_, _ in timeline if running_ >= target), None)
        decided = next((t for t, _, total in timeline if total >= target), None)
        if (reached is not None and (finished is not None or time.time() - t0 > reached + 10)) \
                or (finished is not None and decided is None and time.time() - t0 > finished + 10):
            break
        time.sleep(0.5)
    done.set()
    left = ray.get(actor.stats.remote())["jobs"]
    reached = next((t for t, running_, _ in timeline if running_ >= target), None)
    decided = next((t for t, _, total in timeline if total >= target), None)
    changes = [timeline[0]] + [b for a, b in zip(timeline, timeline[1:]) if a[1:] != b[1:]] if timeline else []
    return {"step_jobs": step_jobs, "target_replicas": target, "upscale_delay_s": scale["upscale_delay_s"],
            "look_back_period_s": scale["look_back_period_s"], "downscale_delay_s": scale["downscale_delay_s"],
            "target_rule": "min(max_replicas, ceil(step_jobs / target_ongoing_requests)): every job of the step "
                           f"in a DiT slot = min({scale['max_replicas']}, {math.ceil(step_jobs / batch)})",
            "submit_seconds": submitted - t0, "load_seconds": finished,
            "jobs_left_when_measured": left["queued"] + left["running"],
            "seconds_to_decision": decided, "sim_autoscale_seconds_to_target": reached,
            "replica_start_seconds": (reached - decided) if reached is not None and decided is not None else None,
            "timeline": [{"t": round(t, 2), "running": r, "all_states": n} for t, r, n in changes],
            "policy_inputs": [{"t": round(t, 1), "queue": q, "dit_in_flight": f,
                               "desired": min(scale["max_replicas"], math.ceil((q + f) / batch))}
                              for t, q, f in inputs[:: max(1, len(inputs) // 40)]],
            "max_running": max((r for _, r, _ in timeline), default=0), "submitted": len(ids)}


def _control_plane(work, costs, jobs, deploy, measured, results) -> dict[str, Any]:
    import psutil

    from deployments.bench import drive, job_mix

    cp = {"replicas": {"ConditionEncoder": 8, "DiT": 16, "AudioCodec": 8}, "jobs": 600, "concurrency": 64,
          "poll_s": work["poll_s"], "durations": [1.0], **work["control_plane"]}
    wanted = dict(cp["replicas"])
    # Memory: what one simulated replica holds (its anonymous memory, measured in phase 1: the shared library pages
    # count once; the median over the stages, as the AudioCodec's also holds phase 1's long audio, which these 1-s
    # jobs do not have), with 15% to spare, against what this machine has free now, less 3 GiB for the rest.
    per_replica = statistics.median([m["anon"] for m in results.get("replica_rss_mib", {}).values()] or [600.0])
    per_replica *= 1.15 * 2**20
    fits = int((psutil.virtual_memory().available - 3 * 2**30) // per_replica)
    total = sum(wanted.values())
    counts = dict(wanted)
    if fits < total:
        scale = max(3, fits) / total
        counts = {d: max(1, int(n * scale)) for d, n in wanted.items()}
    note = None if counts == wanted else (f"{sum(counts.values())} of {total} replicas: {fits} fit in the free memory "
                                          f"at {per_replica / 2**20:.0f} MiB each")
    say(f"phase 4/4 control plane: free stages (a = b = 0), {counts} ({sum(counts.values())} stage replicas)"
        + (f"; {note}" if note else "") + " ...")
    cp_jobs = job_mix(cp["jobs"], cp["durations"], work["steps"], work["outputs"], work["format"])
    batch = work["max_batch_size"]
    options = _options(work, batch, counts)
    start = time.time()
    url = deploy(CP_APP, options, free(costs), 100_000, timeout=900)
    deploy_s = time.time() - start
    memory = replica_memory(CP_APP)
    asyncio.run(drive(url, cp_jobs[:16], 16, 0.1))
    idle = CpuMeter()  # what the app and Ray burn with no jobs: load reports, metrics pushes, health checks
    time.sleep(5)
    idle = idle.stop()
    phase = measured(CP_APP, url, cp_jobs, cp["concurrency"], cp["poll_s"])
    rate = phase["jobs_per_s"]
    phase["cpu_ms_per_job"] = {e["role"]: 1e3 * e["cores"] / rate for e in phase["cpu"]["by_role"]}
    phase["cpu_ms_per_job_total"] = 1e3 * phase["cpu"]["ours_cores"] / rate
    phase["idle_cpu"] = idle
    return {"replicas": counts, "replicas_wanted": wanted, "note": note, "deploy_seconds": deploy_s,
            "replica_rss_mib": memory, "jobs": cp["jobs"], "concurrency": cp["concurrency"], "poll_s": cp["poll_s"],
            "durations": cp["durations"], **phase}


def _summarise(r: dict[str, Any]) -> None:
    batched, unbatched = r["phases"]["batched"], r["phases"]["unbatched"]
    ideal_b, ideal_u = r["sim_ideal"]["batched"]["jobs_per_s"], r["sim_ideal"]["unbatched"]["jobs_per_s"]
    steady_b, steady_u = batched["steady"]["jobs_per_s"], unbatched["steady"]["jobs_per_s"]
    ratio = lambda x, y: x / y if x and y else None  # noqa: E731
    r["sim_ideal_jobs_per_s"] = ideal_b
    r["sim_ideal_bottleneck"] = r["sim_ideal"]["batched"]["bottleneck"]
    r["sim_achieved_jobs_per_s"] = steady_b
    r["sim_scheduler_efficiency"] = ratio(steady_b, ideal_b)
    r["sim_scheduler_efficiency_whole_run"] = ratio(batched["jobs_per_s"], ideal_b)
    r["sim_batching_gain"] = ratio(steady_b, steady_u)
    r["sim_batching_gain_whole_run"] = ratio(batched["jobs_per_s"], unbatched["jobs_per_s"])
    r["sim_batching_gain_ideal"] = ratio(ideal_b, ideal_u)
    r["sim_unbatched_efficiency"] = ratio(steady_u, ideal_u)
    r["eta_error_median"] = batched["eta_error_median"]
    r["eta_error_median_unbatched"] = unbatched["eta_error_median"]
    r["sim_autoscale_seconds_to_target"] = r["autoscale"]["sim_autoscale_seconds_to_target"]
    r["sim_control_plane_jobs_per_s"] = r["control_plane"]["steady"]["jobs_per_s"]
    r["sim_control_plane_jobs_per_s_whole_run"] = r["control_plane"]["jobs_per_s"]
    gain, gain_ideal = r["sim_batching_gain"], r["sim_batching_gain_ideal"]
    t = r["sim_autoscale_seconds_to_target"]
    r["targets"] = {
        "sim_scheduler_efficiency >= 0.85": _met(r["sim_scheduler_efficiency"], lambda v: v >= 0.85),
        "sim_batching_gain >= 0.85 x sim_batching_gain_ideal": _met(
            ratio(gain, gain_ideal), lambda v: v >= 0.85),
        "sim_control_plane_jobs_per_s >= 50": _met(r["sim_control_plane_jobs_per_s"], lambda v: v >= 50),
        "sim_autoscale_seconds_to_target <= upscale_delay_s + 10": _met(
            t, lambda v: v <= r["autoscale"]["upscale_delay_s"] + 10),
    }


def _met(value: float | None, test) -> dict[str, Any]:
    return {"value": value, "met": bool(value is not None and test(value))}


def render(r: dict[str, Any]) -> str:
    """The readable table; every line labelled."""
    w = r["workload"]
    fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)  # noqa: E731
    lines = [f"capacity simulation, cost file {r['cost_file']} (preset {r['preset']}): no model computes; each stage "
             "sleeps a + b x rows x frames",
             "costs (a s, b s/row-frame): " + ", ".join(f"{s} a={c['a']:.4g} b={c['b']:.4g}"
                                                       for s, c in r["costs"].items()),
             f"workload: {w['jobs']} jobs, {w['concurrency']} clients, durations {w['durations']} s, {w['steps']} "
             f"steps, {w['outputs']} output(s), {w['format']}, max_batch_size {w['max_batch_size']}, "
             f"max_batch_frames {w['max_batch_frames']}, replicas {w['replicas']}",
             f"{'phase':<12}{'ideal/s':>9}{'steady/s':>10}{'run/s':>8}{'eff':>7}{'p50 s':>8}{'p95 s':>8}"
             f"{'eta err':>9}  mean jobs in condition/dit/codec; bottleneck"]
    for name in ("batched", "unbatched"):
        p, i = r["phases"][name], r["sim_ideal"][name]
        eff = p["steady"]["jobs_per_s"] / i["jobs_per_s"] if p["steady"]["jobs_per_s"] else None
        occ = p["steady"].get("mean_in_flight") or {}
        lines.append(f"{name:<12}{i['jobs_per_s']:>9.3f}{fmt(p['steady']['jobs_per_s']):>10}{p['jobs_per_s']:>8.3f}"
                     f"{fmt(eff):>7}{p['p50_s']:>8.2f}{p['p95_s']:>8.2f}{fmt(p['eta_error_median']):>9}  "
                     + "/".join(f"{occ.get(s, 0):.1f}" for s in ("condition", "dit", "codec"))
                     + f"; {i['bottleneck']} ({i['stages'][i['bottleneck']]['seconds_per_job']:.4f} s/job at batch "
                       f"{i['stages'][i['bottleneck']]['batch']:.1f})")
        for stage, e in p.get("engines", {}).items():
            lines.append(f"  {name} {stage} engine: {e['calls']} calls, {e['jobs_per_call']:.2f} jobs/call, busy "
                         f"{fmt(e['busy'], '.2f')}, slept/modelled {fmt(e['overshoot'], '.3f')}, padding "
                         f"{fmt(e['padding'], '.3f')}, ideal/modelled work {fmt(e['work_vs_ideal'], '.3f')}")
    a = r["autoscale"]
    lines.append(f"autoscale: step of {a['step_jobs']} jobs, target {a['target_replicas']} DiT replicas, "
                 f"upscale_delay_s {a['upscale_delay_s']}: decided at {fmt(a['seconds_to_decision'], '.1f')} s, "
                 f"running at {fmt(a['sim_autoscale_seconds_to_target'], '.1f')} s (the step's jobs all done at "
                 f"{fmt(a['load_seconds'], '.1f')} s); replicas over time (t running/all) "
                 + " ".join(f"{e['t']:.1f}:{e['running']}/{e['all_states']}" for e in a["timeline"]))
    lines.append("autoscale policy inputs (t: registry queue + jobs in the DiT -> replicas asked): " + " ".join(
        f"{e['t']:.0f}:{e['queue']}+{e['dit_in_flight']}->{e['desired']}" for e in a["policy_inputs"][::4]))
    c = r["control_plane"]
    lines.append(f"control plane: free stages, {sum(c['replicas'].values())} stage replicas {c['replicas']}"
                 + (f" ({c['note']})" if c["note"] else "") + f", {c['jobs']} jobs, {c['concurrency']} clients "
                 f"polling every {c['poll_s']} s: steady {fmt(c['steady']['jobs_per_s'], '.1f')} jobs/s, whole run "
                 f"{c['jobs_per_s']:.1f} jobs/s, p50 {c['p50_s']:.2f} s")
    cpu = c["cpu"]
    lines.append(f"control plane CPU (cores of {cpu['cores']}; machine busy {cpu['machine_busy_cores']:.2f}, ours "
                 f"{cpu['ours_cores']:.2f}, other users {cpu['others_cores']:.2f}; ours idle, no jobs: "
                 f"{c['idle_cpu']['ours_cores']:.2f}): " + ", ".join(
                     f"{e['role']} {e['cores']:.2f}" + (f" (x{e['processes']})" if e["processes"] > 1 else "")
                     for e in cpu["by_role"][:10]))
    lines.append(f"control plane CPU per job (ms, whole run): {c['cpu_ms_per_job_total']:.0f} in all: " + ", ".join(
        f"{role.replace('ray::ServeReplica:', '')} {ms:.1f}" for role, ms in list(c["cpu_ms_per_job"].items())[:10]))
    lines.append("simulated replica memory (MiB, median; anon = private): " + ", ".join(
        f"{d} rss {m['rss']:.0f} uss {m['uss']:.0f} anon {m['anon']:.0f}" for d, m in r["replica_rss_mib"].items()))
    for key in ("sim_scheduler_efficiency", "sim_scheduler_efficiency_whole_run", "sim_batching_gain",
                "sim_batching_gain_whole_run", "sim_batching_gain_ideal", "eta_error_median",
                "sim_autoscale_seconds_to_target", "sim_control_plane_jobs_per_s"):
        lines.append(f"{key:<40}{fmt(r[key])}")
    for target, v in r["targets"].items():
        lines.append(f"target {target:<56} {fmt(v['value'])}  {'met' if v['met'] else 'MISSED'}")
    return "\n".join(f"{LABEL} {line}" for line in lines)


# -- cost files -----------------------------------------------------------------------------------------------------
def fit(points: list[dict[str, float]], terms: str = "abc") -> dict[str, Any]:
    """Least squares `seconds = a + b x rows x frames + c x rows` over points `{rows, frames, seconds}`, with the
    coefficients in `terms` only (the others 0) and none negative (the best fit over the subsets of `terms` whose
    unconstrained least squares is non-negative: exact non-negative least squares for so few terms)."""
    import itertools

    rows = np.array([p["rows"] for p in points], float)
    work = rows * np.array([p["frames"] for p in points], float)
    y = np.array([p["seconds"] for p in points], float)
    columns = {"a": np.ones_like(y), "b": work, "c": rows}
    best = None
    for size in range(1, len(terms) + 1):
        for subset in itertools.combinations(terms, size):
            matrix = np.stack([columns[t] for t in subset], 1)
            coef, *_ = np.linalg.lstsq(matrix, y, rcond=None)
            if np.any(coef < 0):
                continue
            error = float(np.sum((matrix @ coef - y) ** 2))
            if best is None or error < best[0] - 1e-18:
                best = (error, dict(zip(subset, map(float, coef))))
    coef = {t: best[1].get(t, 0.0) for t in "abc"}
    predicted = coef["a"] + coef["b"] * work + coef["c"] * rows
    return {**coef, "residual_pct": [round(float(v), 1) for v in 100 * (y - predicted) / y]}


def calibrate(preset: str = "small", repeats: int = 3) -> dict[str, Any]:
    """Each real engine's seconds at a few rows x frames points, on 1 torch thread, and the least-squares fits."""
    import torch

    from deployments.bench import job_mix
    from models.codec import AudioCodecEngine
    from models.condition import ConditionEngine

    torch.set_num_threads(1)
    config = ModelConfig(preset=preset)
    lps = _latents_per_second(config)

    walls: dict[str, list[float]] = {}

    def timed(fn, stage: str) -> float:
        """Least CPU seconds of this thread over `repeats` calls (1 torch thread computes in the calling thread):
        what the call takes on a core of its own, the least disturbed by other work on this machine's cores (it
        still pollutes the caches). The median wall times go in `walls`."""
        fn()  # warm-up
        values, wall = [], []
        for _ in range(repeats):
            start, cpu = time.perf_counter(), time.thread_time()
            fn()
            values.append(time.thread_time() - cpu)
            wall.append(time.perf_counter() - start)
        walls.setdefault(stage, []).append(statistics.median(wall))
        return min(values)

    def requests(rows: int, seconds: float) -> list[ConditionRequest]:
        return [ConditionRequest(caption=j["caption"], lyrics=j["lyrics"], audio_duration=seconds)
                for j in job_mix(rows, [seconds], 8, 1, "wav")]

    points: dict[str, list[dict[str, float]]] = {"condition": [], "dit": [], "codec": [], "encode": []}
    condition = ConditionEngine(config)
    for rows in (1, 4, 8):
        for seconds in (10.0, 20.0):
            batch = requests(rows, seconds)
            points["condition"].append({"rows": rows, "frames": math.ceil(seconds * lps),
                                        "seconds": timed(lambda: condition.encode(batch), "condition")})
    mix = condition.encode(requests(12, 10.0))
    tokens = statistics.median(r.encoder_hidden_states.shape[0] for r in mix)
    conds = {seconds: condition.encode(requests(8, seconds)) for seconds in (10.0, 20.0)}
    del condition

    dit = DiTEngine(config)
    for rows in (1, 4, 8):
        for seconds in (10.0, 20.0):
            states = [dit.start(DiTRequest(condition=c, seeds=[i], num_inference_steps=1000, tag=str(i)))
                      for i, c in enumerate(conds[seconds][:rows])]
            points["dit"].append({"rows": sum(s.rows for s in states), "frames": max(s.frames for s in states),
                                  "seconds": timed(lambda: dit.step(states), "dit")})
    del dit

    codec = AudioCodecEngine(config)
    rng = np.random.default_rng(0)
    for rows in (1, 2, 4):
        for seconds in (10.0, 20.0):
            frames = math.ceil(seconds * lps)
            items = [rng.standard_normal((1, frames, 64), dtype=np.float32) for _ in range(rows)]
            points["codec"].append({"rows": rows, "frames": frames, "seconds": timed(lambda: codec.decode(items), "codec")})
    for seconds in (2.0, 5.0):  # the encoder is slow on 1 thread (~2 s per second of audio): short inputs
        waveform = (0.1 * rng.standard_normal((codec.channels, int(seconds * codec.sample_rate)))).astype(np.float32)
        points["encode"].append({"rows": 1, "frames": int(seconds * lps),
                                 "seconds": timed(lambda: codec.encode(waveform, "source", 0), "encode")})
    for stage, pts in points.items():
        for point, wall in zip(pts, walls[stage]):
            point["wall_seconds"] = wall
    fits = {stage: {"abc": fit(pts), "ab": fit(pts, "ab")} for stage, pts in points.items()}
    return {"points": points, "fits": fits, "condition_tokens": int(tokens)}


def calibrate_file(preset: str, command: str) -> dict[str, Any]:
    start = time.time()
    measured = calibrate(preset)
    costs = {stage: {t: round(f["abc"][t], 10) for t in "abc"} for stage, f in measured["fits"].items()}
    return {
        "name": "cpu",
        "description": f"This machine's CPU running the `{preset}` preset, float32, 1 torch thread per stage (Ray's "
                       "default for a num_cpus: 0 replica): each stage as if it had a core of its own (in the real "
                       "CPU bench, stages share 2 cores and slow each other down; here they do not).",
        "preset": preset,
        "cost_model": COST_MODEL,
        "costs": costs,
        "shapes": {"condition_tokens": measured["condition_tokens"]},
        "workload": {"jobs": 32, "concurrency": 16, "durations": [10.0, 15.0, 20.0], "steps": 8, "outputs": 1,
                     "format": "wav", "max_batch_size": 8, "max_batch_frames": 12000,
                     "replicas": {"ConditionEncoder": 1, "DiT": 1, "AudioCodec": 1},
                     "autoscale": {"max_replicas": 4, "upscale_delay_s": 5.0}},
        "notes": {
            "codec": "The decode is not linear on this CPU: one output per decoder call costs ~0.9 ms per latent "
                     "frame, but a call that holds several outputs (AudioCodecEngine.DECODE_PASS_FRAMES = 1024 "
                     "rows x frames per call: 2 outputs of 20 s, 4 of 10 s) ~2.2 ms, as its activations leave the "
                     "cache. The least squares sits between (residuals in calibration.fits): the simulated decode "
                     "is ~2x slow for one output at a time and a little fast for full calls.",
            "condition": "Its work follows rows (text tokens), not audio frames: b = 0, c per row.",
        },
        "calibration": {
            "command": command, "method": "per point, the least CPU seconds of 3 calls after 1 warm-up "
            "(time.thread_time: 1 torch thread computes in the calling thread, so this is the call on a core of its "
            "own even while others share the machine; wall_seconds, the median wall clock, shows the contention); "
            "costs = fits.abc, the non-negative least squares of seconds on [1, rows x frames, rows]; fits.ab is the "
            "same without the per-row term (seconds = a + b x rows x frames)", "threads": 1, "points": measured["points"], "fits": measured["fits"],
            "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "load_average": os.getloadavg(),
                        "python": platform.python_version()},
            "seconds": round(time.time() - start, 1), "date": time.strftime("%Y-%m-%d")},
    }


def _cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


# Published peak rates (NVIDIA datasheets, SXM, dense: no sparsity).
CARDS = {"H100 SXM": {"bf16_tflops": 989.4, "tf32_tflops": 494.7, "hbm_tb_s": 3.35},
         "H200 SXM": {"bf16_tflops": 989.4, "tf32_tflops": 494.7, "hbm_tb_s": 4.8},
         "H100 PCIe": {"bf16_tflops": 756.0, "tf32_tflops": 378.0, "hbm_tb_s": 2.0}}


def _dit_flops_per_row_frame(frames: int, cond_tokens: int) -> dict[str, float]:
    """FLOPs of one DiT forward per row x latent frame, from the `turbo` shape (2 FLOPs per multiply-add)."""
    t = PRESETS["turbo"]["transformer"]
    hidden, inter, layers = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    q, kv = t["num_attention_heads"] * t["head_dim"], t["num_key_value_heads"] * t["head_dim"]
    tokens = math.ceil(frames / t["patch_size"])  # the DiT works on patches of 2 frames
    # Per token per layer: self-attention q, k, v, o; cross-attention q, o (its k, v run on the condition tokens);
    # the gated MLP (3 matrices).
    per_token_linear = layers * (hidden * (q + 2 * kv) + q * hidden + 2 * hidden * q + 3 * hidden * inter)
    cross_kv = layers * 2 * hidden * kv * cond_tokens  # per row, on the condition tokens
    window = t["sliding_window"]
    # Attention scores and values (QK^T, AV): 2 x 2 x keys x q per query token; half the layers full, half sliding.
    attention = (layers // 2) * 4 * tokens * q + (layers - layers // 2) * 4 * min(tokens, 2 * window + 1) * q \
        + layers * 4 * cond_tokens * q
    per_row = 2 * per_token_linear * tokens + 2 * cross_kv + attention * tokens
    embed = 2 * (t["in_channels"] * hidden * t["patch_size"] + hidden * t["audio_acoustic_hidden_dim"]
                 * t["patch_size"]) * tokens
    total = per_row + embed
    params = per_token_linear + layers * 2 * hidden * kv
    return {"flops_per_row_frame": total / frames, "linear_share": 2 * per_token_linear * tokens / total,
            "params_in_layers": params, "tokens": tokens}


def derive_gpu(measurements: dict[str, Any], command: str,
               source: str = "benchmarks/results/gpu_check-h200.json") -> dict[str, Any]:
    """gpu.json from gpu_check's H200 measurements: least-squares a, b per stage, and an H100 estimate."""
    phases = measurements["phases"]
    frames = phases["dit"]["latent_frames"]
    dit_points = [{"rows": rows, "frames": frames, "seconds": phases["dit"][f"same_b{rows}"]["median_ms"] / 1e3}
                  for rows in (1, 4, 8)]
    cond_points = [{"rows": 1, "frames": frames, "seconds": phases["condition"]["one"]["median_ms"] / 1e3},
                   {"rows": 8, "frames": frames, "seconds": phases["condition"]["batch8"]["median_ms"] / 1e3}]
    vae_s = phases["vae"]["decode"]["median_ms"] / 1e3
    # At one frame count, rows and rows x frames are proportional: each stage gets the one term its work follows.
    dit, cond = fit(dit_points, "ab"), fit(cond_points, "ac")
    codec = {"a": 0.0, "b": vae_s / frames, "c": 0.0}
    tokens = round(statistics.fmean(phases["dit"]["cond_tokens"]))
    flops = _dit_flops_per_row_frame(frames, tokens)
    h200, h100 = CARDS["H200 SXM"], CARDS["H100 SXM"]
    mfu = flops["flops_per_row_frame"] / (dit["b"] * h200["bf16_tflops"] * 1e12)
    weight_bytes = phases["build"]["params_m"]["transformer"] * 1e6 * 2  # bf16
    h100_dit_b = flops["flops_per_row_frame"] / (mfu * h100["bf16_tflops"] * 1e12)
    read_h200, read_h100 = weight_bytes / (h200["hbm_tb_s"] * 1e12), weight_bytes / (h100["hbm_tb_s"] * 1e12)
    h100_dit_a = dit["a"] - read_h200 + read_h100
    pcie_b = flops["flops_per_row_frame"] / (mfu * CARDS["H100 PCIe"]["bf16_tflops"] * 1e12)
    x = [p["rows"] * p["frames"] for p in dit_points]
    y = [round(p["seconds"] * 1e3, 1) for p in dit_points]
    c1, c8 = cond_points[0]["seconds"] * 1e3, cond_points[1]["seconds"] * 1e3
    c1_dit = dit_points[0]["seconds"]
    derivation = (
        f"Measured on one NVIDIA H200 (bf16 DiT and condition encoder, float32 VAE; torch 2.11, eager) by "
        f"benchmarks/gpu_check.py at {frames} latent frames (180 s). "
        f"DiT: one forward pass over 1/4/8 jobs of 1 output (turbo: no CFG, so rows = jobs): work x = rows x "
        f"frames = {x}, seconds y = {y} ms. Least squares: b = cov(x, y) / var(x) = {dit['b'] * 1e6:.4f} us per "
        f"row-frame, a = mean(y) - b x mean(x) = {dit['a'] * 1e3:.2f} ms (residuals {dit['residual_pct']} %). "
        f"(c = 0: at one frame count a per-row term cannot be told from b; the DiT's per-row work, the "
        f"cross-attention keys and values of ~{tokens} condition tokens, is ~2% of a row's FLOPs at 180 s.) "
        f"Condition: 1 job {c1:.1f} ms, 8 jobs {c8:.1f} ms, both at {frames} frames. Its work is text tokens (the "
        f"caption and lyrics), not audio frames, so it is fitted per row, b = 0: two points, exact: c = ({c8:.1f} - "
        f"{c1:.1f}) ms / 7 rows = {cond['c'] * 1e3:.2f} ms per row, a = {c1:.1f} ms - c = {cond['a'] * 1e3:.2f} ms "
        f"(the per-frame alternative, b = ({c8:.1f} - {c1:.1f}) ms / (7 x {frames}) = "
        f"{(c8 - c1) / 7 / frames * 1e3:.4f} us per row-frame, equals it at 180 s and would make shorter songs' rows "
        f"cheaper than the measurement supports). "
        f"AudioCodec decode: one point, {vae_s * 1e3:.1f} ms for 1 x {frames}: a = 0 (assumed: the tiled "
        f"convolutional decode's work is proportional to the audio; any fixed cost is folded into b), b = "
        f"{vae_s * 1e3:.1f} ms / {frames} = {codec['b'] * 1e6:.2f} us per frame. Encode (input audio): not "
        f"measured; the decode's coefficients. Condition tokens per job: {tokens} (the mean of the measured "
        f"prompts), hidden 2048: the size of each condition result that travels between replicas.")
    return {
        "name": "gpu",
        "description": "The full-size `turbo` model (2B DiT) with every stage on one card of its own: NVIDIA H200, "
                       "bf16, eager (no torch.compile: it halves the DiT step, see gpu_check's compile phase). "
                       "For H100 SXM, see h100_estimate: within a few percent.",
        "preset": "turbo",
        "cost_model": COST_MODEL,
        "costs": {stage: {t: round(coef[t], 12) for t in "abc"} for stage, coef in
                  (("condition", cond), ("dit", dit), ("codec", codec), ("encode", codec))},
        "shapes": {"condition_tokens": tokens},
        "workload": {"jobs": 96, "concurrency": 32, "durations": [60.0, 120.0, 180.0], "steps": 8, "outputs": 1,
                     "format": "wav", "max_batch_size": 8, "max_batch_frames": 36000,
                     "replicas": {"ConditionEncoder": 1, "DiT": 1, "AudioCodec": 2},
                     "note": "songs of 1-3 min; max_batch_frames 36000 = 8 jobs of 180 s in one DiT pass; two "
                             "AudioCodec replicas, as one decodes 180 s in 0.48 s while the DiT's share of a job in a "
                             "full batch is 8 steps x 41.7 ms = 0.33 s: with one, the VAE would be the bottleneck",
                     "autoscale": {"max_replicas": 4, "upscale_delay_s": 5.0}},
        "measurements": {"source": source, "card": phases["env"]["card"],
                         "dit_step_ms": {f"batch {r}": phases["dit"][f"same_b{r}"]["median_ms"] for r in (1, 4, 8)},
                         "condition_ms": {"1 job": phases["condition"]["one"]["median_ms"],
                                          "8 jobs": phases["condition"]["batch8"]["median_ms"]},
                         "vae_decode_180s_ms": phases["vae"]["decode"]["median_ms"], "latent_frames": frames},
        "fits": {"dit": dit, "condition": cond, "codec": {**codec, "residual_pct": "one point"}},
        "derivation": derivation,
        "h100_estimate": {
            "method": "FLOPs of the turbo DiT from its shape (models/presets.py: hidden 2048, MLP 6144, 24 layers, "
                      "16 query / 8 kv heads of 128, patch 2, sliding window 128 on half the layers, cross-attention "
                      f"to {tokens} condition tokens), the H200's measured b to get the achieved fraction of peak, "
                      "and the same fraction of the H100's published peak; a as measured, with the weights' read "
                      "time moved from the H200's HBM bandwidth to the H100's",
            "cards": CARDS,
            "dit_flops_per_row_frame": flops["flops_per_row_frame"],
            "dit_linear_share_of_flops": flops["linear_share"],
            "dit_params_in_layers": flops["params_in_layers"],
            "dit_weight_bytes_bf16": weight_bytes,
            "h200_fraction_of_bf16_peak": mfu,
            "compute_bound_b_at_100pct_peak_us": flops["flops_per_row_frame"] / (h100["bf16_tflops"] * 1e12) * 1e6,
            "weight_read_ms": {"H200": read_h200 * 1e3, "H100 SXM": read_h100 * 1e3},
            "H100 SXM": {"dit": {"a": h100_dit_a, "b": h100_dit_b},
                         "note": "the H100 SXM has the H200's compute (same GH100, 132 SMs, same clocks) and 70% of "
                                 "its memory bandwidth: the DiT at these sizes is compute bound (weights read in "
                                 f"{read_h100 * 1e3:.2f} ms of a {c1_dit * 1e3:.0f} ms pass), so within "
                                 "a few percent of the H200; the float32 VAE decode is closer to memory bound: up to "
                                 f"x{h200['hbm_tb_s'] / h100['hbm_tb_s']:.2f} slower at most"},
            "H100 PCIe": {"dit": {"a": dit["a"] - read_h200 + weight_bytes / (CARDS["H100 PCIe"]["hbm_tb_s"] * 1e12),
                                  "b": pcie_b}},
            "h100_sxm_dit_step_ms_at_180s": {f"batch {rows}": 1e3 * (h100_dit_a + h100_dit_b * rows * frames)
                                             for rows in (1, 4, 8)},
            "h100_sxm_floor_dit_step_ms_at_180s": {
                f"batch {rows}": 1e3 * (read_h100 + rows * frames * flops["flops_per_row_frame"]
                                        / (h100["bf16_tflops"] * 1e12)) for rows in (1, 4, 8)},
            "cross_check": (
                f"Independently of the H200 measurement, the FLOPs give b >= "
                f"{flops['flops_per_row_frame'] / (h100['bf16_tflops'] * 1e12) * 1e6:.2f} us per row-frame on an H100 "
                f"SXM at 100% of its bf16 peak, {flops['flops_per_row_frame'] / (0.5 * h100['bf16_tflops'] * 1e12) * 1e6:.2f}"
                f"-{flops['flops_per_row_frame'] / (0.35 * h100['bf16_tflops'] * 1e12) * 1e6:.2f} us at the 35-50% a "
                f"tuned bf16 transformer reaches; the measured eager b ({dit['b'] * 1e6:.2f} us) is {100 * mfu:.0f}% "
                f"of peak, and gpu_check's torch.compile (x{measurements['phases'].get('compile', {}).get('speedup', 2.0):.2f})"
                f" would bring it to ~{100 * mfu * measurements['phases'].get('compile', {}).get('speedup', 2.0):.0f}%. "
                f"a >= the weights' read time ({read_h100 * 1e3:.2f} ms on an H100 SXM, {weight_bytes / 1e9:.2f} GB "
                f"at {h100['hbm_tb_s']} TB/s); the measured {dit['a'] * 1e3:.1f} ms is kernel launches and small "
                f"ops, not bandwidth, so the H100 SXM keeps it. So an H100 SXM runs this cost file within a few "
                f"percent (PCIe: b x{h100['bf16_tflops'] / CARDS['H100 PCIe']['bf16_tflops']:.2f})."),
        },
        "command": command,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.simulate",
                                     description="Write the simulation's cost files (deployments/sim_costs/).")
    sub = parser.add_subparsers(dest="command", required=True)
    cal = sub.add_parser("calibrate", help="fit a, b per stage on this machine's CPU (1 torch thread)")
    cal.add_argument("--preset", default="small")
    cal.add_argument("--out", default=str(SIM_COSTS_DIR / "cpu.json"))
    gpu = sub.add_parser("derive-gpu", help="fit a, b per stage from gpu_check's H200 measurements")
    gpu.add_argument("--measurements", default="benchmarks/results/gpu_check-h200.json")
    gpu.add_argument("--out", default=str(SIM_COSTS_DIR / "gpu.json"))
    gpu.add_argument("--source", default=None, help="what to record as the measurements' source (default: the path)")
    args = parser.parse_args(argv)
    command = "python -m deployments.simulate " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.command == "calibrate":
        data = calibrate_file(args.preset, command)
    else:
        data = derive_gpu(json.loads(Path(args.measurements).read_text()), command,
                          args.source or args.measurements)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(f"{LABEL} wrote {args.out}: " + json.dumps(data["costs"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
