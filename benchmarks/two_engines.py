"""Does this machine run two engines at once at full speed? One `small` DiT forward pass (15 s of audio, one torch
thread) timed alone, then in two processes at once, then next to the `small` VAE decoding. On a machine whose cores
compute independently, each pass takes as long next to the other as alone.

    python -m benchmarks.two_engines
"""

from __future__ import annotations

import json
import multiprocessing as mp
import statistics
import time

ROUNDS = 12


def _work(kind: str, start: float, out) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from models.loading import ModelConfig

    config = ModelConfig(preset="small")
    if kind == "dit":
        from models.dit import DiTEngine

        engine = DiTEngine(config)
        engine.warm_up()
        state = engine.start(engine._zeros(15.0, steps=ROUNDS + 1))
        run = lambda: engine.step([state])  # noqa: E731
    else:
        from models.codec import AudioCodecEngine

        engine = AudioCodecEngine(config)
        latents = [np.zeros((1, 375, 64), np.float32)]
        run = lambda: engine.decode(latents)  # noqa: E731
    run()
    while time.time() < start:
        time.sleep(0.01)
    times = []
    for _ in range(ROUNDS):
        begin = time.perf_counter()
        run()
        times.append(time.perf_counter() - begin)
    out.put((kind, statistics.median(times)))


def measure(kinds: list[str]) -> list[tuple[str, float]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start = time.time() + 25  # every process loaded before any is timed
    procs = [ctx.Process(target=_work, args=(k, start, out)) for k in kinds]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return results


def main() -> None:
    alone = dict(measure(["dit"]))["dit"]
    codec_alone = dict(measure(["codec"]))["codec"]
    two = [t for _, t in measure(["dit", "dit"])]
    mixed = dict(measure(["dit", "codec"]))
    print(json.dumps({"dit_pass_alone_s": alone, "dit_pass_next_to_a_dit_s": statistics.mean(two),
                      "slowdown_two_dits": statistics.mean(two) / alone, "codec_decode_alone_s": codec_alone,
                      "dit_next_to_codec_s": mixed["dit"], "codec_next_to_dit_s": mixed["codec"],
                      "slowdown_dit_next_to_codec": mixed["dit"] / alone,
                      "slowdown_codec_next_to_dit": mixed["codec"] / codec_alone}))


if __name__ == "__main__":
    main()
