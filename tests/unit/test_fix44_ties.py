"""Rows whose own fields say the two responses tie are no pair (fix 44, ties).

argilla/distilabel-intel-orca-dpo-pairs marks the rows its judge rated alike with `status: "tie"` (its card's
recommended filter drops them); a "swapped" row already has chosen and rejected re-ordered by the new rating (the
old order is kept in original_chosen/original_rejected), so it is a pair as it stands. HelpSteer3's preference rows
(overall_preference 0 = tie) and Chatbot Arena conversations (winner "tie" / "tie (bothbad)") have no
chosen/rejected columns: the readers do not read them, so none of their rows, tied or not, becomes a pair.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synpref.shared.sources import iter_source
from synpref.training.data import load_pairs


def _orca_row(status: str, chosen: str, rejected: str, rating: list[float] | None) -> dict:
    """One row in the shape of argilla/distilabel-intel-orca-dpo-pairs (the columns its dataset card lists)."""
    return {
        "system": "You are a helpful assistant.",
        "input": "What is 2 + 2?",
        "chosen": chosen,
        "rejected": rejected,
        "generations": [chosen, rejected],
        "order": ["chosen", "rejected"],
        "labelling_model": "gpt-4-1106-preview",
        "labelling_prompt": [{"role": "user", "content": "rate these"}],
        "raw_labelling_response": "...",
        "rating": rating,
        "rationale": "...",
        "status": status,
        "original_chosen": rejected if status == "swapped" else chosen,
        "original_rejected": chosen if status == "swapped" else rejected,
        "chosen_score": max(rating) if rating else None,
        "in_gsm8k_train": False,
    }


ORCA_ROWS = [
    _orca_row("unchanged", "4.", "5.", [9.0, 3.0]),
    _orca_row("tie", "Four.", "It is 4.", [8.0, 8.0]),
    _orca_row("swapped", "2 + 2 = 4.", "22.", [2.0, 9.0]),
    _orca_row("tie", "4", "four", None),  # the judge gave no rating: the dataset marks these a tie too
]


def _write(tmp_path: Path, kind: str, rows: list[dict]) -> Path:
    if kind == "parquet":  # the dataset's own file is Parquet
        path = tmp_path / "train-00000-of-00001.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path = tmp_path / "orca.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_an_orca_dpo_row_with_status_tie_is_a_counted_non_pair(tmp_path: Path, kind: str) -> None:
    rows = list(iter_source(_write(tmp_path, kind, ORCA_ROWS)))
    assert [r.row for r in rows] == [0, 1, 2, 3]
    # Before: both tied rows came back as pairs ("Four." preferred to "It is 4."), trained on a label the source
    # says does not exist.
    assert rows[1].pair is None and rows[3].pair is None, [r.pair for r in rows]
    assert "tie" in (rows[1].error or "") and "tie" in (rows[3].error or "")
    # "unchanged" and "swapped" rows are pairs as their chosen/rejected columns stand.
    assert [r.pair and r.pair["chosen"][-1]["content"] for r in (rows[0], rows[2])] == ["4.", "2 + 2 = 4."]
    assert [r.pair and r.pair["rejected"][-1]["content"] for r in (rows[0], rows[2])] == ["5.", "22."]


def test_training_reports_a_tied_orca_row_as_a_problem(tmp_path: Path) -> None:
    loaded = load_pairs([_write(tmp_path, "jsonl", ORCA_ROWS)])
    assert sorted(p["chosen"][-1]["content"] for p in loaded.pairs) == ["2 + 2 = 4.", "4."]
    assert [p.split(": ", 1)[0].rsplit("#", 1)[1] for p in loaded.problems] == ["1", "3"]


def test_a_status_tie_on_a_prompted_pair_or_an_hh_transcript_is_a_non_pair(tmp_path: Path) -> None:
    converted = {"prompt": "q", "chosen": "a", "rejected": "b", "status": "tie"}
    hh = {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b", "status": "tie"}
    for name, row in (("converted.jsonl", converted), ("hh.jsonl", hh)):
        path = tmp_path / name
        path.write_text(json.dumps(row) + "\n")
        (only,) = iter_source(path)
        assert only.pair is None and "tie" in (only.error or ""), name


def test_helpsteer3_and_arena_rows_are_not_read_so_no_tie_becomes_a_pair(tmp_path: Path) -> None:
    context = [{"role": "user", "content": "q"}]
    helpsteer3 = [
        {"domain": "general", "language": "english", "context": context, "response1": "a", "response2": "b",
         "overall_preference": score, "individual_preference": []}
        for score in (-2, 0, 3)
    ]  # fmt: skip
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    arena = [
        {"question_id": str(i), "model_a": "x", "model_b": "y", "winner": winner, "judge": "arena_user_1",
         "conversation_a": turns, "conversation_b": turns, "turn": 1, "anony": True, "language": "English"}
        for i, winner in enumerate(("model_a", "tie", "tie (bothbad)", "model_b"))
    ]  # fmt: skip
    for name, records in (("helpsteer3.jsonl", helpsteer3), ("arena.jsonl", arena)):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        rows = list(iter_source(path))
        assert len(rows) == len(records) and all(r.pair is None for r in rows), name
        assert all("missing field 'chosen'" in (r.error or "") for r in rows), name
