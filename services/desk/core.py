"""The desk's bookkeeping, free of I/O: which pair goes to whom, and what the verdicts decide.

A pair enters with an opaque `handle` (the source's receipt: a Kafka offset, or
nothing). `overlap` annotators label it, each in their own candidate order; once the
last verdict is in, `decide` turns the verdicts into one routed record and the handle
comes back so the shell can acknowledge the source only after the record is written.

Leases: a pair handed to an annotator is theirs for `lease_s`; an unanswered lease
expires and the slot returns to the pool, so an abandoned tab never blocks a pair.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from synpref.services.desk.inbox import pair_id_problem
from synpref.shared.pairs import flipped, message_dicts, now
from synpref.v1.pair_pb2 import (
    Attributes,
    Controversiality,
    Decision,
    DecisionRecord,
    HumanAggregate,
    HumanVerdict,
    Objectivity,
    PairRecord,
    Preference,
)
from synpref.v1.pair_pb2 import Stage as PipelineStage

RULE = "stage1.human"
STEP = "desk"
CHOICES = (0, 1, 2)
"""What an annotator may answer: candidate 1, candidate 2, or 0 for "cannot decide"."""
MAX_NOTE = 2000


class DeskError(Exception):
    """A request the desk refuses; `status` is the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Entry:
    """A pair waiting at the desk: its record, the source handle to ack, arrival order, open assignments and the
    verdicts collected so far (by annotator)."""

    record: PairRecord
    handle: Any
    seq: int
    leases: dict[str, float] = field(default_factory=dict)
    """annotator -> monotonic deadline of an open assignment."""
    assignments: dict[str, str] = field(default_factory=dict)
    """annotator -> the open assignment's id: a verdict names it, so one sent from a page shown before a restart
    (which draws a new Candidate order) is refused (409, shown again) rather than mapped with the new order."""
    verdicts: dict[str, HumanVerdict] = field(default_factory=dict)

    @property
    def pair_id(self) -> str:
        """The pair's id."""
        return self.record.pair.id


@dataclass
class Decided:
    """A settled pair: the route its record goes to, the record with its verdicts, and the handle to ack."""

    route: str
    """"verified" (D_gold) or "discarded"; both are TopicSettings fields."""
    record: PairRecord
    handle: Any


@dataclass
class Summary:
    """A decided pair: what the progress panel shows, and the decision to replay on a redelivery."""

    pair_id: str
    outcome: str
    agreement: float
    verdicts: int
    route: str
    record: PairRecord


def swapped(salt: bytes, annotator: str, pair_id: str) -> bool:
    """Whether this annotator sees `chosen` as Candidate 2 on this pair: random-looking, but fixed."""
    digest = hmac.new(salt, f"{annotator}\0{pair_id}".encode(), hashlib.sha256).digest()
    return bool(digest[0] & 1)


def preference_of(choice: int, is_swapped: bool) -> Preference:
    """Map a candidate number back to the pair's own labels."""
    if choice == 0:
        return Preference.PREFERENCE_ABSTAIN
    picked_chosen = (choice == 1) != is_swapped
    return Preference.PREFERENCE_CHOSEN if picked_chosen else Preference.PREFERENCE_REJECTED


_OPPOSITE = {
    Preference.PREFERENCE_CHOSEN: Preference.PREFERENCE_REJECTED,
    Preference.PREFERENCE_REJECTED: Preference.PREFERENCE_CHOSEN,
}


def aggregate(verdicts: list[HumanVerdict]) -> HumanAggregate:
    """Plurality of the verdicts; a tie at the top, or "cannot decide" on top, abstains."""
    counts: dict[Preference, int] = {}
    for v in verdicts:
        counts[v.preference] = counts.get(v.preference, 0) + 1
    top = max(counts.values())
    leaders = [p for p, c in counts.items() if c == top]
    pref = leaders[0] if len(leaders) == 1 else Preference.PREFERENCE_ABSTAIN
    return HumanAggregate(
        preference=pref,
        agreement=top / len(verdicts),
        verdicts=len(verdicts),
        abstaining=counts.get(Preference.PREFERENCE_ABSTAIN, 0),
    )


def decide(record: PairRecord, verdicts: list[HumanVerdict], at: Timestamp | None = None) -> tuple[str, PairRecord]:
    """The routed record for a fully labelled pair.

    On "verified", chosen is always what the humans preferred: a pair they labelled the
    other way round is flipped (lineage.original_id keeps the old id), and its verdicts
    are restated relative to the emitted orientation. Everything else is "discarded".
    """
    agg = aggregate(verdicts)
    if agg.preference == Preference.PREFERENCE_REJECTED:
        out = flipped(record)
        verdicts = [_restated(v) for v in verdicts]
        agg.preference = Preference.PREFERENCE_CHOSEN
        decision, reason, route = Decision.DECISION_FLIP, "annotators preferred the rejected response", "verified"
    else:
        out = PairRecord()
        out.CopyFrom(record)
        if agg.preference == Preference.PREFERENCE_CHOSEN:
            decision, reason, route = Decision.DECISION_KEEP, "annotators confirmed the label", "verified"
        else:
            split = "cannot decide" if agg.abstaining * 2 > agg.verdicts or agg.verdicts == 1 else "annotators split"
            decision, reason, route = Decision.DECISION_DISCARD, split, "discarded"
    if agg.verdicts > 1:
        reason += f" ({agg.agreement:.0%} agreement over {agg.verdicts})"
    out.human_verdicts.extend(verdicts)
    out.human_aggregate.CopyFrom(agg)
    out.decision.CopyFrom(DecisionRecord(decision=decision, rule=RULE, reason=reason))
    out.lineage.stage = PipelineStage.STAGE_ONE
    out.lineage.steps.append(STEP)
    out.lineage.updated_at.CopyFrom(at or now())
    return route, out


def _restated(v: HumanVerdict) -> HumanVerdict:
    out = HumanVerdict()
    out.CopyFrom(v)
    out.preference = _OPPOSITE.get(v.preference, v.preference)
    return out


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    # proto3 enums are open: a newer producer may send a value this code does not know.
    try:
        return str(enum.Name(value)).removeprefix(prefix).lower()
    except ValueError:
        return str(value)


def _attributes(a: Attributes) -> dict[str, Any]:
    return {
        "task_category": a.task_category,
        "objectivity": _enum_name(Objectivity, a.objectivity, "OBJECTIVITY_"),
        "controversiality": _enum_name(Controversiality, a.controversiality, "CONTROVERSIALITY_"),
        "desired_attributes": list(a.desired_attributes),
        "annotation_guideline": a.annotation_guideline,
    }


def example_view(example_id: str, record: PairRecord | None) -> dict[str, Any]:
    """A retrieved human-verified example: its id, and its content when the desk has it."""
    if record is None:
        return {"id": example_id, "available": False}
    return {
        "id": example_id,
        "available": True,
        "conversation": message_dicts(record.pair.conversation),
        "preferred": message_dicts(record.pair.chosen),
        "other": message_dicts(record.pair.rejected),
        "attributes": _attributes(record.attributes) if record.HasField("attributes") else None,
    }


class DeskCore:
    """Pending pairs, assignments and verdicts. Not thread-safe: one event loop owns it."""

    def __init__(
        self,
        overlap: int = 1,
        lease_s: float = 1800.0,
        salt: bytes | None = None,
        clock: Callable[[], float] = time.monotonic,
        remember: int = 10_000,
    ) -> None:
        if overlap < 1:
            raise ValueError("overlap must be at least 1")
        self.overlap = overlap
        self.lease_s = lease_s
        self.salt = salt if salt is not None else os.urandom(16)
        self.clock = clock
        self._pending: OrderedDict[str, Entry] = OrderedDict()
        self._holding: dict[str, str] = {}
        """annotator -> pair id of their one open assignment (next_for hands out one at a time)."""
        self._seq = 0
        self._remember = remember
        self.decided: OrderedDict[str, Summary] = OrderedDict()
        """Recently decided pairs, oldest first (bounded by `remember`)."""
        self.examples: OrderedDict[str, PairRecord] = OrderedDict()
        """Human-verified records the desk can show as retrieved examples (bounded)."""
        self.done: dict[str, int] = {}
        """annotator -> verdicts given since start."""
        self.outcomes = {"verified": 0, "flipped": 0, "discarded": 0}

    # -- intake --------------------------------------------------------------------------
    def add(self, record: PairRecord, handle: Any = None) -> bool:
        """Queue a pair for review. False for a pair already pending or decided (see `replay`)."""
        pid = record.pair.id
        if problem := pair_id_problem(pid):
            raise DeskError(400, problem)
        if pid in self._pending or pid in self.decided:
            return False
        self._seq += 1
        self._pending[pid] = Entry(record=record, handle=handle, seq=self._seq)
        return True

    def holds(self, pair_id: str, handle: Any) -> bool:
        """Whether the pending pair `pair_id` came with this very handle (a redelivery of its own message)."""
        entry = self._pending.get(pair_id)
        return entry is not None and handle is not None and entry.handle == handle

    def replay(self, pair_id: str, handle: Any = None) -> Decided | None:
        """The earlier decision on a pair that arrives again (a redelivery, or a later iteration).

        Writing it again, rather than dropping the arrival, means every pair sent to review gets
        an answer; downstream deduplicates by pair id. None if the desk has not decided it (or
        no longer remembers it).
        """
        done = self.decided.get(pair_id)
        return None if done is None else Decided(route=done.route, record=done.record, handle=handle)

    def add_example(self, record: PairRecord) -> None:
        """Keep `record` as the newest example, forgetting the oldest beyond `remember`."""
        self.examples[record.pair.id] = record
        self.examples.move_to_end(record.pair.id)
        while len(self.examples) > self._remember:
            self.examples.popitem(last=False)

    @property
    def pending(self) -> int:
        """Number of pairs waiting for verdicts."""
        return len(self._pending)

    # -- assignment ----------------------------------------------------------------------
    def _expire(self) -> None:
        t = self.clock()
        for who, pid in list(self._holding.items()):
            entry = self._pending.get(pid)
            if entry is None or entry.leases.get(who, t) <= t:
                if entry is not None:
                    entry.leases.pop(who, None)
                    entry.assignments.pop(who, None)
                del self._holding[who]

    def _open_slots(self, entry: Entry) -> int:
        return self.overlap - len(entry.verdicts) - len(entry.leases)

    def next_for(self, annotator: str) -> Entry | None:
        """The annotator's open assignment, or a fresh one; None when nothing is left for them."""
        self._expire()
        held = self._holding.get(annotator)
        if held is not None:
            return self._pending[held]
        for entry in self._pending.values():
            if annotator not in entry.verdicts and self._open_slots(entry) > 0:
                entry.leases[annotator] = self.clock() + self.lease_s
                entry.assignments[annotator] = secrets.token_hex(8)
                self._holding[annotator] = entry.pair_id
                return entry
        return None

    def waiting_for(self, annotator: str) -> int:
        """Pairs this annotator could still be given (including an open assignment)."""
        self._expire()
        return sum(
            1
            for e in self._pending.values()
            if annotator in e.leases or (annotator not in e.verdicts and self._open_slots(e) > 0)
        )

    # -- verdicts ------------------------------------------------------------------------
    def submit(
        self, annotator: str, pair_id: str, choice: int, note: str = "", assignment: str | None = None
    ) -> Decided | None:
        """Record a verdict on an assigned pair (the open assignment `assignment`, where given); the routed record
        once the pair is decided."""
        if choice not in CHOICES:
            raise DeskError(400, "choice must be 1, 2 or 0 (cannot decide)")
        if len(note) > MAX_NOTE:
            raise DeskError(400, f"note is longer than {MAX_NOTE} characters")
        self._expire()
        entry = self._pending.get(pair_id)
        if entry is None or annotator not in entry.leases:
            raise DeskError(409, "this pair is not assigned to you (already decided, or the assignment expired)")
        if assignment is not None and assignment != entry.assignments.get(annotator):
            raise DeskError(409, "this pair was assigned to you again since this page showed it: it is shown again")
        del entry.leases[annotator]
        entry.assignments.pop(annotator, None)
        del self._holding[annotator]
        verdict = HumanVerdict(
            annotator=annotator,
            preference=preference_of(choice, swapped(self.salt, annotator, pair_id)),
            note=note.strip(),
        )
        verdict.at.GetCurrentTime()
        entry.verdicts[annotator] = verdict
        self.done[annotator] = self.done.get(annotator, 0) + 1
        if len(entry.verdicts) < self.overlap:
            return None
        del self._pending[pair_id]
        route, out = decide(entry.record, list(entry.verdicts.values()))
        if route == "verified":
            self.add_example(out)
        outcome = "flipped" if out.decision.decision == Decision.DECISION_FLIP else route
        self.outcomes[outcome] += 1
        agg = out.human_aggregate
        self.decided[pair_id] = Summary(pair_id, outcome, agg.agreement, agg.verdicts, route, out)
        while len(self.decided) > self._remember:
            self.decided.popitem(last=False)
        return Decided(route=route, record=out, handle=entry.handle)

    # -- views ---------------------------------------------------------------------------
    def view(self, entry: Entry, annotator: str) -> dict[str, Any]:
        """What the page shows for one assignment. Candidate order is this annotator's own."""
        pair = entry.record.pair
        candidates = [message_dicts(pair.chosen), message_dicts(pair.rejected)]
        if swapped(self.salt, annotator, pair.id):
            candidates.reverse()
        record = entry.record
        return {
            "pair_id": pair.id,
            "assignment": entry.assignments.get(annotator, ""),
            "source": pair.source,
            "conversation": message_dicts(pair.conversation),
            "candidates": candidates,
            "attributes": _attributes(record.attributes) if record.HasField("attributes") else None,
            "examples": [example_view(i, self.examples.get(i)) for i in record.retrieved_example_ids],
            "annotators": self.overlap,
            "lease_s": self.lease_s,
        }

    def progress(self, annotator: str) -> dict[str, Any]:
        """The progress page's numbers for `annotator`: own and everyone's counts, outcomes, and the
        agreement of pairs decided by more than one annotator (with the last ten).
        """
        multi = [s for s in self.decided.values() if s.verdicts > 1]
        return {
            "annotator": annotator,
            "done": self.done.get(annotator, 0),
            "waiting": self.waiting_for(annotator),
            "pending": len(self._pending),
            "overlap": self.overlap,
            "outcomes": dict(self.outcomes),
            "per_annotator": dict(sorted(self.done.items())),
            "agreement": {
                "pairs": len(multi),
                "mean": sum(s.agreement for s in multi) / len(multi) if multi else None,
                "unanimous": sum(1 for s in multi if s.agreement == 1.0),
                "recent": [
                    {"pair_id": s.pair_id, "outcome": s.outcome, "agreement": s.agreement, "verdicts": s.verdicts}
                    for s in multi[-10:]
                ],
            },
        }


def parse_verdict(body: Any) -> tuple[str, int, str, str | None]:
    """Validate a verdict body; DeskError(400) naming the first problem."""
    if not isinstance(body, dict):
        raise DeskError(400, "body must be a JSON object")
    unknown = set(body) - {"pair_id", "choice", "note", "assignment"}
    if unknown:
        raise DeskError(400, f"unknown fields: {', '.join(sorted(unknown))}")
    pair_id = body.get("pair_id")
    if not isinstance(pair_id, str) or pair_id_problem(pair_id):
        raise DeskError(400, "pair_id must be a pair id string")
    choice = body.get("choice")
    if isinstance(choice, bool) or not isinstance(choice, int) or choice not in (0, 1, 2):
        raise DeskError(400, "choice must be the integer 1, 2 or 0 (cannot decide)")
    note = body.get("note", "")
    if not isinstance(note, str):
        raise DeskError(400, "note must be a string")
    if not note.isascii():
        try:
            note.encode("utf-8")
        except UnicodeEncodeError:
            # JSON may escape a lone surrogate ("\\ud800"), which no UTF-8 text, so no protobuf string, can hold.
            raise DeskError(400, "note is not valid Unicode text (a lone surrogate)") from None
    if len(note) > MAX_NOTE:
        raise DeskError(400, f"note is longer than {MAX_NOTE} characters")
    assignment = body.get("assignment")
    if assignment is not None and not isinstance(assignment, str):
        raise DeskError(400, "assignment must be the string /api/next gave")
    return pair_id, choice, note, assignment
