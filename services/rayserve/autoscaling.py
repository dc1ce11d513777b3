"""Autoscaling on the load replicas report themselves.

Internal calls travel over direct gRPC channels, so Ray Serve's own count
of ongoing requests (made by its handles and proxy) sees none of them.
Each replica reports its gRPC calls in flight (``record_autoscaling_stats``);
this policy asks for enough replicas to bring the mean back to the target.
Ray Serve wraps a custom policy with the configured bounds and the
upscale/downscale delays.
"""

from __future__ import annotations

import math


def desired_replicas(inflight: list[float], current: int, target: float) -> int:
    """ceil(total in flight / target); the current count while no replica has reported."""
    return max(1, math.ceil(sum(inflight) / target)) if inflight else current


def inflight_policy(ctx) -> tuple[int, dict]:
    """A Ray Serve custom autoscaling policy (``AutoscalingContext`` in,
    (replicas, policy state) out)."""
    inflight = list(((ctx.aggregated_metrics or {}).get("inflight") or {}).values())
    return desired_replicas(inflight, ctx.current_num_replicas, ctx.config.target_ongoing_requests), {}
