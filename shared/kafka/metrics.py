"""Prometheus metrics of the stage runner, labelled by service.

Defined once per process (prometheus_client refuses duplicates), so several runners
in one process, as in tests, share them and tell themselves apart by the label.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

PROCESSED = Counter(
    "synpref_runner_processed_records", "Input messages handled (emitted, failed or dead-lettered)", ["service"]
)
FAILED = Counter(
    "synpref_runner_failed_records", "Input messages the stage could not process, by kind", ["service", "kind"]
)
DEAD_LETTERED = Counter("synpref_runner_dead_lettered_records", "Messages sent to the dead-letter topic", ["service"])
EMITTED = Counter("synpref_runner_emitted_records", "Records produced, by route", ["service", "route"])
BATCHES = Counter("synpref_runner_batches", "Batches committed", ["service"])
UNAVAILABLE = Counter(
    "synpref_runner_stage_unavailable",
    "Batches put back because a dependency of the stage could not serve",
    ["service"],
)
CONSUMER_LAG = Gauge(
    "synpref_runner_consumer_lag",
    "Messages behind the end of each assigned partition",
    ["service", "topic", "partition"],
)
BATCH_SECONDS = Histogram(
    "synpref_runner_batch_seconds",
    "Time to decode, run the stage, deliver (acked) and commit one polled batch",
    ["service"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)


def report_lag(consumer: Any, service: str) -> None:
    """Set CONSUMER_LAG for every partition `consumer` owns and has a position on."""
    for tp in consumer.assignment():
        highwater = consumer.highwater(tp)
        if highwater is None:
            continue
        try:
            position = consumer.position(tp, timeout_ms=0)
        except Exception:  # no position yet for a partition just assigned: no lag to report
            continue
        if position is not None:
            CONSUMER_LAG.labels(service, tp.topic, str(tp.partition)).set(max(0, highwater - position))


def forget_lag(service: str, revoked: Iterable[Any]) -> None:
    """Drop the lag of partitions another member owns now: theirs to report."""
    for tp in revoked:
        with contextlib.suppress(KeyError):
            CONSUMER_LAG.remove(service, tp.topic, str(tp.partition))
