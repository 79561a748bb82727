"""`acestep-bench --control-plane`: how many job polls and job submissions the HTTP front door answers.

Measures, over loopback HTTP/1.1 keep-alive connections, on the `tiny` preset (the model does not matter here):

- polls: `GET /v1/jobs/{id}` of one finished job, with 1 and with 2 Ingress replicas;
- submissions: `POST /v1/music/generate` (1 step, 1 s of audio) with 1 and with 2 Ingress replicas. The JobDriver
  is scaled to zero meanwhile, so the jobs stay queued (no stage burns CPU under the measurement); the bench cancels
  them afterwards through the registry actor;

through each front door, each in its own Ray instance (the switch is read when Serve starts):

- `default`: Serve's Python HTTP proxy (ProxyActor), which calls the Ingress replica through a DeploymentHandle;
- `haproxy`: `RAY_SERVE_ENABLE_HA_PROXY=1` (Ray >= 2.55): HAProxy on the HTTP port, load-balancing over the Ingress
  replicas' own HTTP servers ("direct ingress", which HAProxy mode turns on). There the bench also polls one replica's
  own port without HAProxy ("replica port": no front door, clients cannot find it);
- `throughput` (only when asked for): `haproxy` plus `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` (user code on the replica's
  own event loop, gRPC between deployments, ...);

and an anchor: the same JSON view served from a dict by a one-process FastAPI app under uvicorn.

The load comes from a small raw-asyncio HTTP/1.1 client (one asyncio Protocol per connection, no per-request
coroutine, uvloop when installed) in a process of its own; it reports its own CPU. While it runs, the bench reads
the CPU time of every process of the Ray instance, grouped by role (proxy, haproxy, ingress, registry, ...), and of
the whole machine: CPU milliseconds per request, and cores busy that the bench does not account for (other work on
a shared machine).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from deployments.bench import _free_port, _quantile

ROOT = Path(__file__).resolve().parent.parent
APP = "cpbench"
PREFIX = "/cpbench"
SUBMIT = {"caption": "control plane bench", "lyrics": "", "audio_duration": 1, "inference_steps": 1, "batch_size": 1,
          "audio_format": "wav", "seed": 1, "use_random_seed": False}
FRONT_DOORS = ("default", "haproxy", "throughput")
DEFAULT_FRONT_DOORS = ("default", "haproxy")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("control plane (--control-plane)")
    group.add_argument("--cp-front-doors", default=",".join(DEFAULT_FRONT_DOORS),
                       help="front doors to measure, each in its own Ray instance: default (Serve's Python proxy), "
                       "haproxy (RAY_SERVE_ENABLE_HA_PROXY=1, with direct ingress), throughput (haproxy and "
                       "RAY_SERVE_THROUGHPUT_OPTIMIZED=1)")
    group.add_argument("--cp-connections", type=int, default=16, help="keep-alive connections of the load client")
    group.add_argument("--cp-seconds", type=float, default=4.0, help="measured seconds of each load phase")
    group.add_argument("--cp-warmup-s", type=float, default=1.0, help="unmeasured seconds before each phase")
    group.add_argument("--cp-replicas", default="1,2", help="Ingress replica counts to measure")
    group.add_argument("--cp-no-submits", action="store_true", help="measure polls only")


# -- the load client (runs in its own process: `python -m deployments.bench_control client SPEC`) ---------------------
class _Load:
    """One load phase: fixed requests, sent back to back on each connection, answers timed in a window."""

    def __init__(self, requests: list[bytes], warmup_s: float, seconds: float, collect_ids: bool):
        self.requests, self.collect_ids = requests, collect_ids
        self.start = time.perf_counter() + warmup_s
        self.end = self.start + seconds
        self.stopping = False
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = defaultdict(int)
        self.job_ids: list[str] = []
        self.reconnects = self.connect_errors = 0

    def record(self, sent: float, done: float, status: int, body: bytes) -> None:
        if self.start <= done < self.end:
            self.latencies.append(done - sent)
            self.statuses[status] += 1
        if self.collect_ids and status == 200:
            i = body.find(b'"job_id":"')
            if i >= 0:
                self.job_ids.append(body[i + 10:body.index(b'"', i + 10)].decode())


class _Connection(asyncio.Protocol):
    """HTTP/1.1 keep-alive: one request in flight; Content-Length or chunked answers (JSON bodies only)."""

    def __init__(self, load: _Load, closed: asyncio.Future):
        self.load, self.closed = load, closed
        self.buffer = bytearray()
        self.body_at = self.need = -1
        self.chunked = False
        self.index, self.sent, self.status = 0, 0.0, 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._send()

    def _send(self) -> None:
        load = self.load
        if load.stopping:
            self.transport.close()
            return
        self.sent = time.perf_counter()
        self.transport.write(load.requests[self.index % len(load.requests)])
        self.index += 1

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while True:
            if self.body_at < 0:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buffer[:end]).lower()
                self.status, self.body_at = int(head[9:12]), end + 4
                i = head.find(b"\r\ncontent-length:")
                self.chunked = i < 0 and b"transfer-encoding: chunked" in head
                if i >= 0:
                    j = head.find(b"\r\n", i + 2)
                    self.need = self.body_at + int(head[i + 17:j if j > 0 else None])
                elif not self.chunked:
                    self.need = self.body_at
            if self.chunked:  # a JSON body never holds CRLF, so the last chunk is the first "0\r\n\r\n" after it
                end = buffer.find(b"0\r\n\r\n", self.body_at)
                if end < 0:
                    return
                self.need = end + 5
            if len(buffer) < self.need:
                return
            body = bytes(buffer[self.body_at:self.need])
            del buffer[:self.need]
            self.body_at = self.need = -1
            self.load.record(self.sent, time.perf_counter(), self.status, body)
            self._send()
            if not buffer:
                return

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def _drive(host: str, port: int, load: _Load, connections: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    cpu: dict[str, float] = {}

    def mark(name: str) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu[name] = usage.ru_utime + usage.ru_stime
        print(f"WINDOW_{name.upper()}", flush=True)  # the parent reads the server processes' CPU at these marks
        if name == "end":
            load.stopping = True

    async def slot() -> None:
        first = True
        while not load.stopping:
            closed = loop.create_future()
            try:
                await loop.create_connection(lambda: _Connection(load, closed), host, port)
            except OSError:
                load.connect_errors += 1
                await asyncio.sleep(0.05)
                continue
            load.reconnects += 0 if first else 1
            first = False
            await closed

    now = time.perf_counter()
    loop.call_later(load.start - now, mark, "start")
    loop.call_later(load.end - now, mark, "end")
    tasks = [asyncio.create_task(slot()) for _ in range(connections)]
    done, pending = await asyncio.wait(tasks, timeout=load.end - now + 15)
    for task in pending:
        task.cancel()
    seconds = load.end - load.start
    latencies = sorted(load.latencies)
    count = len(latencies)
    client_cpu = cpu.get("end", 0.0) - cpu.get("start", 0.0)
    return {"requests": count, "per_s": count / seconds, "seconds": seconds, "connections": connections,
            "p50_ms": 1000 * _quantile(latencies, 0.5) if latencies else None,
            "p99_ms": 1000 * _quantile(latencies, 0.99) if latencies else None,
            "statuses": {str(k): v for k, v in sorted(load.statuses.items())},
            "reconnects": load.reconnects, "connect_errors": load.connect_errors, "hung_connections": len(pending),
            "client_cpu_cores": client_cpu / seconds,
            "client_cpu_us_per_request": 1e6 * client_cpu / count if count else None,
            "job_ids": load.job_ids}


def http_request(method: str, host: str, port: int, path: str, body: dict | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    if body is None:
        return (head + "\r\n").encode()
    data = json.dumps(body).encode()
    return (head + f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data


def client_main(spec: dict[str, Any]) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    load = _Load([r.encode("latin-1") for r in spec["requests"]], spec["warmup_s"], spec["seconds"],
                 spec.get("collect_ids", False))
    result = asyncio.run(_drive(spec["host"], spec["port"], load, spec["connections"]))
    print("RESULT " + json.dumps(result), flush=True)


# -- measuring a phase: the client in its own process, the servers' CPU read around its window ------------------------
def _cpu_seconds(processes: list) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except Exception:  # exited meanwhile
            pass
    return total


def measure(host: str, port: int, requests: list[bytes], connections: int, warmup_s: float, seconds: float,
            roles: Callable[[], dict[str, list]], collect_ids: bool = False) -> dict[str, Any]:
    """One load phase against host:port. `roles()`: the server's processes by role, whose CPU is read at the start
    and the end of the measured window."""
    import psutil

    groups = roles()
    spec = {"host": host, "port": port, "requests": [r.decode("latin-1") for r in requests],
            "connections": connections, "warmup_s": warmup_s, "seconds": seconds, "collect_ids": collect_ids}
    process = subprocess.Popen([sys.executable, "-m", "deployments.bench_control", "client", json.dumps(spec)],
                               stdout=subprocess.PIPE, text=True, cwd=ROOT)
    marks: dict[str, tuple[float, dict[str, float], Any]] = {}
    result: dict[str, Any] | None = None
    for line in process.stdout:
        if line.startswith("WINDOW_"):
            name = line.strip()[7:].lower()
            marks[name] = (time.monotonic(), {role: _cpu_seconds(ps) for role, ps in groups.items()},
                           psutil.cpu_times())
        elif line.startswith("RESULT "):
            result = json.loads(line[7:])
    process.wait()
    if result is None or set(marks) != {"start", "end"}:
        raise RuntimeError(f"the load client failed (exit {process.returncode})")
    if not collect_ids:
        del result["job_ids"]
    (t0, cpu0, sys0), (t1, cpu1, sys1) = marks["start"], marks["end"]
    wall, count = t1 - t0, max(1, result["requests"])
    spent = {role: cpu1[role] - cpu0[role] for role in groups}
    busy = sum(getattr(sys1, f) - getattr(sys0, f) for f in ("user", "system", "nice", "irq", "softirq", "steal")
               if hasattr(sys1, f))
    result["server_cpu_ms_per_request"] = {role: 1000 * s / count for role, s in spent.items()}
    result["server_cpu_cores"] = {role: s / wall for role, s in spent.items()}
    result["machine_busy_cores"] = busy / wall
    # what neither the server's processes nor the client account for: other work on a shared machine
    result["unaccounted_busy_cores"] = busy / wall - sum(spent.values()) / wall - result["client_cpu_cores"]
    return result


def _wait_http(url: str, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer 200 within {timeout} s")


# -- the anchor: one process, FastAPI under uvicorn, the view from a dict ----------------------------------------------
def anchor_app(views: dict[str, dict[str, Any]]):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    api = FastAPI()

    @api.get("/v1/jobs/{job_id}")
    async def job(job_id: str) -> JSONResponse:
        view = views.get(job_id)
        return JSONResponse(view) if view is not None else JSONResponse({"detail": "Job not found"}, 404)

    @api.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return api


def anchor_main(port: int, views: dict[str, dict[str, Any]]) -> None:
    import uvicorn

    uvicorn.run(anchor_app(views), host="127.0.0.1", port=port, log_level="warning", access_log=False)


def measure_anchor(view: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    import psutil

    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "deployments.bench_control", "anchor", str(port),
                                json.dumps({view["job_id"]: view})], cwd=ROOT)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", 30)
        server = psutil.Process(process.pid)
        return measure("127.0.0.1", port, [http_request("GET", "127.0.0.1", port, f"/v1/jobs/{view['job_id']}")],
                       opts["connections"], opts["warmup_s"], opts["seconds"], lambda: {"anchor": [server]})
    finally:
        process.terminate()
        process.wait(timeout=10)


# -- one front door, in its own Ray instance (`python -m deployments.bench_control variant NAME OPTS`) ----------------
def _role(title: str, name: str) -> str:
    if name == "haproxy" or title.endswith("/haproxy"):
        return "haproxy"
    for prefix, role in (("ray::ProxyActor", "proxy"), ("ray::HAProxyManager", "haproxy_manager"),
                         (f"ray::ServeReplica:{APP}:Ingress", "ingress"), ("ray::JobRegistry", "registry"),
                         (f"ray::ServeReplica:{APP}:", "stages"), ("ray::ServeController", "controller")):
        if title.startswith(prefix):
            return role
    return "ray_core" if name in ("raylet", "gcs_server") else "other"


def ray_roles() -> dict[str, list]:
    """This process and everything it started (the local Ray instance), by role."""
    import psutil

    me = psutil.Process()
    groups: dict[str, list] = defaultdict(list)
    groups["bench"].append(me)
    for process in me.children(recursive=True):
        try:
            cmdline = process.cmdline()
            groups[_role(cmdline[0] if cmdline else "", process.name())].append(process)
        except psutil.Error:
            pass
    return dict(groups)


def app_config(app_args: dict[str, Any], ingress_replicas: int, driver: bool) -> dict[str, Any]:
    """The application as `serve run serve_config.yaml` deploys it (a config, so changing only replica counts scales
    in place; `serve.run` of a new graph would replace every replica), with serve_config.yaml's logging (no access
    log), every stage at one replica."""
    import yaml

    stage = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}
    served = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    return {"logging_config": served.get("logging_config"), "applications": [{
        "name": APP, "route_prefix": PREFIX, "import_path": "deployments.app:build_app", "args": app_args,
        "runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
        "deployments": [
            {"name": "Ingress", "num_replicas": ingress_replicas, "ray_actor_options": {"num_cpus": 0}},
            # Off: no replica, so submitted jobs stay queued and no stage runs under the measurement.
            {"name": "JobDriver", "ray_actor_options": {"num_cpus": 0}, "autoscaling_config": {
                "min_replicas": int(driver), "initial_replicas": int(driver), "max_replicas": 1}},
            *({"name": name, **stage} for name in ("ConditionEncoder", "DiT", "AudioCodec"))]}]}


def variant_main(front_door: str, opts: dict[str, Any]) -> dict[str, Any]:
    import httpx
    import psutil
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from jobs.registry import NAMESPACE

    work = Path(opts["work"]) / front_door
    port = _free_port()
    host, base = "127.0.0.1", f"http://127.0.0.1:{port}{PREFIX}"

    def log(message: str) -> None:
        print(f"[bench {front_door}] {message}", file=sys.stderr, flush=True)

    app_args = {"name": APP, "model": {"preset": "tiny"},
                "queue": {"max_queued_jobs": 1_000_000, "max_running_jobs": 4},
                "files": {"output_dir": str(work / "results"), "upload_dir": str(work / "uploads"),
                          "journal_path": str(work / "registry.sqlite3")}}  # journaled, as serve_config.yaml
    started = time.time()
    for attempt in range(2):  # a busy shared machine can time out a node's startup once
        try:
            ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
            break
        except Exception as exc:
            ray.shutdown()
            if attempt:
                raise
            log(f"Ray did not start ({exc}); once more ...")
    results: dict[str, Any] = {"front_door": front_door}
    try:
        serve.start(http_options={"host": host, "port": port})

        def haproxy_servers() -> list[int]:
            ports = []
            state = os.environ["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]
            for path in glob.glob(os.path.join(state, "*", "haproxy.cfg")):
                ports += [int(p) for p in re.findall(rf"server SERVE_REPLICA_{APP}-Ingress\S* [\d.]+:(\d+)",
                                                     Path(path).read_text())]
            return ports

        def deploy(ingress_replicas: int, driver: bool) -> None:
            config = ServeDeploySchema.model_validate(app_config(app_args, ingress_replicas, driver))
            _get_global_client().deploy_apps(config, _blocking=False)
            deadline = time.time() + 300
            while time.time() < deadline:
                status = serve.status().applications.get(APP)
                if status is not None and status.status == "DEPLOY_FAILED":
                    raise RuntimeError(f"the app failed to deploy: {status.message}")
                if status is not None and status.status == "RUNNING":
                    running = {n: d.replica_states.get("RUNNING", 0) for n, d in status.deployments.items()}
                    if running.get("Ingress") == ingress_replicas and running.get("JobDriver", 0) == int(driver) \
                            and (front_door == "default" or len(haproxy_servers()) == ingress_replicas):
                        break
                time.sleep(0.25)
            else:
                raise TimeoutError(f"the app did not reach {ingress_replicas} Ingress replicas")
            _wait_http(base + "/health")

        def submits(replicas: int) -> dict[str, Any]:
            result = measure(host, port, [http_request("POST", host, port, f"{PREFIX}/v1/music/generate", SUBMIT)],
                             opts["connections"], opts["warmup_s"], opts["seconds"], ray_roles, collect_ids=True)
            ids = result.pop("job_ids")
            registry = ray.get_actor(f"registry-{APP}", namespace=NAMESPACE)
            ray.get([registry.cancel.remote(job_id) for job_id in ids])  # never run: the driver is at 0 replicas
            result["canceled"] = len(ids)
            return result

        def polls(job_id: str, to_port: int = port) -> dict[str, Any]:
            return measure(host, to_port, [http_request("GET", host, to_port, f"{PREFIX}/v1/jobs/{job_id}")],
                           opts["connections"], opts["warmup_s"], opts["seconds"], ray_roles)

        counts = sorted(opts["replicas"])
        log("starting the app (JobDriver at 0 replicas) ...")
        deploy(counts[0], driver=False)
        results["startup_s"] = time.time() - started
        if opts["submits"]:
            for n in counts:
                if n != counts[0]:
                    deploy(n, driver=False)
                log(f"submissions, {n} Ingress replica(s) ...")
                results[f"submit_{n}"] = submits(n)
        deploy(counts[-1], driver=True)
        log("one job to poll ...")
        answer = httpx.post(base + "/v1/music/generate", json=SUBMIT, timeout=30).raise_for_status().json()
        deadline = time.time() + 120
        while (view := httpx.get(f"{base}/v1/jobs/{answer['job_id']}", timeout=30).json())["status"] not in (
                "succeeded", "failed", "canceled"):
            if time.time() > deadline:
                raise TimeoutError("the job to poll did not finish")
            time.sleep(0.2)
        if view["status"] != "succeeded":  # still a finished job to poll, but not the usual view
            log(f"WARNING: the job to poll {view['status']}: {view.get('error')}")
        results["view"] = view
        for n in reversed(counts):
            if n != counts[-1]:
                deploy(n, driver=True)
            log(f"polls, {n} Ingress replica(s) ...")
            results[f"poll_{n}"] = polls(view["job_id"])
            if front_door != "default" and n == 1:
                log("polls, straight to the Ingress replica's own port ...")
                results["direct_poll_1"] = polls(view["job_id"], haproxy_servers()[0])
    finally:
        mine = psutil.Process().children(recursive=True)
        ray.shutdown()  # the whole local instance; serve.shutdown() first waits out HAProxy's drain period
        for process in mine:  # HAProxy is a child of its manager actor, which a killed worker leaves behind
            try:
                if process.is_running():
                    process.kill()
            except psutil.Error:
                pass
    return results


def _variant_env(front_door: str) -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token"), "HF_HUB_OFFLINE": "1"}
    if front_door in ("haproxy", "throughput"):
        # Private files and ports: the defaults (/tmp/haproxy-serve, 8404, 9101, 8500) are shared by every Ray
        # instance on the machine. Short: HAProxy's unix socket paths (this + node id + name) hold 97 characters.
        state = Path(tempfile.mkdtemp(prefix="hap", dir="/tmp"))
        env.update({"RAY_SERVE_ENABLE_HA_PROXY": "1",
                    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(state / "haproxy.cfg"),
                    "RAY_SERVE_HAPROXY_SOCKET_PATH": str(state / "admin.sock"),
                    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(state),
                    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(state / "server-state"),
                    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(state / "metrics.sock"),
                    "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
                    "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
                    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(_free_port())})
    if front_door == "throughput":  # also: user code on the replica's own loop, gRPC between deployments, ...
        env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    return env


def _run_variant(front_door: str, opts: dict[str, Any]) -> dict[str, Any]:
    env = _variant_env(front_door)
    try:
        process = subprocess.run([sys.executable, "-m", "deployments.bench_control", "variant", front_door,
                                  json.dumps(opts)], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    finally:
        state = env.get("RAY_SERVE_HAPROXY_SERVER_STATE_BASE")
        if state and state != os.environ.get("RAY_SERVE_HAPROXY_SERVER_STATE_BASE"):
            shutil.rmtree(state, ignore_errors=True)
    lines = [line for line in process.stdout.splitlines() if line.startswith("VARIANT ")]
    if process.returncode or not lines:
        raise RuntimeError(f"front door {front_door} failed (exit {process.returncode})")
    return json.loads(lines[-1][8:])


# -- the whole bench --------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every front door, then the anchor; prints a table and one `BENCH_JSON {...}` line; returns the results."""
    front_doors = [d.strip() for d in args.cp_front_doors.split(",") if d.strip()]
    unknown = set(front_doors) - set(FRONT_DOORS)
    if unknown or not front_doors:
        raise SystemExit(f"--cp-front-doors: choose from {', '.join(FRONT_DOORS)} (got {args.cp_front_doors!r})")
    work = Path(tempfile.mkdtemp(prefix="acestep-bench-control-"))
    opts = {"work": str(work), "connections": args.cp_connections, "seconds": args.cp_seconds,
            "warmup_s": args.cp_warmup_s, "replicas": [int(n) for n in args.cp_replicas.split(",")],
            "submits": not args.cp_no_submits}
    results: dict[str, Any] = {
        "bench": "control_plane", "cpu_count": os.cpu_count(), "load_avg_1m_before": os.getloadavg()[0],
        "client": f"raw asyncio HTTP/1.1 keep-alive, own process, {args.cp_connections} connections",
        "connections": args.cp_connections, "seconds": args.cp_seconds, "submit_body": SUBMIT,
        "submitted_jobs": "queued with the JobDriver at 0 replicas, then canceled (never run)",
        "front_doors": {}}
    try:
        for front_door in front_doors:
            print(f"[bench] front door {front_door} (own Ray instance) ...", file=sys.stderr, flush=True)
            results["front_doors"][front_door] = _run_variant(front_door, opts)
        view = next(v["view"] for v in results["front_doors"].values())
        print("[bench] anchor: one-process FastAPI + uvicorn, the view from a dict ...", file=sys.stderr, flush=True)
        results["anchor"] = measure_anchor(view, opts)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["job_view_bytes"] = len(json.dumps(view, separators=(",", ":")))
    results["polled_job_status"] = view["status"]
    for variant in results["front_doors"].values():
        variant.pop("view", None)

    polls = {_label(door, key): v["per_s"] for door, variant in results["front_doors"].items()
             for key, v in variant.items() if key.startswith("poll_")}
    best = max(polls, key=polls.get)  # a replica's own port is no front door: clients cannot find it, nor balance
    direct = {_label(door, key): v["per_s"] for door, variant in results["front_doors"].items()
              for key, v in variant.items() if key.startswith("direct_poll_")}
    submits = {_label(door, key): v["per_s"] for door, variant in results["front_doors"].items()
               for key, v in variant.items() if key.startswith("submit_")}
    results.update({
        "control_plane_polls_per_s": polls[best], "control_plane_polls_best": best,
        "control_plane_anchor_polls_per_s": results["anchor"]["per_s"],
        "control_plane_polls_vs_anchor": polls[best] / results["anchor"]["per_s"],
        "control_plane_polls_per_s_by_variant": polls,
        "control_plane_polls_per_s_replica_port": direct,
        "control_plane_submits_per_s": max(submits.values()) if submits else None,
        "control_plane_submits_best": max(submits, key=submits.get) if submits else None,
        "control_plane_submits_per_s_by_variant": submits,
    })
    print(render(results))
    print("BENCH_JSON " + json.dumps(_rounded(results)))
    return results


def _label(door: str, key: str) -> str:
    """`poll_2` -> "haproxy, 2 ingress"; `direct_poll_1` -> "haproxy: replica port, 1 ingress"."""
    replicas = key.rsplit("_", 1)[1]
    return f"{door}: replica port, {replicas} ingress" if key.startswith("direct") else f"{door}, {replicas} ingress"


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def render(r: dict[str, Any]) -> str:
    roles = ("proxy", "haproxy", "haproxy_manager", "ingress", "registry", "stages", "controller", "ray_core",
             "other", "anchor")
    lines = [f"acestep-bench --control-plane: {r['client']}, {r['seconds']:g} s per phase, {r['cpu_count']} CPUs, "
             f"load average before {r['load_avg_1m_before']:.2f}; polled job: {r['polled_job_status']}, view "
             f"{r['job_view_bytes']} bytes",
             f"{'phase (front door, replicas)':<40}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'client':>8}{'other':>7}"
             f"  server CPU ms per request",
             f"{'':<40}{'':>8}{'':>8}{'':>8}{'cores':>8}{'cores':>7}"]

    def row(label: str, m: dict[str, Any]) -> None:
        cpu = m["server_cpu_ms_per_request"]
        parts = " ".join(f"{role} {cpu[role]:.2f}" for role in roles if cpu.get(role, 0) >= 0.005)
        bad = {k: v for k, v in m["statuses"].items() if k not in ("200",)}
        lines.append(f"{label:<40}{m['per_s']:>8.0f}{m['p50_ms'] or 0:>8.1f}{m['p99_ms'] or 0:>8.1f}"
                     f"{m['client_cpu_cores']:>8.2f}{m['unaccounted_busy_cores']:>7.2f}  {parts}"
                     + (f"  statuses {bad}" if bad else ""))

    for door, variant in r["front_doors"].items():
        for key, m in variant.items():
            if key.startswith(("poll_", "direct_poll_")):
                row(f"GET job, {_label(door, key)}", m)
        for key, m in variant.items():
            if key.startswith("submit_"):
                row(f"POST generate, {_label(door, key)}", m)
    row("GET job, anchor (FastAPI+uvicorn, dict)", r["anchor"])
    for door, variant in r["front_doors"].items():
        lines.append(f"{door}: Ray instance + app up in {variant['startup_s']:.0f} s")
    lines.append(f"control_plane_polls_per_s         {r['control_plane_polls_per_s']:.0f} "
                 f"({r['control_plane_polls_best']})")
    lines.append(f"control_plane_anchor_polls_per_s  {r['control_plane_anchor_polls_per_s']:.0f}")
    lines.append(f"control_plane_polls_vs_anchor     {r['control_plane_polls_vs_anchor']:.3f}")
    if r["control_plane_submits_per_s"] is not None:
        lines.append(f"control_plane_submits_per_s       {r['control_plane_submits_per_s']:.0f} "
                     f"({r['control_plane_submits_best']})")
    lines.append("client cores: the load client's own CPU; other cores: machine CPU busy outside the server's "
                 "processes and the client (other work on a shared machine)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    role = argv[0] if argv else ""
    if role == "client":
        client_main(json.loads(argv[1]))
    elif role == "anchor":
        anchor_main(int(argv[1]), json.loads(argv[2]))
    elif role == "variant":
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        result = variant_main(argv[1], json.loads(argv[2]))
        print("VARIANT " + json.dumps(result), flush=True)
    else:
        parser = argparse.ArgumentParser(prog="python -m deployments.bench_control",
                                         description=__doc__.split("\n\n")[0])
        add_arguments(parser)
        run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
