"""The capacity simulation (`acestep-bench --simulate`, deployments/simulate.py): the real app with stage engines that
sleep a cost model's time. A simulated job completes over HTTP with silent audio, its DiT time is the cost model's,
and the deployable builder refuses the mode."""

from __future__ import annotations

import io
import math
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import soundfile as sf

from deployments.simulate import (SimAudioCodecEngine, SimConditionEngine, SimDiTEngine, ideal, load_costs,
                                  stage_costs)
from models.condition import ConditionRequest
from models.dit import DiTRequest
from models.loading import ModelConfig

# Steps long enough to measure, short enough for a test: 8 steps x (50 ms + 1e-4 x 1 x 50 frames) = 0.44 s.
COSTS = {"name": "test", "preset": "tiny", "shapes": {"condition_tokens": 8},
         "costs": {"condition": {"a": 0.01, "b": 0.0}, "dit": {"a": 0.05, "b": 1e-4}, "codec": {"a": 0.01, "b": 0.0}}}


def test_simulated_engines_keep_the_interface_and_sleep_the_modelled_time():
    config = ModelConfig(preset="tiny")
    condition = SimConditionEngine(config, COSTS)
    results = condition.encode([ConditionRequest(caption="a", lyrics="", audio_duration=2.0),
                                ConditionRequest(caption="b", lyrics="", audio_duration=3.0)])
    assert [r.context_latents.shape[0] for r in results] == [50, 75]
    assert not np.any(results[0].encoder_hidden_states)

    dit = SimDiTEngine(config, COSTS)
    states = [dit.start(DiTRequest(condition=r, seeds=[1, 2], num_inference_steps=3, tag=str(i)))
              for i, r in enumerate(results)]
    assert [(s.rows, s.frames, s.total) for s in states] == [(2, 50, 3), (2, 75, 3)]  # turbo: no CFG rows
    start = time.perf_counter()
    dit.step(states)
    elapsed = time.perf_counter() - start
    modelled = 0.05 + 1e-4 * 4 * 75  # rows summed x the longest job's frames (padded)
    assert dit.modelled_s == pytest.approx(modelled)
    assert modelled <= elapsed < modelled + 0.5
    assert all(s.step == 1 for s in states)
    latents = dit.generate([DiTRequest(condition=results[0], seeds=[1], num_inference_steps=2)])[0]
    assert latents.shape == (1, 50, 64) and not latents.any()

    codec = SimAudioCodecEngine(config, COSTS)
    audio = codec.decode([latents, np.zeros((2, 75, 64), np.float32)])
    assert [a.shape for a in audio] == [(1, 2, 50 * 1920), (2, 2, 75 * 1920)]
    assert codec.sample_rate == 48000 and codec.channels == 2


def test_the_shipped_cost_files_load_and_the_ideal_follows_the_formula():
    for name in ("cpu", "gpu"):
        costs = load_costs(name)
        assert all(c.a >= 0 and c.b >= 0 for c in stage_costs(costs).values())
    # One stage bounds it: the DiT, 8 steps x (a + b x k x 50) / k per job at k = 4 jobs per pass.
    jobs = [{"audio_duration": 2.0, "batch_size": 1, "inference_steps": 8}] * 3
    limits = {stage: {"max_batch_size": 4, "max_batch_frames": 10_000, "replicas": 1}
              for stage in ("condition", "dit", "codec")}
    result = ideal(COSTS, jobs, limits)
    assert result["bottleneck"] == "dit"
    assert result["jobs_per_s"] == pytest.approx(4 / (8 * (0.05 + 1e-4 * 4 * 50)))


def test_no_model_code_where_no_model_is_built():
    """torch, diffusers, transformers and peft are imported only where an engine builds its network or computes: a
    simulated stage replica, the ingress, the driver and the registry start without them (seconds of imports on a
    busy CPU, which delayed the replicas the autoscaler adds)."""
    code = ("import sys, deployments.app, deployments.simulate, jobs.registry; "
            "print(sorted(m for m in ('torch', 'torchaudio', 'diffusers', 'transformers', 'peft', 'tokenizers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_build_app_refuses_to_simulate():
    from deployments.app import build_app

    with pytest.raises(ValueError, match="benchmark-only"):
        build_app({"simulate": "gpu"})
    with pytest.raises(ValueError, match="benchmark-only"):
        build_app({"model": {"preset": "tiny", "simulate": COSTS}})


def test_a_simulated_job_completes_over_http_with_silence(serve_http, tmp_path):
    import ray
    from ray import serve

    from deployments.app import build_graph

    name = "sim-test"
    args = {"name": name, "queue": {"max_queued_jobs": 10},
            "files": {"output_dir": str(tmp_path / "results"), "upload_dir": str(tmp_path / "uploads"),
                      "journal_path": None}}
    serve.run(build_graph(args, simulate=COSTS), name=name, route_prefix="/simtest", blocking=False)
    url = serve_http + "/simtest"
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            deadline = time.time() + 120
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.time() < deadline, "the simulated app did not become ready"
                time.sleep(0.5)
            job = client.post("/v1/music/generate", json={"caption": "silence", "audio_duration": 2,
                                                          "inference_steps": 8, "batch_size": 1,
                                                          "audio_format": "wav"}).json()["job_id"]
            while (view := client.get(f"/v1/jobs/{job}").json())["status"] not in ("succeeded", "failed"):
                assert time.time() < deadline, view
                time.sleep(0.1)
            assert view["status"] == "succeeded", view
            audio, rate = sf.read(io.BytesIO(client.get(view["result"]["audio_paths"][0]).content))
            assert rate == 48000 and audio.shape == (2 * 48000, 2) and not np.any(audio)
            # The DiT's share: 8 steps of 50 ms + 1e-4 x 1 row x 50 frames, each slept on the engine thread. The
            # stage time also holds the call's transport and the scheduler's rounds: a generous bound above.
            modelled = 8 * (0.05 + 1e-4 * 1 * math.ceil(2 * 25))
            diffusion = view["result"]["stage_seconds"]["diffusion"]
            assert modelled <= diffusion < modelled + 3.0, (diffusion, modelled)
    finally:
        serve.delete(name)
        try:
            ray.kill(ray.get_actor(f"registry-{name}", namespace="acestep"))
        except ValueError:
            pass
