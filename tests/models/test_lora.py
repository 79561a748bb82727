"""Per-job LoRA adapters on the tiny DiT: an adapter changes the output, changes nothing for the jobs around it
(alone = next to a job without one, before or after it is loaded), never shares a forward pass with another adapter
or scale, stays within its LRU bound, and bad names or files fail their own job only."""

import asyncio
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from jobs.step_scheduler import StepScheduler, StepSchedulingConfig
from models.condition import ConditionEngine, ConditionRequest
from models.dit import DiTEngine, DiTRequest
from models.dit_attention import KeyPaddingAttnProcessor
from models.loading import CheckpointError, ModelConfig
from models.lora import (LORA_WEIGHT_NAME_SAFE, AdapterError, AdapterLoadError, AdapterRegistry, UnknownAdapterError,
                         adapter_path, available_adapters, write_random_adapter)

ATOL = 2e-5  # as tests/models/test_batching.py


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    write_random_adapter("tiny", root / "style", seed=1)
    write_random_adapter("tiny", root / "style-a8", seed=1, alpha=8)  # rank 4: twice "style"'s delta
    write_random_adapter("tiny", root / "style-peft", seed=1, alpha=8, layout="peft")
    write_random_adapter("tiny", root / "other", seed=2)
    write_random_adapter("tiny", root / "third", seed=3)
    return root


@pytest.fixture(scope="module")
def dit(lora_dir):
    return DiTEngine(ModelConfig(preset="tiny", lora_dir=str(lora_dir), max_loaded_adapters=2))


@pytest.fixture(scope="module")
def conditions():
    conds = ConditionEngine(ModelConfig(preset="tiny")).encode(
        [ConditionRequest(caption=c, lyrics=l, audio_duration=d) for c, l, d in
         (("a", "", 1.0), ("a much longer caption", "la la la", 1.4))])
    assert conds[0].latent_length != conds[1].latent_length
    return conds


def _request(conditions, i=0, **kwargs):
    return DiTRequest(condition=conditions[i], seeds=[i + 1], num_inference_steps=4, tag=f"job{i}", **kwargs)


def _alone(dit, request) -> np.ndarray:
    [latents] = dit.generate([request])
    return latents


def test_an_adapter_changes_the_output_and_nothing_after_it(dit, conditions):
    plain = _alone(dit, _request(conditions))
    styled = _alone(dit, _request(conditions, lora="style"))
    half = _alone(dit, _request(conditions, lora="style", lora_scale=0.5))
    assert styled.shape == plain.shape
    assert np.abs(styled - plain).max() > 1e-2 and np.abs(half - plain).max() > 1e-2
    assert np.abs(styled - half).max() > 1e-2
    # Loaded but off, the LoRA layers are their base layers: bit for bit the output of a model that never had one.
    np.testing.assert_array_equal(_alone(dit, _request(conditions)), plain)
    # The attention processor is untouched: one shared KeyPaddingAttnProcessor in every layer (LoRA wraps Linears).
    processors = dit.transformer.attn_processors.values()
    assert {type(p) for p in processors} == {KeyPaddingAttnProcessor} and len({id(p) for p in processors}) == 1


def test_same_alone_and_next_to_jobs_without_one(dit, conditions):
    styled = [_alone(dit, _request(conditions, i, lora="style")) for i in range(2)]
    plain = [_alone(dit, _request(conditions, i)) for i in range(2)]
    # One generate call: the adapter's passes and the plain passes run apart, in either order.
    for order in ([0, 1], [1, 0]):
        requests = [_request(conditions, 0, lora="style"), _request(conditions, 1)]
        got = dit.generate([requests[i] for i in order])
        np.testing.assert_allclose(got[order.index(0)], styled[0], atol=ATOL)
        np.testing.assert_allclose(got[order.index(1)], plain[1], atol=ATOL)
    # Step by step, passes alternating between the adapter and none (what step-level scheduling does).
    with_lora, without = dit.start(_request(conditions, 0, lora="style")), dit.start(_request(conditions, 0))
    while not with_lora.done:
        dit.step([with_lora])
        dit.step([without])
    np.testing.assert_allclose(with_lora.latents(), styled[0], atol=ATOL)
    np.testing.assert_allclose(without.latents(), plain[0], atol=ATOL)
    # Two jobs of different lengths with the adapter share a pass: padding masked, LoRA applied, as alone.
    states = [dit.start(_request(conditions, i, lora="style")) for i in range(2)]
    while not states[0].done:
        dit.step(states)
    for state, expected in zip(states, styled):
        np.testing.assert_allclose(state.latents(), expected, atol=ATOL)


def test_adapters_and_scales_never_share_a_forward_pass(dit, conditions):
    key = lambda **kw: dit.batch_key(_request(conditions, **kw))  # noqa: E731
    keys = [key(), key(lora="style"), key(lora="style", lora_scale=0.5), key(lora="other")]
    assert len(set(keys)) == 4
    # Scale 0 adds exactly nothing, so it runs, and batches, as no adapter; a scale without an adapter is no adapter.
    assert key(lora="style", lora_scale=0.0) == key() == key(lora_scale=0.5)
    np.testing.assert_array_equal(_alone(dit, _request(conditions, lora="style", lora_scale=0.0)),
                                  _alone(dit, _request(conditions)))
    with pytest.raises(AssertionError, match="batch keys"):
        dit.step([dit.start(_request(conditions, lora="style")), dit.start(_request(conditions, lora="style",
                                                                                       lora_scale=0.5))])
    with pytest.raises(AdapterError, match="finite"):
        dit.start(_request(conditions, lora="style", lora_scale=float("nan")))

    async def scheduled():  # the step scheduler, all four jobs in one round: who shared a pass with whom
        scheduler = StepScheduler(dit, StepSchedulingConfig(batch_wait_timeout_s=0.5, split="padding",
                                                            max_padding=100.0))
        kinds = [dict(lora="style"), dict(lora="style"), dict(lora="style", lora_scale=0.5), {}]
        records = [{} for _ in kinds]
        results = await asyncio.gather(*(scheduler.submit(_request(conditions, i % 2, **kw), record, company=4)
                                         for i, (kw, record) in enumerate(zip(kinds, records))))
        return results, [r["max_jobs_per_pass"] for r in records]

    results, shared = asyncio.run(scheduled())
    assert shared == [2, 2, 1, 1]
    np.testing.assert_allclose(results[2], _alone(dit, _request(conditions, 0, lora="style", lora_scale=0.5)),
                               atol=ATOL)
    np.testing.assert_allclose(results[3], _alone(dit, _request(conditions, 1)), atol=ATOL)


def test_loaded_adapters_stay_within_the_lru_bound(dit, conditions):
    first = {name: _alone(dit, _request(conditions, lora=name)) for name in ("style", "other")}
    assert dit.adapters.loaded == ["style", "other"]
    _alone(dit, _request(conditions, lora="style"))  # most recently used now
    _alone(dit, _request(conditions, lora="third"))
    assert dit.adapters.loaded == ["style", "third"]  # "other", least recently used, was deleted from the model
    assert len(dit.transformer.peft_config) == 2
    assert {n.split(".")[-2] for n, _ in dit.transformer.named_parameters() if ".lora_" in n} == \
        set(dit.transformer.peft_config)
    # Evicted and loaded again, an adapter gives what it gave.
    np.testing.assert_allclose(_alone(dit, _request(conditions, lora="other")), first["other"], atol=ATOL)
    assert dit.adapters.loaded == ["third", "other"]


def test_peft_layout_equals_diffusers_layout(dit, conditions):
    """ACE-Step's own layout (PEFT, q_proj names, alpha in adapter_config.json) reads as the diffusers one."""
    peft = _alone(dit, _request(conditions, lora="style-peft"))
    np.testing.assert_allclose(peft, _alone(dit, _request(conditions, lora="style-a8")), atol=ATOL)
    assert np.abs(peft - _alone(dit, _request(conditions, lora="style"))).max() > 1e-2


@pytest.mark.parametrize("name", ["nope", "../style", "style/..", "..", "/etc", "a/b", ".hidden", "", "style\\x"])
def test_unknown_and_path_traversal_names_are_rejected(dit, conditions, lora_dir, name):
    with pytest.raises(UnknownAdapterError):
        adapter_path(lora_dir, name)
    with pytest.raises(UnknownAdapterError):
        dit.start(_request(conditions, lora=name, lora_scale=0.0))  # checked even where it would add nothing


def test_names_and_configuration(lora_dir, tmp_path):
    from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE as diffusers_weight_name

    assert LORA_WEIGHT_NAME_SAFE == diffusers_weight_name  # the name, kept without importing diffusers' loaders
    assert available_adapters(lora_dir) == ["other", "style", "style-a8", "style-peft", "third"]
    assert adapter_path(lora_dir, "style") == lora_dir / "style"
    with pytest.raises(UnknownAdapterError, match="lora_dir is not set"):
        adapter_path(None, "style")
    (tmp_path / "empty").mkdir()
    assert available_adapters(tmp_path) == []
    with pytest.raises(UnknownAdapterError, match="neither"):
        adapter_path(tmp_path, "empty")
    with pytest.raises(CheckpointError, match="not a directory"):  # what DiTEngine raises at start-up
        AdapterRegistry(torch.nn.Linear(1, 1), str(tmp_path / "missing"), max_loaded=1)


def test_a_bad_adapter_fails_alone(lora_dir, conditions, tmp_path):
    shutil.copytree(lora_dir / "style", tmp_path / "style")
    write_random_adapter("small", tmp_path / "wrong-shapes", seed=1)
    (tmp_path / "truncated").mkdir()
    data = (lora_dir / "style" / "pytorch_lora_weights.safetensors").read_bytes()
    (tmp_path / "truncated" / "pytorch_lora_weights.safetensors").write_bytes(data[: len(data) // 2])
    write_random_adapter("tiny", tmp_path / "no-config", layout="peft")
    (tmp_path / "no-config" / "adapter_config.json").unlink()
    write_random_adapter("tiny", tmp_path / "wrong-rank", seed=1)  # its header says r=8, its weights are rank 4
    weights = tmp_path / "wrong-rank" / "pytorch_lora_weights.safetensors"
    with safe_open(str(weights), "pt") as f:
        header = f.metadata()
    config = json.loads(header["lora_adapter_metadata"])
    header["lora_adapter_metadata"] = json.dumps({**config, "transformer.r": 8})
    save_file(load_file(str(weights)), str(weights), metadata=header)
    write_random_adapter("tiny", tmp_path / "nan", seed=1)
    tensors = load_file(str(tmp_path / "nan" / "pytorch_lora_weights.safetensors"))
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan" / "pytorch_lora_weights.safetensors"))

    dit = DiTEngine(ModelConfig(preset="tiny", lora_dir=str(tmp_path)))
    plain, styled = _alone(dit, _request(conditions)), _alone(dit, _request(conditions, lora="style"))
    for name, message in [("wrong-shapes", "this DiT's layer maps 64 -> 32"), ("truncated", "cannot read"),
                          ("no-config", "without adapter_config.json"), ("wrong-rank", "size mismatch"),
                          ("nan", "NaN")]:
        with pytest.raises(AdapterLoadError, match=message):
            dit.generate([_request(conditions, lora=name)])
        assert dit.adapters.loaded == ["style"] and len(dit.transformer.peft_config) == 1
    np.testing.assert_array_equal(_alone(dit, _request(conditions)), plain)
    np.testing.assert_array_equal(_alone(dit, _request(conditions, lora="style")), styled)
