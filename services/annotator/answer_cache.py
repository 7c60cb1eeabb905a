"""The judges' answer cache: one JSON file per (pair, model, prompt version, purpose), shared by processes,
bounded in time by a sweeper thread (annotator.cache_ttl_days)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import Counter as PromCounter

from synpref.shared.files import write_text_atomic

log = logging.getLogger(__name__)
CACHE_WRITE_ERRORS = PromCounter(
    "synpref_judge_cache_write_errors", "Answers not cached because the write failed (full or read-only volume)"
)
CACHE_READ_ERRORS = PromCounter(
    "synpref_judge_cache_read_errors",
    "Cache entries that could not be read (I/O error, not JSON): treated as misses, the judge is asked again",
)


class AnswerCache:
    """Answers on disk, one JSON file per (pair, model, prompt version, purpose).

    Writes go through a temp file and a rename, so several processes may share the folder
    and a crash never leaves half an entry. Only answers that came back are stored: a failed
    request is retried on replay, an unparseable answer is not (it was the model's answer).

    With `ttl_days` > 0 the folder is bounded in time: the first put() starts this process's
    CacheSweeper, which deletes entries written more than `ttl_days` ago (get() refreshes nothing).
    """

    def __init__(self, root: str | Path | None, ttl_days: float = 0.0) -> None:
        self.root = Path(root) if root else None
        self.ttl_s = ttl_days * 86400.0
        self.hits = 0
        self.misses = 0
        self.write_errors = 0
        self.read_errors = 0
        self.sweeper: CacheSweeper | None = None

    def _path(self, *key: str) -> Path | None:
        if self.root is None:
            return None
        digest = hashlib.sha256("\x1f".join(key).encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.json"

    def get(self, *key: str) -> Any:
        """The cached answer under `key`, or None (counted as a miss) when absent, unreadable or caching is off."""
        path = self._path(*key)
        if path is None:
            self.misses += 1
            return None
        try:
            value = json.loads(path.read_bytes())
        except (FileNotFoundError, NotADirectoryError):  # never written, or swept since
            self.misses += 1
            return None
        except (OSError, ValueError) as exc:
            # EIO, a stale NFS handle, or a torn or garbled entry (ValueError: not JSON, not even UTF-8): asking the
            # judge again costs one call, raised it failed the pair into the dead-letter topic. Logged as put() logs.
            if self.read_errors % 1000 == 0:
                log.warning("answer cache %s: %d reads failed so far, latest: %r", self.root, self.read_errors + 1, exc)
            self.read_errors += 1
            self.misses += 1
            CACHE_READ_ERRORS.inc()
            return None
        self.hits += 1
        return value

    def put(self, value: Any, *key: str) -> None:
        """Store `value` under `key` atomically; does nothing when caching is off, or (logged) when the write fails."""
        path = self._path(*key)
        if path is None:
            return
        try:
            write_text_atomic(path, json.dumps(value))
        except OSError as exc:
            # A full or read-only cache volume costs a replay its saved calls, never the answer in hand: raised,
            # it failed the pair into the dead-letter topic. Logged on the first failure and every 1000th after.
            if self.write_errors % 1000 == 0:
                log.warning(
                    "answer cache %s: %d writes failed so far, latest: %r", self.root, self.write_errors + 1, exc
                )
            self.write_errors += 1
            CACHE_WRITE_ERRORS.inc()
            return
        if self.sweeper is None and self.ttl_s > 0:
            self.sweeper = CacheSweeper.started(path.parent.parent, self.ttl_s)


SHARDS = [f"{i:02x}" for i in range(256)]
ENTRY = re.compile(r"[0-9a-f]{64}\.json")
TEMP = re.compile(r"\.[0-9a-f]{64}\.json\.[0-9a-f]{12}\.tmp")  # shared/files.py write_atomic's temp names
TEMP_GRACE_S = 3600.0  # a temp file this young may be about to be renamed into place: never delete it
PASSES_PER_TTL = 4  # an entry lives at most 1.25 TTL; each sweeping process stats it about 5 times
MIN_INTERVAL_S = 1.0  # between two shard sweeps, whatever the TTL: a tiny TTL must not spin a core
CACHE_PRUNED = PromCounter("synpref_judge_cache_pruned_entries", "Answer-cache entries past cache_ttl_days deleted")


class CacheSweeper:
    """Deletes answer-cache entries older than a TTL (by mtime, i.e. since written), one shard folder at a time.

    A daemon thread, one per (folder, TTL) in a process, sweeps the next of the 256 shard folders every
    TTL / (4 * 256) seconds (14 days: every 20 min, a full pass in 3.5 days), starting at a random shard so
    that processes sharing the folder spread out. A background thread, not put(): a shard of a large cache
    holds 10^5 entries or more, and listing them (4 us each on local ext4, more on a network volume) in put()
    would hold up the event loop's batch. Safe with other processes sweeping and writing the same folder: a
    file gone already is skipped, only names the cache writes are touched, and a temp file is deleted only
    once older than max(TTL, 1 hour) (a crashed writer's).
    An entry rewritten between its stat and its unlink is lost: one answer asked again, nothing worse.
    """

    def __init__(self, root: Path, ttl_s: float) -> None:
        self.root = root
        self.ttl_s = ttl_s
        self.interval_s = max(ttl_s / PASSES_PER_TTL / len(SHARDS), MIN_INTERVAL_S)
        self.next_shard = random.randrange(len(SHARDS))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"answer-cache-sweeper {root}", daemon=True)

    @classmethod
    def started(cls, root: Path, ttl_s: float) -> CacheSweeper:
        """This process's running sweeper of `root` with this TTL, started on first use."""
        with _SWEEPERS_LOCK:
            key = (root.resolve(), ttl_s)
            sweeper = _SWEEPERS.get(key)
            if sweeper is None:
                sweeper = _SWEEPERS[key] = cls(root, ttl_s)
                sweeper._thread.start()
            return sweeper

    def stop(self) -> None:
        """End the thread (it waits on an event, so at once) and forget it."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with _SWEEPERS_LOCK:
            _SWEEPERS.pop((self.root.resolve(), self.ttl_s), None)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep_next()
            except Exception:  # a bad shard (permissions, I/O) must not end the pruning of the others
                log.exception("answer cache %s: sweep failed", self.root)

    def sweep_next(self) -> tuple[int, int]:
        """Sweep the next shard folder (round robin); (entries, temp files) deleted."""
        shard = SHARDS[self.next_shard]
        self.next_shard = (self.next_shard + 1) % len(SHARDS)
        return self.sweep(shard)

    def sweep(self, shard: str) -> tuple[int, int]:
        """Delete the shard's entries written over the TTL ago and its temp files over max(TTL, 1 hour) old."""
        started = time.monotonic()
        entry_before = time.time() - self.ttl_s
        temp_before = time.time() - max(self.ttl_s, TEMP_GRACE_S)
        entries = temps = 0
        try:
            listing = os.scandir(self.root / shard)
        except (FileNotFoundError, NotADirectoryError):
            return 0, 0
        with listing:
            for item in listing:
                is_entry = ENTRY.fullmatch(item.name) is not None
                if not is_entry and TEMP.fullmatch(item.name) is None:
                    continue
                try:
                    if item.stat(follow_symlinks=False).st_mtime >= (entry_before if is_entry else temp_before):
                        continue
                    os.unlink(item.path)
                except FileNotFoundError:  # another process swept or replaced it first
                    continue
                entries += is_entry
                temps += not is_entry
        if entries or temps:
            CACHE_PRUNED.inc(entries)
            log.info(
                "answer cache %s/%s: deleted %d entries written over %.3g days ago and %d stale temp files in %.2f s",
                self.root,
                shard,
                entries,
                self.ttl_s / 86400,
                temps,
                time.monotonic() - started,
            )
        return entries, temps


_SWEEPERS: dict[tuple[Path, float], CacheSweeper] = {}  # the running ones, by (folder, TTL)
_SWEEPERS_LOCK = threading.Lock()
