"""Stage 1: caption + lyrics (+ reference / source latents) -> the packed condition sequence the DiT cross-attends to.

Runs the first half of `AceStepPipeline.__call__` (steps 1-5: encode_prompt, source latents, timbre reference,
condition encoder, chunk mask) for a batch of independent requests, each with its own metadata, and returns per
request exactly what a batch-of-one pipeline call would have built.

The six task types differ only here, as in the pipeline: in the instruction (`_get_task_instruction`, with the track
name of extract / lego and the track classes of complete) and in the context latents (`_context_latents`): text2music
conditions on the silence latent; repaint on the source with silence inside the region, which the chunk mask marks;
lego on the whole source, the chunk mask marking the region to generate; extract and complete on the whole source,
the chunk mask all ones; cover on the source's quantized latents (audio tokenizer, then detokenizer), or on the
detokenized `audio_codes` when a request carries them (a text2music request with codes runs as cover, as upstream).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from models.loading import ModelConfig, load_components, load_vae_config, no_grad, pipeline_view

if TYPE_CHECKING:  # torch is imported where the engine computes: the request types are read without it
    import torch

logger = logging.getLogger(__name__)

PARTS = ["tokenizer", "text_encoder", "condition_encoder", "audio_tokenizer", "audio_token_detokenizer"]


@dataclass
class ConditionRequest:
    """One job's text and audio conditions. Latents are `(frames, latent_channels)` float32 arrays."""

    caption: str
    lyrics: str
    audio_duration: float
    task_type: str = "text2music"
    vocal_language: str = "en"
    instruction: str | None = None
    bpm: int | None = None
    keyscale: str | None = None
    timesignature: str | None = None
    src_latents: np.ndarray | None = None
    reference_latents: np.ndarray | None = None
    repainting_start: float | None = None
    repainting_end: float | None = None
    audio_cover_strength: float = 1.0
    track_name: str | None = None  # extract / lego: the track, e.g. "vocals" (the pipeline's `track_name`)
    track_classes: list[str] | None = None  # complete: the tracks to add (the pipeline's `complete_track_classes`)
    audio_codes: str | None = None  # 5 Hz `<|audio_code_N|>` tokens (the pipeline's `audio_codes`)
    tag: str = ""  # the job id, for logs

    @property
    def task(self) -> str:
        """The task as the pipeline runs it: with audio codes, text2music becomes cover."""
        return "cover" if self.audio_codes and self.task_type == "text2music" else self.task_type


@dataclass
class ConditionResult:
    """What the DiT needs. `encoder_hidden_states` is `(cond_tokens, hidden)`, `context_latents` `(frames, 2*C)`."""

    encoder_hidden_states: np.ndarray
    context_latents: np.ndarray
    null_embedding: np.ndarray  # (hidden,) learned unconditional embedding for CFG
    non_cover_hidden_states: np.ndarray | None = None  # text2music conditions, for cover strength < 1

    @property
    def latent_length(self) -> int:
        return self.context_latents.shape[0]


class ConditionEngine:
    """Tokenizer + Qwen3 text encoder + ACE-Step condition encoder (+ audio tokenizer for cover from source audio)."""

    def __init__(self, config: ModelConfig):
        self.config = config = config.for_stage("condition")
        self.components = load_components(config, PARTS)
        self.pipe = pipeline_view(self.components, load_vae_config(config))
        self.device = config.torch_device()
        self.dtype = self.components["condition_encoder"].dtype
        if config.compiled("condition"):
            self.components["text_encoder"].compile()

    def warm_up(self) -> None:
        self.encode([ConditionRequest(caption="warm-up", lyrics="", audio_duration=1.0)])

    @property
    def latents_per_second(self) -> float:
        return self.pipe.latents_per_second

    @no_grad
    def encode(self, requests: list[ConditionRequest], max_text_length: int = 256,
               max_lyric_length: int = 2048) -> list[ConditionResult]:
        import torch
        from diffusers.pipelines.ace_step.pipeline_ace_step import TASK_INSTRUCTIONS

        pipe, device, dtype = self.pipe, self.device, self.dtype
        # Rows to encode: every request once, plus a text2music row for covers blended with strength < 1.
        rows = [(i, r.instruction or pipe._get_task_instruction(task_type=r.task, track_name=r.track_name,
                                                                complete_track_classes=r.track_classes))
                for i, r in enumerate(requests)]
        rows += [(i, TASK_INSTRUCTIONS["text2music"]) for i, r in enumerate(requests)
                 if r.task == "cover" and r.audio_cover_strength < 1.0]

        # 1. Encode prompts (AceStepPipeline.encode_prompt, but with per-request metadata). Pad on the right whatever
        #    the tokenizer declares (Qwen3-Embedding's says left): left padding would shift a shorter row's RoPE
        #    positions in the text encoder and the lyric encoder, so its conditions would depend on its batch-mates.
        #    The text encoder gets the mask so that no valid token attends to padding whatever the encoder (a causal
        #    one would not anyway); the condition encoder drops padded positions. Alone nothing is padded: the
        #    pipeline's batch-of-one tokens.
        texts, lyrics = zip(*(pipe._format_prompt(
            prompt=requests[i].caption, lyrics=requests[i].lyrics, vocal_language=requests[i].vocal_language,
            audio_duration=requests[i].audio_duration, instruction=instruction, bpm=requests[i].bpm,
            keyscale=requests[i].keyscale, timesignature=requests[i].timesignature) for i, instruction in rows))
        text_inputs = pipe.tokenizer(list(texts), padding="longest", padding_side="right", truncation=True,
                                     max_length=max_text_length, return_tensors="pt").to(device)
        lyric_inputs = pipe.tokenizer(list(lyrics), padding="longest", padding_side="right", truncation=True,
                                      max_length=max_lyric_length, return_tensors="pt").to(device)
        text_hidden_states = pipe.text_encoder(input_ids=text_inputs.input_ids,
                                               attention_mask=text_inputs.attention_mask).last_hidden_state
        lyric_hidden_states = pipe.text_encoder.get_input_embeddings()(lyric_inputs.input_ids)

        # 2. Source latents and chunk masks per request (lengths differ).
        contexts = [self._context_latents(r) for r in requests]

        # 3. Timbre reference: the request's reference latents, else the checkpoint's silence latent.
        timbre_frames = math.ceil(30 * pipe.latents_per_second)
        silence = pipe.condition_encoder.silence_latent[0, :timbre_frames].to(device=device, dtype=dtype)
        references = [silence if requests[i].reference_latents is None else
                      torch.from_numpy(requests[i].reference_latents).to(device=device, dtype=dtype) for i, _ in rows]

        # 4. Condition encoder over all rows; each row keeps only its own valid (packed-first) tokens.
        hidden, mask = pipe.condition_encoder(
            text_hidden_states=text_hidden_states.to(dtype),
            text_attention_mask=text_inputs.attention_mask.bool(),
            lyric_hidden_states=lyric_hidden_states.to(dtype),
            lyric_attention_mask=lyric_inputs.attention_mask.bool(),
            refer_audio_acoustic_hidden_states_packed=torch.stack(references),
            refer_audio_order_mask=torch.arange(len(rows), device=device, dtype=torch.long),
        )
        per_row = [_to_numpy(hidden[k, : int(mask[k].sum())]) for k in range(len(rows))]
        null_embedding = _to_numpy(pipe.condition_encoder.null_condition_emb.reshape(-1))
        non_cover = {rows[k][0]: per_row[k] for k in range(len(requests), len(rows))}
        return [ConditionResult(encoder_hidden_states=per_row[i], context_latents=contexts[i],
                                null_embedding=null_embedding, non_cover_hidden_states=non_cover.get(i))
                for i in range(len(requests))]

    def _context_latents(self, request: ConditionRequest) -> np.ndarray:
        """`cat([src_latents, chunk_mask], -1)` as `AceStepPipeline.__call__` steps 2 and 5 build it, batch of one.

        As there, audio codes take precedence over the source latents (which then only say that there was a source:
        the repaint and lego regions apply), and set the length.
        """
        import torch

        pipe, device, dtype, task = self.pipe, self.device, self.dtype, request.task
        acoustic_dim = pipe.condition_encoder.silence_latent.shape[-1]
        has_src = request.src_latents is not None
        latent_length = math.ceil(request.audio_duration * pipe.latents_per_second)
        if request.audio_codes:
            # The pipeline's own path: parse, FSQ indices -> quantizer output -> detokenizer (5 Hz -> 25 Hz). It raises
            # when the model lacks the tokenizer or the detokenizer, or the string holds no code.
            src_latents, latent_length = pipe.prepare_src_latents(device=device, dtype=dtype, batch_size=1,
                                                                  audio_codes=request.audio_codes)
        elif has_src:
            src_latents = torch.from_numpy(request.src_latents).to(device=device, dtype=dtype)[None]
            latent_length = src_latents.shape[1]
            if task == "cover":
                if pipe.audio_tokenizer is None or pipe.audio_token_detokenizer is None:
                    raise ValueError("cover from source audio needs the checkpoint's audio_tokenizer and "
                                     "audio_token_detokenizer")
                silence = pipe.condition_encoder.silence_latent.to(device=device, dtype=dtype)
                quantized, _ = pipe.audio_tokenizer.tokenize(src_latents, silence)
                src_latents = pipe.audio_token_detokenizer(quantized)[:, :latent_length, :].contiguous()
        else:
            src_latents, latent_length = pipe.prepare_src_latents(device=device, dtype=dtype, batch_size=1,
                                                                  latent_length=latent_length)
        chunk_mask = pipe._build_chunk_mask(
            task_type=task, latent_length=latent_length, batch_size=1, device=device, dtype=dtype,
            acoustic_dim=acoustic_dim, repainting_start=request.repainting_start,
            repainting_end=request.repainting_end, has_src_audio=has_src)
        if task == "repaint" and has_src:
            silence_tiled, _ = pipe.prepare_src_latents(device=device, dtype=dtype, batch_size=1,
                                                        latent_length=latent_length)
            src_latents = torch.where(chunk_mask > 0.5, silence_tiled, src_latents)
        return _to_numpy(torch.cat([src_latents, chunk_mask], dim=-1)[0])


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()
