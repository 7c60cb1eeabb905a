"""Review 46 (area I), `synpref ingest`: an output it cannot write (--report, --seen) is a bad command, said as one
line before any producer is made, not a traceback (exit 1, "retry me") after Kafka was reached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from synpref.services.ingest import main as ingest


def pair_file(tmp_path: Path) -> Path:
    src = tmp_path / "pairs.jsonl"
    src.write_text(json.dumps({"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}) + "\n")
    return src


@pytest.mark.parametrize("option", ["--report", "--seen"])
def test_an_output_in_no_folder_is_exit_2_with_a_message_and_no_producer(
    option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from synpref.shared.kafka import clients

    made: list[str] = []

    def no_kafka(*args: object, **kwargs: object) -> None:
        made.append("kafka client")
        raise AssertionError("no Kafka client may be made for a command that cannot run")

    monkeypatch.setattr(clients, "make_admin", no_kafka)
    monkeypatch.setattr(clients, "make_producer", no_kafka)
    missing = tmp_path / "no-such-folder" / "out.txt"
    assert ingest.main([str(pair_file(tmp_path)), "--no-decontaminate", option, str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"synpref ingest: {option}: No such file or directory: {missing}" in err
    assert made == []


def test_a_seen_file_is_still_loaded_and_appended(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The --seen file now opens (created if absent) before it is loaded: its ids still dedup a second run."""
    seen = tmp_path / "seen.txt"
    args = [str(pair_file(tmp_path)), "--no-decontaminate", "--dry-run", "--seen", str(seen)]
    assert ingest.main(args) == 0
    assert json.loads(capsys.readouterr().out)["published"] == 1
    seen.write_text(seen.read_text() + "\n".join(_ids(tmp_path)) + "\n")
    assert ingest.main(args) == 0
    assert json.loads(capsys.readouterr().out)["duplicate"] == 1


def _ids(tmp_path: Path) -> list[str]:
    from synpref.services.ingest.preprocess import Preprocessor
    from synpref.shared.sources import iter_source

    return [r.pair.id for r in Preprocessor().run(iter_source(pair_file(tmp_path)))]
