"""Issue 12, item 6 in the chart: the internal NetworkPolicy admitted every release pod on every
port of every pod, the user-facing desk included. Now each port is opened on its own: the
stages' gRPC port to the controller only (plus networkPolicy.stagesGrpcFrom), metrics ports
to networkPolicy.metricsFrom (the monitoring namespace by default), the desk's HTTP port (the
user-facing one) to networkPolicy.deskFrom; the stages hold a gRPC bearer token from a Secret."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from test_scorer_chart import CHART, render

pytestmark = pytest.mark.integration
STAGES = ("annotator", "gold-scorer", "filter", "writer")
GRPC, METRICS, DESK_HTTP = 50051, 9100, 8000
SCORER_METRICS = 9090  # one metrics policy opens both metrics ports on every pod
MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
CASES = {"default": [], "gpu-cluster": ["-f", str(CHART / "examples" / "gpu-cluster.yaml")]}


def pod_labels(docs: list[dict[str, Any]], component: str) -> dict[str, str]:
    return next(
        d["spec"]["template"]["metadata"]["labels"]
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["labels"].get("app.kubernetes.io/component") == component
    )


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        value = labels.get(expr["key"])
        if expr["operator"] == "In" and value not in expr["values"]:
            return False
        if expr["operator"] == "NotIn" and value in expr["values"]:
            return False
    return True


def rules_for(docs: list[dict[str, Any]], labels: dict[str, str]) -> list[tuple[set[int] | None, Any]]:
    """(ports or None = every port, peers or None = anyone) of each ingress rule that applies to the pod."""
    out = []
    for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
        if selects(policy["spec"]["podSelector"], labels):
            for rule in policy["spec"].get("ingress", []):
                ports = {p["port"] for p in rule["ports"]} if rule.get("ports") else None
                out.append((ports, rule.get("from")))
    return out


def peers_of(rules: list[tuple[set[int] | None, Any]], port: int) -> list[Any]:
    return [peers for ports, peers in rules if ports is None or port in ports]


@pytest.mark.parametrize("case", CASES)
def test_each_port_is_open_only_to_its_callers(case: str) -> None:
    docs = render(*CASES[case])
    controller_peer = {
        "podSelector": {
            "matchLabels": {
                "app.kubernetes.io/name": "synpref",
                "app.kubernetes.io/instance": "rel",
                "app.kubernetes.io/component": "controller",
            }
        }
    }
    for component in (*STAGES, "controller", "desk"):
        rules = rules_for(docs, pod_labels(docs, component))
        assert rules or component == "controller", f"{component}: not isolated"
        for ports, peers in rules:
            assert ports is not None, f"{component}: a rule opens every port to {peers}"
            # The desk's HTTP port is the user-facing one (networkPolicy.deskFrom; empty = anyone).
            user_facing = component == "desk" and ports == {DESK_HTTP}
            assert peers is not None or user_facing, f"{component}: a rule admits anyone to {ports}"
        opened = set().union(*(ports for ports, _ in rules)) if rules else set()
        if component in STAGES:
            assert opened - {SCORER_METRICS} == {GRPC, METRICS}, (component, opened)
            # `helm test`'s Pod asks for health only; every other call needs the stages' token.
            test_peer = {
                "podSelector": {
                    "matchLabels": {
                        **controller_peer["podSelector"]["matchLabels"],
                        "app.kubernetes.io/component": "test",
                    }
                }
            }
            assert peers_of(rules, GRPC) == [[controller_peer, test_peer]], (component, peers_of(rules, GRPC))
        elif component == "desk":
            assert DESK_HTTP in opened and GRPC not in opened, opened
        else:
            assert GRPC not in opened, f"the controller's health port is open to {peers_of(rules, GRPC)}"
        for port in (METRICS, SCORER_METRICS):
            for peers in peers_of(rules, port):
                assert peers == [MONITORING], (component, port, peers)


def test_an_empty_metrics_peer_list_closes_the_metrics_port_instead_of_opening_it() -> None:
    docs = render("--set-json", "networkPolicy.metricsFrom=[]")
    for component in (*STAGES, "controller", "desk"):
        assert not peers_of(rules_for(docs, pod_labels(docs, component)), METRICS), component


@pytest.mark.parametrize("case", CASES)
def test_stages_bind_all_interfaces_and_hold_the_grpc_token(case: str, tmp_path: Path) -> None:
    docs = render(*CASES[case])
    config = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["config.yaml"])
    assert config["service"]["host"] == "0.0.0.0"
    # No token is rendered: the chart's pre-install/pre-upgrade hook Job creates the Secret once.
    hook = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == "rel-synpref-secrets")
    assert "rel-synpref-grpc-token:token:token" in hook["spec"]["template"]["spec"]["containers"][0]["command"]
    for component in STAGES:
        deployment = next(
            d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == f"rel-synpref-{component}"
        )
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        token_file = env["SYNPREF_SERVICE__GRPC_TOKEN_FILE"]
        mount = next(m for m in container["volumeMounts"] if m["name"] == "grpc-token")
        assert token_file.startswith(mount["mountPath"] + "/")
        volume = next(v for v in pod["volumes"] if v["name"] == "grpc-token")
        assert volume["secret"]["secretName"] == "rel-synpref-grpc-token"
        assert env.get("SYNPREF_SERVICE__GRPC_PROCESS_BATCH") in (None, "false")
        # The kubelet's gRPC probe carries no token: health stays open on the same port.
        assert container["readinessProbe"]["grpc"]["port"] == GRPC
