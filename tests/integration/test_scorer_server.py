"""The scorer's gRPC side against a real server on loopback, with tiny random checkpoints
built on the spot (a Qwen3-shaped and a Llama-shaped one, the latter for the BOS trap)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from synpref.client import AsyncRewardClient, RewardClient, TokenIds
from synpref.services.scorer import registry
from synpref.services.scorer.backends import TorchBackend
from synpref.services.scorer.server import SERVICE_NAME, BackgroundScorer
from synpref.shared.config import ModelRef, ScorerSettings
from synpref.shared.pairs import preference_probability
from synpref.v1 import pair_pb2, reward_pb2, reward_pb2_grpc
from testing.numerics import approx_fp32_forward, fp32_forward_tolerance
from testing.tiny import build_tiny_reward_model
from testing.wait import wait_until

pytestmark = pytest.mark.integration
torch.set_num_threads(1)

TOPICS = ["bread", "taxes", "the moon", "a cat", "python", "rain", "music", "chess"]


def conversation(i: int) -> list[dict[str, str]]:
    topic = TOPICS[i % len(TOPICS)]
    return [
        {"role": "user", "content": f"Tell me something about {topic} (question {i})."},
        {"role": "assistant", "content": f"Here is fact number {i} about {topic}: " + "it is nice. " * (i % 5)},
    ]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scorer-ckpts")
    return {
        "qwen": build_tiny_reward_model(root / "qwen", arch="qwen3", seed=1),
        "qwen2": build_tiny_reward_model(root / "qwen2", arch="qwen3", seed=2),
        "llama": build_tiny_reward_model(root / "llama", arch="llama", seed=3),
    }


def settings(ckpts: dict[str, Path], **kw: object) -> ScorerSettings:
    base: dict[str, object] = {
        "port": 0,
        "http_port": 0,
        "metrics_port": 0,
        "models": {"best": ModelRef(path=str(ckpts["qwen"])), "gold": ModelRef(path=str(ckpts["llama"]))},
        "max_wait_ms": 5.0,
    }
    base.update(kw)
    return ScorerSettings(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def scorer(ckpts: dict[str, Path]):
    bg = BackgroundScorer(settings(ckpts, max_request_items=64)).start()
    yield bg
    bg.stop()


@pytest.fixture(scope="module")
def client(scorer: BackgroundScorer):
    with RewardClient(scorer.address, timeout=30) as c:
        yield c


class Reference:
    """logits[0][0] straight from AutoModelForSequenceClassification, one text at a time."""

    def __init__(self, path: Path) -> None:
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()

    def ids(self, messages: list[dict[str, str]]) -> list[int]:
        enc = self.tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
        return list(enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc)

    def reward(self, messages: list[dict[str, str]]) -> float:
        with torch.no_grad():
            return float(self.model(torch.tensor([self.ids(messages)])).logits[0][0])


@pytest.mark.parametrize("name,arch", [("best", "qwen"), ("gold", "llama")])
def test_rewards_match_transformers_logits(client: RewardClient, ckpts: dict[str, Path], name: str, arch: str) -> None:
    ref = Reference(ckpts[arch])
    convs = [conversation(i) for i in range(6)]
    expected = [ref.reward(c) for c in convs]
    rendered = [ref.tok.apply_chat_template(c, tokenize=False) for c in convs]
    # The same texts as conversations, as rendered text, and (Llama) with the BOS stripped
    # (verl) or doubled (a plain tokenizer call on template output): all one reward.
    variants = [convs, rendered]
    if ref.tok.bos_token:
        assert all(r.startswith(ref.tok.bos_token) for r in rendered)
        variants.append([r[len(ref.tok.bos_token) :] for r in rendered])
        variants.append([ref.tok.bos_token + r for r in rendered])
    for items in variants:
        got = client.score(items, model=name)
        # The server's padded batch vs the reference one text at a time: fp32 in another order.
        assert got == approx_fp32_forward(expected)
    assert len(set(round(x, 6) for x in expected)) == len(expected)  # distinct inputs, distinct rewards


@pytest.mark.parametrize("name,arch", [("best", "qwen"), ("gold", "llama")])
def test_token_ids_score_as_their_conversation_after_the_tokenizer_check(
    scorer: BackgroundScorer, client: RewardClient, ckpts: dict[str, Path], name: str, arch: str
) -> None:
    import asyncio

    ref = Reference(ckpts[arch])  # the client's own copy of the model's tokenizer (an RL worker's)
    convs = [conversation(i) for i in range(6)]
    client.check_tokenizer(ref.tok, model=name)
    if name == "best":  # no name: Info lists every model, the check picks the default
        client.check_tokenizer(ref.tok)
    other = Reference(ckpts["llama" if arch == "qwen" else "qwen"]).tok
    with pytest.raises(ValueError, match=f"model {name!r} .* encodes with tokenizer"):
        client.check_tokenizer(other, model=name)
    items = [TokenIds(ref.ids(c)) for c in convs]
    expected = client.score(convs, model=name)
    assert client.score(items, model=name) == approx_fp32_forward(expected)

    async def session() -> list[float]:
        async with AsyncRewardClient(scorer.address, model=name, timeout=30) as c, c.stream() as s:
            return [(await s.score([item]))[0] for item in items]

    assert asyncio.run(session()) == approx_fp32_forward(expected)


def test_small_requests_are_tokenized_on_the_event_loop_large_ones_on_threads(
    scorer: BackgroundScorer, client: RewardClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from synpref.services.scorer import registry, servicer

    threads: list[str] = []
    real = servicer.encode_items

    def spy(*args: object) -> list[list[int]]:
        threads.append(threading.current_thread().name)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(servicer, "encode_items", spy)
    small = client.score([conversation(1)])
    large = client.score(["word " * (registry.INLINE_ENCODE_BYTES // 4)])  # over the bound: to a thread
    assert len(small) == len(large) == 1
    assert threads[0] == "scorer-loop" and threads[1].startswith("scorer-encode"), threads


def test_health_reflection_and_info(scorer: BackgroundScorer, client: RewardClient, ckpts: dict[str, Path]) -> None:
    with grpc.insecure_channel(scorer.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", SERVICE_NAME):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        answer = next(iter(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))))
        names = {s.name for s in answer.list_services_response.service}
        assert SERVICE_NAME in names and "grpc.health.v1.Health" in names
    info = client.info()
    assert info.default_model == "best"
    by_name = {m.name: m for m in info.models}
    assert by_name["best"].model_id == str(ckpts["qwen"]) and by_name["best"].version == "qwen"
    assert by_name["gold"].backend == "torch" and by_name["gold"].dtype == "float32"


def test_health_is_not_serving_until_models_load(ckpts: dict[str, Path]) -> None:
    bg = BackgroundScorer(settings(ckpts)).start(load=False)
    try:
        with grpc.insecure_channel(bg.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            req = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            assert health.Check(req, timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                reward_pb2_grpc.RewardServiceStub(ch).Score(
                    reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(text="hi")]), timeout=5
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            bg.run(bg.server.load())
            assert health.Check(req, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        bg.stop()


def test_a_model_still_loading_is_unavailable_by_name_not_unknown(scorer: BackgroundScorer) -> None:
    # Start-up loads the configured models one at a time: a request naming one not yet served must
    # be retried (UNAVAILABLE / 503), not told it does not exist (NOT_FOUND / 404). Found in review.
    import json
    import urllib.error

    scorer.server.registry.begin_loading("late")
    try:
        with grpc.insecure_channel(scorer.address) as ch, pytest.raises(grpc.RpcError) as err:
            request = reward_pb2.ScoreRequest(model="late", items=[reward_pb2.ScoreItem(text="hi")])
            reward_pb2_grpc.RewardServiceStub(ch).Score(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "'late' is loading" in err.value.details()
        for name in ("late", "/models/late-checkpoint"):  # verl names its checkpoint path
            body = json.dumps({"model": name, "input": "hi"}).encode()
            post = urllib.request.Request(scorer.http_url + "/classify", data=body, method="POST")
            with pytest.raises(urllib.error.HTTPError) as http_err:
                urllib.request.urlopen(post, timeout=10)
            assert http_err.value.code == 503, name
    finally:
        scorer.server.registry.end_loading("late")
    with grpc.insecure_channel(scorer.address) as ch, pytest.raises(grpc.RpcError) as err:
        request = reward_pb2.ScoreRequest(model="late", items=[reward_pb2.ScoreItem(text="hi")])
        reward_pb2_grpc.RewardServiceStub(ch).Score(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND  # nothing loading: it is unknown


def test_a_request_over_the_servers_message_limit_is_not_retried(ckpts: dict[str, Path]) -> None:
    # gRPC refuses it with RESOURCE_EXHAUSTED, the code of a full queue too: the client retried it until
    # its deadline. Found in review.
    bg = BackgroundScorer(settings(ckpts, max_body_bytes=4096)).start()
    try:
        with RewardClient(bg.address, timeout=30, retries=4, backoff_s=0.5) as c:
            sent: list[int] = []
            score = c.stub.Score
            c.stub.Score = lambda request, **kw: sent.append(request.ByteSize()) or score(request, **kw)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                c.score(["x" * 10_000])
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and len(sent) == 1
            assert time.monotonic() - started < 5
            assert c.score(["short"])  # a request within the limit is served
    finally:
        bg.stop()


def test_many_concurrent_clients_get_their_own_results(scorer: BackgroundScorer, ckpts: dict[str, Path]) -> None:
    ref = Reference(ckpts["qwen"])
    n = 48
    expected = {i: ref.reward(conversation(i)) for i in range(n)}
    forwards_before = scorer.server.registry.get("best").batcher.forwards

    def one(i: int) -> tuple[int, float, int]:
        stub = reward_pb2_grpc.RewardServiceStub(channels[i % len(channels)])
        item = reward_pb2.ScoreItem(
            conversation=reward_pb2.Conversation(messages=[pair_pb2.Message(**m) for m in conversation(i)])
        )
        resp = stub.Score(reward_pb2.ScoreRequest(model="best", items=[item]), timeout=30)
        return i, resp.rewards[0], resp.metadata.batch_size

    channels = [grpc.insecure_channel(scorer.address) for _ in range(8)]
    try:
        barrier_pool = ThreadPoolExecutor(max_workers=n)
        results = list(barrier_pool.map(one, range(n)))
        barrier_pool.shutdown()
    finally:
        for ch in channels:
            ch.close()
    scale = max(abs(r) for r in expected.values())
    for i, reward, _ in results:
        assert reward == approx_fp32_forward(expected[i], scale), i  # coalesced batches vs one at a time
    forwards = scorer.server.registry.get("best").batcher.forwards - forwards_before
    assert forwards < n  # coalesced across requests
    assert max(b for _, _, b in results) > 1


def test_score_pairs_and_stream(client: RewardClient, scorer: BackgroundScorer) -> None:
    pairs = [
        {"conversation": conversation(i)[:1], "chosen": conversation(i)[1:], "rejected": f"Short answer {i}."}
        for i in range(5)
    ]
    scores = client.score_pairs(pairs)
    chosen = client.score([p["conversation"] + p["chosen"] for p in pairs])
    rejected = client.score([p["conversation"] + [{"role": "assistant", "content": p["rejected"]}] for p in pairs])
    # ScorePairs batches chosen with rejected, Score each side alone: fp32 in another order.
    scale = max(abs(x) for x in chosen + rejected)
    assert [s.reward_chosen for s in scores] == approx_fp32_forward(chosen, scale)
    assert [s.reward_rejected for s in scores] == approx_fp32_forward(rejected, scale)
    assert all(s.p == preference_probability(s.reward_chosen, s.reward_rejected) for s in scores)  # same doubles

    texts = [f"stream message {i} " * (1 + i % 4) for i in range(12)]
    single = client.score(texts)
    with grpc.insecure_channel(scorer.address) as ch:
        stub = reward_pb2_grpc.RewardServiceStub(ch)
        requests = (reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(text=t)]) for t in texts)
        got = [r.rewards[0] for r in stub.ScoreStream(requests, timeout=30)]
    assert got == approx_fp32_forward(single)  # one request per text vs one batch


def test_async_client_chunks_and_matches_sync(scorer: BackgroundScorer, client: RewardClient) -> None:
    import asyncio

    texts = [f"chunked text {i}" for i in range(150)]  # > max_request_items=64: must be chunked

    async def main() -> list[float]:
        async with AsyncRewardClient(scorer.address, chunk_size=40, timeout=30) as c:
            return await c.score(texts)

    got = asyncio.run(main())
    with RewardClient(scorer.address, chunk_size=50) as small:
        assert got == approx_fp32_forward(small.score(texts))  # chunks of 40 vs 50: other batches
    with RewardClient(scorer.address, chunk_size=1000) as big, pytest.raises(grpc.RpcError) as err:
        big.score(texts)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_request_items=64" in err.value.details()


def test_stream_session_scores_call_after_call_and_recovers_from_a_bad_one(
    scorer: BackgroundScorer, client: RewardClient
) -> None:
    """A ScoreSession answers each call on one stream with the unary call's rewards; a bad
    message ends that stream with INVALID_ARGUMENT and the next call opens a new one."""
    import asyncio

    convs = [conversation(i) for i in range(6)]
    expected = client.score(convs, model="gold")

    async def main() -> tuple[list[list[float]], grpc.StatusCode, list[float], list[float]]:
        async with AsyncRewardClient(scorer.address, timeout=30, model="gold") as c:
            async with c.stream() as session:
                one_by_one = [await session.score([conv]) for conv in convs]
                first_stream = session._call
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await session.score([[{"role": "user", "content": "no response to score"}]])
                again = await session.score(convs[:2])
                assert session._call is not first_stream  # the failed stream was dropped
            # Calls on one session take turns; two sessions run side by side.
            async with c.stream() as a, c.stream() as b:
                both = await asyncio.gather(a.score(convs[:3]), b.score(convs[3:]), a.score(convs[3:]))
        return one_by_one, err.value.code(), again, [x for r in both for x in r]

    one_by_one, code, again, both = asyncio.run(main())
    assert [r[0] for r in one_by_one] == approx_fp32_forward(expected)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert again == approx_fp32_forward(expected[:2])
    assert both == approx_fp32_forward(expected + expected[3:])


@pytest.mark.parametrize(
    "item,fragment",
    [
        (reward_pb2.ScoreItem(), "has no input"),
        (reward_pb2.ScoreItem(text="   "), "empty"),
        (reward_pb2.ScoreItem(token_ids=reward_pb2.TokenIds()), "item 0 token_ids is empty"),
        (reward_pb2.ScoreItem(token_ids=reward_pb2.TokenIds(ids=[5, -1])), "holds id -1, outside"),
        (reward_pb2.ScoreItem(token_ids=reward_pb2.TokenIds(ids=[5, 10**6])), "holds id 1000000, outside"),
        (reward_pb2.ScoreItem(conversation=reward_pb2.Conversation()), "conversation is empty"),
        (
            reward_pb2.ScoreItem(
                conversation=reward_pb2.Conversation(messages=[pair_pb2.Message(role="user", content="q")])
            ),
            "must end with the assistant response",
        ),
        (
            reward_pb2.ScoreItem(
                conversation=reward_pb2.Conversation(messages=[pair_pb2.Message(role="robot", content="q")])
            ),
            "role 'robot'",
        ),
    ],
)
def test_bad_input_is_invalid_argument(scorer: BackgroundScorer, item: reward_pb2.ScoreItem, fragment: str) -> None:
    with grpc.insecure_channel(scorer.address) as ch:
        stub = reward_pb2_grpc.RewardServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(reward_pb2.ScoreRequest(items=[item]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in err.value.details()


def test_empty_request_unknown_model_and_too_long(ckpts: dict[str, Path], client: RewardClient) -> None:
    with grpc.insecure_channel(client.address) as ch:
        stub = reward_pb2_grpc.RewardServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(reward_pb2.ScoreRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        client.score(["x"], model="nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "served: ['best', 'gold']" in err.value.details()

    long_text = "word " * 400
    with BackgroundScorer(settings(ckpts, max_length=64, on_too_long="reject")) as bg, RewardClient(bg.address) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.score([long_text])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_length=64" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            c.score([TokenIds([7] * 65)])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_length=64" in err.value.details()
        assert len(c.score(["short", TokenIds([7] * 64)])) == 2
    with BackgroundScorer(settings(ckpts, max_length=64)) as bg, RewardClient(bg.address) as c:
        assert len(c.score([long_text])) == 1  # truncated, scored


def test_overload_answers_resource_exhausted(ckpts: dict[str, Path]) -> None:
    # A long max_wait keeps items queued; the bounded queue then refuses the excess.
    s = settings(ckpts, max_wait_ms=1500.0, max_queue=8, max_batch_items=64)
    with BackgroundScorer(s) as bg, grpc.insecure_channel(bg.address) as ch:
        stub = reward_pb2_grpc.RewardServiceStub(ch)
        req = reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(text=f"t{i}") for i in range(4)])
        futures = [stub.Score.future(req, timeout=30) for _ in range(6)]
        codes = []
        for f in futures:
            try:
                f.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                assert "max_queue=8" in exc.details()
        assert codes.count(grpc.StatusCode.OK) == 2
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 4


@pytest.mark.slow  # two 3 s batching windows: the expired request's and the probe's
def test_deadline_expires_and_items_are_not_computed(ckpts: dict[str, Path]) -> None:
    s = settings(ckpts, max_wait_ms=3000.0)
    with BackgroundScorer(s) as bg, grpc.insecure_channel(bg.address) as ch:
        stub = reward_pb2_grpc.RewardServiceStub(ch)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(text="late")]), timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 2.0
        batcher = bg.server.registry.get("best").batcher
        wait_until(lambda: batcher.depth == 0, 6, "the window to close (after max_wait)")
        # Forwards run one at a time in queue order, so once a later request is scored any forward of the
        # expired item would have been counted already: exactly one forward means it was dropped.
        stub.Score(reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(text="probe")]), timeout=30)
        assert batcher.forwards == 1


def test_stream_session_timeout_drops_the_stream_so_a_late_answer_is_never_the_next_ones(
    ckpts: dict[str, Path],
) -> None:
    import asyncio

    # A lone item waits max_wait (1.5 s) for company: longer than the first call's timeout.
    with BackgroundScorer(settings(ckpts, max_wait_ms=1500.0)) as bg:

        async def main() -> tuple[float, list[float], list[float]]:
            async with AsyncRewardClient(bg.address, timeout=30) as c, c.stream() as session:
                t0 = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await session.score(["the slow one"], timeout=0.3)
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                waited = time.monotonic() - t0
                after = await session.score(["the next one"])
                direct = await c.score(["the slow one", "the next one"])
            return waited, after, direct

        waited, after, direct = asyncio.run(main())
    assert waited < 1.2
    assert direct[0] != direct[1]
    assert after == approx_fp32_forward([direct[1]])


def test_a_draining_server_ends_open_streams_and_the_session_moves_to_the_next_server(
    ckpts: dict[str, Path],
) -> None:
    """An idle ScoreStream does not hold a stopping server for its whole grace period: the
    stream ends with OK, and the session's next call opens a new one on the server now there."""
    import asyncio

    first = BackgroundScorer(settings(ckpts)).start()
    address, port = first.address, first.server.grpc_port

    async def main() -> tuple[list[float], float, list[float]]:
        loop = asyncio.get_running_loop()
        async with AsyncRewardClient(address, timeout=60) as c, c.stream() as session:
            before = await session.score(["drain me"])
            t0 = time.monotonic()
            await loop.run_in_executor(None, first.stop, 20.0)  # grace 20 s
            stopped_in = time.monotonic() - t0
            second = BackgroundScorer(settings(ckpts, port=port)).start()
            try:
                after = await session.score(["drain me"])
            finally:
                await loop.run_in_executor(None, second.stop)
        return before, stopped_in, after

    before, stopped_in, after = asyncio.run(main())
    assert stopped_in < 5.0
    assert after == approx_fp32_forward(before)


def test_client_retries_unavailable_until_server_is_up(ckpts: dict[str, Path]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result: dict[str, object] = {}
    retrying = threading.Event()

    def call() -> None:
        with RewardClient(f"127.0.0.1:{port}", retries=6, backoff_s=0.1, timeout=20) as c:
            pause = c.policy.pause

            def noted_pause(attempt: int, deadline: float) -> float | None:
                retrying.set()
                return pause(attempt, deadline)

            c.policy.pause = noted_pause  # type: ignore[method-assign]
            try:
                result["rewards"] = c.score(["hello"])
            except grpc.RpcError as exc:
                result["error"] = exc.code()

    t = threading.Thread(target=call)
    t.start()
    # The server starts only after the client met UNAVAILABLE and planned a retry.
    assert retrying.wait(20), "the client never retried"
    with BackgroundScorer(settings(ckpts, port=port)):
        t.join(20)
    assert "error" not in result and len(result["rewards"]) == 1  # type: ignore[arg-type]

    with RewardClient(f"127.0.0.1:{port}", retries=2, backoff_s=0.05, timeout=2) as c, pytest.raises(grpc.RpcError):
        c.score(["nobody home"])  # bounded: gives up


@pytest.mark.slow  # loads a second checkpoint while 8 requests wait (about 5 s)
def test_reload_swaps_without_failing_in_flight(ckpts: dict[str, Path]) -> None:
    new = Reference(ckpts["qwen2"])
    conv = conversation(3)
    # A long window: the 8 requests wait on the old batcher until the reload closes it (closing ends the wait).
    s = settings(ckpts, max_wait_ms=5000.0)
    with BackgroundScorer(s) as bg, RewardClient(bg.address, timeout=30) as c:
        old_batcher = bg.server.registry.get("best").batcher
        old_reward = Reference(ckpts["qwen"]).reward(conv)  # asking the server would wait out the window
        with ThreadPoolExecutor(8) as pool:
            in_flight = [pool.submit(c.score, [conv]) for _ in range(8)]
            wait_until(lambda: old_batcher.depth == 8, 4, "8 requests queued on the old version's batcher")
            bg.run(bg.server.registry.reload("best", ModelRef(path=str(ckpts["qwen2"]), version="v2")))
            results = [f.result() for f in in_flight]
        # The server's fp32 forwards vs the reference's: another batch, kernel and thread count.
        assert all(r == approx_fp32_forward([old_reward]) for r in results)
        assert c.score([conv]) == approx_fp32_forward([new.reward(conv)])
        assert {m.name: m.version for m in c.info().models}["best"] == "v2"


def queue_depth(metrics_port: int, model: str = "best") -> float:
    """The scorer's synpref_scorer_queue_depth gauge, read from its Prometheus endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.search(rf'^synpref_scorer_queue_depth{{model="{model}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.slow  # a fresh process imports torch and transformers
def test_sigterm_drains_in_flight_requests(ckpts: dict[str, Path], tmp_path: Path) -> None:
    with socket.socket() as a, socket.socket() as b, socket.socket() as m:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        m.bind(("127.0.0.1", 0))
        port, http_port, metrics_port = a.getsockname()[1], b.getsockname()[1], m.getsockname()[1]
    env = {
        **os.environ,
        # A window long enough to see the requests queued before SIGTERM, well within drain_s (30 s).
        "SYNPREF_SCORER__MAX_WAIT_MS": "3000",
        "SYNPREF_SCORER__METRICS_PORT": str(metrics_port),
        "SYNPREF_SCORER__TORCH_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "synpref.shared.cli", "scorer", "--model", f"best={ckpts['qwen']}"]
    cmd += ["--port", str(port), "--http-port", str(http_port)]
    log = (tmp_path / "scorer.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)

            def serving() -> bool:
                try:
                    request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
                    return health.Check(request, timeout=1).status == health_pb2.HealthCheckResponse.SERVING
                except grpc.RpcError:
                    return False

            wait_until(serving, 60, "the scorer process to serve")
            stub = reward_pb2_grpc.RewardServiceStub(ch)
            req = reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(text="drain me")])
            futures = [stub.Score.future(req, timeout=30) for _ in range(5)]
            wait_until(lambda: queue_depth(metrics_port) == 5, 2.5, "5 requests queued, waiting out max_wait")
            proc.send_signal(signal.SIGTERM)
            rewards = [f.result().rewards[0] for f in futures]
        # One text five times, drained in one batch: one reward up to fp32 rounding between rows.
        assert len(rewards) == 5
        assert max(rewards) - min(rewards) <= fp32_forward_tolerance(max(abs(r) for r in rewards))
        assert proc.wait(30) == 0, (tmp_path / "scorer.log").read_text()[-3000:]
    finally:
        log.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_score_cli(scorer: BackgroundScorer, client: RewardClient, tmp_path: Path) -> None:
    import json

    from synpref.client.cli import main as score_main

    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps(conversation(1)) + "\n" + json.dumps({"text": "rendered text"}) + "\n")
    out = tmp_path / "rewards.jsonl"
    assert score_main(["--address", scorer.address, "items", str(items), "-o", str(out)]) == 0
    got = [json.loads(line)["reward"] for line in out.read_text().splitlines()]
    # The same two items in one request, nothing else in flight: the same forward, exactly;
    # JSON carries a double's repr, which round-trips.
    assert got == client.score([conversation(1), "rendered text"])

    hh = tmp_path / "hh.jsonl"
    rows = [
        {
            "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello, how can I help?",
            "rejected": "\n\nHuman: Hi there\n\nAssistant: Go away.",
        },
        {"chosen": "\n\nHuman: A\n\nAssistant: B", "rejected": "\n\nHuman: C\n\nAssistant: D"},  # no shared prefix
    ]
    hh.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    scored = tmp_path / "scored.jsonl"
    assert score_main(["--address", scorer.address, "pairs", str(hh), "-o", str(scored)]) == 0
    lines = [json.loads(line) for line in scored.read_text().splitlines()]
    assert len(lines) == 1  # the unpairable row is reported, not scored
    conv = [{"role": "user", "content": "Hi there"}]
    expected = client.score_pairs([{"conversation": conv, "chosen": "Hello, how can I help?", "rejected": "Go away."}])[
        0
    ]
    assert lines[0]["p"] == expected.p  # the same pair, alone in its request: the same forward
    assert score_main(["--address", scorer.address, "--model", "nope", "items", str(items)]) == 1


def _affinity_of_threads(prefix: str) -> list[frozenset[int]]:
    return [frozenset(os.sched_getaffinity(t.native_id)) for t in threading.enumerate() if t.name.startswith(prefix)]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: nothing to bind apart")
def test_cpu_binding_puts_forwards_on_their_cpus_and_serving_on_the_others(
    scorer: BackgroundScorer, client: RewardClient, ckpts: dict[str, Path]
) -> None:
    allowed = frozenset(os.sched_getaffinity(0))  # the test's own thread: never bound
    forward = frozenset({max(allowed)})
    client.score([conversation(3)], model="best")
    assert _affinity_of_threads("scorer-best_") == [allowed]  # the default, off: nothing bound
    assert frozenset(os.sched_getaffinity(scorer._thread.native_id)) == allowed

    bound = BackgroundScorer(
        settings(ckpts, cpu_binding=str(max(allowed)), models={"bound": ModelRef(path=str(ckpts["qwen"]))})
    ).start()
    try:
        with RewardClient(bound.address, timeout=30) as c:
            rewards = c.score([conversation(3)])
            c.score(["word " * (registry.INLINE_ENCODE_BYTES // 4)])  # tokenized on an encode thread
        assert rewards == pytest.approx(client.score([conversation(3)], model="best"), rel=1e-5)
        assert _affinity_of_threads("scorer-bound_") == [forward]
        assert frozenset(os.sched_getaffinity(bound._thread.native_id)) == allowed - forward
        encoders = _affinity_of_threads("scorer-encode")
        assert allowed - forward in encoders
    finally:
        bound.stop()


@pytest.mark.slow
def test_scorer_compile_serves_compiled_forwards_that_score_as_eager(ckpts: dict[str, Path]) -> None:
    items = [conversation(i) for i in range(12)]
    only_best = {"best": ModelRef(path=str(ckpts["qwen"]))}
    with BackgroundScorer(settings(ckpts, models=only_best)) as bg, RewardClient(bg.address) as c:
        backend = bg.server.registry.get("best").backend
        assert isinstance(backend, TorchBackend) and not backend.compiled
        eager = c.score(items)
    with BackgroundScorer(settings(ckpts, models=only_best, compile=True)) as bg, RewardClient(bg.address) as c:
        backend = bg.server.registry.get("best").backend
        assert isinstance(backend, TorchBackend) and backend.compiled  # the setting reached the backend
        compiled = c.score(items)
    # Fused kernels sum in another order, and batches form differently between the two runs.
    assert compiled == approx_fp32_forward(eager)
