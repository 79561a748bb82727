"""An operator's real-weights path: `checkpoint_dir` pointing at a local diffusers-format directory."""

from __future__ import annotations

import io
import shutil

import httpx
import numpy as np
import pytest
import soundfile as sf

from deployments.app import AppArgs, build_app
from models.loading import CheckpointError, save_components
from models.presets import build_preset
from tests.conftest import deployed, wav_bytes
from tests.deployments.conftest import run_job


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """The tiny preset saved as a checkpoint, without the optional audio tokenizer pair (as some exports ship)."""
    root = save_components(build_preset("tiny"), tmp_path_factory.mktemp("weights") / "acestep-v15-local")
    for part in ("audio_tokenizer", "audio_token_detokenizer"):
        shutil.rmtree(root / part)
    return root


def test_app_serves_a_local_checkpoint(serve_http, dirs, checkpoint_dir, client):
    args = {"name": "ckpt-test", "model": {"checkpoint_dir": str(checkpoint_dir),
                                           "stages": {"condition": {"device": "cpu"}, "dit": {"dtype": "float32"}}},
            "files": {"output_dir": str(dirs["results"]), "upload_dir": str(dirs["uploads"]),
                      "journal_path": str(dirs["journal"])}}
    payload = {"caption": "same weights", "audio_duration": 1, "batch_size": 1, "use_random_seed": False,
               "seed": 5, "audio_format": "wav", "inference_steps": 3}
    with deployed(args, "ckpt-test", "/ckpt", serve_http) as url, httpx.Client(base_url=url, timeout=30) as ckpt_client:
        assert ckpt_client.get("/v1/models").json()["default_model"] == "acestep-v15-local"
        view = run_job(ckpt_client, {**payload, "model": "acestep-v15-local"})
        assert view["result"]["dit_model"] == "acestep-v15-local"
        from_checkpoint = ckpt_client.get(view["result"]["first_audio_path"]).content
        # What this model cannot serve is a 400 at submit, not a failure inside a condition batch.
        cover = ckpt_client.post("/v1/music/generate", data={"task_type": "cover", "batch_size": "1"},
                                 files={"src_audio": ("s.wav", wav_bytes(1.0), "audio/wav")})
        assert cover.status_code == 400 and "audio_tokenizer" in cover.json()["detail"], cover.text
        by_reference = ckpt_client.post("/v1/music/generate", data={"task_type": "cover", "batch_size": "1"},
                                        files={"reference_audio": ("r.wav", wav_bytes(1.0), "audio/wav")})
        assert by_reference.status_code == 200, by_reference.text
        codes = ckpt_client.post("/v1/music/generate", json={"audio_code_string": [1, 2]})
        assert codes.status_code == 400 and codes.json()["detail"] == (
            "audio_code_string needs the checkpoint's audio_tokenizer and audio_token_detokenizer, which model "
            "'acestep-v15-local' does not have"), codes.text
    # The saved preset is the embedded preset: the same request gives the same audio in both apps (to a PCM-16
    # step: separate processes may sum floats in another order).
    from_preset = client.get(run_job(client, payload)["result"]["first_audio_path"]).content
    a, b = (sf.read(io.BytesIO(data))[0] for data in (from_checkpoint, from_preset))
    assert a.shape == b.shape == (48000, 2)
    np.testing.assert_allclose(a, b, atol=3 / 32768)


def test_missing_checkpoint_fails_at_build_time(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="not a directory"):
        build_app({"model": {"checkpoint_dir": str(tmp_path / "absent")}})
    (tmp_path / "partial" / "vae").mkdir(parents=True)
    monkeypatch.setattr("deployments.envs.ACESTEP_CHECKPOINT_DIR", str(tmp_path / "partial"))
    with pytest.raises(CheckpointError, match="missing transformer, condition_encoder, text_encoder, tokenizer"):
        build_app({})


def test_further_models_are_checked_at_build_time():
    """`models:` entries need their own names and the default model's VAE (they share its AudioCodec); they take
    dtype, device, seed and stages from `model` unless they set them."""
    with pytest.raises(ValueError, match="model 'acestep-v15-tiny' is configured twice"):
        build_app({"models": [{"preset": "tiny"}]})
    with pytest.raises(ValueError, match="model 'acestep-v15-turbo' has another VAE than the default model"):
        build_app({"models": [{"preset": "turbo"}]})
    args = AppArgs.model_validate({"model": {"preset": "tiny", "dtype": "bfloat16", "seed": 3},
                                   "models": [{"preset": "tiny-base", "seed": 5}]})
    [extra] = args.models
    assert (extra.preset, extra.dtype, extra.seed, extra.checkpoint_dir) == ("tiny-base", "bfloat16", 5, None)


def test_a_missing_lm_checkpoint_fails_at_build_time(tmp_path):
    with pytest.raises(CheckpointError, match="LM checkpoint_dir .* is not a directory"):
        build_app({"lm": {"checkpoint_dir": str(tmp_path / "absent")}})
