"""Loading weights from a local diffusers-format directory: exact round trip, clear errors when parts are missing."""

import json
import shutil

import numpy as np
import pytest

from models.codec import AudioCodecEngine
from models.condition import ConditionEngine, ConditionRequest
from models.dit import DiTEngine, DiTRequest
from models.loading import (CheckpointError, ModelConfig, audio_code_spec, load_components, model_variant,
                            save_components, supported_tasks)
from models.presets import build_preset

ALL_PARTS = ["vae", "text_encoder", "tokenizer", "transformer", "condition_encoder", "scheduler", "audio_tokenizer",
             "audio_token_detokenizer"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_components(build_preset("tiny"), tmp_path_factory.mktemp("ckpt") / "acestep-v15-mini")


def _generate(config: ModelConfig) -> np.ndarray:
    [cond] = ConditionEngine(config).encode([ConditionRequest(caption="jazz", lyrics="doo", audio_duration=1.0)])
    [latents] = DiTEngine(config).generate([DiTRequest(condition=cond, seeds=[3], num_inference_steps=2)])
    return AudioCodecEngine(config).decode([latents])[0]


def test_saved_preset_loads_back_bit_exactly(checkpoint):
    built = build_preset("tiny")
    loaded = load_components(ModelConfig(checkpoint_dir=str(checkpoint)), ALL_PARTS)
    for part in ALL_PARTS:
        if hasattr(built[part], "state_dict"):
            a, b = built[part].state_dict(), loaded[part].state_dict()
            assert a.keys() == b.keys()
            assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a), part
    assert loaded["tokenizer"]("hi<|endoftext|>").input_ids == built["tokenizer"]("hi<|endoftext|>").input_ids
    np.testing.assert_array_equal(_generate(ModelConfig(preset="tiny")),
                                  _generate(ModelConfig(checkpoint_dir=str(checkpoint))))


def test_model_name_is_the_directory_name(checkpoint):
    assert ModelConfig(checkpoint_dir=str(checkpoint)).name == "acestep-v15-mini"
    assert ModelConfig(preset="tiny").name == "acestep-v15-tiny"


def test_missing_parts_are_named(checkpoint, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(checkpoint, partial)
    shutil.rmtree(partial / "transformer")
    (partial / "vae" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing transformer, vae/config.json"):
        load_components(ModelConfig(checkpoint_dir=str(partial)), ALL_PARTS)
    with pytest.raises(CheckpointError, match="is not a directory"):
        load_components(ModelConfig(checkpoint_dir=str(tmp_path / "nope")), ["vae"])


def test_optional_audio_token_parts_may_be_absent(checkpoint, tmp_path):
    partial = tmp_path / "no-tokens"
    shutil.copytree(checkpoint, partial)
    shutil.rmtree(partial / "audio_tokenizer")
    loaded = load_components(ModelConfig(checkpoint_dir=str(partial)), ["condition_encoder", "audio_tokenizer"])
    assert loaded["audio_tokenizer"] is None and loaded["condition_encoder"] is not None


def test_preset_keeps_the_audio_contract():
    vae = build_preset("tiny")["vae"]
    assert vae.config.sampling_rate == 48000 and vae.config.audio_channels == 2
    assert np.prod(vae.config.downsampling_ratios) == 1920 and vae.config.decoder_input_channels == 64


@pytest.mark.parametrize("preset,variant", [("tiny", "turbo"), ("small", "turbo"), ("tiny-base", "base"),
                                            ("turbo", "turbo"), ("base", "base"), ("xl-turbo", "turbo")])
def test_each_preset_has_a_variant(preset, variant):
    assert model_variant(ModelConfig(preset=preset)) == variant


def test_the_variant_decides_the_tasks():
    assert supported_tasks(ModelConfig(preset="tiny")) == ("text2music", "cover", "repaint")
    assert supported_tasks(ModelConfig(preset="tiny-base")) == ("text2music", "cover", "repaint", "lego", "extract",
                                                                "complete")
    assert supported_tasks(ModelConfig(preset="tiny-base", variant="sft")) == ("text2music", "cover", "repaint")


def _transformer_only(root, **config):
    """A checkpoint directory holding just a transformer config (all `model_variant` reads)."""
    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "config.json").write_text(json.dumps({"_class_name": "AceStepTransformer1DModel",
                                                                  **config}))
    return str(root)


@pytest.mark.parametrize("config,variant", [
    ({"is_turbo": True, "model_version": "turbo"}, "turbo"),
    ({"is_turbo": False, "model_version": "turbo"}, "turbo"),  # AceStepPipeline's rule: either says turbo
    ({"is_turbo": False, "model_version": "base"}, "base"),
    ({"is_turbo": False, "model_version": "xl-base"}, "base"),
    ({"is_turbo": False, "model_version": "sft"}, "sft"),
    ({"is_turbo": False, "model_version": None}, "sft"),  # says neither: the variant with fewer tasks
    ({"is_turbo": False}, "sft"),
])
def test_a_checkpoints_variant_comes_from_its_transformer_config(tmp_path, config, variant):
    assert model_variant(ModelConfig(checkpoint_dir=_transformer_only(tmp_path / "ckpt", **config))) == variant


def test_an_explicit_variant_wins_unless_it_contradicts_is_turbo(tmp_path):
    non_turbo = _transformer_only(tmp_path / "plain", is_turbo=False, model_version=None)
    assert model_variant(ModelConfig(checkpoint_dir=non_turbo, variant="base")) == "base"
    with pytest.raises(CheckpointError, match="model.variant 'turbo' contradicts"):
        model_variant(ModelConfig(checkpoint_dir=non_turbo, variant="turbo"))
    with pytest.raises(CheckpointError, match="model.variant 'base' contradicts"):
        model_variant(ModelConfig(preset="tiny", variant="base"))


def test_audio_code_spec_of_a_preset_and_of_a_checkpoint_without_the_token_parts(checkpoint, tmp_path):
    spec = audio_code_spec(ModelConfig(preset="tiny"))
    assert (spec.codebook_size, spec.frames_per_code, spec.seconds_per_code) == (64000, 5, 0.2)
    assert audio_code_spec(ModelConfig(checkpoint_dir=str(checkpoint))) == spec
    partial = tmp_path / "no-detokenizer"
    shutil.copytree(checkpoint, partial)
    shutil.rmtree(partial / "audio_token_detokenizer")
    assert audio_code_spec(ModelConfig(checkpoint_dir=str(partial))) is None
