"""The head trainer's feature cache: on disk, appended to, with a bounded memory front, reused across processes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from synpref.services.controller.models import FeatureCache, HeadModels, default_backbone
from testing.controller_fakes import synthetic_pairs

MAX_LENGTH = 32


def pairs(n: int, seed: int = 0) -> list[dict]:
    return [
        {
            "conversation": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in synthetic_pairs(n, seed)
    ]


def forwards(cache: FeatureCache) -> list[int]:
    """Counts the backbone's forward passes (batches) from now on."""
    calls: list[int] = []
    cache.model.bert.register_forward_hook(lambda module, args, kwargs, out: calls.append(1), with_kwargs=True)
    return calls


def reference(cache: FeatureCache, calls: list[list[dict]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """What the former in-memory FeatureCache returned for these calls in turn: the same batches of the same
    sequences, so the same float32 values, bit for bit."""
    import torch

    from synpref.shared.batched_rewards import length_batches, pad_batch
    from synpref.shared.modeling import encode_pair

    memo: dict[bytes, np.ndarray] = {}
    out = []
    for batch_pairs in calls:
        seqs = [enc.input_ids for p in batch_pairs for enc in encode_pair(cache.tokenizer, p, MAX_LENGTH, "left_turns")]
        keys = [np.asarray(s, dtype=np.int32).tobytes() for s in seqs]
        todo = sorted({k: i for i, k in enumerate(keys) if k not in memo}.values())
        for batch in length_batches([len(seqs[i]) for i in todo], cache.batch_size):
            ids, mask = pad_batch([seqs[todo[j]] for j in batch], int(cache.tokenizer.pad_token_id or 0))
            with torch.inference_mode():
                hidden = cache.model.bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
            for j, row in zip(batch, hidden.numpy(), strict=True):
                memo[keys[todo[j]]] = row.copy()
        stacked = np.stack([memo[k] for k in keys])
        out.append((stacked[0::2], stacked[1::2]))
    return out


def test_the_memory_front_stays_within_its_limit_over_more_pairs_than_it_holds(tmp_path, monkeypatch):
    """Every [CLS] state (and every pair's keys) stayed in dicts for the process's life: ~3 KB a pair, 120 GB
    over the paper's 40M-pair pool, which Stage 2 scores in full."""
    limit = 8
    monkeypatch.setattr(sys.modules[FeatureCache.__module__], "FRONT_ENTRIES", limit, raising=False)
    cache = FeatureCache(default_backbone(), MAX_LENGTH, tmp_path)
    batches = [pairs(10, seed) for seed in range(3)]
    got = []
    for batch in batches:
        got.append(cache.features(batch))
        held = sum(len(v) for v in vars(cache).values() if isinstance(v, dict))
        assert held <= 2 * limit, f"{held} entries in memory, limit {limit} (sequences) + {limit} (pairs)"
    again = cache.features(batches[0])  # evicted from the front: read back from disk, the same values
    assert np.array_equal(again[0], got[0][0]) and np.array_equal(again[1], got[0][1])


def test_a_second_cache_on_the_folder_reuses_the_stored_states_without_the_backbone(tmp_path):
    """The file name hashed the classifier too, which a plain encoder (MiniLM) gets newly and randomly initialised
    on each load: no later process (a restart, the next `synpref run`) ever found the cache, so each encoded the
    whole pool again and left another full cache file in the folder."""
    batch = pairs(12)
    first = FeatureCache(default_backbone(), MAX_LENGTH, tmp_path).features(batch)
    second = FeatureCache(default_backbone(), MAX_LENGTH, tmp_path)
    ran = forwards(second)
    again = second.features(batch)
    assert ran == [], "the backbone ran for stored states"
    assert np.array_equal(again[0], first[0]) and np.array_equal(again[1], first[1])
    assert len(list(tmp_path.glob("features-*"))) <= 3, "one store (and its WAL files)"


def test_the_states_equal_the_in_memory_implementations_bit_for_bit(tmp_path):
    first, later = pairs(6, 0), pairs(6, 1)
    calls = [first + first[:2], later + list(reversed(first))]  # duplicates, then known and new pairs mixed
    cache = FeatureCache(default_backbone(), MAX_LENGTH, tmp_path)
    expected = reference(cache, calls)
    for batch, (want_c, want_r) in zip(calls, expected, strict=True):
        got_c, got_r = cache.features(batch)
        assert got_c.dtype == np.float32 and got_c.shape == want_c.shape
        assert np.array_equal(got_c, want_c) and np.array_equal(got_r, want_r)


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io (Linux)")
def test_a_call_with_new_pairs_writes_about_those_not_the_whole_store(tmp_path):
    """Every call with a miss rewrote the whole cache as one .npz: O(pool) per call, O(pool^2) over a run."""
    cache = FeatureCache(default_backbone(), MAX_LENGTH, tmp_path)
    cache.features(pairs(200))
    stored = sum(p.stat().st_size for p in tmp_path.iterdir())
    before = written()
    cache.features(pairs(2, seed=7))  # 4 new states of 1.5 KB
    wrote = written() - before
    assert wrote < stored / 8, f"{wrote} bytes written to add 2 pairs to a {stored}-byte store"


def written() -> int:
    """Bytes this process has passed to write() so far."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


def test_prepare_encodes_the_pool_in_bounded_calls():
    """prepare() handed the whole pool to one features() call, which returns every pair's states at once."""

    sizes: list[int] = []

    class Spy:
        def features(self, batch, progress=False):
            sizes.append(len(batch))

    models = HeadModels.__new__(HeadModels)
    models.cache, models.progress = Spy(), False
    models.prepare([{}] * 10_000)
    assert sum(sizes) == 10_000 and max(sizes) <= 4096
