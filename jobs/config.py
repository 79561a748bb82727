"""Configuration of the job layer: queue, dispatch, files. Supplied by `serve_config.yaml` through `AppArgs`."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class WebhookConfig(BaseModel):
    """Job event callbacks (`webhook` on submit): where they may go, how they are signed and retried."""

    model_config = ConfigDict(extra="forbid")

    secret: str | None = Field(None, description="HMAC-SHA256 key that signs every delivery (X-ACEStep-Signature); "
                               "also ACESTEP_WEBHOOK_SECRET. Without one, a submit that names a webhook is refused "
                               "(400): an unsigned callback could be forged by anyone who learns the URL.")
    allowed_hosts: list[str] = Field(default_factory=list, description="Host names (exact, or `*.example.com`) a "
                                     "webhook may point at; empty: any public host.")
    allow_private: bool = Field(False, description="Allow loopback, private, link-local, multicast and reserved "
                                "addresses (checked on every A/AAAA record, at submit and again at each delivery).")
    timeout_s: float = Field(10.0, gt=0, le=120, description="One delivery attempt's timeout.")
    max_age_s: float = Field(24 * 3600.0, gt=0, description="A delivery is retried (1, 2, 4 ... s, at most 60 s "
                             "apart) until it is this old, then dropped.")
    max_backoff_s: float = Field(60.0, gt=0, description="Longest wait between two attempts of a delivery.")


class QueueConfig(BaseModel):
    """How jobs are admitted, dispatched and retried."""

    model_config = ConfigDict(extra="forbid")

    max_queued_jobs: int = Field(200, ge=1, description="Jobs waiting beyond this are refused with 429 "
                                 "(upstream ACESTEP_QUEUE_MAXSIZE).")
    max_running_jobs: int = Field(32, ge=1, description="Upper bound on jobs running at once. Below it, the registry "
                                  "dispatches only as many jobs as the DiT and AudioCodec replicas report slots for; "
                                  "the rest wait in the registry, so queue_position means something.")
    initial_avg_job_seconds: float = Field(5.0, gt=0, description="ETA basis before any job has finished.")
    avg_window: int = Field(50, ge=1, description="Job-end intervals in the rolling mean behind avg_job_seconds.")
    lease_seconds: float = Field(60.0, gt=0, description="A running job whose driver sends no heartbeat for this "
                                 "long is requeued (or failed after max_attempts).")
    max_attempts: int = Field(2, ge=1, description="Attempts per job before a lost lease fails it.")
    stage_retries: int = Field(2, ge=0, le=10, description="Times a stage call is sent again when its replica went "
                               "away (scaled down, redeployed, died) before the attempt counts as lost.")
    job_timeout_s: float = Field(1800.0, gt=0, description="A job still running this long after it started fails "
                                 "(deadline exceeded); its work stops at the next diffusion step.")
    retention_s: float = Field(7 * 24 * 3600.0, gt=0, description="Finished jobs, their audio and idempotency keys "
                               "are deleted this long after they end (then 404), as upstream's 7-day cache.")
    default_duration_s: float = Field(30.0, ge=1, le=600, description="Duration of a text2music job that gives none.")
    max_duration_s: float = Field(600.0, ge=1, le=600, description="Longest audio_duration accepted.")
    max_outputs_per_job: int = Field(8, ge=1, le=8, description="Largest batch_size accepted.")
    max_audio_seconds_per_job: float = Field(4800.0, ge=1, description="Largest duration x outputs accepted (the "
                                             "AudioCodec's memory grows with it: see the README's memory bound). "
                                             "The default admits every job the two limits above allow.")
    webhooks: WebhookConfig = Field(default_factory=WebhookConfig, description="Job event callbacks: allowed "
                                    "targets, signing secret, retries.")


class FilesConfig(BaseModel):
    """Where audio is written and read, and how much a client may send."""

    model_config = ConfigDict(extra="forbid")

    output_dir: str = Field("var/results", description="ResultStore root, a directory or an fsspec URL "
                            "(s3://bucket/prefix): generated audio, served by /v1/audio.")
    storage_options: dict = Field(default_factory=dict, description="fsspec options for output_dir, e.g. "
                                  "{client_kwargs: {endpoint_url: ...}} for an S3-compatible store.")
    upload_dir: str = Field("var/uploads", description="Uploaded reference/source audio, removed when the job ends: "
                            "a directory or an fsspec URL, like output_dir (with the same storage_options), so that "
                            "the ingress, the codec and the registry may run on different nodes.")
    allowed_input_dirs: list[str] = Field(default_factory=list, description="Directories that *_audio_path "
                                          "parameters may point into (after resolving symlinks and '..').")
    journal_path: str | None = Field("var/registry.sqlite3", description="SQLite journal of the job registry "
                                     "(on Kubernetes, on a persistent volume); null keeps jobs in memory only.")
    max_upload_bytes: int = Field(50 * 1024 * 1024, ge=1024, description="Largest uploaded audio file (413 above).")
    max_body_bytes: int = Field(1024 * 1024, ge=1024, description="Largest JSON / urlencoded body (413 above).")

    def resolved(self) -> "FilesConfig":
        """Relative directories made absolute against the builder's working directory, so every replica agrees."""
        return self.model_copy(update={
            "output_dir": self.output_dir if "://" in self.output_dir else str(Path(self.output_dir).resolve()),
            "upload_dir": self.upload_dir if "://" in self.upload_dir else str(Path(self.upload_dir).resolve()),
            "allowed_input_dirs": [str(Path(d).resolve()) for d in self.allowed_input_dirs],
            "journal_path": str(Path(self.journal_path).resolve()) if self.journal_path else None})


class AuthConfig(BaseModel):
    """Optional API keys. With none configured the service is open, as upstream."""

    model_config = ConfigDict(extra="forbid")

    api_key_sha256: list[str] = Field(default_factory=list, description="SHA-256 hex digests of the accepted keys "
                                      "(never the keys); also ACESTEP_API_KEY_SHA256, comma-separated.")
