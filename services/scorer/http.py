"""HTTP shims on aiohttp, sharing the gRPC path's batchers, so RL frameworks point at the
scorer unchanged.

- `POST /get_reward`: OpenRLHF's remote RM protocol (openrlhf/cli/serve_rm.py). Request
  {"query": [rendered text, ...], "prompts": [...], "labels": [...]} (prompts and labels are
  accepted and ignored); answer {"rewards": [...], "scores": [...], "extra_logs": {}}.
  OpenRLHF's remote_rm_fn reads `rewards` (score_key) and newer experience makers also
  `scores` and `extra_logs`. Pad tokens around each query are stripped, as serve_rm does.
- `POST /classify` (and `/v1/classify`): vLLM's classification API. Request {"model",
  "input": str | [str] | [int] | [[int]]} (texts, or token ids of rendered conversations
  made by the model's tokenizer: /info's tokenizer_sha256) or {"model", "messages": [...]};
  answer {"id", "object": "list", "created", "model", "data": [{"index", "label", "probs":
  [reward], "num_classes": 1}], "usage": {...}}. verl's reward loop posts one rendered text
  with "activation": false and reads data[-1]["probs"][-1]. Rewards are raw logits unless the
  request asks for the activation explicitly (the first of "softmax", "activation",
  "use_activation" that is not null, as vLLM reads them; true gives sigmoid).
- A reward that is not a finite number (a model that outputs NaN) is answered as null: JSON has no NaN.
- `GET /health`, `GET /info`, `GET /metrics` (Prometheus). Reloading models is not here:
  it is on the admin port, behind a token (admin.py), so RL code cannot swap its own RM.

A keep-alive connection that has served requests for longer than scorer.max_connection_age_s gets its next
response with `Connection: close` (0 = never), as gRPC connections get GOAWAY: kube-proxy balances connections,
so a client that reconnects may reach a replica the HPA added.

Errors answer {"error": message, "code": status}: 400 bad input, 404 unknown model, 413 body
over max_body_bytes, 429 queue full (with Retry-After), 503 no model loaded (the message says
how models arrive), still loading or draining (Retry-After 10 s while no model is served, else 1),
504 deadline. A body is read only once its request holds an encode-queue slot, so at most max_encode_queue bodies
are in memory being parsed or tokenized, and must arrive by the deadline and within BODY_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from aiohttp import web

from synpref.services.scorer.errors import (
    DeadlineExceeded,
    InvalidInput,
    NotReady,
    PayloadTooLarge,
    ScorerError,
    UnknownModel,
)
from synpref.services.scorer.metrics import ScorerMetrics
from synpref.services.scorer.registry import NO_MODEL, Check, ModelRegistry, ServedModel
from synpref.shared.pairs import sigmoid

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
LABEL = "LABEL_0"  # what transformers names the single class of a num_labels=1 head


T = TypeVar("T")
BODY_TIMEOUT_S = 60.0
"""Longest a request body may take to arrive, whatever the request's deadline (also with none: http_timeout_s
0): a client stalled mid-upload holds one of max_encode_queue slots, which gRPC requests share."""
ACTIVATION_FIELDS = ("softmax", "activation", "use_activation")
"""vLLM's names for applying the activation, in the order it reads them (the first one set decides)."""
MODEL_LABEL = web.RequestKey("synpref_model", str)
"""Where a handler leaves the served name it resolved (from the body), for the metrics label."""


UNSERVED_RETRY_AFTER_S = 10
"""Retry-After of a 503 while no model is served (none yet, or a first load under way): a model arrives by a load,
minutes at 8B, so a client that honours it asks every 10 s instead of every second; other 429s and 503s (a full
queue, a swap, a drain) pass in about a second and keep 1."""


MAX_ERROR_CHARS = 2048
"""An error message is cut to this many characters: messages name what the client sent (a model name, a role), and
a 404 for a body's 30 MB "model" answered those 30 MB back, escaped."""


def _error(status: int, message: str, retry_after_s: int = 1) -> web.Response:
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS] + " [...]"
    headers = {"Retry-After": str(retry_after_s)} if status in (429, 503) else None
    return web.json_response({"error": message, "code": status}, status=status, headers=headers)


async def _json_body(request: web.Request, limit: int) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body has {request.content_length} bytes, more than max_body_bytes={limit}")
    try:
        body = await request.json(loads=json.loads)
    except web.HTTPRequestEntityTooLarge:  # a chunked body that grew past the limit
        raise PayloadTooLarge(f"request body is larger than max_body_bytes={limit}") from None
    except web.RequestPayloadError as exc:  # not in its Content-Encoding (gzip, deflate): the client's error, not a 500
        raise InvalidInput(f"request body does not decode: {' '.join(str(exc).split())}"[:300]) from None
    except (ValueError, LookupError) as exc:  # not JSON (a number past int's digit limit too), or an unknown charset
        raise InvalidInput(f"request body is not valid JSON: {exc}"[:300]) from None
    except RecursionError:
        raise InvalidInput("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object")
    return body


def _texts(value: Any, field: str, max_items: int, accepted: str = "a string or a list of strings") -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidInput(f'"{field}" must be {accepted}')
    return _bounded(value, field, max_items)


def _bounded(items: list[T], field: str, max_items: int) -> list[T]:
    if not items:
        raise InvalidInput(f'"{field}" is empty')
    if len(items) > max_items:
        raise InvalidInput(f'"{field}" has {len(items)} items, more than max_request_items={max_items}')
    return items


def _inputs(value: Any, max_items: int) -> Sequence[str | list[int]]:
    """vLLM's `input`: a text, a list of texts, one token-id list, or a list of token-id lists."""
    if isinstance(value, list) and value and all(_is_id(v) for v in value):
        value = [value]  # one prompt as token ids
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        if not all(v and all(_is_id(x) for x in v) for v in value):
            raise InvalidInput('"input" token ids must be non-empty lists of integers')
        return _bounded(value, "input", max_items)
    if isinstance(value, list) and len({isinstance(v, str) for v in value}) == 2:
        raise InvalidInput('"input" mixes texts and token ids: send one kind per request')
    return _texts(value, "input", max_items, "a string, a list of strings, or token ids ([int] or [[int]])")


def _json_floats(values: Sequence[float]) -> list[float | None]:
    """Rewards for a JSON answer, a non-finite one (a model that outputs NaN) as null: json.dumps writes NaN and
    Infinity bare, which is not JSON, so strict clients lost the request's every reward to one bad item. gRPC
    carries such a reward as it is, also in place."""
    return [v if math.isfinite(v) else None for v in values]


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _activation(body: dict[str, Any]) -> bool:
    """Whether the request asks for sigmoid: the first of ACTIVATION_FIELDS that is not null, as vLLM reads
    them (a client sending every field of vLLM's request has the others null); none set: raw logits."""
    for field in ACTIVATION_FIELDS:
        value = body.get(field)
        if value is None:
            continue
        if not isinstance(value, bool):
            raise InvalidInput(f'"{field}" must be true or false, not {value!r}'[:200])
        return value
    return False


class HttpShims:
    """The HTTP routes of the scorer (see the module docstring), scoring through the registry's batchers.

    Args:
        registry: the served models.
        metrics: request counters and latencies, labelled by model and route.
        max_request_items: most texts per request.
        timeout_s: default request deadline; 0 = none. A request's X-Request-Timeout may only shorten it.
        max_body_bytes: largest request body accepted.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: ScorerMetrics,
        max_request_items: int,
        timeout_s: float = 0.0,
        max_body_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.max_request_items = max_request_items
        self.timeout_s = timeout_s
        self.max_body_bytes = max_body_bytes
        self.stopping = False
        """The server's stop began (its shutdown delay): /health answers 503, as gRPC health says NOT_SERVING."""
        self._first_request: weakref.WeakKeyDictionary[asyncio.BaseTransport, float] = weakref.WeakKeyDictionary()
        """Each open connection's first request time (aiohttp's protocol objects take no weak references)."""

    async def _body(self, request: web.Request, deadline: float | None) -> tuple[dict[str, Any], int]:
        """The JSON body and its size once decompressed, read while holding an encode-queue slot (429 when none is
        free), by the deadline and within BODY_TIMEOUT_S: a client stalled mid-upload must not hold its slot (and
        with max_encode_queue of them, the scorer) for good, also where requests have no deadline. The size, not
        Content-Length, decides whether the body is tokenized on the event loop: aiohttp inflates a gzip body of a
        few KiB on the wire into up to max_body_bytes of text.
        """
        by = asyncio.get_running_loop().time() + BODY_TIMEOUT_S
        with self.registry.encode_queue.slot():
            try:
                async with asyncio.timeout_at(by if deadline is None else min(deadline, by)):
                    body = await _json_body(request, self.max_body_bytes)
                    return body, len(await request.read())  # the bytes json() read, kept by aiohttp
            except TimeoutError:
                raise DeadlineExceeded(
                    f"the request body did not arrive before the request's deadline (or within {BODY_TIMEOUT_S:g} s)"
                ) from None

    def _deadline(self, request: web.Request) -> float | None:
        """The request's deadline on the event loop's clock, as the batcher takes it."""
        timeout = self.timeout_s
        asked = request.headers.get("X-Request-Timeout")
        if asked is not None:
            try:
                value = float(asked)
            except ValueError:
                raise InvalidInput(f"X-Request-Timeout must be seconds, not {asked[:40]!r}") from None
            if not math.isfinite(value) or value <= 0:
                raise InvalidInput(f"X-Request-Timeout must be a positive number of seconds, not {asked[:40]!r}")
            timeout = min(timeout, value) if timeout > 0 else value
        return asyncio.get_running_loop().time() + timeout if timeout > 0 else None

    def app(self) -> web.Application:
        """The aiohttp application with every route of the module docstring."""
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._age_out])
        app.router.add_post("/get_reward", self._wrap("get_reward", self.get_reward))
        app.router.add_post("/classify", self._wrap("classify", self.classify))
        app.router.add_post("/v1/classify", self._wrap("classify", self.classify))
        app.router.add_get("/health", self.health)
        app.router.add_get("/info", self.info)
        app.router.add_get("/metrics", self.metrics_page)
        return app

    @web.middleware
    async def _age_out(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Close a keep-alive connection after its first response past max_connection_age_s (module docstring)."""
        response = await handler(request)
        max_age = self.registry.settings.max_connection_age_s
        if max_age > 0 and (transport := request.transport) is not None:
            now = asyncio.get_running_loop().time()
            if now - self._first_request.setdefault(transport, now) > max_age:
                response.force_close()
        return response

    def _wrap(self, method: str, handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            t0 = time.perf_counter()
            status = 200
            name = request.query.get("model", "")
            label = name if name in self.registry.models else ("unknown" if name else self.registry.default_name)
            try:
                return await handler(request)
            except asyncio.CancelledError:
                status = 499  # the client closed the connection (nginx's code), or the server stops
                raise
            except ScorerError as exc:
                status = exc.http_status
                return _error(status, str(exc), 1 if self.registry.models else UNSERVED_RETRY_AFTER_S)
            except Exception as exc:  # answer JSON, not aiohttp's HTML page
                log.exception("%s failed", method)
                status = 500
                return _error(status, f"internal error: {type(exc).__name__}: {exc}")
            finally:
                label = request.get(MODEL_LABEL, label)
                self.metrics.observe_request(label, method, str(status), time.perf_counter() - t0)

        return wrapped

    def _model(self, request: web.Request, name: str) -> ServedModel:
        """`_find(name)`, whose name labels the request's metrics: a name served by no model as "unknown", as gRPC
        counts it (the default model's label took the 404s of a client's typo)."""
        try:
            model = self._find(name)
        except ScorerError:
            if name:
                request[MODEL_LABEL] = "unknown"
            raise
        request[MODEL_LABEL] = model.name
        return model

    def _find(self, name: str) -> ServedModel:
        """A served model by name; clients that send a checkpoint path (verl sends its
        reward_model.model.path) also match on the served model_id or its folder name. A name that matches
        nothing served while models load is NotReady (503: it may be one of them), as the gRPC service answers."""
        registry = self.registry
        if not name or name in registry.models or name in registry.loading or not registry.models:
            return registry.get(name)
        for m in registry.models.values():
            if name in (m.model_id, m.model_id.rstrip("/").rsplit("/", 1)[-1]):
                return m
        if registry.loading:
            raise NotReady(f"no served model matches {name!r}; loading {sorted(registry.loading)}: retry shortly")
        raise UnknownModel(f"no model named {name!r} is served; served: {sorted(registry.models)}")

    async def get_reward(self, request: web.Request) -> web.Response:
        """OpenRLHF's `POST /get_reward`: raw rewards of the `query` texts, pad tokens around each stripped."""
        deadline = self._deadline(request)
        body, size = await self._body(request, deadline)
        query = body.get("query")
        # An RL step with nothing to score posts an empty list: serve_rm answers empty rewards, and so do we.
        queries = [] if query == [] else _texts(query, "query", self.max_request_items)
        model = self._model(request, str(body.get("model") or request.query.get("model", "")))
        if not queries:
            return web.json_response({"rewards": [], "scores": [], "extra_logs": {}})

        def encode(m: ServedModel, check: Check) -> list[list[int]]:
            ids = []
            for i, q in enumerate(queries):
                check()
                ids.append(m.encoder.text(m.encoder.strip_padding(q), f"query {i}"))
            return ids

        _, result = await self.registry.score(model.name, encode, deadline, size)
        rewards = _json_floats(result.rewards)
        return web.json_response({"rewards": rewards, "scores": rewards, "extra_logs": {}})

    async def classify(self, request: web.Request) -> web.Response:
        """vLLM's `POST /classify`: rewards of `input` texts or token ids, or one `messages` conversation, as raw
        logits unless the request asks for the activation (sigmoid).
        """
        deadline = self._deadline(request)
        body, size = await self._body(request, deadline)
        requested = str(body.get("model") or "")
        model = self._model(request, requested)
        activation = _activation(body)
        messages = body.get("messages")
        if messages is not None:
            if not isinstance(messages, list):
                raise InvalidInput('"messages" must be a list of {role, content} objects')

            def encode(m: ServedModel, check: Check) -> list[list[int]]:
                check()
                return [m.encoder.conversation(messages, "messages")]
        else:
            inputs = _inputs(body.get("input"), self.max_request_items)

            def encode(m: ServedModel, check: Check) -> list[list[int]]:
                ids = []
                for i, x in enumerate(inputs):
                    check()
                    what = f"input {i}"
                    ids.append(m.encoder.text(x, what) if isinstance(x, str) else m.encoder.token_ids(x, what))
                return ids

        _, result = await self.registry.score(model.name, encode, deadline, size)
        values = _json_floats([sigmoid(r) if activation else r for r in result.rewards])
        tokens = result.tokens
        return web.json_response(
            {
                "id": f"classify-{uuid.uuid4().hex}",
                "object": "list",
                "created": int(time.time()),
                "model": requested or model.name,
                "data": [{"index": i, "label": LABEL, "probs": [v], "num_classes": 1} for i, v in enumerate(values)],
                "usage": {
                    "prompt_tokens": tokens,
                    "total_tokens": tokens,
                    "completion_tokens": 0,
                    "prompt_tokens_details": None,
                },
            }
        )

    async def health(self, request: web.Request) -> web.Response:
        """`GET /health`: 200 with the served models when ready, 503 when none is loaded (saying how
        models arrive), stopping or draining."""
        ready = bool(self.registry.models) and not self.registry.draining and not self.stopping
        body: dict[str, Any] = {"status": "ok" if ready else "unavailable", "models": sorted(self.registry.models)}
        if not self.registry.models:
            body["error"] = NO_MODEL
        return web.json_response(body, status=200 if ready else 503)

    async def info(self, request: web.Request) -> web.Response:
        """`GET /info`: each served model's name, id, version, dtype, backend, batch limits and
        tokenizer fingerprint (tokenizer_sha256: whose token ids /classify takes)."""
        s = self.registry.settings
        models = [
            {
                "name": m.name,
                "model_id": m.model_id,
                "version": m.version,
                "dtype": m.backend.dtype,
                "backend": m.backend.kind,
                "max_length": m.encoder.max_length,
                "max_batch_items": s.max_batch_items,
                "max_batch_tokens": s.max_batch_tokens,
                "tokenizer_sha256": m.encoder.tokenizer_sha256,
            }
            for m in self.registry.models.values()
        ]
        return web.json_response({"models": models, "default_model": self.registry.default_name})

    async def metrics_page(self, request: web.Request) -> web.Response:
        """`GET /metrics`: the Prometheus text page."""
        return web.Response(body=self.metrics.render(), content_type="text/plain")
