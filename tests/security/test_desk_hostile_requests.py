"""Issue 12, desk: hostile request bodies and headers get 4xx, never 500, and every error carries
the security headers. Against the real desk web server on loopback (DeskServer), over raw HTTP.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from synpref.services.desk import DeskCore, MemoryReviewQueue, MemoryVerdictSink, ReviewDesk
from synpref.services.desk.web import DeskServer
from synpref.shared.config import DeskSettings
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import PairRecord

pytestmark = pytest.mark.integration

TOKEN = "alice-Zq7rT0kP3mW9xV2bN5cJ8dF1gH4sL6a"
SECURITY_HEADERS = ("Content-Security-Policy", "X-Content-Type-Options", "X-Frame-Options", "Referrer-Policy")


def record(i: int) -> PairRecord:
    return new_record(
        new_pair(
            [{"role": "user", "content": f"question {i}"}],
            [{"role": "assistant", "content": f"good {i}"}],
            [{"role": "assistant", "content": f"bad {i}"}],
            source="test",
        )
    )


class BrokenSource(MemoryReviewQueue):
    """A review source whose fetch fails, as a Kafka source may: the desk must answer 503 cleanly."""

    async def fetch(self, limit: int) -> list[tuple[PairRecord, Any]]:
        raise RuntimeError("broker exploded: secret-internal-detail")


@pytest.fixture
def server() -> Iterator[DeskServer]:
    queue = MemoryReviewQueue()
    queue.push([record(1)])
    desk = ReviewDesk(queue, MemoryVerdictSink(), DeskSettings(), tokens={"alice": TOKEN})
    with DeskServer(desk) as running:
        yield running


def request(
    port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        sent = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=sent)
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def assert_secure_error(
    status: int, headers: http.client.HTTPMessage, body: bytes, expected: int, where: str = ""
) -> None:
    assert status == expected, (where, status, body[:200])
    missing = [h for h in SECURITY_HEADERS if h not in headers]
    assert not missing, f"{where}: {status} response lacks {missing}"
    assert "error" in json.loads(body)


def test_hostile_verdict_bodies_get_400_or_413_with_security_headers(server: DeskServer) -> None:
    status, _, body = request(server.port, "GET", "/api/next")
    pair_id = json.loads(body)["pair"]["pair_id"]
    cases = {
        # json.dumps escapes the lone surrogate as \ud800: valid JSON, no valid text.
        "lone surrogate in the note": (json.dumps({"pair_id": pair_id, "choice": 1, "note": "\ud800"}).encode(), 400),
        "lone surrogate in a key": (json.dumps({"\udfff": 1}).encode(), 400),
        "8k-deep nesting (fits the 16 KiB body limit)": (b"[" * 8_000 + b"]" * 8_000, 400),
        "100k-deep nesting": (b"[" * 100_000, 413),
        "70 MB body": (b"[" + b" " * (70 * 1024 * 1024) + b"]", 413),
    }
    for name, (payload, expected) in cases.items():
        status, headers, answer = request(server.port, "POST", "/api/verdict", payload)
        assert_secure_error(status, headers, answer, expected, name)
    # None of it decided the pair: the annotator can still answer it.
    status, _, answer = request(
        server.port, "POST", "/api/verdict", json.dumps({"pair_id": pair_id, "choice": 1}).encode()
    )
    assert status == 200 and json.loads(answer)["decided"] is True


def test_a_non_ascii_authorization_header_is_a_401_not_a_500(server: DeskServer) -> None:
    # Raw bytes: http.client would refuse to send them. aiohttp keeps \xff as a surrogate escape.
    raw = b"GET /api/next HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe-guess\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(raw)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, _ = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), head
    assert b"Content-Security-Policy:" in head


def test_an_unreadable_queue_is_a_json_503_with_retry_after_security_headers_and_no_detail() -> None:
    # Not the desk's own fault (a broker away): 503 and Retry-After, so a proxy or the page tries again later.
    desk = ReviewDesk(BrokenSource(), MemoryVerdictSink(), DeskSettings(), tokens={"alice": TOKEN})
    with DeskServer(desk) as running:
        status, headers, body = request(running.port, "GET", "/api/next")
    assert_secure_error(status, headers, body, 503)
    assert headers["Retry-After"] and "unreachable" in json.loads(body)["error"]
    assert b"secret-internal-detail" not in body and b"Traceback" not in body


class BrokenCore(DeskCore):
    """A desk whose own bookkeeping fails: an internal error."""

    def progress(self, annotator: str) -> dict[str, Any]:
        raise RuntimeError("bookkeeping exploded: secret-internal-detail")


def test_an_internal_failure_is_a_json_500_with_security_headers_and_no_detail() -> None:
    desk = ReviewDesk(
        MemoryReviewQueue(), MemoryVerdictSink(), DeskSettings(), tokens={"alice": TOKEN}, core=BrokenCore()
    )
    with DeskServer(desk) as running:
        status, headers, body = request(running.port, "GET", "/api/next")
    assert_secure_error(status, headers, body, 500)
    assert b"secret-internal-detail" not in body and b"Traceback" not in body
