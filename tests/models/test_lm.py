"""The 5 Hz LM engine on the tiny random-init preset, float32 CPU: constrained answers parse into typed metadata,
phase 2 writes exactly duration x 5 codes, and a job's output depends on its seeds only, alone or batched."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.lm_throughput import example_requests, measure
from models.lm import LMConfig, LMEngine, LMRequest, build_lm_tokenizer, save_lm
from models.lm_prompts import (BPM_RANGE, VALID_KEYSCALES, VALID_LANGUAGES, VALID_TIME_SIGNATURES, LMMetadata,
                               codes_prompt, format_cot, parse_lm_output)
from models.loading import CheckpointError
from models.presets import FSQ_LEVELS

# Short captions and durations keep every answer to a few dozen tokens.
CONFIG = LMConfig(min_duration=2, max_duration=4, max_caption_tokens=12, max_genres_tokens=6, max_lyrics_tokens=16)
CODEBOOK = math.prod(FSQ_LEVELS)


@pytest.fixture(scope="module")
def engine() -> LMEngine:
    return LMEngine(CONFIG)


def run(engine: LMEngine, states, steps: int | None = None) -> None:
    """Step the unfinished states together, `steps` times or until all are done."""
    count = 0
    while any(not s.done for s in states) and (steps is None or count < steps):
        engine.step([s for s in states if not s.done])
        count += 1


def assert_valid_metadata(metadata: LMMetadata, low: int = 2, high: int = 4) -> None:
    assert isinstance(metadata.bpm, int) and BPM_RANGE[0] <= metadata.bpm <= BPM_RANGE[1]
    assert metadata.keyscale in VALID_KEYSCALES
    assert metadata.timesignature in VALID_TIME_SIGNATURES
    assert isinstance(metadata.duration, int) and low <= metadata.duration <= high
    assert metadata.language in VALID_LANGUAGES


def test_tokenizer_has_the_special_tokens_and_every_audio_code():
    tokenizer = build_lm_tokenizer()
    assert CODEBOOK == 64_000
    codes = tokenizer.convert_tokens_to_ids([f"<|audio_code_{i}|>" for i in (0, 1, CODEBOOK - 1)])
    assert tokenizer.unk_token_id not in codes and len(set(codes)) == 3
    for token in ("<think>", "</think>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1, token
    assert tokenizer.eos_token == "<|im_end|>"
    prompt = codes_prompt(tokenizer, "calm piano", "[Instrumental]", format_cot({"bpm": 90}))
    assert prompt.startswith("<|im_start|>system\n# Instruction\nGenerate audio semantic tokens based on the given "
                             "conditions:\n\n<|im_end|>\n<|im_start|>user\n# Caption\ncalm piano\n\n# Lyric\n")
    assert prompt.endswith("<|im_start|>assistant\n<think>\nbpm: 90\n</think>\n\n")
    negative = codes_prompt(tokenizer, "calm piano", "x", "", unconditional=True)
    assert "<|im_start|>user\nNO USER INPUT<|im_end|>" in negative and negative.endswith("<think>\n\n</think>\n\n")
    assert "user\nno drums<|im_end|>" in codes_prompt(tokenizer, "c", "x", "", unconditional=True,
                                                      negative_prompt="no drums")


def test_parse_and_format_follow_upstream():
    text = ("<think>\nbpm: 73\ncaption: A calm piano melody.\n  It builds slowly.\nduration: 273\n"
            "keyscale: G major\nlanguage: en\ntimesignature: 4\n</think>\n\n<|audio_code_56535|><|audio_code_7|>")
    fields, codes = parse_lm_output(text)
    assert fields == {"bpm": 73, "caption": "A calm piano melody. It builds slowly.", "duration": 273,
                      "keyscale": "G major", "language": "en", "timesignature": "4"}
    assert codes == [56535, 7]
    assert format_cot({"timesignature": "3/4", "bpm": 90, "duration": "30", "genres": "pop"}) == (
        "<think>\nbpm: 90\nduration: 30\ntimesignature: 3\n</think>")


def test_phase_one_always_parses_into_typed_metadata(engine):
    results = engine.generate([LMRequest(caption="a song " * i, seeds=[i]) for i in range(6)])
    for result in results:
        assert_valid_metadata(result.metadata)
        assert result.metadata.caption and result.caption == result.metadata.caption
        assert set(result.lm_fields) == {"bpm", "caption", "duration", "keyscale", "language", "timesignature"}
        fields, codes = parse_lm_output(result.texts["cot"])
        assert LMMetadata.from_fields(fields).bpm == result.metadata.bpm and codes == []
        assert result.codes == []


def test_phase_one_keeps_what_the_user_gave(engine):
    request = LMRequest(caption="jazz", bpm=97, keyscale="F# minor", timesignature="3/4", language="de", seeds=[3])
    result = engine.generate([request])[0]
    meta = result.metadata
    assert (meta.bpm, meta.keyscale, meta.timesignature, meta.language) == (97, "F# minor", "3/4", "de")
    assert 2 <= meta.duration <= 4 and set(result.lm_fields) == {"duration", "caption"}
    assert "bpm: 97\n" in result.texts["cot"] and "timesignature: 3\n" in result.texts["cot"]
    assert "keyscale: F# minor\n" in result.texts["cot"] and "language: de\n" in result.texts["cot"]

    # Without use_cot_caption / use_cot_language those fields are not written; the user's caption stays.
    result = engine.generate([LMRequest(caption="jazz", use_cot_caption=False, use_cot_language=False)])[0]
    assert "caption:" not in result.texts["cot"] and "language:" not in result.texts["cot"]
    assert result.caption == "jazz" and result.metadata.caption is None and result.metadata.language is None

    # All four planning fields given: phase 1 is skipped, as upstream.
    result = engine.generate([LMRequest(caption="jazz", bpm=97, keyscale="C major", timesignature="4",
                                        duration=2.0)])[0]
    assert "cot" not in result.texts and result.lm_fields == () and result.tokens == 0


@pytest.mark.parametrize("duration, count", [(3.0, 15), (2.5, 12), (1.0, 5)])
def test_phase_two_writes_exactly_duration_times_five_codes(engine, duration, count):
    result = engine.generate([LMRequest(caption="rock", duration=duration, thinking=True, seeds=[1, 2])])[0]
    assert [len(c) for c in result.codes] == [count, count]
    assert all(0 <= c < CODEBOOK for codes in result.codes for c in codes)
    assert result.metadata.duration == duration
    assert result.audio_code_strings[0] == "".join(f"<|audio_code_{c}|>" for c in result.codes[0])


def test_phase_two_uses_the_duration_phase_one_chose(engine):
    result = engine.generate([LMRequest(caption="rock", thinking=True, seeds=[4])])[0]
    assert_valid_metadata(result.metadata)
    assert len(result.codes[0]) == result.metadata.duration * 5


def test_same_seed_same_output_alone_and_batched_with_jobs_joining_midway(engine):
    job = LMRequest(caption="ambient pads", lyrics="[Verse]\nla la", thinking=True, seeds=[11], tag="a")
    alone = engine.generate([job])[0]

    long_prompt = LMRequest(caption="orchestral " * 20, lyrics="[Chorus]\n" + "oh " * 30, thinking=True,
                            seeds=[5], tag="b")
    short_prompt = LMRequest(caption="drums", duration=2.0, thinking=True, lm_cfg_scale=1.0, seeds=[6], tag="c")
    first = engine.start(long_prompt)
    run(engine, [first], steps=7)
    second = engine.start(job)  # joins while the first is in phase 1
    run(engine, [first, second], steps=5)
    third = engine.start(short_prompt)  # joins mid-way too
    run(engine, [first, second, third])
    batched = second.result
    assert batched.codes == alone.codes
    assert batched.metadata == alone.metadata and batched.texts == alone.texts and batched.tokens == alone.tokens
    # The batch-mates' outputs are their own, too.
    assert first.result.codes == engine.generate([long_prompt])[0].codes


def prefilled(engine: LMEngine, prompts: list[range], tokens: list[int], reserve: int = 64) -> list:
    """Rows prefilled from `prompts`, each with its first token (`tokens`) written: ready to decode."""
    from models.lm import _Sequence

    rows = [_Sequence(ids=list(prompt), reserve=reserve) for prompt in prompts]
    for row, token in zip(rows, tokens):
        engine._prefill(row)
        row.ids.append(token)
    return rows


def test_padding_never_leaks_between_rows(engine):
    """Rows of different lengths decoded in one left-padded forward get the logits of their own full forward."""
    rows = prefilled(engine, [range(300, 310), range(400, 437), range(500, 523)], [7, 8, 9])
    [late] = prefilled(engine, [range(600, 615)], [10], reserve=2)
    # Three steps of the three rows, then a fourth joins (its prefill cache and the others' batch buffer are copied
    # into a new one), the longest leaves, and the rest decode 70 steps: past the room of the buffer (64 positions at
    # least), so it is built a third time.
    for live in [rows] * 3 + [rows + [late]] * 2 + [rows[:2] + [late]] * 70:
        batched = engine._decode(live)
        for row, logits in zip(live, batched):
            alone = engine.model(input_ids=torch.tensor([row.ids])).logits[0, -1]
            torch.testing.assert_close(logits, alone, rtol=1e-4, atol=1e-4)
            row.ids.append(int(logits.argmax()))


def test_decode_steps_write_one_buffer_in_place(engine):
    """While the rows stay the same, a step writes the new position into the batch buffer of the step before: no
    copy of the caches per token, no new buffer."""
    rows = prefilled(engine, [range(300, 310 + 5 * i) for i in range(3)], [7, 7, 7], reserve=8)

    def step() -> None:
        for row, logits in zip(rows, engine._decode(rows)):
            row.ids.append(int(logits.argmax()))

    step()
    batch = engine._batch
    pointer = batch.buffer.data_ptr()
    for _ in range(5):
        step()
    assert engine._batch is batch and batch.buffer.data_ptr() == pointer
    assert [r.keys_values().shape[3] for r in rows] == [len(r.ids) - 1 for r in rows]
    assert all(r.batch is batch and r.keys_values().data_ptr() >= pointer for r in rows)  # views into the buffer


def test_a_decode_step_that_fails_part_way_leaves_the_rows_as_they_were(engine, monkeypatch):
    """A forward that raises after some layers wrote their keys (an out-of-memory error, say): the next step builds a
    new buffer from the rows' caches, so their logits are still those of their own full forward."""
    rows = prefilled(engine, [range(300, 312), range(400, 420)], [7, 7])
    engine._decode(rows)
    for row in rows:
        row.ids.append(8)
    layers = engine.model.model.layers
    broken = layers[len(layers) // 2]

    def fail(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(broken, "forward", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        engine._decode(rows)
    monkeypatch.undo()
    for row, logits in zip(rows, engine._decode(rows)):
        alone = engine.model(input_ids=torch.tensor([row.ids])).logits[0, -1]
        torch.testing.assert_close(logits, alone, rtol=1e-4, atol=1e-4)


def test_cfg_adds_an_unconditional_row_and_changes_the_codes(engine):
    # Greedy decoding: the random tiny weights give nearly flat distributions, which sampling would hide.
    base = dict(caption="piano", bpm=100, keyscale="A minor", timesignature="4", duration=2.0, thinking=True,
                lm_temperature=0.0, seeds=[8])
    states = {scale: engine.start(LMRequest(**base, lm_cfg_scale=scale)) for scale in (1.0, 2.5)}
    assert states[1.0].stage == "codes" and states[1.0].rows == 1 and states[2.5].rows == 2
    unconditional = engine.tokenizer.decode(states[2.5].answers[0].rows[1].ids)
    assert "NO USER INPUT" in unconditional and "piano" not in unconditional
    run(engine, list(states.values()), steps=4)
    assert states[2.5].progress() == ("codes", 4, 10)
    run(engine, list(states.values()))
    with_cfg, without = states[2.5].result, states[1.0].result
    assert len(with_cfg.codes[0]) == len(without.codes[0]) == 10 and with_cfg.codes != without.codes
    negative = engine.generate([LMRequest(**base, lm_cfg_scale=2.5, lm_negative_prompt="harsh noise")])[0]
    assert negative.codes != with_cfg.codes


def test_different_seeds_differ_and_outputs_depend_on_their_own_seed(engine):
    request = dict(caption="folk", bpm=120, keyscale="D major", timesignature="4", duration=2.0, thinking=True)
    pair = engine.generate([LMRequest(**request, seeds=[1, 2])])[0]
    assert pair.codes[0] != pair.codes[1]
    assert engine.generate([LMRequest(**request, seeds=[2])])[0].codes[0] == pair.codes[1]
    metas = {engine.generate([LMRequest(caption="folk", seeds=[s])])[0].metadata.bpm for s in range(4)}
    assert len(metas) > 1


def test_sample_mode_writes_caption_lyrics_and_metadata(engine):
    result = engine.generate([LMRequest(sample_mode=True, sample_query="a soft love song", language="bn",
                                        seeds=[2])])[0]
    assert_valid_metadata(result.metadata)
    assert result.metadata.language == "bn" and "language" not in result.lm_fields
    assert result.caption and result.metadata.caption == result.caption and result.metadata.genres
    assert isinstance(result.lyrics, str) and "</think>" in result.texts["sample"]
    assert "<|audio_code_" not in result.texts["sample"]
    instrumental = engine.generate([LMRequest(sample_mode=True, instrumental=True, seeds=[2],
                                              thinking=True)])[0]
    assert instrumental.lyrics and len(instrumental.codes[0]) == instrumental.metadata.duration * 5


def test_format_rewrites_caption_and_lyrics_and_keeps_given_fields(engine):
    result = engine.generate([LMRequest(caption="latin pop", lyrics="[Verse]\nhola", bpm=101, duration=3.0,
                                        use_format=True, use_cot_metas=False, seeds=[9])])[0]
    assert result.metadata.bpm == 101 and result.metadata.duration == 3.0
    assert "bpm: 101\n" in result.texts["format"] and "duration: 3\n" in result.texts["format"]
    assert "caption" in result.lm_fields and result.caption == result.metadata.caption
    assert result.metadata.keyscale in VALID_KEYSCALES and "cot" not in result.texts


def test_checkpoint_round_trip(engine, tmp_path):
    save_lm(engine.model, engine.tokenizer, tmp_path / "acestep-5Hz-lm-tiny")
    loaded = LMEngine(CONFIG.model_copy(update={"checkpoint_dir": str(tmp_path / "acestep-5Hz-lm-tiny")}))
    request = LMRequest(caption="house", thinking=True, seeds=[3])
    assert loaded.generate([request])[0] == engine.generate([request])[0]
    with pytest.raises(CheckpointError, match="missing config.json"):
        LMEngine(LMConfig(checkpoint_dir=str(tmp_path)))


def test_bad_requests_name_the_field(engine):
    with pytest.raises(ValueError, match="lm_temperature"):
        engine.start(LMRequest(lm_temperature=-1.0))
    with pytest.raises(ValueError, match="thinking needs a duration"):
        engine.start(LMRequest(thinking=True, use_cot_metas=False))


def test_throughput_helper_reports_both_modes(engine):
    torch.manual_seed(0)
    report = measure(engine, example_requests(jobs=3, duration=1.0, cfg_scale=2.0))
    assert report["jobs"] == 3 and report["tokens"] > 0 and report["same_codes"]
    assert report["sequential_tokens_per_s"] > 0 and report["batched_tokens_per_s"] > 0


def test_a_transformers_without_the_cache_argument_is_refused_at_load(engine):
    """transformers 5.17's forward took `past_key_values`: `cache=` vanished into **kwargs and the first prefill
    failed with "'NoneType' object is not subscriptable" (seen on a GPU image). Now the engine refuses it by name."""
    from models.lm import check_cache_argument

    check_cache_argument(engine.model)  # the installed transformers (>=5.24) takes `cache`

    class OldForward(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
            raise AssertionError("never called")

    with pytest.raises(CheckpointError, match="too old for the LM engine"):
        check_cache_argument(OldForward())
