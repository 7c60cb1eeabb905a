"""Review 44, the trainer's data path: a killed build's leftovers, and eval rows that cannot be read."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from synpref.training import data_cache
from synpref.training.data import write_jsonl
from synpref.training.data_cache import CACHE_DIR, prepare_data
from synpref.training.reward_config import RewardConfig
from testing.tiny import build_tiny_tokenizer


def _pair(i: int) -> dict:
    return {
        "conversation": [{"role": "user", "content": f"q {i}"}],
        "chosen": [{"role": "assistant", "content": f"good {i}"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
        "source": "s",
    }


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), [f"q {i} good bad" for i in range(12)], vocab_size=120)


def test_a_killed_builds_folder_is_gone_before_the_next_build_of_its_key_starts(tokenizer, tmp_path, monkeypatch):
    # A build killed mid-way (OOM, preemption, eviction) leaves its .<key>.<id>.tmp folder, up to a whole cache
    # (~320 GB at 40M pairs). The retry built a second one beside it and removed the first only once done: twice
    # the disk at the peak, and on a volume sized for one cache every retry failed with ENOSPC, for good.
    train = write_jsonl([_pair(i) for i in range(8)], tmp_path / "train.jsonl")
    cfg = RewardConfig(output_dir=str(tmp_path / "out"), train_files=[str(train)], max_length=64)
    root = tmp_path / "out" / CACHE_DIR
    key = data_cache.cache_key(cfg, tokenizer)[0]
    dead = root / f".{key}.0123456789ab.tmp"
    (dead / "train").mkdir(parents=True)
    (dead / "train" / "ids.int32").write_bytes(b"\0" * 4096)
    build = data_cache._build
    seen: list[bool] = []

    def build_and_look(*args, **kwargs):
        seen.append(dead.exists())
        return build(*args, **kwargs)

    monkeypatch.setattr(data_cache, "_build", build_and_look)
    got = prepare_data(cfg, tokenizer, tmp_path / "out")
    assert seen == [False], "the killed build's folder was still there while the new one was written"
    assert got.report["train_pairs"] == 8


def test_unreadable_eval_rows_are_counted_and_named_not_dropped_silently(tokenizer, tmp_path, caplog):
    # An eval file's bad rows vanished: eval_pairs was smaller than the file with no word in the log or the report,
    # so a held-out accuracy was read as one over the whole file.
    train = write_jsonl([_pair(i) for i in range(8)], tmp_path / "train.jsonl")
    valid = write_jsonl([_pair(i) for i in range(8, 12)], tmp_path / "valid.jsonl")
    with open(valid, "a", encoding="utf-8") as fh:
        fh.write("{not json\n")
        fh.write(json.dumps({**_pair(12), "chosen": [{"role": "assistant", "content": " "}]}) + "\n")
    cfg = RewardConfig(
        output_dir=str(tmp_path / "out"), train_files=[str(train)], eval_files=[str(valid)], max_length=64
    )
    with caplog.at_level(logging.WARNING, logger=data_cache.__name__):
        got = prepare_data(cfg, tokenizer, tmp_path / "out")
    assert got.report["eval_pairs"] == 4 and got.report["unreadable_rows"] == 0
    assert got.report.get("eval_unreadable_rows") == 2
    assert [p.split(": ")[0] for p in got.problems] == [f"{valid}#4", f"{valid}#5"]
    assert "2 unreadable eval rows" in caplog.text
    reused = prepare_data(cfg, tokenizer, tmp_path / "out")  # the cached data says so too
    assert reused.report == got.report and reused.problems == got.problems


def test_without_bad_eval_rows_the_report_keeps_its_usual_fields(tokenizer, tmp_path):
    train = write_jsonl([_pair(i) for i in range(8)], tmp_path / "train.jsonl")
    valid = write_jsonl([_pair(i) for i in range(8, 12)], tmp_path / "valid.jsonl")
    cfg = RewardConfig(
        output_dir=str(tmp_path / "out"), train_files=[str(train)], eval_files=[str(valid)], max_length=64
    )
    got = prepare_data(cfg, tokenizer, tmp_path / "out")
    assert "eval_unreadable_rows" not in got.report and got.problems == []
    assert Path(got.folder or "").is_dir()


RANKS_SCRIPT = """
import json, os, sys
import torch.distributed as dist
from transformers import AutoTokenizer
from synpref.training import data_cache
from synpref.training.reward_config import RewardConfig

dist.init_process_group("gloo")
rank = dist.get_rank()
train, out, tok, result = sys.argv[1:5]
if rank == 1:
    real_key = data_cache.cache_key

    def key_after_a_write(*args, **kwargs):
        os.utime(train, ns=(1, 1))  # a write to the file lands after rank 0 statted it, before this rank does
        return real_key(*args, **kwargs)

    data_cache.cache_key = key_after_a_write
cfg = RewardConfig(output_dir=out, train_files=[train], max_length=64, encode_workers=1)
got = data_cache.prepare_data(cfg, AutoTokenizer.from_pretrained(tok), data_cache.Path(out))
dist.barrier()
with open(os.path.join(result, f"rank{rank}.json"), "w") as fh:
    json.dump({"folder": str(got.folder), "exists": got.folder.is_dir(), "pairs": got.report["train_pairs"]}, fh)
dist.destroy_process_group()
"""


@pytest.mark.integration  # two real gloo ranks under torchrun, ~10 s
def test_every_rank_takes_rank_0s_cache_key(tokenizer, tmp_path):
    # Each rank statted the listed files itself: a file written between two ranks' stats gave them other keys, so
    # two builds at once (the second removing the first's folder) and ranks training on other data (a hang).
    import os
    import subprocess
    import sys

    train = write_jsonl([_pair(i) for i in range(8)], tmp_path / "train.jsonl")
    tok = tmp_path / "tok"
    tokenizer.save_pretrained(tok)
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    args = [str(train), str(tmp_path / "out"), str(tok), str(tmp_path)]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[0]["folder"] == got[1]["folder"], "the ranks mapped caches of other keys"
    assert got[0]["exists"] and got[0]["pairs"] == got[1]["pairs"] == 8
