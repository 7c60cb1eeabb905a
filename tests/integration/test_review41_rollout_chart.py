"""Session 41, the scorer under a rolling update, on the chart's side: the scorer pods it renders have a lame
duck (scorer.shutdown_delay_s; tests/unit/test_review41_rollout.py tests the server) and a grace period that
covers it on top of the drain and the models' close."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from synpref.shared.config import load_settings
from tests.integration.test_chart import CHART, RELEASE, run_helm
from tests.integration.test_chart import helm as helm  # the fixture: helm built once

pytestmark = pytest.mark.integration

CLOSE_MARGIN_S = 30
"""What the chart keeps past the drain for the models' batchers to drain and close (synpref.scorerGraceSeconds)."""


def _scorer(helm: str, tmp_path: Path, *args: str) -> tuple[Any, int]:
    proc = run_helm(helm, *args, chart=CHART)
    assert proc.returncode == 0, proc.stderr[-2000:]
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == f"{RELEASE}-synpref-config"]
    (scorer,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == f"{RELEASE}-synpref-scorer"]
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    return load_settings(str(path)).scorer, int(scorer["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])


@pytest.mark.parametrize(
    "args",
    [[], ["--set", "config.scorer.shutdown_delay_s=20,config.scorer.drain_s=40"], ["--set", "config.scorer.drain_s=5"]],
    ids=["defaults", "tuned", "short-drain"],
)
def test_scorer_pods_serve_through_the_endpoint_removal_and_get_the_grace_for_it(
    helm: str, tmp_path: Path, args: list[str]
) -> None:
    # Without a lame duck a scorer pod refused every call routed to it between SIGTERM and kube-proxy's seeing
    # it leave the endpoints: RL reward calls failed on each rollout and HPA scale-in.
    scorer, grace = _scorer(helm, tmp_path, *args)
    assert scorer.shutdown_delay_s > 0
    # SIGKILL must not cut the models' close short: the delay comes before the drain, within the same grace.
    assert grace >= math.ceil(scorer.shutdown_delay_s + max(scorer.drain_s, 30.0)) + CLOSE_MARGIN_S
