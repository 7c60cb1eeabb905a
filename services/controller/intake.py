"""The loop's ingest step: stream the sources into the PairStore, split held-out pairs off as they come.

Every pair is read, preprocessed (normalise, dedup, decontaminate: services/ingest) and
written to the store a batch at a time, in the `unverified` pool or, for a seeded share of
conversations (`shared.pairs.is_held_out`), the `holdout` pool. Nothing is held whole, so the
step's memory does not grow with the sources. A study also marks each pair's true label and
may flip a seeded share of them (label noise) before they are stored: the store's `given`
column keeps the label each pair came in with. A pair whose record is over `kafka.max_message_bytes` is counted as
oversized, as `synpref ingest` counts one: in a cluster every batch is published to the stages' topics, which refuse it.
"""

from __future__ import annotations

import math
import random
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from synpref.services.controller.simulated import label_is_true, mark_truth, with_label_noise
from synpref.services.controller.state import key_of
from synpref.shared.config import ControllerSettings, KafkaSettings
from synpref.shared.pairs import is_held_out, message_dicts
from synpref.shared.pairstore import PairStore
from synpref.shared.source_files import FILE_SUFFIXES, source_files
from synpref.v1.pair_pb2 import PairRecord

BATCH = 2000


class StoredIds:
    """Ingest's dedup set on disk: a content id is taken if the PairStore holds it as a key, or if it is
    in the batch not yet written. Nothing grows with the pool (a set of every id would: ~130 B a pair)."""

    def __init__(self, store: PairStore) -> None:
        self.store = store
        self.pending: set[str] = set()

    def __contains__(self, pair_id: object) -> bool:
        return isinstance(pair_id, str) and (pair_id in self.pending or bool(self.store.rows_of([pair_id])))

    def add(self, pair_id: str) -> None:
        """Take `pair_id` for the batch in flight (stored by the next `PairStore.add`)."""
        self.pending.add(pair_id)

    def written(self) -> None:
        """The batch in flight is in the store now."""
        self.pending.clear()


def wait_for_sources(
    sources: list[str],
    wait_s: float,
    say: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
    settle_s: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Return once every local source holds pair files that have been unchanged for settle_s; after wait_s,
    let ingest raise its error on the missing or changing one.

    In a cluster the sources are copied onto the volume after `helm install`: waiting (health
    SERVING) instead of exiting keeps the controller out of CrashLoopBackOff and `helm --wait` green.
    A copy (`kubectl cp`) makes the folder first and then grows its files one by one, and ingest refuses
    sources that change while it reads them, so an empty folder counts as missing and a copy in progress
    is waited out (listing, sizes and mtimes unchanged for settle_s).
    """
    local = [s for s in sources if "://" not in s]
    if not local:  # remote sources are read where they are: nothing here to wait for or to settle
        return
    suffixes = ", ".join(FILE_SUFFIXES)
    deadline = clock() + wait_s
    said = -math.inf
    while missing := [s for s in local if not _has_pair_files(s)]:
        if clock() >= deadline:
            return
        if clock() - said >= 60:
            say(f"waiting for sources {missing} (up to {wait_s:g}s): copy the pair files ({suffixes}) onto the volume")
            said = clock()
        sleep(min(5.0, max(0.0, deadline - clock())))
    stamp, since, said = _stamp_or_error(local), clock(), -math.inf
    while clock() - since < settle_s:
        if clock() >= deadline:
            if said > -math.inf:  # seen changing (not merely out of time, as `synpref run` always is: wait_s 0)
                say(f"sources {local} still changed within the last {settle_s:g}s at the end of the wait: reading them")
            return
        sleep(max(0.0, min(5.0, since + settle_s - clock(), deadline - clock())))
        if (now := _stamp_or_error(local)) != stamp:
            stamp, since = now, clock()
            if clock() - said >= 60:
                say(f"sources {local} are changing (still being copied?): waiting until {settle_s:g}s pass unchanged")
                said = clock()


def _has_pair_files(source: str) -> bool:
    try:
        return Path(source).exists() and bool(source_files(Path(source)))
    except (OSError, ValueError):  # removed or rewritten while listed: not there yet
        return False


def _stamp_or_error(sources: list[str]) -> list[tuple[str, int, int]] | str:
    try:
        return source_stamp(sources)
    except (OSError, ValueError) as exc:  # a file renamed or removed between listing and stat: a change too
        return repr(exc)


def source_stamp(sources: list[str]) -> list[tuple[str, int, int]]:
    """(file, size, mtime) of every pair file of the local sources, in reading order."""
    stamp = []
    for source in sources:
        for file in source_files(Path(source)) if "://" not in source else ():
            st = file.stat()
            stamp.append((str(file), st.st_size, st.st_mtime_ns))
    return stamp


DEFAULT_MESSAGE_BYTES: int = KafkaSettings.model_fields["max_message_bytes"].default


def ingest_sources(
    store: PairStore, c: ControllerSettings, say: Callable[[str], None], max_message_bytes: int = DEFAULT_MESSAGE_BYTES
) -> dict[str, Any]:
    """Fill an empty store from `c.sources`; returns the ingest counts and the study's label figures.
    `max_message_bytes`: the settings' kafka.max_message_bytes, the most a record published to the stages may hold."""
    from synpref.services.ingest.preprocess import Decontaminator, Preprocessor
    from synpref.shared.kafka.message_limit import MessageLimit
    from synpref.shared.sources import SourceError, iter_source

    wait_for_sources(c.sources, c.source_wait_s, say, settle_s=c.source_settle_s)
    seen = StoredIds(store)
    # The same limit in process as in a cluster, so that both curate the same pool.
    too_large = MessageLimit(max_message_bytes, "the stages' topics (kafka.max_message_bytes)")
    decontaminator = Decontaminator.from_sources(c.decontaminate)
    pre = Preprocessor(decontaminator, seen=seen, too_large=too_large, keep_rejections=1000)
    study = c.study is not None
    noise = c.study.label_noise if c.study is not None else 0.0

    def pooled() -> Iterator[tuple[str, str, PairRecord]]:
        for path in c.sources:
            for record in pre.run(iter_source(path, c.source_format, None)):
                if study:
                    mark_truth(record)
                held = is_held_out(message_dicts(record.pair.conversation), c.holdout_fraction, c.seed)
                if noise and not held:
                    record = with_label_noise(record, noise, c.seed)
                yield key_of(record), "holdout" if held else "unverified", record

    # Sources copied onto the volume after the controller started appear before their copy ends (a folder
    # first, then its files): pairs read from a source that changed meanwhile would be part of it.
    stamp = source_stamp(c.sources)
    added = 0
    stream = pooled()
    while chunk := list(islice(stream, BATCH)):
        added += store.add(chunk)
        seen.written()
        if added % (BATCH * 50) < BATCH:
            say(f"ingest: {added} pairs stored")
    if (now := source_stamp(c.sources)) != stamp:
        changed = sorted({f for f, *_ in set(now) ^ set(stamp)})
        raise SourceError(
            f"{', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''} changed while ingest read the sources "
            "(still being copied?): nothing was stored; run again once they are complete"
        )
    counts = {k: v for k, v in pre.counts.as_dict().items() if isinstance(v, int)}
    if c.max_pairs and store.size() > c.max_pairs:
        # A seeded sample of rows: the pair count of the run, not of the files.
        rows = array("q", store.all_rows(("unverified", "holdout")))  # 8 bytes a row, not a list's ~40
        # Counted, so that the report's published pairs add up to the pools.
        counts["sampled_out"] = store.drop(unsampled(rows, c.max_pairs, random.Random(f"sample:{c.seed}")))
    pools = store.counts()
    if not pools["unverified"]:
        nonzero = {k: v for k, v in counts.items() if v}
        # Refused here, inside the step's transaction: nothing is recorded, and a rerun on fixed sources ingests.
        raise SourceError(
            f"no pair to curate in {', '.join(c.sources)} (ingest counts {nonzero}, {pools['holdout']} held out): "
            "check the files, controller.source_format and controller.decontaminate"
        )
    say(f"ingest: {pools['unverified']} pairs to curate, {pools['holdout']} held out")
    return {
        # The sources this pool came from: a resumed run reads none, whatever the config lists by then.
        "ingest": {"counts": counts, "study": study, "label_noise": noise, "sources": list(c.sources)},
        "initial_label_accuracy": pool_label_accuracy(store, "unverified") if study else None,
    }


def unsampled(rows: Sequence[int], k: int, rng: random.Random) -> Iterator[int]:
    """The rows left out of a uniform sample of k of them, in one pass (selection sampling, Knuth's Algorithm S).

    `random.sample(range(n), k)` held a list of n ints and a set of k (~1.8 GB for 20M of 40M pairs); this holds none:
    row i is kept with probability (k still to keep) / (rows still to see), which keeps exactly k."""
    need, n = k, len(rows)
    for i, row in enumerate(rows):
        if need and rng.random() * (n - i) < need:
            need -= 1
        else:
            yield row


def pool_label_accuracy(store: PairStore, pool: str | tuple[str, ...]) -> float | None:
    """Study only: share of the pool's pairs whose current label is the source's (None when none is known)."""
    right = known = 0
    for chunk in store.scan(pool, batch=BATCH):
        for _, record in chunk:
            truth = label_is_true(record)
            if truth is not None:
                known += 1
                right += truth
    return right / known if known else None
