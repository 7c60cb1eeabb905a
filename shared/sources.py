"""Readers that turn preference files into (conversation, chosen, rejected) triples.

`iter_source(path)` yields one SourceRow per pair (or per row that could not become
one). A row is either a pair dict

    {"conversation": [msgs], "chosen": [msgs], "rejected": [msgs], "source": str, "meta": {str: str}}

where chosen/rejected hold only the response messages (the conversation is separate), or
an error naming why the row is no pair. Nothing is dropped silently: the caller counts
errors as unreadable input. Empty content is NOT an error here; ingest counts it apart.

Formats (auto-detected from the first record's keys; `fmt` overrides):
- "hh-rlhf": {"chosen": transcript, "rejected": transcript}, "\\n\\nHuman: / \\n\\nAssistant:"
  turns; the conversation is the shared prefix up to the last "\\n\\nAssistant:".
- "pandalm": {instruction, input, response1, response2, annotator1..3}, majority vote.
- "llmbar": {input, output_1, output_2, label}.
- "rm-bench": {id, subset, prompt, chosen[3], rejected[3]}: all 9 style pairs, meta names
  the styles and the official slice (hard i<j, normal i=j, easy i>j).
- "pairs": the common shapes: chosen/rejected as strings or message lists (Skywork-Reward-
  Preference: full message lists including the prompt, the shared prefix becomes the
  conversation), with an optional prompt (PROMPT_KEYS: conversation/prompt/.../question/instruction/input) as a
  string or a message list (an empty one gives way to the next), a `system` string before a string prompt; a
  string prompt that is an HH transcript is read as its turns. String responses need a prompt. Scores
  that state the label (SCORE_FIELDS: UltraFeedback's score_chosen/score_rejected, ...; also
  read in "hh-rlhf") make a tie (equal) or a mislabelled row (chosen below) an error, as does `status: "tie"`.
Containers: a JSON list, JSON lines (either .gz, .bz2, .xz or .zst too), Parquet, Arrow (a
Hugging Face save_to_disk folder), or a directory, read recursively in sorted order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from synpref.shared.pairs import ROLES
from synpref.shared.source_files import SourceError, iter_records, source_files

# The per-format readers live apart (the size limit); every name stays importable from here.
from synpref.shared.source_formats import (
    RM_BENCH_STYLES,  # noqa: F401
    SCORE_FIELDS,  # noqa: F401
    VOTE_PREFIX,
    Messages,
    RowError,
    assistant_turn,
    check_scores,
    field_text,
    hh_prompt,
    pair_dict,
    read_hh_rlhf,
    read_llmbar,
    read_pandalm,
    read_rm_bench,
    user_turn,
    without_label,  # noqa: F401
)

SourceFormat = Literal["hh-rlhf", "pandalm", "llmbar", "rm-bench", "pairs"]
FORMATS: tuple[str, ...] = get_args(SourceFormat)

# The prompt columns, first found first: conversation/prompt/history/messages, then the DPO sets' question
# (Intel/orca_dpo_pairs), instruction (alpaca, a non-empty `input` its context) and input (argilla's orca pairs).
PROMPT_KEYS = ("conversation", "prompt", "history", "messages", "question", "instruction", "input")


@dataclass(frozen=True)
class SourceRow:
    """One record of a source file: a pair dict, or the error that kept it from being one.

    Attributes:
        path: the file the record came from.
        row: 0-based record index in the file.
        pair: the pair dict (see the module docstring), or None when `error` is set.
        error: why the record is no pair, or None.
        sub: which pair of a multi-pair record; empty otherwise.
    """

    path: str
    row: int
    """0-based record index in the file (line number - 1 for JSON lines)."""
    pair: dict[str, Any] | None = None
    error: str | None = None
    sub: str = ""
    """Which pair of a multi-pair record (RM-Bench: "c0-r2"); empty otherwise."""

    @property
    def locator(self) -> str:
        """`path#row`, plus `/sub` for a multi-pair record: where to find the record again."""
        return f"{self.path}#{self.row}" + (f"/{self.sub}" if self.sub else "")


# ---------------------------------------------------------------- detection


def detect_format(path: Path, first: Any = None) -> str:
    """Guess the format from the keys of the first record (the path decides only when they cannot)."""
    if not isinstance(first, dict):
        text = path.as_posix().lower()
        return next((fmt for fmt in ("hh-rlhf", "pandalm", "llmbar", "rm-bench") if fmt in text), "pairs")
    keys = set(first)
    chosen = first.get("chosen")
    if {"response1", "response2"} <= keys and any(k.startswith(VOTE_PREFIX) for k in keys):
        return "pandalm"
    if {"output_1", "output_2", "label"} <= keys:
        return "llmbar"
    if "prompt" in keys and isinstance(chosen, list) and chosen and all(isinstance(c, str) for c in chosen):
        return "rm-bench"
    no_prompt = not keys & set(PROMPT_KEYS)
    if no_prompt and isinstance(chosen, str) and "\n\nAssistant:" in chosen:
        return "hh-rlhf"
    return "pairs"


def default_source(path: Path, fmt: str) -> str:
    """A readable source name: "hh-rlhf/harmless-base", "LLMBar/Adversarial/GPTInst", "RM-Bench/chat"."""
    parts = path.parts
    if fmt == "hh-rlhf" and "hh-rlhf" in parts:
        rest = parts[parts.index("hh-rlhf") + 1 : -1]
        return "/".join(("hh-rlhf", *rest))
    if fmt == "llmbar":
        lower = [p.lower() for p in parts]
        if "dataset" in lower:
            kept = [p for p in parts[lower.index("dataset") + 1 : -1] if p != "LLMBar"]
            return "/".join(("LLMBar", *kept))
        return "LLMBar/" + path.parent.name
    if fmt == "rm-bench":
        return "RM-Bench/" + _stem(path).removesuffix("_filtered")
    if fmt == "pandalm":
        return "PandaLM"
    return _stem(path)


_SAVED_SHARD = re.compile(r"data-\d+-of-\d+\.arrow")
_HUB_SHARD = re.compile(r"(?P<split>[\w.]+?)-\d{5}-of-\d{5}(?:-[0-9a-f]+)?\..+")
"""A Hugging Face Hub data file: <dataset>/data/train-00000-of-00004.parquet (a content hash may follow)."""


def _stem(path: Path) -> str:
    """The file's name before its suffixes; for a save_to_disk shard (all named data-0000n-of-0000m) the
    dataset's folder, with the DatasetDict's folder before a split's; for a Hub shard dataset/split (one source for
    all shards of a split, where each shard was a source of its own)."""
    if not _SAVED_SHARD.fullmatch(path.name):
        if hub := _HUB_SHARD.fullmatch(path.name):
            dataset = path.parent.parent if path.parent.name == "data" else path.parent
            return f"{dataset.name}/{hub['split']}"
        return path.name.split(".")[0]
    folder = path.parent
    return f"{folder.parent.name}/{folder.name}" if (folder.parent / "dataset_dict.json").is_file() else folder.name


# ---------------------------------------------------------------- helpers


def _messages(value: Any, what: str) -> Messages:
    if not isinstance(value, list):
        raise RowError(f"{what} is a {type(value).__name__}, not a message list")
    out: Messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"{what}[{i}] is not a {{role, content}} message")
        role = m["role"]
        if not isinstance(role, str) or role not in ROLES:  # a list or dict role: unhashable, not a RowError
            raise RowError(f"{what}[{i}] has unknown role {role!r}")
        out.append({"role": role, "content": field_text(m["content"], f"{what}[{i}].content")})
    return out


def _split_common_prefix(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    """Skywork-style full lists: the shared prefix is the conversation, each response keeps >= 1 message."""
    n = 0
    limit = min(len(chosen), len(rejected)) - 1
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def _strip_repeated(
    conversation: Messages, chosen: Messages, rejected: Messages
) -> tuple[Messages, Messages, Messages]:
    """Full lists that repeat the prompt (Skywork style with a prompt column) lose it; lists that repeat the user
    turn of a prompt given with a `system` column lose that turn; lists that open with a system turn the prompt
    column lacks, then repeat the prompt, lose both, the system turn joining the conversation."""
    heads = [conversation]
    if conversation and conversation[0]["role"] == "system":
        heads.append(conversation[1:])
    elif chosen and chosen[0]["role"] == "system" and chosen[0] == rejected[0]:
        # Else the prompt stayed in both responses, behind the system turn, and no check saw it (a user turn first).
        heads.append(chosen[:1] + conversation)
    for head in heads:
        n = len(head)
        if n and chosen[:n] == head and rejected[:n] == head and len(chosen) > n < len(rejected):
            return (head if len(head) > len(conversation) else conversation), chosen[n:], rejected[n:]
    return conversation, chosen, rejected


def _prompt(record: dict[str, Any]) -> tuple[Messages | None, bool]:
    """The conversation from the row's prompt column, a non-empty `system` string first (None without one), and
    whether that column is an HH-RLHF transcript (hh_prompt: its turns are the conversation)."""
    # `is not None`: in a Parquet/Arrow file (or pandas' JSON lines) every row has every column, null where it had
    # none; a null `conversation` must not hide the `prompt` its row holds. Nor may an empty list (alpaca-style
    # preference files carry `"history": []` beside the `instruction`): the row was dropped as "no conversation".
    key = next((k for k in PROMPT_KEYS if record.get(k) is not None and record[k] != []), None)
    if key is None:
        return None, False
    if isinstance(record[key], list):
        return _messages(record[key], key), False
    text = field_text(record[key], key)
    turns = hh_prompt(text)
    if turns is None and key == "instruction" and (context := field_text(record.get("input"), "input")).strip():
        text = f"{text}\n\n{context}"  # the alpaca prompt, as PandaLM's
    system = field_text(record.get("system"), "system")
    head = [{"role": "system", "content": system}] if system.strip() else []
    return head + (user_turn(text) if turns is None else turns), turns is not None


def read_pairs(record: Any, source: str) -> Iterator[tuple[str, dict]]:
    """One pair from the common chosen/rejected shapes (strings or message lists, optional prompt).

    Without a prompt field the shared prefix of the two lists is the conversation (string responses without one
    are a RowError); a prompt that both lists repeat is stripped. The row's own `source` field overrides `source`.
    """
    if not isinstance(record, dict):
        raise RowError("record is not an object")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise RowError(f"missing field {key!r}")
    check_scores(record)
    conversation, hh = _prompt(record)

    def response(key: str) -> Messages:
        value = record[key]
        if isinstance(value, list):
            return _messages(value, key)
        text = field_text(value, key)
        # After an HH transcript prompt, the answer as read_hh_rlhf reads it (" Sure..." stripped): the same pair
        # from an hh-rlhf file and a Dahoas copy has one content id, so dedup drops the second.
        return assistant_turn(text.strip() if hh else text)

    chosen, rejected = response("chosen"), response("rejected")
    if not chosen or not rejected:
        raise RowError("chosen or rejected is an empty message list")
    if conversation is None:
        if not (isinstance(record["chosen"], list) and isinstance(record["rejected"], list)):
            # Only whole message lists carry their prompt; a pair of bare responses would train the model without it.
            raise RowError(f"no prompt: no {'/'.join(PROMPT_KEYS)} column, and chosen/rejected are no message lists")
        conversation, chosen, rejected = _split_common_prefix(chosen, rejected)
    else:
        conversation, chosen, rejected = _strip_repeated(conversation, chosen, rejected)
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise RowError("the last chosen/rejected message is not an assistant turn")
    meta = {k: record[k] for k in ("id", "source", "subset") if k in record and isinstance(record[k], str | int)}
    row_source = str(record["source"]) if isinstance(record.get("source"), str) and record["source"] else source
    yield "", pair_dict(conversation, chosen, rejected, row_source, meta)


READERS = {
    "hh-rlhf": read_hh_rlhf,
    "pandalm": read_pandalm,
    "llmbar": read_llmbar,
    "rm-bench": read_rm_bench,
    "pairs": read_pairs,
}


# ---------------------------------------------------------------- entry point


def _iter_file(
    path: Path, fmt: str | None, source: str | None, keep: tuple[str, ...]
) -> Iterator[tuple[Any, SourceRow]]:
    records = iter_records(path)
    first = next(records, None)
    if first is None:
        return
    sample = first[1]
    if fmt is None and not _telling(first[1], first[2]):
        # A bad first line, or an empty side (RM-Bench's lists of strings look like message lists then), must not
        # decide the format of the whole file (an hh-rlhf file read as "pairs" gives every row as "no conversation",
        # an RM-Bench one every row as "not a {role, content} message"): detect from the first record that tells.
        sample = next((r for _, r, error in iter_records(path) if _telling(r, error)), None if first[2] else sample)
    file_fmt = fmt or detect_format(path, sample)
    if file_fmt not in READERS:
        raise SourceError(f"unknown format {file_fmt!r}; known: {', '.join(FORMATS)}")
    reader = READERS[file_fmt]
    name = source or default_source(path, file_fmt)
    where = path.as_posix()
    for index, record, parse_error in _chain(first, records):
        if parse_error:
            yield record, SourceRow(where, index, error=parse_error)
            continue
        try:
            # Materialize so that a bad 7th pair of an RM-Bench item fails the item, not half of it.
            produced = list(reader(record, name))
        except RowError as exc:
            yield record, SourceRow(where, index, error=str(exc))
            continue
        for sub, pair in produced:
            for column in keep:
                if record.get(column) is not None:
                    pair[column] = record[column]
            yield record, SourceRow(where, index, pair=pair, sub=sub)


def _telling(record: Any, error: str | None) -> bool:
    return error is None and not (isinstance(record, dict) and [] in (record.get("chosen"), record.get("rejected")))


def _chain(first: tuple[int, Any, str | None], rest: Iterable[tuple[int, Any, str | None]]):
    yield first
    yield from rest


def iter_source(
    path: str | Path, fmt: str | None = None, source: str | None = None, keep: tuple[str, ...] = ()
) -> Iterator[SourceRow]:
    """Every pair (or unreadable row) of a file or a directory of files, in a stable order.

    fmt: one of FORMATS; None = detect per file. source: the pair's source name; None =
    derived from the path ("hh-rlhf/harmless-base", "PandaLM", ...). keep: record fields
    copied as they are onto each of its pairs when present and not null (training's
    "margin"). Raises SourceError for a file that cannot be read at all; bad rows come back
    as SourceRow.error.
    """
    for _, row in iter_source_records(path, fmt, source, keep):
        yield row


def iter_source_records(
    path: str | Path, fmt: str | None = None, source: str | None = None, keep: tuple[str, ...] = ()
) -> Iterator[tuple[Any, SourceRow]]:
    """iter_source's rows, each with the record it was read from (each pair of a multi-pair record with the same
    one; None for a line that does not parse): for a caller that reads a refused row again."""
    if fmt is not None and fmt not in READERS:
        raise SourceError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    for file in source_files(Path(path)):
        yield from _iter_file(file, fmt, source, keep)


def iter_pairs(path: str | Path, fmt: str | None = None, source: str | None = None) -> Iterator[dict[str, Any]]:
    """Only the pairs of iter_source (for studies that do not report bad rows)."""
    for row in iter_source(path, fmt, source):
        if row.pair is not None:
            yield row.pair
