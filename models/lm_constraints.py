"""Constrained decoding for the 5 Hz LM: which tokens each step of an answer may take, so that every answer parses.

Upstream (`acestep/constrained_logits_processor.py`, `MetadataConstrainedLogitsProcessor`) is one FSM object with a
state per field, shared by every sequence of a batch. Here the same rules are split into small per-answer pieces
(`Segment`s) that an `AnswerConstraint` walks in order, one instance per sequence, so that sequences decoded in the
same forward pass never share state:

- `Forced`: fixed tokens: `<think>`, `\\n`, the field names (`bpm:`), a value the user gave (` 120\\n`), `</think>`.
- `Choice`: a value from a fixed set (bpm 30-300, duration, key/scale, language, time signature), through a prefix tree
  over the tokenizer's own tokenization of `"<field>: <value>"`, closed by a newline (upstream `_build_*_prefix_tree`).
  The language takes its first token greedily, as upstream does.
- `Text`: the caption (YAML multi-line: a line may be continued by an indented line) and genres (one line). Special
  and added tokens (audio codes, `<think>`, chat markers) and line breaks inside a token are never allowed; a line
  must hold text before it ends; at most `max_tokens`. After a line break the caption goes on only if the model's top
  token is indented (upstream's rule); otherwise the next field name is forced, where upstream lets the model write
  it freely and maps what it wrote, which random weights need not parse.
- `Codes`: exactly `n` audio-code tokens and nothing else; then the answer ends (upstream masks to codes + EOS and
  forces EOS at the target count).
- `FreeText`: the lyrics after `</think>` in sample / format answers: any token but audio codes, until an end token
  or `max_tokens`.

A constraint only masks; sampling (CFG, repetition penalty, top-k / top-p, temperature) is the engine's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from models.lm_prompts import (AUDIO_CODE, BPM_RANGE, VALID_KEYSCALES, VALID_LANGUAGES, VALID_TIME_SIGNATURES,
                               cot_timesignature)

if TYPE_CHECKING:  # the tables are built with torch, in the LM engine; the request types are read without it
    import torch

_LINE_BREAK = re.compile(r"[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_END_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass
class Allowed:
    """What the next token may be: one `forced` token (no sampling), or any of `ids` (a 1-D LongTensor)."""

    forced: int | None = None
    ids: torch.Tensor | None = None


class TokenTables:
    """Facts about a tokenizer's vocabulary that the constraints need, computed once (a few hundred ms per 100k
    tokens). Ids are those of the model's logits (`vocab_size`, which may exceed the tokenizer's: padding rows)."""

    def __init__(self, tokenizer, vocab_size: int, device: torch.device):
        import torch

        self.tokenizer, self.device = tokenizer, device
        size = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False)
        self.texts = texts + [""] * max(0, vocab_size - size)  # each token alone, as text
        added = set(tokenizer.added_tokens_decoder)
        # Audio codes: `<|audio_code_N|>` added tokens, code N -> token id.
        codes = {}
        for token, token_id in tokenizer.get_added_vocab().items():
            match = AUDIO_CODE.fullmatch(token)
            if match:
                codes[int(match.group(1))] = token_id
        if not codes or sorted(codes) != list(range(len(codes))):
            raise ValueError(f"the tokenizer's audio code tokens are not <|audio_code_0|>..<|audio_code_N|> "
                             f"({len(codes)} found)")
        self.codebook_size = len(codes)
        self.code_ids = torch.tensor([codes[c] for c in range(len(codes))], device=device)
        self.code_of_token = torch.full((vocab_size,), -1, dtype=torch.long, device=device)
        self.code_of_token[self.code_ids] = torch.arange(len(codes), device=device)
        code_set = set(codes.values())

        plain = [i for i in range(size) if i not in added and texts[i] and not _LINE_BREAK.search(texts[i])]
        line_end = [i for i in range(size) if i not in added and texts[i].endswith("\n")
                    and not _LINE_BREAK.search(texts[i][:-1])]
        ids = lambda values: torch.tensor(sorted(values), dtype=torch.long, device=device)  # noqa: E731
        self.plain = ids(plain)  # text without line breaks
        self.text = ids(plain + line_end)  # ... or text ending a line
        self.indent = ids(i for i in plain if texts[i][0] in " \t")  # plain text starting with indentation
        self.nonblank = ids(i for i in plain if texts[i].strip())  # plain text with something but whitespace
        self.non_code = ids(i for i in range(size) if i not in code_set)
        self.starts_indented = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.starts_indented[self.indent] = True
        self.newline = self.encode("\n")[-1]
        self.end_ids = {tokenizer.convert_tokens_to_ids(t) for t in _END_TOKENS if t in tokenizer.get_vocab()}
        if tokenizer.eos_token_id is not None:
            self.end_ids.add(tokenizer.eos_token_id)
        self._tries: dict[tuple, dict[tuple[int, ...], torch.Tensor]] = {}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def name_tokens(self, name: str) -> list[int]:
        """`<name>:` as the constraints force it (no space: the value's tokens carry it, as upstream)."""
        return self.encode(f"{name}:")

    def value_tokens(self, name: str, value: str) -> list[int]:
        """The tokens of ` <value>` after `<name>:`, as the tokenizer splits `"<name>: <value>"` (so that a space
        merged into the value's first token stays merged), without the closing newline."""
        context, full = self.name_tokens(name), self.encode(f"{name}: {value}")
        return full[len(context):] if full[:len(context)] == context else self.encode(f" {value}")

    def trie(self, name: str, values: Sequence[str]) -> dict[tuple[int, ...], torch.Tensor]:
        """Prefix tree over the values' tokens: token prefix -> allowed next tokens (the newline where complete)."""
        key = (name, tuple(values))
        if key not in self._tries:
            import torch

            nodes: dict[tuple[int, ...], set[int]] = {}
            for value in values:
                tokens = self.value_tokens(name, value) + [self.newline]
                for i, token in enumerate(tokens):
                    nodes.setdefault(tuple(tokens[:i]), set()).add(token)
            self._tries[key] = {prefix: torch.tensor(sorted(allowed), dtype=torch.long, device=self.device)
                                for prefix, allowed in nodes.items()}
        return self._tries[key]


class Segment:
    """One stretch of an answer under one rule. `allowed` returns None when the segment is over without writing."""

    done: bool = False

    def allowed(self, scores: torch.Tensor) -> Allowed | None:
        raise NotImplementedError

    def advance(self, token: int) -> None:
        raise NotImplementedError


class Forced(Segment):
    def __init__(self, tokens: Sequence[int]):
        self.tokens = list(tokens)
        self.done = not self.tokens

    def allowed(self, scores):
        return Allowed(forced=self.tokens[0]) if self.tokens else None

    def advance(self, token):
        self.tokens.pop(0)
        self.done = not self.tokens


class Choice(Segment):
    """One value of a fixed set, through the prefix tree; the newline closes it."""

    def __init__(self, trie: dict[tuple[int, ...], torch.Tensor], newline: int, greedy_first: bool = False):
        self.trie, self.newline, self.greedy_first = trie, newline, greedy_first
        self.prefix: tuple[int, ...] = ()

    def allowed(self, scores):
        ids = self.trie[self.prefix]
        if len(ids) == 1:
            return Allowed(forced=int(ids[0]))
        if self.greedy_first and not self.prefix:  # upstream: the language is the top-1 candidate, not sampled
            return Allowed(forced=int(ids[scores[ids].argmax()]))
        return Allowed(ids=ids)

    def advance(self, token):
        if token == self.newline:
            self.done = True
        else:
            self.prefix += (token,)


class Text(Segment):
    """Free text under the rules in the module docstring; `multiline` allows indented continuation lines."""

    def __init__(self, tables: TokenTables, max_tokens: int, multiline: bool):
        self.tables, self.max_tokens, self.multiline = tables, max_tokens, multiline
        self.count = 0
        self.at_line_start = False  # just after a line break
        self.line_has_text = False
        self.continuing = False  # a continuation line has begun (its indentation written)

    def allowed(self, scores):
        t = self.tables
        if self.at_line_start:
            if self.multiline and self.count < self.max_tokens and bool(t.starts_indented[scores.argmax()]):
                self.at_line_start, self.continuing = False, True
                return Allowed(ids=t.indent)
            self.done = True
            return None
        if self.count >= self.max_tokens:
            return Allowed(forced=t.newline)
        if not self.line_has_text:
            return Allowed(ids=t.plain if self.continuing else t.nonblank)
        return Allowed(ids=t.text)

    def advance(self, token):
        self.count += 1
        text = self.tables.texts[token]
        if text.endswith("\n"):
            self.at_line_start, self.line_has_text, self.continuing = True, False, False
            self.done = not self.multiline
        elif text.strip():
            self.line_has_text = True


class Codes(Segment):
    """Exactly `n` audio codes."""

    def __init__(self, tables: TokenTables, n: int):
        self.tables, self.n = tables, n
        self.codes: list[int] = []
        self.done = n <= 0

    def allowed(self, scores):
        return None if self.done else Allowed(ids=self.tables.code_ids)

    def advance(self, token):
        self.codes.append(int(self.tables.code_of_token[token]))
        self.done = len(self.codes) >= self.n


class FreeText(Segment):
    """Anything but audio codes, until an end token (which is written) or `max_tokens`."""

    def __init__(self, tables: TokenTables, max_tokens: int):
        self.tables, self.max_tokens = tables, max_tokens
        self.count = 0
        self.done = max_tokens <= 0

    def allowed(self, scores):
        return None if self.done else Allowed(ids=self.tables.non_code)

    def advance(self, token):
        self.count += 1
        self.done = token in self.tables.end_ids or self.count >= self.max_tokens


@dataclass
class AnswerConstraint:
    """The segments of one answer, walked in order. `next` gives the allowed tokens, or None when the answer is over."""

    segments: list[Segment]
    index: int = field(default=0)

    def next(self, scores: torch.Tensor) -> Allowed | None:
        """`scores`: `(vocab,)` logits of this step (after CFG), for the greedy and look-ahead rules."""
        while self.index < len(self.segments):
            segment = self.segments[self.index]
            allowed = None if segment.done else segment.allowed(scores)
            if allowed is not None:
                return allowed
            self.index += 1
        return None

    def advance(self, token: int) -> None:
        segment = self.segments[self.index]
        segment.advance(token)
        while self.index < len(self.segments) and self.segments[self.index].done:
            self.index += 1

    @property
    def done(self) -> bool:
        return self.index >= len(self.segments)

    @property
    def codes(self) -> list[int]:
        return [c for s in self.segments if isinstance(s, Codes) for c in s.codes]


@dataclass
class MetadataLimits:
    """What the LM may write for the fields it fills itself."""

    duration_range: tuple[int, int]
    max_caption_tokens: int = 512  # upstream's caption cap
    max_genres_tokens: int = 64
    max_lyrics_tokens: int = 2048


def metadata_segments(tables: TokenTables, fields: Sequence[str], given: dict[str, str],
                      limits: MetadataLimits) -> list[Segment]:
    """`<think>\\n` and one `<field>: <value>\\n` line per field, in order; fields in `given` are forced to its value,
    the others are written by the model within their value sets. No closing tag (phase 1 stops before it)."""
    low, high = limits.duration_range
    values = {"bpm": [str(v) for v in range(BPM_RANGE[0], BPM_RANGE[1] + 1)],
              "duration": [str(v) for v in range(low, high + 1)], "keyscale": list(VALID_KEYSCALES),
              "language": list(VALID_LANGUAGES), "timesignature": list(VALID_TIME_SIGNATURES)}
    segments: list[Segment] = [Forced(tables.encode("<think>")), Forced([tables.newline])]
    for name in fields:
        segments.append(Forced(tables.name_tokens(name)))
        if given.get(name) is not None:
            value = cot_timesignature(str(given[name])) if name == "timesignature" else str(given[name])
            segments.append(Forced(tables.value_tokens(name, value) + [tables.newline]))
        elif name == "caption":
            segments.append(Text(tables, limits.max_caption_tokens, multiline=True))
        elif name == "genres":
            segments.append(Text(tables, limits.max_genres_tokens, multiline=False))
        else:
            segments.append(Choice(tables.trie(name, values[name]), tables.newline, greedy_first=name == "language"))
    return segments


def understand_segments(tables: TokenTables, fields: Sequence[str], given: dict[str, str],
                        limits: MetadataLimits) -> list[Segment]:
    """Sample / format answers: the metadata block, `</think>`, then free lyrics (upstream's "understand" phase)."""
    return (metadata_segments(tables, fields, given, limits)
            + [Forced(tables.encode("</think>")), FreeText(tables, limits.max_lyrics_tokens)])
