"""The three engines called in sequence give the audio of `diffusers.AceStepPipeline` for the same weights and seeds."""

import numpy as np
import pytest
import torch
from diffusers import AceStepPipeline

from models.codec import AudioCodecEngine
from models.condition import ConditionEngine, ConditionRequest
from models.dit import DiTEngine, DiTRequest
from models.loading import ModelConfig, load_components

CONFIG = ModelConfig(preset="tiny")
SEEDS = [11, 12]


@pytest.fixture(scope="module")
def engines():
    return ConditionEngine(CONFIG), DiTEngine(CONFIG), AudioCodecEngine(CONFIG)


@pytest.fixture(scope="module")
def pipeline():
    pipe = AceStepPipeline(**load_components(CONFIG, ["vae", "text_encoder", "tokenizer", "transformer",
                                                      "condition_encoder", "scheduler", "audio_tokenizer",
                                                      "audio_token_detokenizer"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _split_path(engines, request: ConditionRequest, **sampling) -> np.ndarray:
    condition, dit, codec = engines
    [cond] = condition.encode([request])
    [latents] = dit.generate([DiTRequest(condition=cond, seeds=SEEDS, **sampling)])
    [audio] = codec.decode([latents])
    return audio


def _generators():
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def test_text2music_matches_pipeline(engines, pipeline):
    kwargs = dict(caption="lofi piano, rain", lyrics="[verse]\nla la la", audio_duration=2.0, bpm=90,
                  keyscale="A minor", timesignature="4")
    ours = _split_path(engines, ConditionRequest(**kwargs), num_inference_steps=4)
    theirs = pipeline(prompt=[kwargs["caption"]] * 2, lyrics=[kwargs["lyrics"]] * 2, audio_duration=2.0,
                      num_inference_steps=4, bpm=90, keyscale="A minor", timesignature="4",
                      generator=_generators()).audios.numpy()
    assert ours.shape == theirs.shape == (2, 2, 96000)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert not np.allclose(ours[0], ours[1]), "different seeds must give different audio"


def test_repaint_matches_pipeline(engines, pipeline):
    _, _, codec = engines
    source = np.random.default_rng(0).uniform(-0.5, 0.5, size=(2, 48000)).astype(np.float32)
    torch.manual_seed(5)
    theirs = pipeline(prompt=["guitar"] * 2, lyrics=[""] * 2, task_type="repaint", src_audio=torch.from_numpy(source),
                      audio_duration=1.0,
                      repainting_start=0.2, repainting_end=0.6, num_inference_steps=3,
                      generator=_generators()).audios.numpy()
    torch.manual_seed(5)
    src_latents = codec.encode(source, kind="source")
    ours = _split_path(engines, ConditionRequest(caption="guitar", lyrics="", audio_duration=1.0,
                                                 task_type="repaint", src_latents=src_latents, repainting_start=0.2,
                                                 repainting_end=0.6), num_inference_steps=3)
    assert ours.shape == theirs.shape == (2, 2, 48000)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_a_canceled_job_leaves_the_batch_and_the_rest_is_unchanged(engines):
    condition, dit, _ = engines
    conds = condition.encode([ConditionRequest(caption=c, lyrics="", audio_duration=1.0) for c in ("aa", "bb", "cc")])
    requests = [DiTRequest(condition=c, seeds=[i, i + 10], num_inference_steps=4, tag=f"job{i}")
                for i, c in enumerate(conds)]
    full = dit.generate(requests)
    seen = []

    def cancel_job1(tags, step, total, seconds):
        seen.append((tuple(tags), step))
        return {"job1"} if step == 2 else set()

    partial = dit.generate(requests, on_step=cancel_job1)
    assert partial[1] is None
    for i in (0, 2):
        np.testing.assert_allclose(partial[i], full[i], atol=1e-5)
    assert seen[2] == (("job0", "job2"), 3)  # job1 was gone from step 3 on
