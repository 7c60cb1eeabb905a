"""Review 42, the controller's state stores and the config's environment overrides: each test reproduces a bug."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from synpref.services.controller import embedded
from synpref.services.controller.loop import Controller
from synpref.services.controller.state import STORE_FILE, VERDICTS_FILE
from synpref.shared import pairstore
from synpref.shared.config import ConfigError, load_settings
from synpref.shared.pairstore import PairStore, PairStoreError
from testing import controller_fakes as fakes
from tests.unit.test_review_intake import controller_for, settings_for

CONFIG_ENV = "synpref.shared.config_env"


@pytest.fixture
def no_synpref_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("SYNPREF_"):
            monkeypatch.delenv(name)


def wal_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.sqlite-wal"))


def test_closing_a_controller_closes_its_run_store_and_verdict_log_twice_over(tmp_path):
    # close() closed only the annotators: pairs.sqlite and verdicts.sqlite stayed open (and their -wal files
    # unchecked-pointed) until the garbage collector found the controller.
    source = fakes.write_synthetic(tmp_path / "pairs.jsonl", 40, seed=1)
    controller = controller_for(settings_for(tmp_path, [source]))
    controller.step("ingest", controller.ingest)
    workdir = Path(controller.store.root)
    assert wal_files(workdir) == [f"{STORE_FILE}-wal", f"{VERDICTS_FILE}-wal"]
    controller.close()
    assert wal_files(workdir) == [], "the last connection's close checkpoints and removes the WAL"
    controller.close()  # twice is fine


def test_synpref_run_closes_the_controller_it_built(tmp_path, monkeypatch):
    from synpref.shared.sources import SourceError

    def stop(_controller: Controller) -> None:
        raise SourceError("stopped by the test")

    source = fakes.write_synthetic(tmp_path / "pairs.jsonl", 40, seed=1)
    settings = settings_for(tmp_path, [source])
    built: list[Controller] = []

    def build(s, progress=True):
        built.append(controller_for(s))
        return built[-1]

    monkeypatch.setattr(embedded, "load_settings", lambda _path: settings)
    monkeypatch.setattr(embedded, "build_controller", build)
    monkeypatch.setattr(Controller, "run", stop)
    assert embedded.main(["--quiet"]) == 2
    assert wal_files(Path(settings.controller.workdir)) == []


def test_a_second_controller_blocked_by_the_first_says_so_not_database_is_locked(tmp_path, monkeypatch):
    # The first controller's step holds the store's write transaction for as long as the step runs; a second
    # controller's first write waited the busy timeout and died with a bare "database is locked".
    monkeypatch.setattr(pairstore, "_BUSY_TIMEOUT_S", 0.2, raising=False)
    first = PairStore(tmp_path / STORE_FILE)
    second = PairStore(tmp_path / STORE_FILE)
    try:
        with first.transaction():
            first.set_meta("step", "ingest")
            started = time.monotonic()
            with pytest.raises(PairStoreError, match=r"pairs\.sqlite.*another process.*second controller"):
                second.set_meta("step", "seed")
            assert time.monotonic() - started < 3, "waited the short busy timeout, not SQLite's 5 s default"
        assert first.meta("step") == "ingest"
    finally:
        first.close()
        second.close()


def test_short_contention_still_waits_for_the_lock(tmp_path):
    # The busy timeout stays: another connection's short write (an audit, the sqlite3 shell) is waited for.
    store = PairStore(tmp_path / STORE_FILE)
    other = sqlite3.connect(tmp_path / STORE_FILE, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")
        release = threading.Timer(0.3, other.execute, ("COMMIT",))  # the other writer's transaction lasts 0.3 s
        release.start()
        store.set_meta("a", "1")
        release.join()
        assert store.meta("a") == "1"
    finally:
        store.close()
        other.close()


@pytest.mark.usefixtures("no_synpref_env")
def test_a_misspelt_top_level_variable_is_refused_with_the_setting_it_resembles(monkeypatch):
    # SYNPREF_LOG_LEVLE=debug was ignored without a word: the run logged at INFO.
    monkeypatch.setenv("SYNPREF_LOG_LEVLE", "debug")
    with pytest.raises(ConfigError, match=r"SYNPREF_LOG_LEVLE.*SYNPREF_LOG_LEVEL"):
        load_settings()
    monkeypatch.delenv("SYNPREF_LOG_LEVLE")
    monkeypatch.setenv("SYNPREF_DESKS", "{}")
    with pytest.raises(ConfigError, match=r"SYNPREF_DESKS.*SYNPREF_DESK\b"):
        load_settings()


@pytest.mark.usefixtures("no_synpref_env")
def test_an_unknown_top_level_variable_resembling_no_setting_is_a_warning(monkeypatch, caplog):
    monkeypatch.setenv("SYNPREF_SOMETHING_ELSE", "1")
    with caplog.at_level(logging.WARNING, logger=CONFIG_ENV):
        assert load_settings().log_level == "INFO"
    assert "SYNPREF_SOMETHING_ELSE is not a setting and is ignored (the closest is SYNPREF_" in caplog.text


@pytest.mark.usefixtures("no_synpref_env")
def test_the_projects_other_variables_kubernetes_service_links_and_judge_keys_are_left_alone(monkeypatch, caplog):
    from synpref.shared.config_env import NOT_SETTINGS

    for name in NOT_SETTINGS:
        monkeypatch.setenv(name, "x")
    # `helm install synpref`: every pod gets the link variables of the release's Services (synpref-scorer, ...).
    for name in ("SCORER_SERVICE_HOST", "SCORER_SERVICE_PORT", "SCORER_SERVICE_PORT_GRPC"):
        monkeypatch.setenv(f"SYNPREF_{name}", "10.0.0.1")
    monkeypatch.setenv("SYNPREF_SCORER_PORT", "tcp://10.0.0.1:50060")  # a bare _PORT link's value is a URL
    monkeypatch.setenv("SYNPREF_KAFKA_PORT_9092_TCP_ADDR", "10.0.0.2")
    monkeypatch.setenv("SYNPREF_SERVICE_HOST", "10.0.0.3")
    monkeypatch.setenv("SYNPREF_JUDGE_KEY", "sk-test")  # a judge's api_key_env
    monkeypatch.setenv("SYNPREF_LOG_LEVEL", "debug")
    monkeypatch.setenv("SYNPREF_CONFIG", "")
    judges = [{"name": "m", "base_url": "http://127.0.0.1:1/v1", "api_key_env": "SYNPREF_JUDGE_KEY"}]
    with caplog.at_level(logging.WARNING, logger=CONFIG_ENV):
        assert load_settings(annotator={"judges": judges}).log_level == "DEBUG"
    assert caplog.text == ""
