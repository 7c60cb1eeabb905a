"""The trainer's data path at 40M pairs: the epoch order as flat arrays, clear errors for a dataset
folder whose metadata lists a missing file."""

from __future__ import annotations

import json
import os
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from synpref.shared.source_files import SourceError
from synpref.training import data_cache
from synpref.training.batching import step_order
from synpref.training.reward_config import RewardConfig


def list_step_order(n: int, seed: int, epoch: int, global_batch: int, lengths: list[int] | None, window: int):
    """step_order as it was (Python lists): the order a checkpoint written before resumes in."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(n))
    rng.shuffle(order)
    steps = n // global_batch
    batches = [order[i * global_batch : (i + 1) * global_batch] for i in range(steps)]
    if lengths is None:
        return batches
    grouped: list[list[int]] = []
    for start in range(0, steps, window):
        pool = sorted((i for b in batches[start : start + window] for i in b), key=lambda i: -lengths[i])
        chunk = [pool[k : k + global_batch] for k in range(0, len(pool), global_batch)]
        rng.shuffle(chunk)
        grouped.extend(chunk)
    return grouped


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize(("n", "global_batch", "window"), [(8, 4, 2), (1003, 16, 5), (4096, 64, 8), (5, 5, 1)])
def test_step_order_keeps_the_order_of_the_list_version(n, global_batch, window, grouped):
    # Resumes of runs started before take the same batches for the same (seed, epoch).
    lengths = [random.Random(i).randrange(1, 40) for i in range(n)] if grouped else None
    for seed, epoch in ((0, 0), (3, 2)):
        got = step_order(n, seed, epoch, global_batch, lengths, window)
        want = list_step_order(n, seed, epoch, global_batch, lengths, window)
        assert len(got) == len(want) and list(got) == want
        assert [got[k] for k in range(len(got))] == want


def test_step_order_holds_no_python_int_per_pair():
    # At 40M pairs a list of Python ints per epoch is ~1.8 GB on every rank; an int32 array is 160 MB.
    n = 1_000_000
    widths = np.arange(n, dtype=np.int64) % 500  # the trainer passes its store's widths array
    tracemalloc.start()
    try:
        order = step_order(n, seed=1, epoch=0, global_batch=64, lengths=widths, window=16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * n, f"peak {peak / n:.1f} bytes a pair"
    assert len(order) == n // 64 and len(order[0]) == 64


def write_version(root: Path) -> Path:
    """A dataset version as the writer leaves it (manifest.json listing its Parquet shards)."""
    from synpref.services.dataset_writer.dataset import DatasetVersion
    from synpref.shared.pairs import new_pair, new_record

    def msg(role: str, content: str) -> dict[str, str]:
        return {"role": role, "content": content}

    records = [
        new_record(new_pair([msg("user", f"q {i}")], [msg("assistant", f"good {i}")], [msg("assistant", "bad")], "w"))
        for i in range(6)
    ]
    version = DatasetVersion(root, "curated", "v1")
    version.append(records[:3])
    version.append(records[3:])
    version.close()
    return root / "curated" / "v1"


@pytest.mark.parametrize("listing", ["manifest", "state"])
def test_a_listed_file_that_is_missing_names_the_file_and_its_listing(tmp_path, listing):
    # A shard deleted (or not yet copied) under a version whose manifest lists it failed deep in the token
    # cache's key with a bare FileNotFoundError; the run's log should say which file and which list.
    if listing == "manifest":
        folder = write_version(tmp_path / "datasets")
        shard = sorted(folder.glob("*.parquet"))[-1]
        listed_by = folder / "manifest.json"
    else:
        folder = tmp_path / "saved" / "train"
        folder.mkdir(parents=True)
        shard = folder / "data-00000-of-00001.arrow"
        listed_by = folder / "state.json"
        listed_by.write_text(json.dumps({"_data_files": [{"filename": shard.name}]}))
    shard.unlink(missing_ok=True)
    cfg = RewardConfig(output_dir=str(tmp_path / "out"), train_files=[str(tmp_path)])
    with pytest.raises(SourceError) as caught:
        data_cache.prepare_data(cfg, object(), tmp_path / "out")
    assert str(shard) in str(caught.value) and str(listed_by) in str(caught.value)


def test_a_shard_committed_while_the_cache_builds_does_not_break_the_split(tmp_path, monkeypatch):
    # Training from a live dataset version (the CronJob's train_files: [<root>/<name>/<version>]): at 40M pairs the
    # split's first pass takes long enough for the writer to commit a shard before the encoding pass. The second
    # pass read the new manifest, found more pairs than the split's mask and failed with an IndexError at the end.
    from synpref.services.dataset_writer.dataset import DatasetVersion
    from synpref.shared.pairs import new_pair, new_record
    from testing.tiny import build_tiny_tokenizer

    def msg(role: str, content: str) -> dict[str, str]:
        return {"role": role, "content": content}

    records = [
        new_record(new_pair([msg("user", f"q {i}")], [msg("assistant", f"good {i}")], [msg("assistant", "bad")], "w"))
        for i in range(30)
    ]
    tokenizer = build_tiny_tokenizer(tmp_path / "tok", [f"q {i} good bad" for i in range(30)], vocab_size=120)
    version = DatasetVersion(tmp_path / "datasets", "curated", "v1")
    version.append(records[:10])
    version.append(records[10:20])
    mask = data_cache.held_out_mask

    def mask_then_commit(*args, **kwargs):
        held = mask(*args, **kwargs)
        version.append(records[20:])  # the writer commits while the trainer reads
        return held

    monkeypatch.setattr(data_cache, "held_out_mask", mask_then_commit)
    folder = tmp_path / "datasets" / "curated" / "v1"
    cfg = RewardConfig(output_dir=str(tmp_path / "out"), train_files=[str(folder)], eval_fraction=0.3, max_length=64)
    got = data_cache.prepare_data(cfg, tokenizer, tmp_path / "out")
    version.close()
    # The pairs of the files the key names: the next run's key sees the new shard and builds again.
    assert got.report["train_pairs"] + got.report["eval_pairs"] == 20 and got.report["eval_pairs"] > 0
    key = json.loads((got.folder / data_cache.REPORT_FILE).read_text())["key"]  # type: ignore[operator]
    assert len(key["train_files"][0][1]) == 2, "the key names the files that were read"


def test_a_train_file_appended_to_while_the_cache_builds_is_a_clear_error(tmp_path, monkeypatch):
    # The split's mask is by position: a JSONL file that grows between the two passes cannot be split (IndexError
    # before); one that shrinks would have paired the mask with other pairs. Either is named instead.
    from synpref.training.data import write_jsonl
    from testing.tiny import build_tiny_tokenizer

    def pair(i: int) -> dict:
        return {
            "conversation": [{"role": "user", "content": f"q {i}"}],
            "chosen": [{"role": "assistant", "content": f"good {i}"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        }

    tokenizer = build_tiny_tokenizer(tmp_path / "tok", [f"q {i} good bad" for i in range(30)], vocab_size=120)
    train = write_jsonl([pair(i) for i in range(20)], tmp_path / "train.jsonl")
    mask = data_cache.held_out_mask
    for change in ("grow", "shrink"):

        def mask_then_write(*args, change=change, **kwargs):
            held = mask(*args, **kwargs)
            write_jsonl([pair(i) for i in range(25 if change == "grow" else 15)], train)
            return held

        write_jsonl([pair(i) for i in range(20)], train)
        monkeypatch.setattr(data_cache, "held_out_mask", mask_then_write)
        cfg = RewardConfig(output_dir=str(tmp_path / "out"), train_files=[str(train)], eval_fraction=0.3, max_length=64)
        with pytest.raises(SourceError, match="changed while the token cache was built"):
            data_cache.prepare_data(cfg, tokenizer, tmp_path / "out")


def test_the_token_cache_is_on_disk_before_it_is_published(tmp_path, monkeypatch):
    # The store files were fsynced, but not report.json nor the train/ and eval/ folders' entries: a node lost
    # right after the rename could leave a cache folder with an empty report.json, which every later attempt in the
    # same output_dir (the controller's retries resume there) failed to parse.
    from synpref.training.data import write_jsonl
    from testing.tiny import build_tiny_tokenizer

    pairs = [
        {
            "conversation": [{"role": "user", "content": f"q {i}"}],
            "chosen": [{"role": "assistant", "content": f"good {i}"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        }
        for i in range(8)
    ]
    tokenizer = build_tiny_tokenizer(tmp_path / "tok", [f"q {i} good bad" for i in range(8)], vocab_size=120)
    train = write_jsonl(pairs, tmp_path / "train.jsonl")
    synced: set[str] = set()
    real_fsync, real_replace = os.fsync, data_cache.replace_durably
    published: list[set[str]] = []

    def fsync(fd: int) -> None:
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(tmp: Path, path: Path) -> None:
        published.append({str(p.relative_to(tmp)) for p in tmp.rglob("*") if str(p) not in synced})
        real_replace(tmp, path)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(data_cache, "replace_durably", replace)
    cfg = RewardConfig(output_dir=str(tmp_path / "out"), train_files=[str(train)], max_length=64)
    data_cache.prepare_data(cfg, tokenizer, tmp_path / "out")
    assert published == [set()], f"published before they were on disk: {published}"


RANKS_SCRIPT = """
import json, os, sys
import torch.distributed as dist
from transformers import AutoTokenizer
from synpref.shared.source_files import SourceError
from synpref.training.data_cache import key_of_rank0
from synpref.training.reward_config import RewardConfig

dist.init_process_group("gloo")
rank = dist.get_rank()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[4])
os.chdir(sys.argv[rank + 1])  # each rank sees its own "data" folder: as if a shard landed between their listings
config = RewardConfig(output_dir="out", train_files=["data"], max_length=64)
try:
    (train, _), key, _ = key_of_rank0(config, tokenizer)
    got = {"train": [[path, [str(f) for f in files]] for path, files in train], "key": key}
except SourceError as exc:
    got = f"SourceError: {exc}"
with open(os.path.join(sys.argv[3], f"rank{rank}.json"), "w") as fh:
    json.dump(got, fh)
dist.destroy_process_group()
"""


def run_two_ranks(tmp_path: Path, seen_by_0: list[str] | None, seen_by_1: list[str]) -> list[object]:
    """What key_of_rank0 returns on each of 2 real gloo ranks whose `data` folders hold these files (None:
    no folder); each result is {"train": the train listing, "key": the cache key} or the SourceError's text."""
    import subprocess
    import sys

    from testing.tiny import build_tiny_tokenizer

    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    build_tiny_tokenizer(tmp_path / "tok", ["q good bad"], vocab_size=120)
    folders = []
    for rank, names in enumerate((seen_by_0, seen_by_1)):
        folder = tmp_path / f"rank{rank}"
        (folder / "data").mkdir(parents=True) if names is not None else folder.mkdir()
        for name in names or []:
            (folder / "data" / name).write_text("")
        folders.append(str(folder))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    args = [*cmd, *folders, str(tmp_path), str(tmp_path / "tok")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.integration  # two real gloo ranks under torchrun, ~8 s
def test_every_rank_takes_rank_0s_file_listing(tmp_path: Path) -> None:
    # Before: each rank listed the train files itself; a shard committed between two ranks' listings gave them other
    # cache keys (two builds at once, each removing the other's folder) and other data (other step counts: a hang).
    got = run_two_ranks(tmp_path, ["a.jsonl"], ["a.jsonl", "b.jsonl"])
    assert got[0] == got[1], got  # the same listing and so the same cache key
    assert isinstance(got[0], dict) and got[0]["train"] == [["data", ["data/a.jsonl"]]]


@pytest.mark.integration
def test_a_listing_error_on_rank_0_reaches_every_rank_instead_of_a_wait(tmp_path: Path) -> None:
    got = run_two_ranks(tmp_path, None, ["a.jsonl"])
    assert all(isinstance(g, str) and g.startswith("SourceError: data: no such file") for g in got), got


def _anon_bytes() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("RssAnon:"))


def test_a_resumed_optimizer_state_is_read_from_the_page_cache_not_copied_into_each_rank(tmp_path: Path) -> None:
    # Under FSDP each rank torch.load-ed the whole trainer_state.pt into its own memory to keep its shard: the
    # optimizer's full state once per rank (8 x 64 GB of Adam moments for an 8B model). Mapped, they share one copy.
    import torch

    from synpref.training.checkpointing import TRAINER_STATE, read_trainer_state

    moments = torch.arange(32 << 20, dtype=torch.int32)  # 128 MiB
    torch.save({"optimizer": {"state": {0: {"exp_avg": moments}}}, "step": 3}, tmp_path / TRAINER_STATE)
    del moments
    before = _anon_bytes()
    state = read_trainer_state(tmp_path)
    read = state["optimizer"]["state"][0]["exp_avg"]
    assert int(read[-1]) == (32 << 20) - 1 and int(read.sum()) > 0  # every page read
    assert _anon_bytes() - before < 32 << 20
    assert state["step"] == 3
    copied = read_trainer_state(tmp_path, mmap=False)["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(copied, read)
