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
  conversation), with an optional prompt/conversation as a string or a message list. Scores
  that state the label (SCORE_FIELDS: UltraFeedback's score_chosen/score_rejected, ...; also
  read in "hh-rlhf") make a tie (equal) or a mislabelled row (chosen below) an error, as does `status: "tie"`.
Containers: a JSON list, JSON lines (either .gz, .bz2, .xz or .zst too), Parquet, Arrow (a
Hugging Face save_to_disk folder), or a directory, read recursively in sorted order.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from numbers import Real
from pathlib import Path
from typing import Any, Literal, get_args

from synpref.shared.pairs import ROLES
from synpref.shared.source_files import SourceError, iter_records, source_files

SourceFormat = Literal["hh-rlhf", "pandalm", "llmbar", "rm-bench", "pairs"]
FORMATS: tuple[str, ...] = get_args(SourceFormat)
RM_BENCH_STYLES = ("concise", "detailed_plain", "detailed_markdown")

Messages = list[dict[str, str]]


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


class RowError(ValueError):
    """One record that is no pair; the message is the reason reported."""


# ---------------------------------------------------------------- detection


def detect_format(path: Path, first: Any = None) -> str:
    """Guess the format from the keys of the first record (the path decides only when they cannot)."""
    if not isinstance(first, dict):
        text = path.as_posix().lower()
        return next((fmt for fmt in ("hh-rlhf", "pandalm", "llmbar", "rm-bench") if fmt in text), "pairs")
    keys = set(first)
    chosen = first.get("chosen")
    if {"response1", "response2"} <= keys and any(k.startswith("annotator") for k in keys):
        return "pandalm"
    if {"output_1", "output_2", "label"} <= keys:
        return "llmbar"
    if "prompt" in keys and isinstance(chosen, list) and chosen and all(isinstance(c, str) for c in chosen):
        return "rm-bench"
    no_prompt = not keys & {"prompt", "conversation", "history", "messages"}
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


def _stem(path: Path) -> str:
    """The file's name before its suffixes; for a save_to_disk shard (all named data-0000n-of-0000m) the
    dataset's folder, with the DatasetDict's folder before a split's."""
    if not _SAVED_SHARD.fullmatch(path.name):
        return path.name.split(".")[0]
    folder = path.parent
    return f"{folder.parent.name}/{folder.name}" if (folder.parent / "dataset_dict.json").is_file() else folder.name


# ---------------------------------------------------------------- helpers


def _text(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        # PandaLM has a few JSON booleans where the model answered "True": keep the answer as text.
        return str(value)
    if value is None:
        return ""
    raise RowError(f"{what} is a {type(value).__name__}, not a string")


def _user(text: str) -> Messages:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> Messages:
    return [{"role": "assistant", "content": text}]


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
        out.append({"role": role, "content": _text(m["content"], f"{what}[{i}].content")})
    return out


def _pair(conversation: Messages, chosen: Messages, rejected: Messages, source: str, meta: dict[str, Any]):
    return {
        "conversation": conversation,
        "chosen": chosen,
        "rejected": rejected,
        "source": source,
        "meta": {k: str(v) for k, v in meta.items()},
    }


# ---------------------------------------------------------------- formats

_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _hh_turns(prefix: str) -> Messages:
    pieces = _TURN.split(prefix)
    if pieces[0].strip():
        raise RowError("transcript does not start with a Human/Assistant turn")
    turns = []
    for role, content in zip(pieces[1::2], pieces[2::2], strict=True):
        turns.append({"role": _HH_ROLES[role], "content": content.strip()})
    return turns


def read_hh_rlhf(record: Any, source: str) -> Iterator[tuple[str, dict]]:
    """One pair from an HH-RLHF record: the shared transcript before the last Assistant turn is the conversation.

    Raises RowError when the two transcripts have no Assistant turn or different prefixes.
    """
    if not isinstance(record, dict):
        raise RowError("record is not an object")
    _check_scores(record)
    chosen, rejected = _text(record.get("chosen"), "chosen"), _text(record.get("rejected"), "rejected")
    marker = "\n\nAssistant:"
    ic, ir = chosen.rfind(marker), rejected.rfind(marker)
    if ic < 0 or ir < 0:
        raise RowError("transcript has no Assistant turn")
    if chosen[:ic] != rejected[:ir]:
        raise RowError("chosen and rejected transcripts have different prefixes: cannot be paired")
    conversation = _hh_turns(chosen[:ic])
    yield (
        "",
        _pair(
            conversation,
            _assistant(chosen[ic + len(marker) :].strip()),
            _assistant(rejected[ir + len(marker) :].strip()),
            source,
            {},
        ),
    )


def read_pandalm(record: Any, source: str) -> Iterator[tuple[str, dict]]:
    """One pair from a PandaLM record by majority of the annotator votes; a tie or no majority is a RowError."""
    if not isinstance(record, dict):
        raise RowError("record is not an object")
    votes = [record.get(k) for k in sorted(record) if k.startswith("annotator")]
    if not votes or not all(isinstance(v, int) and v in (0, 1, 2) for v in votes):
        raise RowError(f"annotator votes {votes!r} are not all 0, 1 or 2")
    label, count = Counter(votes).most_common(1)[0]
    if count * 2 <= len(votes):
        raise RowError(f"no majority among annotator votes {votes}")
    if label == 0:
        raise RowError(f"majority says tie (votes {votes}): no preference")
    instruction = _text(record.get("instruction"), "instruction")
    extra = _text(record.get("input"), "input")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    r1, r2 = _text(record.get("response1"), "response1"), _text(record.get("response2"), "response2")
    chosen, rejected = (r1, r2) if label == 1 else (r2, r1)
    meta = {"idx": record.get("idx", ""), "cmp_key": record.get("cmp_key", ""), "votes": ",".join(map(str, votes))}
    yield "", _pair(_user(prompt), _assistant(chosen), _assistant(rejected), source, meta)


def read_llmbar(record: Any, source: str) -> Iterator[tuple[str, dict]]:
    """One pair from an LLMBar record; `label` (1 or 2) names the preferred output."""
    if not isinstance(record, dict):
        raise RowError("record is not an object")
    label = record.get("label")
    if label not in (1, 2):
        raise RowError(f"label {label!r} is neither 1 nor 2")
    o1, o2 = _text(record.get("output_1"), "output_1"), _text(record.get("output_2"), "output_2")
    chosen, rejected = (o1, o2) if label == 1 else (o2, o1)
    yield "", _pair(_user(_text(record.get("input"), "input")), _assistant(chosen), _assistant(rejected), source, {})


def _slice(i: int, j: int) -> str:
    return "hard" if i < j else "normal" if i == j else "easy"


def read_rm_bench(record: Any, source: str) -> Iterator[tuple[str, dict]]:
    """All 9 pairs of an RM-Bench record (3 chosen x 3 rejected styles), keyed `c{i}-r{j}`, styles in meta."""
    if not isinstance(record, dict):
        raise RowError("record is not an object")
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if not isinstance(chosen, list) or not isinstance(rejected, list) or len(chosen) != 3 or len(rejected) != 3:
        raise RowError("chosen and rejected must each list 3 styled responses")
    prompt = _user(_text(record.get("prompt"), "prompt"))
    for i in range(3):
        for j in range(3):
            meta = {
                "id": record.get("id", ""),
                "subset": record.get("subset", ""),
                "chosen_style": RM_BENCH_STYLES[i],
                "rejected_style": RM_BENCH_STYLES[j],
                "slice": _slice(i, j),
            }
            c, r = _text(chosen[i], f"chosen[{i}]"), _text(rejected[j], f"rejected[{j}]")
            yield f"c{i}-r{j}", _pair(prompt, _assistant(c), _assistant(r), source, meta)


# Score fields that state a row's label (UltraFeedback binarized; Argilla's DPO sets): equal scores are a tie, a chosen
# score below the rejected one a mislabelled row; either read as a preference trains the model on noise.
SCORE_FIELDS = (
    ("score_chosen", "score_rejected"),
    ("chosen_score", "rejected_score"),
    ("chosen_rating", "rejected_rating"),
    ("chosen-rating", "rejected-rating"),
)


def _score(value: Any, what: str) -> Any:
    if value is None or value != value:  # a Parquet null or pandas' NaN: the row has no score
        return None
    if isinstance(value, bool) or not isinstance(value, Real | Decimal):
        raise RowError(f"{what} is a {type(value).__name__}, not a number")
    return value  # compared as it is: float() of a 400-digit JSON integer overflows


def _check_scores(record: dict[str, Any]) -> None:
    """RowError when the record's own scores (or status) say its chosen response is not the better one."""
    status = record.get("status")
    if isinstance(status, str) and status.strip().lower() == "tie":
        # argilla's distilabel-intel-orca-dpo-pairs: rated alike (a "swapped" row is already in the new order).
        raise RowError("status is 'tie': no preference")
    for chosen_key, rejected_key in SCORE_FIELDS:
        good, bad = _score(record.get(chosen_key), chosen_key), _score(record.get(rejected_key), rejected_key)
        if good is None or bad is None:
            continue
        if good == bad:
            raise RowError(f"{chosen_key} equals {rejected_key} ({good}): a tie, no preference")
        if good < bad:
            raise RowError(
                f"{chosen_key} {good} < {rejected_key} {bad}: the scores say rejected is better (mislabelled)"
            )


def _split_common_prefix(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    """Skywork-style full lists: the shared prefix is the conversation, each response keeps >= 1 message."""
    n = 0
    limit = min(len(chosen), len(rejected)) - 1
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def read_pairs(record: Any, source: str) -> Iterator[tuple[str, dict]]:
    """One pair from the common chosen/rejected shapes (strings or message lists, optional prompt).

    Without a prompt field the shared prefix of the two lists is the conversation; a prompt
    that both lists repeat is stripped. The row's own `source` field overrides `source`.
    """
    if not isinstance(record, dict):
        raise RowError("record is not an object")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise RowError(f"missing field {key!r}")
    _check_scores(record)
    # `is not None`: in a Parquet/Arrow file (or pandas' JSON lines) every row has every column, null where it had
    # none; a null `conversation` must not hide the `prompt` its row holds.
    prompt_keys = ("conversation", "prompt", "history", "messages")
    prompt_key = next((k for k in prompt_keys if record.get(k) is not None), None)
    prompt_value = record.get(prompt_key) if prompt_key else None
    if isinstance(prompt_value, list):
        conversation: Messages | None = _messages(prompt_value, prompt_key or "prompt")
    elif prompt_value is None:
        conversation = None
    else:
        conversation = _user(_text(prompt_value, prompt_key or "prompt"))

    def response(key: str) -> Messages:
        value = record[key]
        if isinstance(value, list):
            return _messages(value, key)
        return _assistant(_text(value, key))

    chosen, rejected = response("chosen"), response("rejected")
    if not chosen or not rejected:
        raise RowError("chosen or rejected is an empty message list")
    if conversation is None:
        conversation, chosen, rejected = _split_common_prefix(chosen, rejected)
    else:
        n = len(conversation)
        # Full lists that repeat the prompt (Skywork style with a prompt column): strip it.
        if n and chosen[:n] == conversation and rejected[:n] == conversation and len(chosen) > n < len(rejected):
            chosen, rejected = chosen[n:], rejected[n:]
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise RowError("the last chosen/rejected message is not an assistant turn")
    meta = {k: record[k] for k in ("id", "source", "subset") if k in record and isinstance(record[k], str | int)}
    row_source = str(record["source"]) if isinstance(record.get("source"), str) and record["source"] else source
    yield "", _pair(conversation, chosen, rejected, row_source, meta)


READERS = {
    "hh-rlhf": read_hh_rlhf,
    "pandalm": read_pandalm,
    "llmbar": read_llmbar,
    "rm-bench": read_rm_bench,
    "pairs": read_pairs,
}


# ---------------------------------------------------------------- entry point


def _iter_file(path: Path, fmt: str | None, source: str | None, keep: tuple[str, ...]) -> Iterator[SourceRow]:
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
            yield SourceRow(where, index, error=parse_error)
            continue
        try:
            # Materialize so that a bad 7th pair of an RM-Bench item fails the item, not half of it.
            produced = list(reader(record, name))
        except RowError as exc:
            yield SourceRow(where, index, error=str(exc))
            continue
        for sub, pair in produced:
            for column in keep:
                if record.get(column) is not None:
                    pair[column] = record[column]
            yield SourceRow(where, index, pair=pair, sub=sub)


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
    if fmt is not None and fmt not in READERS:
        raise SourceError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    for file in source_files(Path(path)):
        yield from _iter_file(file, fmt, source, keep)


def iter_pairs(path: str | Path, fmt: str | None = None, source: str | None = None) -> Iterator[dict[str, Any]]:
    """Only the pairs of iter_source (for studies that do not report bad rows)."""
    for row in iter_source(path, fmt, source):
        if row.pair is not None:
            yield row.pair
