"""Models served by name (e.g. `gold`, `best`), each with its own batcher, hot-swappable.

`reload(name, path, version)` loads the new checkpoint off the event loop while the old
one keeps serving, swaps the name to it in one step, then drains the old batcher: requests
already queued on the old version finish on it, new ones go to the new version, and none
fails because of the swap. The swap is exposed as `POST /admin/reload` on the admin port
(admin.py, behind a token) and is callable in process by a controller. At most
`max_models` names are served; `unload(name)` frees one. With none served, a request fails
with NotReady (UNAVAILABLE: retry) while one is loading, else NoModel (FAILED_PRECONDITION).

Tokenizing is bounded too: at most `max_encode_queue` requests are being read or tokenized at
once (EncodeQueue; beyond it Overloaded), and an encode checks the request's deadline, and
whether its caller is still waiting, before each item. A small request (at most
INLINE_ENCODE_BYTES of message, an HTTP body once inflated; the common single-item call of an RL
rollout) is tokenized on the event loop itself: that takes a few hundred microseconds, less than the hand-off to an
encoding thread and back cost in CPU (docs/scorer.md, serving overhead); while the model's
forward runs, at its end, with the others that arrived meanwhile (Batcher.score_encoding).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synpref.services.scorer.backends import Backend, make_backend
from synpref.services.scorer.batcher import Batcher, BatchResult
from synpref.services.scorer.encoding import Encoder
from synpref.services.scorer.errors import (
    DeadlineExceeded,
    NoModel,
    NotReady,
    Overloaded,
    TooManyModels,
    UnknownModel,
)
from synpref.services.scorer.metrics import ScorerMetrics
from synpref.shared.config import ModelRef, ScorerSettings
from synpref.v1 import reward_pb2

log = logging.getLogger(__name__)

BackendFactory = Callable[[str, str, str, str, int, bool], Backend]
ENCODE_THREADS = min(4, os.cpu_count() or 1)
INLINE_ENCODE_BYTES = 16_384
"""Requests up to this size are tokenized on the event loop (about 1 ms at most); larger ones on
the encoding threads, so that one big request does not stall every other caller."""
Check = Callable[[], None]
"""Called by an encode before each item: raises DeadlineExceeded once the request expired or
its caller stopped waiting, so the encoding threads drop abandoned work."""
Encode = Callable[["ServedModel", Check], list[list[int]]]
NO_MODEL = (
    "no model is loaded: models arrive by a reload on the scorer's admin port (POST /admin/reload; "
    "the controller sends one after training), by scorer.models_file (the controller writes it), or when a "
    "checkpoint appears at a path in scorer.models"
)


class EncodeQueue:
    """Counts requests being read or tokenized; a request beyond `capacity` is refused
    (HTTP 429 / RESOURCE_EXHAUSTED) instead of queueing without bound. Event-loop only."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.pending = 0

    def check(self) -> None:
        """Overloaded when all `capacity` slots are taken."""
        if self.pending >= self.capacity:
            raise Overloaded(
                f"{self.pending} requests are being read or tokenized (max_encode_queue={self.capacity}): retry later"
            )

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one encoding slot for the block; Overloaded when all `capacity` slots are taken."""
        self.check()
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1


@dataclass
class ServedModel:
    """One loaded model version as served: its name, checkpoint id, version, backend, encoder and batcher."""

    name: str
    model_id: str
    version: str
    backend: Backend
    encoder: Encoder
    batcher: Batcher

    def info(self, settings: ScorerSettings) -> reward_pb2.ModelInfo:
        """The model's ModelInfo for Info responses, with the batching limits from `settings` and its own max_length
        (the server's, capped to what the model can embed)."""
        return reward_pb2.ModelInfo(
            name=self.name,
            model_id=self.model_id,
            version=self.version,
            dtype=self.backend.dtype,
            max_length=self.encoder.max_length,
            backend=self.backend.kind,
            max_batch_items=settings.max_batch_items,
            max_batch_tokens=settings.max_batch_tokens,
            tokenizer_sha256=self.encoder.tokenizer_sha256,
        )


def overhead_tokens(settings: ScorerSettings, backend: Backend) -> int:
    """The configured per-forward overhead, or a default by device: on CPU a forward's fixed
    cost is small next to its per-token work (padding dominates); on a GPU kernel launches
    make a forward cost about as much as a couple of thousand tokens."""
    if settings.forward_overhead_tokens:
        return settings.forward_overhead_tokens
    on_gpu = str(getattr(backend, "device", "cpu")).startswith("cuda") or backend.kind == "vllm"
    return 2048 if on_gpu else 32


def version_of(ref: ModelRef) -> str:
    """The ref's version label, else its checkpoint folder's name."""
    return ref.version or Path(ref.path.rstrip("/")).name


def _load_backend(factory: BackendFactory, *args: Any) -> Backend:
    """`factory(*args)`, run on a loader thread. A load that fails after building its model (a checkpoint without a
    trained head fails once its weights are in) left that model in its traceback's frames, and the exception sits in
    reference cycles (asyncio futures, the reload's frames) that only a full gc pass frees, possibly hours later, each
    retry of a models_file entry adding a copy: the frames are cleared here, so the weights are freed at once."""
    try:
        return factory(*args)
    except BaseException as exc:
        seen: set[int] = set()
        chained: BaseException | None = exc
        while chained is not None and id(chained) not in seen:  # the causes' frames hold the model too
            seen.add(id(chained))
            traceback.clear_frames(chained.__traceback__)  # skips this frame, which is still running
            chained = chained.__cause__ or chained.__context__
        raise


def _close_late(load: asyncio.Future[Backend]) -> None:
    """A load its reload gave up on ended after all: free the model, never serve it."""
    if not load.cancelled() and load.exception() is None:
        log.warning("a checkpoint load given up on earlier ended after all: freed, not served")
        load.result().close()


class ModelRegistry:
    """The scorer's served models by name, their hot reload, and the encode-then-batch path of a request.

    Args:
        settings: the scorer section (models, device, batching and queue limits).
        metrics: where batchers and the registry record their metrics.
        backend_factory: builds a Backend from (kind, path, device, dtype, max_length, compile); tests pass fakes.
        on_change: awaited after each swap or unload (the server turns its health with it).

    Tokenizing runs on a small thread pool, bounded by `encode_queue`; a reload swaps a name to
    its new version without failing requests in flight.
    """

    def __init__(
        self,
        settings: ScorerSettings,
        metrics: ScorerMetrics,
        backend_factory: BackendFactory = make_backend,
        on_change: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.backend_factory = backend_factory
        self.on_change = on_change
        self.models: dict[str, ServedModel] = {}
        self.loading: Counter[str] = Counter()
        """How many loads of each name are under way (or, at start-up, about to be). A name stays here
        until the last of its loads ends: two reloads of one name can overlap (the second waits for the
        swap lock), and the first to finish must not make the name read "no model" while the other
        loads. While nothing is served, a request gets NotReady (retry) if one is coming, else NoModel."""
        self._swap_lock = asyncio.Lock()
        self._asked: dict[str, tuple[tuple[str, str], asyncio.Future[ServedModel]]] = {}
        """Each name's last load asked for, by (checkpoint, version), until it ends: a reload of the same joins it."""
        # Tokenizing of requests over INLINE_ENCODE_BYTES runs here, off the event loop, in
        # parallel with the forward thread and with request handling.
        self._encode_pool = ThreadPoolExecutor(max_workers=ENCODE_THREADS, thread_name_prefix="scorer-encode")
        self.encode_queue = EncodeQueue(settings.max_encode_queue)
        self.forward_thread_init: Callable[[], object] | None = None
        """Run first on each model's forward thread: the server's CPU binding, if any (shared/cpus.py)."""
        self._retiring: set[asyncio.Future[None]] = set()
        """Swaps and unloads past their point of no return (health update, old version's drain and
        free): they finish even when their caller is cancelled, and `close` waits for them."""
        self.drain_started = asyncio.Event()
        """Set on shutdown: health turns unavailable while in-flight work finishes, and open
        ScoreStreams end once their messages in flight are answered."""

    def begin_loading(self, name: str) -> None:
        """Count one more load of `name` under way (see `loading`)."""
        self.loading[name] += 1

    def end_loading(self, name: str) -> None:
        """One load of `name` ended; the name leaves `loading` with the last of them."""
        left = self.loading[name] - 1
        if left > 0:
            self.loading[name] = left
        else:
            self.loading.pop(name, None)

    @property
    def draining(self) -> bool:
        """True once `start_draining` was called."""
        return self.drain_started.is_set()

    def start_draining(self) -> None:
        """Shutdown has begun: health turns unavailable and open streams wind down (see `drain_started`)."""
        self.drain_started.set()

    @property
    def default_name(self) -> str:
        """The configured default model if it is served (or nothing is), else the first served one."""
        if self.settings.default_model in self.models or not self.models:
            return self.settings.default_model
        return next(iter(self.models))

    def get(self, name: str = "") -> ServedModel:
        """The served model `name` (empty: the default); UnknownModel if unknown. NotReady while it (or, with
        none served, any model) is loading; with none served and none loading, NoModel."""
        if not self.models:
            if self.loading:
                raise NotReady(f"no model is loaded yet; loading {sorted(self.loading)}: retry shortly")
            raise NoModel(NO_MODEL)
        name = name or self.default_name
        model = self.models.get(name)
        if model is None:
            if name in self.loading:  # configured and loading after the first (start-up loads one at a time)
                raise NotReady(f"model {name!r} is loading: retry shortly")
            raise UnknownModel(f"no model named {name!r} is served; served: {sorted(self.models)}")
        return model

    async def score(
        self, name: str, encode: Encode, deadline: float | None = None, size: int | None = None
    ) -> tuple[ServedModel, BatchResult]:
        """Encode a request with a served model's tokenizer, then score it on that model's
        batcher. A request of known `size` (bytes of its message, an HTTP body inflated) up to INLINE_ENCODE_BYTES is
        encoded on the event loop, any other on the encoding threads. Should the name be
        swapped to a new version while the request was being encoded, it is encoded again
        for the new one, so a reload never fails a request. `deadline` is on the event
        loop's clock (time.monotonic)."""
        loop = asyncio.get_running_loop()
        abandoned = threading.Event()

        def check() -> None:
            if abandoned.is_set():
                raise DeadlineExceeded("the caller stopped waiting")
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("deadline passed before the request was tokenized")

        if size is not None and size <= INLINE_ENCODE_BYTES:
            model = self.get(name)
            check()
            self.encode_queue.check()  # refused alike when the queue is full
            # Tokenized and queued on this model's batcher in one step (at once, or with the others
            # that arrive during its running forward): no swap can come in between.
            return model, await model.batcher.score_encoding(lambda: encode(model, check), deadline)
        for _ in range(3):
            model = self.get(name)
            check()
            with self.encode_queue.slot():
                try:
                    # The deadline bounds the wait for a free encoding thread too: only gRPC cancels a call at its
                    # deadline, and an HTTP request queued behind large ones was answered 504 once a thread took it.
                    async with asyncio.timeout_at(deadline):
                        ids = await loop.run_in_executor(self._encode_pool, encode, model, check)
                except (asyncio.CancelledError, TimeoutError) as exc:
                    abandoned.set()  # the thread stops at its next item, or skips the request
                    if isinstance(exc, TimeoutError):
                        raise DeadlineExceeded("deadline passed before the request was tokenized") from None
                    raise
            if model.name in self.models and self.models[model.name] is not model:
                continue  # swapped meanwhile
            return model, await model.batcher.score(ids, deadline)
        raise NotReady(f"model {name!r} was replaced repeatedly while this request was encoded: retry")

    async def _build(self, name: str, ref: ModelRef) -> ServedModel:
        s = self.settings
        loop = asyncio.get_running_loop()
        # Loading takes seconds to minutes: keep the event loop (and the old version) serving.
        load = loop.run_in_executor(
            None, _load_backend, self.backend_factory, s.backend, ref.path, s.device, s.dtype, s.max_length, s.compile
        )
        # Bounded (scorer.load_timeout_s): a hung load (a stalled network filesystem) held the swap lock, and every
        # later reload waited behind it for ever.
        try:
            await asyncio.wait({load}, timeout=s.load_timeout_s)
        finally:
            if not load.done():  # timed out or cancelled: a thread cannot be stopped, so free what it loads if it ends
                load.add_done_callback(_close_late)
        if not load.done():
            log.error(
                "loading %s from %s took over %g s (scorer.load_timeout_s): abandoned", name, ref.path, s.load_timeout_s
            )
            raise DeadlineExceeded(
                f"loading model {name!r} took over {s.load_timeout_s:g} s (scorer.load_timeout_s; a stalled read or "
                "device start?): abandoned so that other reloads go on; the old version (if any) still serves"
            )
        backend = load.result()
        try:
            max_length = min(s.max_length, getattr(backend, "max_positions", None) or s.max_length)
            if max_length < s.max_length:
                log.warning("model %s embeds at most %d positions: its max_length is %d", name, max_length, max_length)
            encoder = Encoder(backend.tokenizer, max_length, s.on_too_long, s.truncation, s.max_chars_per_token)
            # Hashing a real tokenizer's definition takes a fraction of a second: not on the event loop.
            await loop.run_in_executor(None, lambda: encoder.tokenizer_sha256)
            batcher = Batcher(
                backend.forward,
                max_batch_tokens=s.max_batch_tokens,
                max_batch_items=s.max_batch_items,
                max_wait_ms=s.max_wait_ms,
                max_queue=s.max_queue,
                overhead_tokens=overhead_tokens(s, backend),
                name=name,
                metrics=self.metrics,
                thread_init=self.forward_thread_init,
            )
        except BaseException:  # failed or abandoned (its caller cancelled) after the weights loaded: free them
            backend.close()
            raise
        batcher.start()
        return ServedModel(name, ref.path, version_of(ref), backend, encoder, batcher)

    async def reload(self, name: str, ref: ModelRef) -> ServedModel:
        """Serve `ref` under `name`, replacing (and draining) whatever served it before. A reload of the checkpoint
        and version the name's last load asked for is loading joins that load: the models file's watcher and the
        controller's admin reload of one publish (or a retry of a timed-out one) must not load an 8B model twice."""
        key = (ref.path, version_of(ref))
        asked = self._asked.get(name)
        if asked is not None and asked[0] == key and not asked[1].done():
            try:
                return await asyncio.shield(asked[1])  # this caller leaving does not cancel the other's load
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not asked[1].cancelled() or (current is not None and current.cancelling()):
                    raise
            # The load's own caller left, and took it with it: load it for this one.
        outcome: asyncio.Future[ServedModel] = asyncio.get_running_loop().create_future()
        outcome.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: joiners are optional
        self._asked[name] = (key, outcome)
        try:
            served = await self._load(name, ref)
        except asyncio.CancelledError:
            outcome.cancel()
            raise
        except BaseException as exc:
            outcome.set_exception(exc)
            raise
        finally:
            if name in self._asked and self._asked[name][1] is outcome:
                del self._asked[name]
        outcome.set_result(served)
        return served

    async def _load(self, name: str, ref: ModelRef) -> ServedModel:
        self.begin_loading(name)
        try:
            async with self._swap_lock:
                if name not in self.models and len(self.models) >= self.settings.max_models:
                    raise TooManyModels(
                        f"{len(self.models)} models are served (max_models={self.settings.max_models}): "
                        "unload one first"
                    )
                new = await self._build(name, ref)
                old = self.models.get(name)
                self.models[name] = new  # from here on, new requests go to the new version
                log.info("serving %s = %s (version %s)", name, ref.path, new.version)
        finally:
            self.end_loading(name)
        await self._settle(old)
        return new

    async def unload(self, name: str) -> None:
        """Stop serving `name`: new requests get UnknownModel, queued ones finish."""
        async with self._swap_lock:
            model = self.models.pop(name, None)
        if model is None:
            raise UnknownModel(f"no model named {name!r} is served; served: {sorted(self.models)}")
        log.info("unloading %s", name)
        await self._settle(model)

    async def _settle(self, old: ServedModel | None) -> None:
        """After a swap or unload: update health, then drain and free `old`. Shielded from the caller's
        cancellation (an admin client that timed out while the model loaded): cancelling the drain would
        cancel the old batcher's worker, stranding the requests queued on it and never freeing its model."""
        task = asyncio.ensure_future(self._changed_then_retire(old))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        await asyncio.shield(task)

    async def _changed_then_retire(self, old: ServedModel | None) -> None:
        await self._changed()
        if old is not None:
            await self._retire(old)

    async def _changed(self) -> None:
        self.metrics.models_loaded.set(len(self.models))
        if self.on_change is not None:
            await self.on_change()

    async def _retire(self, model: ServedModel) -> None:
        try:
            await model.batcher.close(drain=True)
        finally:
            model.backend.close()
        log.info("retired %s version %s", model.name, model.version)

    async def close(self, drain: bool = True) -> None:
        """Stop serving: close each model's batcher (draining it if `drain`) and backend, then the encode pool."""
        if self._retiring:  # versions replaced or unloaded just before: their drains finish first
            await asyncio.gather(*self._retiring, return_exceptions=True)
        models, self.models = list(self.models.values()), {}
        for m in models:
            await m.batcher.close(drain=drain)
            m.backend.close()
        self._encode_pool.shutdown(wait=False, cancel_futures=True)
