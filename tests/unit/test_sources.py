"""Readers of preference files: every format, the common shapes, and bad rows reported."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synpref.shared.sources import SourceError, detect_format, iter_pairs, iter_source

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


def write_jsonl_gz(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def test_hh_rlhf_transcripts_split_at_last_assistant_turn(tmp_path):
    prefix = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell me a joke"
    good = json.dumps({"chosen": prefix + "\n\nAssistant: A pun.", "rejected": prefix + "\n\nAssistant: No."})
    bad = json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"})
    path = write_jsonl_gz(tmp_path / "hh.jsonl.gz", [good, bad, "{not json"])
    rows = list(iter_source(path))
    assert [r.row for r in rows] == [0, 1, 2]
    pair = rows[0].pair
    assert pair["conversation"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "tell me a joke"},
    ]
    assert pair["chosen"] == [{"role": "assistant", "content": "A pun."}]
    assert pair["rejected"] == [{"role": "assistant", "content": "No."}]
    assert rows[1].pair is None and "different prefixes" in rows[1].error
    assert rows[2].pair is None and "invalid JSON" in rows[2].error
    assert rows[2].locator.endswith("hh.jsonl.gz#2")


def test_pandalm_majority_ties_and_booleans(tmp_path):
    base = {"instruction": "Is it true?", "input": "", "cmp_key": "a_b"}
    records = [
        {**base, "idx": 0, "response1": "yes", "response2": "no", "annotator1": 2, "annotator2": 2, "annotator3": 1},
        {**base, "idx": 1, "response1": True, "response2": "no", "annotator1": 1, "annotator2": 1, "annotator3": 0},
        {**base, "idx": 2, "response1": "a", "response2": "b", "annotator1": 0, "annotator2": 0, "annotator3": 1},
        {**base, "idx": 3, "input": "ctx", "response1": "a", "response2": "b", "annotator1": 1, "annotator2": 2,
         "annotator3": 0},
    ]  # fmt: skip
    rows = list(iter_source(write_json(tmp_path / "panda.json", records)))
    assert rows[0].pair["chosen"][0]["content"] == "no" and rows[0].pair["rejected"][0]["content"] == "yes"
    assert rows[1].pair["chosen"][0]["content"] == "True"
    assert "tie" in rows[2].error
    assert "no majority" in rows[3].error
    assert rows[0].pair["meta"] == {"idx": "0", "cmp_key": "a_b", "votes": "2,2,1"}


def test_pandalm_prompt_joins_instruction_and_input(tmp_path):
    record = {"idx": 0, "instruction": "Fix:", "input": "teh", "response1": "the", "response2": "teh",
              "annotator1": 1, "annotator2": 1, "annotator3": 1}  # fmt: skip
    (row,) = iter_source(write_json(tmp_path / "p.json", [record]))
    assert row.pair["conversation"] == [{"role": "user", "content": "Fix:\n\nteh"}]


def test_llmbar_label_names_the_better_output(tmp_path):
    folder = tmp_path / "LLMBar" / "Dataset" / "LLMBar" / "Adversarial" / "Manual"
    folder.mkdir(parents=True)
    write_json(folder / "dataset.json", [{"input": "q", "output_1": "o1", "output_2": "o2", "label": 2},
                                         {"input": "q", "output_1": "o1", "output_2": "o2", "label": 0}])  # fmt: skip
    rows = list(iter_source(tmp_path))
    assert rows[0].pair["chosen"][0]["content"] == "o2"
    assert rows[0].pair["source"] == "LLMBar/Adversarial/Manual"
    assert "neither 1 nor 2" in rows[1].error


def test_rm_bench_yields_nine_pairs_with_slices(tmp_path):
    record = {"id": 7, "subset": "chat", "prompt": "p", "chosen": ["c0", "c1", "c2"], "rejected": ["r0", "r1", "r2"]}
    rows = list(iter_source(write_json(tmp_path / "chat_filtered.json", [record]), fmt="rm-bench"))
    assert len(rows) == 9
    assert Counter(r.pair["meta"]["slice"] for r in rows) == {"hard": 3, "normal": 3, "easy": 3}
    c0r2 = next(r for r in rows if r.sub == "c0-r2")
    assert c0r2.pair["chosen"][0]["content"] == "c0" and c0r2.pair["rejected"][0]["content"] == "r2"
    assert c0r2.pair["meta"]["slice"] == "hard"
    assert c0r2.pair["source"] == "RM-Bench/chat"


def test_common_shapes_strings_and_skywork_message_lists(tmp_path):
    user = {"role": "user", "content": "q"}
    records = [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"chosen": [user, {"role": "assistant", "content": "good"}],
         "rejected": [user, {"role": "assistant", "content": "bad"}]},
        {"prompt": [user], "chosen": [user, {"role": "assistant", "content": "good"}],
         "rejected": [user, {"role": "assistant", "content": "bad"}]},
        {"prompt": "q", "chosen": "good"},
        {"prompt": "q", "chosen": [{"role": "robot", "content": "x"}], "rejected": "bad"},
        {"prompt": "q", "chosen": 3, "rejected": "bad"},
    ]  # fmt: skip
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    rows = list(iter_source(path))
    for row in rows[:3]:
        assert row.pair["conversation"] == [user]
        assert row.pair["chosen"] == [{"role": "assistant", "content": "good"}]
        assert row.pair["rejected"] == [{"role": "assistant", "content": "bad"}]
        assert row.pair["source"] == "mixed"
    assert "missing field 'rejected'" in rows[3].error
    assert "unknown role" in rows[4].error
    assert "not a string" in rows[5].error


def test_parquet_and_format_override(tmp_path):
    table = pa.table({"prompt": ["q1", "q2"], "chosen": ["a", "b"], "rejected": ["c", "d"], "source": ["s", ""]})
    path = tmp_path / "t.parquet"
    pq.write_table(table, path)
    pairs = list(iter_pairs(path))
    assert [p["chosen"][0]["content"] for p in pairs] == ["a", "b"]
    assert [p["source"] for p in pairs] == ["s", "t"]
    assert [p["source"] for p in iter_pairs(path, source="override")] == ["s", "override"]
    with pytest.raises(SourceError):
        list(iter_source(path, fmt="nope"))


def test_detect_format_by_keys():
    p = Path("x.json")
    assert detect_format(p, {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "x"}) == "hh-rlhf"
    assert detect_format(p, {"instruction": "", "response1": "", "response2": "", "annotator1": 1}) == "pandalm"
    assert detect_format(p, {"input": "", "output_1": "", "output_2": "", "label": 1}) == "llmbar"
    assert detect_format(p, {"prompt": "", "chosen": ["a"], "rejected": ["b"]}) == "rm-bench"
    assert detect_format(p, {"prompt": "", "chosen": "a", "rejected": "b"}) == "pairs"


def test_unreadable_file_is_an_error(tmp_path):
    with pytest.raises(SourceError):
        list(iter_source(tmp_path / "missing.json"))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(SourceError):
        list(iter_source(tmp_path / "broken.json"))


@pytest.mark.skipif(not DATA.exists(), reason="../shared/data is not present")
def test_real_data_counts_match_the_inventory():
    def count(sub: str) -> Counter:
        return Counter("pair" if r.pair else "error" for r in iter_source(DATA / sub))

    assert count("hh-rlhf") == {"pair": 2307, "error": 5}
    assert count("PandaLM") == {"pair": 894, "error": 105}
    assert count("LLMBar") == {"pair": 885}
    assert count("RM-Bench/chat_filtered.json") == {"pair": 129 * 9}
