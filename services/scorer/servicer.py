"""The gRPC RewardService (protos/synpref/v1/reward.proto) on grpc.aio.

A thin shell: validate and encode the request (encoding.py), hand the ids to the model's
batcher, shape the answer. ScorerError subclasses map to status codes (errors.py). Every
call is counted and timed in the metrics.

Requests are parsed by `add_to_server`'s deserializers, which turn a message that does not
parse (corrupt wire format, bad UTF-8 in a string) into a CorruptRequest, answered with
INVALID_ARGUMENT; grpc itself would answer UNKNOWN.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from synpref.services.scorer.batcher import BatchResult
from synpref.services.scorer.errors import InvalidInput, ScorerError
from synpref.services.scorer.metrics import ScorerMetrics
from synpref.services.scorer.registry import Check, ModelRegistry, ServedModel
from synpref.shared.pairs import message_dicts, preference_probability
from synpref.v1 import reward_pb2, reward_pb2_grpc

T = TypeVar("T")
SERVICE_NAME = "synpref.v1.RewardService"
STREAM_IN_FLIGHT = 32
"""Most messages of one ScoreStream read and not yet answered (scoring, or waiting to be sent):
beyond it the stream stops reading and HTTP/2 flow control holds the client's writes, so a client
that writes without reading (or faster than the model scores) cannot grow the server's memory and
the model's queue without bound."""
MAX_DETAILS_BYTES = 2048
"""Most UTF-8 bytes of an error message sent as a status's details. Messages name what the client sent (a model
name, a role); details travel percent-encoded in a trailer, and one over gRPC's metadata limit (16 KiB) failed at
the client as RESOURCE_EXHAUSTED, which clients retry as an overload, instead of the error's own code."""


class CorruptRequest:
    """What the deserializers hand the servicer for bytes that are not a valid message."""

    def __init__(self, type_name: str, error: str) -> None:
        self.message = f"request is not a valid {type_name}: {error}"
        self.model = ""


def _parser(message_type: type[Message]) -> Callable[[bytes], Message | CorruptRequest]:
    def parse(data: bytes) -> Message | CorruptRequest:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return CorruptRequest(message_type.DESCRIPTOR.full_name, str(exc))

    return parse


def _valid(request: object) -> None:
    if isinstance(request, CorruptRequest):
        raise InvalidInput(request.message)


def details(exc: ScorerError) -> str:
    """The error's message as status details, cut to MAX_DETAILS_BYTES of UTF-8."""
    text = str(exc)
    if len(text) * 4 <= MAX_DETAILS_BYTES:  # short enough whatever its characters: no encoding on the way
        return text
    data = text.encode("utf-8", "replace")
    return text if len(data) <= MAX_DETAILS_BYTES else data[:MAX_DETAILS_BYTES].decode("utf-8", "ignore") + " [...]"


def encode_items(model: ServedModel, items: list[reward_pb2.ScoreItem], check: Check) -> list[list[int]]:
    """Token ids of each ScoreItem (a conversation, a text or token ids); InvalidInput for an item with none."""
    ids: list[list[int]] = []
    for i, item in enumerate(items):
        check()
        kind = item.WhichOneof("input")
        if kind == "conversation":
            ids.append(model.encoder.conversation(message_dicts(item.conversation.messages), f"item {i} conversation"))
        elif kind == "token_ids":
            ids.append(model.encoder.token_ids(item.token_ids.ids, f"item {i} token_ids"))
        elif kind == "text":
            ids.append(model.encoder.text(item.text, f"item {i} text"))
        else:
            raise InvalidInput(f"item {i} has no input: a conversation, a text or token_ids")
    return ids


def encode_pairs(model: ServedModel, pairs: list[reward_pb2.PairItem], check: Check) -> list[list[int]]:
    """Two id lists per pair: conversation + chosen, conversation + rejected."""
    ids: list[list[int]] = []
    for i, pair in enumerate(pairs):
        check()
        for side, msgs in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            if not msgs:
                raise InvalidInput(f"pair {i} has no {side} messages")
        conv, chosen, rejected = (message_dicts(m) for m in (pair.conversation, pair.chosen, pair.rejected))
        ids.extend(model.encoder.pair(conv, chosen, rejected, f"pair {i}"))
    return ids


def metadata(model: ServedModel, r: BatchResult) -> reward_pb2.Metadata:
    """The response Metadata of a scored batch: model, version, queue and compute times, tokens, batch size."""
    return reward_pb2.Metadata(
        model=model.name,
        version=model.version,
        queue_ms=r.queue_ms,
        compute_ms=r.compute_ms,
        tokens=r.tokens,
        batch_size=r.batch_size,
    )


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    """The gRPC RewardService over a ModelRegistry; ScorerErrors abort with their status code, and
    every call is counted in the metrics by model, method and status.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: ScorerMetrics,
        max_request_items: int,
        max_stream_in_flight: int = STREAM_IN_FLIGHT,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.max_request_items = max_request_items
        self.max_stream_in_flight = max_stream_in_flight

    def _check_size(self, n: int, what: str) -> None:
        if n == 0:
            raise InvalidInput(f"request has no {what}")
        if n > self.max_request_items:
            raise InvalidInput(
                f"request has {n} {what}, more than max_request_items={self.max_request_items}: split it "
                "(synpref.client chunks large batches for you)"
            )

    @staticmethod
    def _deadline(context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else asyncio.get_running_loop().time() + remaining

    def _label(self, model_name: str) -> str:
        # Unknown names share one label, so clients cannot grow the metric's cardinality.
        if model_name in self.registry.models:
            return model_name
        return "unknown" if model_name else self.registry.default_name

    async def _call(
        self, method: str, model_name: str, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[T]]
    ) -> T:
        t0 = time.perf_counter()
        label = self._label(model_name)
        code = grpc.StatusCode.OK
        try:
            return await work()
        except ScorerError as exc:
            code = exc.code
            await context.abort(exc.code, details(exc))
            raise  # unreachable: abort raises
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.UNKNOWN  # what grpc answers for it; counted OK before
            raise
        finally:
            self.metrics.observe_request(label, method, code.name, time.perf_counter() - t0)

    async def _score(self, request: reward_pb2.ScoreRequest, deadline: float | None) -> reward_pb2.ScoreResponse:
        _valid(request)
        self._check_size(len(request.items), "items")
        items = list(request.items)
        model, r = await self.registry.score(
            request.model, lambda m, check: encode_items(m, items, check), deadline, request.ByteSize()
        )
        return reward_pb2.ScoreResponse(rewards=r.rewards, metadata=metadata(model, r))

    async def Score(
        self, request: reward_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> reward_pb2.ScoreResponse:
        """Raw rewards of the request's items, in order."""
        return await self._call("Score", request.model, context, lambda: self._score(request, self._deadline(context)))

    async def ScorePairs(
        self, request: reward_pb2.ScorePairsRequest, context: grpc.aio.ServicerContext
    ) -> reward_pb2.ScorePairsResponse:
        """Both rewards of each pair and p = sigmoid(r_chosen - r_rejected)."""

        async def work() -> reward_pb2.ScorePairsResponse:
            _valid(request)
            self._check_size(len(request.pairs) * 2, "pair sides")
            pairs = list(request.pairs)
            model, r = await self.registry.score(
                request.model,
                lambda m, check: encode_pairs(m, pairs, check),
                self._deadline(context),
                request.ByteSize(),
            )
            scores = [
                reward_pb2.PairScore(reward_chosen=c, reward_rejected=j, p=preference_probability(c, j))
                for c, j in zip(r.rewards[0::2], r.rewards[1::2], strict=True)
            ]
            return reward_pb2.ScorePairsResponse(scores=scores, metadata=metadata(model, r))

        return await self._call("ScorePairs", request.model, context, work)

    async def ScoreStream(
        self, request_iterator: AsyncIterator[reward_pb2.ScoreRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[reward_pb2.ScoreResponse]:
        """Score each message as it arrives (so they batch with everything else in flight);
        answer in request order. A bad message ends the stream with its status. When the
        server starts draining, the stream stops reading, answers what it has read and ends
        with OK: a client (ScoreSession) then opens a new stream, on another server, instead
        of holding this one open for the whole grace period. At most `max_stream_in_flight`
        messages are read and unanswered at a time. Counted in the metrics under the model the
        first message names."""
        deadline = self._deadline(context)
        pending: asyncio.Queue[asyncio.Future[reward_pb2.ScoreResponse] | None] = asyncio.Queue()
        in_flight = asyncio.Semaphore(self.max_stream_in_flight)
        first_model: str | None = None

        async def read() -> None:
            nonlocal first_model
            try:
                await in_flight.acquire()  # a slot for the next message, released once its answer is sent
                async for request in request_iterator:
                    if first_model is None:
                        first_model = request.model
                    pending.put_nowait(asyncio.ensure_future(self._score(request, deadline)))
                    await in_flight.acquire()
            finally:
                pending.put_nowait(None)

        async def stop_reading_on_drain() -> None:
            await self.registry.drain_started.wait()
            reader.cancel()

        reader = asyncio.ensure_future(read())
        watcher = asyncio.ensure_future(stop_reading_on_drain())
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            while (task := await pending.get()) is not None:
                try:
                    response = await task
                except ScorerError as exc:
                    code = exc.code
                    await context.abort(exc.code, details(exc))
                yield response
                in_flight.release()
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            if code == grpc.StatusCode.OK:  # not the abort of a ScorerError above
                code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            reader.cancel()
            watcher.cancel()
            while not pending.empty():
                left = pending.get_nowait()
                if left is not None:
                    left.cancel()
            label = self._label(first_model or "")
            self.metrics.observe_request(label, "ScoreStream", code.name, time.perf_counter() - t0)

    async def Info(self, request: reward_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> reward_pb2.InfoResponse:
        """Info on the named model, or on every served model when none is named."""

        async def work() -> reward_pb2.InfoResponse:
            _valid(request)
            s = self.registry.settings
            if request.model:
                models = [self.registry.get(request.model).info(s)]
            else:
                models = [m.info(s) for m in self.registry.models.values()]
            return reward_pb2.InfoResponse(models=models, default_model=self.registry.default_name)

        return await self._call("Info", request.model, context, work)


def _handler(
    kind: Callable[..., grpc.RpcMethodHandler],
    method: Callable[..., object],
    request: type[Message],
    response: type[Message],
) -> grpc.RpcMethodHandler:
    """A method handler of `kind` (grpc.unary_unary_rpc_method_handler, ...) whose deserializer does not throw."""
    return kind(method, request_deserializer=_parser(request), response_serializer=response.SerializeToString)


def add_to_server(servicer: RewardServicer, server: grpc.aio.Server) -> None:
    """reward_pb2_grpc.add_RewardServiceServicer_to_server, with deserializers that do not throw."""
    unary, stream = grpc.unary_unary_rpc_method_handler, grpc.stream_stream_rpc_method_handler
    handlers = {
        "Score": _handler(unary, servicer.Score, reward_pb2.ScoreRequest, reward_pb2.ScoreResponse),
        "ScorePairs": _handler(unary, servicer.ScorePairs, reward_pb2.ScorePairsRequest, reward_pb2.ScorePairsResponse),
        "ScoreStream": _handler(stream, servicer.ScoreStream, reward_pb2.ScoreRequest, reward_pb2.ScoreResponse),
        "Info": _handler(unary, servicer.Info, reward_pb2.InfoRequest, reward_pb2.InfoResponse),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
