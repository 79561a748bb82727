"""Stage 0: the ACE-Step 1.5 5 Hz language model (metadata, captions, lyrics and audio codes), one token at a time.

The model is a Qwen3 causal LM (`transformers.Qwen3ForCausalLM`) whose vocabulary adds `<|audio_code_0|>` ..
`<|audio_code_63999|>`, upstream's `acestep-5Hz-lm-*` checkpoints. A job (`LMRequest`) runs a few *passes*, each a
fresh prompt and one answer (upstream `acestep/llm_inference.py`, `generate_with_stop_condition`,
`create_sample_from_query`, `format_sample_from_input`), in this order, each only when asked:

1. `sample`: a description -> caption, lyrics and metadata (sample mode).
2. `format`: the given caption + lyrics rewritten, metadata added (`use_format`).
3. `cot` (phase 1): the metadata block, writing only the fields still empty (bpm, caption with `use_cot_caption`,
   duration, key/scale, language with `use_cot_language`, time signature); skipped when bpm, key/scale, time
   signature and duration are all known, as upstream. No CFG (upstream turns it off here: it truncates text).
4. `codes` (phase 2, `thinking`): exactly `duration x codes_per_second` audio codes after the metadata block, one
   answer per seed, with CFG when `lm_cfg_scale > 1` (a conditional and an unconditional row per answer; the
   unconditional prompt is `lm_negative_prompt`).

Every answer is constrained (`models.lm_constraints`), so that it parses whatever the weights: with the random `tiny`
preset the text is gibberish, but the metadata is typed and in range and the codes count is exact.

Batching (continuous): `start(request)` makes a job's state without compute; `step(states)` writes ONE token for
every answer of every state given, whatever their passes and positions, so jobs join and leave between steps. A new
sequence (an answer's conditional or unconditional row) is prefilled alone (its logits give its first token); the
others decode in one batched forward over one buffer of their KV caches (`_DecodeBatch`), left-padded to end at the
same position, with a 2-D attention mask over the padding and per-row position ids. A step writes each row's new keys
and values into that buffer in place; the buffer is built again, each row's cache copied in once, only when the rows
change (a job joins, a pass ends) or its room runs out. (Before, the padded cache was built anew for every token: a
copy of every live cache and a new, longer allocation per layer and token; on an H100, 8 jobs of the 0.6B preset left
22.8 GiB in the CUDA allocator's cache for 5.2 GiB in use.) A job's tokens are sampled with its own
`torch.Generator` (one per seed), never the global RNG, so its output does not depend on its batch-mates (the logits
do, within float tolerance: batched matmuls and masked attention sum in another order).

transformers' own continuous batching (`generate_batch`, `ContinuousBatchingManager`) does not fit: it samples
every request from one shared RNG (one seed per manager), runs one logits-processor list for all requests (only
temperature / top-k / top-p per request), and cannot tie two rows to one sampled token (CFG) or change a row's
allowed tokens per step from a per-request state machine.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from models.lm_constraints import (AnswerConstraint, Codes, MetadataLimits, TokenTables, metadata_segments,
                                   understand_segments)
from models.lm_prompts import (DURATION_RANGE, FIELD_ORDER, NO_USER_INPUT, PLANNING_FIELDS, LMMetadata, codes_prompt,
                               cot_prompt, extract_lyrics, format_cot, format_prompt, parse_lm_output, sample_prompt,
                               audio_code_token)
from models.loading import CheckpointError, LoadOptions, _own_aligned_storage, no_grad, torch_dtype
from models.presets import FSQ_LEVELS, build_byte_tokenizer

# torch and transformers are imported where the engine uses them, not here: the request types and `LMConfig` are also
# what the ingress, the driver and the app builder import, and those libraries take seconds to import.
if TYPE_CHECKING:
    import torch
    from transformers import Qwen3ForCausalLM

logger = logging.getLogger(__name__)

# Qwen's chat template, reduced to what the prompts use (system + user, then the open assistant turn).
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_QWEN3 = dict(rope_theta=1_000_000.0, max_position_embeddings=40960, tie_word_embeddings=True)
# The released LMs are Qwen3-0.6B / 1.7B / 4B with the audio codes added: about 217k tokens (upstream's figure; the
# exact size needs the checkpoint). The full-size presets are random-init, for GPU benchmarks only.
_FULL_VOCAB = 217_216
LM_PRESETS: dict[str, dict[str, Any]] = {
    # Weights 10x the usual init scale: at 0.02 the tiny model's next-token distributions are so flat that its
    # answers hardly depend on the prompt (CFG, negative prompts and captions would change nothing a test can see).
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, rope_theta=1_000_000.0, max_position_embeddings=8192,
                 tie_word_embeddings=True, initializer_range=0.2),
    "0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=_FULL_VOCAB, **_QWEN3),
    "1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=_FULL_VOCAB, **_QWEN3),
    "4B": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=_FULL_VOCAB, **_QWEN3),
}


class LMConfig(LoadOptions):
    """Which 5 Hz LM weights the language-model stage loads, and the limits of what it writes."""

    model_config = ConfigDict(extra="forbid")

    preset: Literal[tuple(LM_PRESETS)] = Field("tiny", description="Embedded random-init preset, used when "
                                               "checkpoint_dir is not set. `tiny` runs anywhere and writes gibberish.")
    checkpoint_dir: str | None = Field(None, description="Local upstream `acestep-5Hz-lm-*` directory (a Qwen3 "
                                       "causal-LM checkpoint with its tokenizer, vocabulary with <|audio_code_N|>). "
                                       "Overrides `preset`.")
    codes_per_second: float = Field(5.0, gt=0, description="Audio codes per second of audio: 1 / the DiT "
                                    "checkpoint's `audio_code_spec(...).seconds_per_code` (5 for ACE-Step 1.5).")
    min_duration: int = Field(DURATION_RANGE[0], ge=1, description="Shortest duration (s) the LM may choose itself.")
    max_duration: int = Field(DURATION_RANGE[1], ge=1, description="Longest duration (s) the LM may choose itself "
                              "(upstream lowers it on small GPUs).")
    max_caption_tokens: int = Field(512, ge=1, description="Tokens a caption the LM writes may take (upstream: 512).")
    max_genres_tokens: int = Field(64, ge=1, description="Tokens the genres line may take (sample / format).")
    max_lyrics_tokens: int = Field(2048, ge=1, description="Tokens lyrics written by sample / format may take.")

    @model_validator(mode="after")
    def _durations(self) -> "LMConfig":
        if self.min_duration > self.max_duration:
            raise ValueError(f"min_duration {self.min_duration} is above max_duration {self.max_duration}")
        return self

    @property
    def name(self) -> str:
        return Path(self.checkpoint_dir).name if self.checkpoint_dir else f"acestep-5Hz-lm-{self.preset}"

    def limits(self) -> MetadataLimits:
        return MetadataLimits(duration_range=(self.min_duration, self.max_duration),
                              max_caption_tokens=self.max_caption_tokens, max_genres_tokens=self.max_genres_tokens,
                              max_lyrics_tokens=self.max_lyrics_tokens)


def build_lm_tokenizer(codebook_size: int = math.prod(FSQ_LEVELS)):
    """The byte-level preset tokenizer (`models.presets.build_byte_tokenizer`) with the 5 Hz LM's additions: Qwen's
    chat markers and `<think>` tags, `codebook_size` audio-code tokens, and a Qwen-style chat template."""
    from tokenizers import AddedToken

    tokenizer = build_byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    tokenizer.add_tokens([AddedToken(audio_code_token(i), special=True, normalized=False)
                          for i in range(codebook_size)], special_tokens=True)
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_lm_preset(name: str, seed: int = 0) -> tuple[Qwen3ForCausalLM, Any]:
    """A preset's model (random weights, deterministic from `seed`) and tokenizer."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if name not in LM_PRESETS:
        raise ValueError(f"unknown LM preset {name!r}; choose one of {sorted(LM_PRESETS)}")
    tokenizer = build_lm_tokenizer()
    cfg = {"vocab_size": len(tokenizer), **LM_PRESETS[name]}
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**cfg, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id))
    return model, tokenizer


def check_lm_dir(checkpoint_dir: str) -> Path:
    """The LM checkpoint directory, or `CheckpointError` naming what it lacks (the app checks it at deploy time)."""
    root = Path(checkpoint_dir).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"LM checkpoint_dir {str(root)!r} is not a directory")
    missing = [name for name in ("config.json", "tokenizer_config.json") if not (root / name).is_file()]
    if missing:
        raise CheckpointError(f"LM checkpoint_dir {str(root)!r} is incomplete: missing {', '.join(missing)}")
    return root


def load_lm(config: LMConfig) -> tuple[Qwen3ForCausalLM, Any]:
    """The configured model (on its device and dtype, eval) and tokenizer; nothing is downloaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    if config.checkpoint_dir is None:
        model, tokenizer = build_lm_preset(config.preset, seed=config.seed)
    else:
        root = check_lm_dir(config.checkpoint_dir)
        try:
            model = AutoModelForCausalLM.from_pretrained(root, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
        except Exception as exc:  # a corrupt file: keep the cause
            raise CheckpointError(f"cannot load the LM from {str(root)!r}: {exc}") from exc
        _own_aligned_storage(model)
    model.to(device=config.torch_device(), dtype=torch_dtype(config.dtype)).eval().requires_grad_(False)
    logger.info("loaded LM %s in %.2f s", config.name, time.perf_counter() - start)
    return model, tokenizer


def save_lm(model: Qwen3ForCausalLM, tokenizer, directory: str | Path) -> Path:
    """Write model + tokenizer in upstream's `acestep-5Hz-lm-*` layout (one directory), which `checkpoint_dir` loads."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


@dataclass
class LMRequest:
    """One job for the LM. Metadata fields the user gave are kept as given and never rewritten (None: empty)."""

    caption: str = ""
    lyrics: str = ""
    bpm: int | None = None
    keyscale: str | None = None  # e.g. "C major", "F# minor"
    timesignature: str | None = None  # "4" or "4/4"
    duration: float | None = None  # seconds; with thinking, the codes count is int(duration * codes_per_second)
    language: str | None = None  # vocal language code; None lets phase 1 choose it (with use_cot_language)
    thinking: bool = False  # phase 2: audio codes, one answer per seed
    use_cot_metas: bool = True  # phase 1: write the empty metadata fields
    use_cot_caption: bool = True  # phase 1 also writes a caption (the result's caption)
    use_cot_language: bool = True  # phase 1 also writes the vocal language
    sample_mode: bool = False  # first write caption, lyrics and metadata from `sample_query`
    sample_query: str = ""  # the description (empty: NO USER INPUT)
    instrumental: bool = False  # sample mode: no vocals
    use_format: bool = False  # first rewrite caption + lyrics (when either is given) and add metadata
    lm_temperature: float = 0.85  # 0: greedy
    lm_cfg_scale: float = 2.5  # > 1: classifier-free guidance in phase 2
    lm_negative_prompt: str = NO_USER_INPUT  # the unconditional row's prompt
    lm_top_k: int | None = None  # None or 0: off
    lm_top_p: float | None = 0.9  # None or >= 1: off
    lm_repetition_penalty: float = 1.0
    seeds: list[int] = field(default_factory=lambda: [0])  # one per output: phase 2 writes one code list per seed
    tag: str = field(default="", compare=False)  # the job id, for logs

    def given(self) -> dict[str, Any]:
        """The metadata fields the user fixed."""
        values = dict(bpm=self.bpm, keyscale=self.keyscale, timesignature=self.timesignature,
                      duration=self.duration, language=self.language)
        return {k: v for k, v in values.items() if v is not None and str(v).strip()}


@dataclass
class LMResult:
    """What the LM made of a job. `codes[i]` are the audio codes of `seeds[i]` (empty lists without thinking)."""

    metadata: LMMetadata  # the user's fields, and the LM's where the user left them empty
    caption: str  # for the condition encoder: the LM's caption (use_cot_caption, sample, format), else the user's
    lyrics: str  # sample / format lyrics, else the user's
    codes: list[list[int]]  # per seed: codebook indices, int(duration * codes_per_second) of them
    lm_fields: tuple[str, ...]  # the metadata fields the LM wrote
    texts: dict[str, str]  # each text pass's raw answer ("sample", "format", "cot")
    tokens: int  # tokens written, all passes and outputs (CFG rows count once)

    @property
    def audio_code_strings(self) -> list[str]:
        """Per seed, the `<|audio_code_N|>` string that `ConditionRequest.audio_codes` (diffusers' `audio_codes=`)
        takes; empty without codes."""
        return ["".join(audio_code_token(c) for c in codes) for codes in self.codes]


@dataclass(eq=False)
class _Sequence:
    """A row of the forward pass: its token ids (prompt, then what was written) and where its KV cache is."""

    ids: list[int]
    kv: torch.Tensor | None = None  # (layers, 2, kv_heads, cached, head_dim): its prefill's, until it decodes
    batch: _DecodeBatch | None = None  # where its cache is once it decoded: the batch's buffer, at row `slot`
    slot: int = 0
    cached: int = 0  # positions in its cache: all its ids but the last
    reserve: int = 64  # tokens it may write past the prompt (the batch buffer's room)

    def keys_values(self) -> torch.Tensor:
        """Its cache, `(layers, 2, kv_heads, cached, head_dim)` (a view into a batch's buffer once it decoded)."""
        return self.kv if self.batch is None else self.batch.row_cache(self.slot, self.cached)


@functools.cache
def _buffer_layer() -> type:
    """transformers' cache-layer interface over a preallocated buffer (defined at first use: transformers is imported
    where the engine computes). `update` writes the step's keys / values at position `length` of `(rows, kv_heads,
    capacity, head_dim)` buffers and returns views of positions [0, length]: a token costs no copy of the cache
    (`DynamicLayer` concatenates, a copy of the whole cache per token)."""
    from transformers.cache_utils import CacheLayerMixin

    class BufferLayer(CacheLayerMixin):
        is_sliding = False

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
            super().__init__()
            self.buffers, self.length = (keys, values), length
            self.keys, self.values = keys[:, :, :length], values[:, :, :length]
            self.is_initialized, self.device = True, keys.device

        def lazy_initialization(self, key_states, value_states) -> None:
            pass

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            keys, values = self.buffers
            end = self.length + key_states.shape[-2]
            keys[:, :, self.length:end] = key_states
            values[:, :, self.length:end] = value_states
            self.length, self.keys, self.values = end, keys[:, :, :end], values[:, :, :end]
            return self.keys, self.values

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.length + query_length, 0

        def get_seq_length(self) -> int:
            return self.length

        def get_max_length(self) -> int:
            return self.buffers[0].shape[-2]

    return BufferLayer


class _DecodeBatch:
    """The caches of the rows that decode together, left-padded to end at the same position in one buffer `(layers, 2,
    rows, kv_heads, capacity, head_dim)`. A step writes each row's new position in place; the buffer is built again
    (each row's cache copied in once) only when the rows change (a job joins, a pass ends) or its room runs out."""

    ROOM = 64  # positions past the longest row at least, when the rows' reserves are spent

    def __init__(self, rows: list[_Sequence], kv_shape: tuple[int, int, int, int]):
        import torch
        from transformers import Cache

        first = rows[0].keys_values()
        self.rows, self.end = list(rows), max(r.cached for r in rows)
        room = max(self.ROOM, *(r.reserve for r in rows))  # what a row may write past its prompt bounds what is left
        layers, _, heads, dim = kv_shape
        self.buffer = first.new_empty((layers, 2, len(rows), heads, self.end + room, dim))
        self.starts = [self.end - r.cached for r in rows]
        for slot, (row, start) in enumerate(zip(rows, self.starts)):
            self.buffer[:, :, slot, :, :start] = 0  # read under the mask: finite, or 0 x NaN would be NaN
            self.buffer[:, :, slot, :, start:self.end] = row.keys_values()
        for slot, row in enumerate(rows):  # after the copies: a row's old place may be another row's source
            row.kv, row.batch, row.slot = None, self, slot
        self.start_positions = torch.tensor(self.starts, device=self.buffer.device)
        layer = _buffer_layer()
        self.cache = Cache(layers=[layer(self.buffer[i, 0], self.buffer[i, 1], self.end) for i in range(layers)])

    def fits(self, rows: list[_Sequence]) -> bool:
        """These are its rows, in its order, and one more position fits."""
        return (len(rows) == len(self.rows) and all(a is b for a, b in zip(rows, self.rows))
                and self.end < self.buffer.shape[-2])

    def row_cache(self, slot: int, cached: int) -> torch.Tensor:
        start = self.starts[slot]
        return self.buffer[:, :, slot, :, start:start + cached]


@dataclass(eq=False)
class _Answer:
    """One answer being written: its conditional row (and unconditional row under CFG), constraint and generator."""

    rows: list[_Sequence]
    constraint: AnswerConstraint
    generator: torch.Generator
    prompt_length: int
    done: bool = False

    @property
    def written(self) -> list[int]:
        return self.rows[0].ids[self.prompt_length:]


@dataclass(eq=False)
class LMState:
    """One job in flight: its current pass (`stage`) and answers, and what earlier passes found."""

    request: LMRequest
    known: dict[str, Any]  # metadata so far: the user's fields, then the LM's
    prompt_caption: str  # the caption prompts carry (the user's, or sample's / format's)
    caption: str  # the result's caption
    lyrics: str
    finished: list[str] = field(default_factory=list)  # passes done
    stage: str | None = None  # the pass in progress
    answers: list[_Answer] = field(default_factory=list)
    lm_fields: list[str] = field(default_factory=list)
    cot_fields: dict[str, Any] | None = None  # the metadata block phase 1 wrote
    texts: dict[str, str] = field(default_factory=dict)
    codes: list[list[int]] = field(default_factory=list)
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    result: LMResult | None = None

    @property
    def done(self) -> bool:
        return self.result is not None

    @property
    def rows(self) -> int:
        """Forward-pass rows this job adds to a step."""
        return sum(len(a.rows) for a in self.answers if not a.done)

    def progress(self) -> tuple[str | None, int, int]:
        """(stage, written, total): codes written / to write in phase 2; tokens written so far otherwise (total 0)."""
        if self.stage == "codes":
            total = sum(s.n for a in self.answers for s in a.constraint.segments if isinstance(s, Codes))
            return self.stage, sum(len(a.constraint.codes) for a in self.answers), total
        return self.stage, sum(len(a.written) for a in self.answers), 0


def check_cache_argument(model: torch.nn.Module) -> None:
    """The engine hands the model its KV cache as `cache=`, transformers' name since 5.2x. Before that the argument was
    `past_key_values` and `cache=` fell silently into `**kwargs`: the model kept its own cache, ours stayed empty, and
    the first prefill failed deep inside (seen with transformers 5.17 on a GPU image). Refuse such a version at load."""
    if "cache" not in inspect.signature(type(model).forward).parameters:
        import transformers

        raise CheckpointError(f"transformers {transformers.__version__} is too old for the LM engine: its "
                              f"{type(model).__name__}.forward takes no `cache`; install transformers>=5.24,<6")


class LMEngine:
    """Qwen3 5 Hz LM + constrained decoding + per-job seeded sampling, stepped one token at a time across jobs."""

    PASSES = ("sample", "format", "cot", "codes")

    def __init__(self, config: LMConfig):
        self.config = config
        self.model, self.tokenizer = load_lm(config)
        check_cache_argument(self.model)
        self.device = config.torch_device()
        text_config = self.model.config
        if any(t != "full_attention" for t in (getattr(text_config, "layer_types", None) or ())):
            raise CheckpointError(f"LM {config.name}: sliding-window layers are not supported")
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.tables = TokenTables(self.tokenizer, self.vocab_size, self.device)
        self.limits = config.limits()
        self._batch: _DecodeBatch | None = None  # the last decode step's rows and their cache
        self._kv_shape = (text_config.num_hidden_layers, 2, text_config.num_key_value_heads,
                          getattr(text_config, "head_dim", None)
                          or text_config.hidden_size // text_config.num_attention_heads)

    @property
    def codebook_size(self) -> int:
        return self.tables.codebook_size

    def warm_up(self) -> None:
        self.generate([LMRequest(caption="warm-up", duration=1.0, bpm=120, keyscale="C major", timesignature="4",
                                 thinking=True, lm_cfg_scale=2.0, tag="warm-up")])

    # ---- jobs ---------------------------------------------------------------------------------------------------

    def check(self, request: LMRequest) -> None:
        """Raise ValueError naming the first field the engine cannot run with (the HTTP edge checks ranges first)."""
        if not request.seeds:
            raise ValueError("seeds: at least one seed is needed")
        checks = [("lm_temperature", request.lm_temperature, request.lm_temperature >= 0),
                  ("lm_top_k", request.lm_top_k, request.lm_top_k is None or request.lm_top_k >= 0),
                  ("lm_top_p", request.lm_top_p, request.lm_top_p is None or request.lm_top_p > 0),
                  ("lm_repetition_penalty", request.lm_repetition_penalty, request.lm_repetition_penalty > 0),
                  ("duration", request.duration, request.duration is None or request.duration > 0)]
        for name, value, ok in checks:
            if not ok:
                raise ValueError(f"{name}: {value!r} is out of range")
        if request.thinking and request.duration is None and not (
                request.use_cot_metas or request.sample_mode
                or (request.use_format and (request.caption or request.lyrics))):
            raise ValueError("thinking needs a duration: give one, or let the LM choose it (use_cot_metas, "
                             "sample_mode or use_format)")

    @no_grad
    def start(self, request: LMRequest) -> LMState:
        """A job's state, its first pass prepared (prompts tokenized; the prefill runs in its first `step`). A job
        with nothing to do is done at once."""
        self.check(request)
        state = LMState(request=request, known=request.given(), prompt_caption=request.caption,
                        caption=request.caption, lyrics=request.lyrics)
        self._advance_pass(state)
        return state

    @no_grad
    def step(self, states: list[LMState]) -> None:
        """Write one token for every unfinished answer of every state: new answers are prefilled (alone), the others
        share one decode forward. A state whose last pass ends gets its `result`."""
        states = list(dict.fromkeys(states))  # a state listed twice still writes one token
        answers = [a for s in states if not s.done for a in s.answers if not a.done]
        if not answers:
            return
        rows = [r for a in answers for r in a.rows]
        logits: dict[int, torch.Tensor] = {}
        for row in rows:
            if not row.cached:
                logits[id(row)] = self._prefill(row)
        decoding = [r for r in rows if id(r) not in logits]
        if decoding:
            for row, row_logits in zip(decoding, self._decode(decoding)):
                logits[id(row)] = row_logits
        for state in states:
            if state.done:
                continue
            for answer in state.answers:
                if answer.done:
                    continue
                token = self._choose(state.request, answer, [logits[id(r)] for r in answer.rows])
                if token is not None:
                    for row in answer.rows:
                        row.ids.append(token)
                    answer.constraint.advance(token)
                    state.tokens += 1
                answer.done = token is None or answer.constraint.done
            if all(a.done for a in state.answers):
                self._finish_pass(state)
                self._advance_pass(state)
        if any(a.done for a in answers):  # the next step's rows differ: its batch is built again; free this one
            self._batch = None

    def generate(self, requests: list[LMRequest]) -> list[LMResult]:
        """Every request to the end, all in one continuous batch (a convenience for tests and tools)."""
        states = [self.start(r) for r in requests]
        while not all(s.done for s in states):
            self.step([s for s in states if not s.done])
        return [s.result for s in states]

    # ---- passes -------------------------------------------------------------------------------------------------

    def _advance_pass(self, state: LMState) -> None:
        """Start the next pass the request asks for, or end the job."""
        request = state.request
        while True:
            later = self.PASSES[self.PASSES.index(state.finished[-1]) + 1:] if state.finished else self.PASSES
            stage = next((p for p in later if self._wanted(state, p)), None)
            if stage is None:
                state.stage, state.answers = None, []
                state.result = self._result(state)
                logger.info("LM job %s done in %.2f s (%d tokens)", request.tag, time.perf_counter() - state.started,
                            state.tokens)
                return
            self._begin_pass(state, stage)
            if not all(a.done for a in state.answers):
                return
            self._finish_pass(state)  # nothing to write (zero codes)

    def _wanted(self, state: LMState, stage: str) -> bool:
        request = state.request
        if stage == "sample":
            return request.sample_mode
        if stage == "format":
            return request.use_format and bool(state.prompt_caption or state.lyrics)
        if stage == "cot":
            return request.use_cot_metas and not all(state.known.get(f) is not None for f in PLANNING_FIELDS)
        return request.thinking

    def _begin_pass(self, state: LMState, stage: str) -> None:
        request, tokenizer, tables = state.request, self.tokenizer, self.tables
        state.stage, seeds = stage, request.seeds
        given = {k: v for k, v in state.known.items() if k in FIELD_ORDER and k != "caption"}
        if "duration" in given:  # the LM writes whole seconds (upstream: int(audio_duration))
            given["duration"] = int(float(given["duration"]))
        if stage in ("sample", "format"):
            prompt = (sample_prompt(tokenizer, request.sample_query, request.instrumental) if stage == "sample"
                      else format_prompt(tokenizer, state.prompt_caption, state.lyrics))
            constraint = AnswerConstraint(understand_segments(tables, FIELD_ORDER, given, self.limits))
            state.answers = [self._answer([prompt], constraint, seeds[0], reserve=512)]
        elif stage == "cot":
            fields = [f for f in ("bpm", "caption", "duration", "keyscale", "language", "timesignature")
                      if not (f == "caption" and not request.use_cot_caption)
                      and not (f == "language" and not request.use_cot_language)]
            prompt = cot_prompt(tokenizer, state.prompt_caption, state.lyrics)
            constraint = AnswerConstraint(metadata_segments(tables, fields, given, self.limits))
            state.answers = [self._answer([prompt], constraint, seeds[0], reserve=256)]
        else:
            duration = float(state.known["duration"])
            count = int(duration * self.config.codes_per_second)
            block = state.cot_fields if state.cot_fields is not None else {
                f: state.known[f] for f in PLANNING_FIELDS if f in state.known}
            prompts = [codes_prompt(tokenizer, state.prompt_caption, state.lyrics, format_cot(block))]
            if request.lm_cfg_scale > 1.0:
                prompts.append(codes_prompt(tokenizer, state.prompt_caption, state.lyrics, "", unconditional=True,
                                            negative_prompt=request.lm_negative_prompt))
            state.answers = [self._answer(prompts, AnswerConstraint([Codes(tables, count)]), seed, reserve=count + 1)
                             for seed in seeds]

    def _answer(self, prompts: list[str], constraint: AnswerConstraint, seed: int, reserve: int) -> _Answer:
        import torch

        rows = [_Sequence(ids=self.tokenizer.encode(p, add_special_tokens=False), reserve=reserve) for p in prompts]
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return _Answer(rows=rows, constraint=constraint, generator=generator, prompt_length=len(rows[0].ids),
                       done=constraint.done)

    def _finish_pass(self, state: LMState) -> None:
        stage, request = state.stage, state.request
        if stage == "codes":
            state.codes = [a.constraint.codes for a in state.answers]
        else:
            text = self.tokenizer.decode(state.answers[0].written, skip_special_tokens=False)
            state.texts[stage] = text
            fields, _ = parse_lm_output(text)
            written = LMMetadata.from_fields(fields).as_dict()
            for name, value in written.items():
                if value is not None and name not in state.known and name != "caption":
                    state.known[name] = value
                    state.lm_fields.append(name)
            if written["caption"]:
                state.lm_fields.append("caption")
            if stage == "cot":
                state.cot_fields = fields
                if request.use_cot_caption and written["caption"]:
                    state.caption = written["caption"]
            else:
                lyrics = extract_lyrics(text)
                state.prompt_caption = state.caption = written["caption"] or state.prompt_caption
                if stage == "sample":
                    state.lyrics = lyrics or ("[Instrumental]" if request.instrumental else "")
                else:
                    state.lyrics = lyrics or state.lyrics
            logger.info("LM job %s: %s pass wrote %s", request.tag, stage, sorted(k for k, v in written.items() if v))
        state.finished.append(stage)
        state.answers = []

    def _result(self, state: LMState) -> LMResult:
        known = state.known
        lm_caption = state.caption if "caption" in state.lm_fields else None
        metadata = LMMetadata(bpm=known.get("bpm"), keyscale=known.get("keyscale"),
                              timesignature=known.get("timesignature"), duration=known.get("duration"),
                              language=known.get("language"), caption=lm_caption, genres=known.get("genres"))
        return LMResult(metadata=metadata, caption=state.caption, lyrics=state.lyrics, codes=state.codes,
                        lm_fields=tuple(dict.fromkeys(state.lm_fields)), texts=dict(state.texts), tokens=state.tokens)

    # ---- one token ----------------------------------------------------------------------------------------------

    def _choose(self, request: LMRequest, answer: _Answer, logits: list[torch.Tensor]) -> int | None:
        """The answer's next token from its rows' logits `(vocab,)`: CFG, the constraint's mask, then upstream's
        sampling order (repetition penalty, top-k, top-p, temperature) with the answer's own generator."""
        import torch
        from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

        scores = logits[0].float()
        if len(logits) == 2:  # CFG on every token; the mask below keeps the allowed ones (upstream: on codes only)
            unconditional = logits[1].float()
            scores = unconditional + request.lm_cfg_scale * (scores - unconditional)
        allowed = answer.constraint.next(scores)
        if allowed is None:
            return None
        if allowed.forced is not None:
            return allowed.forced
        if request.lm_repetition_penalty != 1.0:
            seen = torch.tensor([answer.rows[0].ids], device=scores.device)
            scores = RepetitionPenaltyLogitsProcessor(request.lm_repetition_penalty)(seen, scores[None])[0]
        ids = allowed.ids
        candidates = scores[ids][None]
        if request.lm_top_k:
            candidates = TopKLogitsWarper(request.lm_top_k)(None, candidates)
        if request.lm_top_p is not None and request.lm_top_p < 1.0:
            candidates = TopPLogitsWarper(request.lm_top_p)(None, candidates)
        if request.lm_temperature > 0:
            probs = torch.softmax(candidates / request.lm_temperature, dim=-1)
            index = torch.multinomial(probs, 1, generator=answer.generator)[0, 0]
        else:
            index = torch.argmax(candidates[0])
        return int(ids[index])

    def _prefill(self, row: _Sequence) -> torch.Tensor:
        """Run a new row's prompt alone; keep its KV cache. Returns the logits `(vocab,)` of its first token."""
        import torch
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        input_ids = torch.tensor([row.ids], device=self.device)
        out = self.model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
        row.kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
        row.cached = len(row.ids)
        return out.logits[0, -1]

    def _decode(self, rows: list[_Sequence]) -> list[torch.Tensor]:
        """One forward over the rows' last tokens, in the batch buffer of the last step when the rows are the same
        (else a new one, `_DecodeBatch`): left-padded, a 2-D mask over the padding, per-row positions. Logits
        `(vocab,)` each."""
        import torch

        for r in rows:
            assert r.cached == len(r.ids) - 1, "a row's cache must hold all but its last token"
        batch = self._batch
        if batch is None or not batch.fits(rows):
            batch = self._batch = _DecodeBatch(rows, self._kv_shape)
        mask = (torch.arange(batch.end + 1, device=self.device)[None] >= batch.start_positions[:, None]).long()
        input_ids = torch.tensor([[r.ids[-1]] for r in rows], device=self.device)
        positions = (batch.end - batch.start_positions)[:, None]  # each row's own: its cached length
        try:
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=batch.cache,
                             use_cache=True, logits_to_keep=1)
        except BaseException:  # some layers may have written this position: the next step builds a new buffer
            self._batch = None
            raise
        batch.end += 1
        for r in rows:
            r.cached += 1
        return list(out.logits[:, -1])
