"""The application builder: `serve_config.yaml`'s `args` -> the Ray Serve deployment graph.

    Ingress (HTTP) ──▶ JobRegistry actor ◀── JobDriver ──▶ [LanguageModel ─▶] ConditionEncoder ─▶ DiT ─▶ AudioCodec

Each further model in `models:` gets its own ConditionEncoder and DiT deployments (`ConditionEncoder-<name>`,
`DiT-<name>`, each with its own replicas and autoscaling); the AudioCodec (the VAE, which ACE-Step 1.5's variants
share) serves them all.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray.serve import Application

from deployments import envs
from deployments.audio_codec import AudioCodec
from deployments.condition_encoder import ConditionEncoder
from deployments.dit import DiT
from deployments.driver import JobDriver
from deployments.ingress import Ingress
from deployments.language_model import LanguageModel
from jobs.config import AuthConfig, FilesConfig, QueueConfig
from models.lm import LMConfig, check_lm_dir
from models.loading import REQUIRED_PARTS, ModelConfig, check_checkpoint_dir, load_vae_config, model_variant

# What a further model takes from `model` unless it sets it: how, not which, weights load.
INHERITED = ("seed", "dtype", "device", "stages")


class AppArgs(BaseModel):
    """Everything the application is configured with (the `args:` block of serve_config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("acestep", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Names the job registry actor; "
                      "two apps on one cluster need different names.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The default model (a request without "
                               "`model`, or naming this one, runs on it).")
    models: list[ModelConfig] = Field(default_factory=list, description=(
        "Further DiT models served next to `model`, picked per request by name (`/v1/models`): a preset or a "
        "checkpoint_dir each, taking seed, dtype, device and stages from `model` unless set. Their VAE must be the "
        "default model's (ACE-Step 1.5's variants share one)."))
    lm: LMConfig | None = Field(None, description=(
        "The 5 Hz language model (`LanguageModel` deployment), loaded at start: `thinking`, `use_cot_*`, sample "
        "mode and `use_format` run on it. Null: no LM; a request that needs one is a 400."))
    queue: QueueConfig = Field(default_factory=QueueConfig)
    files: FilesConfig = Field(default_factory=FilesConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)

    @model_validator(mode="after")
    def _inherit(self) -> "AppArgs":
        inherited = {key: getattr(self.model, key) for key in INHERITED}
        self.models = [m.model_copy(update={k: v for k, v in inherited.items() if k not in m.model_fields_set})
                       for m in self.models]
        return self

    def served_models(self) -> list[ModelConfig]:
        """Every model served, the default first."""
        return [self.model, *self.models]


def deployment_suffix(model: ModelConfig, default: ModelConfig) -> str:
    """`""` for the default model's stage deployments, `-<name>` for a further model's."""
    return "" if model is default else f"-{model.name}"


def build_app(args: dict[str, Any] | AppArgs | None = None) -> Application:
    """The builder `serve_config.yaml` names (Serve requires exactly one parameter). It never simulates."""
    if _asks_to_simulate(args):
        raise ValueError("`simulate` is a benchmark-only mode (`acestep-bench --simulate`, deployments/simulate.py): "
                         "a deployable config (serve_config.yaml, `serve run`, build_app) cannot replace the model "
                         "stages with simulated ones; remove the `simulate` key")
    return build_graph(args)


def _asks_to_simulate(args: Any) -> bool:
    """Whether a config has a `simulate` key (at the top, or under `model`)."""
    if not isinstance(args, dict):
        return False
    return "simulate" in args or (isinstance(args.get("model"), dict) and "simulate" in args["model"])


def build_graph(args: dict[str, Any] | AppArgs | None = None,
                options: dict[str, dict[str, Any]] | None = None, simulate: dict[str, Any] | None = None
                ) -> Application:
    """`args` as in serve_config.yaml. `options` (Python callers: tests, `acestep-bench`) overrides deployment
    options by deployment name, as serve_config.yaml's `deployments:` list does for `serve run/deploy`.
    `simulate` (Python callers only: `acestep-bench --simulate`, tests) is a cost file (`deployments.simulate`): the
    stages then sleep its modelled time instead of computing, and load no weights."""
    options = options or {}

    def bind(deployment, *init_args):
        return deployment.options(**options.get(deployment.name, {})).bind(*init_args)

    app_args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    model = app_args.model
    if envs.ACESTEP_CHECKPOINT_DIR:
        model = model.model_copy(update={"checkpoint_dir": envs.ACESTEP_CHECKPOINT_DIR})
    app_args = app_args.model_copy(update={"files": app_args.files.resolved(), "model": model})
    check_models(app_args)
    registry = (app_args.name, app_args.queue, app_args.files)
    sim = () if simulate is None else (simulate,)
    stages, conditions, dits = {}, {}, {}
    for served in app_args.served_models():
        suffix = deployment_suffix(served, app_args.model)
        for deployment, handles in ((ConditionEncoder, conditions), (DiT, dits)):
            name = deployment.name + suffix
            handles[served.name] = stages[name] = deployment.options(name=name, **options.get(name, {})).bind(
                served, *registry, *sim, served_as=served.name if suffix else None)
    stages["AudioCodec"] = codec = bind(AudioCodec, app_args.model, *registry, *sim)
    lm = None
    if app_args.lm is not None:
        if simulate is not None:
            raise ValueError("the simulation has no LanguageModel stage: leave `lm` out")
        if app_args.lm.checkpoint_dir:  # at deploy time, not in every replica
            check_lm_dir(app_args.lm.checkpoint_dir)
        # The LM chooses durations within what the server admits.
        config = app_args.lm.model_copy(update={
            "max_duration": max(1, min(app_args.lm.max_duration, int(app_args.queue.max_duration_s)))})
        config = config.model_copy(update={"min_duration": min(config.min_duration, config.max_duration)})
        stages["LanguageModel"] = handle = bind(LanguageModel, config, *registry)
        lm = (config.name, handle)
    driver = bind(JobDriver, app_args.served_models(), app_args.queue, app_args.files, app_args.name, conditions,
                  dits, codec, lm)
    return bind(Ingress, app_args, driver, stages)


def check_models(args: AppArgs) -> None:
    """Each model's checkpoint and variant, names that are unique and fit a deployment name, and one VAE for all:
    a deploy-time error naming the problem, rather than a failure in every replica."""
    names = set()
    for served in args.served_models():
        if served.checkpoint_dir:
            check_checkpoint_dir(served.checkpoint_dir, REQUIRED_PARTS)
        model_variant(served)  # a `variant` the transformer config contradicts fails here, not in the ingress
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", served.name):
            raise ValueError(f"model name {served.name!r} (a checkpoint_dir's last part) must be 1-100 letters, "
                             f"digits, '.', '_' or '-': it names the model's deployments")
        if served.name in names:
            raise ValueError(f"model {served.name!r} is configured twice; each model needs its own name")
        names.add(served.name)
        if load_vae_config(served) != load_vae_config(args.model):
            raise ValueError(f"model {served.name!r} has another VAE than the default model {args.model.name!r}: "
                             f"all models share the default's AudioCodec")
