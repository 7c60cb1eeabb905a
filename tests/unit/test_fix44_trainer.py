"""Fix 44, the reward trainer's checkpoints: a run that saves checkpoints into the folder its starting model lies
in is refused (a save or the rotation replaced or removed that model), a save killed mid-write leaves no
temporary folder past the next start, and a resume sees chosen and rejected swapped (a relabelled dataset)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from synpref.training.batching import EncodedPair
from synpref.training.checkpointing import TRAINER_STATE, check_data_order, data_order
from synpref.training.reward_config import RewardConfig
from synpref.training.reward_trainer import RewardTrainer
from synpref.training.token_store import PairStoreWriter
from testing.tiny import build_tiny_reward_model

torch.set_num_threads(1)

WORDS = ["apple", "river", "stone", "cloud", "music", "paper", "light", "green"]


def make_pairs(n: int) -> list[dict]:
    pairs = []
    for i in range(n):
        topic = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 5))
        pairs.append(
            {
                "conversation": [{"role": "user", "content": f"tell me about {topic}"}],
                "chosen": [{"role": "assistant", "content": f"thank you, gladly: {topic}"}],
                "rejected": [{"role": "assistant", "content": f"no, go away {topic}"}],
            }
        )
    return pairs


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    texts = [m["content"] for p in make_pairs(40) for part in ("conversation", "chosen", "rejected") for m in p[part]]
    return build_tiny_reward_model(tmp_path_factory.mktemp("m"), arch="qwen3", seed=5, texts=texts, vocab_size=300)


def config(path, out, **kw) -> RewardConfig:
    base = dict(
        model_name_or_path=str(path),
        output_dir=str(out),
        global_batch_size=8,
        micro_batch_size=4,
        max_steps=4,
        learning_rate=5e-3,
        max_length=64,
        progress=False,
        seed=7,
    )
    base.update(kw)
    return RewardConfig(**base)


@pytest.fixture
def first_run(model_path, tmp_path_factory):
    """A run's output_dir with checkpoint-3 (of 5 steps, save_steps 3)."""
    out = tmp_path_factory.mktemp("first") / "o"
    RewardTrainer(config(model_path, out, max_steps=5, save_steps=3), make_pairs(40), []).train()
    assert (out / "checkpoint-3" / TRAINER_STATE).exists()
    return out


@pytest.mark.parametrize(
    "saves",
    [
        dict(save_steps=3),  # this run's checkpoint-3 replaced the model it started from
        dict(save_steps=2, save_total_limit=1),  # the rotation removed it after this run's checkpoint-4
    ],
)
@pytest.mark.parametrize("linked", [False, True])
def test_a_run_saving_checkpoints_beside_its_starting_checkpoint_is_refused(
    first_run, tmp_path, monkeypatch, saves, linked
):
    source, out = first_run / "checkpoint-3", first_run
    weights = (source / "model.safetensors").read_bytes()
    if linked:  # a symlink to the checkpoint and a relative output_dir through another link name the same folders
        (tmp_path / "src").symlink_to(source)
        (tmp_path / "out").symlink_to(first_run)
        monkeypatch.chdir(tmp_path)
        source, out = tmp_path / "src", "out"
    cfg = config(source, out, max_steps=5, resume=False, **saves)
    with pytest.raises(ValueError, match=r"checkpoint-3 of output_dir") as refused:
        RewardTrainer(cfg, make_pairs(40), []).train()
    message = str(refused.value)
    assert str(first_run.resolve()) in message and "another output_dir" in message and "resume: true" in message
    assert (first_run / "checkpoint-3" / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize("linked", [False, True])
def test_a_run_that_saves_no_checkpoints_is_refused_too(first_run, tmp_path, linked):
    # Allowed before: it kept its source, and a later resume: true in that output_dir took the other run's
    # checkpoint-3 (its optimizer, step 3) for this run's. Linked: output_dir's checkpoint-3 links to first_run's.
    out = first_run
    if linked:
        out = tmp_path / "o"
        out.mkdir()
        os.symlink(first_run / "checkpoint-3", out / "checkpoint-3")
    cfg = config(out / "checkpoint-3", out, max_steps=1, save_steps=0, resume=False)
    with pytest.raises(ValueError, match=r"checkpoint-3 of output_dir .*Copy it out of output_dir"):
        RewardTrainer(cfg, make_pairs(40), [])
    assert (first_run / "checkpoint-3" / TRAINER_STATE).exists()


@pytest.mark.parametrize("resume", [False, True])
def test_a_start_removes_the_temporary_folders_of_killed_saves(model_path, tmp_path, caplog, resume):
    out = tmp_path / "o"
    if resume:
        RewardTrainer(config(model_path, out, max_steps=4, save_steps=2), make_pairs(40), []).train()
    killed = [out / "checkpoint-6.tmp", out / "checkpoint-12.tmp"]  # killed mid-save: a part of a checkpoint each
    kept = [out / "checkpoint-x.tmp", out / "notes.tmp", out / "mine.tmp", out / "checkpoint-6.tmp.bak"]
    for folder in killed + kept:
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half")
    (out / "data.tmp").write_text("a file, not the trainer's")
    caplog.set_level(logging.INFO, logger="synpref.training")
    trainer = RewardTrainer(config(model_path, out, max_steps=5, save_steps=0, resume=resume), make_pairs(40), [])
    assert (trainer.resume_from is not None) == resume
    trainer.train()
    # Before: they stayed (a whole model and optimizer each) until a save of that same step.
    assert not [p for p in killed if p.exists()]
    assert all(p.exists() for p in kept) and (out / "data.tmp").exists()
    assert all(any(str(p) in r.getMessage() for r in caplog.records) for p in killed)


def relabelled(pairs: list[dict], every: int) -> list[dict]:
    """The same pairs with every `every`-th one's chosen and rejected swapped."""
    out = [dict(p) for p in pairs]
    for p in out[::every]:
        p["chosen"], p["rejected"] = p["rejected"], p["chosen"]
    return out


def test_a_resume_refuses_a_relabelled_dataset(model_path, tmp_path):
    out = tmp_path / "o"
    RewardTrainer(config(model_path, out, max_steps=8, save_steps=3), make_pairs(40), []).train()
    # Same pairs, same token counts, some labels flipped: before, it resumed from checkpoint-6 over other labels.
    with pytest.raises(ValueError, match=r"other data or in another order.*pair_ids_sha256"):
        RewardTrainer(config(model_path, out, max_steps=8, save_steps=3), relabelled(make_pairs(40), 7), []).train()
    # The same data still resumes.
    again = RewardTrainer(config(model_path, out, max_steps=8, save_steps=3), make_pairs(40), [])
    assert again.resume_from == out / "checkpoint-6"
    again.train()


def test_the_fingerprint_sees_swapped_sides_and_is_the_same_for_a_store_and_a_list():
    cfg = RewardConfig(model_name_or_path="m", seed=1, global_batch_size=2)
    pairs = [EncodedPair([1, 2, 3], [4, 5]), EncodedPair([6], [7, 8])]
    swapped = [pairs[0], EncodedPair([7, 8], [6])]
    writer = PairStoreWriter()
    for p in pairs:
        writer.add(p.chosen, p.rejected)
    store = writer.finish()
    assert data_order(store, cfg) == data_order(pairs, cfg)
    assert data_order(swapped, cfg)["pair_ids_sha256"] != data_order(pairs, cfg)["pair_ids_sha256"]
    # Moving a token from one side to the other keeps every id and count: the sides' lengths tell them apart.
    moved = [EncodedPair([1, 2], [3, 4, 5]), pairs[1]]
    assert data_order(moved, cfg)["pair_ids_sha256"] != data_order(pairs, cfg)["pair_ids_sha256"]


def test_a_checkpoint_of_the_previous_version_is_refused_with_the_reason(tmp_path):
    cfg = RewardConfig(model_name_or_path="m", seed=1, global_batch_size=2)
    now = data_order([EncodedPair([1, 2, 3], [4, 5])], cfg)
    saved = {k: v for k, v in now.items() if k != "pair_ids_sha256"} | {"pair_tokens_sha256": "0" * 64}
    with pytest.raises(ValueError, match=r"pair_ids_sha256 not recorded.*earlier version.*resume: false") as refused:
        check_data_order(tmp_path / "checkpoint-6", saved, now)
    assert str(tmp_path / "checkpoint-6") in str(refused.value)
