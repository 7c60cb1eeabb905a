"""Review 43 of the controller's curation steps (services/controller/curation.py): defects found and pinned."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from synpref.services.annotator.annotate import Annotator
from synpref.services.consistency_filter.rules import make_filter_stage
from synpref.services.controller.curation import CurationSteps
from synpref.services.controller.executors import InProcessExecutor, chain
from synpref.services.controller.known_vectors import KnownVectors
from synpref.services.controller.state import RunState, key_of
from synpref.services.gold_scorer.scoring import ScoringModel, make_scoring_stage
from synpref.shared.config import FilterSettings
from synpref.shared.pairs import new_pair, new_record
from synpref.shared.pairstore import PairStore
from synpref.shared.roles import BEST, GOLD
from synpref.v1.pair_pb2 import (
    PREFERENCE_ABSTAIN,
    PREFERENCE_CHOSEN,
    PREFERENCE_REJECTED,
    STAGE_ONE,
    JudgeAggregate,
    JudgeVote,
)


class PromptMemory:
    """RewardModels that learn nothing but their training prompts: right on a pair whose conversation they were
    trained on, wrong on any other (an RM that has seen RM-Bench's sibling pairs of a prompt, or the pair
    itself as its flipped twin, ranks that prompt's responses; it has learned nothing else)."""

    def __init__(self) -> None:
        self.trained: dict[str, set[str]] = {}
        self.scored: list[str] = []

    def train(self, name, train, valid, out_dir):
        self.trained[name] = {json.dumps(p["conversation"]) for p in train}
        return name

    def score(self, name, pairs):
        out = []
        for pair in pairs:
            conversation = json.dumps(pair["conversation"])
            self.scored.append(conversation)
            out.append((1.0, 0.0) if conversation in self.trained[name] else (0.0, 1.0))
        return out


def gold_store(tmp_path: Path, prompts: int, pairs_per_prompt: int) -> PairStore:
    """A D_gold of `prompts` conversations with `pairs_per_prompt` pairs each (RM-Bench: one chosen, styles)."""
    store = PairStore(tmp_path / "pairs.sqlite")
    records = []
    for i in range(prompts):
        conversation = [{"role": "user", "content": f"prompt {i}"}]
        for j in range(pairs_per_prompt):
            chosen = [{"role": "assistant", "content": f"good answer {i}"}]
            rejected = [{"role": "assistant", "content": f"bad answer {i} style {j}"}]
            records.append(new_record(new_pair(conversation, chosen, rejected, source="unit")))
    store.add((key_of(r), "gold", r) for r in records)
    return store


def curation_steps(tmp_path: Path, store: PairStore, models) -> CurationSteps:
    steps = CurationSteps()
    steps.pairstore = store
    steps.models = models
    steps.root = tmp_path
    steps.state = RunState()
    steps.c = SimpleNamespace(seed=0, batch_pairs=64)  # type: ignore[assignment]
    steps.settings = SimpleNamespace(filter=FilterSettings())  # type: ignore[assignment]
    steps.say = lambda _msg: None
    steps.known = KnownVectors(lambda: None, lambda texts: None)  # type: ignore[arg-type,return-value]  # no judge embeds
    return steps


def test_the_auto_rules_probe_is_scored_on_prompts_it_never_trained_on(tmp_path):
    # measure_gold held out a fifth of D_gold's rows, not of its prompts: pairs that share a prompt (RM-Bench's
    # style pairs, a pair and its flipped twin) landed on both sides, so the probe was scored on prompts it had
    # learned. An RM that knows nothing beyond its training prompts measured 1.0 held-out accuracy, and Stage 2
    # then flipped every disagreement on its word. The pool's own held-out split is by conversation for this reason.
    store = gold_store(tmp_path, prompts=60, pairs_per_prompt=5)
    models = PromptMemory()
    steps = curation_steps(tmp_path, store, models)
    steps.measure_gold()
    gold = steps.state.results["gold_rm"]
    assert gold["held_out_pairs"] >= 30
    assert not set(models.scored) & models.trained["gold-probe"], "held-out prompts were trained on"
    assert gold["held_out_accuracy"] == 0.0
    assert gold["on_disagreement"] == "discard"
    store.close()


class CountingJudge:
    """A judge that prefers the chosen side and counts the pairs it was asked about."""

    name = "counting"

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def judge(self, request):
        self.asked.append(request.pair_id)
        return [JudgeVote(judge=self.name, sample=0, preference=PREFERENCE_CHOSEN)]


def test_stage_2_counts_as_judged_only_the_pairs_its_judges_were_asked_about(tmp_path):
    # Pairs Stage 1 judged and left in D_un (the panel abstained; humans left a candidate undecided) still
    # carried Stage 1's votes into Stage 2. Where the best RM was sure, Stage 2 asked no judge, but counted
    # every routed pair with votes as "sent to judges": the report's judge-call count was too high and its
    # "not re-annotated" count too low, and the decided record's reason cited Stage 1's judges as Stage 2's.
    store = PairStore(tmp_path / "pairs.sqlite")
    rewards: dict[str, tuple[float, float]] = {}
    records = []
    for i, (stage1, reward) in enumerate(
        [(PREFERENCE_ABSTAIN, (3.0, 0.0)), (PREFERENCE_REJECTED, (3.0, 0.0)), (None, (3.0, 0.0)), (None, (0.0, 0.0))]
    ):
        conversation = [{"role": "user", "content": f"prompt {i}"}]
        record = new_record(
            new_pair(
                conversation,
                [{"role": "assistant", "content": "yes"}],
                [{"role": "assistant", "content": "no"}],
                "unit",
            )
        )
        if stage1 is not None:  # judged in Stage 1 iteration 1 and still unverified
            record.lineage.stage, record.lineage.iteration = STAGE_ONE, 1
            record.votes.append(JudgeVote(judge="stage-1 judge", sample=0, preference=stage1))
            record.judge_aggregate.CopyFrom(JudgeAggregate(preference=stage1))
        rewards[f"prompt {i}"] = reward
        records.append(record)
    store.add((key_of(r), "unverified", r) for r in records)

    judge = CountingJudge()
    annotator = Annotator([judge], skip_confident=True, band=0.05)
    served: list[ScoringModel] = []

    def serve(handles):
        score = lambda pairs: [rewards[p["conversation"][0]["content"]] for p in pairs]  # noqa: E731
        served[:] = [ScoringModel(role, f"{role}-v1", score) for role in handles]

    rule = FilterSettings(stage=2, on_disagreement="discard")
    steps = curation_steps(tmp_path, store, None)
    steps.settings = SimpleNamespace(filter=rule)  # type: ignore[assignment]
    steps.handle = lambda role: role  # type: ignore[assignment,return-value]
    steps.serve_models = serve  # type: ignore[assignment]
    steps.executor = InProcessExecutor(
        lambda _name: chain(make_scoring_stage(served), annotator.stage(), make_filter_stage(rule))
    )
    steps.current_step = "s2.curate"
    steps.progress_of = lambda default: default
    steps.commit_batch = lambda _progress: None
    steps.left_unverified = lambda _rows: None
    try:
        steps.curate_stage2()
    finally:
        annotator.close()
    assert {GOLD, BEST} == {m.role for m in served}
    assert len(judge.asked) == 1  # only the pair the best RM is unsure of
    stage2 = steps.state.results["stage2"]
    assert stage2["pairs"] == 4 and stage2["failed"] == 0
    assert (stage2["annotated"], stage2["skipped_annotation"]) == (1, 3)
    decided = [r for chunk in store.scan(("stage2", "discarded")) for _, r in chunk]
    assert len(decided) == 4
    assert not any("judges disagree" in r.decision.reason for r in decided)
    store.close()
