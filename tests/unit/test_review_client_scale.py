"""Review findings in the client at SynPref-40M scale: `synpref score` streams its input and output, and
AsyncRewardClient makes a chunk's request only when its call can start."""

from __future__ import annotations

import asyncio
import json
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest

from synpref.client import AsyncRewardClient, PairScore, cli
from synpref.v1 import reward_pb2


class Down(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "scorer gone"


class FakeClient:
    """RewardClient's surface for the CLI: a pair's rewards are its index and minus it, an item's its length."""

    calls: ClassVar[list[int]] = []
    fail_at = 10**9
    on_call: Any = None

    def __init__(self, address: str, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def score_pairs(self, pairs: Sequence[dict[str, Any]], *, timeout: float | None = None) -> list[PairScore]:
        FakeClient.calls.append(len(pairs))
        index = [int(p["conversation"][0]["content"][1:]) for p in pairs]
        if max(index) >= FakeClient.fail_at:
            raise Down()
        return [PairScore(float(i), -float(i), 1 / (1 + math.exp(-2 * i))) for i in index]

    def score(self, items: Sequence[Any], *, timeout: float | None = None) -> list[float]:
        FakeClient.calls.append(len(items))
        if FakeClient.on_call is not None:
            FakeClient.on_call()
        return [float(len(x)) for x in items]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> type[FakeClient]:
    FakeClient.calls, FakeClient.fail_at, FakeClient.on_call = [], 10**9, None
    monkeypatch.setattr(cli, "RewardClient", FakeClient)
    return FakeClient


def _hh(i: int) -> str:
    return json.dumps({"chosen": f"\n\nHuman: q{i}\n\nAssistant: a", "rejected": f"\n\nHuman: q{i}\n\nAssistant: b"})


def test_score_pairs_streams_in_batches_and_keeps_what_was_written_before_a_failure(
    fake: type[FakeClient], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: every row of the file in one list, every score in another, one call for all of them and the output
    # written at the end: a 40M-pair file held all in memory and a failure at pair 39M left no output at all.
    unpairable = json.dumps({"chosen": "\n\nHuman: A\n\nAssistant: B", "rejected": "\n\nHuman: C\n\nAssistant: D"})
    src = tmp_path / "hh.jsonl"
    src.write_text("\n".join([_hh(i) for i in range(20)] + [unpairable] + [_hh(i) for i in range(20, 40)]) + "\n")
    out = tmp_path / "scored.jsonl"
    args = ["--address", "x:1", "--chunk-size", "4", "pairs", str(src), "-o", str(out)]
    assert cli.main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reward_chosen"] for r in rows] == [float(i) for i in range(40)]  # every pair, in input order
    p3 = 1 / (1 + math.exp(-6))
    row3 = {"source": "hh", "reward_chosen": 3.0, "reward_rejected": -3.0, "p": p3, "version": ""}
    assert rows[3] == {**row3, "locator": f"{src.as_posix()}#3"}
    assert max(fake.calls) <= 20 and sum(fake.calls) == 40  # chunk 4: requests of 2 pairs, a few at a time
    err = capsys.readouterr().err
    assert "not a pair: " in err and "scored 40 pairs (1 rows were no pair); p > 0.5 on 39" in err

    fake.calls, fake.fail_at = [], 35
    assert cli.main(args) == 1
    kept = [json.loads(line)["reward_chosen"] for line in out.read_text().splitlines()]
    assert 0 < len(kept) <= 35 and kept == [float(i) for i in range(len(kept))]  # the batches before the failing one
    err = capsys.readouterr().err
    assert f"scored {len(kept)} pairs" in err and "UNAVAILABLE: scorer gone" in err


def test_score_items_reads_stdin_as_it_scores(
    fake: type[FakeClient], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Before: all of stdin was read into a list before the first request.
    read = 0

    def lines() -> Iterator[str]:
        nonlocal read
        for i in range(100):
            read += 1
            yield json.dumps({"text": "x" * i}) + "\n"

    seen: list[int] = []
    fake.on_call = lambda: seen.append(read)
    monkeypatch.setattr(sys, "stdin", lines())
    out = tmp_path / "rewards.jsonl"
    assert cli.main(["--address", "x:1", "--chunk-size", "2", "items", "-", "-o", str(out)]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"reward": float(i), "line": i + 1} for i in range(100)
    ]
    assert seen[0] <= 50 and max(fake.calls) <= 50  # chunk 2: a few requests' worth at a time


class Counted(list[str]):
    """A list that counts how many of its items were read."""

    read = 0

    def __iter__(self) -> Iterator[str]:
        for x in super().__iter__():
            self.read += 1
            yield x


def test_async_score_makes_requests_only_as_calls_start_and_keeps_order() -> None:
    # Before: every chunk's request (and task) was built before the first was sent: a call of millions of
    # items held all of them as protobuf messages at once, and as many tasks parked on a semaphore.
    items = Counted(f"{i:03d}" for i in range(60))
    read_at_call: list[int] = []
    in_flight = peak = 0

    class Stub:
        async def Score(self, request: reward_pb2.ScoreRequest, timeout: float, wait_for_ready: bool) -> Any:
            nonlocal in_flight, peak
            read_at_call.append(items.read)
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.001 * (int(request.items[0].text) % 3))  # out of order
            in_flight -= 1
            return reward_pb2.ScoreResponse(rewards=[float(x.text) for x in request.items])

    async def main() -> None:
        async with AsyncRewardClient("127.0.0.1:1", chunk_size=2, concurrency=3, timeout=10) as rm:
            rm.stub = Stub()  # type: ignore[assignment]
            assert await rm.score(items) == [float(i) for i in range(60)]

    asyncio.run(asyncio.wait_for(main(), 10))
    assert peak <= 3 and len(read_at_call) == 30
    # the n-th call starts with at most its own chunk, 3 more (one waiting for a free slot) and one item read ahead
    assert all(read <= 2 * (n + 4) + 1 for n, read in enumerate(read_at_call)), read_at_call


def test_async_client_refuses_a_concurrency_under_one() -> None:
    # Before: Semaphore(0) let no chunk start and score() waited forever, past its timeout.
    async def main() -> None:
        with pytest.raises(ValueError, match="concurrency"):
            AsyncRewardClient("127.0.0.1:1", concurrency=0)

    asyncio.run(main())


def test_a_non_finite_reward_is_written_as_null_not_as_nan(
    fake: type[FakeClient], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Before: json.dumps wrote NaN and Infinity, which no strict JSON reader accepts.
    monkeypatch.setattr(fake, "score", lambda self, items, timeout=None: [math.nan, math.inf, 1.5][: len(items)])
    src = tmp_path / "items.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("a", "b", "c")))
    out = tmp_path / "rewards.jsonl"
    assert cli.main(["--address", "x:1", "items", str(src), "-o", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert [json.loads(line, parse_constant=lambda c: pytest.fail(f"not JSON: {c}")) for line in lines] == [
        {"reward": None, "line": 1},
        {"reward": None, "line": 2},
        {"reward": 1.5, "line": 3},
    ]


def test_score_keeps_concurrency_requests_in_flight_and_writes_in_input_order(
    fake: type[FakeClient], tmp_path: Path
) -> None:
    # Before: one blocking request at a time, so a scorer batched nothing across a file's requests.
    import threading
    import time

    lock, flight, peak = threading.Lock(), [0], [0]

    def slow_first_calls() -> None:
        with lock:
            flight[0] += 1
            peak[0] = max(peak[0], flight[0])
            n = len(fake.calls)
        time.sleep(0.05 if n % 3 == 1 else 0.005)  # some calls end after the ones sent after them
        with lock:
            flight[0] -= 1

    fake.on_call = slow_first_calls
    src = tmp_path / "items.jsonl"
    src.write_text("".join(json.dumps({"text": "x" * i}) + "\n" for i in range(60)))
    out = tmp_path / "rewards.jsonl"
    args = ["--address", "x:1", "--chunk-size", "2", "--concurrency", "3", "items", str(src), "-o", str(out)]
    assert cli.main(args) == 0
    assert [json.loads(line)["reward"] for line in out.read_text().splitlines()] == [float(i) for i in range(60)]
    assert peak[0] == 3 and sum(fake.calls) == 60
    for bad in (["--concurrency", "0"], ["--chunk-size", "0"], ["--timeout", "0"]):
        assert cli.main(["--address", "x:1", *bad, "items", str(src)]) == 2


def test_score_timeout_bounds_each_request_not_the_whole_run(
    fake: type[FakeClient], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Before: --timeout (600 s) was the whole run's deadline: a file that takes longer than that to score failed
    # part way with DEADLINE_EXCEEDED, however fast each request was.
    timeouts: list[float | None] = []
    real_score = FakeClient.score

    def score(self: FakeClient, items: Sequence[Any], *, timeout: float | None = None) -> list[float]:
        timeouts.append(timeout)
        return real_score(self, items, timeout=timeout)

    monkeypatch.setattr(FakeClient, "score", score)
    src = tmp_path / "items.jsonl"
    src.write_text("".join(json.dumps({"text": "x"}) + "\n" for _ in range(10)))
    assert cli.main(["--address", "x:1", "--timeout", "7", "--chunk-size", "1", "items", str(src), "-o", "-"]) == 0
    assert timeouts == [7.0] * 10
