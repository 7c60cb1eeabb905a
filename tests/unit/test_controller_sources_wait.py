"""The controller waits for sources copied onto the volume after it started, for source_wait_s."""

from __future__ import annotations

import pytest

from synpref.services.controller.intake import wait_for_sources


def test_waits_until_a_missing_source_appears(tmp_path):
    source = tmp_path / "pairs.jsonl"
    said: list[str] = []
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 3:
            source.write_text("{}\n")  # copied in meanwhile

    wait_for_sources([str(source)], 3600, said.append, sleep)
    assert len(naps) == 3 and len(said) == 1 and str(source) in said[0]


@pytest.mark.parametrize("wait_s", [0.0, 0.05])
def test_gives_up_after_wait_s_so_ingest_reports_the_missing_file(tmp_path, wait_s):
    naps: list[float] = []
    wait_for_sources([str(tmp_path / "absent")], wait_s, lambda _: None, naps.append)
    assert (naps == []) if wait_s == 0 else (len(naps) >= 1)


def test_remote_sources_are_not_waited_for():
    wait_for_sources(["s3://bucket/pairs/"], 3600, lambda _: pytest.fail("waited"), lambda _: pytest.fail("slept"))


def test_the_kafka_executor_waits_for_topics_the_hook_creates_later(monkeypatch):
    from synpref.services.controller import executors
    from synpref.shared.config import load_settings

    class Consumer:
        calls = 0

        def partitions_for_topic(self, topic: str) -> set[int]:
            self.calls += 1
            return {0, 1} if self.calls > 4 else set()  # kafka-python: set() for an unknown topic

    monkeypatch.setattr(executors.time, "sleep", lambda _: None)
    ex = executors.KafkaExecutor(load_settings(), timeout_s=60)
    assert ex._partitions(Consumer(), ["a", "b"]) == {"a": [0, 1], "b": [0, 1]}
    ex.timeout_s = 0
    with pytest.raises(TimeoutError, match=r"topics \['a'\] do not exist"):
        ex._partitions(type("Never", (), {"partitions_for_topic": lambda self, t: set()})(), ["a"])
