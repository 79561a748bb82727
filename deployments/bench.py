"""`acestep-bench`: throughput, latency, ETA accuracy and memory of the served pipeline, measured side by side.

It starts its own Ray and the application (one replica per stage, no autoscaling, so every variant has the same
replicas), then, on the same preset and the same job mix:

1. runs the in-process `diffusers.AceStepPipeline` one job at a time and writes each file (upstream's policy): the
   sequential baseline, and the single-job latency;
2. runs one job alone through HTTP + Serve: `overhead_ratio` against (1);
3. drives the app over loopback HTTP at `--concurrency` clients with step-level batching, with whole-request
   batching, and with `max_batch_size: 1` in every stage (retuned in place through `user_config`).

Prints one table and one JSON line (prefixed `BENCH_JSON `). Machines here are shared and noisy: compare ratios
from one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from jobs.schemas import AUDIO_FORMATS

CAPTIONS = ["lofi", "upbeat synth pop with a driving bassline", "acoustic guitar ballad, warm and intimate vocals",
            "cinematic orchestral score with strings, brass and timpani building to a climax"]
LYRICS = ["", "[verse]\nla la la", "[verse]\nwalking down the empty street\n[chorus]\nhold on, hold on"]


def job_mix(count: int, durations: list[float], steps: int, outputs: int, fmt: str) -> list[dict[str, Any]]:
    """Deterministic jobs with different durations, prompt lengths and lyrics."""
    return [{"caption": CAPTIONS[i % len(CAPTIONS)], "lyrics": LYRICS[i % len(LYRICS)],
             "audio_duration": durations[i % len(durations)], "inference_steps": steps, "batch_size": outputs,
             "seed": 1000 + i, "audio_format": fmt} for i in range(count)]


def _stage_options(batch: int, frames: int, scheduling: str) -> dict[str, dict]:
    fixed = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}
    return {"ConditionEncoder": {**fixed, "user_config": {"max_batch_size": batch, "batch_wait_timeout_s": 0.02}},
            "DiT": {**fixed, "max_ongoing_requests": max(32, 4 * batch),  # a round holds 2 x batch, and more wait
                    "user_config": {"max_batch_size": batch, "max_batch_frames": frames, "batch_wait_timeout_s": 0.05,
                                    "scheduling": scheduling}},
            "AudioCodec": {**fixed, "max_ongoing_requests": max(16, 2 * batch),
                           "user_config": {"max_batch_size": min(batch, 4), "max_batch_frames": frames,
                                           "batch_wait_timeout_s": 0.02}}}


class MemorySampler:
    """Peak summed RSS of this process's descendants: the whole local Ray cluster and the app's replicas."""

    def __init__(self, interval: float = 0.5):
        import psutil

        self.root, self.interval, self.peak_mib = psutil.Process(), interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for child in self.root.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except Exception:  # exited meanwhile
                    pass
            self.peak_mib = max(self.peak_mib, total / 2**20)
            self._stop.wait(self.interval)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mib


# -- the in-process baseline -----------------------------------------------------------------------------------------
class SequentialBaseline:
    """Upstream's policy in this process: each job through `AceStepPipeline(...)` and into a file, one at a time.

    Every module in `dtype` on the default device (cuda when available), VAE included, as upstream's
    `AceStepPipeline.from_pretrained(..., torch_dtype=dtype).to("cuda")` runs: the pipeline hands the VAE latents in
    the DiT's dtype, so a float32 VAE under a bf16 DiT would fail there (the served codec stage casts them itself).
    """

    def __init__(self, preset: str, out_dir: Path, dtype: str = "float32"):
        from diffusers import AceStepPipeline

        from models.loading import ModelConfig, load_components

        self.pipe = AceStepPipeline(**load_components(ModelConfig(preset=preset, dtype=dtype), [
            "vae", "text_encoder", "tokenizer", "transformer", "condition_encoder", "scheduler", "audio_tokenizer",
            "audio_token_detokenizer"]))
        self.pipe.set_progress_bar_config(disable=True)
        self.out_dir = out_dir

    def run(self, jobs: list[dict], threads: int) -> list[float]:
        """Seconds per job, on `threads` torch threads, after one warm-up job."""
        import torch

        torch.set_num_threads(threads)
        self._one(jobs[0], -1)
        return [self._one(job, i) for i, job in enumerate(jobs)]

    def _one(self, job: dict, index: int) -> float:
        import torch

        from models.audio_io import FORMATS, encode_audio

        start, n, rate = time.perf_counter(), job["batch_size"], self.pipe.vae.config.sampling_rate
        generator = [torch.Generator().manual_seed(job["seed"] + k) for k in range(n)]
        audio = self.pipe(prompt=[job["caption"]] * n, lyrics=[job["lyrics"]] * n,
                          audio_duration=job["audio_duration"], num_inference_steps=job["inference_steps"],
                          generator=generator).audios.float().cpu().numpy()  # .cpu(): waits for a GPU too
        for k, waveform in enumerate(audio):
            (self.out_dir / f"seq-{index}-{k}.{FORMATS[job['audio_format']].extension}").write_bytes(
                encode_audio(waveform[..., : round(job["audio_duration"] * rate)], rate, job["audio_format"]))
        return time.perf_counter() - start


# -- the served pipeline ---------------------------------------------------------------------------------------------
def timeline_gaps(timeline: dict[str, Any]) -> dict[str, float]:
    """A job's timeline as consecutive gaps, in seconds: `queue` (submitted -> leased), then per stage `<stage>.in`
    (the driver sent the call -> it arrived), `.wait` (arrived -> its batch started), `.compute` (started ->
    finished), `.write` (decode only: finished -> files written), `.out` (finished or written -> the driver has the
    answer), `driver` time between stages (returned -> next sent, and leased -> first sent), and `finish` (the
    last answer -> the registry has the result)."""
    gaps: dict[str, float] = {"queue": timeline["leased"] - timeline["submitted"]}
    last = timeline["leased"]
    for name, t in timeline["stages"].items():
        gaps["driver"] = gaps.get("driver", 0.0) + t["sent"] - last
        gaps[f"{name}.in"] = t["arrived"] - t["sent"]
        gaps[f"{name}.wait"] = t["started"] - t["arrived"]
        gaps[f"{name}.compute"] = t["finished"] - t["started"]
        done = t["finished"]
        if "written" in t:
            gaps[f"{name}.write"], done = t["written"] - t["finished"], t["written"]
        gaps[f"{name}.out"] = t["returned"] - done
        last = t["returned"]
    gaps["finish"] = timeline["finished"] - last
    return gaps


def _medians(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return {key: statistics.median(row[key] for row in rows if key in row) for key in keys}


async def drive(url: str, jobs: list[dict], concurrency: int, poll_s: float = 0.0) -> dict[str, Any]:
    """`concurrency` clients submit and follow their job until it is done: with long-polls (`?wait=`, answered
    on every change) when `poll_s` is 0, else polling every `poll_s`. Per job: latency, the ETA seen at the first
    look against the wait that followed, the timeline's gaps and the Ray calls it cost."""
    import httpx

    queue = list(enumerate(jobs))
    records: list[dict[str, Any]] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue:
            index, job = queue.pop(0)
            submitted = time.time()
            while True:
                response = await client.post("/v1/music/generate", json=job)
                if response.status_code != 429:
                    break
                await asyncio.sleep(0.5)
            response.raise_for_status()
            job_id = response.json()["job_id"]
            first = None
            while True:
                polled = time.time()
                wait = 0 if first is None or poll_s else 30
                view = (await client.get(f"/v1/jobs/{job_id}", params={"wait": wait})).json()
                first = first or (polled, view)
                if view["status"] in ("succeeded", "failed", "canceled"):
                    break
                if poll_s:
                    await asyncio.sleep(poll_s)
            if view["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} {view['status']}: {view['error']}")
            timeline = view["result"]["timeline"]
            record = {"index": index, "latency": time.time() - submitted, "stages": view["result"]["stage_seconds"],
                      "finished": time.time(), "gaps": timeline_gaps(timeline), "ray_calls": timeline["ray_calls"],
                      "lm_tokens": view["result"].get("lm", {}).get("tokens")}
            polled, first_view = first
            if first_view["status"] == "queued" and first_view["eta_seconds"]:
                record["eta"] = (first_view["eta_seconds"], view["started_at"] - polled,
                                 first_view["queue_position"], polled - start)
            records.append(record)

    start = time.time()
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    elapsed = max(r["finished"] for r in records) - start
    latencies = sorted(r["latency"] for r in records)
    pairs = [r["eta"] for r in records if "eta" in r and r["eta"][1] > 0]
    etas = [abs(predicted - actual) / actual for predicted, actual, *_ in pairs]
    stages = {name: statistics.median(r["stages"].get(name, 0.0) for r in records)
              for name in ("lm", "condition", "diffusion", "decode")
              if name != "lm" or any("lm" in r["stages"] for r in records)}
    ray_calls = _medians([r["ray_calls"] for r in records])
    return {"jobs": len(records), "seconds": elapsed, "jobs_per_s": len(records) / elapsed,
            "p50_s": _quantile(latencies, 0.5), "p95_s": _quantile(latencies, 0.95),
            "eta_error_median": statistics.median(etas) if etas else None, "eta_samples": len(etas),
            "eta_samples_s": sorted(([round(x, 3) for x in (at, predicted, actual)] + [position]
                                     for predicted, actual, position, at in pairs)),
            "eta_predicted_vs_actual_median_s": [statistics.median(p[0] for p in pairs),
                                                 statistics.median(p[1] for p in pairs)] if pairs else None,
            "stage_median_s": stages, "timeline_median_s": _medians([r["gaps"] for r in records]),
            **({"lm_tokens_median": statistics.median(t)} if (t := [r["lm_tokens"] for r in records
                                                                    if r["lm_tokens"]]) else {}),
            "ray_calls_per_job_median": {**ray_calls, "total": sum(ray_calls.values())}}


def _quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument("--gpu-check", action="store_true")
    early.add_argument("--lm", action="store_true")
    known, rest = early.parse_known_args(argv)
    if known.gpu_check:  # every other argument is benchmarks/gpu_check.py's
        from benchmarks.gpu_check import main as gpu_check

        return gpu_check(rest)
    if known.lm:  # likewise benchmarks/lm_throughput.py's
        from benchmarks.lm_throughput import main as lm_throughput

        return lm_throughput(rest)
    parser = argparse.ArgumentParser(prog="acestep-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu-check", action="store_true", help="run the one-shot GPU check instead "
                        "(benchmarks/gpu_check.py: in-process phases, then the app over HTTP); the other arguments "
                        "are its own: see `acestep-bench --gpu-check --help`")
    parser.add_argument("--preset", default="small", help="tiny, small (CPU), turbo / base / xl-turbo (GPU)")
    parser.add_argument("--jobs", type=int, default=32, help="jobs per load phase")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent HTTP clients (the default: every "
                        "job at once, a burst that the pipeline's slots cannot all take, so jobs wait in line)")
    parser.add_argument("--durations", default="10,15,20", help="seconds of audio, cycled over the jobs")
    parser.add_argument("--steps", type=int, default=8, help="inference_steps of every job")
    parser.add_argument("--outputs", type=int, default=1, help="batch_size (outputs) of every job")
    parser.add_argument("--format", default="wav", choices=AUDIO_FORMATS)
    parser.add_argument("--max-batch-size", type=int, default=8, help="jobs per batch with batching on")
    parser.add_argument("--max-batch-frames", type=int, default=12000, help="DiT / codec frame budget")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of each stage (default: Ray's, 1 per num_cpus: 0 replica; more "
                        "oversubscribes a small CPU when stages overlap). The baseline always uses all cores.")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--poll-s", type=float, default=0.0, help="each client's poll interval under load; 0 (the "
                        "default): long-polls (`?wait=`), answered on every change of the job")
    parser.add_argument("--sequential-jobs", type=int, default=None, help="baseline jobs (default: --jobs)")
    parser.add_argument("--simulate", metavar="NAME_OR_PATH", default=None, help="capacity simulation instead: the "
                        "real app with stages that sleep a cost model's time (cpu, gpu or a cost file's path; "
                        "deployments/simulate.py). The options above it gives change its workload")
    parser.add_argument("--lm", action="store_true", help="measure the 5 Hz LM's tokens/s instead, one job at a "
                        "time and continuously batched in one run (benchmarks/lm_throughput.py; see "
                        "`acestep-bench --lm --help`)")
    parser.add_argument("--control-plane", action="store_true", help="measure polls and submissions through the "
                        "HTTP front door instead (deployments/bench_control.py; its options are the --cp-* ones)")
    from deployments import bench_control

    bench_control.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.simulate:
        from deployments.simulate import run as simulate

        return simulate(args, parser)
    if args.control_plane:
        bench_control.run(args)
        return 0

    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import httpx
    import ray
    from ray import serve

    from deployments.app import build_graph
    from deployments.simulate import CpuMeter

    threads = args.threads
    durations = [float(d) for d in args.durations.split(",")]
    jobs = job_mix(args.jobs, durations, args.steps, args.outputs, args.format)
    work = Path(tempfile.mkdtemp(prefix="acestep-bench-"))
    results: dict[str, Any] = {"preset": args.preset, "jobs": args.jobs, "concurrency": args.concurrency,
                               "durations": durations, "steps": args.steps, "outputs": args.outputs,
                               "format": args.format, "threads": threads}
    memory = MemorySampler()

    def measure_baseline(when: str) -> dict[str, float]:
        """Upstream's policy, in this process, with no Ray running: one job at a time."""
        print(f"[bench] sequential AceStepPipeline ({when}), {args.sequential_jobs or args.jobs} jobs ...",
              file=sys.stderr)
        baseline = SequentialBaseline(args.preset, work, args.dtype)
        sequential = baseline.run(jobs[: args.sequential_jobs or args.jobs], os.cpu_count())
        return {"sequential_jobs_per_s": len(sequential) / sum(sequential),
                "pipeline_latency_s": statistics.median(baseline.run([jobs[0]] * 3, os.cpu_count())),
                # The same, on the threads one stage gets: what the serving path adds, apart from the thread count.
                "pipeline_latency_stage_threads_s": statistics.median(baseline.run([jobs[0]] * 3, threads or 1))}

    # 1. The baseline before Ray starts; again after it stops (below), and the ratios use the mean of the two: this
    # box's speed drifts within a run, and a baseline on one side of the served phases only would carry that drift.
    baseline_before = measure_baseline("before the app")

    port = _free_port()
    # Ray renices its workers to 15; the baseline above ran at 0. At 15 the replicas (a 2-thread torch team on 2 cores
    # above all) lose the CPUs to any nice-0 process, this one's HTTP clients included: next to one busy loop a DiT
    # forward took 5.1 s at 15 against 0.36 s at 0 (benchmarks/worker_forward.py --busy 1). Same priority, fair test.
    os.environ.setdefault("RAY_worker_niceness", "0")  # inherited by the raylet this starts, so by every worker
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/bench"
    app_args = {"name": "bench",
                "model": {"preset": args.preset, "dtype": args.dtype,
                          "stages": {stage: {"threads": threads} for stage in ("condition", "dit", "codec")
                                     if threads}},
                "queue": {"max_queued_jobs": 10 * args.jobs + 10, "max_running_jobs": 64},
                "files": {"output_dir": str(work / "results"), "upload_dir": str(work / "uploads"),
                          "journal_path": None}}

    def deploy(batch: int, scheduling: str) -> None:
        from jobs.step_scheduler import StepSchedulingConfig

        options = _stage_options(batch, args.max_batch_frames, scheduling)
        dit_slots = StepSchedulingConfig.model_validate(options["DiT"]["user_config"]).round_jobs
        serve.run(build_graph(app_args, options), name="bench", route_prefix="/bench", blocking=False)
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                stats = httpx.get(url + "/v1/stats", timeout=5).json()
                slots = {s: v["slots"] for s, v in stats.get("stages", {}).items()}
                # user_config applied everywhere, and the registry has the new slots
                if slots.get("dit") == dit_slots and slots.get("codec") == min(batch, 4):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        raise TimeoutError("the bench app did not come up")

    try:  # every phase's audio files are removed at the end: hundreds of MB
        try:
            print("[bench] starting the app ...", file=sys.stderr)
            deploy(args.max_batch_size, "step")
            asyncio.run(drive(url, jobs[:4], 4))  # warm-up: first requests through every hop
            # 2. One job alone, end to end, followed by long-polls.
            alone = [asyncio.run(drive(url, [jobs[0]], 1)) for _ in range(3)]
            results["served_latency_s"] = statistics.median(run["seconds"] for run in alone)
            results["timeline_single_job_s"] = _medians([run["timeline_median_s"] for run in alone])
            # A short load before the measured ones, as a service in use has always had: what the ETA reads (the
            # DiT's pass cost fit, the decoder's seconds per job) then comes from a loaded pipeline, not only from the
            # jobs above, run alone. On this 2-core box a job's DiT engine time under load was 1.5x and its decode
            # about 2x the time alone (the stages share the cores), which made the first-look ETAs of a burst 20-30 %
            # short.
            asyncio.run(drive(url, jobs[:8], 8))
            # 3. Load, three ways, same replicas.
            phases = {}
            for name, batch, scheduling in (("step", args.max_batch_size, "step"),
                                            ("request", args.max_batch_size, "request"), ("unbatched", 1, "step")):
                print(f"[bench] load phase {name} ...", file=sys.stderr)
                deploy(batch, scheduling)
                before = (time.time(), httpx.get(url + "/v1/stats", timeout=10).json()["stages"])
                cpu = CpuMeter()
                phases[name] = asyncio.run(drive(url, jobs, args.concurrency, args.poll_s))
                phases[name]["cpu"] = cpu.stop()
                time.sleep(1.5)  # the stages' last load reports (every second) reach the registry
                phases[name]["busy"] = _busy(before, (time.time(), httpx.get(url + "/v1/stats", timeout=10).json()[
                    "stages"]), phases[name]["seconds"])
            results["phases"] = phases
        finally:
            serve.shutdown()
            ray.shutdown()
            results["peak_rss_mib"] = round(memory.stop())
        baseline_after = measure_baseline("after the app")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    pairs = {key: [baseline_before[key], baseline_after[key]] for key in baseline_before}
    results.update({key: (first + second) / 2 for key, (first, second) in pairs.items()}, baseline_before_after=pairs)

    best = max(("step", "request"), key=lambda name: phases[name]["jobs_per_s"])
    results.update({
        "throughput_ratio_vs_sequential": phases["step"]["jobs_per_s"] / results["sequential_jobs_per_s"],
        "batching_gain": phases["step"]["jobs_per_s"] / phases["unbatched"]["jobs_per_s"],
        "step_vs_request_scheduling": phases["step"]["jobs_per_s"] / phases["request"]["jobs_per_s"],
        "overhead_ratio": results["served_latency_s"] / results["pipeline_latency_s"],
        "overhead_ratio_same_threads": results["served_latency_s"] / results["pipeline_latency_stage_threads_s"],
        "eta_error_median": phases["step"]["eta_error_median"], "faster_scheduling": best,
        "timeline": phases["step"]["timeline_median_s"],
        "ray_calls_per_job": phases["step"]["ray_calls_per_job_median"],
    })
    print(render(results))
    print("BENCH_JSON " + json.dumps(results, default=lambda v: round(v, 4) if isinstance(v, float) else v))
    return 0


def _busy(before: tuple[float, dict], after: tuple[float, dict], seconds: float) -> dict[str, float]:
    """Each stage's engine time over a load phase, as a fraction of the phase per replica: the engine thread's busy
    seconds (reported by the replicas) divided by the phase's seconds. A stage near 1 is the bottleneck."""
    return {stage: (after[1][stage]["busy_s"] - before[1].get(stage, {}).get("busy_s", 0.0))
            / seconds / max(1, after[1][stage]["replicas"]) for stage in after[1]}


def render(r: dict[str, Any]) -> str:
    lines = [f"acestep-bench preset={r['preset']} jobs={r['jobs']} concurrency={r['concurrency']} "
             f"durations={r['durations']} steps={r['steps']} outputs={r['outputs']} format={r['format']} "
             f"stage threads={r['threads'] or 'Ray default'}",
             f"{'variant':<28}{'jobs/s':>8}{'p50 s':>8}{'p95 s':>8}{'eta err':>9}  stage medians (s)"]
    lines.append(f"{'sequential AceStepPipeline':<28}{r['sequential_jobs_per_s']:>8.3f}"
                 f"{r['pipeline_latency_s']:>8.2f}{'':>8}{'':>9}  (single job, in process, all cores; "
                 f"{r['pipeline_latency_stage_threads_s']:.2f} s on a stage's threads)")
    drift = r["baseline_before_after"]
    lines.append(f"{'':<28}(the mean of two runs, before the app / after it: "
                 + ", ".join(f"{key} {a:.3f} / {b:.3f}" for key, (a, b) in drift.items()) + ")")
    for name, p in r["phases"].items():
        eta = f"{p['eta_error_median']:.3f}" if p["eta_error_median"] is not None else "-"
        stages = " ".join(f"{k} {v:.2f}" for k, v in p["stage_median_s"].items())
        busy = " ".join(f"{k} {v:.2f}" for k, v in p.get("busy", {}).items())
        lines.append(f"{'served, ' + name:<28}{p['jobs_per_s']:>8.3f}{p['p50_s']:>8.2f}{p['p95_s']:>8.2f}"
                     f"{eta:>9}  {stages}; engines busy: {busy}")
        if "cpu" in p:
            roles = ", ".join(f"{e['role'].removeprefix('ray::ServeReplica:bench:')} {e['cores']:.2f}"
                              for e in p["cpu"]["by_role"][:8])
            lines.append(f"{'':<28}cores busy {p['cpu']['machine_busy_cores']:.2f} of {p['cpu']['cores']}: {roles}")
            waits = ", ".join(f"{e['role'].removeprefix('ray::ServeReplica:bench:')} "
                              f"{e.get('waiting_for_a_core', 0.0):.2f}" for e in p["cpu"]["by_role"][:4])
            lines.append(f"{'':<28}ready but waiting for a core (cores' worth): {waits}")
    lines.append(f"served single job: {r['served_latency_s']:.2f} s; peak RSS of the app and Ray: "
                 f"{r['peak_rss_mib']} MiB")
    lines.append(f"timeline, median seconds per gap (single job | under load, step phase); Ray calls per job under "
                 f"load: {r['ray_calls_per_job']}")
    single, loaded = r["timeline_single_job_s"], r["timeline"]
    for key in dict.fromkeys([*single, *loaded]):
        lines.append(f"  {key:<26}{single.get(key, float('nan')):>9.3f}{loaded.get(key, float('nan')):>9.3f}")
    for key in ("throughput_ratio_vs_sequential", "batching_gain", "step_vs_request_scheduling", "overhead_ratio",
                "overhead_ratio_same_threads", "eta_error_median"):
        value = r[key]
        lines.append(f"{key:<32}{value:.3f}" if value is not None else f"{key:<32}-")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
