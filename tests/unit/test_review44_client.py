"""Session 44's review of the RL-side client, on real gRPC servers on loopback: a call on the connection to a scorer
that vanished without closing it (its node lost, a partition) timed out, and so did every later call sent there,
as the channel kept the connection; and a call that waited out an unreachable scorer failed with gRPC's bare
"Deadline Exceeded", naming neither the address nor the error it waited out."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from synpref.client import AsyncRewardClient, RewardClient
from synpref.client import client as client_module
from synpref.services.scorer.servicer import SERVICE_NAME
from synpref.v1 import reward_pb2

SCALE = 10
"""The keepalive options and the clients' default 60 s timeout, all divided by this, so the test takes seconds."""
TIMEOUT_S = 60.0 / SCALE
PING_OPTIONS = {"grpc.keepalive_time_ms", "grpc.keepalive_timeout_ms", "grpc.http2.ping_timeout_ms"}


def _score(request: reward_pb2.ScoreRequest, context: Any) -> reward_pb2.ScoreResponse:
    return reward_pb2.ScoreResponse(rewards=[float(len(item.text)) for item in request.items])


def _stream(requests: Iterator[reward_pb2.ScoreRequest], context: Any) -> Iterator[reward_pb2.ScoreResponse]:
    for request in requests:
        yield _score(request, context)


@pytest.fixture
def scorer() -> Iterator[int]:
    """A RewardService whose reward of a text item is its length; yields its port."""
    server = grpc.server(futures.ThreadPoolExecutor(4))
    codec = {
        "request_deserializer": reward_pb2.ScoreRequest.FromString,
        "response_serializer": reward_pb2.ScoreResponse.SerializeToString,
    }
    handlers = {
        "Score": grpc.unary_unary_rpc_method_handler(_score, **codec),
        "ScoreStream": grpc.stream_stream_rpc_method_handler(_stream, **codec),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


class Proxy:
    """Forwards loopback connections to `port`. vanish() makes the scorer behind the connections open now vanish:
    what is sent on them is dropped, and they are neither closed nor reset. Later connections forward."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        self.vanished: list[threading.Event] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.port))
            except OSError:  # closed, or the scorer stopped
                return
            gone = threading.Event()
            self.sockets += [downstream, upstream]
            self.vanished.append(gone)
            for a, b in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(a, b, gone), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket, gone: threading.Event) -> None:
        try:
            while data := a.recv(65536):
                if not gone.is_set():
                    b.sendall(data)
            b.shutdown(socket.SHUT_WR)
        except OSError:  # closed
            pass

    def vanish(self) -> None:
        for gone in self.vanished:
            gone.set()

    def close(self) -> None:
        self.listener.close()
        for s in self.sockets:
            s.close()


@pytest.fixture
def proxy(scorer: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[Proxy]:
    scaled = [(k, v // SCALE if k in PING_OPTIONS else v) for k, v in client_module.CHANNEL_OPTIONS]
    monkeypatch.setattr(client_module, "CHANNEL_OPTIONS", scaled)
    p = Proxy(scorer)
    yield p
    p.close()


def test_a_call_to_a_replica_that_vanished_is_retried_elsewhere_within_its_timeout(proxy: Proxy) -> None:
    # Before: the channel had no keepalive, so it kept the dead connection (the kernel gives up on one after about
    # 15 min): this call and every later one sent there failed DEADLINE_EXCEEDED after its whole timeout.
    with RewardClient(proxy.address, timeout=TIMEOUT_S) as rm:
        assert rm.score(["ab"]) == [2.0]
        proxy.vanish()
        assert rm.score(["abc"]) == [3.0]  # before: DEADLINE_EXCEEDED
        assert rm.score(["abcd"]) == [4.0]
    assert len(proxy.vanished) == 2


def test_a_session_on_a_replica_that_vanished_scores_on_a_new_stream_within_its_timeout(proxy: Proxy) -> None:
    # Before: the session's new stream went to the dead connection again, and timed out again.
    async def main() -> list[list[float]]:
        async with AsyncRewardClient(proxy.address, timeout=TIMEOUT_S) as c, c.stream() as session:
            first = await session.score(["ab"])
            proxy.vanish()
            return [first, await session.score(["abc"]), await session.score(["abcd"])]  # before: DEADLINE_EXCEEDED

    assert asyncio.run(asyncio.wait_for(main(), 4 * TIMEOUT_S)) == [[2.0], [3.0], [4.0]]


@pytest.fixture
def refused() -> Iterator[str]:
    """A loopback address that refuses connections (bound, not listening)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def mute() -> Iterator[str]:
    """A loopback address that accepts connections and never answers (a port that is no gRPC server)."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        yield f"127.0.0.1:{s.getsockname()[1]}"


def test_a_call_that_timed_out_waiting_for_an_unreachable_scorer_names_it_and_why(refused: str) -> None:
    # Before: DEADLINE_EXCEEDED "Deadline Exceeded" after the whole timeout: the connection refused, which the
    # retries waited out, was lost, and the error read as a scorer too slow to answer.
    with RewardClient(refused, timeout=0.5, backoff_s=0.01) as rm, pytest.raises(grpc.RpcError) as err:
        rm.score(["x"])
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert f"no answer from {refused} within the call's timeout, waiting after UNAVAILABLE: " in err.value.details()

    async def call() -> grpc.RpcError:
        async with AsyncRewardClient(refused, timeout=0.5, backoff_s=0.01) as c:
            with pytest.raises(grpc.RpcError) as err:
                await c.score_pairs([{"chosen": "a", "rejected": "b"}])
            return err.value

    error = asyncio.run(asyncio.wait_for(call(), 10))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert f"no answer from {refused} within the call's timeout, waiting after UNAVAILABLE: " in error.details()


def test_a_call_to_a_scorer_that_never_answers_names_its_address(mute: str) -> None:
    with RewardClient(mute, timeout=0.5) as rm, pytest.raises(grpc.RpcError) as err:
        rm.score(["x"])
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert err.value.details() == f"Deadline Exceeded: no answer from {mute} within the call's timeout"


def test_errors_other_than_the_deadline_are_raised_as_grpc_gave_them(refused: str) -> None:
    with RewardClient(refused, timeout=5, retries=0) as rm, pytest.raises(grpc.RpcError) as err:
        rm.score(["x"])
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and refused in err.value.details()
