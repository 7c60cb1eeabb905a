"""Gold-RM scorer stage: p_gold and p_best with versions, from a fixed function and a tiny real RM."""

from __future__ import annotations

import math

import pytest

from synpref.services.gold_scorer.scoring import ScoringModel, in_process_scorer, make_scoring_stage
from synpref.shared.config import ModelRef, ScoringSettings
from synpref.shared.pairs import new_pair, new_record, sigmoid
from synpref.v1.pair_pb2 import STAGE_ONE
from testing.numerics import approx_fp32_forward


def rec(text: str):
    return new_record(new_pair([{"role": "user", "content": "q"}], [{"role": "assistant", "content": text}],
                               [{"role": "assistant", "content": "no"}], "t"))  # fmt: skip


def length_rm(pairs):
    return [(len(p["chosen"][0]["content"]), len(p["rejected"][0]["content"])) for p in pairs]


def test_scores_recorded_with_versions_and_probabilities():
    stage = make_scoring_stage(
        [ScoringModel("gold", "g7", length_rm), ScoringModel("best", "b3", lambda ps: [(0, 1)] * len(ps))]
    )
    out = stage([rec("a long answer"), rec("x")]).by_route()["scored"]
    gold = {s.model: s for s in out[0].scores}
    assert gold["gold"].version == "g7" and gold["best"].version == "b3"
    # p is sigmoid(r_chosen - r_rejected) of the recorded rewards, computed by the one sigmoid
    # (test_pair_ops checks its accuracy): for x >= 0 it is this formula, for x < 0 e/(1+e).
    assert gold["gold"].p == 1 / (1 + math.exp(-(13 - 2)))
    assert gold["best"].p == sigmoid(0 - 1)
    assert out[1].scores[0].p < 0.5
    # Re-scoring replaces a role's score instead of piling up.
    again = stage(out).by_route()["scored"]
    assert [s.model for s in again[0].scores] == ["gold", "best"]


def test_each_stage_is_scored_with_its_models():
    seen: dict[str, list[int]] = {"gold": [], "best": []}

    def counting(role):
        def rm(pairs):
            seen[role].append(len(pairs))
            return length_rm(pairs)

        return rm

    stage = make_scoring_stage([ScoringModel(r, r[0], counting(r)) for r in ("gold", "best")])
    stage_one = rec("judged in stage 1")
    stage_one.lineage.stage = STAGE_ONE
    result = stage([stage_one, rec("stage 2 pair")])
    routed = {r.pair.id: [s.model for s in r.scores] for r in result.by_route()["scored"]}
    # Stage 1 has no gold RM: its pairs get the working RM's p (as best) only; the others both.
    assert routed == {stage_one.pair.id: ["best"], rec("stage 2 pair").pair.id: ["gold", "best"]}
    assert seen == {"gold": [1], "best": [1, 1]} and not result.failed
    # A stage without a model to score it fails its records instead of passing them on unscored.
    gold_only = make_scoring_stage([ScoringModel("gold", "g", length_rm)])([stage_one])
    assert gold_only.failed == [(stage_one, "no scoring model for stage 1")] and not gold_only.routed


def test_wrong_number_of_scores_raises():
    stage = make_scoring_stage([ScoringModel("gold", "g", lambda ps: [])])
    with pytest.raises(RuntimeError):
        stage([rec("a")])


def test_in_process_scorer_with_a_tiny_reward_model(tmp_path):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from testing.tiny import build_tiny_reward_model

    path = build_tiny_reward_model(tmp_path / "rm", layers=1, hidden=32, heads=2, kv_heads=1)
    settings = ScoringSettings(gold=ModelRef(path=str(path), version="tiny-1"))
    score = in_process_scorer(settings.gold, settings, max_length=128)
    stage = make_scoring_stage([ScoringModel("gold", "tiny-1", score)])
    out = stage([rec("hello there"), rec("no")]).by_route()["scored"]
    s0, s1 = out[0].scores[0], out[1].scores[0]
    # Identical texts, identical rewards up to fp32 rounding (two rows of one padded batch);
    # different texts differ by more than that.
    scale = max(abs(r) for s in (s0, s1) for r in (s.reward_chosen, s.reward_rejected))
    assert s1.reward_chosen == approx_fp32_forward(s1.reward_rejected, scale)
    assert s0.reward_chosen != approx_fp32_forward(s0.reward_rejected, scale)
    assert 0.0 < s0.p < 1.0


def _slow_scorer_client(limit: int, calls: list[int]):
    """A scorer client that scores up to `limit` pairs within its deadline and misses it above."""
    import grpc

    from synpref.client.client import PairScore

    class Deadline(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.DEADLINE_EXCEEDED

        def details(self):
            return "Deadline Exceeded"

    class Client:
        def score_pairs(self, pairs, model, timeout):
            calls.append(len(pairs))
            if len(pairs) > limit:
                raise Deadline()
            return [PairScore(float(len(p["chosen"][0]["content"])), 0.0, 0.5, "v1") for p in pairs]

    return Client()


def test_a_batch_too_slow_for_one_deadline_is_scored_in_halves():
    from synpref.services.gold_scorer.scoring import grpc_scorer

    pairs = [
        {"conversation": [], "chosen": [{"role": "assistant", "content": "x" * i}], "rejected": []} for i in range(10)
    ]
    calls: list[int] = []
    score = grpc_scorer("x", "gold", _slow_scorer_client(3, calls), timeout_s=30)
    assert [r[0] for r in score(pairs)] == [float(i) for i in range(10)]
    assert calls == [10, 5, 2, 3, 5, 2, 3]


def test_a_scorer_too_slow_for_even_one_pair_is_unavailable_not_the_pairs_fault():
    from synpref.services.gold_scorer.scoring import grpc_scorer
    from synpref.shared.stage import StageUnavailable

    pairs = [{"conversation": [], "chosen": [{"role": "assistant", "content": "x"}], "rejected": []}] * 4
    calls: list[int] = []
    with pytest.raises(StageUnavailable, match="cannot score with 'gold' now"):
        grpc_scorer("x", "gold", _slow_scorer_client(0, calls), timeout_s=30)(pairs)
    assert calls == [4, 2, 1]  # halves down to a single pair, then unavailable (the runner reads the batch again)


def test_halving_stops_once_the_batch_has_spent_its_deadlines():
    from synpref.services.gold_scorer.scoring import grpc_scorer
    from synpref.shared.stage import StageUnavailable

    pairs = [{"conversation": [], "chosen": [{"role": "assistant", "content": "x"}], "rejected": []}] * 8
    calls: list[int] = []
    with pytest.raises(StageUnavailable):
        grpc_scorer("x", "gold", _slow_scorer_client(1, calls), timeout_s=1e-9)(pairs)
    assert calls == [8]  # the split budget (SPLIT_TIMEOUTS deadlines) was spent by the first call


def test_a_request_over_the_scorers_message_limit_is_split_and_a_single_pair_over_it_is_its_own_error():
    import grpc

    from synpref.client.client import PairScore
    from synpref.services.gold_scorer.scoring import grpc_scorer

    class TooLarge(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.RESOURCE_EXHAUSTED

        def details(self):
            return "SERVER: Received message larger than max (80106 vs. 65536)"

    calls: list[int] = []

    class Client:
        def score_pairs(self, pairs, model, timeout):
            calls.append(len(pairs))
            if sum(len(p["chosen"][0]["content"]) for p in pairs) > 20:
                raise TooLarge()
            return [PairScore(1.0, 0.0, 0.73, "v1") for _ in pairs]

    short = {"conversation": [], "chosen": [{"role": "assistant", "content": "x" * 5}], "rejected": []}
    assert len(grpc_scorer("x", "gold", Client())([short] * 8)) == 8
    assert calls == [8, 4, 4]  # 40 characters are over the limit of 20, 20 are within it
    huge = {"conversation": [], "chosen": [{"role": "assistant", "content": "x" * 50}], "rejected": []}
    with pytest.raises(grpc.RpcError):  # not StageUnavailable: the runner dead-letters the pair
        grpc_scorer("x", "gold", Client())([huge])


def test_a_score_from_a_replica_that_has_not_loaded_the_models_files_version_is_read_again(tmp_path):
    # Found in review: scorer replicas converge on scorer.models_file within a poll, and a replica that has not
    # yet loaded the controller's new model scored the next stage's pairs with the old one, recorded as such.
    import json

    from synpref.client.client import PairScore
    from synpref.services.gold_scorer.scoring import ExpectedVersions, grpc_scorer
    from synpref.shared.config import ScorerSettings
    from synpref.shared.stage import StageUnavailable

    served = {"version": "working-1"}

    class Client:
        def score_pairs(self, pairs, model, timeout):
            return [PairScore(1.0, 0.0, 0.73, served["version"]) for _ in pairs]

    (tmp_path / "models.json").write_text(json.dumps({"best": {"path": "/data/rm/working-2"}}))
    expected = ExpectedVersions.from_settings(ScorerSettings(model_root=str(tmp_path), models_file="models.json"))
    score = grpc_scorer("x", "best", Client(), expected=expected)
    pair = {"conversation": [], "chosen": [{"role": "assistant", "content": "x"}], "rejected": []}
    with pytest.raises(StageUnavailable, match=r"served 'best' as \['working-1'\].*names 'working-2'"):
        score([pair])
    served["version"] = "working-2"  # the replica loaded it
    assert score([pair]) == [(1.0, 0.0, "working-2")]
    # A model the file does not name, or no file at all, is not checked.
    assert grpc_scorer("x", "gold", Client(), expected=expected)([pair])[0][2] == "working-2"
    (tmp_path / "models.json").unlink()
    served["version"] = "anything"
    assert score([pair])[0][2] == "anything"
