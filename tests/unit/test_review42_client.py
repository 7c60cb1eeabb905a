"""Session 42's review of the RL-side client: a message whose content is not a string was scored as its str()
("None", a list's repr), and a ScoreSession call's timeout did not bound its wait for the session's turn."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from synpref.client import RewardClient, ScoreSession, cli
from synpref.client.client import _Policy
from synpref.client.messages import to_item, to_pair
from synpref.v1 import reward_pb2

USER = {"role": "user", "content": "q"}


class RecordingStub:
    """RewardService's unary Score: every request it got, each item's reward its index."""

    def __init__(self) -> None:
        self.requests: list[reward_pb2.ScoreRequest] = []

    def Score(self, request: reward_pb2.ScoreRequest, timeout: float, wait_for_ready: bool) -> Any:
        self.requests.append(request)
        return reward_pb2.ScoreResponse(rewards=[float(i) for i in range(len(request.items))])


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"role": "assistant", "content": None}, "message 1 content must be a string, got NoneType"),
        ({"role": "assistant", "content": [{"type": "text", "text": "a"}]}, "message 1 content must be a string"),
        ({"role": "assistant"}, "message 1 content must be a string"),
        ({"role": None, "content": "a"}, "message 1 role must be a string"),
        ("a", "message 1 is a str, not an object with role and content"),
    ],
)
def test_a_message_that_is_no_role_and_content_strings_is_refused_not_scored_as_its_repr(
    message: Any, error: str
) -> None:
    # Before: str() of the content was sent, so an assistant turn with content None (only tool calls) was scored
    # as the text "None" and OpenAI-style content parts as their Python repr, with no error (the HTTP shim refuses
    # both); a message that is no object failed with a TypeError or KeyError.
    with pytest.raises(ValueError, match=error):
        to_item([USER, message])
    with pytest.raises(ValueError, match=error):
        to_pair({"conversation": [], "chosen": [USER, message], "rejected": "b"})
    with RewardClient("127.0.0.1:1") as rm:
        rm.stub = RecordingStub()  # type: ignore[assignment]
        with pytest.raises(ValueError, match=error):
            rm.score([[USER, {"role": "assistant", "content": "fine"}], [USER, message]])
        assert rm.stub.requests == []  # type: ignore[attr-defined]


def test_score_items_names_the_line_of_a_message_that_is_no_strings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: the line was scored as {"role": "assistant", "content": "None"} and the run ended 0.
    stub = RecordingStub()

    class Client(RewardClient):
        def __init__(self, address: str, **kwargs: Any) -> None:
            super().__init__(address, **kwargs)
            self.stub = stub  # type: ignore[assignment]

    monkeypatch.setattr(cli, "RewardClient", Client)
    src = tmp_path / "items.jsonl"
    lines = [
        [USER, {"role": "assistant", "content": "a"}],
        {"messages": [USER, {"role": "assistant", "content": None}]},
    ]
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert cli.main(["--address", "127.0.0.1:1", "items", str(src), "-o", str(tmp_path / "out.jsonl")]) == 2
    assert "synpref score: line 2: message 1 content must be a string, got NoneType" in capsys.readouterr().err
    assert all(m.content != "None" for r in stub.requests for item in r.items for m in item.conversation.messages)


class HungStream:
    """A ScoreStream whose server never answers the first stream; later streams answer 7.0."""

    def __init__(self, hung: bool, sent: asyncio.Event) -> None:
        self.hung, self.sent, self.cancelled = hung, sent, False

    async def write(self, request: Any) -> None:
        self.sent.set()

    async def read(self) -> Any:
        if self.hung:
            await asyncio.Event().wait()  # until cancelled
        return reward_pb2.ScoreResponse(rewards=[7.0])

    def done(self) -> bool:
        return self.cancelled

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class HungStub:
    def __init__(self) -> None:
        self.sent = asyncio.Event()
        self.streams: list[HungStream] = []

    def ScoreStream(self, wait_for_ready: bool = False) -> HungStream:
        self.streams.append(HungStream(not self.streams, self.sent))
        return self.streams[-1]


def test_a_session_calls_timeout_bounds_its_wait_for_the_turn() -> None:
    # Before: a call waited for the session's turn without a bound, so behind a call to a hung scorer with a 5 s
    # timeout, a call with a 0.2 s timeout returned after 5 s: an RL worker's reward deadline did not hold.
    async def calls() -> tuple[float, Any, list[float]]:
        stub = HungStub()
        session = ScoreSession(stub, "", _Policy(10.0, 4, 0.001, 0.01, 256), address="test")  # type: ignore[arg-type]
        first = asyncio.ensure_future(session.score(["slow"], timeout=5.0))
        await stub.sent.wait()  # the first call holds the turn, waiting for its answer
        t0 = time.monotonic()
        try:
            quick: Any = await session.score(["quick"], timeout=0.2)
        except grpc.aio.AioRpcError as exc:
            quick = exc.code()
        waited = time.monotonic() - t0
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        return waited, quick, await session.score(["next"], timeout=5.0)  # the turn was handed back, not kept

    waited, quick, after = asyncio.run(asyncio.wait_for(calls(), 20))
    assert waited < 1.0, f"a call with a 0.2 s timeout took {waited:.1f} s"
    assert quick == grpc.StatusCode.DEADLINE_EXCEEDED and after == [7.0]
