"""Review 39, desk: a token written on the annotator's side of an entry is never echoed; a desk whose
overlap no set of its annotators can reach refuses to start; a verdict with an unknown charset is a 400.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from synpref.services.desk import MemoryReviewQueue, MemoryVerdictSink, ReviewDesk, make_app
from synpref.services.desk import main as desk_main
from synpref.services.desk.tokens import parse_tokens
from synpref.shared.config import ConfigError, DeskSettings
from synpref.shared.pairs import new_pair, new_record

TOKEN = "Zq7rT0kP3mW9xV2bN5cJ8dF1gH4sL6a_-"
OTHER = "9f86d081884c7d659a2feaa0c55ad015"


@pytest.mark.parametrize(
    "text",
    [
        f"{TOKEN}:alice",  # the wrong way round: the token sits where the annotator should be
        f"{TOKEN}~x:alice",  # and one with "~", which tokens may hold and annotator ids may not
        f"bob:{OTHER},{TOKEN}:{OTHER[::-1]},{TOKEN}:{OTHER[1:] + 'z'}",  # twice, both strong
    ],
)
def test_a_token_written_as_the_annotator_is_not_echoed(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_tokens(text, "desk.tokens")
    message = str(caught.value)
    assert TOKEN not in message and "entry" in message, message


def test_a_short_annotator_is_still_named() -> None:
    with pytest.raises(ConfigError, match="'mallory'"):
        parse_tokens("mallory:short-token", "desk.tokens")


def test_a_desk_with_fewer_annotators_than_its_overlap_refuses_to_start() -> None:
    # Overlap 3 with two annotators: no pair could ever get its third verdict; the embedded loop waited 24 h.
    tokens = {"alice": TOKEN, "bob": OTHER}
    with pytest.raises(ConfigError, match="overlap"):
        ReviewDesk(MemoryReviewQueue(), MemoryVerdictSink(), DeskSettings(overlap=3), tokens=tokens)
    ReviewDesk(MemoryReviewQueue(), MemoryVerdictSink(), DeskSettings(overlap=2), tokens=tokens)


def test_synpref_desk_refuses_an_unreachable_overlap(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    from aiohttp import web

    served: list[object] = []
    monkeypatch.setattr(web, "run_app", lambda *a, **k: served.append(a))
    monkeypatch.setenv("SYNPREF_DESK__TOKENS", f"alice:{TOKEN}")
    monkeypatch.setenv("SYNPREF_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9")
    assert desk_main.main(["--overlap", "2", "--port", "0"]) == 2
    assert not served
    err = capsys.readouterr().err
    assert "overlap" in err and TOKEN not in err


def pair(i: int) -> Any:
    return new_record(
        new_pair(
            [{"role": "user", "content": f"q{i}"}],
            [{"role": "assistant", "content": f"a{i}"}],
            [{"role": "assistant", "content": f"b{i}"}],
            "unit",
        )
    )


def test_a_verdict_body_is_utf8_whatever_its_charset_says() -> None:
    # An unknown charset was a 500 with a traceback in the log; latin-1 turned "café" into "cafÃ©".
    async def scenario() -> None:
        queue = MemoryReviewQueue()
        queue.push([pair(1), pair(2)])
        sink = MemoryVerdictSink()
        desk = ReviewDesk(queue, sink, DeskSettings(), tokens={"alice": TOKEN})
        async with TestClient(TestServer(make_app(desk, background=False))) as client:
            auth = {"Authorization": f"Bearer {TOKEN}"}
            for charset in ("bogus", "latin-1"):
                pair_id = (await (await client.get("/api/next", headers=auth)).json())["pair"]["pair_id"]
                body = json.dumps({"pair_id": pair_id, "choice": 1, "note": "café"}, ensure_ascii=False).encode()
                content_type = f"application/json; charset={charset}"
                answer = await client.post("/api/verdict", data=body, headers={**auth, "Content-Type": content_type})
                assert answer.status == 200, (charset, await answer.text())
                assert (await answer.json())["decided"] is True
            bad = await client.post("/api/verdict", data=b"\xff{}", headers=auth | {"Content-Type": "application/json"})
            assert bad.status == 400
        notes = [record.human_verdicts[0].note for _, record in sink.drain().routed]
        assert notes == ["café", "café"]

    asyncio.run(scenario())


class DownSink(MemoryVerdictSink):
    async def write(self, routed: list[tuple[str, Any]]) -> None:
        raise ConnectionError("broker down")


def test_closing_with_unwritten_decisions_says_so(caplog: pytest.LogCaptureFixture) -> None:
    # close() swallowed the failed last flush: the annotators' verdicts vanished without a log line.
    async def scenario() -> None:
        queue = MemoryReviewQueue()
        queue.push([pair(1)])
        desk = ReviewDesk(queue, DownSink(), DeskSettings(), tokens={"alice": TOKEN})
        await desk.refill()
        assert desk.core.next_for("alice") is not None
        assert await desk.submit("alice", pair(1).pair.id, 1, "") is True
        caplog.clear()
        await desk.close()

    with caplog.at_level("ERROR", logger="synpref.desk"):
        asyncio.run(scenario())
    assert any("1 decided pairs unwritten" in r.getMessage() for r in caplog.records), caplog.text
