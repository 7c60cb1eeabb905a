"""Padding-free packing and the automatic micro-batch plan of the Bradley–Terry trainer."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from synpref.shared.batched_rewards import pad_batch
from synpref.shared.modeling import encode_pair, load_reward_model
from synpref.training.batching import auto_token_budget, memory_token_cap, packed_micro_batches
from synpref.training.model_setup import load_for_training
from synpref.training.packing import ScoreCapture, pack_sequences, packed_rewards, packing_problem
from synpref.training.reward_config import RewardConfig
from synpref.training.reward_trainer import RewardTrainer
from testing.numerics import FP32_EPS, approx_fp32_forward, fp32_forward_tolerance
from testing.tiny import build_tiny_reward_model
from tests.unit.test_train import config, make_pairs, texts

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def decoder(request, tmp_path_factory):
    pairs = make_pairs(12, seed=4, long_every=5)
    path = build_tiny_reward_model(
        tmp_path_factory.mktemp(request.param), arch=request.param, seed=2, texts=texts(pairs), vocab_size=400
    )
    return path, pairs


def sequences(tokenizer, pairs) -> list[list[int]]:
    return [enc.input_ids for pair in pairs for enc in encode_pair(tokenizer, pair, 512, "left_turns")]


def test_pack_sequences_restarts_positions_and_marks_ends():
    ids, positions, ends = pack_sequences([[5, 6, 7], [8], [9, 10]])
    assert ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert positions.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert ends.tolist() == [2, 3, 5]


def test_packed_rewards_equal_padded_and_single_rewards_in_fp32(decoder):
    path, pairs = decoder
    model, tokenizer = load_reward_model(str(path))
    seqs = sequences(tokenizer, pairs)
    assert len({len(s) for s in seqs}) > 3  # lengths differ a lot (every 5th rejected is long)
    with torch.inference_mode():
        ids, mask = pad_batch(seqs, tokenizer.pad_token_id)
        padded = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        single = torch.stack([model(input_ids=torch.tensor([s])).logits[0, 0] for s in seqs])
        packed = packed_rewards(model, ScoreCapture(model.score), seqs, "cpu")
    assert packed.dtype == torch.float32 and packed.shape == padded.shape
    # One packed row, padded rows, one row each: the same fp32 arithmetic summed in other orders.
    tolerance = fp32_forward_tolerance(float(single.abs().max()))
    torch.testing.assert_close(packed, single, rtol=0, atol=tolerance)
    torch.testing.assert_close(packed, padded, rtol=0, atol=tolerance)
    # A packed row without its position restarts lets tokens attend across sequences: different rewards.
    with torch.inference_mode():
        run_on = model(input_ids=torch.tensor([[t for s in seqs[:2] for t in s]])).logits[0, 0]
    assert abs(float(run_on) - float(packed[1])) > tolerance


def test_packed_gradients_equal_padded_gradients(decoder):
    path, pairs = decoder
    grads = []
    for packed in (False, True):
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=torch.float64)
        _, tokenizer = load_reward_model(str(path))
        seqs = sequences(tokenizer, pairs[:4])
        if packed:
            rewards = packed_rewards(model, ScoreCapture(model.score), seqs, "cpu")
        else:
            ids, mask = pad_batch(seqs, tokenizer.pad_token_id)
            rewards = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        (rewards[0::2] - rewards[1::2]).sigmoid().log().sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    # fp64, except that transformers' RMSNorm computes in fp32: its roundings match in both
    # layouts (inputs ~1e-16 apart; measured: 4 fp64 ulps of each tensor's largest gradient)
    # unless one lands across a rounding boundary, which moves a gradient by ~FP32_EPS of its tensor's scale.
    for k, g in grads[0].items():
        torch.testing.assert_close(grads[1][k], g, rtol=0, atol=FP32_EPS * float(g.abs().max()), msg=k)


def test_encoders_are_not_packed(tmp_path):
    path = build_tiny_reward_model(tmp_path / "bert", arch="bert", texts=texts(make_pairs(4)), vocab_size=300)
    model, _ = load_reward_model(str(path))
    assert "score" in packing_problem(model)
    with pytest.raises(ValueError, match="packing: on"):
        load_for_training(RewardConfig(packing="on"), str(path), torch.device("cpu"), 1)
    loaded = load_for_training(RewardConfig(packing="auto"), str(path), torch.device("cpu"), 1)
    assert loaded.capture is None


def test_cpu_defaults_pad_under_an_automatic_token_budget_and_packing_on_trains(decoder, tmp_path):
    path, _ = decoder
    train = make_pairs(16, seed=1)
    auto = RewardTrainer(config(path, tmp_path / "auto", max_steps=1), train, train[:6])
    # On CPU auto means padded micro-batches (no varlen kernel), budget max(2 x max_length, 1024).
    assert auto.capture is None and (auto.micro_pairs, auto.micro_tokens) == (3, 1024)
    packed = RewardTrainer(config(path, tmp_path / "packed", max_steps=1, packing="on"), train, train[:6])
    assert packed.capture is not None
    before = packed.rewards(packed.eval_enc.pairs)
    padded = auto.rewards(auto.eval_enc.pairs)
    assert len(padded) == len(before)  # padded vs packed micro-batches: fp32 in another order
    assert [x for pair in padded for x in pair] == approx_fp32_forward([x for pair in before for x in pair])
    result = packed.train()
    assert result.metrics["steps"] == 1 and packed.rewards(packed.eval_enc.pairs) != before


def test_packed_micro_batches_respect_the_budget():
    tokens = [300, 200, 900, 100, 100, 2000]
    rows = packed_micro_batches(range(6), tokens, max_tokens=1000)
    assert rows == [[0, 1], [2, 3], [4], [5]]  # a pair over the budget runs alone
    assert packed_micro_batches(range(6), tokens, max_tokens=0) == [list(range(6))]  # 0: no cap


def test_auto_token_budget_per_device():
    assert auto_token_budget(512, 8, "cpu") == 1024
    assert auto_token_budget(128, 8, "cpu") == 1024 and auto_token_budget(4096, 8, "cpu") == 8192
    assert auto_token_budget(4096, 8, "cuda") == 65536  # memory unknown: the micro_batch_size envelope
    assert auto_token_budget(4096, 8, "cuda", memory_tokens=20000) == 20000
    assert auto_token_budget(4096, 8, "cuda", memory_tokens=100) == 8192  # one longest pair always runs
    # Qwen3-0.6B (28 layers, hidden 1024) on 139 GiB: ~57k tokens of activations; checkpointing holds more.
    full = memory_token_cap(139 * 2**30, 596_000_000, 28, 1024, checkpointing=False)
    ckpt = memory_token_cap(139 * 2**30, 596_000_000, 28, 1024, checkpointing=True)
    assert 40_000 < full < 80_000 and ckpt > 10 * full
    assert memory_token_cap(2**30, 596_000_000, 28, 1024, checkpointing=False) == 0


def test_packed_rewards_are_read_where_padded_ones_are_when_eos_stands_in_for_pad(tmp_path):
    # Found in review: a tokenizer without a pad token gets EOS as pad (Llama 3); its template ends each
    # sequence with that token, so a padded batch (and the scorer) reads the reward one token earlier.
    # The packed path read the EOS itself: a model trained packed was served at a position it never learned.
    import json
    import shutil

    from synpref.shared.batched_rewards import reward_of

    pairs = make_pairs(6, seed=4)
    path = build_tiny_reward_model(tmp_path / "llama", arch="llama", seed=2, texts=texts(pairs), vocab_size=400)
    nopad = tmp_path / "llama-no-pad"
    shutil.copytree(path, nopad)
    for name, key in (("tokenizer_config.json", "pad_token"), ("config.json", "pad_token_id")):
        config = json.loads((nopad / name).read_text())
        config.pop(key, None)
        (nopad / name).write_text(json.dumps(config))
    model, tokenizer = load_reward_model(str(nopad))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == model.config.pad_token_id
    seqs = sequences(tokenizer, pairs)
    assert all(s[-1] == tokenizer.eos_token_id for s in seqs)  # the template ends with the stand-in pad
    with torch.inference_mode():
        padded = torch.tensor(reward_of(model, seqs, tokenizer.pad_token_id))
        packed = packed_rewards(model, ScoreCapture(model.score, model.config.pad_token_id), seqs, "cpu")
        at_eos = packed_rewards(model, ScoreCapture(model.score), seqs, "cpu")  # the old reading
    tolerance = fp32_forward_tolerance(float(padded.abs().max()))
    torch.testing.assert_close(packed, padded, rtol=0, atol=tolerance)
    assert (at_eos - padded).abs().max() > 10 * tolerance
    _, _, ends = pack_sequences([[5, 6, 2, 2], [2, 2], [7]], pad_id=2)
    assert ends.tolist() == [1, 4, 6]  # trailing pads skipped; an all-pad sequence reads its first token
