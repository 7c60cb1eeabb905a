"""`synpref ingest` says what went wrong: a negative --limit, a broker it cannot reach, why sends failed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from synpref.services.ingest import main as ingest
from synpref.services.ingest.preprocess import Preprocessor
from tests.unit.test_ingest import Producer, row


def pair_file(tmp_path: Path) -> Path:
    src = tmp_path / "pairs.jsonl"
    line = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}
    src.write_text(json.dumps(line) + "\n")
    return src


def test_a_negative_limit_is_refused_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Before: itertools.islice's ValueError traceback, after the benchmark set was built.
    with pytest.raises(SystemExit) as exited:
        ingest.main([str(pair_file(tmp_path)), "--dry-run", "--limit", "-1"])
    assert exited.value.code == 2
    assert "--limit must be 0 (all rows) or more, not -1" in capsys.readouterr().err


def test_a_broker_it_cannot_reach_is_a_message_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the client's "Unable to bootstrap" traceback (after 30 s of trying, here made at once).
    from kafka.errors import KafkaTimeoutError

    from synpref.shared.kafka import clients

    def unreachable(*args: object, **kwargs: object) -> None:
        raise KafkaTimeoutError("Unable to bootstrap from ['127.0.0.1:1']")

    monkeypatch.setattr(clients, "make_admin", unreachable)
    monkeypatch.setattr(clients, "make_producer", unreachable)
    monkeypatch.setenv("SYNPREF_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:1")
    assert ingest.main([str(pair_file(tmp_path)), "--no-decontaminate"]) == 1
    err = capsys.readouterr().err
    assert "synpref ingest: cannot reach Kafka at 127.0.0.1:1: KafkaTimeoutError" in err and "Traceback" not in err


def test_a_failed_send_logs_why(caplog: pytest.LogCaptureFixture) -> None:
    # Before: only "N records were not acknowledged by Kafka", never the broker's reason.
    rows = [row(i, f"prompt {i}") for i in range(3)]
    failing = next(iter(Preprocessor().run(rows[1:2]))).pair.id
    with caplog.at_level(logging.WARNING, logger=ingest.log.name):
        unacked, _ = ingest.publish(Preprocessor(), iter(rows), Producer(fail={failing}), "t", lambda ids: None)
    assert unacked == 1
    assert any("the broker refused the record" in r.getMessage() and failing in r.getMessage() for r in caplog.records)
