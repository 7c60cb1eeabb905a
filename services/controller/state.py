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
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from synpref.shared.files import write_atomic
from synpref.shared.pairstore import PairStore
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
        """Write the readable copy state.json atomically (temp file, fsync, rename)."""
        text = json.dumps(asdict(state), indent=1, sort_keys=True)
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
