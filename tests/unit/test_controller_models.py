"""The head trainer: learns, picks its step, and exports a checkpoint the ecosystem scores identically."""

from __future__ import annotations

import numpy as np
import pytest

from synpref.services.controller.models import HeadModels, accuracy, head_rewards, train_head
from synpref.shared.config import load_settings
from testing.controller_fakes import synthetic_pairs
from testing.numerics import approx_fp32_forward, fp32_forward_tolerance, near_ties


def separable(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    base = rng.normal(size=(n, dim))
    step = rng.uniform(0.5, 1.5, size=(n, 1)) * direction
    return (base + step).astype(np.float32), (base - step).astype(np.float32)


@pytest.mark.parametrize("train_pooler", [False, True])
def test_train_head_learns_and_picks_the_best_step(train_pooler):
    dim = 16
    rng = np.random.default_rng(0)
    init = {"W": (np.eye(dim) + 0.1 * rng.normal(size=(dim, dim))).astype(np.float32), "b": np.zeros(dim, np.float32)}
    train, valid = separable(200, dim, 1), separable(100, dim, 1)
    params, metrics = train_head(train, valid, init, 100, 10, 0.05, 0.0, 0, train_pooler)
    assert metrics["valid_accuracy"] > 0.9
    assert metrics["picked_step"] in [c["step"] for c in metrics["curve"]]
    assert max(c["valid_accuracy"] for c in metrics["curve"]) == metrics["valid_accuracy"]
    rewards = list(zip(head_rewards(params, valid[0]), head_rewards(params, valid[1]), strict=True))
    # valid_accuracy was counted in torch before the fitted scale multiplied w and c; numpy's
    # fp32 rewards order the pairs the same way up to rounding, so only near ties may differ.
    n = len(rewards)
    tolerance = fp32_forward_tolerance(max(abs(r) for pair in rewards for r in pair))
    differing = abs(round(metrics["valid_accuracy"] * n) - round(accuracy(rewards) * n))
    assert differing <= near_ties(rewards, tolerance)
    assert np.array_equal(params["W"], init["W"]) is (not train_pooler)


def test_exported_checkpoint_scores_like_the_cached_head(tmp_path):
    from synpref.shared.modeling import load_reward_model, score_pairs

    settings = load_settings(controller={"workdir": str(tmp_path), "max_length": 48, "head_steps": 20})
    models = HeadModels(settings.controller, tmp_path, progress=False)
    pairs = [
        {
            "conversation": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in synthetic_pairs(8)
    ]
    handle = models.train("t", pairs[:6], pairs[6:], tmp_path / "models")
    assert handle.version.startswith("t-") and handle.metrics["train_pairs"] == 6
    cached = models.score(handle, pairs)
    folder = models.export(handle, tmp_path / "models" / handle.version)
    model, tokenizer = load_reward_model(str(folder))
    served = score_pairs(model, tokenizer, pairs, max_length=48)
    # numpy's head on cached [CLS] states vs the whole fp32 forward in torch: same weights,
    # other kernels. The fitted scale makes these rewards hundreds, so the bound is relative.
    assert [r for pair in served for r in pair] == approx_fp32_forward([r for pair in cached for r in pair])
    assert len({round(c - r, 6) for c, r in cached}) > 1, "the head is not constant"
    assert models.export(handle, folder) == folder, "export is idempotent"
    # A second HeadModels on the same folder reads the feature cache instead of encoding again.
    again = HeadModels(settings.controller, tmp_path, progress=False)
    assert len(again.cache.cache) == len(models.cache.cache) > 0


def test_fit_scale_recovers_the_temperature_of_squeezed_margins():
    from synpref.services.controller.models import fit_scale

    rng = np.random.default_rng(0)
    raw = rng.normal(0.05, 0.1, size=20000)  # an L2 head's margins: right sign, tiny size
    agrees = rng.random(raw.size) < 1.0 / (1.0 + np.exp(-10.0 * raw))
    signed = np.where(agrees, raw, -raw)
    # The grid (61 points over 3 decades, 12% apart) holds 10 itself. Over these 20000 margins
    # the likelihood's standard error at s = 10 is 0.175 (Fisher information), and a neighbour
    # (8.91 or 11.2) would win only with the maximum past 9.46 or 10.6, 3 of them away: exactly 10.
    assert fit_scale(signed) == 10.0
    assert fit_scale(np.array([])) == 1.0
    assert fit_scale(np.full(10, 5.0)) >= 100.0, "all right and far apart: a large scale"


def test_feature_cache_tokenizes_a_pair_once(tmp_path, monkeypatch):
    from synpref.services.controller.models import FeatureCache, default_backbone

    cache = FeatureCache(default_backbone(), 48, tmp_path)
    pairs = [
        {
            "conversation": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in synthetic_pairs(4)
    ]
    first = cache.features(pairs)
    encoded: list[int] = []
    encode = cache._encode
    monkeypatch.setattr(cache, "_encode", lambda batch: encoded.append(len(batch)) or encode(batch))
    again = cache.features(list(reversed(pairs)))
    assert encoded == [0]  # every pair known: no tokenizer pass
    assert np.array_equal(again[0], first[0][::-1]) and np.array_equal(again[1], first[1][::-1])
    changed = [{**pairs[0], "chosen": [{"role": "assistant", "content": "something else entirely"}]}]
    new = cache.features(changed)
    assert encoded == [0, 1]  # new content is encoded, not looked up by a stale key
    assert not np.array_equal(new[0][0], first[0][0]) and np.array_equal(new[1][0], first[1][0])


def test_the_auto_rules_probe_trains_with_the_gold_role():
    from synpref.services.controller.models import role_of

    assert [role_of(n) for n in ("working-3", "gold", "gold-probe", "final")] == ["working", "gold", "gold", "final"]
