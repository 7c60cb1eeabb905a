"""Reading preference pairs for training and evaluation, through shared/sources.py.

A training pair is a pair dict of shared.sources ({"conversation", "chosen", "rejected":
[msgs], "source": str, "meta": {...}}, msgs = {"role", "content"}) plus "id" (the row's
own id, else the content hash) and the extra columns asked for ("margin" always). Every
format shared.sources reads trains directly: the project's Parquet datasets, JSONL(.gz)
in the same shape, the Skywork-Reward-Preference shape (whole conversations sharing a
prefix), raw hh-rlhf transcripts, PandaLM (ties are no pair), LLMBar, RM-Bench. Rows that
cannot be a pair, and pairs with an empty message (nothing to score), are problems named
by file#row, never dropped silently. The RM-Bench reader of the benchmark evaluation
lives here too.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synpref.shared.pairs import pair_id, split_by_conversation
from synpref.shared.sources import iter_source

ALWAYS_KEPT = ("margin",)


@dataclass
class PairSet:
    """Pairs read from files, and the rows that could not be read.

    Attributes:
        pairs: the training pair dicts (see the module docstring).
        problems: one line per unreadable row: "file#row: why".
    """

    pairs: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """One line per unreadable row: "file#row: why"."""


def iter_pairs(
    paths: Iterable[str | Path],
    columns_extra: tuple[str, ...] = (),
    fmt: str | None = None,
    source: str | None = None,
) -> Iterator[tuple[dict[str, Any] | None, str]]:
    """Stream the pairs of files or folders (format detected per file unless `fmt`), one at a time:
    (pair, "") for a training pair, (None, "file#row: why") for a row that is none."""
    for path in paths:
        for row in iter_source(path, fmt, source, keep=(*ALWAYS_KEPT, *columns_extra)):
            if row.pair is None:
                yield None, f"{row.locator}: {row.error}"
                continue
            pair = row.pair
            messages = pair["conversation"] + pair["chosen"] + pair["rejected"]
            if any(not m["content"].strip() for m in messages):
                yield None, f"{row.locator}: empty message content"
                continue
            own_id = pair["meta"].get("id") if not row.sub else None
            pair["id"] = own_id or pair_id(pair["conversation"], pair["chosen"], pair["rejected"])
            yield pair, ""


def load_pairs(
    paths: Iterable[str | Path],
    columns_extra: tuple[str, ...] = (),
    fmt: str | None = None,
    source: str | None = None,
) -> PairSet:
    """Read pair files or folders (format detected per file unless `fmt`); bad rows become problems.
    Holds every pair: for evaluation sets; training streams them (`iter_pairs`, training/data_cache.py)."""
    out = PairSet()
    for pair, problem in iter_pairs(paths, columns_extra, fmt, source):
        if pair is None:
            out.problems.append(problem)
        else:
            out.pairs.append(pair)
    return out


def load_hh_rlhf(path: str | Path, source: str | None = None) -> PairSet:
    """hh-rlhf transcripts; rows whose prefixes differ (5 in harmless-base test) or that hold
    an empty message are problems."""
    return load_pairs([path], fmt="hh-rlhf", source=source)


def write_jsonl(pairs: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write `pairs` as JSON lines to `path` (gzipped when it ends in .gz); returns the path."""
    path = Path(path)
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for pair in pairs:
            fh.write(json.dumps(dict(pair), ensure_ascii=False) + "\n")
    return path


def _conversation(pair: Mapping[str, Any]) -> list[dict[str, str]]:
    return list(pair.get("conversation") or [])


def split_pairs(pairs: list[dict[str, Any]], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) by conversation: shared.pairs.split_by_conversation, the controller's rule too."""
    return split_by_conversation(pairs, _conversation, eval_fraction, seed)


# ------------------------------------------------------------ RM-Bench, for its 3x3 style accuracy


RMBENCH_FILES = ("chat", "code", "safety-refuse", "safety-response")


def load_rmbench(root: str | Path) -> list[dict[str, Any]]:
    """RM-Bench items {id, domain, prompt, chosen[3], rejected[3]} from the *_filtered.json files."""
    items: list[dict[str, Any]] = []
    for name in RMBENCH_FILES:
        path = Path(root) / f"{name}_filtered.json"
        if not path.exists():
            continue
        for row in json.loads(path.read_text()):
            items.append(
                {
                    "id": row["id"],
                    "domain": name.split("-")[0],
                    "subset": name,
                    "prompt": row["prompt"],
                    "chosen": list(row["chosen"]),
                    "rejected": list(row["rejected"]),
                }
            )
    if not items:
        raise FileNotFoundError(f"{root}: no RM-Bench *_filtered.json files")
    return items
