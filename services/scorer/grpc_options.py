"""The scorer's gRPC server options: message limits and the connection age that spreads clients over replicas."""

from __future__ import annotations

from synpref.shared.config import ScorerSettings

MAX_SEND_BYTES = 64 * 1024 * 1024


def server_options(settings: ScorerSettings) -> list[tuple[str, int]]:
    """Options of the scorer's grpc.aio server.

    A gRPC client keeps one HTTP/2 connection, and kube-proxy balances connections, not calls: without a
    connection age every call of a client goes to the pod it first reached, and pods an HPA adds get no
    traffic from clients already running. With max_connection_age_s the server sends GOAWAY after about
    that long (gRPC adds +-10% jitter, so clients do not all reconnect at once): the client's next calls
    open a new connection, which kube-proxy may route to another pod, and a round_robin client re-resolves
    the headless Service's DNS and finds the new pods. Calls in flight get max_connection_age_grace_s to
    finish; a stream still open then ends with UNAVAILABLE (the client's ScoreSession retries on a new one).
    """
    options = [
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.max_send_message_length", MAX_SEND_BYTES),
        # The RL clients ping every 20 s while calls are open (client/channel.py: a replica that vanished is found
        # in ~30 s): allowed explicitly, where gRPC's default (one per 5 min without data) rests on strike counts.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]
    if settings.max_connection_age_s > 0:  # gRPC reads 0 as "close at once", not "never"
        options += [
            ("grpc.max_connection_age_ms", max(1, round(settings.max_connection_age_s * 1000))),
            ("grpc.max_connection_age_grace_ms", round(settings.max_connection_age_grace_s * 1000)),
        ]
    return options
