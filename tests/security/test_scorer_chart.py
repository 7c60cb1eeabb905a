"""Issue 12, item 2 in the chart: only the controller reaches the scorer's admin port; RL
clients (any pod, or the GPU example's client namespaces) reach gRPC and HTTP only."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "synpref"
HELM = ROOT / ".cache" / "bin" / "helm"
ADMIN_PORT = 8081


def render(*args: str) -> list[dict[str, Any]]:
    if not HELM.exists():
        subprocess.run(["bash", str(ROOT / "tools" / "helm" / "build.sh")], check=True, timeout=1200)
    proc = subprocess.run(
        [
            str(HELM),
            "template",
            "rel",
            str(CHART),
            "--namespace",
            "ml",
            "-f",
            str(CHART / "ci" / "base-values.yaml"),
            *args,
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def selects_scorer(policy: dict[str, Any]) -> bool:
    selector = policy["spec"]["podSelector"]
    labels = selector.get("matchLabels", {})
    component = labels.get("app.kubernetes.io/component")
    if component is not None:
        return component == "scorer"
    excluded = [e for e in selector.get("matchExpressions", []) if e["operator"] == "NotIn"]
    return not any("scorer" in e["values"] for e in excluded)


def admitted(policy: dict[str, Any], port: int) -> list[Any]:
    """The `from` peers of every rule of the policy that opens `port` (None = anyone)."""
    peers = []
    for rule in policy["spec"].get("ingress", []):
        ports = [p["port"] for p in rule.get("ports", [])]
        if not ports or port in ports:
            peers.append(rule.get("from"))
    return peers


@pytest.mark.parametrize("args", [[], ["-f", str(CHART / "examples" / "gpu-cluster.yaml")]])
def test_only_the_controller_reaches_the_admin_port(args: list[str]) -> None:
    docs = render(*args)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy" and selects_scorer(d)]
    peers = [p for policy in policies for p in admitted(policy, ADMIN_PORT)]
    controller = {"app.kubernetes.io/component": "controller", "app.kubernetes.io/instance": "rel"}
    assert peers, "no policy admits anyone to the admin port"
    for peer_list in peers:
        assert peer_list is not None, "a policy admits everyone to the admin port"
        for peer in peer_list:
            assert set(peer) == {"podSelector"}, peer
            assert controller.items() <= peer["podSelector"]["matchLabels"].items(), peer

    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "rel-synpref-scorer")
    assert ADMIN_PORT in [p["port"] for p in service["spec"]["ports"]]
    config = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["config.yaml"])
    assert config["scorer"]["admin_enabled"] is True and config["scorer"]["model_root"]
    assert config["controller"]["scorer_reload_url"] == f"http://rel-synpref-scorer:{ADMIN_PORT}"
    # No token is rendered: the chart's pre-install/pre-upgrade hook Job creates the Secret once.
    hook = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == "rel-synpref-secrets")
    assert "rel-synpref-scorer-admin:token:token" in hook["spec"]["template"]["spec"]["containers"][0]["command"]
    for component in ("scorer", "controller"):
        pod = next(
            d["spec"]["template"]["spec"]
            for d in docs
            if d["kind"] == "Deployment" and d["metadata"]["name"] == f"rel-synpref-{component}"
        )
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["scorer-admin"]["secret"]["secretName"] == "rel-synpref-scorer-admin"
