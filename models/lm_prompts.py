"""What the ACE-Step 1.5 5 Hz language model reads and writes: prompts, the `<think>` metadata block, and parsing.

Upstream (`arkhaminferno/ACE-Step-1.5` at 6d467e4, `acestep/llm_inference.py`, `acestep/constants.py`) talks to
the LM through a Qwen chat template: a system message `# Instruction\\n<instruction>\\n\\n` and a user message
that holds the caption and lyrics (generation, format), or a free-form description (sample). The model answers with
a YAML-like metadata block and then, depending on the instruction, audio codes or lyrics::

    <think>
    bpm: 120
    caption: A calm piano ballad ...
    duration: 30
    keyscale: C major
    language: en
    timesignature: 4
    </think>

    <|audio_code_123|><|audio_code_4567|>...

The strings here are upstream's, verbatim; the functions only format them. Validity ranges (bpm, duration, keys,
languages, time signatures) are upstream's `constants.py`; the constrained decoder (`models.lm_constraints`) only lets
the LM write values from these sets, and `LMMetadata.from_fields` types what was written.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import yaml

# Instructions (upstream constants.py: DEFAULT_LM_INSTRUCTION, DEFAULT_LM_INSPIRED_INSTRUCTION,
# DEFAULT_LM_REWRITE_INSTRUCTION).
GENERATE_INSTRUCTION = "Generate audio semantic tokens based on the given conditions:"
SAMPLE_INSTRUCTION = "Expand the user's input into a more detailed and specific musical description:"
FORMAT_INSTRUCTION = "Format the user's input into a more detailed and specific musical description:"
NO_USER_INPUT = "NO USER INPUT"  # upstream's default negative prompt, and the stand-in for an empty input

# Value sets (upstream constants.py).
VALID_LANGUAGES = (
    "ar", "az", "bg", "bn", "ca", "cs", "da", "de", "el", "en", "es", "fa", "fi", "fr", "he", "hi", "hr", "ht", "hu",
    "id", "is", "it", "ja", "ko", "la", "lt", "ms", "ne", "nl", "no", "pa", "pl", "pt", "ro", "ru", "sa", "sk", "sr",
    "sv", "sw", "ta", "te", "th", "tl", "tr", "uk", "ur", "vi", "yue", "zh", "unknown")
KEYSCALE_NOTES = ("A", "B", "C", "D", "E", "F", "G")
KEYSCALE_ACCIDENTALS = ("", "#", "b", "♯", "♭")
KEYSCALE_MODES = ("major", "minor")
VALID_KEYSCALES = tuple(f"{note}{accidental} {mode}" for note in KEYSCALE_NOTES for accidental in KEYSCALE_ACCIDENTALS
                        for mode in KEYSCALE_MODES)
BPM_RANGE = (30, 300)
DURATION_RANGE = (10, 600)  # seconds the LM may choose itself (a duration the user gives is taken as it is)
VALID_TIME_SIGNATURES = ("2", "3", "4", "6")

# The metadata block's field order (upstream constrained_logits_processor.py `_get_next_field_state`), and the fields
# the codes prompt repeats (`_format_metadata_as_cot`).
FIELD_ORDER = ("bpm", "caption", "duration", "genres", "keyscale", "language", "timesignature")
COT_FIELDS = ("bpm", "caption", "duration", "keyscale", "language", "timesignature")
# The fields whose presence makes upstream skip phase 1 (`has_all_metas`).
PLANNING_FIELDS = ("bpm", "keyscale", "timesignature", "duration")

AUDIO_CODE = re.compile(r"<\|audio_code_(\d+)\|>")


def audio_code_token(code: int) -> str:
    return f"<|audio_code_{code}|>"


def _chat(tokenizer, instruction: str, user: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "system", "content": f"# Instruction\n{instruction}\n\n"}, {"role": "user", "content": user}],
        tokenize=False, add_generation_prompt=True)


def has_meaningful_negative_prompt(negative_prompt: str | None) -> bool:
    """Upstream `_has_meaningful_negative_prompt`: anything but empty or the default."""
    return bool(negative_prompt and negative_prompt.strip() and negative_prompt.strip() != NO_USER_INPUT)


def cot_prompt(tokenizer, caption: str, lyrics: str) -> str:
    """Phase 1 (metadata): upstream `build_formatted_prompt` (conditional; phase 1 runs without CFG)."""
    return _chat(tokenizer, GENERATE_INSTRUCTION, f"# Caption\n{caption}\n\n# Lyric\n{lyrics}\n")


def codes_prompt(tokenizer, caption: str, lyrics: str, cot_text: str, *, unconditional: bool = False,
                 negative_prompt: str = NO_USER_INPUT) -> str:
    """Phase 2 (audio codes): upstream `build_formatted_prompt_with_cot`, training-aligned layout.

    The assistant turn stays open after the metadata block and `\\n\\n`, so that the model continues with codes. The
    unconditional (CFG) row's user message is the raw negative prompt (the literal `NO USER INPUT` by default) with an
    empty `<think>\\n\\n</think>` block, as the model saw under CFG dropout in training.
    """
    if unconditional:
        user = negative_prompt if has_meaningful_negative_prompt(negative_prompt) else NO_USER_INPUT
        return _chat(tokenizer, GENERATE_INSTRUCTION, user) + "<think>\n\n</think>" + "\n\n"
    return _chat(tokenizer, GENERATE_INSTRUCTION, f"# Caption\n{caption}\n\n# Lyric\n{lyrics}\n") + cot_text + "\n\n"


def sample_prompt(tokenizer, query: str, instrumental: bool) -> str:
    """Sample mode (description -> caption, lyrics, metadata): upstream `build_formatted_prompt_for_inspiration`."""
    query = query if query and query.strip() else NO_USER_INPUT
    return _chat(tokenizer, SAMPLE_INSTRUCTION, f"{query}\n\ninstrumental: {'true' if instrumental else 'false'}")


def format_prompt(tokenizer, caption: str, lyrics: str) -> str:
    """Format (rewrite caption + lyrics, add metadata): upstream `build_formatted_prompt_for_format`."""
    caption = caption if caption and caption.strip() else NO_USER_INPUT
    lyrics = lyrics if lyrics and lyrics.strip() else "[Instrumental]"
    return _chat(tokenizer, FORMAT_INSTRUCTION, f"# Caption\n{caption}\n\n# Lyric\n{lyrics}")


def cot_timesignature(value: str) -> str:
    """The LM writes the beats per bar only (`4`, not `4/4`): upstream `_format_metadata_as_cot` strips `/4`."""
    return value[:-2] if value.endswith("/4") else value


def format_cot(fields: dict[str, Any]) -> str:
    """The metadata block of the codes prompt: upstream `_format_metadata_as_cot` (sorted YAML, as in training)."""
    items: dict[str, Any] = {}
    for key in COT_FIELDS:
        value = fields.get(key)
        if value is None:
            continue
        if key == "timesignature":
            value = cot_timesignature(str(value))
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        items[key] = value
    body = yaml.dump(items, allow_unicode=True, sort_keys=True).strip() if items else ""
    return f"<think>\n{body}\n</think>"


def postprocess_caption(caption: str) -> str:
    """A YAML multi-line caption as one line (upstream `MetadataConstrainedLogitsProcessor.postprocess_caption`)."""
    return " ".join(line.strip() for line in caption.split("\n") if line.strip())


def parse_lm_output(text: str) -> tuple[dict[str, Any], list[int]]:
    """The metadata fields and audio codes in an LM answer: upstream `parse_lm_output`.

    Fields are `key: value` lines of the `<think>` block (or, without one, of the text before the first code); a line
    that starts with whitespace continues the previous value. bpm and duration become ints where they parse, the
    caption is joined into one line; other values stay strings (typed by `LMMetadata.from_fields`).
    """
    codes = [int(n) for n in AUDIO_CODE.findall(text)]
    match = re.search(r"<think>(.*?)</think>", text, re.DOTALL)
    reasoning = match.group(1).strip() if match else text.split("<|audio_code_")[0].strip()
    fields: dict[str, Any] = {}
    key, lines = None, []

    def save() -> None:
        if key in FIELD_ORDER and lines:
            value = "\n".join(lines)
            if key in ("bpm", "duration"):
                try:
                    fields[key] = int(value.strip())
                except ValueError:
                    fields[key] = value.strip()
            elif key == "caption":
                fields[key] = postprocess_caption(value)
            else:
                fields[key] = value.strip()

    for line in reasoning.split("\n"):
        if line.strip().startswith("<"):
            continue
        if line and not line[0].isspace() and ":" in line:
            save()
            name, first = line.split(":", 1)
            key, lines = name.strip().lower(), ([first] if first.strip() else [])
        elif line[:1] in (" ", "\t") and key:
            lines.append(line)
    save()
    return fields, codes


def extract_lyrics(text: str) -> str:
    """The lyrics after `</think>` in a sample / format answer, without a `# Lyric` header or a closing `<|im_end|>`
    (upstream `_extract_lyrics_from_output`)."""
    _, sep, after = text.partition("</think>")
    if not sep:
        return ""
    after = re.sub(r"^#\s*Lyri[c|cs]?\s*\n", "", after.strip(), flags=re.IGNORECASE)
    after = re.sub(r"<\|im_end\|>\s*$", "", after)
    return after.strip()


@dataclass
class LMMetadata:
    """Music metadata as the LM writes it (and as the condition encoder's prompt takes it). None: not known."""

    bpm: int | None = None  # beats per minute, BPM_RANGE when the LM chose it
    keyscale: str | None = None  # one of VALID_KEYSCALES when the LM chose it, e.g. "F# minor"
    timesignature: str | None = None  # beats per bar: "2", "3", "4" or "6"
    duration: float | None = None  # seconds (an int when the LM chose it)
    language: str | None = None  # vocal language code, one of VALID_LANGUAGES
    caption: str | None = None  # the LM's caption (phase 1 with use_cot_caption, sample, format)
    genres: str | None = None  # sample and format only

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> "LMMetadata":
        """Typed metadata from `parse_lm_output` fields; a value that does not parse is left out (None)."""
        def integer(value: Any) -> int | None:
            try:
                return int(value)
            except (TypeError, ValueError):
                return None

        text = {k: str(v).strip() for k, v in fields.items() if v is not None and str(v).strip()}
        return cls(bpm=integer(fields.get("bpm")), keyscale=text.get("keyscale"),
                   timesignature=text.get("timesignature"), duration=integer(fields.get("duration")),
                   language=text.get("language"), caption=text.get("caption"), genres=text.get("genres"))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
