"""`synpref health` (the chart's `helm test` Pod) against real gRPC health servers and HTTP servers on loopback."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from synpref.shared import health_cli

pytestmark = pytest.mark.integration


@pytest.fixture
def grpc_health() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(0)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_base() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_every_target_up_passes(grpc_health, http_base, capsys) -> None:
    address, servicer = grpc_health
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert health_cli.main(["--wait", "0", address, f"{http_base}/healthz"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{address}: ok", f"{http_base}/healthz: ok"]


def test_not_serving_bad_status_and_nothing_listening_each_fail_and_are_named(grpc_health, http_base, capsys) -> None:
    address, servicer = grpc_health
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    closed = f"127.0.0.1:{_closed_port()}"
    code = health_cli.main(
        ["--wait", "0", "--timeout", "2", address, f"{http_base}/other", closed, f"{http_base}/healthz"]
    )
    lines = capsys.readouterr().out.splitlines()
    assert code == 1
    assert lines[0] == f"{address}: NOT_SERVING"
    assert lines[1] == f"{http_base}/other: HTTP 503"
    assert lines[2].startswith(f"{closed}: UNAVAILABLE") or lines[2].startswith(f"{closed}: DEADLINE_EXCEEDED")
    assert lines[3] == f"{http_base}/healthz: ok"


def test_a_target_that_comes_up_within_the_wait_passes(grpc_health, capsys) -> None:
    address, servicer = grpc_health
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    timer = threading.Timer(1.5, servicer.set, ("", health_pb2.HealthCheckResponse.SERVING))
    timer.start()
    try:
        assert health_cli.main(["--wait", "20", address]) == 0
    finally:
        timer.cancel()
    assert capsys.readouterr().out == f"{address}: ok\n"


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        health_cli.parse_args(["--wait", "-1", "x:1"])
    with pytest.raises(SystemExit):
        health_cli.parse_args([])
