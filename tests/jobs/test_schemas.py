"""Request normalisation and validation (no server)."""

import json

import pytest
from pydantic import ValidationError

from jobs.schemas import GenerateRequest, describe_validation_error, normalize_payload


def parse(raw: dict) -> GenerateRequest:
    return GenerateRequest.model_validate(normalize_payload(raw))


def test_seed_defaults():
    r = parse({})
    assert (r.caption, r.lyrics, r.vocal_language, r.audio_format, r.task_type) == ("", "", "en", "mp3", "text2music")
    assert (r.inference_steps, r.guidance_scale, r.use_random_seed, r.seed) == (8, 7.0, True, -1)
    assert r.batch_size is None and r.num_outputs == 2
    assert (r.repainting_start, r.repainting_end, r.audio_cover_strength) == (0.0, None, 1.0)


def test_canonical_wins_over_alias_and_alias_over_nested():
    r = parse({"key_scale": "C", "keyscale": "D", "metas": {"keyScale": "E", "bpm": 90}, "bpm": None})
    assert r.key_scale == "C" and r.bpm == 90


@pytest.mark.parametrize("nested_key", ["metas", "meta", "metadata", "user_metadata", "userMetadata"])
def test_nested_metadata_dict_or_json_string(nested_key):
    assert parse({nested_key: {"duration": 12}}).audio_duration == 12
    assert parse({nested_key: json.dumps({"timeSignature": "3"})}).time_signature == "3"


def test_null_and_empty_mean_default_and_zero_is_kept():
    r = parse({"inference_steps": None, "bpm": "", "seed": 0, "use_random_seed": "false",
               "audio_cover_strength": 0, "guidance_scale": 0})
    assert r.inference_steps == 8 and r.bpm is None
    assert (r.seed, r.use_random_seed, r.audio_cover_strength, r.guidance_scale) == (0, False, 0.0, 0.0)  # no B5


def test_form_strings_are_coerced():
    r = parse({"inference_steps": "16", "audio_duration": "12.5", "use_random_seed": "no", "timesteps": "1,0.5,0.2"})
    assert (r.inference_steps, r.audio_duration, r.use_random_seed) == (16, 12.5, False)
    assert r.timesteps == [1.0, 0.5, 0.2]


def test_output_formats_and_mp3_bitrate():
    assert parse({}).mp3_bitrate is None  # variable bitrate, as before the field existed
    assert [parse({"audio_format": f}).audio_format for f in (" OPUS", "aac", "Wav32")] == ["opus", "aac", "wav32"]
    r = parse({"audio_format": "mp3", "mp3_bitrate": "192"})  # a form field's text
    assert (r.audio_format, r.mp3_bitrate) == ("mp3", 192)
    assert parse({"mp3_bitrate": 320.0}).mp3_bitrate == 320 and parse({"mp3_bitrate": ""}).mp3_bitrate is None


def test_negative_repainting_end_means_until_the_end():
    assert parse({"repainting_end": -1}).repainting_end is None


@pytest.mark.parametrize("raw,status,fragment", [
    ({"audio_format": "ogg"}, 400, 'audio_format: Input should be'),
    ({"audio_format": "m4a"}, 400, "audio_format: Input should be 'mp3', 'wav', 'flac', 'opus', 'aac' or 'wav32' "
                                   '(got "m4a")'),
    ({"mp3_bitrate": 100}, 422, "mp3_bitrate: Input should be 64, 80, 96, 112, 128, 160, 192, 224, 256 or 320 "
                                "(got 100)"),
    ({"mp3_bitrate": "128k"}, 422, 'mp3_bitrate: Input should be 64, 80, 96, 112, 128, 160, 192, 224, 256 or 320 '
                                   '(got "128k")'),
    ({"mp3_bitrate": 32}, 422, "mp3_bitrate: Input should be 64,"),
    ({"mp3_bitrate": True}, 422, "mp3_bitrate: must be a number, not a boolean"),
    ({"task_type": "karaoke"}, 400, "task_type: Input should be 'text2music', 'cover', 'repaint', 'lego', 'extract' "
                                    "or 'complete'"),
    ({"audio_code_string": "hello"}, 422, "audio_code_string: must be <|audio_code_N|> tokens only"),
    ({"audio_code_string": "<|audio_code_1|><|audio_code_x|>"}, 422, "audio_code_string: must be"),
    ({"audio_code_string": [3, -1]}, 422, "audio_code_string.1: Input should be greater than or equal to 0"),
    ({"audio_code_string": [3, True]}, 422, "audio_code_string: must be a number, not a boolean"),
    ({"track_classes": ["drums", ""]}, 422, "track_classes.1"),
    ({"track_name": "x" * 65}, 422, "track_name"),
    ({"inference_steps": 0}, 422, "inference_steps: Input should be greater than or equal to 1 (got 0)"),
    ({"audio_duration": float("nan")}, 422, "audio_duration"),
    ({"timesteps": [0.5, 0.9]}, 422, "strictly descending"),
    ({"cfg_interval_start": 0.8, "cfg_interval_end": 0.2}, 422, "cfg_interval_start"),
])
def test_errors_name_field_and_value(raw, status, fragment):
    with pytest.raises(ValidationError) as info:
        parse(raw)
    got_status, detail = describe_validation_error(info.value)
    assert got_status == status and fragment in detail


@pytest.mark.parametrize("shift", [1e-8, 5e-324, 0.0])
def test_a_shift_the_schedule_cannot_take_is_refused(shift):
    """Found by the API fuzzer: such a shift was accepted, and the job then failed in the DiT (NaN timesteps)."""
    with pytest.raises(ValidationError) as error:
        parse({"shift": shift})
    assert describe_validation_error(error.value)[0] == 422


@pytest.mark.parametrize("seed,outputs,expected", [
    ("11,12", 2, [11, 12]), ("11, -1", 2, [11, -1]), ("11,", 2, [11, -1]), ([5], 2, [5]), ("5", 2, 5),
])
def test_upstream_seed_lists_one_seed_per_output(seed, outputs, expected):
    assert parse({"seed": seed, "batch_size": outputs}).seed == expected


@pytest.mark.parametrize("raw,fragment", [
    ({"seed": "1,x"}, "seed: entry 2 of 2, 'x'"),
    ({"seed": [1, True]}, "seed: "),
    ({"seed": "1,2,3", "batch_size": 2}, "seed lists 3 seeds for 2 outputs"),
    ({"seed": "abc"}, 'seed: Input should be a valid integer, unable to parse string as an integer (got "abc")'),
    ({"seed": "1,3000000000"}, "less than or equal to 2147483647"),
])
def test_bad_seed_lists_say_which_seed(raw, fragment):
    with pytest.raises(ValidationError) as info:
        parse(raw)
    status, detail = describe_validation_error(info.value)
    assert status == 422 and fragment in detail


def test_camel_case_of_every_field_and_upstream_cover_strength():
    r = parse({"cfgIntervalEnd": 0.5, "repaintingStart": 1, "cover_strength": 0.25, "vocalLanguage": "ja"})
    assert (r.cfg_interval_end, r.repainting_start, r.audio_cover_strength, r.vocal_language) == (0.5, 1.0, 0.25, "ja")


def test_the_task_types_are_the_pipelines_and_a_base_models():
    from diffusers.pipelines.ace_step.pipeline_ace_step import TASK_TYPES as PIPELINE_TASKS

    from jobs.schemas import SOURCE_TASKS, TASK_TYPES
    from models.loading import VARIANT_TASKS

    assert set(TASK_TYPES) == set(PIPELINE_TASKS) and VARIANT_TASKS["base"] == TASK_TYPES
    assert set(SOURCE_TASKS) < set(TASK_TYPES)


def test_all_six_task_types_and_their_track_fields():
    assert [parse({"taskType": t}).task_type for t in ("LEGO", "extract", "Complete")] == ["lego", "extract",
                                                                                           "complete"]
    r = parse({"task_type": "lego", "trackName": "drums", "trackClasses": "drums, bass ,,"})
    assert (r.track_name, r.track_classes) == ("drums", ["drums", "bass"])
    assert parse({"track_classes": ["vocals"]}).track_classes == ["vocals"]
    assert parse({"track_classes": " , "}).track_classes is None and parse({}).track_name is None


def test_audio_codes_as_tokens_or_integers_have_one_spelling():
    tokens = "<|audio_code_5|> <|audio_code_63999|>\n<|audio_code_0|>"
    canonical = "<|audio_code_5|><|audio_code_63999|><|audio_code_0|>"
    assert parse({"audio_code_string": tokens}).audio_code_string == canonical
    r = parse({"audioCodeString": [5, 63999, 0]})
    assert (r.audio_code_string, r.audio_codes) == (canonical, [5, 63999, 0])
    assert parse({"audio_code_string": []}).audio_code_string is None
    assert parse({"audio_code_string": "  "}).audio_codes == []
