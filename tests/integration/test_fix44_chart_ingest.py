"""The ingest Job does not run again on a permanent failure: exit 2 (a bad config or an unreadable file) failed its
pod, and backoffLimit 2 read the same files, hours at 40M pairs, twice more to the same end."""

from __future__ import annotations

import pytest

from tests.integration.test_chart import helm as helm  # the fixture: helm built once
from tests.integration.test_chart import render

pytestmark = pytest.mark.integration


def test_the_ingest_job_fails_at_once_on_exit_2_and_ignores_disruptions(helm: str) -> None:
    docs = render(helm, "--set", "ingest.enabled=true")
    (job,) = [d for d in docs if d["kind"] == "Job" and "-ingest-" in d["metadata"]["name"]]
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": "ingest", "operator": "In", "values": [2]}} in rules
    assert any(r["action"] == "Ignore" and r["onPodConditions"][0]["type"] == "DisruptionTarget" for r in rules)
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"  # what podFailurePolicy requires
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "ingest"
