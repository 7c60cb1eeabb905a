"""Issue 12, config: a misspelt section in the environment and non-finite floats must stop a process.

Each case runs the real `synpref ingest --dry-run` process, the cheapest command that loads
the settings, and expects exit status 2 with a message naming the culprit, before any row is read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from synpref.shared.config import Settings, load_settings

SECTIONS = ("annotator", "controller", "desk", "filter", "kafka", "scorer", "scoring", "service", "topics", "writer")


def run_ingest(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("SYNPREF_")}
    cmd = [sys.executable, "-m", "synpref.shared.cli", "ingest", "--dry-run", str(pairs), *args]
    return subprocess.run(cmd, env={**clean, **env}, capture_output=True, text=True, timeout=120)


def test_a_misspelt_env_section_is_refused_naming_the_variable_and_the_sections(tmp_path: Path) -> None:
    done = run_ingest(tmp_path, {"SYNPREF_SCORRER__PORT": "50099"})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "SYNPREF_SCORRER__PORT" in done.stderr
    assert all(section in done.stderr for section in SECTIONS), done.stderr
    assert done.stdout == ""  # no counts: nothing was read


def test_known_sections_and_other_synpref_variables_still_load(tmp_path: Path) -> None:
    # SYNPREF_KAFKA_BOOTSTRAP (the test suite's) and SYNPREF_JOB_NAME (training pods) are no settings.
    env = {"SYNPREF_SCORER__PORT": "50099", "SYNPREF_KAFKA_BOOTSTRAP": "x:1", "SYNPREF_JOB_NAME": "j"}
    done = run_ingest(tmp_path, env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["published"] == 1


def test_infinite_timeouts_in_yaml_and_env_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("controller:\n  stage_timeout_s: .inf\ndesk:\n  lease_s: .inf\n")
    done = run_ingest(tmp_path, {"SYNPREF_SCORER__DRAIN_S": "inf"}, "--config", str(config))
    assert done.returncode == 2, done.stdout + done.stderr
    for field in ("controller.stage_timeout_s", "desk.lease_s", "scorer.drain_s"):
        assert f"{field}: Input should be a finite number" in done.stderr, done.stderr


def float_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted names of every float field of the settings tree (sections nest one level)."""
    out = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += float_fields(field.annotation, f"{prefix}{name}.")
        elif field.annotation is float or field.annotation == float | None:
            out.append(prefix + name)
    return out


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_every_float_field_refuses_non_finite_values(value: float) -> None:
    fields = float_fields(Settings)
    assert len(fields) >= 10  # the walk found the timeouts, waits and rates
    for dotted in fields:
        section, name = dotted.split(".")
        with pytest.raises(ValidationError, match="finite number"):
            Settings.model_fields[section].annotation.model_validate({name: value})  # type: ignore[union-attr]


def test_load_settings_refuses_an_unknown_section_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from synpref.shared.config import ConfigError

    monkeypatch.setenv("synpref_desk2__port", "1")  # pydantic-settings matches names case-insensitively
    with pytest.raises(ConfigError, match="synpref_desk2__port"):
        load_settings()
