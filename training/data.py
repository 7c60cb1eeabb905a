"""Reading preference pairs for training and evaluation.

A pair dict everywhere is {"conversation": [msgs], "chosen": [msgs], "rejected": [msgs],
"source": str, "id": str}, msgs = {"role", "content"}. Inputs are the project's Parquet
datasets (read with `datasets.load_dataset("parquet")`), JSONL(.gz) in the same shape, and
the Skywork-Reward-Preference shape where chosen/rejected are whole conversations sharing
a prefix. Rows that cannot be read as a pair are returned as problems, never dropped
silently. Readers for the benchmark sets in ../shared/data live here too.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synpref.shared.pairs import pair_id

Msgs = list[dict[str, str]]


@dataclass
class PairSet:
    pairs: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """One line per unreadable row: where and why."""


def _msgs(value: Any, role: str) -> Msgs:
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [{"role": str(m["role"]), "content": "" if m["content"] is None else str(m["content"])} for m in value]


def normalize_pair(row: Mapping[str, Any], default_source: str = "unknown") -> dict[str, Any]:
    """One row in any accepted shape -> a pair dict; ValueError says what is wrong.

    Plain-string chosen/rejected become one assistant message, a "prompt" string one user
    message. When there is no conversation, the common message prefix of chosen and
    rejected is split off as the conversation.
    """
    conversation = _msgs(row.get("conversation"), "user") or _msgs(row.get("prompt"), "user")
    chosen, rejected = _msgs(row.get("chosen"), "assistant"), _msgs(row.get("rejected"), "assistant")
    if not conversation:
        common = 0
        while common < min(len(chosen), len(rejected)) - 1 and chosen[common] == rejected[common]:
            common += 1
        conversation, chosen, rejected = chosen[:common], chosen[common:], rejected[common:]
    if not chosen or not rejected:
        raise ValueError("empty chosen or rejected")
    if any(not m["content"].strip() for m in conversation + chosen + rejected):
        raise ValueError("empty message content")
    source = str(row.get("source") or default_source)
    pid = str(row.get("id") or pair_id(conversation, chosen, rejected))
    out: dict[str, Any] = {
        "conversation": conversation,
        "chosen": chosen,
        "rejected": rejected,
        "source": source,
        "id": pid,
    }
    for extra in ("margin",):
        if row.get(extra) is not None:
            out[extra] = float(row[extra])
    return out


def _data_files(path: str) -> tuple[str, list[str]]:
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*.parquet"))
        if files:
            return "parquet", files
        files = sorted(str(f) for f in p.rglob("*.jsonl*"))
        if files:
            return "json", files
        raise FileNotFoundError(f"{path}: no .parquet or .jsonl files inside")
    if not p.exists():
        raise FileNotFoundError(path)
    name = p.name.lower()
    if name.endswith(".parquet"):
        return "parquet", [str(p)]
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        return "json", [str(p)]
    raise ValueError(f"{path}: expected .parquet, .jsonl(.gz) or a folder of them")


def load_pairs(paths: Iterable[str], columns_extra: tuple[str, ...] = ()) -> PairSet:
    """Read pair files with `datasets` (Parquet, JSONL); bad rows become problems."""
    import datasets

    out = PairSet()
    for path in paths:
        kind, files = _data_files(path)
        ds = datasets.load_dataset(kind, data_files=files, split="train")
        default_source = Path(path).name.split(".")[0]
        for i, row in enumerate(ds):
            try:
                if is_hh_transcript(row):  # raw hh-rlhf files train directly
                    pair = hh_pair(row["chosen"], row["rejected"], str(row.get("source") or default_source))
                else:
                    pair = normalize_pair(row, default_source)
            except (ValueError, KeyError, TypeError) as exc:
                out.problems.append(f"{path} row {i}: {exc}")
                continue
            for col in columns_extra:
                if row.get(col) is not None:
                    pair[col] = row[col]
            out.pairs.append(pair)
    return out


def write_jsonl(pairs: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for pair in pairs:
            fh.write(json.dumps(dict(pair), ensure_ascii=False) + "\n")
    return path


def conversation_key(pair: Mapping[str, Any]) -> str:
    text = json.dumps(pair.get("conversation") or [], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def split_pairs(pairs: list[dict[str, Any]], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Fixed-seed split by conversation: all pairs of one prompt land on the same side."""
    if eval_fraction <= 0:
        return list(pairs), []
    keys = sorted({conversation_key(p) for p in pairs})
    random.Random(seed).shuffle(keys)
    held = set(keys[: max(1, round(len(keys) * eval_fraction))])
    train = [p for p in pairs if conversation_key(p) not in held]
    evals = [p for p in pairs if conversation_key(p) in held]
    return train, evals


# ------------------------------------------------------------ benchmark sets (../shared/data)


def _hh_messages(transcript: str) -> Msgs:
    msgs: Msgs = []
    for chunk in transcript.split("\n\nHuman:")[1:]:
        human, *assistant_parts = chunk.split("\n\nAssistant:")
        msgs.append({"role": "user", "content": human.strip()})
        for part in assistant_parts:
            msgs.append({"role": "assistant", "content": part.strip()})
    return msgs


def is_hh_transcript(row: Mapping[str, Any]) -> bool:
    chosen, rejected = row.get("chosen"), row.get("rejected")
    return isinstance(chosen, str) and isinstance(rejected, str) and "\n\nAssistant:" in chosen + rejected


def hh_pair(chosen_text: str, rejected_text: str, source: str = "hh-rlhf") -> dict[str, Any]:
    """Two hh-rlhf transcripts -> a pair; the conversation is the shared prefix up to the last
    "\n\nAssistant:". ValueError when the prefixes differ or a message is empty."""
    marker = "\n\nAssistant:"
    cut_c, cut_r = chosen_text.rfind(marker), rejected_text.rfind(marker)
    if cut_c < 0 or cut_r < 0 or chosen_text[:cut_c] != rejected_text[:cut_r]:
        raise ValueError("chosen and rejected do not share a prefix")
    return normalize_pair(
        {
            "conversation": _hh_messages(chosen_text[:cut_c]),
            "chosen": [{"role": "assistant", "content": chosen_text[cut_c + len(marker) :].strip()}],
            "rejected": [{"role": "assistant", "content": rejected_text[cut_r + len(marker) :].strip()}],
            "source": source,
        }
    )


def load_hh_rlhf(path: str | Path, source: str = "hh-rlhf") -> PairSet:
    """hh-rlhf rows {"chosen": transcript, "rejected": transcript} -> pairs.

    Rows whose prefixes differ (5 in harmless-base test) or that hold an empty message are
    problems, reported with their row number.
    """
    out = PairSet()
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            row = json.loads(line)
            try:
                out.pairs.append(hh_pair(row["chosen"], row["rejected"], source))
            except ValueError as exc:
                out.problems.append(f"{path} row {i}: {exc}")
    return out


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
