"""A Serve autoscaling policy that sees the backlog in the job registry, not only the requests inside Serve.

The registry dispatches only as many jobs as the pipeline has slots for, so a burst waits there, invisible to Serve's
default policy (which counts requests at replicas and handles). Each stage replica reports the registry's queue depth
as a custom autoscaling metric (`StageReplica.record_autoscaling_stats`); this policy adds it to the stage's own
ongoing requests and asks for one replica per `target_ongoing_requests` of them. Serve then applies min/max
replicas, the up/downscale delays and the scaling factors.

Use it per deployment in serve_config.yaml:
    autoscaling_config: {..., policy: {policy_function: deployments.autoscaling:backlog_policy}}
"""

from __future__ import annotations

from typing import Any

from ray.serve.config import AutoscalingContext


def backlog_policy(ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
    backlog = (ctx.aggregated_metrics or {}).get("backlog", {})
    # Every replica reports the same registry queue, so take one (the largest) rather than the sum.
    waiting = max(backlog.values(), default=0.0)
    return (ctx.total_num_requests + waiting) / ctx.config.get_target_ongoing_requests(), {}
