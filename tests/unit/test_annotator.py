"""The annotator stage: attributes, retrieved examples in the prompt, votes from several judges, aggregate."""

from __future__ import annotations

import pytest

from synpref.services.annotator.annotate import Annotator, k_for
from synpref.services.annotator.chat import OpenAIChat
from synpref.services.annotator.judges import AttributeLabeller, LLMJudge
from synpref.shared.pairs import new_pair, new_record
from synpref.shared.retrieval import Example
from synpref.v1.pair_pb2 import (
    PREFERENCE_ABSTAIN,
    PREFERENCE_CHOSEN,
    PREFERENCE_REJECTED,
    STAGE_ONE,
    STAGE_TWO,
    ModelScore,
)
from testing.fake_judges import FakeOpenAI


class FixedExamples:
    """Stands in for the retrieval index: returns up to k canned examples and records k."""

    def __init__(self):
        self.asked: list[int] = []

    def examples(self, conversation, attributes, k):
        self.asked.append(k)
        return [Example(f"ex{i}", [{"role": "user", "content": f"q{i}"}], "good", "bad") for i in range(k)]


class Broken:
    name = "broken"

    async def judge(self, request):
        raise RuntimeError("judge bug")


def rec(chosen, rejected, p_best=None):
    r = new_record(new_pair([{"role": "user", "content": "q"}], [{"role": "assistant", "content": chosen}],
                            [{"role": "assistant", "content": rejected}], "t"))  # fmt: skip
    if p_best is not None:
        r.scores.append(ModelScore(model="best", p=p_best))
    return r


@pytest.fixture(scope="module")
def server():
    with FakeOpenAI() as s:
        yield s


def annotator(server, examples=None, **kwargs):
    judges = [
        LLMJudge(OpenAIChat(name, server.base_url, backoff_s=0.01), samples=3)
        for name in ("judge-a", "judge-b", "judge-malformed")
    ]
    labeller = AttributeLabeller(OpenAIChat("attr", server.base_url))
    return Annotator(judges, labeller, examples, **kwargs)


def test_stage_labels_votes_and_aggregates(server):
    examples = FixedExamples()
    ann = annotator(server, examples)
    try:
        result = ann.stage()([rec("a long and careful answer", "no"), rec("no", "a long and careful answer", 0.8)])
    finally:
        ann.close()
    good, bad = result.by_route()["annotated"]
    assert good.attributes.task_category and good.attributes.annotator_model == "attr"
    assert len(good.votes) == 9  # 3 judges x 3 samples
    by_judge = {v.judge for v in good.votes}
    assert by_judge == {"judge-a", "judge-b", "judge-malformed"}
    assert all(v.preference == PREFERENCE_ABSTAIN for v in good.votes if v.judge == "judge-malformed")
    assert good.judge_aggregate.preference == PREFERENCE_CHOSEN
    assert (good.judge_aggregate.judges_voting, good.judge_aggregate.judges_abstaining) == (2, 1)
    assert bad.judge_aggregate.preference == PREFERENCE_REJECTED
    # k: 8 without p_best, ceil(8 * 0.2) = 2 for p_best = 0.8; one extra asked to drop the pair itself.
    assert sorted(examples.asked) == [3, 9]
    assert len(good.retrieved_example_ids) == 8 and len(bad.retrieved_example_ids) == 2
    assert list(good.lineage.steps) == ["annotator"]


def test_confident_pairs_skip_judges_and_failures_go_to_dead_letter(server):
    ann = annotator(server, skip_confident=True, band=0.05)
    ann.judges.append(Broken())
    try:
        result = ann.stage()([rec("x", "y", p_best=0.9), rec("x", "yy", p_best=0.2)])
    finally:
        ann.close()
    (skipped,) = result.by_route()["annotated"]
    assert len(skipped.votes) == 0 and skipped.attributes.task_category
    assert len(result.failed) == 1 and "judge bug" in result.failed[0][1]


def test_stage_one_pairs_are_judged_with_every_example_whatever_the_working_rms_p(server):
    examples = FixedExamples()
    ann = annotator(server, examples, skip_confident=True, band=0.05)
    stage_one, stage_two = rec("a long and careful answer", "no", 0.9), rec("a careful answer", "no", 0.9)
    stage_one.lineage.stage, stage_two.lineage.stage = STAGE_ONE, STAGE_TWO
    try:
        result = ann.stage()([stage_one, stage_two])
    finally:
        ann.close()
    judged, skipped = result.by_route()["annotated"]
    # Stage 1 checks the working RM: its p neither skips the judges nor trims the examples.
    assert len(judged.votes) == 9 and len(judged.retrieved_example_ids) == 8 and examples.asked == [9]
    assert len(skipped.votes) == 0  # Stage 2: the best RM already gets it right


def test_k_for():
    assert (k_for(None), k_for(0.3), k_for(0.95), k_for(0.3, 4)) == (8, 8, 1, 4)


def test_batches_from_two_threads_share_the_loop(server):
    from concurrent.futures import ThreadPoolExecutor

    ann = annotator(server)
    stage = ann.stage()
    try:
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(stage, [[rec("long answer", "no")], [rec("no", "long answer")]] * 2))
    finally:
        ann.close()
    assert all(len(r.routed) == 1 and not r.failed for r in results)


def test_a_bad_pair_fails_alone_before_any_judge_sees_it(server):
    # The poison-message benchmark sent a pair with an unknown role: it must go to the dead-letter
    # topic with the reason (shared.pairs.pair_problem, as the gold-scorer checks), and the good
    # pairs of its batch are still judged.
    bad_role = rec("x", "y")
    bad_role.pair.conversation[0].role = "narrator"
    no_rejected = rec("x", "y")
    del no_rejected.pair.rejected[:]
    ann = annotator(server)
    try:
        result = ann.stage()([rec("a long and careful answer", "no"), bad_role, no_rejected])
    finally:
        ann.close()
    (good,) = result.by_route()["annotated"]
    assert len(good.votes) == 9
    reasons = sorted(reason for _, reason in result.failed)
    assert len(reasons) == 2 and "role 'narrator'" in reasons[0] and "no chosen or no rejected" in reasons[1]
