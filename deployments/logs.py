"""Our package loggers (`deployments`, `jobs`, `models`) into the Serve replica log, at the deployment's log level.

Serve 2.60 configures only the `ray.serve` logger in a replica (`configure_component_logger`: a `MemoryHandler` with
Serve's filters in front of a rotating file handler on `logs/serve/replica_<app>_<deployment>_<id>.log`, formatted with
the component and replica id, level `logging_config.log_level`, no propagation). Any other logger falls back to the
root's WARNING level, so our INFO lines were dropped. We forward our records to the `ray.serve` logger by name on
every record rather than copying its handlers: Serve clears and rebuilds them when `logging_config` changes
(`Replica.reconfigure`), and a copy would keep writing through the old ones.
"""

from __future__ import annotations

import logging
import sys

import ray

PACKAGES = ("deployments", "jobs", "models")
SERVE_LOGGER = "ray.serve"  # ray.serve._private.constants.SERVE_LOGGER_NAME


class _ToServeLogger(logging.Handler):
    """Hands each record to the `ray.serve` logger's current handlers, if it passes that logger's current level."""

    def emit(self, record: logging.LogRecord) -> None:
        serve_logger = logging.getLogger(SERVE_LOGGER)
        if record.levelno >= serve_logger.getEffectiveLevel():
            serve_logger.handle(record)


def configure_replica_logging() -> None:
    """Route our package loggers into this process's Ray log; a no-op outside a Ray actor (unit tests, drivers).

    In a Serve replica they write to the replica's Serve log file, at the deployment's `logging_config.log_level` as
    of now (a later lightweight `log_level` change is honoured upwards at once; downwards after a replica restart).
    In any other actor (the job registry) they write INFO and up to the actor's own worker log (stderr).
    """
    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        serve.get_replica_context()
        handler: logging.Handler = _ToServeLogger()
        level = logging.getLogger(SERVE_LOGGER).getEffectiveLevel()
    except RayServeException:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d -- "
                                               "%(message)s"))
        level = logging.INFO
    handler._acestep = True  # type: ignore[attr-defined]
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if not getattr(h, "_acestep", False)]  # idempotent
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False  # else WARNING+ also reaches root's last-resort handler: stderr, which Serve logs again
