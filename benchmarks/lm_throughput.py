"""Tokens per second of the 5 Hz LM engine: jobs one at a time vs all in one continuous batch.

    acestep-bench --lm                                       # tiny preset, 8 jobs, 10 s of codes each, CFG on
    acestep-bench --lm --preset 0.6B --device cuda --dtype bfloat16 --jobs 16 --duration 30

`measure(engine, requests)` is what a benchmark calls: it runs the requests one at a time (each job alone in every
step), then all at once (every job in every step until it ends), and reports the tokens written (CFG rows count
once, forced tokens count: each takes a forward), the seconds and tokens/s of each, and whether both runs wrote the
same codes (they should: each job samples with its own generators).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from models.lm import LMConfig, LMEngine, LMRequest


def measure(engine: LMEngine, requests: list[LMRequest]) -> dict:
    start = time.perf_counter()
    alone = [engine.generate([request])[0] for request in requests]
    sequential_s = time.perf_counter() - start
    start = time.perf_counter()
    together = engine.generate(requests)
    batched_s = time.perf_counter() - start
    tokens = sum(r.tokens for r in alone)
    return {"jobs": len(requests), "tokens": tokens,
            "sequential_s": round(sequential_s, 3), "batched_s": round(batched_s, 3),
            "sequential_tokens_per_s": round(tokens / sequential_s, 1),
            "batched_tokens_per_s": round(tokens / batched_s, 1),
            "speedup": round(sequential_s / batched_s, 2),
            "same_codes": all(a.codes == b.codes for a, b in zip(alone, together))}


def example_requests(jobs: int, duration: float, cfg_scale: float) -> list[LMRequest]:
    """Phase 1 (metadata, caption) + phase 2 (codes) jobs with prompts of different lengths."""
    return [LMRequest(caption="lo-fi hip hop, mellow piano " * (1 + i % 3), lyrics="[Instrumental]",
                      duration=duration, thinking=True, lm_cfg_scale=cfg_scale, seeds=[i], tag=f"job-{i}")
            for i in range(jobs)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="acestep-bench --lm", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--cfg-scale", type=float, default=2.5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: as a num_cpus: 0 replica)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = LMEngine(LMConfig(preset=args.preset, checkpoint_dir=args.checkpoint_dir, device=args.device,
                               dtype=args.dtype, max_caption_tokens=64))
    engine.warm_up()
    print(json.dumps(measure(engine, example_requests(args.jobs, args.duration, args.cfg_scale)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
