"""Cross-job batching changes no result: a job's latents are the same alone, in a mixed batch of other lengths and
prompt lengths, or joining a batch that is already mid-way; and jobs that cannot share a forward pass never do."""

import numpy as np
import pytest
import torch

from models.condition import ConditionEngine, ConditionRequest
from models.dit import DiTEngine, DiTRequest
from models.loading import ModelConfig

CONFIG = ModelConfig(preset="tiny")
# Different durations (odd and even frame counts), prompt lengths and lyrics.
JOBS = [("a", "", 1.0, [1]), ("a much longer caption", "la la la", 1.4, [2, 3]),
        ("drums", "one two three four five six seven eight nine ten", 2.24, [4])]


@pytest.fixture(scope="module")
def engines():
    return ConditionEngine(CONFIG), DiTEngine(CONFIG)


@pytest.fixture(scope="module")
def requests_(engines):
    condition, _ = engines
    conds = condition.encode([ConditionRequest(caption=c, lyrics=l, audio_duration=d) for c, l, d, _ in JOBS])
    assert len({c.latent_length for c in conds}) == 3 and len({c.encoder_hidden_states.shape[0] for c in conds}) == 3
    return [DiTRequest(condition=c, seeds=seeds, num_inference_steps=4, tag=f"job{i}")
            for i, (c, (*_, seeds)) in enumerate(zip(conds, JOBS))]


def _alone(dit: DiTEngine, request: DiTRequest) -> np.ndarray:
    [latents] = dit.generate([request])
    return latents


def _run(dit: DiTEngine, states) -> None:
    while states:
        dit.step(states)
        states = [s for s in states if not s.done]


@pytest.mark.parametrize("turbo", [True, False], ids=["turbo", "cfg"])
def test_mixed_batch_equals_alone(engines, requests_, turbo, monkeypatch):
    _, dit = engines
    monkeypatch.setattr(dit.pipe, "is_turbo", turbo)  # the CFG + APG path of base models, on the same weights
    alone = [_alone(dit, r) for r in requests_]
    states = [dit.start(r) for r in requests_]
    assert len({s.key for s in states}) == 1
    _run(dit, states)
    for state, expected in zip(states, alone):
        assert state.latents().shape == expected.shape
        np.testing.assert_allclose(state.latents(), expected, atol=2e-5)
    assert not np.allclose(alone[1][0], alone[1][1])  # each output has its own seed


def test_joining_mid_way_equals_alone(engines, requests_):
    """Step-level scheduling: job 1 joins when job 0 is at step 2, job 2 at step 3; each keeps its own timestep."""
    _, dit = engines
    alone = [_alone(dit, r) for r in requests_]
    first, second, third = (dit.start(r) for r in requests_)
    dit.step([first])
    dit.step([first])
    dit.step([first, second])
    dit.step([first, second, third])
    assert first.done and second.step == 2 and third.step == 1
    _run(dit, [second, third])
    for state, expected in zip((first, second, third), alone):
        np.testing.assert_allclose(state.latents(), expected, atol=2e-5)


def test_requests_that_cannot_share_a_forward_pass_never_do(engines, requests_):
    _, dit = engines
    base = requests_[0]
    others = [DiTRequest(condition=base.condition, seeds=[1], num_inference_steps=6),
              DiTRequest(condition=base.condition, seeds=[1], num_inference_steps=4, shift=1.0),
              DiTRequest(condition=base.condition, seeds=[1], num_inference_steps=4, timesteps=[0.9, 0.5, 0.2])]
    keys = {dit.batch_key(r) for r in [base, *others]}
    assert len(keys) == 4
    with pytest.raises(AssertionError, match="batch keys"):
        dit.step([dit.start(base), dit.start(others[0])])
    dit.pipe.is_turbo = False
    try:  # guidance matters only where it is applied (base models)
        assert dit.batch_key(base) != dit.batch_key(DiTRequest(condition=base.condition, seeds=[1],
                                                               num_inference_steps=4, guidance_scale=3.0))
    finally:
        dit.pipe.is_turbo = True


def test_naive_padding_would_change_results(engines, requests_):
    """Why the masks exist: diffusers' own forward over the same padded batch gives job 0 a different velocity."""
    _, dit = engines
    states = [dit.start(r) for r in requests_[:2]]
    rows = [(s.xt, float(s.scheduler.timesteps[0]), s.conditions, s.context, s.xt.shape[0]) for s in states]
    masked = dit._forward(rows)[0][:, :states[0].frames]
    alone = dit._forward(rows[:1])[0]
    np.testing.assert_allclose(masked, alone, atol=2e-5)
    # Unmasked: pad job 0 to job 1's lengths and call the model directly.
    length, width = states[1].frames, states[1].conditions.shape[0]
    pad = lambda t, n: np.pad(t.numpy(), [(0, 0)] * (t.dim() - 2) + [(0, n - t.shape[-2]), (0, 0)])
    x = torch.from_numpy(pad(states[0].xt, length))
    enc = torch.from_numpy(pad(states[0].conditions, width))[None]
    ctx = torch.from_numpy(pad(states[0].context, length))[None]
    t = torch.full((1,), rows[0][1])
    naive = dit.transformer(hidden_states=x, timestep=t, timestep_r=t, encoder_hidden_states=enc,
                            context_latents=ctx, return_dict=False)[0][:, :states[0].frames]
    assert not np.allclose(naive.numpy(), alone.numpy(), atol=1e-3)


def _attention_masks(dit: DiTEngine, rows, monkeypatch) -> dict[str, set]:
    """The mask shapes diffusers' attention processor receives in one `_forward`, per kind of attention layer."""
    from diffusers.models.transformers.ace_step_transformer import AceStepAttnProcessor2_0

    seen: dict[str, set] = {"sliding": set(), "full": set(), "cross": set()}
    original = AceStepAttnProcessor2_0.__call__

    def spy(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        kind = "cross" if attn.is_cross_attention else "sliding" if attn.sliding_window is not None else "full"
        seen[kind].add(None if attention_mask is None else tuple(attention_mask.shape))
        return original(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    monkeypatch.setattr(AceStepAttnProcessor2_0, "__call__", spy)
    dit._forward(rows)
    monkeypatch.undo()
    return seen


def test_masks_only_where_lengths_differ(engines, requests_, monkeypatch):
    """Equal lengths: diffusers' forward as upstream runs it (no mask but its sliding band). Other lengths: key-padding
    masks `(B, 1, 1, L)` that broadcast over heads and queries; a per-row `(B, 1, L, L)` only on the sliding layers,
    where the band already is an (L, L) mask."""
    _, dit = engines
    states = [dit.start(r) for r in requests_]
    row = lambda s: (s.xt, float(s.scheduler.timesteps[0]), s.conditions, s.context, s.xt.shape[0])  # noqa: E731
    patches = lambda s: -(-s.frames // 2)  # noqa: E731
    window = dit.transformer.config.sliding_window
    assert patches(states[2]) - 1 > window, "the longest job must reach past the sliding window"

    same = _attention_masks(dit, [row(states[1])], monkeypatch)
    assert same == {"sliding": {(1, 1, patches(states[1]), patches(states[1]))}, "full": {None}, "cross": {None}}

    rows = [row(s) for s in states]
    batch, length, tokens = sum(r[4] for r in rows), patches(states[2]), max(s.conditions.shape[0] for s in states)
    mixed = _attention_masks(dit, rows, monkeypatch)
    assert mixed == {"sliding": {(batch, 1, length, length)}, "full": {(batch, 1, 1, length)},
                     "cross": {(batch, 1, 1, tokens)}}

    # Same frames, other prompt lengths: only cross-attention is masked.
    other = dit.start(DiTRequest(condition=requests_[1].condition, seeds=[9], num_inference_steps=4))
    other.conditions = other.conditions[:-3]
    prompts = _attention_masks(dit, [row(states[1]), row(other)], monkeypatch)
    assert prompts["full"] == {None} and prompts["cross"] == {(3, 1, 1, states[1].conditions.shape[0])}
    assert prompts["sliding"] == same["sliding"]


def test_a_swapped_in_transformer_is_masked_too(requests_):
    """A transformer replaced on the engine (benchmarks/gpu_check.py swaps in a float32 copy) gets the processor."""
    import copy

    from diffusers.models.transformers.ace_step_transformer import AceStepAttnProcessor2_0

    dit = DiTEngine(CONFIG)
    fresh = copy.deepcopy(dit.transformer)
    fresh.set_attn_processor(AceStepAttnProcessor2_0())
    dit.transformer = fresh
    alone = [_alone(dit, r) for r in requests_]
    states = [dit.start(r) for r in requests_]
    _run(dit, states)
    for state, expected in zip(states, alone):
        np.testing.assert_allclose(state.latents(), expected, atol=2e-5)
