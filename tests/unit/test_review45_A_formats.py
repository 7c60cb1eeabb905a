"""The one rule of what states a row's label (source_formats.without_label), and benchmark prompts read in one pass."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from synpref.services.ingest.preprocess import benchmark_prompts
from synpref.shared import source_files
from synpref.shared.sources import READERS, RowError, detect_format, without_label

TIE = {"prompt": "Which sea is saltier?", "chosen": "The Dead Sea.", "rejected": "The Red Sea.", "status": "tie"}
SCORED = {"prompt": "Name a prime.", "chosen": "Nine.", "rejected": "Seven.", "score_chosen": 2, "score_rejected": 8}
PANDALM = {
    "idx": 7,
    "instruction": "Sum the numbers.",
    "input": "1, 2, 3",
    "response1": "6",
    "response2": "5",
    "annotator1": 0,
    "annotator2": 0,
    "annotator3": 2,
}


def read(record: dict[str, Any]) -> dict[str, Any]:
    """The one pair a reader of the record's own format makes of it (RowError when none)."""
    produced = list(READERS[detect_format(Path(), record)](record, "t"))
    assert len(produced) == 1
    return produced[0][1]


@pytest.mark.parametrize(
    ("record", "prompt", "chosen"),
    [
        (TIE, "Which sea is saltier?", "The Dead Sea."),
        (SCORED, "Name a prime.", "Nine."),
        (PANDALM, "Sum the numbers.\n\n1, 2, 3", "6"),
    ],
)
def test_a_row_refused_for_its_label_alone_reads_as_a_pair_without_it(record, prompt, chosen) -> None:
    with pytest.raises(RowError):
        read(record)
    before = json.dumps(record, sort_keys=True)
    pair = read(without_label(record))
    assert pair["conversation"] == [{"role": "user", "content": prompt}]
    assert pair["chosen"] == [{"role": "assistant", "content": chosen}]
    assert json.dumps(record, sort_keys=True) == before, "the caller's record is left as it was"


def test_without_label_keeps_what_is_no_label() -> None:
    # PandaLM still reads as PandaLM (its votes stay, unanimous), and nothing else of the row goes.
    got = without_label({**PANDALM, "status": "tie", "chosen_rating": 3, "rejected_rating": 3})
    assert got == {**PANDALM, "annotator1": 1, "annotator2": 1, "annotator3": 1}
    assert detect_format(Path(), got) == "pandalm"


def test_benchmark_prompts_read_each_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The refused rows' records were read by a second pass over the file beside the readers' own.
    lines = [SCORED, {"prompt": "Is ice cold?", "chosen": "Yes.", "rejected": "No."}, TIE, {"prompt": "no answers"}]
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    opened: list[Path] = []
    records = source_files._records

    def counted(file: Path):
        opened.append(file)
        return records(file)

    monkeypatch.setattr(source_files, "_records", counted)
    assert benchmark_prompts(path) == ["Name a prime.", "Is ice cold?", "Which sea is saltier?"]
    assert opened == [path]
