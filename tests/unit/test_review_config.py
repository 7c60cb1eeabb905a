"""Review of the typed configuration (shared/config*.py) and of opening a dataset version."""

from __future__ import annotations

import json
import re

import pytest

from synpref.services.dataset_writer.dataset import MANIFEST, DatasetVersion
from synpref.shared.config import ConfigError, load_settings
from tests.unit.test_writer import records


@pytest.fixture(autouse=True)
def _no_synpref_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.upper().startswith("SYNPREF_"):
            monkeypatch.delenv(name)


def test_a_key_given_twice_in_the_yaml_file_is_an_error(tmp_path):
    """PyYAML keeps the last of two equal keys: a second `kafka:` block silently reset bootstrap_servers of the
    first to 127.0.0.1:9092."""
    path = tmp_path / "synpref.yaml"
    path.write_text("kafka:\n  bootstrap_servers: broker:9092\nwriter: {shard_rows: 10}\nkafka:\n  client_id: x\n")
    with pytest.raises(ConfigError, match=r"synpref\.yaml.*kafka.*more than once"):
        load_settings(path)
    path.write_text("kafka: {bootstrap_servers: a:1, bootstrap_servers: b:2}\n")
    with pytest.raises(ConfigError, match="bootstrap_servers"):
        load_settings(path)
    path.write_text("kafka: {bootstrap_servers: a:1}\nwriter: {shard_rows: 10}\n")
    assert load_settings(path).kafka.bootstrap_servers == "a:1"
    path.write_text("scorer:\n  models:\n    best: &m {path: /m, version: a}\n    gold: {<<: *m, version: b}\n")
    assert load_settings(path).scorer.models["gold"].version == "b"  # a merge key may be overridden on purpose


def test_a_config_path_that_cannot_be_read_is_a_config_error(tmp_path):
    """`--config /etc/synpref` (the mounted folder, not its file) and a non-UTF-8 file raised a bare traceback."""
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path))):
        load_settings(tmp_path)
    binary = tmp_path / "synpref.yaml"
    binary.write_bytes(b"\xff\xfe\x00kafka")
    with pytest.raises(ConfigError, match=r"synpref\.yaml"):
        load_settings(binary)


@pytest.mark.parametrize("value", ["a.jsonl,b.jsonl", '["a.jsonl"'])
def test_a_list_variable_that_is_not_json_is_a_config_error(monkeypatch, value):
    """pydantic-settings raised its own SettingsError, naming neither the variable nor the fix: services caught only
    ConfigError and died with a traceback."""
    monkeypatch.setenv("SYNPREF_CONTROLLER__SOURCES", value)
    with pytest.raises(ConfigError, match=r"SYNPREF_CONTROLLER__SOURCES.*JSON"):
        load_settings()
    monkeypatch.setenv("SYNPREF_CONTROLLER__SOURCES", '["a.jsonl", "b.jsonl"]')
    assert load_settings().controller.sources == ["a.jsonl", "b.jsonl"]


def _corrupt_manifest(folder) -> None:
    (folder / MANIFEST).write_text('{"name": "d", "shards": [')


def _missing_shard(folder) -> None:
    (folder / "part-00000.parquet").unlink()
    (folder / ".dedup-ids.sqlite").unlink()  # the index catches up from the listed shards


@pytest.mark.parametrize("damage", [_corrupt_manifest, _missing_shard])
def test_a_version_that_fails_to_open_releases_its_writer_lock(tmp_path, damage):
    """The lock was taken before the manifest was read; a failed open kept it until the half-built object was
    collected (the exception's traceback holds it), so a retry in the process failed as 'already held'."""
    with DatasetVersion(tmp_path, "d", "v1") as dv:
        dv.append(records(0, 3), {"t:0": 3})
    folder = tmp_path / "d" / "v1"
    manifest = (folder / MANIFEST).read_text()
    damage(folder)
    with pytest.raises((ValueError, OSError)) as failed:
        DatasetVersion(tmp_path, "d", "v1", lock_timeout_s=0)
    (folder / MANIFEST).write_text(json.dumps({**json.loads(manifest), "shards": [], "rows": 0}))
    with DatasetVersion(tmp_path, "d", "v1", lock_timeout_s=0) as retried:  # while `failed` is still referenced
        assert retried.append(records(0, 3)).written == 3
    assert failed.value is not None


def test_health_reports_an_endpoint_that_does_not_speak_http_and_checks_the_rest(capsys):
    """An http:// target answering something else (a gRPC port) raised BadStatusLine: a traceback, and the
    targets after it were never checked."""
    import socket
    import threading

    from synpref.shared.health_cli import main

    server = socket.create_server(("127.0.0.1", 0))

    def answer_garbage() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # the test closed the socket: done
                return
            with conn:
                conn.recv(1000)
                conn.sendall(b"\x00\x00\x12\x04\x00garbage\r\n\r\n")

    threading.Thread(target=answer_garbage, daemon=True).start()
    port = server.getsockname()[1]
    assert main([f"http://127.0.0.1:{port}/healthz", "http://127.0.0.1:bad/", "--wait", "0"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[1] for line in lines] == ["BadStatusLine", "InvalidURL"], lines
    server.close()
