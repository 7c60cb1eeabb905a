"""Review 45, area R1: the controller's curation loop, its run state and its report; each test reproduces a defect."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

from synpref.services.consistency_filter.rules import score_of
from synpref.services.controller.curation import CurationSteps
from synpref.services.controller.state import RunState, StateStore, key_of
from synpref.shared.pairs import new_pair, new_record
from synpref.shared.pairstore import PairStore
from synpref.shared.roles import BEST


class CountingModels:
    """RewardModels whose rewards depend on the pair's text only, counting every pair they are asked to score."""

    def __init__(self) -> None:
        self.scored = 0

    def score(self, handle, pairs):
        self.scored += len(pairs)
        return [(float(len(p["chosen"][0]["content"])), 3.0) for p in pairs]


def verified_store(path: Path, n: int) -> PairStore:
    store = PairStore(path)
    records = []
    for i in range(n):
        conversation = [{"role": "user", "content": f"prompt {i}"}]
        chosen = [{"role": "assistant", "content": "x" * (i % 7)}]
        rejected = [{"role": "assistant", "content": f"other {i}"}]
        records.append(new_record(new_pair(conversation, chosen, rejected, source="unit")))
    store.add((key_of(r), "gold" if i % 3 else "silver", r) for i, r in enumerate(records))
    return store


def test_a_restarted_stage1_step_reads_back_the_scores_its_first_attempt_committed(tmp_path):
    # score_verified scored every D_gold and D_silver pair again on each restart of s1.<t>.curate, although the
    # first attempt's scores by the same working RM were committed with its first batch (millions of pairs at 40M).
    store = verified_store(tmp_path / "pairs.sqlite", 25)
    models = CountingModels()
    steps = CurationSteps()
    steps.pairstore = store
    steps.models = models  # type: ignore[assignment]
    steps.c = SimpleNamespace(batch_pairs=4)  # type: ignore[assignment]
    working = SimpleNamespace(version="working-2-abc")

    rows, p = steps.score_verified(working)  # type: ignore[arg-type]
    assert models.scored == 25 and len(rows) == 25
    again_rows, again_p = steps.score_verified(working)  # type: ignore[arg-type]  # the restart, same model
    assert models.scored == 25, "the restart scored the verified pairs again"
    assert again_rows.tolist() == rows.tolist() and again_p.tolist() == p.tolist()  # bit for bit: k(p) unchanged

    # Another model's scores are never taken for this one's: the next iteration scores everything anew.
    steps.score_verified(SimpleNamespace(version="working-3-def"))  # type: ignore[arg-type]
    assert models.scored == 50
    scores = [score_of(r, BEST) for chunk in store.scan(("gold", "silver")) for _, r in chunk]
    versions = {score.version for score in scores if score is not None}
    assert versions == {"working-3-def"}
    store.close()


def test_state_json_is_json_that_any_parser_reads(tmp_path):
    # Every run's first Stage-1 entry has valid_accuracy NaN (the RM learned D_gold, nothing to validate on), and a
    # run without held-out pairs has NaN accuracies: state.json held the bare token NaN, which is not JSON
    # (JSON.parse in a browser or node, Go, Rust's serde refuse the whole file; jq 1.6 turns it into null).
    store = StateStore(tmp_path)
    state = RunState(done=["ingest"], history=[{"valid_accuracy": float("nan"), "gold_accuracy": 1.0}])
    state.results["holdout_accuracy"] = {"final": float("nan"), "inf": float("inf")}
    with store.pairs.transaction():
        store.save(state)
    store.mirror(state)

    def refuse(token: str) -> float:
        raise ValueError(f"not JSON: {token}")

    mirrored = json.loads((tmp_path / "state.json").read_text(), parse_constant=refuse)
    assert mirrored["history"][0] == {"valid_accuracy": None, "gold_accuracy": 1.0}
    assert mirrored["results"]["holdout_accuracy"] == {"final": None, "inf": None}
    # The store's own copy, the one a restart reads, keeps the floats the loop computes with.
    assert math.isnan(StateStore(tmp_path).load().history[0]["valid_accuracy"])
    store.close()


def test_the_reports_stage1_table_accounts_for_every_retrieved_pair(tmp_path):
    # Pairs that failed in a Stage-1 iteration (dead-lettered: a score or a judge call that never came back) stay
    # unverified; the table's columns left them out, so its row did not add up to `retrieved` and said nothing of them.
    from synpref.services.controller.report import write_report
    from synpref.shared.config import load_settings

    entry = {"iteration": 1, "rm_errors": 4, "retrieved": 20, "annotated": 17, "failed": 3, "to_humans": 5}
    entry.update(human_verified=4, human_discarded=1, silver_kept=9, silver_flipped=2, judges_abstained=1)
    state = RunState(done=["s1.1.curate"], iteration=1, results={"stage1": [entry]})
    text = write_report(tmp_path, state, load_settings(controller={"workdir": str(tmp_path)})).read_text()
    header = next(line for line in text.splitlines() if line.startswith("| iteration | RM errors"))
    row = next(line for line in text.splitlines() if line.startswith("| 1 | 4 | 20 |"))
    cells = dict(zip(header.strip("|").split("|"), row.strip("|").split("|"), strict=True))
    counts = {name.strip(): int(value) for name, value in cells.items()}
    accounted = ("failed", "to humans", "judges keep", "judges flip", "judges abstain")
    assert sum(counts[name] for name in accounted) == counts["retrieved"]
    assert counts["verified"] + counts["discarded"] + counts["undecided"] == counts["to humans"]


def test_the_reports_stage1_table_counts_pairs_humans_left_undecided(tmp_path):
    # A provider may leave candidates undecided (they stay in D_un and may be asked again); no count showed them, so
    # verified + discarded fell short of "to humans" with nothing said.
    from synpref.services.controller.report import write_report
    from synpref.shared.config import load_settings

    entry = {"iteration": 1, "rm_errors": 4, "retrieved": 20, "failed": 0, "to_humans": 7, "human_verified": 3}
    entry.update(human_discarded=1, human_undecided=3, silver_kept=11, silver_flipped=1, judges_abstained=1)
    state = RunState(done=["s1.1.curate"], iteration=1, results={"stage1": [entry]})
    state.results["seed_human"] = {"verified": 5, "discarded": 0, "undecided": 2}
    text = write_report(tmp_path, state, load_settings(controller={"workdir": str(tmp_path)})).read_text()
    header = next(line for line in text.splitlines() if line.startswith("| iteration | RM errors"))
    row = next(line for line in text.splitlines() if line.startswith("| 1 | 4 | 20 |"))
    cells = dict(zip(header.strip("|").split("|"), row.strip("|").split("|"), strict=True))
    counts = {name.strip(): int(value) for name, value in cells.items()}
    assert counts["undecided"] == 3
    assert counts["verified"] + counts["discarded"] + counts["undecided"] == counts["to humans"]
    assert '"undecided": 2' in text  # the seed's line
