"""Review 43, ingest: a --report (or --seen) file inside an input folder was read back as input, so the run read
its own report for ever; a pair whose two sides answer different prompts was published as a preference; and an
--ngram below 1 marked every pair contaminated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from synpref.services.ingest.preprocess import Decontaminator, Preprocessor
from synpref.shared.sources import SourceRow, iter_source


def counts_of(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_a_report_and_seen_file_inside_an_input_folder_are_not_read_as_input(tmp_path: Path) -> None:
    # Every row is dropped, so every row writes a report line: read back as input, each of those lines is an
    # unreadable row that writes another line, and the run never ends (the disk fills). A child process with a
    # deadline, so the old code fails the test instead of hanging it.
    data = tmp_path / "input"
    data.mkdir()
    rows = [{"prompt": f"q{i}", "chosen": "x", "rejected": ""} for i in range(500)]
    (data / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report, seen = data / "z-report.jsonl", data / "seen.jsonl"
    seen.write_text("")
    argv = [str(data), "--dry-run", "--no-decontaminate", "--report", str(report), "--seen", str(seen)]
    code = "import sys; from synpref.services.ingest.main import main; sys.exit(main(sys.argv[1:]))"
    env = {k: v for k, v in os.environ.items() if k != "SYNPREF_CONFIG"}
    child = subprocess.Popen(
        [sys.executable, "-c", code, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    # 500 report lines are ~50 KB: stop the child once the report is far past that (or after 60 s), so the old code
    # fails the test instead of hanging it and filling the disk.
    for _ in range(300):
        try:
            child.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            if report.exists() and report.stat().st_size > 1 << 20:
                break
    grown = report.stat().st_size if report.exists() else 0
    if child.poll() is None:
        child.kill()
        child.communicate()
        pytest.fail(f"ingest still running, reading its own report ({grown} bytes by now)")
    out, err = (b.decode() for b in child.communicate())
    done = subprocess.CompletedProcess(child.args, child.returncode, out, err)
    assert done.returncode == 0, done.stderr[-2000:]
    counts = counts_of(done.stdout)
    assert (counts["read"], counts["empty"], counts["unreadable"]) == (500, 500, 0), counts
    assert len(report.read_text().splitlines()) == 500
    assert "z-report.jsonl" in done.stderr and "seen.jsonl" in done.stderr  # said, not skipped in silence


def side(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


def test_full_lists_that_differ_at_a_user_turn_are_no_pair(tmp_path: Path) -> None:
    # Skywork-style full lists with a shared system prompt but different questions: the shared prefix (the
    # system prompt) became the conversation, and the answers to two different questions a preference.
    system = ("system", "You are a helpful assistant.")
    records = [
        {"chosen": side(system, ("user", "What is 2+2?"), ("assistant", "4")),
         "rejected": side(system, ("user", "Name a colour."), ("assistant", "blue"))},
        # The same later in a conversation: a second user turn that differs.
        {"chosen": side(("user", "hi"), ("assistant", "hello"), ("user", "2+2?"), ("assistant", "4")),
         "rejected": side(("user", "hi"), ("assistant", "hello"), ("user", "3+3?"), ("assistant", "6"))},
        # Arena-style trajectories (the sides part at an answer, later user turns alike) stay pairs.
        {"chosen": side(("user", "hi"), ("assistant", "a"), ("user", "more"), ("assistant", "c")),
         "rejected": side(("user", "hi"), ("assistant", "b"), ("user", "more"), ("assistant", "d"))},
    ]  # fmt: skip
    path = tmp_path / "full.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    pre = Preprocessor()
    published = list(pre.run(iter_source(path)))
    assert [r.pair.chosen[0].content for r in published] == ["a"]
    assert (pre.counts.unreadable, pre.counts.published) == (2, 1) and pre.counts.reconciles()
    assert [r.locator.rsplit("#", 1)[1] for r in pre.rejections] == ["0", "1"]
    assert all("user turn" in r.reason for r in pre.rejections), pre.rejections


def test_a_response_that_repeats_the_prompt_is_no_pair() -> None:
    # A prompt column and full lists whose user turn differs from it (here by a trailing space): the prompt was not
    # stripped, and the pair went out with the question twice, once as if part of each answer.
    pair = {
        "conversation": side(("user", "What is 3+3?")),
        "chosen": side(("user", "What is 3+3? "), ("assistant", "6")),
        "rejected": side(("user", "What is 3+3? "), ("assistant", "7")),
        "source": "t",
        "meta": {},
    }
    pre = Preprocessor()
    assert pre.process(SourceRow("t.jsonl", 0, pair=pair)) is None
    assert pre.counts.unreadable == 1 and "chosen[0]" in pre.rejections[0].reason


def test_an_ngram_below_one_is_refused_not_every_pair_contaminated(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from synpref.services.ingest.main import main

    bench, src = tmp_path / "bench.txt", tmp_path / "pairs.jsonl"
    bench.write_text("Write a poem about the sea\n")
    src.write_text(json.dumps({"prompt": "hello there", "chosen": "x", "rejected": "y"}) + "\n")
    with pytest.raises(SystemExit) as exit_:
        main([str(src), "--dry-run", "--decontaminate", str(bench), "--ngram", "0"])
    assert exit_.value.code == 2 and "--ngram" in capsys.readouterr().err
    for n in (0, -1):
        with pytest.raises(ValueError, match="at least 1"):
            Decontaminator(["Write a poem about the sea"], n=n)
