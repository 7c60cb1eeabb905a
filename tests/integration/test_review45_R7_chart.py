"""Review 45 (R7) of charts/synpref: pull secrets on every pod, HPA bounds, PDBs that let drains through, and the
in-process gold scorer's start-up (its restart after a broken device included)."""

from __future__ import annotations

import math
import subprocess

import pytest

from tests.integration.test_chart import CHART, POD_KINDS, RELEASE, pod_spec, render
from tests.integration.test_chart import helm as helm  # the fixture: helm built once
from tests.integration.test_chart import run_helm as template

pytestmark = pytest.mark.integration


def test_every_pod_pulls_with_the_image_pull_secrets(helm: str) -> None:
    # The dev Kafka StatefulSet had none: a devKafka.image on a private mirror (a cluster that reaches no public
    # registry) could not be pulled, while every other pod of the release got the secrets.
    docs = render(helm, "--set", "devKafka.enabled=true,devJudges.enabled=true", "--set", "imagePullSecrets={regcred}")
    pods = {f"{d['kind']}/{d['metadata']['name']}": pod_spec(d) for d in docs if d["kind"] in POD_KINDS}
    assert f"StatefulSet/{RELEASE}-synpref-kafka" in pods
    missing = [name for name, spec in pods.items() if spec.get("imagePullSecrets") != [{"name": "regcred"}]]
    assert missing == []


@pytest.mark.parametrize("path", ["stages.annotator", "stages.goldScorer", "scorer"])
def test_an_hpa_minimum_above_its_maximum_is_refused_with_a_message(helm: str, path: str) -> None:
    # The schema checks each bound alone; the API server refused the rendered HPA, after part of the release applied.
    proc = template(helm, "--set", f"{path}.autoscaling.minReplicas=5,{path}.autoscaling.maxReplicas=2")
    assert proc.returncode != 0, proc.stdout[:1000]
    assert f"{path}.autoscaling.minReplicas (5) is above {path}.autoscaling.maxReplicas (2)" in proc.stderr
    # Equal bounds, or autoscaling off, still render.
    render(helm, "--set", f"{path}.autoscaling.minReplicas=2,{path}.autoscaling.maxReplicas=2")
    render(helm, "--set", f"{path}.autoscaling.enabled=false,{path}.autoscaling.minReplicas=5")


@pytest.mark.parametrize("value", ["0%", "00%", "101%"])
def test_a_pdb_that_blocks_every_drain_is_refused_by_the_schema(helm: str, value: str) -> None:
    # maxUnavailable 0 was refused but "0%" passed: a PDB no voluntary eviction gets through, so `kubectl drain`
    # of the node waits for ever. Above 100% the API server refuses the PDB.
    proc = template(helm, "--set", f"stages.filter.pdb.maxUnavailable={value}")
    assert proc.returncode != 0
    assert "/stages/filter/pdb/maxUnavailable" in proc.stderr, proc.stderr
    lint = subprocess.run(
        [helm, "lint", "--strict", str(CHART), "--set", f"desk.pdb.maxUnavailable={value}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert lint.returncode != 0, lint.stdout
    docs = render(helm, "--set", "stages.filter.pdb.maxUnavailable=1%")
    (pdb,) = [d for d in docs if d["kind"] == "PodDisruptionBudget" and d["metadata"]["name"].endswith("-filter")]
    assert pdb["spec"]["maxUnavailable"] == "1%"


def startup_budget_s(helm: str, component: str, *args: str) -> int:
    docs = render(helm, *args)
    name = f"{RELEASE}-synpref-{component}"
    (deploy,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == name]
    (container,) = pod_spec(deploy)["containers"]
    probe = container["startupProbe"]
    return int(probe["periodSeconds"]) * int(probe["failureThreshold"])


@pytest.mark.parametrize(
    ("settings", "loads", "load_s"),
    [
        ("config.scoring.gold.path=/data/rm/gold,config.scoring.best.path=/data/rm/best", 2, 1200.0),
        ("config.scoring.gold.path=/data/rm/gold,config.scorer.load_timeout_s=1801", 1, 1801.0),
    ],
    ids=["two-rms", "one-rm-slow-load"],
)
def test_an_in_process_gold_scorer_has_its_model_loads_to_start(
    helm: str, settings: str, loads: int, load_s: float
) -> None:
    # In process the gold scorer loads its RMs before it opens the port its probes ask, on every start, the restart
    # Kubernetes makes after a broken device (StageBroken, exit 1) too. 300 s in all got a pod loading an 8B RM
    # killed, and each restart again: it never served. Each load now has the scorer's load_timeout_s.
    base = startup_budget_s(helm, "filter")
    budget = startup_budget_s(helm, "gold-scorer", "--set", f"config.scoring.mode=in_process,{settings}")
    assert budget >= base + math.ceil(loads * load_s)
    # Over gRPC it loads nothing (the scorer does, behind its own "liveness" health): the stages' budget.
    assert startup_budget_s(helm, "gold-scorer", "--set", settings) == base
    # Settings' default mode is in_process: a config that drops the chart's grpc gets the longer budget too.
    dropped = startup_budget_s(helm, "gold-scorer", "--set", f"config.scoring.mode=null,{settings}")
    assert dropped == budget


def test_a_gold_scorer_rollout_outlasts_its_model_loads(helm: str) -> None:
    # The stage Deployments kept Kubernetes' 600 s progress deadline: a gold scorer loading two RMs in process (up to
    # 2 x 1200 s) was marked stalled mid-load, and `helm upgrade --wait` failed a rollout that was on its way.
    settings = "config.scoring.mode=in_process,config.scoring.gold.path=/g,config.scoring.best.path=/b"
    for component, args in (("gold-scorer", ("--set", settings)), ("filter", ())):
        docs = render(helm, *args)
        name = f"{RELEASE}-synpref-{component}"
        (deploy,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == name]
        deadline = int(deploy["spec"]["progressDeadlineSeconds"])
        assert deadline >= max(600, startup_budget_s(helm, component, *args) + 300), component
