"""Model presets: the ACE-Step 1.5 component set, built random-init from a config or loaded from a local directory.

A *component set* is the dict of modules `diffusers.AceStepPipeline(**components)` takes: `vae`, `text_encoder`,
`tokenizer`, `transformer`, `condition_encoder`, `scheduler`, `audio_tokenizer`, `audio_token_detokenizer`.

Presets keep the real architecture (diffusers / transformers classes) and the real audio contract of the released
checkpoints: 48 kHz stereo, a 1920-sample VAE hop (25 latent frames per second) and 64 latent channels. Only widths
and depths shrink. `tiny` is the default: a few MB, seeded, noise-like audio, fast on any CPU; `tiny-base` is `tiny`
with a base (CFG) DiT. The full-size presets (`turbo`, `base`, `xl-turbo`) instantiate the released shapes with random
weights for GPU benchmarks.

A preset's variant, hence the task types it serves (`models.loading.model_variant`), is read from its transformer
config as a checkpoint's is: `is_turbo` / `model_version` "turbo" is turbo (text2music, cover, repaint), `model_version`
"base" is base (all six tasks). So `tiny` and `small` serve what a turbo checkpoint serves, and `tiny-base` what a base
one serves (lego, extract and complete too).
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import AutoencoderOobleck
    from diffusers.pipelines.ace_step import AceStepConditionEncoder
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

# The audio contract every preset keeps (a real checkpoint's vae/config.json has the same values).
_VAE_CONTRACT = dict(downsampling_ratios=[2, 4, 4, 6, 10], decoder_input_channels=64, audio_channels=2,
                     sampling_rate=48000)
_FULL_VAE = dict(encoder_hidden_size=128, channel_multiples=[1, 2, 4, 8, 16], decoder_channels=128, **_VAE_CONTRACT)
# The encoder width of Oobleck is tied to 2 x latent channels (mean and scale), so only the decoder can shrink.
_TINY_VAE = dict(encoder_hidden_size=128, channel_multiples=[1, 1, 1, 1, 1], decoder_channels=8, **_VAE_CONTRACT)
_QWEN3_EMBEDDING_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                            num_key_value_heads=8, head_dim=128, rope_theta=1_000_000.0, max_position_embeddings=32768)


def _dit(hidden: int, inter: int, layers: int, heads: int, kv: int, head_dim: int, window: int, **extra) -> dict:
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, head_dim=head_dim, in_channels=192, audio_acoustic_hidden_dim=64,
                patch_size=2, sliding_window=window, **extra)


def _encoder(hidden: int, inter: int, heads: int, kv: int, head_dim: int, window: int, text_dim: int,
             lyric_layers: int, timbre_layers: int) -> dict:
    return dict(hidden_size=hidden, intermediate_size=inter, text_hidden_dim=text_dim, timbre_hidden_dim=64,
                num_lyric_encoder_hidden_layers=lyric_layers, num_timbre_encoder_hidden_layers=timbre_layers,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, sliding_window=window)


def _audio_tokens(hidden: int, inter: int, heads: int, kv: int, head_dim: int, window: int) -> dict:
    return dict(hidden_size=hidden, intermediate_size=inter, audio_acoustic_hidden_dim=64, pool_window_size=5,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, sliding_window=window)


# Everything but the DiT of the released checkpoints: condition encoder, audio tokens, Qwen3 text encoder, VAE.
_FULL_CONDITIONING = dict(
    condition_encoder=_encoder(2048, 6144, 16, 8, 128, 128, text_dim=1024, lyric_layers=8, timbre_layers=4),
    audio_tokens=_audio_tokens(2048, 6144, 16, 8, 128, 128),
    text_encoder=_QWEN3_EMBEDDING_06B,
    vae=_FULL_VAE,
)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        transformer=_dit(64, 128, 2, 4, 2, 16, 16, rope_theta=10000.0, is_turbo=True, model_version="turbo"),
        condition_encoder=_encoder(64, 128, 4, 2, 16, 16, text_dim=32, lyric_layers=2, timbre_layers=2),
        audio_tokens=_audio_tokens(64, 128, 4, 2, 16, 16),
        text_encoder=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, max_position_embeddings=4096),
        vae=_TINY_VAE,
    ),
    # Mid-size: compute dominates on a 2-core CPU, and the DiT (16 narrow layers) most of it, as on a GPU with the
    # full-size models, so batching and scheduling effects are measurable there.
    "small": dict(
        transformer=_dit(256, 768, 16, 8, 4, 32, 64, is_turbo=True, model_version="turbo"),
        condition_encoder=_encoder(256, 768, 8, 4, 32, 64, text_dim=128, lyric_layers=2, timbre_layers=2),
        audio_tokens=_audio_tokens(256, 768, 8, 4, 32, 64),
        text_encoder=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=32, max_position_embeddings=4096),
        vae=_TINY_VAE,
    ),
    # Released 2B shapes (acestep-v15-turbo), random weights: for GPU benchmarks only.
    "turbo": dict(transformer=_dit(2048, 6144, 24, 16, 8, 128, 128, is_turbo=True, model_version="turbo"),
                  **_FULL_CONDITIONING),
    "base": dict(transformer=_dit(2048, 6144, 24, 16, 8, 128, 128, is_turbo=False, model_version="base"),
                 **_FULL_CONDITIONING),
    # XL: a wider DiT over the same 2048-wide condition encoder.
    "xl-turbo": dict(transformer=_dit(2560, 9728, 32, 32, 8, 128, 128, encoder_hidden_size=2048, is_turbo=True,
                                      model_version="turbo"), **_FULL_CONDITIONING),
}
# `tiny` with a base (non-turbo) DiT, so that the pipeline and the DiT engine run CFG with APG guidance, the sampling
# path of the base / SFT checkpoints, and the service offers the base variant's six task types. The flags build no
# other modules: same seed, same weights as `tiny`.
PRESETS["tiny-base"] = {**PRESETS["tiny"],
                        "transformer": {**PRESETS["tiny"]["transformer"], "is_turbo": False, "model_version": "base"}}

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]
# The released checkpoints' FSQ levels (also diffusers' default): 8*8*8*5*5*5 = 64,000 audio codes.
FSQ_LEVELS = [8, 8, 8, 5, 5, 5]


def part_config(name: str, part: str) -> dict[str, Any]:
    """What a preset builds one part from, as a checkpoint's `<part>/config.json` holds it: `transformer`,
    `condition_encoder`, `vae`, `audio_tokenizer` or `audio_token_detokenizer`."""
    cfg = PRESETS[name]
    if part == "audio_tokenizer":
        tokens = cfg["audio_tokens"]
        return {"fsq_dim": tokens["hidden_size"], "fsq_input_levels": list(FSQ_LEVELS), **tokens}
    if part == "audio_token_detokenizer":
        return dict(cfg["audio_tokens"])
    return dict(cfg[part])


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built locally (256 byte symbols + `<|endoftext|>` + `<|pad|>`): nothing to download.

    The ACE-Step prompt templates end in `<|endoftext|>`, so it must be a single special token, as in Qwen3's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>")


def build_preset(name: str, seed: int = 0) -> dict[str, Any]:
    """Instantiate a preset's component set with random weights, deterministically from `seed`."""
    # Imported here, not at the top: the configs above are read by processes that never build a model (the ingress,
    # the driver, a simulated stage), and diffusers + transformers take seconds to import.
    import torch
    from diffusers import AutoencoderOobleck, FlowMatchEulerDiscreteScheduler
    from diffusers.models.transformers.ace_step_transformer import AceStepTransformer1DModel
    from diffusers.pipelines.ace_step import AceStepConditionEncoder
    from diffusers.pipelines.ace_step.modeling_ace_step import AceStepAudioTokenDetokenizer, AceStepAudioTokenizer
    from transformers import Qwen3Config, Qwen3Model

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]
    start = time.perf_counter()
    tokenizer = build_byte_tokenizer()
    torch.manual_seed(seed)
    transformer = AceStepTransformer1DModel(**cfg["transformer"])
    torch.manual_seed(seed + 1)
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), **cfg["text_encoder"]))
    torch.manual_seed(seed + 2)
    condition_encoder = AceStepConditionEncoder(**cfg["condition_encoder"])
    torch.manual_seed(seed + 3)
    vae = AutoencoderOobleck(**cfg["vae"])
    torch.manual_seed(seed + 4)
    audio_tokenizer = AceStepAudioTokenizer(**part_config(name, "audio_tokenizer"))
    torch.manual_seed(seed + 5)
    audio_token_detokenizer = AceStepAudioTokenDetokenizer(**part_config(name, "audio_token_detokenizer"))
    components = dict(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
        condition_encoder=condition_encoder,
        # ACE-Step computes its own shifted sigmas and passes them in, so the scheduler itself is unshifted on [0, 1].
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0),
        audio_tokenizer=audio_tokenizer, audio_token_detokenizer=audio_token_detokenizer,
    )
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    _fill_silence_latent(condition_encoder, vae)
    logger.info("built preset %s (seed %d) in %.2f s", name, seed, time.perf_counter() - start)
    return components


def _fill_silence_latent(condition_encoder: AceStepConditionEncoder, vae: AutoencoderOobleck) -> None:
    """Write the VAE encoding of digital silence into `condition_encoder.silence_latent`.

    A released checkpoint ships this buffer. For random weights it must come from this VAE, or the timbre encoder and
    text2music source latents are fed a latent no VAE produces. Silence is stationary, so one interior frame of a short
    encoded clip, repeated, is the encoding of long silence (the Oobleck encoder is convolutional).
    """
    import torch

    hop = math.prod(vae.config.downsampling_ratios)
    clip = torch.zeros(1, vae.config.audio_channels, 16 * hop)  # 16 frames: the middle one is clear of edge effects
    with torch.no_grad():
        frame = vae.encode(clip).latent_dist.mode()[:, :, 8]  # (1, latent_channels)
        buffer = condition_encoder.silence_latent
        buffer.copy_(frame[:, None, :].expand_as(buffer))
