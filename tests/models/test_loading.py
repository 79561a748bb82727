"""Loading weights from a local diffusers-format directory: exact round trip, clear errors when parts are missing."""

import shutil

import numpy as np
import pytest

from models.codec import AudioCodecEngine
from models.condition import ConditionEngine, ConditionRequest
from models.dit import DiTEngine, DiTRequest
from models.loading import CheckpointError, ModelConfig, load_components, save_components
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
