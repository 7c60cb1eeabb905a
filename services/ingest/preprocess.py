"""The paper's preprocessing as one pass over source rows.

Each SourceRow ends in exactly one bucket, so the counts always reconcile:
read = published + empty + duplicate + contaminated + unreadable + oversized.

- unreadable: the reader could not make a pair of the row (reason from shared/sources.py),
  or its text holds a lone surrogate (a JSON "\\ud800" escape) that no protobuf string can.
- empty: a message with empty or whitespace-only content, or no conversation at all.
- duplicate: the same (history, chosen, rejected) as an earlier pair (global, by content id).
- contaminated: a user turn shares a 13-gram with a benchmark prompt.
- oversized: its record would be larger than the raw topic takes (the caller's `too_large`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from synpref.shared.pairs import new_pair, new_record
from synpref.shared.sources import SourceRow, iter_source
from synpref.v1.pair_pb2 import PairRecord

BUCKETS = ("published", "empty", "duplicate", "contaminated", "unreadable", "oversized")
_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class Decontaminator:
    """Finds any n-gram (default 13 words) shared with a benchmark prompt.

    Prompts shorter than n words are matched whole, as a contiguous word sequence, so a
    short benchmark question cannot slip through by being short.
    """

    def __init__(self, prompts: Iterable[str] = (), n: int = 13) -> None:
        self.n = n
        self.grams: set[tuple[str, ...]] = set()
        self.short_lengths: set[int] = set()
        self.prompts = 0
        for prompt in prompts:
            self.add(prompt)

    def add(self, prompt: str) -> None:
        tokens = words(prompt)
        if not tokens:
            return
        self.prompts += 1
        if len(tokens) < self.n:
            self.grams.add(tuple(tokens))
            self.short_lengths.add(len(tokens))
            return
        self.grams.update(tuple(tokens[i : i + self.n]) for i in range(len(tokens) - self.n + 1))

    def overlap(self, text: str) -> tuple[str, ...] | None:
        """The first shared n-gram, or None."""
        if not self.grams:
            return None
        tokens = words(text)
        for k in (self.n, *sorted(self.short_lengths)):
            for i in range(len(tokens) - k + 1):
                gram = tuple(tokens[i : i + k])
                if gram in self.grams:
                    return gram
        return None


def benchmark_prompts(path: str | Path) -> list[str]:
    """First-turn prompts of a benchmark: a .txt file (one per line) or any pair file/folder."""
    path = Path(path)
    if path.suffix == ".txt":
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    prompts = []
    for row in iter_source(path):
        if row.pair is None:
            continue
        first_user = next((m["content"] for m in row.pair["conversation"] if m["role"] == "user"), "")
        if first_user:
            prompts.append(first_user)
    return prompts


@dataclass
class IngestCounts:
    read: int = 0
    published: int = 0
    empty: int = 0
    duplicate: int = 0
    contaminated: int = 0
    unreadable: int = 0
    oversized: int = 0
    by_source: dict[str, int] = field(default_factory=dict)
    """Published pairs per source."""

    def reconciles(self) -> bool:
        return self.read == sum(getattr(self, b) for b in BUCKETS)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Rejection:
    locator: str
    bucket: str
    reason: str


class Preprocessor:
    """Turns source rows into v1 PairRecords, counting and explaining every row it drops.

    too_large(record) returns why a record cannot be sent (None if it can): checked before the
    record counts as published, so an oversized row never reaches the producer.
    """

    def __init__(
        self,
        decontaminator: Decontaminator | None = None,
        seen: set[str] | None = None,
        too_large: Callable[[PairRecord], str | None] | None = None,
    ) -> None:
        self.decontaminator = decontaminator or Decontaminator()
        self.seen: set[str] = seen if seen is not None else set()
        self.too_large = too_large
        self.counts = IngestCounts()
        self.rejections: list[Rejection] = []

    def _reject(self, row: SourceRow, bucket: str, reason: str) -> None:
        setattr(self.counts, bucket, getattr(self.counts, bucket) + 1)
        self.rejections.append(Rejection(row.locator, bucket, reason))

    def process(self, row: SourceRow) -> PairRecord | None:
        """The record to publish, or None (the row is counted in its bucket)."""
        self.counts.read += 1
        if row.pair is None:
            self._reject(row, "unreadable", row.error or "unreadable")
            return None
        pair = row.pair
        if not pair["conversation"]:
            self._reject(row, "empty", "no conversation")
            return None
        for part in ("conversation", "chosen", "rejected"):
            for i, message in enumerate(pair[part]):
                if not message["content"].strip():
                    self._reject(row, "empty", f"{part}[{i}] has empty content")
                    return None
        user_text = "\n".join(m["content"] for m in pair["conversation"] if m["role"] == "user")
        gram = self.decontaminator.overlap(user_text)
        if gram is not None:
            self._reject(row, "contaminated", "shares a benchmark n-gram: " + " ".join(gram))
            return None
        try:
            proto = new_pair(pair["conversation"], pair["chosen"], pair["rejected"], pair["source"], pair["meta"])
        except UnicodeEncodeError:
            self._reject(row, "unreadable", "text holds a lone surrogate (an escaped \\ud800-\\udfff): not Unicode")
            return None
        if proto.id in self.seen:
            self._reject(row, "duplicate", f"same content as pair {proto.id}")
            return None
        record = new_record(proto)
        record.lineage.steps.append("ingest")
        reason = self.too_large(record) if self.too_large is not None else None
        if reason is not None:
            self._reject(row, "oversized", reason)
            return None
        self.seen.add(proto.id)
        self.counts.published += 1
        self.counts.by_source[proto.source] = self.counts.by_source.get(proto.source, 0) + 1
        return record

    def run(self, rows: Iterable[SourceRow]) -> Iterator[PairRecord]:
        for row in rows:
            record = self.process(row)
            if record is not None:
                yield record


def ingest_paths(
    paths: Iterable[str | Path],
    fmt: str | None = None,
    source: str | None = None,
    decontaminate: Iterable[str | Path] = (),
    ngram: int = 13,
) -> tuple[list[PairRecord], Preprocessor]:
    """In-process ingest (the embedded loop): all records of the files, and the preprocessor with its counts."""
    prompts = [p for path in decontaminate for p in benchmark_prompts(path)]
    pre = Preprocessor(Decontaminator(prompts, ngram))
    records = [r for path in paths for r in pre.run(iter_source(path, fmt, source))]
    return records, pre
