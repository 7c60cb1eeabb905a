"""The chart sets kafka.max_poll_interval_ms from its values (kafka.maxPollIntervalMs): before, a stage whose batches
need longer than 10 minutes could only be given more through each stage's extraEnv, and the controller not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_chart import helm as helm  # the fixture: helm built once
from tests.integration.test_chart import render
from tests.integration.test_chart import run_helm as template
from tests.integration.test_review39_chart import rendered_settings

pytestmark = pytest.mark.integration


def test_the_poll_interval_is_a_chart_value(helm: str, tmp_path: Path) -> None:
    assert rendered_settings(render(helm), tmp_path).kafka.max_poll_interval_ms == 600_000
    slow = render(helm, "--set", "kafka.maxPollIntervalMs=1800000,config.annotator.batch_deadline_s=1500")
    settings = rendered_settings(slow, tmp_path)
    assert settings.kafka.max_poll_interval_ms == 1_800_000
    assert settings.annotator.batch_deadline_s == 1500


def test_a_poll_interval_below_the_settings_floor_is_refused_by_the_schema(helm: str) -> None:
    proc = template(helm, "--set", "kafka.maxPollIntervalMs=100")
    assert proc.returncode != 0
    assert "maxPollIntervalMs" in proc.stderr
