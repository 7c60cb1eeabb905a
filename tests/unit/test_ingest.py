"""Ingest preprocessing: every row lands in exactly one bucket and the counts reconcile."""

from __future__ import annotations

import json
from pathlib import Path

from synpref.services.ingest.preprocess import Decontaminator, Preprocessor, benchmark_prompts, ingest_paths
from synpref.shared.pairs import pair_id
from synpref.shared.sources import SourceRow

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
BENCH = "Write a short poem about the sea and the moon in the style of an old English sailor song please now"


def row(i: int, prompt: str, chosen: str = "good", rejected: str = "bad") -> SourceRow:
    pair = {
        "conversation": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "source": "test",
        "meta": {"i": str(i)},
    }
    return SourceRow("t.jsonl", i, pair=pair)


def test_buckets_and_reconciliation():
    pre = Preprocessor(Decontaminator([BENCH]))
    rows = [
        row(0, "hello"),
        row(1, "hello"),  # duplicate of 0
        row(2, "hello", chosen="better"),  # same history, other chosen: not a duplicate
        row(3, "  ", chosen="x"),  # empty prompt
        row(4, "hi", rejected=""),  # empty rejected
        row(5, "Please: " + BENCH.upper() + "!"),  # 13-gram overlap, case and punctuation ignored
        SourceRow("t.jsonl", 6, error="invalid JSON line"),
    ]
    published = list(pre.run(rows))
    counts = pre.counts
    assert [r.pair.meta["i"] for r in published] == ["0", "2"]
    assert (counts.read, counts.published, counts.duplicate, counts.empty, counts.contaminated, counts.unreadable) == (
        7, 2, 1, 2, 1, 1,
    )  # fmt: skip
    assert counts.reconciles()
    assert {r.bucket for r in pre.rejections} == {"duplicate", "empty", "contaminated", "unreadable"}
    assert all(r.reason for r in pre.rejections)
    assert published[0].pair.id == pair_id(
        [{"role": "user", "content": "hello"}],
        [{"role": "assistant", "content": "good"}],
        [{"role": "assistant", "content": "bad"}],
    )
    assert list(published[0].lineage.steps) == ["ingest"]


def test_decontaminator_needs_thirteen_words_and_matches_short_prompts_whole():
    deco = Decontaminator([BENCH, "What is 2 + 2?"])
    twelve = " ".join(BENCH.split()[:12])
    assert deco.overlap(twelve) is None
    assert deco.overlap(" ".join(BENCH.split()[3:16])) is not None
    assert deco.overlap("so, what is 2 + 2? tell me") == ("what", "is", "2", "2")
    assert deco.overlap("what is 3 + 2") is None


def test_benchmark_prompts_from_text_and_pair_files(tmp_path):
    (tmp_path / "b.txt").write_text("first prompt\n\nsecond prompt\n")
    assert benchmark_prompts(tmp_path / "b.txt") == ["first prompt", "second prompt"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"prompt": "p1", "chosen": "a", "rejected": "b"}) + "\n")
    assert benchmark_prompts(tmp_path / "b.jsonl") == ["p1"]


def test_real_pandalm_and_hh_counts_reconcile():
    records, pre = ingest_paths(
        [DATA / "PandaLM", DATA / "hh-rlhf"], decontaminate=[DATA / "RM-Bench" / "chat_filtered.json"]
    )
    c = pre.counts
    assert c.reconciles()
    assert c.read == 999 + 2312
    assert c.unreadable == 105 + 5  # PandaLM ties, hh-rlhf unpairable transcripts
    assert c.empty >= 4  # hh-rlhf has 4 empty completions
    assert len(records) == c.published == len({r.pair.id for r in records})


def test_cli_dry_run_reports_and_reconciles(tmp_path, capsys):
    from synpref.services.ingest.main import main

    src = tmp_path / "pairs.jsonl"
    lines = [{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "a", "chosen": "x", "rejected": "y"},
             {"prompt": "b", "chosen": "", "rejected": "y"}, {"prompt": "c"}]  # fmt: skip
    src.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    report = tmp_path / "dropped.jsonl"
    assert main([str(src), "--dry-run", "--report", str(report)]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (counts["read"], counts["published"], counts["duplicate"], counts["empty"], counts["unreadable"]) == (
        4, 1, 1, 1, 1,
    )  # fmt: skip
    assert counts["reconciles"] and counts["topic"] is None
    dropped = [json.loads(line) for line in report.read_text().splitlines()]
    assert [d["bucket"] for d in dropped] == ["duplicate", "empty", "unreadable"]
    assert dropped[2]["locator"].endswith("pairs.jsonl#3") and "missing field" in dropped[2]["reason"]


def test_oversized_and_lone_surrogate_rows_are_counted_not_published():
    too_large = lambda record: "too big" if record.ByteSize() > 300 else None  # noqa: E731
    pre = Preprocessor(too_large=too_large)
    rows = [row(0, "small"), row(1, "big", chosen="x" * 1000), row(2, "caf\ud800"), row(3, "small again")]
    published = list(pre.run(rows))
    assert [r.pair.meta["i"] for r in published] == ["0", "3"]
    assert (pre.counts.oversized, pre.counts.unreadable, pre.counts.read) == (1, 1, 4) and pre.counts.reconciles()
    assert [(r.locator, r.bucket) for r in pre.rejections] == [("t.jsonl#1", "oversized"), ("t.jsonl#2", "unreadable")]
    # An oversized pair is not remembered as seen: a later, smaller run may still publish it.
    assert len(pre.seen) == 2
