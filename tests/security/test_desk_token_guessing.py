"""Issue 12, desk: token guessing is throttled per client address, and weak tokens stop the desk
at startup with an error naming the annotator, never the token.

The throttle test hammers the real desk web server on loopback (DeskServer); the token tests
start the real `synpref desk` process.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from synpref.services.desk import MemoryReviewQueue, MemoryVerdictSink, ReviewDesk
from synpref.services.desk.tokens import FailedAuthThrottle, parse_tokens
from synpref.services.desk.web import DeskServer
from synpref.shared.config import ConfigError, DeskSettings

pytestmark = pytest.mark.integration

TOKEN = "alice-Zq7rT0kP3mW9xV2bN5cJ8dF1gH4sL6a"


@pytest.fixture
def server() -> Iterator[DeskServer]:
    desk = ReviewDesk(MemoryReviewQueue(), MemoryVerdictSink(), DeskSettings(), tokens={"alice": TOKEN})
    with DeskServer(desk) as running:
        yield running


def get(conn: http.client.HTTPConnection, token: str) -> tuple[int, str | None]:
    conn.request("GET", "/api/session", headers={"Authorization": f"Bearer {token}"})
    resp = conn.getresponse()
    resp.read()
    return resp.status, resp.headers.get("Retry-After")


def test_guessing_is_throttled_with_429_and_retry_after(server: DeskServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    started = time.monotonic()
    answers = [get(conn, f"guess-{i:040d}") for i in range(300)]
    elapsed = time.monotonic() - started
    unauthorized = sum(1 for status, _ in answers if status == 401)
    throttled = [retry for status, retry in answers if status == 429]
    # The default bucket: 10 failures at once, then one per 2 s. Before the fix all 300 were 401s.
    assert unauthorized <= 10 + elapsed * 0.5 + 1, (unauthorized, elapsed)
    assert len(throttled) >= 250 and all(retry is not None and int(retry) >= 1 for retry in throttled)
    # A throttled address cannot confirm a guess: even the right token waits.
    status, retry = get(conn, TOKEN)
    assert status == 429 and retry is not None
    # Once the wait it was told is over, the right token works again.
    deadline = time.monotonic() + int(retry) + 10
    while (status := get(conn, TOKEN)[0]) == 429 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == 200
    conn.close()


def test_throttle_buckets_refill_and_stay_bounded() -> None:
    now = [0.0]
    throttle = FailedAuthThrottle(burst=2, rate_per_s=0.5, max_clients=3, clock=lambda: now[0])
    throttle.failed("a")
    throttle.failed("a")
    assert throttle.retry_after("a") == 2 and throttle.retry_after("b") == 0
    now[0] = 2.0
    assert throttle.retry_after("a") == 0
    for client in ("b", "c", "d", "e"):
        throttle.failed(client)
    assert len(throttle._buckets) <= 3


WEAK = {
    "sixteen characters (the old minimum)": "0123456789abcdef",
    "31 characters": "Zq7rT0kP3mW9xV2bN5cJ8dF1gH4sL6a",
    "not URL-safe": "Zq7rT0kP3mW9xV2b N5cJ8dF1gH4sL6a!x",
    "too little variety": "abababababababababababababababab",
}


@pytest.mark.parametrize("why", list(WEAK))
def test_the_desk_refuses_a_weak_token_at_startup_naming_only_the_annotator(why: str, tmp_path: Path) -> None:
    token = WEAK[why]
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"alice:{TOKEN}\nmallory:{token}\n")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SYNPREF_")}
    # Nothing listens on port 9: a desk that got past its tokens would fail or hang on Kafka instead.
    env["SYNPREF_KAFKA__BOOTSTRAP_SERVERS"] = "127.0.0.1:9"
    cmd = [sys.executable, "-m", "synpref.shared.cli", "desk", "--port", "0", "--tokens-file", str(tokens_file)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"the desk started with a token that is {why}")
    assert proc.returncode == 2, (out, err)
    assert "mallory" in err
    assert token not in out + err and TOKEN not in out + err


def test_a_bare_token_without_annotator_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_tokens(f"alice:{TOKEN},{TOKEN[::-1]}")
    assert "entry 2" in str(caught.value) and TOKEN[::-1] not in str(caught.value)


def test_strong_tokens_load() -> None:
    hex_token = "9f86d081884c7d659a2feaa0c55ad015"
    urlsafe = "Zq7rT0kP3mW9xV2bN5cJ8dF1gH4sL6a_-"
    assert parse_tokens(f"a:{hex_token},b:{urlsafe}") == {"a": hex_token, "b": urlsafe}
