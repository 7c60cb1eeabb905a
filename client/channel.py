"""The client's gRPC channel options, which call errors it retries and how often and long (used by client.py, which
re-exports them)."""

from __future__ import annotations

import json
import math
import random
import time
from typing import Any

import grpc

from synpref.client.messages import MAX_REQUEST_BYTES
from synpref.v1 import reward_pb2

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
    error = rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, details)
    error.__cause__ = exc
    return error


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """The error a call would raise, for what the client detects or words itself."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def request_size(request: reward_pb2.ScoreRequest | reward_pb2.ScorePairsRequest) -> int:
    """How many of the call's items (or pairs) `request` holds."""
    return len(request.pairs) if isinstance(request, reward_pb2.ScorePairsRequest) else len(request.items)


def answered(request: Any, response: Any, address: str) -> Any:
    """`response`, once it holds one answer per item (or pair) of `request`: a scorer that answered fewer or more (a
    faulty or mismatched server) shifted every reward after the gap onto the wrong item, silently. INTERNAL if not."""
    if isinstance(request, reward_pb2.ScoreRequest | reward_pb2.ScorePairsRequest):
        pairs = isinstance(request, reward_pb2.ScorePairsRequest)
        got, asked = len(response.scores if pairs else response.rewards), request_size(request)
        if got != asked:
            what = "pairs" if pairs else "items"
            raise rpc_error(grpc.StatusCode.INTERNAL, f"the scorer at {address} answered {got} scores for {asked} "
                            f"{what}: no reward can be matched to its {what[:-1]}")  # fmt: skip
    return response


def located(exc: grpc.RpcError, request: Any, first: int) -> grpc.RpcError:
    """`exc`, unless it refuses (INVALID_ARGUMENT) a request of a call's items after its first: then one that says
    where they are in the call. The server numbers them from 0 in the request ("item 3 text is empty"), and a call
    is cut into requests of chunk_size, so item 3 of its second request was item 259 of the call, not item 3."""
    if first == 0 or exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
        return exc
    what = "pairs" if isinstance(request, reward_pb2.ScorePairsRequest) else "items"
    where = f"{first} to {first + request_size(request) - 1}"
    error = rpc_error(exc.code(), f"{exc.details()} (numbered within this request of the call's {what} {where})")
    error.__cause__ = exc
    return error


MAX_TIMEOUT_S = 1e9
"""Most seconds a timeout may be (about 31 years): gRPC fails a call whose deadline does not fit its clock (from about
7e9 s on) at once with DEADLINE_EXCEEDED, so `timeout=math.inf` ("no limit") failed every call as if the scorer had
not answered."""


def check_timeout(timeout: float) -> float:
    """`timeout`, or ValueError unless it is a number of seconds in (0, MAX_TIMEOUT_S]: NaN, infinite and huge ones
    failed every call at once as "no answer within the call's timeout"; a call's 0 meant the client's timeout, and
    a negative one a call of 1 ms."""
    if not isinstance(timeout, int | float) or not 0 < timeout <= MAX_TIMEOUT_S:
        raise ValueError(f"timeout must be a number of seconds > 0 and <= {MAX_TIMEOUT_S:g}, got {timeout!r}")
    return float(timeout)


class Policy:
    """A client's timeout, retries with capped exponential backoff, and request size bounds."""

    def __init__(
        self,
        timeout: float,
        retries: int,
        backoff_s: float,
        max_backoff_s: float,
        chunk_size: int,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        if chunk_size < 1 or retries < 0 or max_request_bytes < 1:
            raise ValueError("chunk_size >= 1, retries >= 0 and max_request_bytes >= 1 are required")
        # A negative or NaN backoff failed the first retry (time.sleep refuses it) with an error about sleeping.
        if not (math.isfinite(backoff_s) and math.isfinite(max_backoff_s) and backoff_s >= 0 and max_backoff_s >= 0):
            raise ValueError(f"backoff_s and max_backoff_s must be finite and >= 0, got {backoff_s}, {max_backoff_s}")
        self.timeout = check_timeout(timeout)
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.chunk_size = chunk_size
        self.max_request_bytes = max_request_bytes

    def deadline(self, timeout: float | None) -> float:
        """The monotonic time by which a call with `timeout` (None: the client's) must end."""
        return time.monotonic() + (self.timeout if timeout is None else check_timeout(timeout))

    def pause(self, attempt: int, deadline: float) -> float | None:
        """Seconds to wait before retry `attempt` (1-based), or None when out of retries/time."""
        if attempt > self.retries:
            return None
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        if time.monotonic() + delay >= deadline:
            return None
        return delay
