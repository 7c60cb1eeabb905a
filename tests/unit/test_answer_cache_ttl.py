"""The judges' answer cache is bounded in time: entries written over annotator.cache_ttl_days ago are deleted by a
sweeper thread in the annotator process, one shard folder at a time, safely beside other sweepers and writers."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synpref.services.annotator import answer_cache as judges
from synpref.services.annotator.answer_cache import SHARDS, AnswerCache, CacheSweeper
from synpref.shared.config import ConfigError, load_settings

DAY = 86400.0


@pytest.fixture(autouse=True)
def _stop_sweepers():
    yield
    for sweeper in list(judges._SWEEPERS.values()):
        sweeper.stop()


def age(path: Path, seconds: float) -> None:
    """Set the file's mtime (and atime) `seconds` into the past."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def entry(cache: AnswerCache, *key: str) -> Path:
    path = cache._path(*key)
    assert path is not None
    return path


def sweep_all(sweeper: CacheSweeper) -> tuple[int, int]:
    """One full pass, shard by shard as the thread goes: (entries, temp files) deleted."""
    results = [sweeper.sweep_next() for _ in SHARDS]
    return sum(r[0] for r in results), sum(r[1] for r in results)


def test_entries_written_over_the_ttl_ago_are_deleted_and_recent_ones_kept(tmp_path):
    cache = AnswerCache(tmp_path, ttl_days=1)
    for i in range(40):
        cache.put({"answer": i}, "judge", f"pair-{i}", "m", "v1")
    old = [entry(cache, "judge", f"pair-{i}", "m", "v1") for i in range(0, 40, 2)]
    for path in old:
        age(path, 1.5 * DAY)
    assert sweep_all(CacheSweeper(tmp_path, cache.ttl_s)) == (20, 0)
    assert not any(path.exists() for path in old)
    assert [cache.get("judge", f"pair-{i}", "m", "v1") for i in range(1, 40, 2)] == [
        {"answer": i} for i in range(1, 40, 2)
    ]
    assert cache.get("judge", "pair-0", "m", "v1") is None


def test_a_read_refreshes_nothing_so_the_ttl_counts_from_the_write(tmp_path):
    cache = AnswerCache(tmp_path, ttl_days=1)
    cache.put(["answer"], "judge", "p", "m", "v1")
    path = entry(cache, "judge", "p", "m", "v1")
    age(path, 2 * DAY)
    mtime = path.stat().st_mtime
    assert cache.get("judge", "p", "m", "v1") == ["answer"]
    assert path.stat().st_mtime == mtime
    assert CacheSweeper(tmp_path, cache.ttl_s).sweep(path.parent.name) == (1, 0)
    assert cache.get("judge", "p", "m", "v1") is None
    # A rewrite (a stale answer asked again) starts the clock again.
    cache.put(["new answer"], "judge", "p", "m", "v1")
    assert CacheSweeper(tmp_path, cache.ttl_s).sweep(path.parent.name) == (0, 0)


def test_young_temp_files_and_foreign_files_are_never_deleted(tmp_path):
    ttl_s = 60.0  # shorter than the temp files' hour of grace
    shard = tmp_path / "ab"
    shard.mkdir()
    digest = "ab" + "0" * 62
    old_entry = shard / f"{digest}.json"
    writing = shard / f".{digest}.json.0123456789ab.tmp"  # being renamed into place by another process
    crashed = shard / f".{digest}.json.ba9876543210.tmp"  # left by a writer that died
    foreign = [shard / "notes.txt", shard / f"{digest}.json.bak", tmp_path / "zz" / f"{'0' * 64}.json"]
    foreign[-1].parent.mkdir()
    for path in [old_entry, writing, crashed, *foreign]:
        path.write_text("{}")
        age(path, 10 * DAY)
    age(writing, 30 * 60)
    age(crashed, 2 * 3600)
    assert sweep_all(CacheSweeper(tmp_path, ttl_s)) == (1, 1)
    assert not old_entry.exists() and not crashed.exists()
    assert writing.exists() and all(path.exists() for path in foreign)


def test_a_file_another_sweeper_deletes_first_is_skipped(tmp_path, monkeypatch):
    cache = AnswerCache(tmp_path, ttl_days=1)
    cache.put([1], "judge", "a", "m", "v1")
    cache.put([2], "judge", "b", "m", "v1")
    paths = [entry(cache, "judge", k, "m", "v1") for k in "ab"]
    for path in paths:
        age(path, 2 * DAY)
    real_unlink, real_scandir = os.unlink, os.scandir

    def unlinked_by_another_process_first(path):
        real_unlink(path)
        real_unlink(path)  # FileNotFoundError, as when the other sweeper won

    monkeypatch.setattr(judges.os, "unlink", unlinked_by_another_process_first)
    assert CacheSweeper(tmp_path, cache.ttl_s).sweep(paths[0].parent.name) == (0, 0)
    assert not paths[0].exists()
    monkeypatch.setattr(judges.os, "unlink", real_unlink)

    class ListedThenDeleted:
        """A listing whose files another process deletes before they are looked at."""

        def __init__(self, folder):
            with real_scandir(folder) as listing:
                self.items = list(listing)
            for item in self.items:
                real_unlink(item.path)

        def __iter__(self):
            return iter(self.items)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(judges.os, "scandir", ListedThenDeleted)
    assert CacheSweeper(tmp_path, cache.ttl_s).sweep(paths[1].parent.name) == (0, 0)
    assert CacheSweeper(tmp_path / "missing", cache.ttl_s).sweep("00") == (0, 0)


SWEEP_IN_A_PROCESS = """
import sys
from pathlib import Path
from synpref.services.annotator.answer_cache import SHARDS, CacheSweeper
sweeper = CacheSweeper(Path(sys.argv[1]), 86400.0)
print(sum(sweeper.sweep(shard)[0] for shard in SHARDS))
"""


def test_two_processes_sweeping_one_folder_delete_each_entry_once(tmp_path):
    cache = AnswerCache(tmp_path, ttl_days=1)
    count = 3000
    for i in range(count):
        path = entry(cache, "judge", str(i), "m", "v1")
        path.parent.mkdir(exist_ok=True)
        path.write_text("[]")
        age(path, 2 * DAY)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", SWEEP_IN_A_PROCESS, str(tmp_path)], stdout=subprocess.PIPE, env=env)
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert sum(int(out) for out in outputs) == count
    assert not list(tmp_path.glob("*/*.json"))


def test_each_sweep_that_deletes_logs_one_info_line_and_counts_the_metric(tmp_path, caplog):
    cache = AnswerCache(tmp_path, ttl_days=1)
    keys = [("judge", f"p{i}", "m", "v1") for i in range(200)]
    for key in keys:
        cache.put([], *key)
    shard = entry(cache, *keys[0]).parent.name
    in_shard = [entry(cache, *key) for key in keys if entry(cache, *key).parent.name == shard]
    for path in in_shard:
        age(path, 2 * DAY)
    before = judges.CACHE_PRUNED._value.get()
    sweeper = CacheSweeper(tmp_path, cache.ttl_s)
    with caplog.at_level(logging.INFO, logger=judges.__name__):
        assert sweeper.sweep(shard) == (len(in_shard), 0)
        assert sweeper.sweep(shard) == (0, 0)
    lines = [r.getMessage() for r in caplog.records if r.name == judges.__name__]
    assert len(lines) == 1 and f"deleted {len(in_shard)} entries" in lines[0]
    assert judges.CACHE_PRUNED._value.get() == before + len(in_shard)


def test_the_first_put_starts_one_sweeper_thread_per_folder_and_a_ttl_of_0_none(tmp_path):
    forever = AnswerCache(tmp_path / "forever", ttl_days=0)
    forever.put([], "judge", "p", "m", "v1")
    assert forever.sweeper is None
    first, second = AnswerCache(tmp_path / "c", ttl_days=14), AnswerCache(tmp_path / "c", ttl_days=14)
    assert first.sweeper is None  # nothing runs until something is written
    first.put([], "judge", "p", "m", "v1")
    second.put([], "judge", "q", "m", "v1")
    assert first.sweeper is second.sweeper and first.sweeper is not None
    assert first.sweeper._thread.is_alive() and first.sweeper._thread.daemon
    assert first.sweeper.interval_s == pytest.approx(14 * DAY / 4 / 256)  # a full pass every 3.5 days
    first.sweeper.stop()
    assert not first.sweeper._thread.is_alive()


def test_the_setting_reaches_the_annotators_cache(tmp_path):
    judge = {"name": "m", "base_url": "http://127.0.0.1:9/v1"}
    from synpref.services.annotator.main import build_annotator

    assert load_settings().annotator.cache_ttl_days == 14
    settings = load_settings(annotator={"judges": [judge], "cache_dir": str(tmp_path), "cache_ttl_days": 0.5})
    annotator = build_annotator(settings)
    assert annotator.judges[0].cache.ttl_s == 0.5 * DAY
    with pytest.raises(ConfigError, match="cache_ttl_days"):
        load_settings(annotator={"cache_ttl_days": -1})
