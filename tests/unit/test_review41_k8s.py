"""Review 41, training as Kubernetes Jobs under a cluster's conditions: a Job deleted by its TTL before
its outcome was read, a pod evicted or preempted, a model whose every attempt fails, and a Job that
runs longer than the controller waited for it.

The TTL test talks real HTTP, through the kubernetes client and ClusterJobs/JobBackend, to a loopback
stand-in for the API server that deletes a finished Job as its TTL controller would."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes_validate
import pytest
import yaml
from kubernetes import client

from synpref.services.controller.cluster_models import ClusterJobs, K8sModels
from synpref.shared.config import load_settings
from synpref.training.k8s_job import JobBackend, TrainingJobSpec, build_training_job, to_manifest
from testing.json_api import JsonHandler, serving

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "synpref"
HELM = ROOT / ".cache" / "bin" / "helm"
needs_helm = pytest.mark.skipif(not HELM.exists(), reason="helm is not built (make helm)")
POLL_S = 5.0
"""JobBackend.wait's default interval between two reads of a Job."""

PAIRS = [
    {
        "conversation": [{"role": "user", "content": f"q{i}"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    for i in range(2)
]


def settings(tmp_path: Path, **job: Any) -> Any:
    values = {"image": "synpref/train:1", "namespace": "curation", **job}
    return load_settings(
        controller={"workdir": str(tmp_path), "training": "k8s", "backbone": "/models/m", "k8s_job": values}
    ).controller


# --- a loopback API server with a TTL controller ----------------------------------------------


class Cluster(JsonHandler):
    """Jobs, ConfigMaps; a Job is finished (Complete) by the time it is first read, and the TTL controller
    deletes a finished Job whose ttlSecondsAfterFinished is shorter than the controller's poll interval
    before that read comes (as on a cluster: it deletes within a second or so of the TTL running out)."""

    jobs: dict[str, dict[str, Any]]
    created: list[str]
    config_maps: dict[str, dict[str, Any]]

    def not_found(self, name: str) -> None:
        body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}
        self.reply(404, {**body, "message": f'jobs.batch "{name}" not found'})

    def body(self) -> dict[str, Any]:
        return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

    def do_POST(self) -> None:
        body = self.body()
        name = body["metadata"]["name"]
        if "/jobs" in self.path:
            body["metadata"]["uid"] = f"uid-{name}-{len(self.created)}"
            self.jobs[name] = {**body, "status": {"active": 1}}
            self.created.append(name)
        else:
            self.config_maps[name] = body
        self.reply(201, body)

    def do_PUT(self) -> None:
        body = self.body()
        self.config_maps[body["metadata"]["name"]] = body
        self.reply(200, body)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        if parts[-1] == "jobs":  # list, by label selector
            wanted = dict(kv.split("=", 1) for kv in parse_qs(url.query)["labelSelector"][0].split(","))
            items = [j for j in self.jobs.values() if wanted.items() <= j["metadata"].get("labels", {}).items()]
            self.reply(200, {"kind": "JobList", "apiVersion": "batch/v1", "metadata": {}, "items": items})
            return
        name = parts[-1]
        job = self.jobs.get(name)
        if job is None:
            self.not_found(name)
            return
        job["status"] = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
        if job["spec"].get("ttlSecondsAfterFinished", float("inf")) < POLL_S:
            del self.jobs[name]  # gone before this read came
            self.not_found(name)
            return
        self.reply(200, job)


@pytest.fixture()
def cluster() -> Iterator[tuple[ClusterJobs, type[Cluster]]]:
    handler = type("Api", (Cluster,), {"jobs": {}, "created": [], "config_maps": {}})
    with serving(handler) as url:
        configuration = client.Configuration()
        configuration.host = url
        yield ClusterJobs(JobBackend(client.ApiClient(configuration))), handler


def test_a_job_with_a_short_ttl_is_trained_once_and_its_outcome_read(
    tmp_path: Path, cluster: tuple[ClusterJobs, type[Cluster]]
) -> None:
    """ttlSecondsAfterFinished: 0 (the chart's schema allows it; a common "clean up at once") deleted the
    finished Job before the controller read it: HTTP 404, the controller crashed, and on restart found no
    Job of the model, so trained it again from the start, and again after each restart."""
    jobs, api = cluster
    for _restart in range(2):
        models = K8sModels(settings(tmp_path, ttl_seconds_after_finished=0), tmp_path, backend=jobs)
        handle = models.train("gold", PAIRS, [], tmp_path / "models")
        assert handle.path == str(tmp_path / "models" / "gold" / "final")
    assert len(api.created) == 1, f"trained {len(api.created)} times: {api.created}"


# --- a pod evicted, preempted, or on a drained node ----------------------------------------------

DISRUPTION_IGNORED = {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}


def test_an_evicted_or_preempted_pod_is_replaced_and_does_not_fail_the_job() -> None:
    """backoffLimit 0 (the chart's default) and no podFailurePolicy: the first node drain, preemption or
    eviction of the training pod failed the whole Job, and the controller's step with it."""
    spec = TrainingJobSpec(name="run-1", image="i", config_map="c", backoff_limit=0)
    for nodes in (1, 3):
        job = to_manifest(build_training_job(spec.model_copy(update={"nodes": nodes})))
        assert DISRUPTION_IGNORED in job["spec"].get("podFailurePolicy", {}).get("rules", [])
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"  # what podFailurePolicy requires
        kubernetes_validate.validate(job, "1.30", strict=True)


@needs_helm
def test_the_charts_cronjob_job_also_survives_an_eviction() -> None:
    proc = subprocess.run(
        [str(HELM), "template", "rel", str(CHART), "--namespace", "ml", "-f", str(CHART / "ci" / "base-values.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    cron = next(d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] == "CronJob")
    rules = cron["spec"]["jobTemplate"]["spec"].get("podFailurePolicy", {}).get("rules", [])
    assert DISRUPTION_IGNORED in rules


# --- a model whose every attempt fails --------------------------------------------------------------


class FakeJobs:
    """The ClusterJobs surface K8sModels uses: Jobs in memory; every submitted Job fails (OOM, bad image)."""

    def __init__(self, run_s: float = 0.0) -> None:
        self.jobs: list[tuple[str, dict[str, str], str]] = []
        self.submitted: list[str] = []
        self.waited: list[float] = []
        self.run_s = run_s

    def find(self, namespace: str, labels: dict[str, str]) -> list[tuple[str, str]]:
        return [(name, status) for name, have, status in self.jobs if labels.items() <= have.items()]

    def apply_config_map(self, manifest: dict[str, Any]) -> None:
        pass

    def submit(self, spec: Any) -> None:
        self.submitted.append(spec.name)
        self.jobs.append((spec.name, dict(spec.labels), "Failed" if not self.run_s else "Active"))

    def wait(self, namespace: str, name: str, timeout_s: float) -> str:
        self.waited.append(timeout_s)
        if timeout_s < self.run_s:  # as JobBackend.wait: the deadline passes while the Job still runs
            raise TimeoutError(f"Job {namespace}/{name} did not finish within {timeout_s:g}s")
        return "Complete" if self.run_s else "Failed"


def test_a_model_whose_attempts_all_fail_stops_submitting_jobs(tmp_path: Path) -> None:
    """Each controller restart (the Deployment restarts it after the step's error) started one more attempt:
    a deterministic failure (OOM at load, a bad image) made a new GPU Job every few minutes, without bound."""
    jobs = FakeJobs()
    for _restart in range(6):
        models = K8sModels(settings(tmp_path), tmp_path, backend=jobs)
        with pytest.raises(RuntimeError) as failed:
            models.train("final", PAIRS, [], tmp_path / "models")
    assert len(jobs.submitted) == 3, jobs.submitted
    # The last error says what happened and names the Jobs to look at.
    assert "3 attempts" in str(failed.value) and jobs.submitted[-1] in str(failed.value)


# --- a Job that trains for longer than the controller waited ----------------------------------------


def test_a_long_training_job_is_waited_for_not_timed_out(tmp_path: Path) -> None:
    """The controller waited 6 h for each Job, then raised TimeoutError while the Job trained on: a final RM
    on the paper's 40M pairs takes days, so it crashed and adopted the same Job again every 6 h, each time
    with an error saying the Job had not finished in time."""
    jobs = FakeJobs(run_s=3 * 24 * 3600.0)
    handle = K8sModels(settings(tmp_path), tmp_path, backend=jobs).train("final", PAIRS, [], tmp_path / "models")
    assert handle.path == str(tmp_path / "models" / "final" / "final") and len(jobs.submitted) == 1
