"""The client's gRPC channel options and which call errors it retries (used by client.py, which re-exports them)."""

from __future__ import annotations

import json

import grpc

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
TOO_LARGE = "message larger than max"
"""In gRPC's own RESOURCE_EXHAUSTED for a message over a receive or send limit ("Received message larger
than max (N vs. M)"): the same request fails again, so it is not retried."""


def too_large(exc: grpc.RpcError) -> bool:
    """Whether `exc` refused the request for its size, which no retry changes (a smaller request may pass)."""
    return exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and TOO_LARGE in (exc.details() or "")


def retryable(exc: grpc.RpcError) -> bool:
    """UNAVAILABLE (starting, restarting, draining) and RESOURCE_EXHAUSTED (queue full), not a size refusal."""
    return exc.code() in RETRYABLE and not too_large(exc)


MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVICE_CONFIG = {
    # Calls go round every address the target resolves to (the scorer's headless Service: every pod); gRPC's default,
    # pick_first, sends them all to one (and a ClusterIP Service is one address, balanced per connection only).
    # This wins over a grpc.lb_policy_name channel option, so that option is not set at all.
    "loadBalancingConfig": [{"round_robin": {}}],
    # Client-side health checking: round_robin skips an address whose Health.Watch("") says NOT_SERVING (a scorer
    # in its shutdown delay, or still loading), instead of sending it calls until DNS drops it and the drain cuts
    # them. A server without the Health service counts as healthy (gRPC's rule), so other servers still work.
    "healthCheckConfig": {"serviceName": ""},
}
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
]
