"""A job's conditions do not depend on its batch-mates, whatever padding side the checkpoint's tokenizer declares.

`ConditionEngine.encode` tokenizes a whole batch with `padding="longest"`. Released Qwen3 embedding tokenizers declare
`padding_side="left"` (they pool the last token); left padding would shift every shorter prompt's positions in the
text encoder (RoPE) and in the lyric encoder, so its condition would change with the longest prompt it was batched
with. The engine must pad on the right and mask the padding, so that alone == batched.
"""

import numpy as np
import pytest

from models.condition import ConditionEngine, ConditionRequest
from models.loading import ModelConfig

CONFIG = ModelConfig(preset="tiny")
RNG = np.random.default_rng(3)
# Different caption and lyric lengths, so every row but the longest is padded; a cover with strength < 1 adds a
# text2music row (another instruction length) and a reference replaces the silence timbre.
REQUESTS = [
    ConditionRequest(caption="a", lyrics="", audio_duration=1.0, tag="short"),
    ConditionRequest(caption="a much longer caption about strings and brass", lyrics="[verse]\nla la la la la la",
                     audio_duration=1.4, bpm=120, tag="long"),
    ConditionRequest(caption="drums", lyrics="one two", audio_duration=1.0, task_type="cover",
                     src_latents=RNG.standard_normal((25, 64)).astype(np.float32), audio_cover_strength=0.5,
                     tag="cover"),
    ConditionRequest(caption="synth pad", lyrics="ooh", audio_duration=0.8,
                     reference_latents=RNG.standard_normal((750, 64)).astype(np.float32), tag="reference"),
]


@pytest.fixture(scope="module")
def engine():
    engine = ConditionEngine(CONFIG)
    engine.pipe.tokenizer.padding_side = "left"  # as a released Qwen3-Embedding tokenizer_config.json declares
    return engine


def test_left_padding_tokenizer_really_pads_left(engine):
    """The premise: with this tokenizer, a plain `padding="longest"` call pads the shorter prompt at the front."""
    mask = engine.pipe.tokenizer(["a", "abcd"], padding="longest", return_tensors="pt").attention_mask
    assert mask[0].tolist() == [0, 0, 0, 1]


def test_batched_conditions_equal_alone_with_a_left_padding_tokenizer(engine):
    alone = [engine.encode([r])[0] for r in REQUESTS]
    batched = engine.encode(REQUESTS)
    token_counts = {c.encoder_hidden_states.shape[0] for c in alone}
    assert len(token_counts) == len(REQUESTS), "prompts of different lengths: the batch must be padded"
    for request, one, many in zip(REQUESTS, alone, batched):
        assert many.encoder_hidden_states.shape == one.encoder_hidden_states.shape, request.tag
        np.testing.assert_allclose(many.encoder_hidden_states, one.encoder_hidden_states, atol=1e-5,
                                   err_msg=request.tag)
        np.testing.assert_allclose(many.context_latents, one.context_latents, atol=1e-5, err_msg=request.tag)
        np.testing.assert_array_equal(many.null_embedding, one.null_embedding)
    cover = REQUESTS.index(next(r for r in REQUESTS if r.tag == "cover"))
    assert alone[cover].non_cover_hidden_states is not None
    np.testing.assert_allclose(batched[cover].non_cover_hidden_states, alone[cover].non_cover_hidden_states,
                               atol=1e-5)
    assert engine.pipe.tokenizer.padding_side == "left", "encode must not change the shared tokenizer's settings"


def test_conditions_do_not_depend_on_the_declared_padding_side(engine):
    """The declared side changes nothing: the same batch through a right-padding tokenizer gives the same conditions."""
    right = ConditionEngine(CONFIG)
    assert right.pipe.tokenizer.padding_side == "right"
    for one, other in zip(engine.encode(REQUESTS), right.encode(REQUESTS)):
        np.testing.assert_allclose(one.encoder_hidden_states, other.encoder_hidden_states, atol=1e-5)
