"""Gold-scorer stage in grpc mode against the real scorer service: same scores as in process, served versions."""

from __future__ import annotations

import pytest

from synpref.services.gold_scorer.scoring import make_scoring_stage, models_from_settings
from synpref.shared.config import ModelRef, ScorerSettings, ScoringSettings
from synpref.shared.pairs import new_pair, new_record
from testing.numerics import approx_fp32_forward, fp32_forward_tolerance

pytestmark = pytest.mark.integration
torch = pytest.importorskip("torch")


def rec(i: int):
    return new_record(new_pair([{"role": "user", "content": f"Tell me about the moon, question {i}."}],
                               [{"role": "assistant", "content": "It orbits the Earth. " * (i % 3 + 1)}],
                               [{"role": "assistant", "content": "Cheese."}], "test"))  # fmt: skip


def test_grpc_mode_matches_in_process(tmp_path):
    from synpref.services.scorer.server import BackgroundScorer
    from testing.tiny import build_tiny_reward_model

    torch.set_num_threads(1)
    gold = build_tiny_reward_model(tmp_path / "gold", layers=1, hidden=32, heads=2, kv_heads=1, seed=1)
    best = build_tiny_reward_model(tmp_path / "best", layers=1, hidden=32, heads=2, kv_heads=1, seed=2)
    served = {
        "gold": ModelRef(path=str(gold), version="g-served"),
        "best": ModelRef(path=str(best), version="b-served"),
    }
    scorer = BackgroundScorer(ScorerSettings(port=0, http_port=0, metrics_port=0, models=served, max_length=256))
    scorer.start()
    try:
        records = [rec(i) for i in range(6)]
        remote = ScoringSettings(mode="grpc", scorer_address=scorer.address)
        local = ScoringSettings(gold=ModelRef(path=str(gold)), best=ModelRef(path=str(best)), max_length=256)
        over_grpc = make_scoring_stage(models_from_settings(remote))(records).by_route()["scored"]
        in_process = make_scoring_stage(models_from_settings(local))(records).by_route()["scored"]
    finally:
        scorer.stop()
    assert all({s.model: s.version for s in r.scores} == {"gold": "g-served", "best": "b-served"} for r in over_grpc)
    for role in ("gold", "best"):
        served = [next(s for s in r.scores if s.model == role) for r in over_grpc]
        local = [next(s for s in r.scores if s.model == role) for r in in_process]
        # The server's batches vs score_pairs' batches: the same fp32 model summed in another order.
        rewards = [x for s in local for x in (s.reward_chosen, s.reward_rejected)]
        scale = max(abs(x) for x in rewards)
        assert [x for s in served for x in (s.reward_chosen, s.reward_rejected)] == approx_fp32_forward(rewards)
        # p = sigmoid(r_c - r_r) and sigmoid' <= 1/4: a margin off by 2 tolerances moves p by half of one.
        p_bound = fp32_forward_tolerance(scale) / 2
        assert [s.p for s in served] == pytest.approx([s.p for s in local], rel=0, abs=p_bound)


def test_scores_name_the_version_that_scored_them_after_a_reload(tmp_path):
    # The controller reloads the scorer each iteration; a gold-scorer started before must label
    # each score with the version the scorer served for it, not the one it saw at start-up.
    from synpref.services.scorer.server import BackgroundScorer
    from testing.tiny import build_tiny_reward_model

    torch.set_num_threads(1)
    first = build_tiny_reward_model(tmp_path / "first", layers=1, hidden=32, heads=2, kv_heads=1, seed=1)
    second = build_tiny_reward_model(tmp_path / "second", layers=1, hidden=32, heads=2, kv_heads=1, seed=2)
    served = {"gold": ModelRef(path=str(first), version="gold-1"), "best": ModelRef(path=str(first), version="best-1")}
    scorer = BackgroundScorer(ScorerSettings(port=0, http_port=0, metrics_port=0, models=served, max_length=256))
    scorer.start()
    try:
        stage = make_scoring_stage(models_from_settings(ScoringSettings(mode="grpc", scorer_address=scorer.address)))
        before = stage([rec(0)]).by_route()["scored"][0]
        scorer.run(scorer.server.registry.reload("best", ModelRef(path=str(second), version="best-2")))
        after = stage([rec(1)]).by_route()["scored"][0]
    finally:
        scorer.stop()
    assert {s.model: s.version for s in before.scores} == {"gold": "gold-1", "best": "best-1"}
    assert {s.model: s.version for s in after.scores} == {"gold": "gold-1", "best": "best-2"}
