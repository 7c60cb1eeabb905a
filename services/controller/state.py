"""Durable controller state: one JSON file plus record snapshots, each written atomically.

The state file is the commit point. A step writes its artifacts first (records snapshot,
model, dataset shard), then the state file naming them and the step as done, through a
temp file, fsync and rename. A controller killed at any point restarts from the last
state file: the interrupted step runs again from the same inputs and, being a
deterministic function of them, produces the same outputs, overwriting any half-written
artifact of the first attempt.

Records are keyed by their ingest id (`key`): a flip changes a pair's content id, never
its key, so pools and lineage stay stable while labels change.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from synpref.shared.files import write_atomic
from synpref.v1.pair_pb2 import PairBatch, PairRecord

STATE_FILE = "state.json"
POOLS = ("holdout", "gold", "silver", "unverified", "discarded")


def key_of(record: PairRecord) -> str:
    """A record's stable key: its ingest id (lineage.original_id), else its pair id."""
    return record.lineage.original_id or record.pair.id


@dataclass
class RunState:
    """Everything a restarted controller needs, saved as state.json by StateStore.

    Fields are plain JSON values (lists, dicts, strings), so `dataclasses.asdict` round-trips
    them. A record key is in at most one pool once `move` has placed it.
    """

    done: list[str] = field(default_factory=list)
    """Steps completed, in order."""
    records: str = ""
    """Snapshot file (relative to the workdir) holding every record's current version."""
    pools: dict[str, list[str]] = field(default_factory=dict)
    """Pool name -> record keys (see POOLS)."""
    iteration: int = 0
    """Stage-1 iterations completed."""
    stage1_stopped: str = ""
    """Why Stage 1 ended (empty while it runs)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """One entry per Stage-1 iteration: accuracy, pool sizes, decisions, models."""
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Role -> {"path", "version", ...} of models trained so far (best, gold, final, ...)."""
    results: dict[str, Any] = field(default_factory=dict)
    """Stage-2 decisions, dataset versions, final accuracies, counts from ingest."""

    def pool(self, name: str) -> list[str]:
        """The key list of pool `name`, created empty if missing (the same list object, so edits stick)."""
        return self.pools.setdefault(name, [])

    def move(self, keys: Iterable[str], to: str) -> None:
        """Move `keys` into pool `to`, out of every other pool; new keys are appended sorted, without duplicates."""
        moving = set(keys)
        for name in list(self.pools):
            if name != to:
                self.pools[name] = [k for k in self.pools[name] if k not in moving]
        have = set(self.pool(to))
        self.pools[to].extend(k for k in sorted(moving) if k not in have)


class StateStore:
    """The workdir: state.json, snapshots/, and helpers to read and write them."""

    def __init__(self, workdir: str | Path) -> None:
        self.root = Path(workdir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / STATE_FILE

    def load(self) -> RunState:
        """The saved RunState, or a fresh one when no state file exists yet."""
        if not self.path.exists():
            return RunState()
        return RunState(**json.loads(self.path.read_text()))

    def save(self, state: RunState) -> None:
        """Write `state` as state.json atomically (temp file, fsync, rename): the step's commit point."""
        text = json.dumps(asdict(state), indent=1, sort_keys=True)
        write_atomic(self.path, lambda p: p.write_text(text))

    def write_records(self, name: str, records: dict[str, PairRecord]) -> str:
        """Snapshot every record (in key order) as one PairBatch; returns its workdir-relative path."""
        rel = f"snapshots/{name}.pb"
        batch = PairBatch(records=[records[k] for k in sorted(records)])
        data = batch.SerializeToString(deterministic=True)
        write_atomic(self.root / rel, lambda p: p.write_bytes(data))
        return rel

    def read_records(self, rel: str) -> dict[str, PairRecord]:
        """Key -> record from the snapshot at workdir-relative `rel`; empty when `rel` is empty."""
        if not rel:
            return {}
        batch = PairBatch()
        batch.ParseFromString((self.root / rel).read_bytes())
        return {key_of(r): r for r in batch.records}
