"""The job registry's call latency with a production-sized history against an empty registry.

    python -m benchmarks.registry_latency [--retained 10000] [--running 500] [--calls 2000]

Runs `JobRegistry` in-process (the actor's method bodies, without Ray's ~1 ms per call, which does not depend on
the job count) and prints the mean microseconds per call of the hot paths, for a registry holding `--retained`
finished jobs and `--running` leased ones against one holding only the polled job, and their ratio. Target: the
ratio stays under 1.5 (hot paths cost O(running jobs), not O(all retained jobs)).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from jobs.config import QueueConfig
from jobs.registry import JobRegistry


async def build(retained: int, running: int) -> tuple[JobRegistry, str]:
    everything = retained + running + 10
    registry = JobRegistry(QueueConfig(max_queued_jobs=everything, max_running_jobs=everything))
    for i in range(retained):
        await registry.submit(f"done-{i}", {})
    for job in await registry.lease("driver", retained, wait_s=0):
        await registry.finish(job["attempt_id"], "driver", {"ok": True})
    for i in range(running):
        await registry.submit(f"run-{i}", {})
    await registry.submit("polled", {})
    leased = await registry.lease("driver", running + 1, wait_s=0)
    await registry.configure(QueueConfig(max_queued_jobs=everything, max_running_jobs=running + 1))  # full
    return registry, next(j["attempt_id"] for j in leased if j["job_id"] == "polled")


async def measure(registry: JobRegistry, attempt: str, calls: int) -> dict[str, float]:
    job_id = attempt.split("#")[0]
    paths = {
        "view (poll)": lambda: registry.view(job_id),
        "heartbeat": lambda: registry.heartbeat(attempt, "driver"),
        "report_steps": lambda: registry.report_steps({attempt: (1, 8)}),
        "lease (no room)": lambda: registry.lease("driver", 1, wait_s=0),
        "stats": lambda: registry.stats(),
    }
    out = {}
    for name, call in paths.items():
        await call()
        start = time.perf_counter()
        for _ in range(calls):
            await call()
        out[name] = (time.perf_counter() - start) / calls * 1e6
    return out


async def main_async(args: argparse.Namespace) -> None:
    empty = await measure(*await build(0, 0), args.calls)
    full = await measure(*await build(args.retained, args.running), args.calls)
    print(f"registry call latency, in-process (us per call), {args.retained} retained + {args.running} running jobs "
          f"vs empty")
    print(f"{'call':18} {'empty':>9} {'loaded':>9} {'ratio':>7}")
    for name in empty:
        print(f"{name:18} {empty[name]:9.1f} {full[name]:9.1f} {full[name] / empty[name]:7.2f}")
    hot = [name for name in empty if name != "stats"]
    ratio = max(full[name] / empty[name] for name in hot)
    print(f"worst hot-path ratio: {ratio:.2f} (target <= 1.5)")
    print("BENCH_JSON " + json.dumps({"registry_latency_ratio": round(ratio, 3), "empty_us": empty,
                                      "loaded_us": full}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--retained", type=int, default=10_000)
    parser.add_argument("--running", type=int, default=500)
    parser.add_argument("--calls", type=int, default=2_000)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
