"""Session 42's review of the scorer's HTTP API and the gold scorer's pair failures: each finding reproduced with
the shims on a loopback aiohttp server (fake model: a batcher of character counts) or the gold-scorer stage with
a plain function as its pair scorer."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from synpref.services.gold_scorer.scoring import ScorerFailed, ScoringModel, make_scoring_stage
from synpref.shared.config import ScorerSettings
from synpref.shared.pairs import new_pair, new_record
from synpref.shared.stage import StageUnavailable
from synpref.v1.pair_pb2 import PairRecord
from testing.scorer_fakes import char_count_shims


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


@contextlib.asynccontextmanager
async def _connected(
    settings: ScorerSettings | None = None,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A raw connection to char_count_shims' HTTP port; the connection, runner and batcher are closed after."""
    runner, port, b = await char_count_shims(settings)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        await writer.wait_closed()
        await runner.cleanup()
        await b.close()


async def _request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes, path: str = "/get_reward"
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """One HTTP/1.1 request on an open (keep-alive) connection: the status, headers (lower-cased) and JSON body."""
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode()
    lines = head.split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    payload = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
    return int(lines[0].split()[1]), headers, json.loads(payload)


# --- 1. OpenRLHF: an empty query list answered 400 ----------------------------------------------------------------


def test_get_reward_answers_an_empty_query_list_with_empty_rewards_as_openrlhf_does() -> None:
    # An RL step with nothing to score posted {"query": []} and got 400 (serve_rm answers empty rewards): the
    # trainer's remote_rm_fn raised. A missing or non-list query is still the client's error.
    async def main() -> None:
        async with _connected() as (reader, writer):
            status, _, empty = await _request(reader, writer, b'{"query": [], "prompts": [], "labels": []}')
            assert status == 200, empty
            _, _, full = await _request(reader, writer, b'{"query": ["abc"]}')
            assert empty == {"rewards": [], "scores": [], "extra_logs": {}}
            assert set(full) == set(empty) and full["rewards"] == [3.0]
            for bad in (b"{}", b'{"query": 5}', b'{"query": {"a": 1}}', b'{"query": [1]}'):
                status, _, answer = await _request(reader, writer, bad)
                assert status == 400 and "query" in answer["error"], (bad, answer)

    run(main())


# --- 2. the gold scorer dead-lettered a pair on one transient scorer error ------------------------------------------


def _rec(text: str) -> PairRecord:
    return new_record(new_pair([{"role": "user", "content": "q"}], [{"role": "assistant", "content": text}],
                               [{"role": "assistant", "content": "no"}], "t"))  # fmt: skip


class Flaky:
    """A pair scorer (character counts) whose calls holding FLAKY fail with ScorerFailed `failures` times in all,
    and whose calls holding REFUSED always raise the pair's own error (what grpc_scorer raises for
    INVALID_ARGUMENT). Records every call's texts."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[list[str]] = []

    def __call__(self, pairs: list[dict]) -> list[tuple[float, float]]:
        texts = [p["chosen"][0]["content"] for p in pairs]
        self.calls.append(texts)
        if "REFUSED" in texts:
            raise ValueError("the conversation's roles must alternate")
        if "FLAKY" in texts and self.failures > 0:
            self.failures -= 1
            raise ScorerFailed(f"scorer failed {len(pairs)} pair(s) with 'gold': INTERNAL: CUDA error: launch failure")
        return [(float(len(t)), 2.0) for t in texts]


def test_a_pair_whose_scorer_error_was_transient_is_tried_once_more_alone_not_dead_lettered() -> None:
    # The batch failed (one CUDA hiccup), its pairs were scored alone, and the one whose lone call hit the hiccup
    # again was dead-lettered at once while the others scored: a good pair lost to curation.
    scorer = Flaky(failures=2)
    good, flaky, other = _rec("good"), _rec("FLAKY"), _rec("other")
    result = make_scoring_stage([ScoringModel("gold", "g", scorer)])([good, flaky, other])
    assert result.failed == []
    assert sorted(r.pair.id for _, r in result.routed) == sorted(p.pair.id for p in (good, flaky, other))
    assert scorer.calls.count(["FLAKY"]) == 2  # alone, then once more alone


def test_a_pair_that_keeps_failing_or_is_refused_for_itself_is_still_dead_lettered() -> None:
    # One more try, not more: a pair the scorer fails every time it is alone (too large for its memory, say) is
    # dead-lettered after it; a pair refused for itself is dead-lettered without one.
    scorer = Flaky(failures=100)
    good, flaky, refused = _rec("good"), _rec("FLAKY"), _rec("REFUSED")
    result = make_scoring_stage([ScoringModel("gold", "g", scorer)])([good, flaky, refused])
    assert [r.pair.id for _, r in result.routed] == [good.pair.id]
    assert sorted(r.pair.id for r, _ in result.failed) == sorted([flaky.pair.id, refused.pair.id])
    assert scorer.calls.count(["FLAKY"]) == 2 and scorer.calls.count(["REFUSED"]) == 1

    # Where no pair scores, alone either, and no other pair does (gold_scorer.scores_a_canary), the scorer is at
    # fault: the batch is read again, nothing dead-lettered (test_fix44_goldcanary: where others do, the pairs are).
    def broken(pairs: list[dict]) -> list[tuple[float, float]]:
        raise ScorerFailed("scorer failed with 'gold': INTERNAL: CUDA error: an illegal memory access")

    with pytest.raises(StageUnavailable):
        make_scoring_stage([ScoringModel("gold", "g", broken)])([_rec("FLAKY"), _rec("FLAKY")])


# --- 4. HTTP keep-alive clients stayed on one scorer pod for ever --------------------------------------------------


@pytest.mark.parametrize("age_s", [0.3, 0.0])
def test_a_keep_alive_connection_older_than_max_connection_age_is_closed_after_its_next_response(age_s: float) -> None:
    # gRPC connections get GOAWAY after scorer.max_connection_age_s; an HTTP keep-alive client (OpenRLHF's
    # requests.Session, verl's aiohttp session) kept its one connection, so through the ClusterIP Service it stayed
    # on the pod it first reached, and replicas the HPA added got none of its calls. 0 keeps connections open.
    async def main() -> None:
        async with _connected(ScorerSettings(max_connection_age_s=age_s)) as (reader, writer):
            status, headers, _ = await _request(reader, writer, b'{"query": ["abc"]}')
            assert status == 200 and headers.get("connection") != "close"
            await asyncio.sleep(0.4)  # the connection's age, not a wait for an event
            status, headers, answer = await _request(reader, writer, b'{"query": ["abcd"]}')
            assert status == 200 and answer["rewards"] == [4.0]  # the request is answered, then the connection ends
            if age_s:
                assert headers.get("connection") == "close"
                assert await asyncio.wait_for(reader.read(), 5) == b""
            else:
                assert headers.get("connection") != "close"
                assert (await _request(reader, writer, b'{"query": ["ab"]}'))[2]["rewards"] == [2.0]

    run(main())
