"""DeskCore: assignment, candidate order, verdict mapping, aggregation and routing."""

from __future__ import annotations

import pytest

from synpref.services.desk.core import DeskCore, DeskError, aggregate, decide, preference_of, swapped
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import Attributes, Decision, HumanVerdict, PairRecord, Preference

P = Preference


def record(i: int, **attrs: object) -> PairRecord:
    pair = new_pair(
        [{"role": "user", "content": f"question {i}"}],
        [{"role": "assistant", "content": f"good answer {i}"}],
        [{"role": "assistant", "content": f"bad answer {i}"}],
        source="test",
    )
    rec = new_record(pair)
    if attrs:
        rec.attributes.CopyFrom(Attributes(**attrs))  # type: ignore[arg-type]
    return rec


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def choice_for(core: DeskCore, annotator: str, pair_id: str, want_chosen: bool) -> int:
    """The candidate number that points at `chosen` (or `rejected`) for this annotator."""
    chosen_is_1 = not swapped(core.salt, annotator, pair_id)
    return 1 if chosen_is_1 == want_chosen else 2


def test_candidate_order_is_fixed_per_annotator_and_pair_and_varies() -> None:
    salt = b"s" * 16
    ids = [f"{i:032x}" for i in range(64)]
    first = [swapped(salt, "ann", i) for i in ids]
    assert first == [swapped(salt, "ann", i) for i in ids]
    # Both orders occur, so annotators cannot learn "chosen is always on the left".
    assert 10 < sum(first) < 54
    assert first != [swapped(salt, "other", i) for i in ids]


@pytest.mark.parametrize(
    ("choice", "is_swapped", "want"),
    [(1, False, P.PREFERENCE_CHOSEN), (2, False, P.PREFERENCE_REJECTED), (1, True, P.PREFERENCE_REJECTED),
     (2, True, P.PREFERENCE_CHOSEN), (0, False, P.PREFERENCE_ABSTAIN), (0, True, P.PREFERENCE_ABSTAIN)],
)  # fmt: skip
def test_preference_maps_candidates_back(choice: int, is_swapped: bool, want: int) -> None:
    assert preference_of(choice, is_swapped) == want


def test_view_shows_candidates_in_the_annotators_order() -> None:
    core = DeskCore(salt=b"k" * 16)
    recs = [record(i) for i in range(8)]
    for r in recs:
        core.add(r)
    seen_swapped = set()
    for r in recs:
        view = core.view(core._pending[r.pair.id], "ann")
        is_swapped = swapped(core.salt, "ann", r.pair.id)
        seen_swapped.add(is_swapped)
        first = view["candidates"][0][0]["content"]
        assert first == (r.pair.rejected[0].content if is_swapped else r.pair.chosen[0].content)
    assert seen_swapped == {True, False}


def test_single_overlap_never_gives_one_pair_to_two_annotators() -> None:
    core = DeskCore(overlap=1)
    for i in range(3):
        core.add(record(i))
    got = [core.next_for(a) for a in ("a", "b", "c", "d")]
    ids = [e.pair_id for e in got if e is not None]
    assert len(ids) == 3 and len(set(ids)) == 3
    assert got[3] is None
    # Asking again returns the same open assignment, not a new pair.
    assert core.next_for("a") is got[0]


def test_keep_flip_and_discard_routes() -> None:
    core = DeskCore(overlap=1)
    keep, flip, drop = record(1), record(2), record(3)
    for r in (keep, flip, drop):
        core.add(r, handle=r.pair.id)
    results = {}
    for r, want_chosen in ((keep, True), (flip, False), (drop, None)):
        entry = core.next_for("ann")
        assert entry is not None and entry.pair_id == r.pair.id
        choice = 0 if want_chosen is None else choice_for(core, "ann", r.pair.id, want_chosen)
        decided = core.submit("ann", r.pair.id, choice, note=" why ")
        assert decided is not None and decided.handle == r.pair.id
        results[r.pair.id] = decided
    kept = results[keep.pair.id]
    assert kept.route == "verified" and kept.record.decision.decision == Decision.DECISION_KEEP
    assert kept.record.pair.chosen[0].content == "good answer 1"
    v = kept.record.human_verdicts[0]
    assert (v.annotator, v.preference, v.note) == ("ann", P.PREFERENCE_CHOSEN, "why")
    assert v.at.seconds > 0 and "desk" in kept.record.lineage.steps

    flipped = results[flip.pair.id]
    assert flipped.route == "verified" and flipped.record.decision.decision == Decision.DECISION_FLIP
    # D_gold keeps "chosen = what the human preferred".
    assert flipped.record.pair.chosen[0].content == "bad answer 2"
    assert flipped.record.lineage.original_id == flip.pair.id and flipped.record.pair.id != flip.pair.id
    assert flipped.record.human_verdicts[0].preference == P.PREFERENCE_CHOSEN

    dropped = results[drop.pair.id]
    assert dropped.route == "discarded" and dropped.record.decision.decision == Decision.DECISION_DISCARD
    assert dropped.record.decision.reason == "cannot decide"
    assert core.outcomes == {"verified": 1, "flipped": 1, "discarded": 1}
    assert core.pending == 0 and core.next_for("ann") is None
    # Verified pairs become examples the desk can show; discarded ones do not.
    assert set(core.examples) == {keep.pair.id, flipped.record.pair.id}


def test_overlap_two_records_agreement() -> None:
    core = DeskCore(overlap=2)
    agree, split = record(1), record(2)
    core.add(agree)
    core.add(split)
    a1, b1 = core.next_for("a"), core.next_for("b")
    assert a1 is not None and b1 is not None and a1.pair_id == b1.pair_id == agree.pair.id
    # A third annotator gets the other pair, never a third copy of the first.
    c1 = core.next_for("c")
    assert c1 is not None and c1.pair_id == split.pair.id
    assert core.submit("a", agree.pair.id, choice_for(core, "a", agree.pair.id, True)) is None
    done = core.submit("b", agree.pair.id, choice_for(core, "b", agree.pair.id, True))
    assert done is not None and done.record.human_aggregate.agreement == 1.0
    assert len(done.record.human_verdicts) == 2

    assert core.submit("c", split.pair.id, choice_for(core, "c", split.pair.id, True)) is None
    d = core.next_for("a")
    assert d is not None and d.pair_id == split.pair.id
    done = core.submit("a", split.pair.id, choice_for(core, "a", split.pair.id, False))
    assert done is not None and done.route == "discarded"
    assert done.record.human_aggregate.agreement == 0.5
    assert done.record.decision.reason.startswith("annotators split")
    agreement = core.progress("a")["agreement"]
    assert agreement["pairs"] == 2 and agreement["mean"] == 0.75 and agreement["unanimous"] == 1


def test_aggregate_plurality_and_ties() -> None:
    def votes(*prefs: int) -> list[HumanVerdict]:
        return [HumanVerdict(annotator=str(i), preference=p) for i, p in enumerate(prefs)]

    three = aggregate(votes(P.PREFERENCE_REJECTED, P.PREFERENCE_REJECTED, P.PREFERENCE_CHOSEN))
    assert three.preference == P.PREFERENCE_REJECTED and three.agreement == 2 / 3  # one int division
    tie = aggregate(votes(P.PREFERENCE_CHOSEN, P.PREFERENCE_ABSTAIN))
    assert tie.preference == P.PREFERENCE_ABSTAIN and tie.abstaining == 1
    route, out = decide(record(9), votes(P.PREFERENCE_REJECTED, P.PREFERENCE_REJECTED, P.PREFERENCE_CHOSEN))
    assert route == "verified" and out.pair.chosen[0].content == "bad answer 9"
    # Restated against the flipped orientation: the two who preferred "rejected" now agree with chosen.
    assert [v.preference for v in out.human_verdicts] == [1, 1, 2]


def test_expired_lease_returns_the_pair_to_the_pool() -> None:
    clock = Clock()
    core = DeskCore(overlap=1, lease_s=60, clock=clock)
    r = record(1)
    core.add(r)
    assert core.next_for("a") is not None
    assert core.next_for("b") is None
    clock.t = 61
    entry = core.next_for("b")
    assert entry is not None and entry.pair_id == r.pair.id
    with pytest.raises(DeskError) as err:
        core.submit("a", r.pair.id, 1)
    assert err.value.status == 409


def test_refuses_bad_input_and_duplicates() -> None:
    core = DeskCore()
    r = record(1)
    assert core.add(r) is True
    assert core.add(r) is False
    entry = core.next_for("a")
    assert entry is not None
    for bad in (3, -1):
        with pytest.raises(DeskError) as err:
            core.submit("a", r.pair.id, bad)
        assert err.value.status == 400
    with pytest.raises(DeskError):
        core.submit("a", r.pair.id, 1, note="x" * 5000)
    with pytest.raises(DeskError) as err:
        core.submit("a", "f" * 32, 1)
    assert err.value.status == 409
    assert core.submit("a", r.pair.id, 1) is not None
    # A redelivery of a decided pair is recognised, not reviewed twice: its decision is replayed.
    assert core.add(r) is False
    replay = core.replay(r.pair.id, handle="again")
    assert replay is not None and replay.route == "verified" and replay.handle == "again"
    assert replay.record.human_verdicts[0].annotator == "a"
    assert core.replay("f" * 32) is None


def test_view_carries_attributes_and_examples() -> None:
    core = DeskCore()
    gold = record(0)
    core.add_example(gold)
    r = record(1, task_category="code", objectivity=1, desired_attributes=["correct"], annotation_guideline="run it")
    r.retrieved_example_ids.extend([gold.pair.id, "unknown-id"])
    core.add(r)
    entry = core.next_for("a")
    assert entry is not None
    view = core.view(entry, "a")
    assert view["attributes"]["objectivity"] == "objective"
    assert view["attributes"]["annotation_guideline"] == "run it"
    assert view["examples"][0]["available"] and view["examples"][0]["preferred"][0]["content"] == "good answer 0"
    assert view["examples"][1] == {"id": "unknown-id", "available": False}


def test_kafka_commit_point_waits_for_the_oldest_open_pair() -> None:
    from synpref.services.desk.inbox import commit_point

    assert commit_point({}) is None
    assert commit_point({5: False, 6: True}) == 5
    assert commit_point({5: True, 6: False, 7: True}) == 6
    assert commit_point({5: True, 6: True}) == 7


def test_a_human_flip_turns_the_judges_votes_with_the_label() -> None:
    # Judges preferred the rejected side; the human agrees: after the flip the judges' votes
    # and aggregate must point at the new chosen side, as the consistency filter's flips do.
    from synpref.v1.pair_pb2 import JudgeAggregate, JudgeVote, ModelScore

    rec = record(4)
    rec.votes.extend(
        [JudgeVote(judge="a", preference=P.PREFERENCE_REJECTED), JudgeVote(judge="b", preference=P.PREFERENCE_ABSTAIN)]
    )
    rec.judge_aggregate.CopyFrom(JudgeAggregate(preference=P.PREFERENCE_REJECTED))
    rec.scores.append(ModelScore(model="best", reward_chosen=1.0, reward_rejected=3.0, p=0.12))
    core = DeskCore(overlap=1)
    core.add(rec, handle="h")
    assert core.next_for("ann") is not None
    decided = core.submit("ann", rec.pair.id, choice_for(core, "ann", rec.pair.id, want_chosen=False))
    assert decided is not None and decided.record.decision.decision == Decision.DECISION_FLIP
    out = decided.record
    assert [v.preference for v in out.votes] == [P.PREFERENCE_CHOSEN, P.PREFERENCE_ABSTAIN]
    assert [v.candidate_order_swapped for v in out.votes] == [True, True]
    assert out.judge_aggregate.preference == P.PREFERENCE_CHOSEN
    assert (out.scores[0].reward_chosen, out.scores[0].reward_rejected) == (3.0, 1.0)
    assert out.scores[0].p == 1.0 - 0.12  # exactly what flipping computes
