"""The desk's failed-login throttle behind a reverse proxy: which address it keys on (desk.trusted_proxies)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable

import pytest
from aiohttp.test_utils import TestClient, TestServer

from synpref.services.desk import MemoryReviewQueue, MemoryVerdictSink, ReviewDesk, make_app
from synpref.services.desk.tokens import FailedAuthThrottle
from synpref.services.desk.web import client_address
from synpref.shared.config import ConfigError, DeskSettings, load_settings

TOKEN = "alice-token-0123456789"
BAD = {"Authorization": "Bearer wrong-token-wrong-token"}
GOOD = {"Authorization": f"Bearer {TOKEN}"}
PROXIES = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "expected"),
    [
        # The peer is no trusted proxy: the header is the client's own words and is ignored.
        ("203.0.113.9", ["198.51.100.1"], "203.0.113.9"),
        (None, ["198.51.100.1"], "unknown"),
        # One proxy: the address it appended.
        ("10.0.0.5", ["198.51.100.1"], "198.51.100.1"),
        # The client wrote the left-most entries; the right-most untrusted one is what our proxy saw.
        ("10.0.0.5", ["1.1.1.1, 2.2.2.2, 198.51.100.1"], "198.51.100.1"),
        # Two trusted hops (a load balancer, then the ingress), header lines in order.
        ("10.0.0.5", ["198.51.100.1, 10.1.2.3", "10.9.9.9"], "198.51.100.1"),
        # Garbage the client put left of a good entry does not matter.
        ("10.0.0.5", ["not-an-address, 198.51.100.1"], "198.51.100.1"),
        # A non-address where only trusted proxies write: the peer.
        ("10.0.0.5", ["198.51.100.1, bogus"], "10.0.0.5"),
        ("10.0.0.5", [""], "10.0.0.5"),
        ("10.0.0.5", [], "10.0.0.5"),
        # Every hop trusted: the furthest one.
        ("10.0.0.5", ["10.7.7.7, 10.8.8.8"], "10.7.7.7"),
        # IPv6, bracketed IPv6, and an IPv4 peer seen on a dual-stack socket.
        ("fd00::1", ["2001:db8::7"], "2001:db8::7"),
        ("fd00::1", ["[2001:db8::7]"], "2001:db8::7"),
        ("::ffff:10.0.0.5", ["198.51.100.1"], "198.51.100.1"),
    ],
)
def test_client_address(peer: str | None, forwarded_for: list[str], expected: str) -> None:
    assert client_address(peer, forwarded_for, PROXIES) == expected


def test_without_trusted_proxies_the_header_is_ignored() -> None:
    assert client_address("10.0.0.5", ["198.51.100.1"], []) == "10.0.0.5"


def test_trusted_proxies_come_from_settings_and_bad_ones_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNPREF_DESK__TRUSTED_PROXIES", '["10.0.0.0/8", "fd00::/8"]')
    assert load_settings(None).desk.trusted_proxies == PROXIES
    monkeypatch.setenv("SYNPREF_DESK__TRUSTED_PROXIES", '["10.0.0.300/8"]')
    with pytest.raises(ConfigError, match="trusted_proxies"):
        load_settings(None)


Scenario = Callable[[TestClient], Awaitable[None]]


def run(scenario: Scenario, trusted: list[str]) -> None:
    """Run `scenario` against the desk on loopback (the peer is 127.0.0.1), 3 failures allowed per address."""

    async def main() -> None:
        settings = DeskSettings.model_validate({"trusted_proxies": trusted})
        desk = ReviewDesk(MemoryReviewQueue(), MemoryVerdictSink(), settings, tokens={"alice": TOKEN})
        throttle = FailedAuthThrottle(burst=3, clock=lambda: 0.0)  # a frozen clock: the buckets never refill
        async with TestClient(TestServer(make_app(desk, background=False, auth_throttle=throttle))) as client:
            await scenario(client)

    asyncio.run(main())


def test_behind_a_trusted_proxy_one_guesser_does_not_lock_out_the_others() -> None:
    async def scenario(client: TestClient) -> None:
        for _ in range(3):
            resp = await client.get("/api/session", headers={**BAD, "X-Forwarded-For": "203.0.113.9"})
            assert resp.status == 401
        # The guesser is throttled, whatever it writes left of what the proxy appended.
        for spoof in ("203.0.113.9", "1.2.3.4, 203.0.113.9", "198.51.100.7, 203.0.113.9"):
            resp = await client.get("/api/session", headers={**BAD, "X-Forwarded-For": spoof})
            assert resp.status == 429, spoof
        # An annotator behind the same proxy is not.
        resp = await client.get("/api/session", headers={**GOOD, "X-Forwarded-For": "198.51.100.7"})
        assert resp.status == 200
        assert (await resp.json())["annotator"] == "alice"

    run(scenario, ["127.0.0.0/8"])


def test_without_trusted_proxies_the_peer_is_throttled_whatever_the_header_says() -> None:
    async def scenario(client: TestClient) -> None:
        for i in range(3):
            resp = await client.get("/api/session", headers={**BAD, "X-Forwarded-For": f"203.0.113.{i}"})
            assert resp.status == 401
        # A forged header does not buy fresh guesses: the key is still the TCP peer.
        resp = await client.get("/api/session", headers={**GOOD, "X-Forwarded-For": "198.51.100.7"})
        assert resp.status == 429

    run(scenario, [])
