"""Review 45 (F), what a run may start from: never output_dir's final (the run's end replaces it), and a fresh
run removes a checkpoint-N that is a link (rmtree refused it, so a later resume took the linked checkpoint)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from synpref.training.checkpointing import TRAINER_STATE, latest_checkpoint, remove_checkpoints
from synpref.training.reward_config import RewardConfig
from synpref.training.reward_trainer import RewardTrainer
from testing.tiny import build_tiny_reward_model

torch.set_num_threads(1)


def make_pairs(n: int) -> list[dict]:
    return [
        {
            "conversation": [{"role": "user", "content": f"tell me about item {i}"}],
            "chosen": [{"role": "assistant", "content": f"gladly, item {i}"}],
            "rejected": [{"role": "assistant", "content": "no"}],
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    texts = [m["content"] for p in make_pairs(16) for part in ("conversation", "chosen", "rejected") for m in p[part]]
    return build_tiny_reward_model(tmp_path_factory.mktemp("m"), arch="qwen3", seed=5, texts=texts, vocab_size=300)


def config(path, out) -> RewardConfig:
    return RewardConfig(
        model_name_or_path=str(path),
        output_dir=str(out),
        global_batch_size=8,
        micro_batch_size=4,
        max_steps=1,
        max_length=64,
        progress=False,
        save_steps=0,
    )


@pytest.mark.parametrize("linked", [False, True])
def test_a_run_may_not_start_from_its_output_dirs_final(model_path, tmp_path, monkeypatch, linked):
    out = tmp_path / "o"
    shutil.copytree(model_path, out / "final")  # an earlier run's result, now named as this run's model
    weights = (out / "final" / "model.safetensors").read_bytes()
    source = out / "final"
    if linked:  # a link to it, and a relative output_dir: the same folders once resolved
        (tmp_path / "src").symlink_to(out / "final")
        monkeypatch.chdir(tmp_path)
        source, out = tmp_path / "src", "o"
    # Before: it trained and replaced final, so a rerun of this config started from that run's model.
    with pytest.raises(ValueError, match=r"final of output_dir .*replaces it.*Copy it out of output_dir") as refused:
        RewardTrainer(config(source, out), make_pairs(16), []).train()
    assert "resume: true" not in str(refused.value)
    assert (tmp_path / "o" / "final" / "model.safetensors").read_bytes() == weights


def test_a_fresh_run_removes_a_linked_checkpoint_but_not_its_target(tmp_path):
    elsewhere = tmp_path / "kept" / "checkpoint-3"
    elsewhere.mkdir(parents=True)
    (elsewhere / TRAINER_STATE).write_bytes(b"state")
    out = tmp_path / "o"
    out.mkdir()
    os.symlink(elsewhere, out / "checkpoint-3")
    assert remove_checkpoints(out) == [out / "checkpoint-3"]
    # Before: the link stayed and a later resume: true in output_dir took that checkpoint for its own.
    assert latest_checkpoint(out) is None and (elsewhere / TRAINER_STATE).read_bytes() == b"state"
