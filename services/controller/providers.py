"""Human verification, pluggable: who labels the Stage-1 gold candidates.

A provider takes records and returns them decided, routed "verified" (KEEP, or FLIP when
the humans preferred the rejected side; chosen is then what they preferred) or
"discarded" (they could not decide). The decision itself is the desk's pure function
(services/desk/core.decide), so every provider decides the same way from its verdicts.

- DeskHumans: the web desk (services/desk), served while the loop waits for verdicts.
- TerminalHumans: a prompt on this terminal, candidates in random order.
- FileHumans (study only): verdicts read from a JSONL file.
- OracleHumans (study only): the source's own labels, as recorded at ingest. This is a
  simulation of perfect annotators, never a real human.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, TextIO

from synpref.services.controller.simulated import label_is_true
from synpref.services.controller.state import StepVerdicts, key_of
from synpref.services.desk.core import decide
from synpref.shared.pairs import now, swap_preference
from synpref.v1.pair_pb2 import (
    PREFERENCE_ABSTAIN,
    PREFERENCE_CHOSEN,
    PREFERENCE_REJECTED,
    HumanVerdict,
    PairRecord,
)

Routed = list[tuple[str, PairRecord]]


class HumanInputEnded(RuntimeError):
    """The humans' input ended with pairs still to decide (a terminal whose stdin closed or was never one)."""


PREFERENCES = {"chosen": PREFERENCE_CHOSEN, "rejected": PREFERENCE_REJECTED, "abstain": PREFERENCE_ABSTAIN}


class HumanProvider(Protocol):
    """Who verifies the Stage-1 gold candidates (and the seed) for the curation loop.

    `name` says which provider it is; `review` returns every record decided by
    services/desk/core.decide, routed "verified" or "discarded". A provider whose verdicts
    arrive one by one sets `journals = True` and takes `review(records, journal=...)`: it calls
    `journal.record(route, record)` as each is decided, so the controller keeps it durably at
    once (state.StepVerdicts); the others' verdicts are kept when `review` returns.
    """

    name: str

    def review(self, records: list[PairRecord]) -> Routed:
        """Decide every record (same order); route "verified" or "discarded"."""
        ...


def _decide_all(records: list[PairRecord], annotator: str, prefs: Sequence[int], note: str = "") -> Routed:
    out = []
    for record, pref in zip(records, prefs, strict=True):
        verdict = HumanVerdict(annotator=annotator, preference=pref, note=note, at=now())  # type: ignore[arg-type]
        out.append(decide(record, [verdict]))
    return out


class OracleHumans:
    """Study only: the labels the source gave (perfect annotators), not a person."""

    name = "oracle (study only)"

    def review(self, records: list[PairRecord]) -> Routed:
        """Decide each record by the source's own label; ValueError for a record that carries none."""
        prefs = []
        for record in records:
            truth = label_is_true(record)
            if truth is None:
                raise ValueError(f"pair {record.pair.id} carries no source label: the oracle needs a study run")
            prefs.append(PREFERENCE_CHOSEN if truth else PREFERENCE_REJECTED)
        return _decide_all(records, "oracle", prefs, "oracle: source label (study only)")


class FileHumans:
    """Study only: verdicts from JSONL lines {"id": pair id, "preferred": "chosen"|"rejected"|"abstain"}.

    "chosen"/"rejected" are relative to the pair as it is listed (its id is the content id
    of that orientation); a pair listed by its ingest id and flipped since (a study's label noise) gets the
    verdict turned. A pair missing from the file is abstained on, so it is discarded.
    """

    name = "labels file (study only)"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.labels: dict[str, int] = {}
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("preferred") not in PREFERENCES:
                raise ValueError(f"{self.path}:{n}: preferred must be one of {sorted(PREFERENCES)}")
            self.labels[str(row["id"])] = PREFERENCES[row["preferred"]]

    def review(self, records: list[PairRecord]) -> Routed:
        """Decide each record by the file's verdict for its id, or for its ingest id (the other orientation: the
        verdict turns with it); a pair the file lists under neither is abstained on."""
        return _decide_all(records, f"file:{self.path.name}", [self._preference(r) for r in records])

    def _preference(self, record: PairRecord) -> int:
        if record.pair.id in self.labels:
            return self.labels[record.pair.id]
        # A file written from the source lists a pair by its ingest id; the study's label noise flipped some pairs
        # since, under a new id. Missed, they were abstained on and discarded: the very pairs curation should repair.
        ingest_id = key_of(record)
        if ingest_id != record.pair.id and ingest_id in self.labels:
            return swap_preference(self.labels[ingest_id])  # type: ignore[arg-type]
        return PREFERENCE_ABSTAIN


class TerminalHumans:
    """Ask on a terminal: the two responses as Candidate 1/2 in random order; 1, 2 or 0 (cannot decide)."""

    name = "terminal"
    journals = True

    def __init__(self, stdin: TextIO | None = None, stdout: TextIO | None = None, seed: int = 0) -> None:
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.rng = random.Random(seed)

    def _ask(self, record: PairRecord, i: int, n: int) -> int:
        w = self.stdout
        pair = record.pair
        swapped = self.rng.random() < 0.5
        first, second = (pair.rejected, pair.chosen) if swapped else (pair.chosen, pair.rejected)
        w.write(f"\n=== pair {i}/{n} ({pair.id[:12]}) ===\n")
        for m in pair.conversation:
            w.write(f"[{m.role}] {m.content}\n")
        if record.attributes.annotation_guideline:
            w.write(f"guideline: {record.attributes.annotation_guideline}\n")
        for label, side in (("Candidate 1", first), ("Candidate 2", second)):
            w.write(f"--- {label} ---\n" + "\n".join(m.content for m in side) + "\n")
        while True:
            w.write("Which is better? [1/2, 0 = cannot decide]: ")
            w.flush()
            line = self.stdin.readline()
            if not line:
                # End of input is no human's "cannot decide": abstaining would discard every pair left for good
                # (a run under nohup or in a pod would discard its whole seed). Stop; the answers given are kept.
                w.write("\n")
                raise HumanInputEnded(
                    f"terminal: input ended at pair {i} of {n}; the {i - 1} answers given are kept, the other "
                    f"{n - i + 1} pairs were not decided: run again on a terminal to go on (controller.human: desk "
                    "serves them on the web instead)"
                )
            answer = line.strip()
            if answer in ("0", "1", "2"):
                break
        if answer == "0":
            return PREFERENCE_ABSTAIN
        picked_chosen = (answer == "1") != swapped
        return PREFERENCE_CHOSEN if picked_chosen else PREFERENCE_REJECTED

    def review(self, records: list[PairRecord], journal: StepVerdicts | None = None) -> Routed:
        """Ask about each record in turn on the terminal (each answer goes to `journal` at once); HumanInputEnded
        when the input ends before every record is decided (the answers given are in `journal`)."""
        out = []
        for i, record in enumerate(records, 1):
            routed = _decide_all([record], "terminal", [self._ask(record, i, len(records))])
            if journal is not None:
                journal.record(*routed[0])
            out.extend(routed)
        return out


class DeskHumans:
    """The web desk, embedded: pairs go to its queue; the loop waits until all are decided."""

    name = "desk"
    journals = True

    def __init__(self, settings, poll_s: float = 1.0, timeout_s: float = 24 * 3600.0, log=print) -> None:
        from synpref.services.desk.queues import MemoryReviewQueue, MemoryVerdictSink
        from synpref.services.desk.web import DeskServer, ReviewDesk

        self.queue = MemoryReviewQueue()
        self.sink = MemoryVerdictSink()
        self.desk = ReviewDesk(self.queue, self.sink, settings)
        self.server = DeskServer(self.desk, settings.host, settings.port).start()
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.log = log

    def review(self, records: list[PairRecord], journal: StepVerdicts | None = None) -> Routed:
        """Queue the records at the desk and wait for all their verdicts, polling every `poll_s`; each decided
        pair goes to `journal` as soon as the desk settles it.

        Returns them decided in the given order; TimeoutError when some are still undecided after `timeout_s`.
        """
        if not records:
            return []
        self.queue.push(records)
        self.server.call(self.desk.refill())
        self.log(f"desk: {len(records)} pairs wait for review at {self.server.url}")
        got: dict[str, tuple[str, PairRecord]] = {}
        deadline = time.monotonic() + self.timeout_s
        while len(got) < len(records) and time.monotonic() < deadline:
            self.server.call(self.desk.refill())
            for route, rec in self.sink.drain(min_records=1, timeout_s=self.poll_s).routed:
                got[key_of(rec)] = (route, rec)
                if journal is not None:
                    journal.record(route, rec)
        missing = [r for r in records if key_of(r) not in got]
        if missing:
            raise TimeoutError(f"desk: {len(missing)} pairs undecided after {self.timeout_s:g}s")
        return [got[key_of(r)] for r in records]

    def close(self) -> None:
        """Stop the desk's web server."""
        self.server.stop()


class KafkaDeskHumans:
    """The desk service in a cluster: candidates go to the review topic, decisions come back.

    The desk (services/desk, Kafka backend) consumes `review` and writes each decided pair to
    `verified` or `discarded`; the loop waits for all of them (humans are slow: hours).
    """

    name = "desk (Kafka)"
    journals = True

    def __init__(self, settings, timeout_s: float = 7 * 24 * 3600.0) -> None:
        from synpref.services.controller.executors import KafkaExecutor

        self.executor = KafkaExecutor(settings, timeout_s)

    def review(self, records: list[PairRecord], journal: StepVerdicts | None = None) -> Routed:
        """Send the records to the review topic and wait for their decisions, in the given order.

        With a `journal` each decision is kept as it is consumed and a retry of the step reads back the
        decisions the desk wrote meanwhile, republishing nothing (KafkaExecutor). A record the desk
        dead-letters is routed "discarded"; TimeoutError when some are not back in `timeout_s`.
        """
        if not records:
            return []
        result = self.executor.run("review", records, journal)
        got = {key_of(r): (route, r) for route, r in result.routed}
        for record, _reason in result.failed:
            got[key_of(record)] = ("discarded", record)
        return [got[key_of(r)] for r in records]


def make_provider(kind: str, labels_file: str = "", desk_settings=None, seed: int = 0) -> HumanProvider:
    """The human provider `kind` names: "oracle", "file" (needs `labels_file`), "terminal" (asks in an
    order drawn from `seed`) or "desk" (served with `desk_settings`); ValueError for any other kind.
    """
    if kind == "oracle":
        return OracleHumans()
    if kind == "file":
        if not labels_file:
            raise ValueError("study.human = file needs study.human_labels_file")
        return FileHumans(labels_file)
    if kind == "terminal":
        return TerminalHumans(seed=seed)
    if kind == "desk":
        return DeskHumans(desk_settings)
    raise ValueError(f"unknown human provider {kind!r}")
