"""Session 46's review of the RL-facing client, against a RewardService on loopback whose reward of a text item is
its length: a text passed as the items was scored letter by letter; a pair's text conversation was sent as the
assistant's turn; NaN, infinite and huge timeouts failed every call at once as if the scorer had not answered; an
AsyncRewardClient made outside its event loop failed every call; `synpref score items` lost the line of a token id
outside int32."""

from __future__ import annotations

import asyncio
import io
import math
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from synpref.client import AsyncRewardClient, RewardClient, TokenIds, cli
from synpref.client.cli import read_numbered_items
from synpref.client.client import _Policy
from synpref.client.messages import to_pair
from synpref.services.scorer.servicer import SERVICE_NAME
from synpref.v1 import reward_pb2

USER = {"role": "user", "content": "Hi"}
CONVERSATION = [USER, {"role": "assistant", "content": "Hello!"}]


class Scorer:
    """A RewardService whose reward of a text item is its length (-1 for any other item), INVALID_ARGUMENT for an
    empty text; counts its requests."""

    def __init__(self) -> None:
        self.requests = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        codec = {
            "request_deserializer": reward_pb2.ScoreRequest.FromString,
            "response_serializer": reward_pb2.ScoreResponse.SerializeToString,
        }
        handlers = {
            "Score": grpc.unary_unary_rpc_method_handler(self._score, **codec),
            "ScoreStream": grpc.stream_stream_rpc_method_handler(self._stream, **codec),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _score(self, request: reward_pb2.ScoreRequest, context: Any) -> reward_pb2.ScoreResponse:
        self.requests += 1
        for i, item in enumerate(request.items):  # as the scorer words it: numbered within the request
            if item.WhichOneof("input") == "text" and not item.text:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"item {i} text is empty or not a string")
        rewards = [float(len(i.text)) if i.WhichOneof("input") == "text" else -1.0 for i in request.items]
        return reward_pb2.ScoreResponse(rewards=rewards)

    def _stream(self, requests: Iterator[reward_pb2.ScoreRequest], context: Any) -> Iterator[reward_pb2.ScoreResponse]:
        for request in requests:
            yield self._score(request, context)


@pytest.fixture
def scorer() -> Iterator[Scorer]:
    s = Scorer()
    yield s
    s.server.stop(0)


def test_one_text_or_conversation_passed_as_the_items_is_refused_not_scored_per_letter(scorer: Scorer) -> None:
    # Before: score("hello") answered [1.0] * 5, a reward per character, and score(conversation) failed with
    # "message 0 is a str, not an object with role and content".
    with RewardClient(scorer.address) as rm:
        assert rm.score(["hello"]) == [5.0]
        with pytest.raises(ValueError, match="items must be a list of items, got a str"):
            rm.score("hello")
        with pytest.raises(ValueError, match=r"items is one conversation .*pass \[conversation\]"):
            rm.score(CONVERSATION)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="pairs must be a list of pairs, got a dict"):
            rm.score_pairs({"conversation": [USER], "chosen": "a", "rejected": "b"})  # type: ignore[arg-type]
        # A bad item is named by its index in the call, not only by the message within it.
        with pytest.raises(ValueError, match=r"^item 2: Value out of range: 2147483648"):
            rm.score(["a", "b", TokenIds([1, 2**31])])
        with pytest.raises(ValueError, match=r"^item 1: expected a message list or a text, got a dict"):
            rm.score(["a", {"messages": CONVERSATION}])  # type: ignore[list-item]
    assert scorer.requests == 1

    async def run() -> None:
        async with AsyncRewardClient(scorer.address) as rm, rm.stream() as session:
            assert await rm.score(["abc"]) == [3.0] and await session.score(["ab"]) == [2.0]
            with pytest.raises(ValueError, match="got a str"):
                await rm.score("hello")
            with pytest.raises(ValueError, match="got a str"):
                await session.score("hello")
            with pytest.raises(ValueError, match=r"^item 0: 'float' object cannot be interpreted as an integer"):
                await session.score([TokenIds([1.0])])  # type: ignore[list-item]

    asyncio.run(asyncio.wait_for(run(), 10))
    assert scorer.requests == 3


def test_a_pairs_text_conversation_is_the_users_turn_and_a_pair_without_a_side_is_named() -> None:
    # Before: the prompt went as an assistant message, so the server scored it as part of the response.
    pair = to_pair({"conversation": "What is 2+2?", "chosen": "4", "rejected": "5"})
    assert [(m.role, m.content) for m in pair.conversation] == [("user", "What is 2+2?")]
    assert [m.role for m in (*pair.chosen, *pair.rejected)] == ["assistant", "assistant"]
    with RewardClient("127.0.0.1:1") as rm, pytest.raises(ValueError, match=r"^pair 1: .*got one with keys"):
        rm.score_pairs([{"chosen": "a", "rejected": "b"}, {"conversation": [USER], "chosen": "a"}])


@pytest.mark.parametrize("bad", [math.nan, math.inf, 1e10, 0.0, -1.0])
def test_a_timeout_no_call_could_honour_is_refused_before_anything_is_sent(scorer: Scorer, bad: float) -> None:
    # Before: NaN, inf and 1e10 failed every call at once with "Deadline Exceeded: no answer from ... within the
    # call's timeout"; a call's 0 meant the client's timeout, and -1 a call of 1 ms.
    with pytest.raises(ValueError, match="timeout must be a number of seconds"):
        RewardClient(scorer.address, timeout=bad)
    with RewardClient(scorer.address) as rm:
        with pytest.raises(ValueError, match="timeout must be a number of seconds"):
            rm.score(["abc"], timeout=bad)
        assert rm.score(["abc"], timeout=1e9) == [3.0]
    assert scorer.requests == 1

    async def run() -> None:
        async with AsyncRewardClient(scorer.address) as rm, rm.stream() as session:
            with pytest.raises(ValueError, match="timeout must be a number of seconds"):
                await rm.score(["abc"], timeout=bad)
            with pytest.raises(ValueError, match="timeout must be a number of seconds"):
                await session.score(["abc"], timeout=bad)

    asyncio.run(asyncio.wait_for(run(), 10))
    assert scorer.requests == 1


def test_a_backoff_the_retries_could_not_sleep_is_refused() -> None:
    # Before: accepted, and the first retry failed with time.sleep's "sleep length must be non-negative".
    for backoff_s, max_backoff_s in ((-0.1, 1.0), (0.1, -1.0), (math.nan, 1.0), (0.1, math.inf)):
        with pytest.raises(ValueError, match="backoff_s and max_backoff_s must be finite and >= 0"):
            _Policy(10.0, 1, backoff_s, max_backoff_s, 8)


@pytest.mark.parametrize("timeout", ["inf", "nan", "1e10"])
def test_score_refuses_a_timeout_no_request_could_honour(
    scorer: Scorer, tmp_path: Path, capsys: pytest.CaptureFixture[str], timeout: str
) -> None:
    # Before: inf and 1e10 passed `--timeout > 0`, and the first request failed DEADLINE_EXCEEDED, exit 1.
    src = tmp_path / "items.jsonl"
    src.write_text('{"text": "abc"}\n')
    out = tmp_path / "out.jsonl"
    argv = ["--address", scorer.address, "items", str(src), "-o", str(out), "--timeout"]
    assert cli.main([*argv, timeout]) == 2
    assert "--timeout > 0 and <= 1e+09" in capsys.readouterr().err and scorer.requests == 0
    assert cli.main([*argv, "1e9"]) == 0 and out.read_text() == '{"reward": 3.0, "line": 1}\n'


def test_score_items_names_the_line_of_a_token_id_outside_int32(
    scorer: Scorer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: the line was read, and its request failed in a worker thread: "synpref score: Value out of range:
    # 2147483648", no line, after the requests before it were scored.
    with pytest.raises(ValueError, match=r"^line 2: Value out of range: 2147483648"):
        list(read_numbered_items(io.StringIO('{"token_ids": [1]}\n{"token_ids": [1, 2147483648]}\n')))
    src = tmp_path / "items.jsonl"
    src.write_text('{"text": "abc"}\n{"token_ids": [-2147483649]}\n')
    assert cli.main(["--address", scorer.address, "items", str(src), "-o", str(tmp_path / "out.jsonl")]) == 2
    assert "synpref score: line 2: Value out of range: -2147483649" in capsys.readouterr().err
    assert scorer.requests == 0


def test_an_async_client_made_outside_an_event_loop_scores_in_the_first_that_uses_it(scorer: Scorer) -> None:
    # Before: its channel was bound to the loop current when it was made, so every call from asyncio.run failed
    # with "got Future ... attached to a different loop".
    client = AsyncRewardClient(scorer.address, timeout=5.0)
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        assert first.run_until_complete(client.score(["abc"])) == [3.0]
        assert first.run_until_complete(client.score(["abcd"])) == [4.0]
        with pytest.raises(RuntimeError, match="make one client per event loop"):
            second.run_until_complete(client.score(["abc"]))
        first.run_until_complete(client.close())
    finally:
        first.close()
        second.close()
    with pytest.raises(RuntimeError, match="from sync code use RewardClient"):
        AsyncRewardClient(scorer.address).stream()


def test_an_item_the_scorer_refuses_is_placed_in_the_call_not_only_in_its_request(scorer: Scorer) -> None:
    # Before: "item 1 text is empty or not a string" for the call's item 5 (the third request's second item): the
    # caller looked at item 1, which was fine.
    items = ["a", "bb", "ccc", "dddd", "e", "", "g"]
    with RewardClient(scorer.address, chunk_size=2) as rm, pytest.raises(grpc.RpcError) as err:
        rm.score(items)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == (
        "item 1 text is empty or not a string (numbered within this request of the call's items 4 to 5)"
    )
    with RewardClient(scorer.address, chunk_size=8) as rm, pytest.raises(grpc.RpcError) as err:
        rm.score(items)  # one request: its numbers are the call's
    assert err.value.details() == "item 5 text is empty or not a string"

    async def run() -> grpc.aio.AioRpcError:
        async with AsyncRewardClient(scorer.address, chunk_size=3, concurrency=2) as rm:
            assert await rm.score(items[:5]) == [1.0, 2.0, 3.0, 4.0, 1.0]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await rm.score(items)
            return err.value

    error = asyncio.run(asyncio.wait_for(run(), 10))
    assert error.details() == (
        "item 2 text is empty or not a string (numbered within this request of the call's items 3 to 5)"
    )


class ShortScorer(Scorer):
    """A faulty scorer that drops the last reward of every answer."""

    def _score(self, request: reward_pb2.ScoreRequest, context: Any) -> reward_pb2.ScoreResponse:
        answer = super()._score(request, context)
        del answer.rewards[-1]
        return answer


def test_an_answer_without_one_reward_per_item_is_an_error_not_shifted_rewards() -> None:
    # Before: the client took whatever came back, so every reward after a missing one was another item's.
    short = ShortScorer()
    items = [[USER, {"role": "assistant", "content": "x" * n}] for n in range(1, 4)]
    try:
        with RewardClient(short.address, timeout=5) as client, pytest.raises(grpc.RpcError) as caught:
            client.score(items)
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert f"the scorer at {short.address} answered 2 scores for 3 items" in caught.value.details()

        async def asynchronous() -> None:
            async with AsyncRewardClient(short.address, timeout=5) as client:
                with pytest.raises(grpc.RpcError, match="answered 2 scores for 3 items"):
                    await client.score(items)

        asyncio.run(asynchronous())
    finally:
        short.server.stop(0)
