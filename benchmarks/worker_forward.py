"""One `DiTEngine.step` forward pass in a plain process and in a Ray worker, interleaved, on the same threads.

    python -m benchmarks.worker_forward [--threads 2] [--rounds 15] [--reps 5] [--seconds 15] [--busy 0]
                                        [--variants plain-main,plain-engine,...]

Every variant is its own process holding the `small` DiT engine and one realistic job (one output of --seconds of
audio, conditions from the `small` ConditionEngine for a real caption and lyrics). The driver then runs --rounds
rounds; in each, every variant (in a rotated order) times --reps forward passes (`DiTEngine.step` on a fresh state,
timed where it runs, so no RPC is counted). The variants (default: plain-main, plain-engine, plain-engine-nice15,
ray-engine, ray-engine-nice0):

  plain-main            a plain Python process (no Ray), torch on its main thread
  plain-engine          a plain process, torch on an `EngineGuard` thread (what `deployments.stage` does)
  plain-second          a plain process that built the engine on its main thread, timed on an `EngineGuard` thread:
                        the second thread to enter OpenMP
  plain-engine-nice15   plain-engine, the process reniced to 15 first (Ray's default worker niceness)
  plain-engine-arena1   plain-engine with MALLOC_ARENA_MAX=1 (the engine thread allocates from glibc's main arena)
  ray-engine            a Ray actor (num_cpus=0, async), torch on an `EngineGuard` thread: a Serve stage replica
  ray-engine-nice0      ray-engine with runtime_env `RAY_worker_niceness=0`, so the worker is not reniced
  ray-engine-omp        ray-engine with runtime_env `OMP_NUM_THREADS=<threads>` instead of Ray's 1
  ray-engine-arena1     ray-engine with runtime_env `MALLOC_ARENA_MAX=1`
  ray-loop              a Ray actor, torch on the actor's own (event-loop) thread, no executor

--busy N runs N busy-loop processes (nice 0) during the measurement: a known competitor for the CPUs, the same for
every variant. A round's medians go to stderr as it ends. Each variant then gets one line: forward time (median, min,
quartiles), the median of the per-round ratios to the first variant and their IQR (paired, so that load from other
processes on a shared machine cancels out as far as it can), CPU time of the calling thread and of the process, the
run-queue wait (runnable, no CPU) and times scheduled in of the process's threads, and minor page faults (medians per
forward, from /proc/self/task/*/schedstat and /proc/self/stat), and the process's set-up (nice value of the engine
thread, OMP_NUM_THREADS, torch threads, CPU affinity, threads, preloaded allocators). Then one
`WORKER_FORWARD_JSON {...}` line. Compare variants of one run only, never across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASE_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # serve_config.yaml's runtime_env
# name: (process, thread torch runs on, niceness of a plain process, environment variables)
VARIANTS: dict[str, tuple[str, str, int, dict[str, str]]] = {
    "plain-main": ("plain", "main", 0, {}),
    "plain-engine": ("plain", "engine", 0, {}),
    "plain-second": ("plain", "second", 0, {}),
    "plain-engine-nice15": ("plain", "engine", 15, {}),
    "plain-engine-arena1": ("plain", "engine", 0, {"MALLOC_ARENA_MAX": "1"}),
    "ray-engine": ("ray", "engine", 0, {}),
    "ray-engine-nice0": ("ray", "engine", 0, {"RAY_worker_niceness": "0"}),
    "ray-engine-omp": ("ray", "engine", 0, {"OMP_NUM_THREADS": "{threads}"}),
    "ray-engine-arena1": ("ray", "engine", 0, {"MALLOC_ARENA_MAX": "1"}),
    "ray-loop": ("ray", "loop", 0, {}),
}
DEFAULT_VARIANTS = ["plain-main", "plain-engine", "plain-engine-nice15", "ray-engine", "ray-engine-nice0"]
CAPTION = "upbeat synth pop with a driving bassline and bright female vocals"
LYRICS = ("[verse]\nwalking down the empty street, the city lights are fading slow\n"
          "[chorus]\nhold on, hold on, we are never letting go\n") * 3


def make_condition(seconds: float):
    """A realistic `ConditionResult`: the `small` ConditionEngine's output for a real caption and lyrics."""
    from models.condition import ConditionEngine, ConditionRequest
    from models.loading import ModelConfig

    engine = ConditionEngine(ModelConfig(preset="small", device="cpu"))
    [condition] = engine.encode([ConditionRequest(caption=CAPTION, lyrics=LYRICS, audio_duration=seconds)])
    return condition


def counters() -> tuple[float, float, int, int]:
    """This process, summed over its threads: seconds on a CPU, seconds runnable but waiting for one, times scheduled
    in (/proc/self/task/*/schedstat), and minor page faults (/proc/self/stat)."""
    cpu = wait = slices = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/schedstat").read_text().split()
        except OSError:  # a thread that just ended
            continue
        cpu, wait, slices = cpu + int(fields[0]), wait + int(fields[1]), slices + int(fields[2])
    minflt = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[7])
    return cpu / 1e9, wait / 1e9, slices, minflt


class ForwardBench:
    """The `small` DiT engine and one job; `time(reps)` times `reps` forward passes on the calling thread."""

    def __init__(self, condition: Any):
        from models.dit import DiTEngine, DiTRequest
        from models.loading import ModelConfig

        self.engine = DiTEngine(ModelConfig(preset="small", device="cpu"))
        self.request = DiTRequest(condition=condition, seeds=[0], num_inference_steps=8)
        self.time(2)  # warm-up

    def time(self, reps: int) -> list[tuple[float, ...]]:
        """Per forward: wall seconds, CPU seconds of the calling thread, then the deltas of `counters()`."""
        out = []
        for _ in range(reps):
            state = self.engine.start(self.request)
            before = counters()
            start, own = time.perf_counter(), time.thread_time()
            self.engine.step([state])
            wall, own = time.perf_counter() - start, time.thread_time() - own
            out.append((wall, own, *(b - a for a, b in zip(before, counters()))))
        return out

    @staticmethod
    def context() -> dict[str, Any]:
        """How the calling thread and its process are set up."""
        import torch

        maps = Path("/proc/self/maps").read_text().splitlines()
        libs = sorted({line.split()[-1].rsplit("/", 1)[-1] for line in maps if ".so" in line.split()[-1]})
        return {"pid": os.getpid(), "nice": os.nice(0), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                "torch_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
                "affinity": sorted(os.sched_getaffinity(0)), "process_threads": len(os.listdir("/proc/self/task")),
                "allocators": [lib for lib in libs if any(k in lib for k in ("jemalloc", "tcmalloc", "mimalloc"))],
                "LD_PRELOAD": os.environ.get("LD_PRELOAD"), "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX"),
                "maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


async def _guarded(threads: int, condition: Any) -> tuple[Any, Any]:
    from deployments.stage import EngineGuard

    guard = EngineGuard("dit", threads)
    return guard, await guard.run(ForwardBench, condition)


def _plain_child(conn: Any, thread: str, threads: int, nice: int, condition: Any) -> None:
    """A plain process: waits for `reps`, answers the forward times; `None` ends it. `thread`: where torch runs:
    `main`, `engine` (an `EngineGuard` thread, as in a replica) or `second` (built and warmed up on the main thread,
    then timed on an `EngineGuard` thread: the second thread to enter OpenMP)."""
    sys.path.insert(0, str(ROOT))
    if nice:
        os.nice(nice)

    async def serve() -> None:
        if thread == "engine":
            guard, bench = await _guarded(threads, condition)
        else:
            import torch

            from deployments.stage import EngineGuard

            torch.set_num_threads(threads)
            bench = ForwardBench(condition)
            guard = EngineGuard("dit", threads) if thread == "second" else None

        async def run(fn, *args):
            return await guard.run(fn, *args) if guard else fn(*args)

        conn.send(await run(ForwardBench.context))
        while (reps := conn.recv()) is not None:
            conn.send(await run(bench.time, reps))

    asyncio.run(serve())


class PlainVariant:
    def __init__(self, thread: str, threads: int, nice: int, env: dict[str, str], condition: Any):
        self.conn, child = mp.get_context("spawn").Pipe()
        self.proc = mp.get_context("spawn").Process(target=_plain_child, daemon=True,
                                                    args=(child, thread, threads, nice, condition))
        saved = dict(os.environ)
        os.environ.update(env)  # glibc reads MALLOC_* at start-up: the child must inherit them
        try:
            self.proc.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def context(self) -> dict:
        return self.conn.recv()

    def time(self, reps: int) -> list[float]:
        self.conn.send(reps)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(30)


def _actor_class():
    import ray

    @ray.remote(num_cpus=0)
    class ForwardActor:
        """Async like a Serve replica; torch on an `EngineGuard` thread, or (`engine_thread=False`) on the loop's."""

        def __init__(self, engine_thread: bool, threads: int):
            self.engine_thread, self.threads = engine_thread, threads

        async def setup(self, condition: Any) -> dict:
            if self.engine_thread:
                self.guard, self.bench = await _guarded(self.threads, condition)
                return await self.guard.run(ForwardBench.context)
            import torch

            torch.set_num_threads(self.threads)
            self.bench = ForwardBench(condition)
            return ForwardBench.context()

        async def time(self, reps: int) -> list[float]:
            if self.engine_thread:
                return await self.guard.run(self.bench.time, reps)
            return self.bench.time(reps)

    return ForwardActor


class RayVariant:
    def __init__(self, engine_thread: bool, threads: int, env: dict[str, str], condition: Any):
        import ray

        self.ray = ray
        self.actor = _actor_class().options(runtime_env={"env_vars": {**BASE_ENV, **env}}).remote(engine_thread,
                                                                                                   threads)
        self.ready = self.actor.setup.remote(condition)

    def context(self) -> dict:
        return self.ray.get(self.ready)

    def time(self, reps: int) -> list[float]:
        return self.ray.get(self.actor.time.remote(reps))

    def close(self) -> None:
        self.ray.kill(self.actor)


def make_variant(name: str, threads: int, condition: Any):
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {list(VARIANTS)}")
    kind, thread, nice, env = VARIANTS[name]
    env = {k: v.format(threads=threads) for k, v in env.items()}
    if kind == "plain":
        return PlainVariant(thread, threads, nice, env, condition)
    return RayVariant(thread == "engine", threads, env, condition)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every variant (default 2)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reps", type=int, default=5, help="forward passes per variant per round")
    parser.add_argument("--seconds", type=float, default=15.0, help="audio length of the job (25 frames per s)")
    parser.add_argument("--busy", type=int, default=0, help="busy-loop processes (nice 0) running during the "
                        "measurement: a known competitor for the CPUs, the same for every variant (default 0)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, the first is "
                        f"the reference; of {', '.join(VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)})")
    args = parser.parse_args()
    names = args.variants.split(",")
    if args.rounds * args.reps < 2:
        parser.error("need at least 2 forward passes per variant (--rounds x --reps)")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.update(BASE_ENV)
    sys.path.insert(0, str(ROOT))

    condition = make_condition(args.seconds)
    if any(n.startswith("ray-") for n in names):
        import ray

        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": BASE_ENV})
    variants = {name: make_variant(name, args.threads, condition) for name in names}
    contexts = {name: v.context() for name, v in variants.items()}  # waits until every engine is built
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    samples: dict[str, list[tuple[float, ...]]] = {n: [] for n in names}
    rounds: dict[str, list[float]] = {n: [] for n in names}  # per-round median wall times
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            got = variants[name].time(args.reps)
            samples[name] += got
            rounds[name].append(statistics.median(sample[0] for sample in got))
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{n} {rounds[n][-1] * 1e3:.0f} ms" for n in names),
              file=sys.stderr, flush=True)
    for proc in busy:
        proc.kill()
        proc.wait()
    for v in variants.values():
        v.close()

    ref = names[0]
    results = {}
    for name in names:
        wall, own, cpu, wait = ([x[i] * 1e3 for x in samples[name]] for i in range(4))
        slices, faults = ([x[i] for x in samples[name]] for i in (4, 5))
        ratios = [a / b for a, b in zip(rounds[name], rounds[ref])]
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        results[name] = {"median_ms": statistics.median(wall), "min_ms": min(wall),
                         "p25_ms": statistics.quantiles(wall, n=4)[0], "p75_ms": statistics.quantiles(wall, n=4)[2],
                         f"ratio_to_{ref}": statistics.median(ratios), "ratio_iqr": [quartiles[0], quartiles[2]],
                         "thread_cpu_ms": statistics.median(own), "min_thread_cpu_ms": min(own),
                         "process_cpu_ms": statistics.median(cpu), "runqueue_wait_ms": statistics.median(wait),
                         "scheduled_in": statistics.median(slices), "minor_faults": statistics.median(faults),
                         **contexts[name]}
        c = results[name]
        print(f"{name:20s} median {c['median_ms']:7.1f} ms (min {c['min_ms']:6.1f}, p25 {c['p25_ms']:6.1f}, "
              f"p75 {c['p75_ms']:7.1f})  x{c[f'ratio_to_{ref}']:.2f} vs {ref} (IQR {quartiles[0]:.2f}-"
              f"{quartiles[2]:.2f})  CPU: thread {c['thread_cpu_ms']:6.1f} ms (min {c['min_thread_cpu_ms']:6.1f}), "
              f"process {c['process_cpu_ms']:6.1f} ms  runqueue wait {c['runqueue_wait_ms']:6.1f} ms  "
              f"scheduled in {c['scheduled_in']:.0f}x  minor faults {c['minor_faults']:.0f} | "
              f"nice={c['nice']} "
              f"OMP_NUM_THREADS={c['OMP_NUM_THREADS']} torch_threads={c['torch_threads']} "
              f"affinity={c['affinity']} threads={c['process_threads']} allocators={c['allocators'] or '-'}",
              flush=True)
    print("WORKER_FORWARD_JSON " + json.dumps({"threads": args.threads, "rounds": args.rounds, "reps": args.reps,
                                               "busy": args.busy,
                                               "seconds": args.seconds, "load_avg": os.getloadavg(),
                                               "variants": results}), flush=True)

if __name__ == "__main__":
    main()
