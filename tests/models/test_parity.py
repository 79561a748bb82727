"""The three engines called in sequence give the audio of `diffusers.AceStepPipeline` for the same weights and seeds."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import AceStepPipeline

from models.codec import AudioCodecEngine
from models.condition import ConditionEngine, ConditionRequest
from models.dit import DiTEngine, DiTRequest
from models.loading import ModelConfig, load_components

CONFIG = ModelConfig(preset="tiny")
BASE_CONFIG = ModelConfig(preset="tiny-base")  # the same weights with a base DiT: CFG + APG guidance runs
SEEDS = [11, 12]


def _engines(config: ModelConfig):
    return ConditionEngine(config), DiTEngine(config), AudioCodecEngine(config)


def _pipeline(config: ModelConfig) -> AceStepPipeline:
    pipe = AceStepPipeline(**load_components(config, ["vae", "text_encoder", "tokenizer", "transformer",
                                                      "condition_encoder", "scheduler", "audio_tokenizer",
                                                      "audio_token_detokenizer"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def engines():
    return _engines(CONFIG)


@pytest.fixture(scope="module")
def pipeline():
    return _pipeline(CONFIG)


@pytest.fixture(scope="module")
def base_engines():
    return _engines(BASE_CONFIG)


@pytest.fixture(scope="module")
def base_pipeline():
    return _pipeline(BASE_CONFIG)


def _split_path(engines, request: ConditionRequest, **sampling) -> np.ndarray:
    return _split_latents_and_audio(engines, request, **sampling)[1]


def _split_latents_and_audio(engines, request: ConditionRequest, **sampling) -> tuple[np.ndarray, np.ndarray]:
    condition, dit, codec = engines
    [cond] = condition.encode([request])
    [latents] = dit.generate([DiTRequest(condition=cond, seeds=SEEDS, **sampling)])
    [audio] = codec.decode([latents])
    return latents, audio


def _pipeline_latents_and_audio(pipe: AceStepPipeline, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """The pipeline's final latents (from its step-end callback) and audio, from one call.

    Latents are compared too: the tiny VAE decoder shrinks a latent difference about 100-fold (a different caption or
    timbre moves the audio by only ~2e-4), so the audio alone at 1e-5 would say little about the conditions.
    """
    final = {}

    def keep_latents(_pipe, _step, _timestep, tensors):
        final["latents"] = tensors["latents"]
        return None

    audio = pipe(generator=_generators(), callback_on_step_end=keep_latents, **kwargs).audios.numpy()
    return final["latents"].numpy(), audio


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


def _assert_matches(ours: tuple[np.ndarray, np.ndarray], theirs: tuple[np.ndarray, np.ndarray], seconds: int):
    (our_latents, our_audio), (their_latents, their_audio) = ours, theirs
    assert our_latents.shape == their_latents.shape == (2, 25 * seconds, 64)
    assert our_audio.shape == their_audio.shape == (2, 2, 48000 * seconds)
    np.testing.assert_allclose(our_latents, their_latents, atol=1e-5)
    np.testing.assert_allclose(our_audio, their_audio, atol=1e-5)


def test_cfg_with_apg_matches_pipeline(base_engines, base_pipeline):
    """Base models: a cond + null forward pass per step, APG with momentum, only inside the CFG interval."""
    _, dit, _ = base_engines
    assert not dit.is_turbo and not base_pipeline.is_turbo
    kwargs = dict(caption="lofi piano, rain", lyrics="[verse]\nla la la", audio_duration=2.0, bpm=90)
    # 4 steps at shift 3: t = 1, 0.9, 0.75, 0.5, so a [0.2, 1] interval guides the last two steps only.
    latents = {}
    for interval in [(0.0, 1.0), (0.2, 1.0)]:
        sampling = dict(num_inference_steps=4, guidance_scale=5.0, cfg_interval_start=interval[0],
                        cfg_interval_end=interval[1])
        ours = _split_latents_and_audio(base_engines, ConditionRequest(**kwargs), **sampling)
        theirs = _pipeline_latents_and_audio(base_pipeline, prompt=[kwargs["caption"]] * 2,
                                             lyrics=[kwargs["lyrics"]] * 2, audio_duration=2.0, bpm=90, **sampling)
        _assert_matches(ours, theirs, seconds=2)
        latents[interval] = ours[0]
    unguided, _ = _split_latents_and_audio(base_engines, ConditionRequest(**kwargs), num_inference_steps=4,
                                           guidance_scale=1.0)
    assert not np.allclose(latents[(0.0, 1.0)], unguided, atol=1e-2), "guidance must change the latents"
    assert not np.allclose(latents[(0.0, 1.0)], latents[(0.2, 1.0)], atol=1e-2), "so must the interval"


@pytest.mark.parametrize("base", [False, True], ids=["turbo", "cfg"])
def test_cover_blend_matches_pipeline(engines, pipeline, base_engines, base_pipeline, base):
    """Cover from source audio at strength 0.5: the velocity blends the cover conditions (after APG, on base models)
    with text2music ones, whose instruction, hence token count, differs (our rows are padded and masked)."""
    engines, pipeline = (base_engines, base_pipeline) if base else (engines, pipeline)
    _, _, codec = engines
    source = np.random.default_rng(1).uniform(-0.5, 0.5, size=(2, 48000)).astype(np.float32)
    torch.manual_seed(7)  # the VAE posterior sample
    theirs = _pipeline_latents_and_audio(pipeline, prompt=["drums"] * 2, lyrics=["[verse]\nboom"] * 2,
                                         task_type="cover", src_audio=torch.from_numpy(source), audio_duration=1.0,
                                         audio_cover_strength=0.5, num_inference_steps=3, guidance_scale=5.0)
    torch.manual_seed(7)
    src_latents = codec.encode(source, kind="source")
    request = ConditionRequest(caption="drums", lyrics="[verse]\nboom", audio_duration=1.0, task_type="cover",
                               src_latents=src_latents, audio_cover_strength=0.5)
    [cond] = engines[0].encode([request])
    assert cond.non_cover_hidden_states.shape[0] != cond.encoder_hidden_states.shape[0]
    ours = _split_latents_and_audio(engines, request, num_inference_steps=3, guidance_scale=5.0,
                                    audio_cover_strength=0.5)
    _assert_matches(ours, theirs, seconds=1)
    whole = ConditionRequest(**{**vars(request), "audio_cover_strength": 1.0})
    full_cover, _ = _split_latents_and_audio(engines, whole, num_inference_steps=3, guidance_scale=5.0)
    assert not np.allclose(ours[0], full_cover, atol=1e-2), "the text2music blend must change the latents"


@pytest.mark.parametrize("task,fields", [
    ("lego", dict(track_name="drums", repainting_start=0.2, repainting_end=0.6)),
    ("extract", dict(track_name="vocals")),
    ("complete", dict(track_classes=["drums", "bass"])),
])
def test_track_tasks_match_pipeline(base_engines, base_pipeline, task, fields):
    """The base model's track tasks: the pipeline's instruction for the task and track(s), the whole source as
    context (lego: the chunk mask marks the region to generate; extract, complete: all ones), CFG + APG."""
    condition, _, codec = base_engines
    source = np.random.default_rng(3).uniform(-0.5, 0.5, size=(2, 48000)).astype(np.float32)
    renamed = {("complete_track_classes" if k == "track_classes" else k): v for k, v in fields.items()}
    torch.manual_seed(13)  # the VAE posterior sample
    theirs = _pipeline_latents_and_audio(base_pipeline, prompt=["funk"] * 2, lyrics=["[verse]\nyeah"] * 2,
                                         task_type=task, src_audio=torch.from_numpy(source), audio_duration=1.0,
                                         num_inference_steps=3, guidance_scale=5.0, **renamed)
    torch.manual_seed(13)
    src_latents = codec.encode(source, kind="source")
    request = ConditionRequest(caption="funk", lyrics="[verse]\nyeah", audio_duration=1.0, task_type=task,
                               src_latents=src_latents, **fields)
    ours = _split_latents_and_audio(base_engines, request, num_inference_steps=3, guidance_scale=5.0)
    _assert_matches(ours, theirs, seconds=1)

    named, generic = condition.encode([request, replace(request, track_name=None, track_classes=None)])
    assert not np.array_equal(named.encoder_hidden_states, generic.encoder_hidden_states), \
        "the track(s) must reach the instruction"
    np.testing.assert_array_equal(named.context_latents[:, :64], src_latents)  # the source itself, not silence
    mask = named.context_latents[:, 64:]
    if task == "lego":  # frames 5..14 (0.2-0.6 s at 25 per second) are generated, the rest kept
        assert (mask[5:15] == 1).all() and (mask[:5] == 0).all() and (mask[15:] == 0).all()
    else:
        assert (mask == 1).all()


def test_audio_codes_match_pipeline(engines, pipeline):
    """`audio_codes`: text2music runs as cover on the detokenized codes, whose count sets the length (10 codes of
    5 frames: 2 s); the pipeline derives the duration from them when it gets none."""
    codes = "".join(f"<|audio_code_{n}|>" for n in (5, 900, 63999, 12, 40000, 7, 7, 31000, 2, 150))
    theirs = _pipeline_latents_and_audio(pipeline, prompt=["ambient"] * 2, lyrics=[""] * 2, audio_codes=codes,
                                         audio_duration=None, num_inference_steps=3)
    request = ConditionRequest(caption="ambient", lyrics="", audio_duration=2.0, audio_codes=codes)
    assert request.task == "cover"
    ours = _split_latents_and_audio(engines, request, num_inference_steps=3)
    _assert_matches(ours, theirs, seconds=2)
    plain, _ = _split_latents_and_audio(engines, replace(request, audio_codes=None), num_inference_steps=3)
    assert not np.allclose(ours[0], plain, atol=1e-2), "the codes must change the latents"


@pytest.mark.slow
def test_reference_timbre_matches_pipeline(engines, pipeline):
    """A reference clip (looped to the pipeline's 30 s excerpt, VAE-encoded) replaces the silence timbre.

    Slow: each side VAE-encodes 30 s of audio (~30 s each on an idle 2-core CPU).
    """
    _, _, codec = engines
    reference = np.random.default_rng(2).uniform(-0.5, 0.5, size=(2, 96000)).astype(np.float32)
    kwargs = dict(caption="synth pad", lyrics="ooh", audio_duration=1.0)
    torch.manual_seed(9)  # the VAE posterior sample
    theirs = _pipeline_latents_and_audio(pipeline, prompt=[kwargs["caption"]] * 2, lyrics=[kwargs["lyrics"]] * 2,
                                         audio_duration=1.0, reference_audio=torch.from_numpy(reference),
                                         num_inference_steps=3)
    reference_latents = codec.encode(reference, kind="reference", seed=9)
    assert reference_latents.shape == (750, 64)  # 30 s at 25 frames per second
    ours = _split_latents_and_audio(engines, ConditionRequest(**kwargs, reference_latents=reference_latents),
                                    num_inference_steps=3)
    _assert_matches(ours, theirs, seconds=1)
    silence, _ = _split_latents_and_audio(engines, ConditionRequest(**kwargs), num_inference_steps=3)
    assert not np.allclose(ours[0], silence, atol=1e-2), "the reference timbre must change the latents"


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
