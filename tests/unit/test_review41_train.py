"""Review 41, the trainer's packing and model setup: decoders that ignore packed position restarts are not
packed (their sequences attended to each other), and flash-attention is loaded only for bf16 forwards (an
fp32 or fp64 run on a GPU with flash_attn failed in its first forward)."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from synpref.training import model_setup
from synpref.training.packing import ScoreCapture, packed_rewards, packing_problem
from synpref.training.reward_config import RewardConfig
from testing.tiny import build_tiny_reward_model

torch.set_num_threads(1)

SMALL = dict(vocab_size=100, num_labels=1, pad_token_id=0)


def tiny(kind: str) -> torch.nn.Module:
    configs = {
        "opt": lambda: T.OPTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32, **SMALL
        ),
        "falcon": lambda: T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, **SMALL),
        "bloom": lambda: T.BloomConfig(hidden_size=32, n_layer=2, n_head=2, **SMALL),
        "mistral": lambda: T.MistralConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            **SMALL,
        ),
        "qwen2": lambda: T.Qwen2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            **SMALL,
        ),
    }
    torch.manual_seed(0)
    return T.AutoModelForSequenceClassification.from_config(configs[kind]()).train()


@pytest.mark.parametrize("kind", ["opt", "falcon", "bloom"])
def test_a_decoder_that_lets_packed_sequences_attend_to_each_other_is_not_packed(kind):
    model = tiny(kind)
    seqs = [[5, 6, 7, 8, 9], [10, 11, 12]]
    with torch.no_grad():
        alone = model.eval()(input_ids=torch.tensor([seqs[1]])).logits[0, 0]
        packed = packed_rewards(model, ScoreCapture(model.score, 0), seqs, "cpu")[1]
    model.train()
    # The leak itself: packed, the second sequence's reward depends on the first (it was trained on that).
    assert abs(float(packed - alone)) > 1e-5
    assert "attend to each other" in packing_problem(model)
    with pytest.raises(ValueError, match="packing: on, but"):
        model_setup._choose_packing(RewardConfig(model_name_or_path="m", packing="on"), model)
    assert model.training  # the probe leaves the model as it found it


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_decoders_that_honour_position_restarts_are_still_packed(kind):
    model = tiny(kind)
    assert packing_problem(model) == ""
    assert model_setup._choose_packing(RewardConfig(model_name_or_path="m", packing="on"), model)
    assert model.training


class Loaded(Exception):
    """Stops load_for_training at the weights: no GPU here, and the choice is made by then."""


@pytest.mark.parametrize(("precision", "flash"), [("fp32", False), ("fp64", False), ("auto", True), ("bf16", True)])
def test_flash_attention_is_loaded_only_for_bf16_forwards(tmp_path, monkeypatch, precision, flash):
    path = build_tiny_reward_model(tmp_path / "m", arch="qwen3", seed=1, vocab_size=300)
    asked: list[bool] = []

    def from_pretrained(source: str, dtype: torch.dtype, use_flash: bool):
        asked.append(use_flash)
        raise Loaded

    monkeypatch.setattr(model_setup, "flash_attention_installed", lambda: True)
    monkeypatch.setattr(model_setup, "_from_pretrained", from_pretrained)
    cfg = RewardConfig(model_name_or_path=str(path), precision=precision)
    with pytest.raises(Loaded):
        model_setup.load_for_training(cfg, str(path), torch.device("cuda", 0), 1)
    # flash_attn's kernels take fp16/bf16 only: an fp32 or fp64 forward through them fails at the first step.
    assert asked == [flash]
