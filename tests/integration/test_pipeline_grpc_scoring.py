"""Gold-scorer stage in grpc mode against the real scorer service: same scores as in process, served versions."""

from __future__ import annotations

import pytest

from synpref.services.gold_scorer.scoring import make_scoring_stage, models_from_settings
from synpref.shared.config import ModelRef, ScorerSettings, ScoringSettings
from synpref.shared.pairs import new_pair, new_record

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
    for a, b in zip(over_grpc, in_process, strict=True):
        sa, sb = {s.model: s for s in a.scores}, {s.model: s for s in b.scores}
        assert {m: s.version for m, s in sa.items()} == {"gold": "g-served", "best": "b-served"}
        for role in ("gold", "best"):
            assert sa[role].reward_chosen == pytest.approx(sb[role].reward_chosen, abs=1e-4)
            assert sa[role].p == pytest.approx(sb[role].p, abs=1e-4)
