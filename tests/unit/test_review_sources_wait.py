"""Review: the controller waits for sources still being copied onto the volume (`kubectl cp`) to settle."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from synpref.services.controller.intake import wait_for_sources
from testing import controller_fakes as fakes
from tests.unit.test_review_intake import controller_for, settings_for


class Clock:
    """A fake monotonic clock whose sleep advances it and runs `during` (the copy going on meanwhile)."""

    def __init__(self, during: Callable[[int], None] = lambda _nap: None) -> None:
        self.now = 1000.0
        self.naps: list[float] = []
        self.during = during

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.naps.append(seconds)
        self.now += seconds
        self.during(len(self.naps))


def test_a_source_still_growing_is_waited_out_until_unchanged_for_settle_s(tmp_path):
    # A source that existed but was still being copied was read at once: ingest refused it (changed while read),
    # the pod exited and restarted, over and over for as long as the copy ran.
    source = tmp_path / "pairs.jsonl"
    source.write_text("{}\n")
    grown_at: list[float] = []

    def copy(nap: int) -> None:
        if nap <= 6:  # the copy goes on for six naps
            with source.open("a") as fh:
                fh.write("{}\n" * nap)
            grown_at.append(clock.now)

    clock = Clock(copy)
    said: list[str] = []
    wait_for_sources([str(source)], 3600, said.append, clock.sleep, settle_s=10, clock=clock)
    assert grown_at and clock.now >= grown_at[-1] + 10  # returned only after 10 s without a change
    assert clock.now < grown_at[-1] + 20
    assert any("changing" in s for s in said)


def test_an_empty_source_folder_is_waited_for_like_a_missing_one(tmp_path):
    # `kubectl exec mkdir -p /data/input` comes before the copy (docs/deploy.md): the empty folder counted as
    # there, ingest found no pair and the controller exited with "no pair to curate".
    folder = tmp_path / "input"
    folder.mkdir()

    def copy(nap: int) -> None:
        if nap == 3:
            (folder / "pairs.jsonl").write_text("{}\n")

    clock = Clock(copy)
    said: list[str] = []
    wait_for_sources([str(folder)], 3600, said.append, clock.sleep, settle_s=10, clock=clock)
    assert len(clock.naps) > 3 and str(folder) in said[0]


def test_the_settle_wait_ends_at_the_source_wait_deadline_and_is_off_at_0(tmp_path):
    source = tmp_path / "pairs.jsonl"
    source.write_text("{}\n")
    clock = Clock(lambda nap: source.write_text("{}\n" * (nap + 1)))  # never stops changing
    said: list[str] = []
    wait_for_sources([str(source)], 60, said.append, clock.sleep, settle_s=10, clock=clock)
    assert clock.now == 1060 and "end of the wait" in said[-1]
    for wait_s, settle_s in ((0, 10), (60, 0)):  # `synpref run` (no wait) and the check turned off
        off = Clock()
        wait_for_sources([str(source)], wait_s, said.append, off.sleep, settle_s=settle_s, clock=off)
        assert off.naps == []


def test_ingest_waits_for_a_file_copied_in_over_a_second_and_reads_all_of_it(tmp_path: Path):
    whole = fakes.write_synthetic(tmp_path / "whole.jsonl", 120, seed=1).read_bytes()
    source = tmp_path / "input" / "pairs.jsonl"
    source.parent.mkdir()
    source.write_bytes(whole[:100])
    settings = settings_for(tmp_path, [source], source_wait_s=30, source_settle_s=0.4)

    def copy() -> None:
        step = len(whole) // 10 + 1
        for start in range(100, len(whole), step):
            time.sleep(0.1)
            with source.open("ab") as fh:
                fh.write(whole[start : start + step])

    copier = threading.Thread(target=copy)
    copier.start()
    try:
        controller = controller_for(settings)
        controller.step("ingest", controller.ingest)
    finally:
        copier.join()
    assert controller.state.results["ingest"]["counts"]["published"] == 120


def test_a_run_that_does_not_wait_says_nothing_of_settling(tmp_path):
    # synpref run waits 0 s: the settle wait ends at once, and must not claim the sources were changing.
    from synpref.services.controller.intake import wait_for_sources

    (tmp_path / "pairs.jsonl").write_text("{}\n")
    said: list[str] = []
    wait_for_sources([str(tmp_path)], 0.0, said.append, sleep=lambda _s: None, settle_s=10.0)
    assert said == []


def test_remote_sources_alone_are_not_waited_for():
    # Every source remote: no local file to settle, yet the settle loop slept settle_s on an unchanging empty list.
    clock = Clock()
    said: list[str] = []
    wait_for_sources(["s3://bucket/pairs.jsonl", "hf://org/set"], 600, said.append, clock.sleep, 30, clock)
    assert clock.naps == [] and said == []
