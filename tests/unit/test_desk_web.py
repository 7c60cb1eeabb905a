"""The desk's HTTP API over the in-memory backend, through aiohttp's test client."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from synpref.services.desk import MemoryReviewQueue, MemoryVerdictSink, ReviewDesk, make_app
from synpref.services.desk.core import swapped
from synpref.services.desk.tokens import load_tokens, parse_tokens
from synpref.shared.config import ConfigError, DeskSettings
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import Decision, PairRecord, Preference

TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789ab"}


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[who]}"}


def record(i: int, text: str | None = None) -> PairRecord:
    return new_record(
        new_pair(
            [{"role": "user", "content": text or f"question {i}"}],
            [{"role": "assistant", "content": f"good {i}"}],
            [{"role": "assistant", "content": f"bad {i}"}],
            source="test",
        )
    )


Scenario = Callable[[TestClient, ReviewDesk, MemoryReviewQueue, MemoryVerdictSink], Awaitable[None]]


def run(scenario: Scenario, overlap: int = 1) -> None:
    async def main() -> None:
        queue, sink = MemoryReviewQueue(), MemoryVerdictSink()
        desk = ReviewDesk(queue, sink, DeskSettings(overlap=overlap), tokens=TOKENS)
        async with TestClient(TestServer(make_app(desk, background=False))) as client:
            await scenario(client, desk, queue, sink)

    asyncio.run(main())


def test_without_a_valid_token_nothing_is_read_or_written() -> None:
    async def scenario(client: TestClient, desk: ReviewDesk, queue: MemoryReviewQueue, sink: Any) -> None:
        queue.push([record(1)])
        for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": TOKENS["alice"]}):
            for method, path in (("GET", "/api/next"), ("GET", "/api/progress"), ("POST", "/api/verdict")):
                resp = await client.request(method, path, headers=headers, json={"pair_id": "x", "choice": 1})
                assert resp.status == 401, (method, path, headers)
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        # Nothing was pulled from the queue, nothing written.
        assert len(queue) == 1 and desk.core.pending == 0 and sink.drain().routed == []

    run(scenario)


def test_page_is_served_with_a_strict_csp() -> None:
    async def scenario(client: TestClient, *_: Any) -> None:
        resp = await client.get("/")
        assert resp.status == 200
        html = await resp.text()
        assert '<script src="/static/desk.js"' in html
        csp = resp.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        js = await client.get("/static/desk.js")
        assert js.status == 200 and js.content_type == "text/javascript"
        assert "innerHTML" not in (await js.text()).replace("never parsed as HTML", "")
        assert (await client.get("/static/../web.py")).status == 404
        assert (await client.get("/static/index.html")).status == 404

    run(scenario)


def test_label_flow_with_the_memory_backend() -> None:
    async def scenario(client: TestClient, desk: ReviewDesk, queue: MemoryReviewQueue, sink: MemoryVerdictSink) -> None:
        recs = [record(i) for i in range(3)]
        queue.push(recs)
        session = await (await client.get("/api/session", headers=auth("alice"))).json()
        assert session["annotator"] == "alice" and session["guideline"]
        want = {}
        for i in range(3):
            data = await (await client.get("/api/next", headers=auth("alice"))).json()
            pair = data["pair"]
            # Alice picks the "bad" text for the second pair: that pair must come out flipped.
            target = "bad" if i == 1 else "good"
            choice = 1 if pair["candidates"][0][0]["content"].startswith(target) else 2
            want[pair["pair_id"]] = target
            resp = await client.post(
                "/api/verdict", headers=auth("alice"), json={"pair_id": pair["pair_id"], "choice": choice, "note": "ok"}
            )
            assert resp.status == 200, await resp.text()
            body = await resp.json()
            assert body["decided"] is True and body["progress"]["done"] == i + 1
        data = await (await client.get("/api/next", headers=auth("alice"))).json()
        assert data["pair"] is None and data["progress"]["waiting"] == 0
        result = sink.drain()
        assert [route for route, _ in result.routed] == ["verified"] * 3
        by_original = {(r.lineage.original_id or r.pair.id): r for _, r in result.routed}
        assert set(by_original) == set(want)
        for pid, target in want.items():
            out = by_original[pid]
            assert out.pair.chosen[0].content.startswith(target)
            assert out.human_verdicts[0].annotator == "alice"
            assert out.human_verdicts[0].preference == Preference.PREFERENCE_CHOSEN
        assert queue.acked == 3

    run(scenario)


def test_cannot_decide_goes_to_discarded() -> None:
    async def scenario(client: TestClient, desk: ReviewDesk, queue: MemoryReviewQueue, sink: MemoryVerdictSink) -> None:
        queue.push([record(7)])
        pair = (await (await client.get("/api/next", headers=auth("bob"))).json())["pair"]
        resp = await client.post("/api/verdict", headers=auth("bob"), json={"pair_id": pair["pair_id"], "choice": 0})
        assert resp.status == 200
        [(route, out)] = sink.drain().routed
        assert route == "discarded" and out.decision.decision == Decision.DECISION_DISCARD
        assert out.human_verdicts[0].preference == Preference.PREFERENCE_ABSTAIN

    run(scenario)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"pair_id": "p", "choice": 5}, "choice"),
        ({"pair_id": "p", "choice": "1"}, "choice"),
        ({"pair_id": "p", "choice": True}, "choice"),
        ({"pair_id": "<script>", "choice": 1}, "pair_id"),
        ({"pair_id": "p", "choice": 1, "note": 3}, "note"),
        ({"pair_id": "p", "choice": 1, "note": "x" * 2001}, "longer"),
        ({"pair_id": "p", "choice": 1, "admin": True}, "unknown"),
        ([1, 2], "object"),
    ],
)
def test_verdict_input_is_validated(body: Any, message: str) -> None:
    async def scenario(client: TestClient, *_: Any) -> None:
        resp = await client.post("/api/verdict", headers=auth("alice"), json=body)
        assert resp.status == 400
        assert message in (await resp.json())["error"]

    run(scenario)


def test_malformed_and_unassigned_verdicts() -> None:
    async def scenario(client: TestClient, desk: ReviewDesk, queue: MemoryReviewQueue, sink: MemoryVerdictSink) -> None:
        resp = await client.post(
            "/api/verdict",
            headers=auth("alice"),
            data="{not json",
        )
        assert resp.status == 400
        headers = {**auth("alice"), "Content-Type": "application/json"}
        assert (await client.post("/api/verdict", headers=headers, data="{not json")).status == 400
        queue.push([record(1)])
        pair = (await (await client.get("/api/next", headers=auth("alice"))).json())["pair"]
        # Bob may not answer Alice's pair.
        resp = await client.post("/api/verdict", headers=auth("bob"), json={"pair_id": pair["pair_id"], "choice": 1})
        assert resp.status == 409
        resp = await client.post("/api/verdict", headers=headers, data=b"x" * 20_000)
        assert resp.status == 413
        assert sink.drain().routed == []

    run(scenario)


def test_overlap_two_shows_agreement_in_progress() -> None:
    async def scenario(client: TestClient, desk: ReviewDesk, queue: MemoryReviewQueue, sink: MemoryVerdictSink) -> None:
        queue.push([record(1)])
        for who in ("alice", "bob"):
            pair = (await (await client.get("/api/next", headers=auth(who))).json())["pair"]
            chosen_first = not swapped(desk.core.salt, who, pair["pair_id"])
            assert pair["candidates"][0][0]["content"].startswith("good" if chosen_first else "bad")
            resp = await client.post(
                "/api/verdict", headers=auth(who), json={"pair_id": pair["pair_id"], "choice": 1 if chosen_first else 2}
            )
            assert (await resp.json())["decided"] is (who == "bob")
        progress = await (await client.get("/api/progress", headers=auth("alice"))).json()
        assert progress["agreement"]["pairs"] == 1 and progress["agreement"]["mean"] == 1.0
        assert progress["per_annotator"] == {"alice": 1, "bob": 1}
        [(route, out)] = sink.drain().routed
        assert route == "verified" and out.human_aggregate.agreement == 1.0 and len(out.human_verdicts) == 2

    run(scenario, overlap=2)


def test_tokens_parse_and_reject(tmp_path: Any) -> None:
    hex_a, hex_b = "0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210"
    assert parse_tokens(f"a:{hex_a}, b:{hex_b}\n# c:comment") == {"a": hex_a, "b": hex_b}
    for bad in ("a:short", f"no-colon-{hex_a}", f"a b:{hex_a}", f"a:{hex_a},a:{hex_b}", "a:0123456789abcdef"):
        with pytest.raises(ConfigError):
            parse_tokens(bad)
    path = tmp_path / "tokens"
    path.write_text("carol:carol-token-0123456789-abcdefghij\n")
    settings = DeskSettings(tokens="dave:dave-token-01234567890-abcdefghij", tokens_file=str(path))
    assert load_tokens(settings) == {
        "dave": "dave-token-01234567890-abcdefghij",
        "carol": "carol-token-0123456789-abcdefghij",
    }
    with pytest.raises(ConfigError):
        load_tokens(DeskSettings(tokens=f"x:{hex_a},y:{hex_a}"))
    with pytest.raises(ConfigError, match="no annotator tokens"):
        ReviewDesk(MemoryReviewQueue(), MemoryVerdictSink(), DeskSettings(), tokens={})


def test_a_pair_sent_again_after_its_decision_gets_the_same_decision() -> None:
    async def scenario(client: TestClient, desk: ReviewDesk, queue: MemoryReviewQueue, sink: MemoryVerdictSink) -> None:
        rec = record(5)
        queue.push([rec])
        pair = (await (await client.get("/api/next", headers=auth("alice"))).json())["pair"]
        resp = await client.post("/api/verdict", headers=auth("alice"), json={"pair_id": pair["pair_id"], "choice": 0})
        assert resp.status == 200
        [first] = sink.drain().routed
        queue.push([rec, rec])
        await desk.refill()
        # Nobody is asked again, yet each arrival is answered with the decision already made.
        assert (await (await client.get("/api/next", headers=auth("bob"))).json())["pair"] is None
        again = sink.drain().routed
        assert again == [first, first] and queue.acked == 3

    run(scenario)
