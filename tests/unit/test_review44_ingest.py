"""Review 44, ingest at scale: a benchmark's rows that are no preference (ties, rows its scores call mislabelled)
still ask their prompts, so decontamination must check them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from synpref.services.ingest.preprocess import Decontaminator, Preprocessor, benchmark_prompts
from synpref.shared.sources import SourceRow

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
TIED = "Describe three ways a small coastal town could prepare its harbour and its fishing fleet for a winter storm"
MISLABELLED = "Explain how a lighthouse keeper in the nineteenth century kept the lamp burning through a long night"
VALID = "List the steps a beginner should follow to bake a loaf of sourdough bread at home without a mixer"


def asking(prompt: str) -> SourceRow:
    pair = {"conversation": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}], "source": "t", "meta": {}}  # fmt: skip
    return SourceRow("train.jsonl", 0, pair=pair)


def test_a_benchmarks_tied_and_mislabelled_rows_still_decontaminate(tmp_path: Path) -> None:
    # PandaLM's test set labels 105 of its 999 rows a tie; an UltraFeedback-style set has rows of equal scores. The
    # reader refuses them as preferences, and their prompts were left out of the check: a training pair asking one
    # of them was published.
    pandalm = tmp_path / "pandalm_test.json"
    rows = [
        {"idx": 1, "instruction": TIED, "input": "", "response1": "x", "response2": "y",
         "annotator1": 0, "annotator2": 0, "annotator3": 0},
        {"idx": 2, "instruction": VALID, "input": "", "response1": "x", "response2": "y",
         "annotator1": 1, "annotator2": 1, "annotator3": 2},
    ]  # fmt: skip
    pandalm.write_text(json.dumps(rows))
    scored = tmp_path / "scored.jsonl"
    lines = [{"prompt": MISLABELLED, "chosen": "x", "rejected": "y", "score_chosen": 2, "score_rejected": 7}]
    scored.write_text("".join(json.dumps(line) + "\n" for line in lines))

    assert set(benchmark_prompts(pandalm)) == {TIED, VALID}
    assert benchmark_prompts(scored) == [MISLABELLED]
    pre = Preprocessor(Decontaminator.from_sources([pandalm, scored]))
    assert list(pre.run([asking(TIED), asking(MISLABELLED), asking("a question of its own")]))
    assert (pre.counts.contaminated, pre.counts.published) == (2, 1)


def test_a_benchmark_of_prompts_without_responses_is_still_refused(tmp_path: Path) -> None:
    # Only a refused label is set aside: a row with no responses at all is no pair file's row.
    questions = tmp_path / "eval.jsonl"
    questions.write_text(json.dumps({"prompt": TIED}) + "\n")
    with pytest.raises(ValueError, match="no benchmark prompt"):
        benchmark_prompts(questions)


@pytest.mark.skipif(not (DATA / "PandaLM").is_dir(), reason="PandaLM's test set is not here")
def test_every_prompt_of_the_real_pandalm_test_set_is_a_benchmark_prompt() -> None:
    records = json.loads((DATA / "PandaLM" / "testset-v1.json").read_text())
    asked = {r["instruction"] + ("\n\n" + r["input"] if (r.get("input") or "").strip() else "") for r in records}
    assert set(benchmark_prompts(DATA / "PandaLM")) == asked  # 170, of which 12 only in tied rows


def test_a_long_run_logs_how_far_it_got_while_it_runs(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    # 40M pairs take hours (~5,600 rows/s read and checked on a 2-core machine, before any send): the run printed
    # nothing before its end, so a slow run and a stuck one looked the same.
    import logging

    import synpref.services.ingest.main as ingest

    monkeypatch.setattr(ingest, "PROGRESS_S", 0.0, raising=False)
    caplog.set_level(logging.INFO, logger=ingest.log.name)
    during: list[str] = []

    def rows():
        yield from (asking(f"question {i}") for i in range(3))
        yield asking("question 0")  # a duplicate: dropped
        during.extend(r.getMessage() for r in caplog.records if "rows read" in r.getMessage())

    assert ingest.publish(Preprocessor(), rows(), None, "t") == (0, "")
    assert during and during[-1].startswith("4 rows read: 3 to publish, 1 dropped"), during
