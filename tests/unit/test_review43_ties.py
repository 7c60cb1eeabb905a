"""Session 43's review of ties and scores in the pair readers: a row whose own scores state a tie
(UltraFeedback's `score_chosen` == `score_rejected`) was read as a preference, and one whose scores say the
rejected response is better (a mislabelled row) as the opposite preference, both without a word."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synpref.shared.sources import READERS, RowError, iter_source

USER = {"role": "user", "content": "Name a prime."}


def _ultrafeedback(chosen: str, rejected: str, score_chosen: Any, score_rejected: Any) -> dict[str, Any]:
    """A row of HuggingFaceH4/ultrafeedback_binarized's shape: full message lists, prompt, scores."""
    good = [USER, {"role": "assistant", "content": chosen}]
    return {
        "prompt": USER["content"],
        "prompt_id": "p1",
        "chosen": good,
        "rejected": [USER, {"role": "assistant", "content": rejected}],
        "messages": good,
        "score_chosen": score_chosen,
        "score_rejected": score_rejected,
    }


def _jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_equal_scores_are_a_tie_not_a_pair(tmp_path: Path) -> None:
    records = [
        _ultrafeedback("7", "9", 8.0, 3.5),
        _ultrafeedback("7", "4", 6.0, 6.0),
        {"prompt": "q", "chosen": "a", "rejected": "b", "chosen-rating": 4.5, "rejected-rating": 4.5},
        {"prompt": "q", "chosen": "a", "rejected": "b", "chosen_rating": 3, "rejected_rating": 3.0},
        {"prompt": "q", "chosen": "a", "rejected": "b", "chosen_score": 1, "rejected_score": 1},
    ]
    rows = list(iter_source(_jsonl(tmp_path / "uf.jsonl", records)))
    assert rows[0].pair is not None and rows[0].pair["chosen"] == [{"role": "assistant", "content": "7"}]
    assert [r.pair for r in rows[1:]] == [None] * 4
    assert "tie" in rows[1].error and "6.0" in rows[1].error
    assert all("tie" in r.error for r in rows[2:])


def test_scores_that_say_rejected_is_better_are_a_mislabelled_row(tmp_path: Path) -> None:
    hh = "\n\nHuman: hi\n\nAssistant: "
    swapped = _jsonl(tmp_path / "swapped.jsonl", [_ultrafeedback("7", "4", 2.0, 9.0)])
    transcripts = _jsonl(
        tmp_path / "hh.jsonl", [{"chosen": hh + "good", "rejected": hh + "bad", "score_chosen": 1, "score_rejected": 5}]
    )
    rows = [*iter_source(swapped), *iter_source(transcripts), *iter_source(transcripts, fmt="pairs")]
    assert [r.pair for r in rows] == [None] * 3
    assert all("rejected is better" in r.error for r in rows), [r.error for r in rows]
    assert "2.0" in rows[0].error and "9.0" in rows[0].error


def test_a_score_that_is_no_number_is_a_row_error(tmp_path: Path) -> None:
    records = [_ultrafeedback("7", "4", "high", 1.0), _ultrafeedback("7", "4", 5, True)]
    rows = list(iter_source(_jsonl(tmp_path / "odd.jsonl", records)))
    assert [r.pair for r in rows] == [None, None]
    assert "score_chosen is a str, not a number" in rows[0].error
    assert "score_rejected is a bool, not a number" in rows[1].error


def test_missing_null_and_nan_scores_leave_the_pair(tmp_path: Path) -> None:
    """A Parquet column is null where a row has no score, pandas' NaN likewise: no information, still a pair."""
    table = pa.table(
        {
            "prompt": ["q1", "q2", "q3"],
            "chosen": ["a", "b", "c"],
            "rejected": ["x", "y", "z"],
            "score_chosen": [None, float("nan"), 7],
            "score_rejected": [3.0, 2.0, None],
        }
    )
    path = tmp_path / "t.parquet"
    pq.write_table(table, path)
    rows = list(iter_source(path))
    assert [r.error for r in rows] == [None] * 3
    big = {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 10**400, "score_rejected": 10**400 + 1}
    (row,) = iter_source(_jsonl(tmp_path / "big.jsonl", [big]))
    assert row.pair is None and "rejected is better" in row.error  # no OverflowError out of a float()


def test_real_data_holds_only_the_pandalm_ties() -> None:
    data = Path(__file__).resolve().parents[3] / "shared" / "data"
    if not data.exists():
        pytest.skip("../shared/data is not present")
    errors = [r.error for r in iter_source(data) if r.error]
    assert len(errors) == 110
    assert sum("majority says tie" in e for e in errors) == 105
    assert sum("different prefixes" in e for e in errors) == 5


CONTENTS: list[Any] = [[{"type": "text", "text": "hi"}], {"text": "hi"}, 3, 1.5, ["hi"], [[1]], b"hi", float("nan")]


@pytest.mark.parametrize("content", CONTENTS, ids=[type(c).__name__ + str(i) for i, c in enumerate(CONTENTS)])
def test_a_message_content_of_another_type_is_a_row_error(content: Any) -> None:
    """Like a list `role` (a82cecd): a RowError naming the field, never a TypeError that fails the whole file."""
    records = [
        {"prompt": [USER], "chosen": [{"role": "assistant", "content": content}], "rejected": "b"},
        {"conversation": [{"role": "user", "content": content}], "chosen": "a", "rejected": "b"},
    ]
    for record in records:
        with pytest.raises(RowError, match=r"content is a \w+, not a string"):
            list(READERS["pairs"](record, "s"))


def test_a_list_of_parts_content_leaves_the_later_rows_of_the_file(tmp_path: Path) -> None:
    parts = {
        "prompt": "q",
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "a"}]}],
        "rejected": "b",
    }
    empty = {"prompt": "q", "chosen": [{"role": "assistant", "content": None}], "rejected": "b"}
    rows = list(
        iter_source(_jsonl(tmp_path / "c.jsonl", [parts, empty, {"prompt": "q", "chosen": "a", "rejected": "b"}]))
    )
    assert [r.pair is None for r in rows] == [True, False, False]
    assert rows[0].error == "chosen[0].content is a list, not a string"
    assert rows[1].pair["chosen"] == [{"role": "assistant", "content": ""}]  # None is empty text: ingest's "empty"


def test_no_reader_lets_a_type_error_escape() -> None:
    """Every field of a record of every format, replaced by a value of another type, is a RowError or a pair."""
    msgs = [USER, {"role": "assistant", "content": "a"}]
    records = {
        "pairs": {"conversation": [USER], "chosen": msgs[1:], "rejected": msgs, "score_chosen": 2, "score_rejected": 1},
        "hh-rlhf": {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"},
        "pandalm": {"instruction": "i", "input": "", "response1": "a", "response2": "b", "annotator1": 1,
                    "annotator2": 1, "annotator3": 2},
        "llmbar": {"input": "q", "output_1": "a", "output_2": "b", "label": 1},
        "rm-bench": {"id": 1, "prompt": "q", "chosen": ["a", "b", "c"], "rejected": ["d", "e", "f"]},
    }  # fmt: skip
    odd: list[Any] = [None, [], {}, [{"type": "text"}], 1, 2.5, float("nan"), True, [1], b"x", 10**400]
    for fmt, record in records.items():
        for key in record:
            values = odd if not isinstance(record[key], list) else odd + [[v] for v in odd]
            for value in values:
                with contextlib.suppress(RowError):
                    list(READERS[fmt]({**record, key: value}, "s"))
