"""Session 45, area C: the scorer's checkpoint-load bound is a setting (scorer.load_timeout_s), not a constant, so a
large model on slow storage can be given longer. The bound's own behaviour is pinned in test_fix44_reload.py."""

from __future__ import annotations

import os

import pytest

from synpref.shared.config import ConfigError, ScorerSettings, load_settings


@pytest.fixture
def no_synpref_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.upper().startswith("SYNPREF_")]:
        monkeypatch.delenv(name)


@pytest.mark.usefixtures("no_synpref_env")
def test_the_load_timeout_keeps_its_20_minutes_and_an_environment_variable_overrides_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings().scorer.load_timeout_s == 1200.0
    monkeypatch.setenv("SYNPREF_SCORER__LOAD_TIMEOUT_S", "3600")  # a 70B checkpoint from a network volume
    assert load_settings().scorer.load_timeout_s == 3600.0


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_a_load_timeout_that_is_not_positive_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="load_timeout_s"):
        ScorerSettings(load_timeout_s=bad)


@pytest.mark.usefixtures("no_synpref_env")
def test_a_bad_load_timeout_in_the_environment_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNPREF_SCORER__LOAD_TIMEOUT_S", "0")
    with pytest.raises(ConfigError, match="load_timeout_s"):
        load_settings()
