"""Prometheus metrics of one scorer process.

Each server owns its CollectorRegistry, so several servers (tests, benchmarks) can live
in one process without clashing on the global default registry.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ScorerMetrics:
    """The scorer's Prometheus metrics (requests, latency, items, tokens, batch sizes and padding, queue
    depth, forward time), labelled by model, in their own CollectorRegistry unless one is given.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "synpref_scorer_requests",
            "Requests answered, by API method and status code",
            ["model", "method", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "synpref_scorer_request_seconds",
            "Request latency from arrival to answer",
            ["model", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.items = Counter("synpref_scorer_items", "Items (texts) scored", ["model"], registry=r)
        self.batch_items = Histogram(
            "synpref_scorer_batch_items", "Items per model forward", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_padding = Histogram(
            "synpref_scorer_batch_padding_ratio",
            "Share of a forward's token slots that were padding",
            ["model"],
            buckets=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
            registry=r,
        )
        self.models_loaded = Gauge(
            "synpref_scorer_models_loaded", "Models served now; 0 until one is loaded", registry=r
        )
        self.queue_depth = Gauge("synpref_scorer_queue_depth", "Items waiting for a forward", ["model"], registry=r)
        self.tokens = Counter(
            "synpref_scorer_tokens", "Tokens run through the model (rate() gives tokens/s)", ["model"], registry=r
        )
        self.tokens_per_second = Gauge(
            "synpref_scorer_tokens_per_second", "Tokens/s of the most recent forward", ["model"], registry=r
        )
        self.forward_seconds = Histogram(
            "synpref_scorer_forward_seconds",
            "Time of one model forward",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Counter | Gauge | Histogram, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once: labels() validates and locks on every call,
        and requests and forwards record several metrics each. Label sets are bounded (served
        names, "unknown", methods, codes), so the cache is too."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def observe_request(self, model: str, method: str, code: str, seconds: float) -> None:
        """Count one answered request by model, method and status code, and record its latency."""
        self.child(self.requests, model, method, code).inc()
        self.child(self.latency, model, method).observe(seconds)

    def set_queue_depth(self, model: str, depth: int) -> None:
        """Items of `model` waiting for a forward."""
        self.child(self.queue_depth, model).set(depth)

    def observe_batch(self, model: str, items: int, tokens: int, padded_tokens: int, seconds: float) -> None:
        """Record one model forward: items, real tokens, padding share of `padded_tokens`, time and tokens/s."""
        self.child(self.batch_items, model).observe(items)
        self.child(self.items, model).inc(items)
        self.child(self.tokens, model).inc(tokens)
        self.child(self.forward_seconds, model).observe(seconds)
        if padded_tokens:
            self.child(self.batch_padding, model).observe(1.0 - tokens / padded_tokens)
        if seconds > 0:
            self.child(self.tokens_per_second, model).set(tokens / seconds)

    def render(self) -> bytes:
        """The registry's metrics in the Prometheus text format."""
        return generate_latest(self.registry)
