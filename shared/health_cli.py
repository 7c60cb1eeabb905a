"""`synpref health`: is each of a release's endpoints up? (the chart's `helm test` Pod runs it)

    synpref health synpref-filter:50051 synpref-scorer:50060 http://synpref-desk:8000/healthz

A `host:port` target is asked grpc.health.v1 Check (the overall service, ""): SERVING passes. An
`http://` or `https://` target must answer GET with a 2xx status. Each target is retried until
--wait seconds have passed (a pod that is still starting is not a failure yet); one line per
target says how it ended, and the exit code is 0 only when every target passed.
"""

from __future__ import annotations

import argparse
import http.client
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

RETRY_PAUSE_S = 1.0


def grpc_serving(target: str, timeout_s: float) -> str | None:
    """None when `target`'s grpc.health.v1 says SERVING, otherwise what it said or why it could not."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return None if reply.status == health_pb2.HealthCheckResponse.SERVING else status


def http_ok(url: str, timeout_s: float) -> str | None:
    """None when GET `url` answers 2xx, otherwise the status or the error."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return None if 200 <= response.status < 300 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))
    except (http.client.HTTPException, ValueError) as exc:  # not HTTP (a gRPC port), a bad URL: a failure, no crash
        return f"{type(exc).__name__}: {str(exc)!r}"  # repr: what a non-HTTP peer sent stays on one line


def check(target: str, wait_s: float, timeout_s: float) -> str | None:
    """Retry one target until it passes or wait_s is spent; the last failure, or None."""
    probe: Callable[[str, float], str | None] = http_ok if target.startswith(("http://", "https://")) else grpc_serving
    deadline = time.monotonic() + wait_s
    while True:
        failure = probe(target, timeout_s)
        if failure is None or time.monotonic() + RETRY_PAUSE_S > deadline:
            return failure
        time.sleep(RETRY_PAUSE_S)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="synpref health", description="Check grpc.health.v1 and HTTP endpoints.")
    p.add_argument("targets", nargs="+", help="host:port (gRPC health) or an http(s):// URL (GET, 2xx)")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to keep retrying each target (default 60)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds for one attempt (default 5)")
    args = p.parse_args(argv)
    if args.wait < 0 or args.timeout <= 0:
        p.error("--wait must be >= 0 and --timeout > 0")
    return args


def main(argv: list[str]) -> int:
    """Check every target; 0 when all pass, 1 otherwise."""
    args = parse_args(argv)
    failed = 0
    for target in args.targets:
        failure = check(target, args.wait, args.timeout)
        print(f"{target}: {'ok' if failure is None else failure}", flush=True)
        failed += failure is not None
    return 1 if failed else 0
