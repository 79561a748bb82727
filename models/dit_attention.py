"""The DiT's attention processor for batches of different lengths: diffusers' ACE-Step processor with the key-padding
masks of the forward pass in flight (`models.dit.DiTEngine._forward` sets them).

Apart from `models/dit.py` (as diffusers keeps its processors apart from its models and pipelines) so that importing
the DiT's request types and scheduling rules does not import diffusers: the engine imports this module when it
builds its transformer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.transformers.ace_step_transformer import AceStepAttnProcessor2_0


@dataclass
class PaddingMasks:
    """Key-padding masks of one forward pass over a padded batch: additive (0 kept, dtype min masked), shaped to
    broadcast over heads (and queries, but for `sliding`); None where nothing is padded (what attention then gets is
    diffusers' own: no mask, or its sliding-window band)."""

    keys: torch.Tensor | None  # (B, 1, 1, L): latent patches, as self-attention keys (full-attention layers)
    sliding: torch.Tensor | None  # (B, 1, L, L) band & keys on sliding-window layers; `keys` where no band is needed
    cross: torch.Tensor | None  # (B, 1, 1, S): condition tokens, as cross-attention keys


class KeyPaddingAttnProcessor(AceStepAttnProcessor2_0):
    """diffusers' ACE-Step attention processor, with the key-padding masks of the pass in flight (`masks`) in place of
    the mask diffusers' forward hands each layer. With `masks` None (same-shape batches) it is diffusers' processor.

    The masks go through the processor's own `attention_mask` path: SDPA (any of its kernels that take a mask),
    or, with a flash backend, diffusers' conversion of a 4D keep-mask to a varlen padding mask. diffusers' forward
    takes no mask, and its blocks call the processor with fixed arguments (filtered by this `__call__`'s signature),
    so `DiTEngine._forward` sets `masks` on the one instance that all the model's attention layers share.
    """

    def __init__(self):
        super().__init__()
        self.masks: PaddingMasks | None = None

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        masks = self.masks
        if masks is not None:
            if attn.is_cross_attention and encoder_hidden_states is not None:
                attention_mask = masks.cross if masks.cross is not None else attention_mask
            elif masks.keys is not None:
                # A sliding layer gets diffusers' band mask (SDPA backends) or None (flash: it passes window_size).
                banded = attention_mask is not None and getattr(attn, "sliding_window", None) is not None
                attention_mask = masks.sliding if banded else masks.keys
        return super().__call__(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                attention_mask=attention_mask, image_rotary_emb=image_rotary_emb)
