"""The paper's preprocessing as one pass over source rows.

Each SourceRow ends in exactly one bucket, so the counts always reconcile:
read = published + empty + identical + duplicate + contaminated + unreadable + oversized.

- unreadable: the reader could not make a pair of the row (reason from shared/sources.py), a response opens
  with a user or system turn (full message lists that part at a user turn, or at their system turn, answer two
  different prompts; lists that repeat a prompt other than the prompt field's hold the question twice), or its text
  holds a lone surrogate (a JSON "\\ud800" escape) that no protobuf string can.
- empty: a message with empty or whitespace-only content, or no conversation at all.
- identical: chosen and rejected are the same messages: no preference to learn (a Bradley-Terry loss of
  log 2 whatever the model, a held-out pair no model gets right), and a flip keeps its id.
- duplicate: the same (history, chosen, rejected) as an earlier pair (global, by content id), or the same comparison
  with chosen and rejected swapped (`swapped` counts those: two sources disagree on the label; the first read is
  kept and curation checks its label, where both would train the model in opposite directions).
- contaminated: a user turn shares a 13-gram with a benchmark prompt.
- oversized: its record would be larger than the raw topic takes (the caller's `too_large`).

A row that fits several lands in the first that applies, in the order checked: unreadable, empty, identical, oversized
by its text's length alone (MessageLimit.text_over: certain, and free, so a megabyte message is refused before the
n-gram check cuts it into words), contaminated, unreadable (lone surrogate), duplicate, oversized (the whole record).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from synpref.shared.kafka.message_limit import MessageLimit
from synpref.shared.pairs import new_pair, new_record, pair_id
from synpref.shared.sources import (
    READERS,
    RowError,
    SourceRow,
    detect_format,
    iter_source,
    iter_source_records,
    without_label,
)
from synpref.v1.pair_pb2 import PairRecord

BUCKETS = ("published", "empty", "identical", "duplicate", "contaminated", "unreadable", "oversized")
_WORD = re.compile(r"\w+", re.UNICODE)
BUILTIN_DIR = Path(__file__).resolve().parent / "data"  # resolve: an editable install links this file
"""Built-in benchmark sets: <name>.ngrams, made by tools/decontam/build_ngrams.py, shipped in the wheel."""
SET_SUFFIX = ".ngrams"
SET_FORMAT = "synpref-ngram-hashes-v1"
HASH_NAME = "blake2b-64"
DIGEST_BYTES = 8


@lru_cache(maxsize=1)
def _invisible() -> re.Pattern[str]:
    """Every format character (Unicode category Cf: soft hyphen, zero-width spaces and joiners, BOM, bidi
    marks, tags): they show nothing, yet each one splits a word. As a class of ~20 ranges: one of ~160
    single characters made the scan 10x slower."""
    ranges: list[list[int]] = []
    for c in range(sys.maxunicode + 1):
        if unicodedata.category(chr(c)) == "Cf":
            if ranges and ranges[-1][1] == c - 1:
                ranges[-1][1] = c
            else:
                ranges.append([c, c])
    return re.compile("[" + "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges) + "]")


def words(text: str) -> list[str]:
    """The lower-cased words of `text` (runs of letters, digits and underscores): what the n-gram check compares.

    Format characters removed and NFKC applied first, so text that reads the same is the same words: a soft
    hyphen or zero-width space inside a word, full-width letters and ligatures ("\ufb01" is "fi") would
    otherwise hide a benchmark prompt from the check. ASCII text needs neither.
    """
    if not text.isascii():
        text = unicodedata.normalize("NFKC", _invisible().sub("", text))
    return _WORD.findall(text.lower())


def gram_digest(gram: Sequence[str]) -> bytes:
    """A stable 8-byte digest of a word sequence: BLAKE2b-64 of the words joined by spaces.

    Words (see `words`) hold no spaces, so the join is unambiguous; the digest is the same in
    every process (Python's hash() is not), which lets a built-in set ship as digests only.
    """
    return hashlib.blake2b(" ".join(gram).encode("utf-8"), digest_size=DIGEST_BYTES).digest()


@lru_cache(maxsize=1 << 16)
def _word_digest(word: str) -> bytes:
    return gram_digest((word,))


class Decontaminator:
    """Finds any n-gram (default 13 words) shared with a benchmark prompt.

    Prompts shorter than n words are matched whole, as a contiguous word sequence, so a
    short benchmark question cannot slip through by being short. Grams are kept as
    gram_digest values only, so a built-in set (BUILTIN_DIR, written by `save`) holds no
    prompt text; the first words of the short prompts (also digests) let `overlap` try the
    short lengths only where one of them starts.
    """

    def __init__(self, prompts: Iterable[str] = (), n: int = 13) -> None:
        if n < 1:
            raise ValueError(f"an n-gram check needs n of at least 1, not {n}: a 0-gram is in every text")
        self.n = n
        self.grams: set[bytes] = set()
        self.short_lengths: set[int] = set()
        self.short_starts: set[bytes] = set()
        self.prompts = 0
        for prompt in prompts:
            self.add(prompt)

    @classmethod
    def from_sources(cls, sources: Iterable[str | Path], n: int = 13) -> Decontaminator:
        """The grams of every source: a built-in set's name (builtin_sets) or a prompts file (benchmark_prompts)."""
        deco = cls(n=n)
        builtin = builtin_sets()
        for source in sources:
            if str(source) in builtin:
                deco.add_set(builtin[str(source)])
            elif not Path(source).exists():
                raise ValueError(f"{source}: no such file, nor a built-in set (those are: {', '.join(builtin)})")
            else:
                for prompt in benchmark_prompts(source):
                    deco.add(prompt)
        return deco

    def add(self, prompt: str) -> None:
        """Add the n-grams of one benchmark prompt (a prompt shorter than n words as a whole); a prompt
        without words is ignored.
        """
        tokens = words(prompt)
        if not tokens:
            return
        self.prompts += 1
        if len(tokens) < self.n:
            self.grams.add(gram_digest(tokens))
            self.short_lengths.add(len(tokens))
            self.short_starts.add(_word_digest(tokens[0]))
            return
        self.grams.update(gram_digest(tokens[i : i + self.n]) for i in range(len(tokens) - self.n + 1))

    def overlap(self, text: str) -> tuple[str, ...] | None:
        """The first shared n-gram (then the shortest short prompt, earliest first), or None."""
        if not self.grams:
            return None
        tokens = words(text)
        for i in range(len(tokens) - self.n + 1):
            if gram_digest(tokens[i : i + self.n]) in self.grams:
                return tuple(tokens[i : i + self.n])
        if not self.short_lengths:
            return None
        starts = [i for i, token in enumerate(tokens) if _word_digest(token) in self.short_starts]
        for k in sorted(self.short_lengths):
            for i in starts:
                if i + k <= len(tokens) and gram_digest(tokens[i : i + k]) in self.grams:
                    return tuple(tokens[i : i + k])
        return None

    def save(self, path: str | Path) -> int:
        """Write the digests as a built-in set file; returns its size in bytes.

        Format: one JSON header line (n, hash, prompts, short_lengths, grams, short_starts), then
        the `grams` digests and the `short_starts` digests, 8 bytes each, each list sorted.
        Sorted and timestamp-free, so the same prompts always give the same bytes.
        """
        header = {
            "format": SET_FORMAT,
            "hash": HASH_NAME,
            "n": self.n,
            "prompts": self.prompts,
            "short_lengths": sorted(self.short_lengths),
            "grams": len(self.grams),
            "short_starts": len(self.short_starts),
        }
        body = b"".join(sorted(self.grams)) + b"".join(sorted(self.short_starts))
        data = (json.dumps(header, sort_keys=True) + "\n").encode() + body
        Path(path).write_bytes(data)
        return len(data)

    def add_set(self, path: str | Path) -> None:
        """Add a set file written by `save` (same n; ValueError otherwise)."""
        line, _, body = Path(path).read_bytes().partition(b"\n")
        header = json.loads(line)
        if header.get("format") != SET_FORMAT or header.get("hash") != HASH_NAME:
            raise ValueError(f"{path}: not a {SET_FORMAT} file of {HASH_NAME} digests")
        if header["n"] != self.n:
            raise ValueError(f"{path} holds {header['n']}-grams; an overlap check of {self.n}-grams needs prompt files")
        count = header["grams"] + header["short_starts"]
        if len(body) != count * DIGEST_BYTES:
            raise ValueError(f"{path}: {len(body)} bytes of digests, the header says {count} x {DIGEST_BYTES}")
        digests = [body[i : i + DIGEST_BYTES] for i in range(0, len(body), DIGEST_BYTES)]
        self.grams.update(digests[: header["grams"]])
        self.short_starts.update(digests[header["grams"] :])
        self.short_lengths.update(header["short_lengths"])
        self.prompts += header["prompts"]


def builtin_sets() -> dict[str, Path]:
    """Name -> file of the benchmark n-gram sets that ship with the package (e.g. "rmbench")."""
    return {p.name.removesuffix(SET_SUFFIX): p for p in sorted(BUILTIN_DIR.glob("*" + SET_SUFFIX))}


def benchmark_prompts(path: str | Path) -> list[str]:
    """First-turn prompts of a benchmark: a .txt file (one per line) or any pair file/folder.

    A row refused for its label alone (a tie, scores that call it mislabelled) gives its prompt too: the benchmark
    asks it all the same (PandaLM's test set: 105 tied rows, 12 prompts asked by no other row).
    """
    path = Path(path)
    if path.suffix == ".txt":
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"{path}: no benchmark prompt (a .txt file holds one a line)")
        return prompts
    prompts, rows, error = [], 0, None
    for record, row in iter_source_records(path):
        rows += 1
        pair = row.pair if row.pair is not None else _unlabelled_pair(record)
        if pair is None:
            error = error or f"{row.locator}: {row.error}"
            continue
        first_user = next((m["content"] for m in pair["conversation"] if m["role"] == "user"), "")
        if first_user:
            prompts.append(first_user)
    if not prompts:
        # Refused, not an empty set: a check against nothing passes every contaminated pair without a word.
        why = f"none of its {rows} rows is a pair with a user prompt ({error or 'no user turn'})" if rows else "empty"
        raise ValueError(f"{path}: no benchmark prompt: {why}; give prompt-only sets as .txt, one prompt a line")
    return prompts


def _unlabelled_pair(record: Any) -> dict | None:
    """The pair of a refused record once what states its label is neutralised (without_label), in the format its
    own keys tell, or None: a row no pair whatever its label (no responses, bad JSON)."""
    if not isinstance(record, dict):
        return None
    record = without_label(record)
    try:
        return next(iter(READERS[detect_format(Path(), record)](record, "")))[1]
    except (RowError, StopIteration):
        return None


@dataclass
class IngestCounts:
    """How many rows ingest read and the bucket each ended in (see the module docstring).

    Attributes:
        read: rows read.
        published: rows made into a record to publish.
        empty: rows with an empty message or no conversation.
        identical: rows whose chosen and rejected responses are the same messages.
        duplicate: rows with the same content id as an earlier pair (or one in `seen`), or the same comparison swapped.
        swapped: of `duplicate`, the rows whose swapped pair (chosen and rejected exchanged) was seen.
        contaminated: rows whose user turns share an n-gram with a benchmark prompt.
        unreadable: rows that are no pair, with a response opening with a user or system turn, or whose text holds
            a lone surrogate.
        oversized: rows whose record `too_large` refused (larger than the raw topic takes).
        by_source: published pairs per source.
    """

    read: int = 0
    published: int = 0
    empty: int = 0
    identical: int = 0
    duplicate: int = 0
    contaminated: int = 0
    unreadable: int = 0
    oversized: int = 0
    swapped: int = 0
    by_source: dict[str, int] = field(default_factory=dict)
    """Published pairs per source."""

    def reconciles(self) -> bool:
        """Whether `read` equals the sum of the buckets (it always should)."""
        return self.read == sum(getattr(self, b) for b in BUCKETS)

    def as_dict(self) -> dict:
        """The counts as a dict (by_source included)."""
        return asdict(self)


@dataclass(frozen=True)
class Rejection:
    """A dropped row: its locator (`file#row`), its bucket (BUCKETS) and the reason."""

    locator: str
    bucket: str
    reason: str


class SeenIds(Protocol):
    """Content ids already taken: a set, or a store that answers membership from disk (the loop's ingest)."""

    def __contains__(self, pair_id: object) -> bool: ...

    def add(self, pair_id: str) -> None: ...


class Preprocessor:
    """Turns source rows into v1 PairRecords, counting and explaining every row it drops.

    too_large(record) returns why a record cannot be sent (None if it can): checked before the
    record counts as published, so an oversized row never reaches the producer; a MessageLimit also refuses,
    before decontamination, a row whose text alone is over its limit.
    keep_rejections: how many dropped rows to keep with their reasons (None = all; the counts
    are always complete), so a source full of duplicates does not grow memory.
    on_reject: called with every rejection as it happens (`synpref ingest` streams its report).
    """

    def __init__(
        self,
        decontaminator: Decontaminator | None = None,
        seen: SeenIds | None = None,
        too_large: Callable[[PairRecord], str | None] | None = None,
        keep_rejections: int | None = None,
        on_reject: Callable[[Rejection], None] | None = None,
    ) -> None:
        self.decontaminator = decontaminator or Decontaminator()
        self.seen: SeenIds = seen if seen is not None else set()
        self.too_large = too_large
        self.keep_rejections = keep_rejections
        self.on_reject = on_reject
        self.counts = IngestCounts()
        self.rejections: list[Rejection] = []

    def _reject(self, row: SourceRow, bucket: str, reason: str) -> None:
        setattr(self.counts, bucket, getattr(self.counts, bucket) + 1)
        rejection = Rejection(row.locator, bucket, reason)
        if self.on_reject is not None:
            self.on_reject(rejection)
        if self.keep_rejections is None or len(self.rejections) < self.keep_rejections:
            self.rejections.append(rejection)

    def process(self, row: SourceRow) -> PairRecord | None:
        """The record to publish, or None (the row is counted in its bucket)."""
        self.counts.read += 1
        if row.pair is None:
            self._reject(row, "unreadable", row.error or "unreadable")
            return None
        pair = row.pair
        for part in ("chosen", "rejected"):
            if pair[part] and (role := pair[part][0]["role"]) in ("user", "system"):
                # Not a comparison of answers: the sides answer different prompts (under different system prompts),
                # or each repeats the prompt.
                why = f"{part}[0] is a {role} turn: chosen and rejected must be answers to the conversation"
                self._reject(row, "unreadable", why)
                return None
        if not pair["conversation"]:
            self._reject(row, "empty", "no conversation")
            return None
        for part in ("conversation", "chosen", "rejected"):
            for i, message in enumerate(pair[part]):
                if not message["content"].strip():
                    self._reject(row, "empty", f"{part}[{i}] has empty content")
                    return None
        if pair["chosen"] == pair["rejected"]:
            self._reject(row, "identical", "chosen and rejected are the same: no preference")
            return None
        parts = ("conversation", "chosen", "rejected")
        if isinstance(self.too_large, MessageLimit):
            reason = self.too_large.text_over(m["content"] for part in parts for m in pair[part])
            if reason is not None:
                self._reject(row, "oversized", reason)
                return None
        # The user turns of the responses too: full trajectories (arena-style, both sides with the same later user
        # turns) keep only the prefix up to the first answer in the conversation. Each distinct turn once.
        turns = (m["content"] for part in parts for m in pair[part] if m["role"] == "user")
        user_text = "\n".join(dict.fromkeys(turns))
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
        mirror = pair_id(pair["conversation"], pair["rejected"], pair["chosen"])
        if mirror in self.seen:
            self.counts.swapped += 1
            self._reject(row, "duplicate", f"pair {mirror} with chosen and rejected swapped: the sources disagree")
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
        """The records of `rows` to publish, lazily; dropped rows are counted and kept in `rejections`."""
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
    """In-process ingest (the embedded loop): all records of the files, and the preprocessor with its counts.

    `decontaminate` names built-in benchmark sets (builtin_sets) or prompt files (benchmark_prompts).
    """
    pre = Preprocessor(Decontaminator.from_sources(decontaminate, ngram))
    records = [r for path in paths for r in pre.run(iter_source(path, fmt, source))]
    return records, pre
