"""Session 45's review, area D: the held-out split's key counted a system prompt (one user prompt asked under two
system prompts could sit on both sides of a split), the trainer's resume fingerprint left out the pairs' margins
(a resume on other margins mixed two objectives), and a ScoreSession's timeouts did not name the scorer."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from synpref.client import AsyncRewardClient, ScoreSession
from synpref.client.client import _Policy
from synpref.shared.pairs import conversation_key, is_held_out, split_by_conversation
from synpref.training.batching import EncodedPair
from synpref.training.checkpointing import check_data_order, data_order
from synpref.training.reward_config import RewardConfig
from synpref.training.token_store import PairStoreWriter

SINGLE = [{"role": "user", "content": "What is the capital of France?"}]
HH = [
    {"role": "user", "content": "How do I bake bread?"},
    {"role": "assistant", "content": "Mix flour, water and yeast."},
    {"role": "user", "content": "And rye bread?"},
]
# conversation_key before this fix (session 45), for conversations without a system turn: their splits must not move.
SINGLE_KEY = "c2b4eb703a59f9d6cbeaf9722527f2ccbc14741c6a1d28e586185ede184c18d3"
HH_KEY = "7ff2ee67d5d0bde2f496d9f99558eb4b125690d61478658c881beffd13251651"


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def test_a_conversation_without_a_system_turn_keeps_its_key() -> None:
    assert conversation_key(SINGLE) == SINGLE_KEY
    assert conversation_key(HH) == HH_KEY


def test_one_prompt_under_other_system_prompts_lands_on_one_side_of_a_split() -> None:
    # Before: the system message was part of the key, so these were three conversations, split independently.
    asked = [[system(f"You are assistant {s}."), *SINGLE] for s in range(3)] + [SINGLE]
    assert {conversation_key(c) for c in asked} == {SINGLE_KEY}
    assert conversation_key([system("Be brief."), *HH]) == HH_KEY
    prompts = [[{"role": "user", "content": f"question {p}"}] for p in range(40)]
    items = [[system(f"persona {s}"), *c] for c in prompts for s in range(3)]
    kept, held = split_by_conversation(items, lambda c: c, 0.25, seed=3)
    assert held and kept and not {c[-1]["content"] for c in held} & {c[-1]["content"] for c in kept}
    assert all(is_held_out(c, 0.3, 7) == is_held_out(c[1:], 0.3, 7) for c in items)


def test_conversations_of_system_turns_only_keep_apart() -> None:
    # Leaving their system turns out would give every such conversation one key (all held out or none).
    assert conversation_key([system("a")]) != conversation_key([system("b")])


CFG = RewardConfig(model_name_or_path="m", seed=1, global_batch_size=2)
MARGINS = RewardConfig(model_name_or_path="m", seed=1, global_batch_size=2, margin_column="margin")
# data_order before margins were fingerprinted (session 45), for the pairs below: old checkpoints still resume.
OLD_ORDER = {
    "pairs": 2,
    "pair_ids_sha256": "16d1471a074f97da9648b54e7c70f037d2f4c81ae56116b93d40d1392869a1db",
    "seed": 1,
    "global_batch_size": 2,
    "group_by_length": False,
}


def pairs(*margins: float) -> list[EncodedPair]:
    return [EncodedPair([1, 2, 3], [4, 5], margins[0]), EncodedPair([6], [7, 8], margins[1])]


def test_a_margin_free_fingerprint_is_the_one_old_checkpoints_recorded() -> None:
    assert data_order(pairs(0.0, 0.0), CFG) == OLD_ORDER
    assert data_order(pairs(0.0, 0.0), MARGINS) == OLD_ORDER  # a margin column of zeros: the same loss
    assert data_order(pairs(1.0, 2.0), CFG) == OLD_ORDER  # no margin column: the loss leaves margins out


def test_a_resume_on_other_margins_is_refused_naming_them(tmp_path: Any) -> None:
    saved = data_order(pairs(0.5, 1.0), MARGINS)
    writer = PairStoreWriter()
    for p in pairs(0.5, 1.0):
        writer.add(p.chosen, p.rejected, p.margin)
    assert data_order(writer.finish(), MARGINS) == saved
    check_data_order(tmp_path, saved, data_order(pairs(0.5, 1.0), MARGINS))
    # Before: same tokens, same order config, so each of these resumed on another objective.
    for now in (pairs(0.5, 2.0), pairs(0.0, 0.0)):
        with pytest.raises(ValueError, match=r"other data or in another order \(margins_sha256 "):
            check_data_order(tmp_path, saved, data_order(now, MARGINS))
    with pytest.raises(ValueError, match=r"margins_sha256 None -> '[0-9a-f]{64}'"):
        check_data_order(tmp_path, OLD_ORDER, saved)  # a margin-free run's checkpoint, resumed with margins


class Stream:
    """A ScoreStream: `mode` "hang" never answers, "end" ends at once (a draining server), else answers 7.0."""

    def __init__(self, mode: str) -> None:
        self.mode, self.cancelled = mode, False

    async def write(self, request: Any) -> None:
        return None

    async def read(self) -> Any:
        if self.mode == "hang":
            await asyncio.Event().wait()  # until cancelled
        return grpc.aio.EOF

    def done(self) -> bool:
        return self.cancelled

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class Stub:
    def __init__(self, *modes: str) -> None:
        self.modes = list(modes)

    def ScoreStream(self, wait_for_ready: bool = False) -> Stream:
        return Stream(self.modes.pop(0) if len(self.modes) > 1 else self.modes[0])


def session(*modes: str, retries: int = 4) -> ScoreSession:
    return ScoreSession(Stub(*modes), "", _Policy(10.0, retries, 0.001, 0.01, 256), address="scorer-b:50060")  # type: ignore[arg-type]


def raised(call: Any) -> grpc.aio.AioRpcError:
    async def run() -> None:
        await call()

    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(asyncio.wait_for(run(), 10))
    return err.value


def test_a_session_names_its_scorer_in_every_timeout_and_unavailable() -> None:
    # Before: "no answer on the stream within the timeout", "the server ended the stream": which scorer of several?
    hung = raised(lambda: session("hang").score(["x"], timeout=0.2))
    assert hung.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert hung.details() == "no answer from scorer-b:50060 on the stream within the timeout"
    waited = raised(lambda: session("end", "hang").score(["x"], timeout=0.3))
    assert waited.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert waited.details() == (
        "no answer from scorer-b:50060 on the stream within the timeout, "
        "waiting after UNAVAILABLE: the server ended the stream"
    )
    ended = raised(lambda: session("end", retries=2).score(["x"]))
    assert ended.code() == grpc.StatusCode.UNAVAILABLE
    assert ended.details() == "the server ended the stream (stream to scorer-b:50060)"

    async def behind_a_hung_call() -> None:
        s = session("hang")
        first = asyncio.ensure_future(s.score(["slow"], timeout=5.0))
        await asyncio.sleep(0.05)  # the first call holds the turn
        try:
            await s.score(["quick"], timeout=0.2)
        finally:
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)

    turn = raised(behind_a_hung_call)
    assert turn.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert turn.details() == "waited past the timeout for its turn on the stream to scorer-b:50060"


@pytest.fixture
def refused() -> Iterator[str]:
    """A loopback address that refuses connections (bound, not listening)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{s.getsockname()[1]}"


def test_a_session_of_a_client_names_the_clients_address(refused: str) -> None:
    async def call() -> None:
        async with AsyncRewardClient(refused, timeout=0.5) as c, c.stream() as s:
            await s.score(["x"])

    error = raised(call)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and refused in error.details()
