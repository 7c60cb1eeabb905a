"""Review findings in the Kubernetes integration (second pass): the controller's training ConfigMaps,
`synpref train submit` against an unreachable cluster, and the chart's ingest Job across upgrades."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from kubernetes import client

from synpref.services.controller.cluster_models import ClusterJobs, K8sModels
from synpref.shared.config import load_settings
from synpref.training.k8s_job import main_submit

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "synpref"
HELM = ROOT / ".cache" / "bin" / "helm"
BASE = CHART / "ci" / "base-values.yaml"
needs_helm = pytest.mark.skipif(not HELM.exists(), reason="helm is not built (make helm)")

PAIRS = [
    {
        "conversation": [{"role": "user", "content": f"q{i}"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    for i in range(2)
]


def render(*args: str, chart: Path = CHART) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [str(HELM), "template", "rel", str(chart), "--namespace", "ml", "-f", str(BASE), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


# --- (1) every training attempt's ConfigMap must go with its Job ---------------------------------


class FakeCluster:
    """The JobBackend surface ClusterJobs uses; records each ConfigMap call as its RBAC verb."""

    def __init__(self) -> None:
        self.config_maps: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, client.V1Job] = {}
        self.verbs: list[str] = []
        self.core = SimpleNamespace(
            create_namespaced_config_map=self.create_cm,
            replace_namespaced_config_map=self.replace_cm,
            patch_namespaced_config_map=self.patch_cm,
        )
        self.batch = SimpleNamespace(list_namespaced_job=lambda namespace, label_selector: SimpleNamespace(items=[]))

    def create_cm(self, namespace: str, body: dict[str, Any]) -> None:
        self.verbs.append("create")
        if body["metadata"]["name"] in self.config_maps:
            raise client.ApiException(status=409, reason="Conflict")
        self.config_maps[body["metadata"]["name"]] = body

    def replace_cm(self, name: str, namespace: str, body: dict[str, Any]) -> None:
        self.verbs.append("update")
        self.config_maps[name] = body

    def patch_cm(self, name: str, namespace: str, body: dict[str, Any]) -> None:
        self.verbs.append("patch")
        self.config_maps[name] = {**self.config_maps[name], **body}

    def submit(self, spec: Any) -> client.V1Job:
        meta = client.V1ObjectMeta(name=spec.name, namespace=spec.namespace, uid=f"uid-{spec.name}")
        job = client.V1Job(metadata=meta)
        self.jobs[spec.name] = job
        return job

    def wait(self, namespace: str, name: str, timeout_s: float) -> str:
        return "Complete"


def k8s_models(tmp_path: Path, cluster: FakeCluster) -> K8sModels:
    settings = load_settings(
        controller={
            "workdir": str(tmp_path),
            "training": "k8s",
            "backbone": "/models/m",
            "k8s_job": {"image": "synpref/train:1", "namespace": "curation", "ttl_seconds_after_finished": 600},
        }
    )
    return K8sModels(settings.controller, tmp_path, backend=ClusterJobs(cluster))


def test_each_attempts_config_map_is_owned_by_its_job_so_the_jobs_ttl_deletes_both(tmp_path: Path) -> None:
    cluster = FakeCluster()
    models = k8s_models(tmp_path, cluster)
    models.train("gold", PAIRS, [], tmp_path / "models")
    models.train("working-1", PAIRS, [], tmp_path / "models")
    assert len(cluster.config_maps) == len(cluster.jobs) == 2
    for job in cluster.jobs.values():
        manifest = cluster.config_maps[f"{job.metadata.name}-config"]
        owners = manifest["metadata"].get("ownerReferences") or []
        # Garbage collection deletes a dependent once its owner (the Job, deleted by its TTL) is gone.
        assert [(o["apiVersion"], o["kind"], o["name"], o["uid"]) for o in owners] == [
            ("batch/v1", "Job", job.metadata.name, job.metadata.uid)
        ]
        # blockOwnerDeletion would need update on jobs/finalizers, which the Role does not grant.
        assert not any(o.get("blockOwnerDeletion") for o in owners)


@needs_helm
def test_the_controllers_config_map_calls_stay_within_the_charts_role(tmp_path: Path) -> None:
    cluster = FakeCluster()
    k8s_models(tmp_path, cluster).train("gold", PAIRS, [], tmp_path / "models")
    role = next(d for d in render() if d["kind"] == "Role" and d["metadata"]["name"] == "rel-synpref-controller")
    granted = {v for rule in role["rules"] if "configmaps" in rule["resources"] for v in rule["verbs"]}
    assert set(cluster.verbs) <= granted and "delete" not in granted


# --- (2) an unreachable API server is a one-line error, not a traceback ---------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_submit_to_an_unreachable_api_server_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = closed_port()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    spec = tmp_path / "train-job.yaml"
    spec.write_text(yaml.safe_dump({"image": "synpref/train:1", "config_map": "rel-synpref-config", "namespace": "ml"}))
    assert main_submit(["run-1", "--spec", str(spec), "--kubeconfig", str(kubeconfig)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("synpref train submit: ") and f"127.0.0.1:{port}" in err and "ml/run-1" in err
    # No kube config at all is the same kind of error.
    assert main_submit(["run-1", "--spec", str(spec), "--kubeconfig", str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err.startswith("synpref train submit: ")


# --- (3) a helm upgrade must not delete a running ingest Job --------------------------------------


def ingest_jobs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    component = "app.kubernetes.io/component"
    return [d for d in docs if d["kind"] == "Job" and d["metadata"]["labels"].get(component) == "ingest"]


@needs_helm
def test_an_upgrade_that_leaves_the_ingest_alone_keeps_its_job(tmp_path: Path) -> None:
    # `helm template` is always revision 1; a copy whose templates see Revision + 1 renders revision 2.
    next_revision = tmp_path / "synpref"
    shutil.copytree(CHART, next_revision)
    for path in (next_revision / "templates").rglob("*"):
        if path.is_file():
            path.write_text(re.sub(r"\.Release\.Revision\b", "(add .Release.Revision 1)", path.read_text()))
    ingest = ["--set", "ingest.enabled=true", "--set-json", 'ingest.args=["/data/input/a.json"]']
    first = ingest_jobs(render(*ingest))
    # Revision 2 changes something else: the ingest Job keeps its name, so helm neither deletes it
    # (killing a run in progress) nor starts the ingest again from the top.
    second = ingest_jobs(render(*ingest, "--set", "config.log_level=DEBUG", chart=next_revision))
    assert len(first) == len(second) == 1
    assert first[0]["metadata"]["name"] == second[0]["metadata"]["name"]
    assert first[0]["spec"] == second[0]["spec"]
    # A finished Job is kept: deleted by a TTL, the next upgrade would create it, and so rerun it.
    assert "ttlSecondsAfterFinished" not in first[0]["spec"]
    # A changed ingest is a new Job (a Job's pod template is immutable).
    changed = ingest_jobs(render("--set", "ingest.enabled=true", "--set-json", 'ingest.args=["/data/input/b.json"]'))
    assert changed[0]["metadata"]["name"] != first[0]["metadata"]["name"]
    assert len(changed[0]["metadata"]["name"]) <= 63
