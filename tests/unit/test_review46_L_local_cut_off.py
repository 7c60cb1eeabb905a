"""Review 46, area L: a local judge's answers cut off at max_new_tokens are counted as OpenAIChat's finish_reason
"length" ones are (stats.answers, stats.cut_off, JUDGE_CUT_OFF), so the annotator's cut-off warning covers it."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import REGISTRY

from synpref.services.annotator.annotate import Annotator
from synpref.services.annotator.judges import LLMJudge
from synpref.services.annotator.local_chat import LocalChat
from synpref.shared.pairs import new_pair, new_record
from tests.unit.test_review43_localchat import ANSWER, ScriptedLM, ScriptedTokenizer


def cut_off_total(model: str) -> float:
    return REGISTRY.get_sample_value("synpref_judge_cut_off_answers_total", {"model": model}) or 0.0


def record(i: int):
    return new_record(
        new_pair(
            [{"role": "user", "content": f"Question {i}?"}],
            [{"role": "assistant", "content": f"Good answer {i}."}],
            [{"role": "assistant", "content": f"Bad answer {i}."}],
            "t",
        )
    )


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_local_answers_cut_off_at_max_new_tokens_are_counted(temperature):
    # Before: LocalChat kept no stats and no metric, so a local judge abstaining on every pair went unreported.
    name = f"local-short-{temperature}"
    short = LocalChat(ScriptedLM(), ScriptedTokenizer(), name=name, max_new_tokens=2)
    assert asyncio.run(short.chat([], n=3, temperature=temperature)) == [None] * 3
    assert (short.stats.answers, short.stats.cut_off) == (3, 3)
    assert cut_off_total(name) == 3


def test_local_answers_that_end_within_max_new_tokens_are_not_cut_off():
    name = "local-room"
    room = LocalChat(ScriptedLM(), ScriptedTokenizer(), name=name, max_new_tokens=len(ANSWER) + 5)
    assert asyncio.run(room.chat([], n=2, temperature=1.0)) == [ANSWER, ANSWER]
    assert (room.stats.answers, room.stats.cut_off) == (2, 0)
    assert cut_off_total(name) == 0


def test_a_local_judge_whose_answers_are_cut_off_is_warned_about(caplog):
    short = LocalChat(ScriptedLM(), ScriptedTokenizer(), name="local-cut", max_new_tokens=1)
    annotator = Annotator([LLMJudge(short, samples=2)])
    with caplog.at_level(logging.WARNING, logger="synpref.services.annotator.annotate"):
        asyncio.run(annotator.annotate([record(i) for i in range(3)]))
    warnings = [r.getMessage() for r in caplog.records if "cut off at max_tokens" in r.getMessage()]
    assert len(warnings) == 1 and "local-cut: 6 of 6 answers in this batch" in warnings[0]
    assert "(1;" in warnings[0] and "max_new_tokens for a LocalChat" in warnings[0]


def test_a_real_tiny_chat_lm_cut_off_at_one_token_is_counted(tmp_path):
    pytest.importorskip("transformers")
    from testing.judge_server import build_tiny_chat_lm

    path = build_tiny_chat_lm(tmp_path / "lm", hidden=32, layers=1)
    backend = LocalChat.from_pretrained(str(path), name="tiny-cut", max_new_tokens=1)
    texts = asyncio.run(backend.chat([{"role": "user", "content": "hi"}], n=4, temperature=1.0))
    # A random LM's first token is not its end token: every sample is cut off, and counted.
    assert texts == [None] * 4
    assert (backend.stats.answers, backend.stats.cut_off) == (4, 4)
    assert cut_off_total("tiny-cut") == 4
