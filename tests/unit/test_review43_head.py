"""Review 43: a checkpoint without a trained score head is refused where a trained reward model is needed.

transformers fills a missing head with random weights and only logs a warning, so the scorer, the gold
scorer, eval and the controller used to serve noise from a base LM or an encoder published by mistake.
Training, which puts a head on a base model on purpose, loads through its own path and must keep working.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from synpref.services.scorer.backends import make_backend
from synpref.shared.batched_rewards import reward_of
from synpref.shared.modeling import load_reward_model
from synpref.training.model_setup import load_for_training
from synpref.training.reward_config import RewardConfig
from testing.tiny import build_tiny_reward_model, minilm_path

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def rm(tmp_path_factory) -> Path:
    return build_tiny_reward_model(tmp_path_factory.mktemp("rm"), arch="qwen3", seed=3)


def _headless(rm: Path, out: Path, cls) -> Path:
    """The RM's backbone saved as `cls` (a base model or a causal LM), with its tokenizer: no score head."""
    cls.from_config(AutoConfig.from_pretrained(rm)).save_pretrained(out)
    for f in rm.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out)
    return out


@pytest.mark.parametrize("cls", [AutoModel, AutoModelForCausalLM], ids=["base", "causal_lm"])
def test_a_checkpoint_without_a_score_head_is_refused(rm, tmp_path, cls):
    path = _headless(rm, tmp_path / "headless", cls)
    with pytest.raises(ValueError, match="not a trained reward model") as err:
        load_reward_model(str(path))
    assert str(path) in str(err.value) and "score.weight" in str(err.value)


def test_the_scorer_refuses_to_serve_a_headless_checkpoint(rm, tmp_path):
    path = _headless(rm, tmp_path / "base", AutoModel)
    with pytest.raises(ValueError, match=r"score\.weight"):
        make_backend("torch", str(path), "cpu", "float32", 128)


def test_a_plain_encoder_is_refused():
    # all-MiniLM-L6-v2 is a sentence encoder: BERT's classifier is not in it.
    with pytest.raises(ValueError, match=r"classifier\.bias, classifier\.weight"):
        load_reward_model(minilm_path())


def test_a_trained_reward_model_loads_and_scores_the_same_each_time(rm):
    first, tok = load_reward_model(str(rm))
    again, _ = load_reward_model(str(rm))
    ids = [[5, 6, 7, 8], [9, 10]]
    assert reward_of(first, ids, tok.pad_token_id) == reward_of(again, ids, tok.pad_token_id)


def test_training_still_puts_a_head_on_a_base_model(rm, tmp_path):
    path = _headless(rm, tmp_path / "base", AutoModel)
    cfg = RewardConfig(model_name_or_path=str(path), output_dir=str(tmp_path / "out"), progress=False)
    loaded = load_for_training(cfg, str(path), torch.device("cpu"), 1)
    assert loaded.model.config.num_labels == 1 and loaded.model.score.weight.shape[0] == 1
