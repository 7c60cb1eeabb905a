"""The per-format readers of shared/sources.py (hh-rlhf, PandaLM, LLMBar, RM-Bench) and the helpers they share.

Each reader turns one record into (sub, pair dict) items or raises RowError; shared/sources.py detects the
format and re-exports these names, so import them from there.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from numbers import Real
from typing import Any

RM_BENCH_STYLES = ("concise", "detailed_plain", "detailed_markdown")

Messages = list[dict[str, str]]


class RowError(ValueError):
    """One record that is no pair; the message is the reason reported."""


# ---------------------------------------------------------------- helpers


def field_text(value: Any, what: str) -> str:
    """A record's field as text: a string as it is, a boolean as "True"/"False", a null as ""; else RowError."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        # PandaLM has a few JSON booleans where the model answered "True": keep the answer as text.
        return str(value)
    if value is None:
        return ""
    raise RowError(f"{what} is a {type(value).__name__}, not a string")


def user_turn(text: str) -> Messages:
    """`text` as a one-message user conversation."""
    return [{"role": "user", "content": text}]


def assistant_turn(text: str) -> Messages:
    """`text` as a one-message assistant response."""
    return [{"role": "assistant", "content": text}]


def pair_dict(
    conversation: Messages, chosen: Messages, rejected: Messages, source: str, meta: dict[str, Any]
) -> dict[str, Any]:
    """The pair dict a reader yields (shared/sources.py's module docstring), meta values as strings."""
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


def hh_prompt(text: str) -> Messages | None:
    """The turns of a prompt that is an HH-RLHF transcript up to its answer, "\\n\\nHuman: ...\\n\\nAssistant:" (the
    `prompt` column of Dahoas/rm-static and full-hh-rlhf, DeepSpeed-Chat's default data), or None for other text.

    As one user turn, a multi-turn conversation reached the chat template with its roles as literal text.
    """
    marker = "\n\nAssistant:"
    body = "\n\n" + text.lstrip()
    if not body.startswith("\n\nHuman:") or not body.rstrip().endswith(marker):
        return None
    return _hh_turns(body.rstrip()[: -len(marker)])


def read_hh_rlhf(record: Any, source: str) -> Iterator[tuple[str, dict]]:
    """One pair from an HH-RLHF record: the shared transcript before the last Assistant turn is the conversation.

    Raises RowError when the two transcripts have no Assistant turn or different prefixes.
    """
    if not isinstance(record, dict):
        raise RowError("record is not an object")
    check_scores(record)
    chosen, rejected = field_text(record.get("chosen"), "chosen"), field_text(record.get("rejected"), "rejected")
    marker = "\n\nAssistant:"
    ic, ir = chosen.rfind(marker), rejected.rfind(marker)
    if ic < 0 or ir < 0:
        raise RowError("transcript has no Assistant turn")
    if chosen[:ic] != rejected[:ir]:
        raise RowError("chosen and rejected transcripts have different prefixes: cannot be paired")
    conversation = _hh_turns(chosen[:ic])
    yield (
        "",
        pair_dict(
            conversation,
            assistant_turn(chosen[ic + len(marker) :].strip()),
            assistant_turn(rejected[ir + len(marker) :].strip()),
            source,
            {},
        ),
    )


# PandaLM's vote fields: annotator1, annotator2, annotator3 (0 a tie, 1 or 2 the better response).
VOTE_PREFIX = "annotator"


def read_pandalm(record: Any, source: str) -> Iterator[tuple[str, dict]]:
    """One pair from a PandaLM record by majority of the annotator votes; a tie or no majority is a RowError."""
    if not isinstance(record, dict):
        raise RowError("record is not an object")
    votes = [record.get(k) for k in sorted(record) if k.startswith(VOTE_PREFIX)]
    if not votes or not all(isinstance(v, int) and v in (0, 1, 2) for v in votes):
        raise RowError(f"annotator votes {votes!r} are not all 0, 1 or 2")
    label, count = Counter(votes).most_common(1)[0]
    if count * 2 <= len(votes):
        raise RowError(f"no majority among annotator votes {votes}")
    if label == 0:
        raise RowError(f"majority says tie (votes {votes}): no preference")
    instruction = field_text(record.get("instruction"), "instruction")
    extra = field_text(record.get("input"), "input")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    r1, r2 = field_text(record.get("response1"), "response1"), field_text(record.get("response2"), "response2")
    chosen, rejected = (r1, r2) if label == 1 else (r2, r1)
    meta = {"idx": record.get("idx", ""), "cmp_key": record.get("cmp_key", ""), "votes": ",".join(map(str, votes))}
    yield "", pair_dict(user_turn(prompt), assistant_turn(chosen), assistant_turn(rejected), source, meta)


def read_llmbar(record: Any, source: str) -> Iterator[tuple[str, dict]]:
    """One pair from an LLMBar record; `label` (1 or 2) names the preferred output."""
    if not isinstance(record, dict):
        raise RowError("record is not an object")
    label = record.get("label")
    if label not in (1, 2):
        raise RowError(f"label {label!r} is neither 1 nor 2")
    o1, o2 = field_text(record.get("output_1"), "output_1"), field_text(record.get("output_2"), "output_2")
    chosen, rejected = (o1, o2) if label == 1 else (o2, o1)
    prompt = user_turn(field_text(record.get("input"), "input"))
    yield "", pair_dict(prompt, assistant_turn(chosen), assistant_turn(rejected), source, {})


def _slice(i: int, j: int) -> str:
    return "hard" if i < j else "normal" if i == j else "easy"


def read_rm_bench(record: Any, source: str) -> Iterator[tuple[str, dict]]:
    """All 9 pairs of an RM-Bench record (3 chosen x 3 rejected styles), keyed `c{i}-r{j}`, styles in meta."""
    if not isinstance(record, dict):
        raise RowError("record is not an object")
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if not isinstance(chosen, list) or not isinstance(rejected, list) or len(chosen) != 3 or len(rejected) != 3:
        raise RowError("chosen and rejected must each list 3 styled responses")
    prompt = user_turn(field_text(record.get("prompt"), "prompt"))
    for i in range(3):
        for j in range(3):
            meta = {
                "id": record.get("id", ""),
                "subset": record.get("subset", ""),
                "chosen_style": RM_BENCH_STYLES[i],
                "rejected_style": RM_BENCH_STYLES[j],
                "slice": _slice(i, j),
            }
            c, r = field_text(chosen[i], f"chosen[{i}]"), field_text(rejected[j], f"rejected[{j}]")
            yield f"c{i}-r{j}", pair_dict(prompt, assistant_turn(c), assistant_turn(r), source, meta)


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


def check_scores(record: dict[str, Any]) -> None:
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


def without_label(record: dict[str, Any]) -> dict[str, Any]:
    """A copy of `record` with what states its label neutralised, so that any reader reads it as the pair its
    responses make: no `status` nor SCORE_FIELDS (check_scores), and PandaLM's votes all for response1.

    For the prompts of a benchmark, where a tie or a mislabelled row asks its prompt all the same.
    """
    scores = {key for keys in SCORE_FIELDS for key in keys}
    kept = {k: v for k, v in record.items() if k != "status" and k not in scores}
    kept.update({k: 1 for k in kept if k.startswith(VOTE_PREFIX)})
    return kept
