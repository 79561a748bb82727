"""The floor under `sim_control_plane_jobs_per_s`: the same hops as the app with nothing in them.

A Ray Serve app of no-op parts shaped like ours: an HTTP ingress (FastAPI) that submits to and long-polls a registry
actor; a driver deployment that leases jobs from the registry and sends each through three stage deployments (one
handle call each, the payload echoed back) and reports it finished. No validation, journal, timeline, heartbeats,
stage reports, files or model. Clients do what `acestep-bench --simulate`'s control-plane phase does: submit, look
once, then long-poll until the job is done. Jobs per second here bound what the real app can reach on this machine,
whatever its own code costs.

    python -m benchmarks.serve_floor --jobs 600 --concurrency 64 --stage-replicas 1
    RAY_SERVE_ENABLE_HA_PROXY=1 python -m benchmarks.serve_floor     # the same behind HAProxy
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import time
from collections import deque

import psutil

os.environ.setdefault("RAY_AUTH_MODE", "token")


def build(stage_replicas: int):
    import ray
    from fastapi import FastAPI
    from ray import serve

    @ray.remote(num_cpus=0, max_concurrency=10_000)
    class Registry:
        def __init__(self):
            self.jobs: dict[str, dict] = {}
            self.queue: deque[str] = deque()
            self.ids = itertools.count()
            self.work = asyncio.Event()
            self.changed: dict[str, asyncio.Event] = {}

        async def submit(self, spec: dict) -> str:
            job_id = f"j{next(self.ids)}"
            self.jobs[job_id] = {"status": "queued", "spec": spec}
            self.changed[job_id] = asyncio.Event()
            self.queue.append(job_id)
            self.work.set()
            return job_id

        async def lease(self, most: int) -> list[tuple[str, dict]]:
            if not self.queue:
                self.work.clear()
                try:
                    await asyncio.wait_for(self.work.wait(), 1.0)
                except asyncio.TimeoutError:
                    return []
            leased = []
            while self.queue and len(leased) < most:
                job_id = self.queue.popleft()
                self.jobs[job_id]["status"] = "running"
                self._changed(job_id)
                leased.append((job_id, self.jobs[job_id]["spec"]))
            return leased

        async def finish(self, job_id: str, result: dict) -> None:
            self.jobs[job_id].update(status="succeeded", result=result)
            self._changed(job_id)

        async def view(self, job_id: str, wait_s: float) -> dict:
            job = self.jobs[job_id]
            if wait_s and job["status"] != "succeeded":
                try:
                    await asyncio.wait_for(self.changed[job_id].wait(), wait_s)
                except asyncio.TimeoutError:
                    pass
            return {"job_id": job_id, "status": job["status"], "result": job.get("result")}

        def _changed(self, job_id: str) -> None:
            self.changed[job_id].set()
            self.changed[job_id] = asyncio.Event()

    def stage(name: str):
        @serve.deployment(name=name, num_replicas=stage_replicas, max_ongoing_requests=1000,
                          ray_actor_options={"num_cpus": 0})
        class Stage:
            async def __call__(self, payload: dict) -> dict:
                return payload
        return Stage.bind()

    @serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
    class Driver:
        def __init__(self, a, b, c):
            self.stages = (a, b, c)
            self.registry = ray.get_actor("floor-registry")
            self.tasks: set[asyncio.Task] = set()
            self.loop = asyncio.get_running_loop().create_task(self._loop())

        async def _loop(self) -> None:
            while True:
                for job_id, spec in await self.registry.lease.remote(64):
                    task = asyncio.get_running_loop().create_task(self._run(job_id, spec))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)

        async def _run(self, job_id: str, payload: dict) -> None:
            for handle in self.stages:
                payload = await handle.remote(payload)
            await self.registry.finish.remote(job_id, payload)

        async def __call__(self) -> int:
            return len(self.tasks)

    api = FastAPI()

    @serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class Ingress:
        def __init__(self, driver):
            self.driver = driver
            self.registry = ray.get_actor("floor-registry")

        @api.post("/v1/music/generate")
        async def generate(self, body: dict) -> dict:
            return {"job_id": await self.registry.submit.remote(body)}

        @api.get("/v1/jobs/{job_id}")
        async def job(self, job_id: str, wait: float = 0.0) -> dict:
            return await self.registry.view.remote(job_id, wait)

    Registry.options(name="floor-registry", lifetime="detached").remote()
    return Ingress.bind(Driver.bind(stage("A"), stage("B"), stage("C")))


async def load(url: str, jobs: int, concurrency: int) -> dict:
    import httpx

    remaining = itertools.count()
    done: list[float] = []

    async def client(http: httpx.AsyncClient) -> None:
        while next(remaining) < jobs:
            job_id = (await http.post("/v1/music/generate", json={"caption": "floor", "audio_duration": 1})).json()[
                "job_id"]
            wait = 0
            while (await http.get(f"/v1/jobs/{job_id}", params={"wait": wait})).json()["status"] != "succeeded":
                wait = 30
            done.append(time.time())

    start = time.time()
    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 limits=httpx.Limits(max_connections=concurrency)) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    done.sort()
    middle = done[len(done) // 5: len(done) * 4 // 5]  # steady state: without the first and last fifth
    return {"jobs": len(done), "seconds": done[-1] - start, "jobs_per_s": len(done) / (done[-1] - start),
            "steady_jobs_per_s": (len(middle) - 1) / (middle[-1] - middle[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--stage-replicas", type=int, default=1)
    args = parser.parse_args()

    import ray
    from ray import serve

    from deployments.bench import _free_port

    port = _free_port()
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(args.stage_replicas), name="floor", route_prefix="/floor")
    url = f"http://127.0.0.1:{port}/floor"
    asyncio.run(load(url, 50, 16))  # warm-up
    machine = psutil.cpu_times()
    ours = psutil.Process().cpu_times()
    result = asyncio.run(load(url, args.jobs, args.concurrency))
    busy = sum(getattr(psutil.cpu_times(), f) - getattr(machine, f) for f in ("user", "system", "nice"))
    client = sum(psutil.Process().cpu_times()[:2]) - sum(ours[:2])
    result.update(front_door="haproxy" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "default",
                  concurrency=args.concurrency, stage_replicas=args.stage_replicas, cores=psutil.cpu_count(),
                  machine_cpu_ms_per_job=1000 * busy / result["jobs"], client_cpu_ms_per_job=1000 * client / result["jobs"])
    print("FLOOR_JSON " + json.dumps(result))
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
