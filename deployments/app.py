"""The application builder: `serve_config.yaml`'s `args` -> the Ray Serve deployment graph.

    Ingress (HTTP) ──▶ JobRegistry actor ◀── JobDriver ──▶ ConditionEncoder ─▶ DiT ─▶ AudioCodec
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from deployments import envs
from deployments.audio_codec import AudioCodec
from deployments.condition_encoder import ConditionEncoder
from deployments.dit import DiT
from deployments.driver import JobDriver
from deployments.ingress import Ingress
from jobs.config import AuthConfig, FilesConfig, QueueConfig
from models.loading import REQUIRED_PARTS, ModelConfig, check_checkpoint_dir, model_variant


class AppArgs(BaseModel):
    """Everything the application is configured with (the `args:` block of serve_config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("acestep", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Names the job registry actor; "
                      "two apps on one cluster need different names.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    files: FilesConfig = Field(default_factory=FilesConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)


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
    if model.checkpoint_dir:  # fail at deploy time, naming what is missing, rather than in every replica
        check_checkpoint_dir(model.checkpoint_dir, REQUIRED_PARTS)
    model_variant(model)  # a `model.variant` the transformer config contradicts fails here, not in the ingress
    app_args = app_args.model_copy(update={"files": app_args.files.resolved(), "model": model})
    registry = (app_args.name, app_args.queue, app_args.files)
    sim = () if simulate is None else (simulate,)
    condition = bind(ConditionEncoder, app_args.model, *registry, *sim)
    dit = bind(DiT, app_args.model, *registry, *sim)
    codec = bind(AudioCodec, app_args.model, *registry, *sim)
    driver = bind(JobDriver, app_args.model, app_args.queue, app_args.files, app_args.name, condition, dit, codec)
    return bind(Ingress, app_args, driver, {"ConditionEncoder": condition, "DiT": dit, "AudioCodec": codec})
