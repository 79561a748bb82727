"""Where a stage's weights come from: an embedded preset (random-init) or a local diffusers-format checkpoint.

Nothing is ever downloaded: a checkpoint is read with `from_pretrained(<local dir>, local_files_only=True)`, and a
missing or partial directory is a start-up error that names every missing part.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from models.presets import FSQ_LEVELS, PRESETS, build_preset, part_config

# torch too is imported where it is used, not here: a simulated stage replica, the ingress and the driver read these
# configs and never touch a tensor, and torch takes seconds to import on a busy CPU (a replica the autoscaler adds
# waits for it).
if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Component -> (loader, required). The two audio-token modules are optional in diffusers too (cover from source audio).
# Loaders are named, not imported (`_loader`): diffusers and transformers take seconds to import, and the processes
# that read only configs (the ingress, the driver, a simulated stage) never load weights.
_LOADERS: dict[str, tuple[str, bool]] = {
    "transformer": ("diffusers.AceStepTransformer1DModel", True),
    "condition_encoder": ("diffusers.AceStepConditionEncoder", True),
    "vae": ("diffusers.AutoencoderOobleck", True),
    "text_encoder": ("transformers.AutoModel", True),
    "tokenizer": ("transformers.AutoTokenizer", True),
    "scheduler": ("diffusers.FlowMatchEulerDiscreteScheduler", True),
    "audio_tokenizer": ("diffusers.AceStepAudioTokenizer", False),
    "audio_token_detokenizer": ("diffusers.AceStepAudioTokenDetokenizer", False),
}
REQUIRED_PARTS = [part for part, (_, required) in _LOADERS.items() if required]
# Cover from source audio quantizes the source through these (models.condition), and `audio_code_string` is turned
# into source latents by them; without them cover works from a reference clip only, and audio codes not at all.
COVER_FROM_SOURCE_PARTS = ["audio_tokenizer", "audio_token_detokenizer"]
# Task types per model variant (upstream's model table): turbo (guidance distilled) and SFT checkpoints serve the first
# three; base checkpoints also the track tasks. Turbo and sft differ in sampling (no CFG / CFG), not in tasks.
VARIANT_TASKS: dict[str, tuple[str, ...]] = {
    "turbo": ("text2music", "cover", "repaint"),
    "sft": ("text2music", "cover", "repaint"),
    "base": ("text2music", "cover", "repaint", "lego", "extract", "complete"),
}


def no_grad(fn: Callable) -> Callable:
    """`@torch.no_grad()`, importing torch at the first call instead of where the decorated function is defined."""

    @functools.wraps(fn)
    def without_grad(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return without_grad


def torch_dtype(name: str) -> torch.dtype:
    """`float32`, `bfloat16` or `float16` as a torch dtype."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or unreadable."""


class StageOptions(BaseModel):
    """Per-stage overrides of the model-wide settings (e.g. the DiT in bf16 on a GPU, the text encoder on CPU)."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description="Weights dtype.")
    device: str | None = Field(None, description="`cpu`, `cuda`, `cuda:N` or `auto`.")
    compile: bool = Field(False, description="torch.compile the stage's main module (opt-in; slow first call).")
    threads: int | None = Field(None, ge=1, le=256, description="CPU threads for the stage's torch ops. Default: "
                                "Ray's OMP_NUM_THREADS, which is 1 for a replica with num_cpus: 0.")


class LoadOptions(BaseModel):
    """How weights load, for every model the app runs (the DiT's stages' and the 5 Hz LM's)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, ge=0, description="Seed for the random init of a preset.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype (bf16 on GPU).")
    device: str = Field("auto", description="`auto` (cuda when available, else cpu), `cpu`, `cuda`, `cuda:N`.")

    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


class ModelConfig(LoadOptions):
    """Which weights every stage loads, and how."""

    model_config = ConfigDict(extra="forbid")

    preset: Literal[tuple(PRESETS)] = Field("tiny", description="Embedded random-init preset, used when "
                                            "checkpoint_dir is not set. `tiny` runs anywhere and makes noise.")
    checkpoint_dir: str | None = Field(None, description="Local diffusers-format ACE-Step 1.5 directory "
                                       "(transformer/, condition_encoder/, vae/, text_encoder/, tokenizer/, "
                                       "scheduler/). Overrides `preset`.")
    variant: Literal["auto", "turbo", "sft", "base"] = Field("auto", description=(
        "The ACE-Step variant the weights are, which decides the task types served: turbo and sft serve text2music, "
        "cover and repaint; base also lego, extract and complete. `auto` reads the transformer config: `is_turbo` "
        "(or model_version turbo) is turbo, model_version base or sft (also xl-base, xl-sft) says which; a non-turbo "
        "checkpoint whose config says neither is taken as sft, the variant with fewer tasks, so set `base` for such "
        "a base checkpoint. A variant that contradicts the config's is_turbo is a start-up error."))
    lora_dir: str | None = Field(None, description="Local directory of LoRA adapters for the DiT, one subdirectory "
                                 "per adapter, named as jobs name it (`lora`): diffusers layout "
                                 "(pytorch_lora_weights.safetensors) or PEFT layout (adapter_model.safetensors + "
                                 "adapter_config.json). Unset: jobs cannot ask for an adapter.")
    max_loaded_adapters: int = Field(4, ge=1, le=64, description="LoRA adapters a DiT replica keeps loaded; the "
                                     "least recently used is deleted from the model to load another.")

    stages: dict[Literal["condition", "dit", "codec"], StageOptions] = Field(
        default_factory=dict, description="Per-stage dtype / device / compile overrides. The VAE (codec) runs "
        "float32 unless its stage sets a dtype: its output is the audio.")

    def for_stage(self, stage: str) -> "ModelConfig":
        """This config with the stage's overrides applied (and the codec's float32 default)."""
        options = self.stages.get(stage, StageOptions())
        dtype = options.dtype or ("float32" if stage == "codec" else self.dtype)
        return self.model_copy(update={"dtype": dtype, "device": options.device or self.device})

    def compiled(self, stage: str) -> bool:
        return self.stages.get(stage, StageOptions()).compile

    def threads(self, stage: str) -> int | None:
        return self.stages.get(stage, StageOptions()).threads

    @property
    def name(self) -> str:
        """What `/v1/models` and `dit_model` report."""
        return Path(self.checkpoint_dir).name if self.checkpoint_dir else f"acestep-v15-{self.preset}"



def _loader(part: str) -> Any:
    """The diffusers or transformers class that loads `part` from a checkpoint (`_LOADERS`)."""
    module, name = _LOADERS[part][0].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def check_checkpoint_dir(checkpoint_dir: str | Path, parts: list[str]) -> Path:
    """Raise `CheckpointError` naming every required part of `parts` that the directory lacks."""
    root = Path(checkpoint_dir).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"checkpoint_dir {str(root)!r} is not a directory")
    missing = [p for p in parts if _LOADERS[p][1] and not (root / p).is_dir()]
    missing += [f"{p}/config.json" for p in parts if p not in ("tokenizer", "scheduler") and (root / p).is_dir()
                and not (root / p / "config.json").is_file()]
    if missing:
        raise CheckpointError(f"checkpoint_dir {str(root)!r} is incomplete: missing {', '.join(missing)}")
    return root


def has_parts(config: ModelConfig, parts: list[str]) -> bool:
    """Whether the configured weights include every one of `parts` (presets have them all)."""
    if config.checkpoint_dir is None:
        return True
    root = Path(config.checkpoint_dir).expanduser()
    return all((root / part).is_dir() for part in parts)


def load_components(config: ModelConfig, parts: list[str]) -> dict[str, Any]:
    """The requested components, on the configured device and dtype; optional parts absent from a checkpoint are None."""
    start = time.perf_counter()
    if config.checkpoint_dir is None:
        built = build_preset(config.preset, seed=config.seed)
        components = {p: built[p] for p in parts}
    else:
        root = check_checkpoint_dir(config.checkpoint_dir, parts)
        components = {}
        for part in parts:
            if not (root / part).is_dir():
                components[part] = None
                continue
            loader = _loader(part)
            try:
                if part in ("text_encoder", "tokenizer"):
                    components[part] = loader.from_pretrained(root / part, local_files_only=True)
                else:
                    components[part] = loader.from_pretrained(root, subfolder=part, local_files_only=True)
            except Exception as exc:  # a corrupt file: say which part, keep the cause
                raise CheckpointError(f"cannot load {part} from {str(root)!r}: {exc}") from exc
    import torch

    device, dtype = config.torch_device(), torch_dtype(config.dtype)
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.to(device=device, dtype=dtype).eval().requires_grad_(False)
            if config.checkpoint_dir is not None:
                _own_aligned_storage(module)
    logger.info("loaded %s from %s in %.2f s", ",".join(parts), config.name, time.perf_counter() - start)
    return components


def _own_aligned_storage(module: torch.nn.Module) -> None:
    """Give every CPU parameter and buffer its own freshly allocated storage.

    Loaded from safetensors, tensors can sit at addresses that are not 64-byte aligned (seen: 40 mod 64), where CPU
    kernels take other vector paths and sum in another order: the same weights then give results that differ in the
    last bits from a preset built in memory (4.8e-7 on the tiny DiT's latents). A copy is aligned like any other
    allocation, so a checkpoint and the preset it was saved from compute bit-identically.
    """
    import torch

    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()


def save_components(components: dict[str, Any], directory: str | Path) -> Path:
    """Write a component set in the diffusers layout that `checkpoint_dir` loads (used by tests and operators)."""
    from diffusers import AceStepPipeline

    AceStepPipeline(**components).save_pretrained(directory)
    return Path(directory)


def load_part_config(config: ModelConfig, part: str) -> dict[str, Any]:
    """One part's config alone, without its weights: the preset's, or the checkpoint's `<part>/config.json`."""
    if config.checkpoint_dir is None:
        return part_config(config.preset, part)
    root = check_checkpoint_dir(config.checkpoint_dir, [part])
    if not (root / part).is_dir():
        raise CheckpointError(f"checkpoint_dir {str(root)!r} has no {part}/")
    return dict(_loader(part).load_config(root, subfolder=part, local_files_only=True))


def load_vae_config(config: ModelConfig) -> dict[str, Any]:
    """The VAE config alone: sample rate, hop and channels for stages that do not load the VAE weights."""
    return load_part_config(config, "vae")


def model_variant(config: ModelConfig) -> str:
    """`turbo`, `sft` or `base`: `model.variant`, or with `auto` what the transformer config says (see the field).

    Turbo is decided as `AceStepPipeline` decides it (`is_turbo`, or model_version "turbo"), since that also decides
    whether the DiT runs CFG; an explicit variant that contradicts it raises `CheckpointError`.
    """
    transformer = load_part_config(config, "transformer")
    version = str(transformer.get("model_version") or "").strip().lower()
    turbo = bool(transformer.get("is_turbo")) or version == "turbo"
    if config.variant != "auto":
        if (config.variant == "turbo") != turbo:
            raise CheckpointError(f"model.variant {config.variant!r} contradicts {config.name}'s transformer config "
                                  f"(is_turbo {transformer.get('is_turbo')!r}, model_version "
                                  f"{transformer.get('model_version')!r})")
        return config.variant
    if turbo:
        return "turbo"
    named = version.replace("_", "-").rsplit("-", 1)[-1]  # "base", "xl-base", "xl_sft", ...
    return named if named in ("base", "sft") else "sft"


def supported_tasks(config: ModelConfig) -> tuple[str, ...]:
    """The task types the configured model serves (`VARIANT_TASKS` of its variant)."""
    return VARIANT_TASKS[model_variant(config)]


@dataclass(frozen=True)
class AudioCodeSpec:
    """What the model's audio tokenizer and detokenizer make of `<|audio_code_N|>` codes."""

    codebook_size: int  # codes are 0 .. codebook_size - 1 (the product of the FSQ levels)
    frames_per_code: int  # latent frames the detokenizer expands one code into (its pool window)
    seconds_per_code: float  # of audio: frames_per_code at the VAE's latent frame rate


def audio_code_spec(config: ModelConfig) -> AudioCodeSpec | None:
    """The model's audio codes, read from the configs; None when it lacks the tokenizer or the detokenizer."""
    if not has_parts(config, COVER_FROM_SOURCE_PARTS):
        return None
    levels = load_part_config(config, "audio_tokenizer").get("fsq_input_levels") or FSQ_LEVELS  # diffusers' default
    # AceStepPipeline reads the pool window with the same fallback.
    frames = int(load_part_config(config, "audio_token_detokenizer").get("pool_window_size") or 5)
    vae = load_vae_config(config)
    latents_per_second = vae["sampling_rate"] / math.prod(vae["downsampling_ratios"])
    return AudioCodeSpec(codebook_size=math.prod(levels), frames_per_code=frames,
                         seconds_per_code=frames / latents_per_second)


def pipeline_view(components: dict[str, Any], vae_config: dict[str, Any]):
    """An `AceStepPipeline` over the components one stage holds (the others None), to call its helper methods.

    The pipeline reads the sample rate and latent frame rate from its VAE; a stage without the VAE gets them from
    the VAE config instead of the pipeline's built-in 48 kHz fallback.
    """
    from diffusers import AceStepPipeline

    kwargs = {name: components.get(name) for name in _LOADERS}
    pipe = AceStepPipeline(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    pipe.sample_rate = int(vae_config["sampling_rate"])
    pipe.latents_per_second = pipe.sample_rate / math.prod(vae_config["downsampling_ratios"])
    return pipe
