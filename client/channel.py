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
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000
"""A scorer that vanished without closing its connection (its node lost, a partition) leaves it open: with no
keepalive, round_robin kept sending it calls, each failing DEADLINE_EXCEEDED (not retried) after its whole timeout,
until the kernel gave up on the connection (about 15 min). An unanswered ping now closes it within about 30 s,
inside the clients' 60 s default timeout: the call on it fails UNAVAILABLE and is retried on another replica.
gRPC sends such pings only while calls are open, and stops after two until the client sends data, so a scorer
with gRPC's default ping policy (one every 5 min, three strikes) accepts them."""
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    # A ping already in flight (gRPC's bandwidth probe) waits this long for its ack, 60 s when unset: the keepalive
    # ping is not sent beside it, so the 10 s above would not hold.
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
]


def timed_out(exc: grpc.RpcError, earlier: grpc.RpcError | None, address: str) -> grpc.RpcError:
    """`exc`, unless it is a DEADLINE_EXCEEDED: then one that also names `address` and the retryable error the call
    was waiting out, if any. gRPC's says only "Deadline Exceeded", so a scorer that refused the connection, a name
    that did not resolve or a port a network policy drops read as a scorer too slow to answer."""
    if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
        return exc
    details = f"{exc.details()}: no answer from {address} within the call's timeout"
    if earlier is not None:
        details += f", waiting after {earlier.code().name}: {earlier.details()}"
    error = grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(), details)
    error.__cause__ = exc
    return error
