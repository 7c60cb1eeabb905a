"""Review 39, the reward trainer's loop: packed micro-batches keep the pair cap, a fresh run's checkpoints
are not pruned for an earlier run's, a resume refuses a checkpoint of other data, and a NaN step stops the
run before it makes every weight NaN."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from synpref.training.batching import packed_micro_batches
from synpref.training.checkpointing import latest_checkpoint
from synpref.training.reward_config import RewardConfig
from synpref.training.reward_trainer import RewardTrainer
from testing.tiny import build_tiny_reward_model

torch.set_num_threads(1)

WORDS = ["apple", "river", "stone", "cloud", "music", "paper", "light", "green"]


def make_pairs(n: int, offset: int = 0) -> list[dict]:
    pairs = []
    for i in range(offset, offset + n):
        topic = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 5))
        pairs.append(
            {
                "conversation": [{"role": "user", "content": f"tell me about {topic}"}],
                "chosen": [{"role": "assistant", "content": f"thank you, gladly: {topic}"}],
                "rejected": [{"role": "assistant", "content": f"no, go away {topic}"}],
                "source": "even" if i % 2 == 0 else "odd",
                "m": 0.5,
            }
        )
    return pairs


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    texts = [m["content"] for p in make_pairs(64) for part in ("conversation", "chosen", "rejected") for m in p[part]]
    return build_tiny_reward_model(tmp_path_factory.mktemp("m"), arch="qwen3", seed=5, texts=texts, vocab_size=300)


def config(path, out, **kw) -> RewardConfig:
    base = dict(
        model_name_or_path=str(path),
        output_dir=str(out),
        global_batch_size=8,
        micro_batch_size=4,
        max_steps=4,
        learning_rate=5e-3,
        lr_scheduler="linear",
        max_length=64,
        logging_steps=1,
        progress=False,
        seed=7,
    )
    base.update(kw)
    return RewardConfig(**base)


def checkpoints(out) -> list[str]:
    return sorted((p.name for p in out.glob("checkpoint-*")), key=lambda name: int(name.split("-")[1]))


def test_packed_rows_keep_the_pair_cap_when_the_token_cap_is_off(model_path, tmp_path):
    # max_tokens_per_micro_batch 0 = "no cap (a whole micro_batch_size ...)": packed, the pair cap was ignored
    # and a rank's whole share (and its whole eval set) went into one forward: an OOM at a real batch size.
    cfg = config(
        model_path, tmp_path, packing="on", max_tokens_per_micro_batch=0, micro_batch_size=2, eval_batch_size=4
    )
    trainer = RewardTrainer(cfg, make_pairs(16), make_pairs(40, offset=100))
    forwards = []
    trainer.model.register_forward_hook(lambda *_: forwards.append(1))
    trainer.train_step(list(range(8)))
    assert len(forwards) == 4  # 8 pairs, 2 to a forward
    forwards.clear()
    trainer.reward_arrays(trainer.eval_enc.pairs)
    assert len(forwards) == math.ceil(len(trainer.eval_enc.pairs) / 2) > 1  # eval_batch_size 4 = 2 pairs
    # The token cap still binds where it is the tighter one.
    assert packed_micro_batches(range(4), [10] * 4, 25, 3) == [[0, 1], [2, 3]]
    assert packed_micro_batches(range(4), [10] * 4, 0, 3) == [[0, 1, 2], [3]]


def test_a_fresh_run_keeps_its_checkpoints_and_a_resume_finds_them(model_path, tmp_path):
    out = tmp_path / "o"
    RewardTrainer(config(model_path, out, max_steps=14, save_steps=3), make_pairs(48), []).train()
    assert checkpoints(out) == ["checkpoint-9", "checkpoint-12"]
    # Another run into the same folder, not resuming: save_total_limit kept the old run's higher numbers and
    # pruned this run's checkpoint-3 at once; after a crash, a resume took the old run's checkpoint-12.
    fresh = RewardTrainer(config(model_path, out, max_steps=5, save_steps=3, resume=False), make_pairs(48), [])
    fresh.train()
    assert checkpoints(out) == ["checkpoint-3"]
    assert latest_checkpoint(out) == out / "checkpoint-3"
    # A fresh run may not start from one of them (a later resume would take it for that run's): refused, kept.
    onward = config(out / "checkpoint-3", out, max_steps=2, resume=False)
    with pytest.raises(ValueError, match="checkpoint-3 of output_dir"):
        RewardTrainer(onward, make_pairs(48), [])
    assert checkpoints(out) == ["checkpoint-3"] and (out / "checkpoint-3" / "config.json").exists()


def test_a_resume_refuses_a_checkpoint_of_other_data_and_retraces_its_own(model_path, tmp_path):
    out = tmp_path / "o"
    first = RewardTrainer(config(model_path, out, max_steps=8, save_steps=3), make_pairs(40), [])
    first.train()
    want = {k: v.detach().clone() for k, v in first.model.named_parameters()}
    # New pairs came in (a dataset folder that grew, a controller rerun): step 6 of the old order is not step 6
    # of the new one, so resuming trains some pairs twice and others never, silently.
    with pytest.raises(ValueError, match=r"other data or in another order.*pairs 40 -> 48"):
        RewardTrainer(config(model_path, out, max_steps=8, save_steps=3), make_pairs(48), []).train()
    with pytest.raises(ValueError, match="global_batch_size 8 -> 4"):
        RewardTrainer(
            config(model_path, out, max_steps=8, save_steps=3, global_batch_size=4), make_pairs(40), []
        ).train()
    # The same data resumes from checkpoint-6 and retraces steps 7-8 to the same weights.
    again = RewardTrainer(config(model_path, out, max_steps=8, save_steps=3), make_pairs(40), [])
    assert again.resume_from == out / "checkpoint-6"
    again.train()
    for k, v in again.model.named_parameters():
        assert torch.equal(v, want[k]), k


def test_a_non_finite_step_stops_the_run_before_the_update(model_path, tmp_path, monkeypatch):
    from synpref.training import reward_trainer

    real, calls = reward_trainer.bt_loss, []

    def diverging(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * math.nan if len(calls) > 2 else loss  # a diverged step after two good micro-batches

    monkeypatch.setattr(reward_trainer, "bt_loss", diverging)
    trainer = RewardTrainer(config(model_path, tmp_path, max_steps=3), make_pairs(16), [])
    with pytest.raises(FloatingPointError, match=r"step \d: non-finite loss"):
        trainer.train()
    # Before: that step made every weight NaN and the run saved them as its final model, reported "done".
    assert all(bool(torch.isfinite(v).all()) for v in trainer.model.parameters())
    assert not (tmp_path / "final").exists()


def test_a_nan_margin_is_refused_when_the_pairs_are_encoded(model_path, tmp_path):
    # A missing float in a Parquet margin column reads as NaN: kept, it made the first step that drew the pair NaN,
    # hours into a run; refused while encoding, it names the pair.
    pairs = make_pairs(16)
    pairs[3]["m"] = math.nan
    pairs[3]["id"] = "p3"
    with pytest.raises(ValueError, match="margin_column 'm' is nan for pair p3"):
        RewardTrainer(config(model_path, tmp_path, margin_column="m", max_steps=2), pairs, [])


def test_a_resume_takes_the_save_a_kill_left_between_its_two_renames(model_path, tmp_path):
    """write_checkpoint moves the previous checkpoint-N aside (.old), then renames the complete .tmp in. Killed in
    between, the newest save is checkpoint-N.tmp: the trainer listed the checkpoints before finishing that swap,
    so it resumed from the save before and redid its steps."""
    out = tmp_path / "o"
    RewardTrainer(config(model_path, out, max_steps=5, save_steps=2), make_pairs(48), []).train()
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    newest = out / "checkpoint-4"
    shutil.copytree(newest, out / "checkpoint-4.old")  # the save it replaced, moved aside
    newest.rename(out / "checkpoint-4.tmp")  # complete and fsynced, not yet renamed in
    resumed = RewardTrainer(config(model_path, out, max_steps=6, save_steps=2, resume=True), make_pairs(48), [])
    assert resumed.resume_from == newest
    assert sorted(p.name for p in out.glob("checkpoint-4*")) == ["checkpoint-4"]
