"""Durable controller state: the PairStore (every record and its pool) and a small run summary in it.

The commit point is one SQLite transaction. A step runs inside a transaction of the run's
PairStore; its writes (records, pool moves) and the run summary naming the step as done
commit together at its end. A long step commits after each batch (`PairStore.commit_point`)
with a cursor saying how far it got, so a controller killed mid-step keeps the finished
batches and goes on after them; one killed anywhere else restarts the step from the same
inputs and, the step being a deterministic function of them, produces the same outputs,
overwriting any artifact (model, dataset shard) the first attempt half wrote.

`state.json` beside the store is a readable copy of the summary, written after each commit;
the store's copy is the one a restart reads.

Records are keyed by their ingest id (`key`): a flip changes a pair's content id, never
its key, so pools and lineage stay stable while labels change.

Human verdicts are the exception (VerdictLog): people are slow and their answers cannot be
had again for free, so a controller killed after the humans answered and before the step
committed must not send the same pairs to them twice. Each decided record a human provider
gives back is written at once, on its own, to `verdicts.sqlite` beside the PairStore (a
separate database: the step's open transaction holds the PairStore's write lock), keyed by
the step that asked and the pair's key, with the id of the pair as it was asked. A retried
step takes the verdicts recorded for the same pairs (same key, same pair id) and asks humans
only about the rest, so it ends where the uninterrupted step would have. Providers whose
verdicts arrive one by one (the desk, the terminal, the desk over Kafka) take a `journal`
(StepVerdicts) and record each as it comes; the others' are recorded when `review` returns.
The journal also keeps small provider notes for the step (the Kafka desk's topic offsets and
published keys), committed at once as well.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from synpref.shared.files import write_atomic
from synpref.shared.pairstore import PairStore
from synpref.shared.strict_json import strict_dumps
from synpref.v1.pair_pb2 import PairRecord

STATE_FILE = "state.json"
STORE_FILE = "pairs.sqlite"
_STATE_META = "run_state"


def key_of(record: PairRecord) -> str:
    """A record's stable key: its ingest id (lineage.original_id), else its pair id."""
    return record.lineage.original_id or record.pair.id


@dataclass
class RunState:
    """The run summary a restarted controller needs beside the PairStore: small, whatever the pool size.

    Fields are plain JSON values (lists, dicts, strings), so `dataclasses.asdict` round-trips them.
    """

    done: list[str] = field(default_factory=list)
    """Steps completed, in order."""
    iteration: int = 0
    """Stage-1 iterations completed."""
    stage1_stopped: str = ""
    """Why Stage 1 ended (empty while it runs)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """One entry per Stage-1 iteration: accuracy, pool sizes, decisions, models."""
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Role -> {"path", "version", ...} of models trained so far (best, gold, final, ...)."""
    results: dict[str, Any] = field(default_factory=dict)
    """Pool sizes, Stage-2 decisions, dataset versions, final accuracies, counts from ingest."""


class StateStore:
    """The workdir: the PairStore (`pairs.sqlite`) holding records, pools and the run summary, and state.json."""

    def __init__(self, workdir: str | Path, cache_mib: int = 64) -> None:
        self.root = Path(workdir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / STATE_FILE
        self.pairs = PairStore(self.root / STORE_FILE, cache_mib=cache_mib)

    def close(self) -> None:
        """Close the PairStore."""
        self.pairs.close()

    def load(self) -> RunState:
        """The committed RunState, or a fresh one for a new workdir."""
        text = self.pairs.meta(_STATE_META)
        return RunState(**json.loads(text)) if text else RunState()

    def save(self, state: RunState) -> None:
        """Write `state` into the store (committed with the caller's transaction), then state.json if committed."""
        text = json.dumps(asdict(state), indent=1, sort_keys=True)
        self.pairs.set_meta(_STATE_META, text)

    def mirror(self, state: RunState) -> None:
        """Write the readable copy state.json atomically (temp file, fsync, rename); NaN and infinities as null.

        The store's copy keeps them (the loop computes with them), but a bare NaN token is not JSON: JSON.parse, Go
        and serde refuse the whole file, and every run has one (the first working RM has no valid_accuracy)."""
        text = strict_dumps(asdict(state), indent=1, sort_keys=True)
        write_atomic(self.path, lambda p: p.write_text(text))


def read_pools(workdir: str | Path) -> dict[str, list[str]]:
    """Pool -> keys in row order, every pool named (empty ones too); for audits and tests, not for 40M."""
    from synpref.shared.pairstore import POOLS

    with PairStore(Path(workdir) / STORE_FILE) as store:
        return {pool: [] for pool in POOLS} | store.keys_by_pool()


def read_records(workdir: str | Path) -> dict[str, PairRecord]:
    """Key -> current record of every pair of a run; for audits and tests, not for 40M."""
    with PairStore(Path(workdir) / STORE_FILE) as store:
        return store.records_by_key()


# ------------------------------------------------------------ human verdicts

VERDICTS_FILE = "verdicts.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    step TEXT NOT NULL,
    key TEXT NOT NULL,
    asked TEXT NOT NULL,
    route TEXT NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (step, key)
);
CREATE TABLE IF NOT EXISTS notes (step TEXT NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (step, name));
"""


class VerdictLog:
    """Decided records by (step, key), each committed as it is written; see the module docstring."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the SQLite connection."""
        self._db.close()

    def clear(self) -> None:
        """Forget every verdict and note (a new run in this store)."""
        self._db.execute("DELETE FROM verdicts")
        self._db.execute("DELETE FROM notes")

    def record(self, step: str, asked: str, route: str, record: PairRecord) -> None:
        """Keep `record`, decided and routed `route` by humans for `step`, asked as pair id `asked`; commits."""
        blob = record.SerializeToString(deterministic=True)
        self._db.execute(
            "INSERT OR REPLACE INTO verdicts (step, key, asked, route, record) VALUES (?, ?, ?, ?, ?)",
            (step, key_of(record), asked, route, blob),
        )

    def recorded(self, step: str, records: list[PairRecord]) -> dict[str, tuple[str, PairRecord]]:
        """Key -> (route, decided record) of those of `records` humans already decided for `step`, as asked."""
        asked = {key_of(r): r.pair.id for r in records}
        out: dict[str, tuple[str, PairRecord]] = {}
        for key, pair_id, route, blob in self._db.execute(
            "SELECT key, asked, route, record FROM verdicts WHERE step = ?", (step,)
        ):
            if asked.get(key) == pair_id:
                record = PairRecord()
                record.ParseFromString(blob)
                out[key] = (route, record)
        return out

    def note(self, step: str, name: str) -> str:
        """The note `name` of `step`, or "" when none was written."""
        row = self._db.execute("SELECT value FROM notes WHERE step = ? AND name = ?", (step, name)).fetchone()
        return str(row[0]) if row else ""

    def set_note(self, step: str, name: str, value: str) -> None:
        """Write the note `name` of `step`; commits."""
        self._db.execute("INSERT OR REPLACE INTO notes (step, name, value) VALUES (?, ?, ?)", (step, name, value))


class StepVerdicts:
    """One step's part of the VerdictLog, handed to a provider as `journal`: it records verdicts for the pairs
    asked (others are ignored) and keeps the provider's notes for the step."""

    def __init__(self, log: VerdictLog, step: str, records: list[PairRecord]) -> None:
        self.log = log
        self.step = step
        self.asked = {key_of(r): r.pair.id for r in records}
        self.got: dict[str, tuple[str, PairRecord]] = {}

    def record(self, route: str, record: PairRecord) -> None:
        """Keep one decided record of an asked pair, committed at once (once per pair)."""
        key = key_of(record)
        if key in self.asked and key not in self.got:
            self.log.record(self.step, self.asked[key], route, record)
            self.got[key] = (route, record)

    def note(self, name: str) -> str:
        """The provider's note `name` for this step, "" when none."""
        return self.log.note(self.step, name)

    def set_note(self, name: str, value: str) -> None:
        """Write the provider's note `name` for this step; commits."""
        self.log.set_note(self.step, name, value)


def review_once(
    humans: Any, log: VerdictLog, step: str, records: list[PairRecord], say: Callable[[str], None]
) -> list[tuple[str, PairRecord]]:
    """`records` decided by `humans`, in order: those `step` already recorded are reused, only the rest asked,
    and each answer is recorded as it arrives (at the latest when `review` returns)."""
    got = log.recorded(step, records)
    ask = [r for r in records if key_of(r) not in got]
    if got:
        say(f"humans: {len(got)} verdicts recorded by an earlier attempt at {step} reused; {len(ask)} pairs to ask")
    if ask:
        journal = StepVerdicts(log, step, ask)
        routed = humans.review(ask, journal=journal) if getattr(humans, "journals", False) else humans.review(ask)
        for route, record in routed:
            journal.record(route, record)
        got.update(journal.got)
    return [got[key] for key in (key_of(r) for r in records) if key in got]  # a provider may leave some undecided
