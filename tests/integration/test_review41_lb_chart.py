"""Session 41, RL clients' calls over every scorer replica, on the chart's side: a headless Service lists every
scorer pod (a round_robin client calls them all; tests/unit/test_review41_lb.py tests the client and the server),
the network policies admit its callers as they admit the ClusterIP Service's, and the scorer's config closes
connections after a while so that clients find pods the HPA adds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from synpref.shared.config import load_settings
from tests.integration.test_chart import EXAMPLES, RELEASE, find, one, render
from tests.integration.test_chart import helm as helm  # the fixture: helm built once

pytestmark = pytest.mark.integration

SCORER = f"{RELEASE}-synpref-scorer"


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda p: p.stem if p else "default")
def test_a_headless_service_lists_every_scorer_pod_and_the_policies_admit_its_callers(
    helm: str, values: Path | None, tmp_path: Path
) -> None:
    # The ClusterIP Service is one address balanced per connection: without a headless one a client's calls all
    # went to the pod its connection reached, and pods the HPA added got none of them.
    docs = render(helm, *(["-f", str(values)] if values else []))
    pod = one(docs, "Deployment", SCORER)["spec"]["template"]
    labels = pod["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")

    headless = one(docs, "Service", f"{SCORER}-headless")["spec"]
    assert headless["clusterIP"] == "None"
    assert [(p["port"], p["targetPort"]) for p in headless["ports"]] == [(grpc_port, "grpc")]
    # It selects the scorer's pods, and only those.
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in find(docs, "Deployment")}
    selected = [name for name, pod_labels in pods.items() if _selects(headless["selector"], pod_labels)]
    assert selected == [SCORER]
    assert one(docs, "Service", SCORER)["spec"]["selector"] == headless["selector"]

    # Policies apply to pods, not Services: the peers that reach the gRPC port through the ClusterIP Service
    # reach it through the headless one (pod to pod), so the same callers are admitted, RL clients among them.
    policies = find(docs, "NetworkPolicy")
    if policies:
        peers: list[Any] = []
        for policy in policies:
            if not _selects(policy["spec"]["podSelector"].get("matchLabels", {}), labels):
                continue
            for rule in policy["spec"].get("ingress", []):
                if grpc_port in {p["port"] for p in rule.get("ports", [])}:
                    peers += rule.get("from", [{}])
        components = {p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") for p in peers}
        assert {"gold-scorer", "controller"} <= components
        assert {"podSelector": {}} in peers or {} in peers  # networkPolicy.scorerFrom: the RL clients

    # And the scorer closes its connections after a while: a round_robin client re-resolves the headless name
    # then, and a client of the ClusterIP Service gets a new connection kube-proxy may send elsewhere.
    cm = one(docs, "ConfigMap", f"{RELEASE}-synpref-config")
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    scorer = load_settings(str(path)).scorer
    assert 0 < scorer.max_connection_age_s <= 600 and scorer.max_connection_age_grace_s > 0
