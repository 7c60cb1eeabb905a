"""Review 39, area F: ingest decontamination must not be defeated by text that reads the same, by a benchmark
prompt in a later user turn, or by a benchmark file that gives no prompt."""

from __future__ import annotations

import json
import re

import pytest

from synpref.services.ingest.preprocess import Decontaminator, Preprocessor, benchmark_prompts, words
from synpref.shared.sources import SourceRow, iter_source
from testing.group_consumer import RecordingProducer

BENCH = "Write a short poem about the sea and the moon in the style of an old English sailor song please now"


def pair_row(conversation: list[dict], chosen: list[dict], rejected: list[dict]) -> SourceRow:
    pair = {"conversation": conversation, "chosen": chosen, "rejected": rejected, "source": "t", "meta": {}}
    return SourceRow("t.jsonl", 0, pair=pair)


def fullwidth(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


@pytest.mark.parametrize(
    "variant",
    [
        # A soft hyphen (HTML &shy;) inside every long word: invisible, the same text to any reader or tokenizer.
        re.sub(r"(\w\w)(\w\w)", "\\1\u00ad\\2", BENCH),
        BENCH.replace("e", "e\u200b"),  # zero-width spaces
        fullwidth(BENCH),  # full-width forms (CJK input methods)
    ],
    ids=["soft-hyphen", "zero-width-space", "fullwidth"],
)
def test_a_benchmark_prompt_that_reads_the_same_is_still_found(variant):
    assert Decontaminator([BENCH]).overlap("Please help. " + variant) is not None


def test_ligatures_from_pdf_text_match_the_plain_letters():
    prompt = "Find the five largest fluffy flowers in the field and fill a file with their official names"
    deco = Decontaminator([prompt])
    assert deco.overlap(prompt.replace("fi", "\ufb01").replace("fl", "\ufb02")) is not None
    assert words("\ufb01eld o\ufb03ce") == ["field", "office"]


def test_a_benchmark_prompt_in_a_later_user_turn_of_full_trajectories_is_contaminated():
    # Arena-style pairs: two whole multi-turn conversations with the same user turns; the reader's shared prefix
    # ends at the first assistant turn, so the later user turns sit inside chosen and rejected.
    first = [{"role": "user", "content": "Hi there, can you help me with some writing today?"}]
    chosen = [{"role": "assistant", "content": "Sure."}, {"role": "user", "content": BENCH},
              {"role": "assistant", "content": "The sea is wide..."}]  # fmt: skip
    rejected = [{"role": "assistant", "content": "Maybe."}, {"role": "user", "content": BENCH},
                {"role": "assistant", "content": "No."}]  # fmt: skip
    pre = Preprocessor(Decontaminator([BENCH]))
    assert list(pre.run([pair_row(first, chosen, rejected)])) == []
    assert pre.counts.contaminated == 1 and pre.counts.reconciles()


def test_the_reader_puts_later_user_turns_of_full_lists_into_the_responses(tmp_path):
    # The shape the test above stands for, read by the real reader from a Skywork-style file.
    user2 = {"role": "user", "content": BENCH}
    chosen = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}, user2,
              {"role": "assistant", "content": "c"}]  # fmt: skip
    rejected = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "b"}, user2,
                {"role": "assistant", "content": "d"}]  # fmt: skip
    src = tmp_path / "arena.jsonl"
    src.write_text(json.dumps({"chosen": chosen, "rejected": rejected}) + "\n")
    pre = Preprocessor(Decontaminator([BENCH]))
    assert list(pre.run(iter_source(src))) == []
    assert pre.counts.contaminated == 1


def test_user_turns_of_the_responses_do_not_make_clean_pairs_contaminated():
    first = [{"role": "user", "content": "Tell me about boats"}]
    chosen = [{"role": "assistant", "content": "Boats float."}, {"role": "user", "content": "And ships?"},
              {"role": "assistant", "content": "Ships too."}]  # fmt: skip
    rejected = [{"role": "assistant", "content": "No."}, {"role": "user", "content": "And ships?"},
                {"role": "assistant", "content": "No."}]  # fmt: skip
    pre = Preprocessor(Decontaminator([BENCH]))
    assert len(list(pre.run([pair_row(first, chosen, rejected)]))) == 1


def test_a_benchmark_file_that_gives_no_prompt_is_refused_not_a_silent_no_op(tmp_path):
    # Prompt-only JSON lines (an eval set's questions, no chosen/rejected): every row is "no pair", so the set
    # held no prompt and every contaminated pair went through.
    questions = tmp_path / "eval.jsonl"
    questions.write_text(json.dumps({"prompt": BENCH}) + "\n")
    with pytest.raises(ValueError, match="no benchmark prompt"):
        benchmark_prompts(questions)
    with pytest.raises(ValueError, match=r"eval\.jsonl"):
        Decontaminator.from_sources([questions])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no benchmark prompt"):
        Decontaminator.from_sources([empty])


def test_the_cli_refuses_a_decontamination_file_without_prompts(tmp_path, capsys):
    from synpref.services.ingest.main import main

    questions = tmp_path / "eval.jsonl"
    questions.write_text(json.dumps({"question": BENCH}) + "\n")
    src = tmp_path / "pairs.jsonl"
    src.write_text(json.dumps({"prompt": BENCH, "chosen": "x", "rejected": "y"}) + "\n")
    assert main([str(src), "--dry-run", "--decontaminate", str(questions)]) == 2
    assert "no benchmark prompt" in capsys.readouterr().err


def test_a_send_that_raises_counts_its_record_as_unacknowledged():
    # kafka-python's send raises KafkaTimeoutError after max_block_ms when its buffer stays full (a broker
    # gone): that record was counted published but is in no future, so it must count as unacknowledged.
    from kafka.errors import KafkaTimeoutError

    from synpref.services.ingest.main import publish

    class Producer(RecordingProducer):
        def send(self, topic, value=None, key=None, headers=None, partition=None, timestamp_ms=None):
            if len(self.sent) == 2:  # the third send
                raise KafkaTimeoutError("Failed to allocate memory within the configured max blocking time")
            return super().send(topic, value, key, headers, partition, timestamp_ms)

    rows = [pair_row([{"role": "user", "content": f"q{i}"}], [{"role": "assistant", "content": "a"}],
                     [{"role": "assistant", "content": "b"}]) for i in range(5)]  # fmt: skip
    pre, handed = Preprocessor(), []
    unacked, stopped = publish(pre, rows, Producer(), "t", handed.extend)
    assert "KafkaTimeoutError" in stopped
    assert (pre.counts.published, len(handed), unacked) == (3, 2, 1)
