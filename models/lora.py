"""Per-job LoRA adapters for the DiT: read from a local directory, loaded on demand into one replica's transformer.

`model.lora_dir` holds one subdirectory per adapter; its name is the adapter's name (what a job's `lora` says). An
adapter is in one of the two layouts ACE-Step LoRAs come in:

- diffusers: `pytorch_lora_weights.safetensors`, as `AceStepPipeline.save_lora_weights` (keys `transformer.*`) or
  `AceStepTransformer1DModel.save_lora_adapter` (bare keys) write it; the LoRA config, if any, in the file's header.
- PEFT: `adapter_model.safetensors` + `adapter_config.json`, as `PeftModel.save_pretrained` writes it (ACE-Step's
  own trainer: keys `base_model.model.layers.N.*_attn.{q,k,v,o}_proj.*`, renamed by diffusers'
  `AceStepLoraLoaderMixin.lora_state_dict`).

Reading and injecting are diffusers' (`AceStepLoraLoaderMixin.lora_state_dict`, then the PEFT integration of
`AceStepTransformer1DModel`: `load_lora_adapter`, `set_adapters`, `enable_lora` / `disable_lora`,
`delete_adapters`). `AdapterRegistry` adds what serving needs: names checked against the directory, every weight
checked against the transformer before anything is injected (a bad adapter fails its own jobs, nothing else), at most
`max_loaded_adapters` loaded per replica (least recently used evicted), and one adapter and scale (or none) active
per forward pass. LoRA wraps the attention and MLP `Linear`s; the attention processor (`KeyPaddingAttnProcessor`)
calls them as before, so the padding masks apply unchanged.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import time
import warnings
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # imported where tensors are, not with the module: the ingress lists adapters without torch
    import torch

logger = logging.getLogger(__name__)

# diffusers' `LORA_WEIGHT_NAME_SAFE` (tests/models/test_lora.py pins it): importing `diffusers.loaders` to read it would
# import peft and transformers into every process that lists adapters, the ingress's included.
LORA_WEIGHT_NAME_SAFE = "pytorch_lora_weights.safetensors"
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
# A name is one path component: no separators, no leading dot (so no `..` and no hidden directories).
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
# The projections ACE-Step's trainer adapts (its names; diffusers': to_q, to_k, to_v, to_out.0), in both attentions.
ACESTEP_TARGETS = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "o_proj": "to_out.0"}
_PREFIXES = ("transformer.", "base_model.model.")
_ids = itertools.count()  # peft adapter names, unique per process (a transformer may be deep-copied with adapters)


class AdapterError(ValueError):
    """A job's `lora` / `lora_scale` cannot be served (the message names the adapter)."""


class UnknownAdapterError(AdapterError):
    """The name is not an adapter of `lora_dir` (or not a valid name, or the model has no `lora_dir`): a 400."""


class AdapterLoadError(AdapterError):
    """The adapter's files are missing, unreadable, or do not fit this DiT (shapes, layers); nothing was loaded."""


def lora_key(name: str | None, scale: float) -> tuple[str, float] | None:
    """What of a job's adapter its forward passes share: `(name, scale)`, or None without one. An adapter at scale 0
    adds exactly nothing (`result + lora_B(lora_A(x)) * 0`), so it runs, and batches, as no adapter."""
    if name is None:
        return None
    if not math.isfinite(scale):
        raise AdapterError(f"lora_scale must be a finite number, got {scale!r}")
    return (name, float(scale)) if scale != 0.0 else None


def _weights_file(directory: Path) -> str | None:
    for weight_name in (LORA_WEIGHT_NAME_SAFE, PEFT_WEIGHT_NAME):
        if (directory / weight_name).is_file():
            return weight_name
    return None


def available_adapters(lora_dir: str | Path | None) -> list[str]:
    """The adapters of `lora_dir`, sorted: subdirectories with a valid name that hold a weights file."""
    if lora_dir is None or not Path(lora_dir).is_dir():
        return []
    return sorted(p.name for p in Path(lora_dir).iterdir()
                  if ADAPTER_NAME.fullmatch(p.name) and p.is_dir() and _weights_file(p) is not None)


def adapter_path(lora_dir: str | Path | None, name: str) -> Path:
    """The directory of adapter `name`, or `UnknownAdapterError` saying why there is none (what the ingress checks)."""
    if lora_dir is None:
        raise UnknownAdapterError(f"lora {name!r}: this model serves no LoRA adapters (model.lora_dir is not set)")
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise UnknownAdapterError(f"lora {name!r} is not an adapter name: letters, digits, '_', '-' and '.', "
                                  "not starting with '.', at most 128 characters")
    path = Path(lora_dir) / name
    if not path.is_dir():
        known = available_adapters(lora_dir)
        raise UnknownAdapterError(f"unknown lora {name!r}; available: {', '.join(known[:20]) or 'none'}"
                                  f"{' ...' if len(known) > 20 else ''}")
    if _weights_file(path) is None:
        raise UnknownAdapterError(f"lora {name!r} has neither {LORA_WEIGHT_NAME_SAFE} nor {PEFT_WEIGHT_NAME}")
    return path


def _strip_prefix(mapping: dict | None) -> dict | None:
    """Keys without the `transformer.` (diffusers pipeline) or `base_model.model.` (PEFT) prefix saved with them."""
    if not mapping:
        return mapping
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in mapping):
            return {k.removeprefix(prefix): v for k, v in mapping.items() if k.startswith(prefix)}
    return mapping


def read_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """An adapter directory's LoRA state dict, keyed by the transformer's module names, and its `LoraConfig` kwargs
    (None: diffusers infers them, alpha = rank). A PEFT adapter's alpha / rank scaling is folded into lora_B, so both
    layouts load with diffusers' own config inference."""
    from diffusers.loaders import AceStepLoraLoaderMixin

    name, weight_name = path.name, _weights_file(path)
    if weight_name is None:
        raise AdapterLoadError(f"lora {name!r}: no {LORA_WEIGHT_NAME_SAFE} or {PEFT_WEIGHT_NAME}")
    peft_config = _read_peft_config(path) if weight_name == PEFT_WEIGHT_NAME else None
    try:
        state_dict, metadata = AceStepLoraLoaderMixin.lora_state_dict(
            str(path), weight_name=weight_name, use_safetensors=True, local_files_only=True,
            return_lora_metadata=True)
    except Exception as exc:  # a truncated or foreign file: name the adapter, keep the cause
        raise AdapterLoadError(f"lora {name!r}: cannot read {weight_name}: {exc}") from exc
    state_dict, metadata = _strip_prefix(state_dict), _strip_prefix(metadata)
    if not state_dict:
        raise AdapterLoadError(f"lora {name!r}: {weight_name} holds no weights")
    if peft_config is not None:
        state_dict, metadata = _fold_peft_scaling(state_dict, peft_config), None
    return state_dict, metadata


def _read_peft_config(path: Path):
    """`adapter_config.json` as peft reads it (its defaults where the file is silent), if it is plain LoRA."""
    from peft import LoraConfig

    name = path.name
    try:
        kind = json.loads((path / PEFT_CONFIG_NAME).read_text()).get("peft_type", "LORA")
        config = LoraConfig.from_pretrained(str(path)) if str(kind).upper() == "LORA" else None
    except FileNotFoundError:
        raise AdapterLoadError(f"lora {name!r}: {PEFT_WEIGHT_NAME} without {PEFT_CONFIG_NAME}") from None
    except Exception as exc:
        raise AdapterLoadError(f"lora {name!r}: cannot read {PEFT_CONFIG_NAME} ({type(exc).__name__})") from exc
    if config is None or config.use_dora:
        raise AdapterLoadError(f"lora {name!r}: only plain LoRA adapters are served, not "
                               f"{'DoRA' if config is not None else repr(kind)}")
    if config.alpha_pattern:
        raise AdapterLoadError(f"lora {name!r}: per-layer alpha_pattern in {PEFT_CONFIG_NAME} is not supported")
    return config


def _fold_peft_scaling(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """lora_B x `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA), `r` read per layer from the weights' shapes (so a
    `rank_pattern` needs no reading)."""
    folded = dict(state_dict)
    for key, tensor in state_dict.items():
        if ".lora_B." in key:
            down = state_dict.get(key.replace(".lora_B.", ".lora_A.").replace(".bias", ".weight"))
            if down is None:
                continue  # reported by `check_fits`
            r = down.shape[0]
            folded[key] = tensor * (config.lora_alpha / (math.sqrt(r) if config.use_rslora else r))
    return folded


def check_fits(transformer: torch.nn.Module, name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """`AdapterLoadError` unless every weight is a lora_A / lora_B pair of a `Linear` of this transformer, with its
    shapes and finite values: checked before injecting, so a bad adapter never touches the model."""
    import torch

    layers: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in state_dict.items():
        module, sep, part = key.rpartition(".lora_")
        if not sep or part not in ("A.weight", "B.weight", "B.bias"):
            raise AdapterLoadError(f"lora {name!r}: {key!r} is not a LoRA weight (lora_A.weight, lora_B.weight)")
        if not torch.isfinite(tensor).all():
            raise AdapterLoadError(f"lora {name!r}: {key!r} holds NaN or inf")
        layers[module][part] = tensor
    for module, parts in layers.items():
        try:
            layer = transformer.get_submodule(module)
        except AttributeError:
            raise AdapterLoadError(f"lora {name!r} adapts {module!r}, which this DiT does not have") from None
        layer = getattr(layer, "base_layer", layer)  # already wrapped by another adapter's LoRA layer
        if not isinstance(layer, torch.nn.Linear):
            raise AdapterLoadError(f"lora {name!r} adapts {module!r}, a {type(layer).__name__}, not a Linear")
        a, b = parts.get("A.weight"), parts.get("B.weight")
        if a is None or b is None:
            raise AdapterLoadError(f"lora {name!r}: {module!r} lacks lora_{'A' if a is None else 'B'}.weight")
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != layer.in_features or b.shape[0] != layer.out_features \
                or a.shape[0] != b.shape[1]:
            raise AdapterLoadError(f"lora {name!r}: {module!r} has lora_A {tuple(a.shape)} and lora_B "
                                   f"{tuple(b.shape)}, but this DiT's layer maps {layer.in_features} -> "
                                   f"{layer.out_features} features")


class AdapterRegistry:
    """The adapters of `lora_dir` loaded into one transformer: at most `max_loaded` (least recently used evicted),
    and the one the next forward pass runs with (`activate`). Not thread-safe: the engine's thread calls it."""

    _STALE = object()  # the LoRA layers' state is unknown (an adapter was loaded or deleted): `activate` sets it

    def __init__(self, transformer: torch.nn.Module, lora_dir: str | None, max_loaded: int):
        if lora_dir is not None and not Path(lora_dir).expanduser().is_dir():
            from models.loading import CheckpointError

            raise CheckpointError(f"model.lora_dir {lora_dir!r} is not a directory")
        self.transformer = transformer
        self.lora_dir = Path(lora_dir).expanduser() if lora_dir is not None else None
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, str] = OrderedDict()  # adapter name -> peft adapter name, oldest use first
        self._active: object = None  # None: LoRA off (or never loaded); (name, scale); or _STALE

    @property
    def loaded(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        return list(self._loaded)

    def check(self, name: str) -> None:
        adapter_path(self.lora_dir, name)

    def load(self, name: str) -> None:
        """Make `name` loaded and most recently used: read and checked first, then the least recently used adapters
        beyond `max_loaded` deleted, then injected (`load_lora_adapter`)."""
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return
        start = time.perf_counter()
        path = adapter_path(self.lora_dir, name)
        state_dict, metadata = read_adapter(path)
        check_fits(self.transformer, name, state_dict)
        while len(self._loaded) >= self.max_loaded:
            self.evict(next(iter(self._loaded)))
        peft_name = f"lora{next(_ids)}"
        self._active = self._STALE
        try:
            with warnings.catch_warnings():  # peft warns on every adapter after the first; several are the point
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                self.transformer.load_lora_adapter(state_dict, prefix=None, adapter_name=peft_name,
                                                   metadata=metadata)
        except Exception as exc:  # diffusers has removed what it injected (e.g. a header's `r` that is not the shapes')
            first = str(exc).strip().splitlines()
            raise AdapterLoadError(f"lora {name!r} does not load into this DiT: "
                                   f"{' '.join(line.strip() for line in first[:2])}") from exc
        self.transformer.eval()  # new LoRA modules start in training mode (dropout)
        self._loaded[name] = peft_name
        logger.info("loaded lora %s (%d tensors) in %.2f s; loaded: %s", name, len(state_dict),
                    time.perf_counter() - start, self.loaded)

    def evict(self, name: str) -> None:
        self.transformer.delete_adapters(self._loaded.pop(name))
        self._active = self._STALE
        logger.info("evicted lora %s; loaded: %s", name, self.loaded)

    def activate(self, key: tuple[str, float] | None) -> None:
        """Run the next forward passes with adapter `key[0]` at scale `key[1]` (loading it if it is not), or without
        LoRA for None."""
        if key is not None:
            self.load(key[0])
        if key == self._active:
            return
        if key is None:
            self.transformer.disable_lora()
        else:
            self.transformer.set_adapters(self._loaded[key[0]], weights=key[1])
            self.transformer.enable_lora()
        self._active = key


def write_random_adapter(transformer_or_preset: torch.nn.Module | str, path: str | Path, rank: int = 4,
                         seed: int = 0, alpha: float | None = None, std: float = 0.2,
                         layout: Literal["diffusers", "peft"] = "diffusers") -> Path:
    """Write a random LoRA adapter for a DiT (a transformer, or a preset's name) to directory `path`: ranks `rank`
    on the q/k/v/out projections of every self- and cross-attention (ACE-Step's trainer targets), lora_A and lora_B
    both random (a trained-from-zero B would change nothing), deterministic from `seed`.

    `layout` "diffusers": `pytorch_lora_weights.safetensors` via `AceStepLoraLoaderMixin.save_lora_weights`, the
    LoRA config (r, lora_alpha) in its header. "peft": ACE-Step's own layout, `adapter_model.safetensors` with its
    module names plus peft's `adapter_config.json`. Same seed, same weights: both layouts give the same output.
    """
    import torch
    from diffusers.loaders import AceStepLoraLoaderMixin
    from peft import LoraConfig
    from safetensors.torch import save_file

    transformer = transformer_or_preset
    if isinstance(transformer, str):
        from diffusers.models.transformers.ace_step_transformer import AceStepTransformer1DModel

        from models.presets import part_config

        with torch.device("meta"):  # shapes only
            transformer = AceStepTransformer1DModel(**part_config(transformer, "transformer"))
    generator = torch.Generator().manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    for module, layer in transformer.named_modules():
        attention, _, projection = module.rpartition(".")
        if projection == "0":  # to_out.0
            attention, _, projection = attention.rpartition(".")
            projection += ".0"
        if not attention.endswith(("self_attn", "cross_attn")) or projection not in ACESTEP_TARGETS.values():
            continue
        layer = getattr(layer, "base_layer", layer)
        weights[f"{module}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=generator) \
            / math.sqrt(layer.in_features)
        weights[f"{module}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=generator) * std
    alpha = float(alpha if alpha is not None else rank)
    path = Path(path)
    if layout == "diffusers":
        config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted({k.rpartition(".lora_")[0]
                                                                             for k in weights})}
        AceStepLoraLoaderMixin.save_lora_weights(path, transformer_lora_layers=weights,
                                                 transformer_lora_adapter_metadata=config)
    else:
        renames = {f".{new}.": f".{old}." for old, new in ACESTEP_TARGETS.items()}
        original = {}
        for key, tensor in weights.items():
            for new, old in renames.items():
                key = key.replace(new, old)
            original[f"base_model.model.{key}"] = tensor.contiguous()
        path.mkdir(parents=True, exist_ok=True)
        save_file(original, str(path / PEFT_WEIGHT_NAME), metadata={"format": "pt"})
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(ACESTEP_TARGETS)).save_pretrained(str(path))
    return path
