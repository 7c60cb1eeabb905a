"""Evaluation and the held-out split at scale: flat arrays instead of a Python object per eval pair, the split's
copies of the conversation keys, and metrics of a diverged (NaN) model."""

from __future__ import annotations

import math
import statistics
import tracemalloc
from collections import defaultdict
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from synpref.training.batching import EncodedPair
from synpref.training.evaluation import pairwise_metrics
from synpref.training.reward_trainer import RewardTrainer
from synpref.training.token_store import EncodedSet, PairStoreWriter


def old_pairwise_metrics(rewards: Sequence[tuple[float, float]], sources: Sequence[str] | None = None) -> dict:
    """pairwise_metrics as it was (lists of Python floats, statistics): the figures must stay bitwise these."""
    n = len(rewards)
    if n == 0:
        return {"pairs": 0}
    correct = [c > r for c, r in rewards]
    flat = [x for pair in rewards for x in pair]
    out: dict[str, Any] = {
        "pairs": n,
        "accuracy": sum(correct) / n,
        "reward_mean": statistics.fmean(flat),
        "reward_std": statistics.pstdev(flat),
        "chosen_mean": statistics.fmean(c for c, _ in rewards),
        "rejected_mean": statistics.fmean(r for _, r in rewards),
        "margin_mean": statistics.fmean(c - r for c, r in rewards),
    }
    if sources is not None:
        by: dict[str, list[bool]] = defaultdict(list)
        for ok, src in zip(correct, sources, strict=True):
            by[src].append(ok)
        out["accuracy_by_source"] = {s: sum(v) / len(v) for s, v in sorted(by.items())}
        out["pairs_by_source"] = {s: len(v) for s, v in sorted(by.items())}
    return out


def fake_rewards(pair: EncodedPair) -> tuple[float, float]:
    """A float32 model's rewards, fixed by the pair alone (so by no batching): ties and both signs."""
    c = torch.tensor([sum(pair.chosen) * 0.37 - 7.1 * len(pair.chosen)], dtype=torch.float32)
    r = torch.tensor([sum(pair.rejected) * 0.37 - 7.1 * len(pair.rejected)], dtype=torch.float32)
    return float(c), float(r)


def eval_store(n: int, sources: int = 5):
    writer = PairStoreWriter()
    for i in range(n):
        chosen = [(i * 7) % 50 + 1] * (1 + i % 3)
        rejected = chosen if i % 11 == 0 else [(i * 13) % 50 + 1] * (1 + i % 4)
        writer.add(chosen, rejected, 0.0, f"src{(i * 3 + i // 7) % sources}")
    return writer.finish()


def fake_trainer(store, rank: int = 0, world: int = 1, nan_at: int = -1) -> RewardTrainer:
    """A RewardTrainer with what evaluation reads, and a forward that needs no model."""
    trainer = RewardTrainer.__new__(RewardTrainer)
    model = torch.nn.Module()
    trainer.config = SimpleNamespace(eval_batch_size=64)
    trainer.model = trainer.wrapped = model
    trainer.rank, trainer.world, trainer.is_main, trainer.step = rank, world, False, 0
    trainer.strategy, trainer.capture, trainer.micro_tokens, trainer.device = "ddp", None, 0, torch.device("cpu")
    trainer.eval_enc = EncodedSet(store, unfit=0, truncated=0)

    def forward(module: Any, pairs: Sequence[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor]:
        got = torch.tensor([fake_rewards(p) for p in pairs], dtype=torch.float32)
        if nan_at >= 0 and any(p == store[nan_at] for p in pairs):
            got[[p == store[nan_at] for p in pairs], 0] = float("nan")
        return got[:, 0], got[:, 1]

    trainer._forward = forward  # type: ignore[method-assign]
    return trainer


def test_eval_metrics_are_the_list_codes_bitwise_and_hold_a_few_bytes_a_pair() -> None:
    # Before: a dict of (r_c, r_r) tuples per eval pair (gathered to every rank with all_gather_object), a list of
    # tuples, the flat lists of pairwise_metrics and a source object per pair: ~300 bytes a pair on every rank,
    # 0.6 GB at 40M pairs x eval_fraction 0.05. Now float64 arrays and the store's int32 source codes.
    n = 40_000
    store = eval_store(n)
    trainer = fake_trainer(store)
    want = old_pairwise_metrics([fake_rewards(p) for p in store], store.source_list())
    tracemalloc.start()
    try:
        got = trainer.evaluate()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == {**{f"eval_{k}": v for k, v in want.items()}, "eval_truncated_pairs": 0, "eval_unfit_pairs": 0}
    assert 0 < got["eval_accuracy"] < 1 and len(got["eval_accuracy_by_source"]) == 5
    assert trainer.rewards(store) == [fake_rewards(p) for p in store]
    assert peak / n < 120, f"{peak / n:.0f} bytes a pair at the peak of evaluate()"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pairwise_metrics_are_the_old_figures_bitwise(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rewards = [(float(c), float(r)) for c, r in rng.normal(0, 3, (999, 2))]
    rewards += [(1.0, 1.0), (2.5, -1e-300), (1e300, 1e300)]
    sources = [str(rng.integers(0, 7)) for _ in rewards]
    assert pairwise_metrics(rewards, sources) == old_pairwise_metrics(rewards, sources)
    assert pairwise_metrics(rewards) == old_pairwise_metrics(rewards)
    assert pairwise_metrics([]) == {"pairs": 0}


def test_a_diverged_models_nan_reward_gives_nan_figures_instead_of_a_crash() -> None:
    # Before: statistics.pstdev raised AttributeError ('float' object has no attribute 'numerator') on a NaN or
    # infinite reward, so a run whose model diverged died in its final evaluate(), before saving output_dir/final,
    # and `synpref eval` died without printing.
    store = eval_store(40)
    got = fake_trainer(store, nan_at=3).evaluate()
    rewards = [fake_rewards(p) for p in store]
    nan_pairs = [i for i, p in enumerate(store) if p == store[3]]
    right = sum(c > r for i, (c, r) in enumerate(rewards) if i not in nan_pairs)  # NaN > r is False
    assert (
        got["eval_accuracy"] == right / 40
        and got["eval_pairs_by_source"] == old_pairwise_metrics(rewards, store.source_list())["pairs_by_source"]
    )
    for key in ("reward_mean", "reward_std", "chosen_mean", "margin_mean"):
        assert math.isnan(got[f"eval_{key}"]), key
    assert got["eval_rejected_mean"] == statistics.fmean(r for _, r in rewards)
    inf = float("inf")
    m = pairwise_metrics([(inf, 0.0), (1.0, -inf), (0.5, 0.25)])
    assert m["accuracy"] == 1.0 and m["chosen_mean"] == inf and math.isnan(m["reward_std"])


def old_held_out_mask(paths: Any, fraction: float, seed: int) -> np.ndarray:
    """held_out_mask as it was (np.unique and np.isin on the keys): the split must stay pair for pair this."""
    from synpref.shared.pairs import conversation_key, held_out_positions
    from synpref.training import data

    digests = bytearray()
    for pair, _ in data.iter_pairs(paths):
        if pair is not None:
            digests += bytes.fromhex(conversation_key(list(pair.get("conversation") or [])))
    keys = np.frombuffer(bytes(digests), dtype="S32")
    distinct = np.unique(keys)
    picked = np.frombuffer(held_out_positions(len(distinct), fraction, seed), dtype=np.int64)
    return np.isin(keys, distinct[picked])


def split_pairs(n: int, conversations: int) -> list[dict[str, Any]]:
    """n pairs over `conversations` prompts, some multi-turn with a shared opening (one key)."""
    out = []
    for i in range(n):
        k = (i * 7919) % conversations
        conversation = [{"role": "user", "content": f"prompt {k}"}]
        if i % 5 == 0:
            conversation += [{"role": "assistant", "content": f"a {i}"}, {"role": "user", "content": "more"}]
        out.append(
            {
                "conversation": conversation,
                "chosen": [{"role": "assistant", "content": f"good {i}"}],
                "rejected": [{"role": "assistant", "content": f"bad {i}"}],
            }
        )
    return out


def test_held_out_mask_is_the_old_split_pair_for_pair(tmp_path, monkeypatch) -> None:
    import json

    from synpref.shared.pairs import split_by_conversation
    from synpref.training import data_cache

    pairs = split_pairs(3000, 1700)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs) + "not json\n")
    monkeypatch.setattr(data_cache, "SPLIT_CHUNK", 256, raising=False)  # many chunks, runs across their edges
    for fraction, seed in [(0.01, 0), (0.05, 1), (0.2, 7), (0.5, 3), (0.0004, 2), (1.0, 5)]:
        got = data_cache.held_out_mask([path], (), fraction, seed)
        assert got is not None and got.dtype == bool
        assert np.array_equal(got, old_held_out_mask([path], fraction, seed)), (fraction, seed)
        _, held = split_by_conversation(list(range(3000)), lambda i: pairs[i]["conversation"], fraction, seed)
        assert np.flatnonzero(got).tolist() == held, (fraction, seed)
    assert data_cache.held_out_mask([path], (), 0.0, 0) is None
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert len(data_cache.held_out_mask([empty], (), 0.1, 0)) == 0


def test_held_out_mask_holds_about_50_bytes_a_pair(monkeypatch) -> None:
    # Before: bytes(digests) copied the 32-byte keys, np.unique flattened and sorted another copy, np.isin
    # concatenated, sorted and uniqued more: ~200 bytes a pair at the peak (8 GB at 40M pairs), on the rank that
    # builds the cache. Now the keys, their argsort and a byte or two a pair.
    from synpref.training import data_cache

    n = 100_000
    conversation = [{"role": "user", "content": "x"}]

    def iter_pairs(paths: Any, columns_extra: Any = ()) -> Any:
        for i in range(n):
            conversation[0]["content"] = f"prompt {i % 75_000}"
            yield {"conversation": conversation}, ""

    monkeypatch.setattr(data_cache.data, "iter_pairs", iter_pairs)
    monkeypatch.setattr(data_cache, "SPLIT_CHUNK", 4096, raising=False)  # as small beside the keys as at 40M
    tracemalloc.start()
    try:
        mask = data_cache.held_out_mask(["unused"], (), 0.05, 0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert mask is not None and 0.04 < mask.mean() < 0.06
    assert peak / n < 64, f"{peak / n:.0f} bytes a pair at the peak of held_out_mask"


GATHER_SCRIPT = """
import json, sys
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from test_review_eval_scale import eval_store, fake_trainer

dist.init_process_group("gloo")
store = eval_store(103)
trainer = fake_trainer(store, dist.get_rank(), dist.get_world_size())
chosen, rejected = trainer.reward_arrays(store)
metrics = trainer.evaluate()
with open(f"{sys.argv[2]}/rank{dist.get_rank()}.json", "w") as fh:
    json.dump({"rewards": [chosen.tolist(), rejected.tolist()], "metrics": metrics}, fh)
dist.destroy_process_group()
"""


@pytest.mark.integration  # three real gloo ranks under torchrun, ~10 s
def test_every_rank_gets_every_eval_reward_through_a_tensor_gather(tmp_path) -> None:
    # Before: all_gather_object of a dict of tuples per rank. 103 pairs over 3 ranks: uneven shares.
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", str(script)]
    proc = subprocess.run(
        [*cmd, str(Path(__file__).parent), str(tmp_path)], capture_output=True, text=True, timeout=180, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = eval_store(103)
    want = [fake_rewards(p) for p in store]
    metrics = {f"eval_{k}": v for k, v in old_pairwise_metrics(want, store.source_list()).items()}
    for rank in range(3):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert list(zip(*got["rewards"], strict=True)) == want, rank
        assert got["metrics"] == {**metrics, "eval_truncated_pairs": 0, "eval_unfit_pairs": 0}, rank
