"""Peak memory (RSS) of the codec stage's VAE decode and encode, with and without tiling.

    python -m benchmarks.codec_memory                      # the default plan below: hours on a 2-core CPU (the
                                                           # 600 s encode took ~1 h, the 8 x 600 s decode ~25 min)
    python -m benchmarks.codec_memory --decode-off 1x60,2x60 --decode-on 8x600 --encode-off 5 --encode-on 600

Every measurement runs in a fresh subprocess (`--worker`): it builds `AudioCodecEngine(ModelConfig(preset=...),
tiling=...)` and the input (random latents `(outputs, seconds * 25, 64)`, or a `(2, seconds * 48000)` waveform), then
resets the kernel's peak-RSS counter (`/proc/self/clear_refs`, so that building the preset does not count) and runs
one `decode` / `encode(kind="source")`. It reports the process's RSS before the call and its peak during it
(VmHWM = `ru_maxrss`). `tiling=off` is one decoder / encoder pass over everything, as before tiling (its peaks are
within a few % of the previous models/codec.py's, which `--codec-file` measures).

For each mode the peaks are fitted as peak ~ a + b * (outputs x seconds) (encode: a + b * seconds), and the fit is
evaluated at the service's limits (8 outputs x 600 s, 600 s); sizes whose untiled run would not fit this machine are
extrapolated that way, not run. A watchdog ends a worker whose RSS passes `--max-rss-gb` (default 12), so that a
wrong guess cannot take the machine down; such a row reads `killed`. `--compare-decode` / `--compare-encode` print
max |tiled - untiled| for one size (the encode one for both a source and a reference).

glibc's allocator inflates the tiled peaks on CPU: after the first free of a block just under 32 MiB (a `tiny` decoder
tile's full-rate activation), its dynamic mmap threshold rises and later such blocks come from the heap, which keeps
them. `MALLOC_MMAP_THRESHOLD_=1048576 python -m benchmarks.codec_memory ...` (inherited by the workers) shows the
peaks without that (lower, but many small mmaps are slower).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import os
import resource
import subprocess
import sys
import threading
import time

import numpy as np

LIMIT_OUTPUTS, LIMIT_SECONDS = 8, 600  # what the service accepts per job
# Untiled sizes stay under ~4 GiB on `tiny` (~11 MiB per output-second decoded, ~140 MiB per second encoded).
DEFAULTS = {
    "decode_off": "1x30,1x60,2x60,4x60,2x120",
    "decode_on": "1x60,4x60,8x150,8x600",
    "encode_off": "5,10,20",
    "encode_on": "20,60,600",
}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _watchdog(limit_kb: int) -> None:
    """End this process (exit code 3) if its RSS passes `limit_kb`."""
    def watch():
        while True:
            if _status_kb("VmRSS") > limit_kb:
                print(json.dumps({"killed": True}), flush=True)
                os._exit(3)
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()


def _engine_class(codec_file: str | None):
    if codec_file is None:
        from models.codec import AudioCodecEngine

        return AudioCodecEngine
    spec = importlib.util.spec_from_file_location("codec_under_test", codec_file)  # e.g. an older models/codec.py
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.AudioCodecEngine


def worker(args: argparse.Namespace) -> None:
    import torch

    from models.loading import ModelConfig

    _watchdog(int(args.max_rss_gb * 1024**2))
    torch.set_num_threads(args.threads or torch.get_num_threads())
    engine_class = _engine_class(args.codec_file)
    config = ModelConfig(preset=args.preset, device="cpu")
    engine = engine_class(config, tiling=args.tiling == "on") if args.codec_file is None else engine_class(config)
    rng = np.random.default_rng(0)
    if args.worker == "decode":
        frames = round(args.seconds * 25)
        latents = rng.standard_normal((args.outputs, frames, 64), dtype=np.float32)
        call = lambda: engine.decode([latents])  # noqa: E731
    else:
        waveform = rng.uniform(-0.5, 0.5, size=(2, round(args.seconds * engine.sample_rate))).astype(np.float32)
        call = lambda: engine.encode(waveform, kind="source", seed=0)  # noqa: E731
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back what building the preset freed, or the call reuses it unseen
    rss_before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:  # reset VmHWM (and ru_maxrss) to the current RSS
        clear.write("5")
    start = time.perf_counter()
    result = call()
    wall = time.perf_counter() - start
    peak = max(_status_kb("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    shape = list(result[0].shape) if isinstance(result, list) else list(result.shape)
    print(json.dumps({"rss_before_mb": rss_before / 1024, "peak_mb": peak / 1024, "wall_s": wall,
                      "result_shape": shape, "threads": torch.get_num_threads()}), flush=True)


def compare(args: argparse.Namespace) -> None:
    """Max |tiled - untiled| over one decode (`--outputs` x `--seconds`) and one source and reference encode."""
    import torch

    from models.codec import AudioCodecEngine
    from models.loading import ModelConfig

    _watchdog(int(args.max_rss_gb * 1024**2))
    config = ModelConfig(preset=args.preset, device="cpu")
    tiled, whole = AudioCodecEngine(config), AudioCodecEngine(config, tiling=False)
    rng = np.random.default_rng(0)
    if args.worker == "compare-decode":
        latents = rng.standard_normal((args.outputs, round(args.seconds * 25), 64), dtype=np.float32)
        diffs = {"decode": float(np.abs(tiled.decode([latents])[0] - whole.decode([latents])[0]).max())}
    else:
        waveform = rng.uniform(-0.5, 0.5, size=(2, round(args.seconds * tiled.sample_rate))).astype(np.float32)
        diffs = {kind: float(np.abs(tiled.encode(waveform, kind, seed=0) - whole.encode(waveform, kind, seed=0)).max())
                 for kind in ("source", "reference")}
    print(json.dumps({"max_abs_diff": diffs, "threads": torch.get_num_threads()}), flush=True)


def _sizes(text: str, op: str) -> list[tuple[int, float]]:
    if not text:
        return []
    if op == "encode":
        return [(1, float(s)) for s in text.split(",")]
    return [(int(n), float(s)) for n, s in (item.split("x") for item in text.split(","))]


def _run(op: str, tiling: str, outputs: int, seconds: float, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "benchmarks.codec_memory", "--worker", op, "--tiling", tiling,
               "--outputs", str(outputs), "--seconds", str(seconds), "--preset", args.preset,
               "--max-rss-gb", str(args.max_rss_gb)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.codec_file:
        command += ["--codec-file", args.codec_file]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    row = json.loads(lines[-1]) if lines else {"error": done.stderr.strip().splitlines()[-1:]}
    return {"op": op, "tiling": tiling, "outputs": outputs, "seconds": seconds, **row}


def _fit(rows: list[dict]) -> tuple[float, float] | None:
    points = [(r["outputs"] * r["seconds"], r["peak_mb"]) for r in rows if "peak_mb" in r]
    if len({x for x, _ in points}) < 2:
        return None
    b, a = np.polyfit(*zip(*points), 1)
    return a, b


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    for key, value in DEFAULTS.items():
        unit = "seconds" if key.startswith("encode") else "OUTPUTSxSECONDS"
        parser.add_argument("--" + key.replace("_", "-"), default=value, help=f"comma-separated {unit} ('' skips)")
    parser.add_argument("--compare-decode", default="2x60", help="OUTPUTSxSECONDS decoded tiled and untiled ('' skips)")
    parser.add_argument("--compare-encode", default="30", help="seconds encoded tiled and untiled ('' skips)")
    parser.add_argument("--max-rss-gb", type=float, default=12.0, help="watchdog: end a worker above this RSS")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    parser.add_argument("--codec-file", default=None, help="measure another models/codec.py (e.g. an older "
                        "revision saved to a file) instead of the current one; --tiling then has no effect")
    parser.add_argument("--worker", choices=["decode", "encode", "compare-decode", "compare-encode"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--tiling", choices=["on", "off"], default="on", help=argparse.SUPPRESS)
    parser.add_argument("--outputs", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return (compare if args.worker.startswith("compare") else worker)(args)

    import torch

    print(f"codec memory: preset {args.preset}, torch {torch.__version__}, {os.cpu_count()} CPUs, peak RSS per call "
          f"in a fresh process (model + input + the call){', codec ' + args.codec_file if args.codec_file else ''}")
    print(f"{'op':7}{'tiling':>7}{'outputs':>8}{'seconds':>8}{'out x s':>8}{'rss before MiB':>15}{'peak MiB':>9}"
          f"{'call adds MiB':>14}{'wall s':>8}", flush=True)
    results: dict[tuple[str, str], list[dict]] = {}
    for key in DEFAULTS:
        op, tiling = key.split("_")
        for outputs, seconds in _sizes(getattr(args, key), op):
            row = _run(op, tiling, outputs, seconds, args)
            results.setdefault((op, tiling), []).append(row)
            if "peak_mb" in row:
                print(f"{op:7}{tiling:>7}{outputs:>8}{seconds:>8g}{outputs * seconds:>8g}{row['rss_before_mb']:>15.0f}"
                      f"{row['peak_mb']:>9.0f}{row['peak_mb'] - row['rss_before_mb']:>14.0f}{row['wall_s']:>8.1f}",
                      flush=True)
            else:
                print(f"{op:7}{tiling:>7}{outputs:>8}{seconds:>8g}  {'killed' if row.get('killed') else row}",
                      flush=True)
    for op, text in (("decode", args.compare_decode), ("encode", args.compare_encode)):
        for outputs, seconds in _sizes(text, op):
            row = _run("compare-" + op, "on", outputs, seconds, args)
            size = f"{outputs} x {seconds:g} s" if op == "decode" else f"{seconds:g} s"
            print(f"max |tiled - untiled| {op} {size}: " + (", ".join(f"{k} {v:.2e}" for k, v in
                                                                     row["max_abs_diff"].items())
                                                           if "max_abs_diff" in row else str(row)), flush=True)
    print()
    for (op, tiling), rows in results.items():
        fit = _fit(rows)
        if fit is None:
            continue
        a, b = fit
        limit = LIMIT_OUTPUTS * LIMIT_SECONDS if op == "decode" else LIMIT_SECONDS
        x = "outputs x seconds" if op == "decode" else "seconds"
        measured = [r["peak_mb"] for r in rows if r["outputs"] * r["seconds"] == limit and "peak_mb" in r]
        note = f"measured {measured[0]:.0f} MiB" if measured else "extrapolated"
        print(f"fit {op} tiling={tiling}: peak MiB ~ {a:.0f} + {b:.2f} x ({x}), from {len(rows)} sizes; "
              f"at {limit} ({'8 x 600 s' if op == 'decode' else '600 s'}): {a + b * limit:.0f} MiB ({note})")


if __name__ == "__main__":
    main()
