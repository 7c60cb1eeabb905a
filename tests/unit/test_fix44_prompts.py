"""Fix 44, the prompt columns of the `pairs` reader: the common DPO sets name their prompt `question`
(Intel/orca_dpo_pairs), `input` (argilla/distilabel-intel-orca-dpo-pairs) or `instruction` (+ `input`, alpaca),
with a `system` column; they were read with an empty conversation, and training learned their responses without
the prompt. A row of bare string responses without any prompt column is now a row error, not such a pair."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from synpref.shared.sources import detect_format, iter_source
from synpref.training.data import load_pairs


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


ORCA = {  # Intel/orca_dpo_pairs
    "system": "You are an AI assistant. Answer step by step.",
    "question": "What is 2 + 3?",
    "chosen": "2 + 3 = 5.",
    "rejected": "It is 6.",
}
DISTILABEL = {  # argilla/distilabel-intel-orca-dpo-pairs, its other columns too
    "system": "",
    "input": "Name a prime number above 10.",
    "chosen": "11",
    "rejected": "12",
    "generations": ["11", "12"],
    "order": ["chosen", "rejected"],
    "labelling_model": "gpt-4-1106-preview",
    "labelling_prompt": [{"role": "system", "content": "rate"}],
    "raw_labelling_response": "9 2",
    "rating": [9.0, 2.0],
    "rationale": "12 is not prime.",
    "status": "unchanged",
    "original_chosen": "11",
    "original_rejected": "12",
    "chosen_score": 9.0,
    "in_gsm8k_train": False,
}
# The columns the reader looks in, in this order; its "no prompt" error names them all.
PROMPT_KEYS = ("conversation", "prompt", "history", "messages", "question", "instruction", "input")
ALPACA = {"instruction": "Translate to French.", "input": "Good morning", "chosen": "Bonjour", "rejected": "Hola"}


def test_the_dpo_sets_prompt_columns_become_the_conversation(tmp_path: Path) -> None:
    # Before: all three read with conversation [] (no conversation/prompt/history/messages column).
    no_input = {"instruction": "Say hi.", "input": "", "chosen": "Hi!", "rejected": "No."}
    path = jsonl(tmp_path / "dpo.jsonl", [ORCA, DISTILABEL, ALPACA, no_input])
    assert detect_format(path, ORCA) == detect_format(path, DISTILABEL) == detect_format(path, ALPACA) == "pairs"
    rows = list(iter_source(path))
    assert [r.error for r in rows] == [None] * 4
    conversations = [r.pair["conversation"] for r in rows if r.pair is not None]
    assert conversations == [
        [system(ORCA["system"]), user("What is 2 + 3?")],
        [user("Name a prime number above 10.")],  # an empty system string is no system turn
        [user("Translate to French.\n\nGood morning")],  # the alpaca way: instruction, blank line, input
        [user("Say hi.")],
    ]
    assert [r.pair["chosen"] for r in rows if r.pair is not None][:3] == [[assistant("2 + 3 = 5.")], [assistant("11")],
                                                                          [assistant("Bonjour")]]  # fmt: skip


def test_training_reads_the_prompt_of_an_orca_file(tmp_path: Path) -> None:
    # The user-visible effect: the trainer's pairs held no prompt at all.
    got = load_pairs([jsonl(tmp_path / "orca.jsonl", [ORCA, {**ORCA, "system": "", "question": "Why?"}])])
    assert got.problems == []
    assert [p["conversation"] for p in got.pairs] == [[system(ORCA["system"]), user("What is 2 + 3?")], [user("Why?")]]


def test_the_older_prompt_columns_keep_their_priority(tmp_path: Path) -> None:
    records = [
        {"prompt": "from prompt", "question": "q", "instruction": "i", "input": "x", "chosen": "a", "rejected": "b"},
        {"question": "from question", "instruction": "i", "chosen": "a", "rejected": "b"},
        {"instruction": "from instruction", "input": "ctx", "chosen": "a", "rejected": "b"},
        {"conversation": [user("listed")], "system": "not added to a message list", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "system": "be brief", "chosen": "a", "rejected": "b"},  # a system column beside `prompt`
    ]
    rows = list(iter_source(jsonl(tmp_path / "p.jsonl", records)))
    assert [r.pair["conversation"] if r.pair else r.error for r in rows] == [
        [user("from prompt")],
        [user("from question")],
        [user("from instruction\n\nctx")],
        [user("listed")],
        [system("be brief"), user("p")],
    ]


def test_null_columns_of_a_parquet_file_do_not_hide_the_question(tmp_path: Path) -> None:
    # In Parquet every row has every column: a null `prompt` or `instruction` must leave the row's `question`.
    table = pa.table(
        {
            "prompt": [None, "a prompt"],
            "instruction": [None, None],
            "question": ["a question", None],
            "system": [None, "sys"],
            "chosen": ["good", "good"],
            "rejected": ["bad", "bad"],
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    rows = list(iter_source(tmp_path / "t.parquet"))
    assert [r.pair["conversation"] if r.pair else r.error for r in rows] == [
        [user("a question")],
        [system("sys"), user("a prompt")],
    ]


def test_string_responses_without_a_prompt_column_are_a_row_error(tmp_path: Path) -> None:
    # Before: a pair with conversation [] that training accepted (only ingest refused "no conversation").
    records = [
        {"chosen": "good", "rejected": "bad"},
        {"chosen": "good", "rejected": [user("q"), assistant("bad")], "system": "a system alone is no prompt"},
        {"prompt": None, "question": None, "chosen": "good", "rejected": "bad"},
    ]
    rows = list(iter_source(jsonl(tmp_path / "bare.jsonl", records), fmt="pairs"))
    assert [r.pair for r in rows] == [None] * 3
    for row in rows:
        assert row.error is not None and row.error.startswith("no prompt:"), row.error
        assert all(key in row.error for key in PROMPT_KEYS), row.error
    got = load_pairs([tmp_path / "bare.jsonl"])
    assert got.pairs == [] and len(got.problems) == 3 and "no prompt" in got.problems[0]


def test_message_lists_without_a_prompt_column_still_share_their_prefix(tmp_path: Path) -> None:
    skywork = {
        "chosen": [system("s"), user("q"), assistant("good")],
        "rejected": [system("s"), user("q"), assistant("bad")],
    }
    (row,) = iter_source(jsonl(tmp_path / "sky.jsonl", [skywork]))
    assert row.pair is not None
    assert row.pair["conversation"] == [system("s"), user("q")] and row.pair["chosen"] == [assistant("good")]


def test_lists_that_repeat_the_user_turn_of_a_prompt_with_a_system_column_lose_it(tmp_path: Path) -> None:
    record = {
        "system": "sys",
        "question": "q",
        "chosen": [user("q"), assistant("good")],
        "rejected": [user("q"), assistant("bad")],
    }
    with_system = {
        **record,
        "chosen": [system("sys"), *record["chosen"]],
        "rejected": [system("sys"), *record["rejected"]],
    }
    rows = list(iter_source(jsonl(tmp_path / "rep.jsonl", [record, with_system])))
    for row in rows:
        assert row.pair is not None
        assert row.pair["conversation"] == [system("sys"), user("q")]
        assert (row.pair["chosen"], row.pair["rejected"]) == ([assistant("good")], [assistant("bad")])


def test_a_question_row_whose_answer_quotes_a_transcript_is_not_read_as_hh_rlhf(tmp_path: Path) -> None:
    # Before: no prompt key it knew, and "\n\nAssistant:" in chosen: the file was detected as hh-rlhf.
    row = {"question": "Write a dialogue.", "chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "no"}
    path = jsonl(tmp_path / "q.jsonl", [row])
    assert detect_format(path, row) == "pairs"
    (got,) = iter_source(path)
    assert got.pair is not None and got.pair["conversation"] == [user("Write a dialogue.")]
