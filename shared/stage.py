"""The contract between a pure stage function and whatever runs it.

A stage is `Callable[[list[PairRecord]], StageResult]`: a batch in, routed
records out. The same function runs in process (the embedded default) and
inside a Kafka service, where each route name is a field of TopicSettings
("annotated", "curated", "review", ...) mapped to its topic by the runner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from synpref.v1.pair_pb2 import PairRecord


@dataclass
class StageResult:
    """What a stage made of one batch: records routed to output topics, and records that failed."""

    routed: list[tuple[str, PairRecord]] = field(default_factory=list)
    """(route, record) pairs; route names a TopicSettings field."""
    failed: list[tuple[PairRecord, str]] = field(default_factory=list)
    """Inputs the stage could not process, with the reason: they go to the dead-letter topic."""

    def emit(self, route: str, record: PairRecord) -> None:
        """Send `record` to `route` (a TopicSettings field name)."""
        self.routed.append((route, record))

    def fail(self, record: PairRecord, reason: str) -> None:
        """Mark `record` as failed with `reason`; it goes to the dead-letter topic."""
        self.failed.append((record, reason))

    def by_route(self) -> dict[str, list[PairRecord]]:
        """The routed records grouped by route, in emit order."""
        out: dict[str, list[PairRecord]] = {}
        for route, record in self.routed:
            out.setdefault(route, []).append(record)
        return out


Stage = Callable[[list[PairRecord]], StageResult]


class StageUnavailable(RuntimeError):
    """A stage cannot run now for a reason outside its batch: a service it calls has no model loaded
    yet, is down or is shedding load. A Kafka runner reads the batch again after a pause instead of
    dead-lettering records that are not at fault."""


class StageBroken(StageUnavailable):
    """This process cannot do the stage any more, whatever the batch: its device is broken (a CUDA error leaves
    the context failing every later forward until the process ends). A Kafka runner stops on it without
    committing the batch, and the service exits non-zero (shared/service.py), so that Kubernetes restarts the
    container and the batch is read again from the last commit. A StageUnavailable too: whatever knows only that
    (the controller's in-process stages, plan_batch) reads the batch again rather than dead-lettering it."""
