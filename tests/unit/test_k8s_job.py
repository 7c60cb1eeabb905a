"""training/k8s_job.py: the pure Job builder, spec validation, the submit CLI, and the API backend.

The backend tests talk real HTTP, through the kubernetes client, to a small loopback server
that answers the few batch/v1 and core/v1 calls the backend makes the way the API server
does (201 on create, 409 on a name taken, Status bodies, Job conditions).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes import client
from pydantic import ValidationError

from synpref.training.k8s_job import (
    JobBackend,
    JobError,
    TrainingJobSpec,
    build_rendezvous_service,
    build_training_job,
    load_spec,
    main_submit,
    to_manifest,
    training_command,
    validate_timeout,
)
from testing.json_api import JsonHandler, serving

LABELS = {"app.kubernetes.io/instance": "rel", "app.kubernetes.io/name": "synpref"}


def make_spec(**overrides: Any) -> TrainingJobSpec:
    base: dict[str, Any] = {
        "name": "run-1",
        "namespace": "ml",
        "image": "synpref-cuda:0.1.0",
        "config_map": "rel-synpref-config",
        "resources": {"requests": {"cpu": "4", "memory": "32Gi"}, "limits": {"memory": "64Gi"}},
        "data_claim": "rel-synpref-data",
        "rendezvous_service": "rel-synpref-train",
        "labels": LABELS,
    }
    return TrainingJobSpec(**{**base, **overrides})


def pod_of(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]


def test_single_gpu_job_runs_synpref_train_with_hardening_and_gpu_limit() -> None:
    job = to_manifest(build_training_job(make_spec(gpus_per_node=1)))
    pod = pod_of(job)
    (container,) = pod["containers"]
    assert container["command"] == ["synpref", "train", "--config", "/etc/synpref/train.yaml"]
    assert container["resources"]["limits"] == {"memory": "64Gi", "nvidia.com/gpu": "1"}
    assert container["resources"]["requests"] == {"cpu": "4", "memory": "32Gi"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert pod["restartPolicy"] == "Never"
    assert "subdomain" not in pod and "completionMode" not in job["spec"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"config": "/etc/synpref", "tmp": "/tmp", "shm": "/dev/shm", "data": "/data"}
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["rel-synpref-data"]
    assert job["metadata"] == {"name": "run-1", "namespace": "ml", "labels": LABELS}
    assert job["spec"]["template"]["metadata"]["labels"] == {**LABELS, "app.kubernetes.io/component": "train"}


def test_multi_node_job_is_indexed_with_rendezvous_on_pod_zero() -> None:
    spec = make_spec(nodes=4, gpus_per_node=8)
    job = to_manifest(build_training_job(spec))
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    pod = pod_of(job)
    assert pod["subdomain"] == "rel-synpref-train"
    (container,) = pod["containers"]
    cmd = container["command"]
    assert cmd[:3] == ["torchrun", "--nproc-per-node", "8"]
    assert cmd[cmd.index("--nnodes") + 1] == "4"
    assert cmd[cmd.index("--rdzv-backend") + 1] == "c10d"
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == "$(SYNPREF_JOB_NAME)-0.rel-synpref-train:29400"
    assert cmd[-4:] == ["-m", "synpref.training.cli", "--config", "/etc/synpref/train.yaml"]
    # The job name in $(SYNPREF_JOB_NAME) comes from the pod's own label, so a Job
    # cloned from the CronJob under any name finds its pod 0.
    (job_name_env,) = [e for e in container["env"] if e["name"] == "SYNPREF_JOB_NAME"]
    assert job_name_env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
    assert container["ports"] == [{"name": "rendezvous", "containerPort": 29400}]


def test_rendezvous_service_is_headless_and_selects_the_training_pods() -> None:
    spec = make_spec(nodes=2)
    svc = to_manifest(build_rendezvous_service(spec))
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    pod_labels = to_manifest(build_training_job(spec))["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["metadata"]["name"] == pod_of(to_manifest(build_training_job(spec)))["subdomain"]


@pytest.mark.parametrize(
    ("nodes", "gpus", "expected_head"),
    [
        (1, 0, ["synpref", "train"]),
        (1, 1, ["synpref", "train"]),
        (1, 4, ["torchrun", "--nproc-per-node", "4", "--standalone"]),
        (3, 2, ["torchrun", "--nproc-per-node", "2", "--nnodes", "3"]),
    ],
)
def test_training_command_by_shape(nodes: int, gpus: int, expected_head: list[str]) -> None:
    cmd = training_command(make_spec(nodes=nodes, gpus_per_node=gpus))
    assert cmd[: len(expected_head)] == expected_head
    assert cmd[-2:] == ["--config", "/etc/synpref/train.yaml"]


def test_cpu_job_asks_for_no_gpu_and_no_pvc_when_unset() -> None:
    job = to_manifest(build_training_job(make_spec(gpus_per_node=0, data_claim=None)))
    (container,) = pod_of(job)["containers"]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert all("persistentVolumeClaim" not in v for v in pod_of(job)["volumes"])
    assert "/data" not in {m["mountPath"] for m in container["volumeMounts"]}


def test_integer_quantities_become_strings_like_the_api_returns_them() -> None:
    spec = make_spec(resources={"requests": {"cpu": 4, "memory": "1Gi"}, "limits": {"cpu": 8}})
    (container,) = pod_of(to_manifest(build_training_job(spec)))["containers"]
    assert container["resources"]["requests"]["cpu"] == "4"
    assert container["resources"]["limits"]["cpu"] == "8"


def test_tolerations_node_selector_env_and_secrets_pass_through() -> None:
    spec = make_spec(
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 60}],
        node_selector={"pool": "h100"},
        env=[{"name": "NCCL_DEBUG", "value": "WARN"}],
        env_from_secrets=["object-store"],
        image_pull_secrets=["registry"],
        active_deadline_seconds=3600,
    )
    job = to_manifest(build_training_job(spec))
    pod = pod_of(job)
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 60}
    ]
    assert pod["nodeSelector"] == {"pool": "h100"}
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    (container,) = pod["containers"]
    assert {"name": "NCCL_DEBUG", "value": "WARN"} in container["env"]
    assert container["envFrom"] == [{"secretRef": {"name": "object-store"}}]
    assert job["spec"]["activeDeadlineSeconds"] == 3600


@pytest.mark.parametrize("shape", [{"nodes": 1}, {"nodes": 3, "gpus_per_node": 8}])
def test_built_objects_validate_against_kubernetes_schemas(shape: dict[str, int]) -> None:
    spec = make_spec(**shape)
    for obj in (build_training_job(spec), build_rendezvous_service(spec)):
        kubernetes_validate.validate(to_manifest(obj), "1.33", strict=True)


@pytest.mark.parametrize(
    "bad",
    [
        {"nodes": 0},
        {"gpus_per_node": -1},
        {"name": "x" * 53},
        {"unknown_field": 1},
        {"image_pull_policy": "Sometimes"},
        {"tolerations": [{"effect": "Sometimes"}]},
    ],
)
def test_spec_rejects_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        make_spec(**bad)


@pytest.mark.parametrize("timeout", [0, -1, math.inf, math.nan, True, "10", 8 * 24 * 3600])
def test_validate_timeout_rejects(timeout: Any) -> None:
    with pytest.raises(ValueError):
        validate_timeout(timeout)


def test_validate_timeout_accepts_seconds() -> None:
    assert validate_timeout(30) == 30.0


def write_spec(tmp_path: Path, **overrides: Any) -> Path:
    data = make_spec(**overrides).model_dump(mode="json", exclude={"name"})
    path = tmp_path / "train-job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_load_spec_applies_overrides_and_skips_none(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path), name="r2", nodes=2, image=None)
    assert (spec.name, spec.nodes, spec.image) == ("r2", 2, "synpref-cuda:0.1.0")


def test_submit_dry_run_prints_service_and_indexed_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec_file = write_spec(tmp_path)
    assert main_submit(["run-7", "--spec", str(spec_file), "--nodes", "2", "--dry-run"]) == 0
    service, job = yaml.safe_load_all(capsys.readouterr().out)
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    assert job["kind"] == "Job" and job["metadata"]["name"] == "run-7"
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2


def test_submit_reports_bad_input_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main_submit(["run-1", "--spec", str(tmp_path / "missing.yaml"), "--dry-run"]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("image: x\nconfig_map: y\nnodes: 0\n")
    assert main_submit(["run-1", "--spec", str(bad), "--dry-run"]) == 2
    spec_file = write_spec(tmp_path)
    assert main_submit(["run-1", "--spec", str(spec_file), "--wait", "--timeout", "-5"]) == 2
    assert "nodes" in capsys.readouterr().err


# --- the backend, over HTTP to a loopback stand-in for the API server ---------------------


class FakeApi(JsonHandler):
    """Keeps created Jobs and Services; Jobs finish as `outcome` after `polls_to_finish` reads."""

    jobs: dict[str, dict[str, Any]]
    services: dict[str, dict[str, Any]]
    calls: list[tuple[str, str]]
    outcome = "Complete"
    polls_to_finish = 2
    forbid_jobs = False

    def status(self, code: int, reason: str, message: str) -> None:
        self.reply(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                          "message": message, "code": code})  # fmt: skip

    def do_POST(self) -> None:
        self.calls.append(("POST", self.path))
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        name = body["metadata"]["name"]
        store = self.jobs if "/jobs" in self.path else self.services
        if self.forbid_jobs and store is self.jobs:
            self.status(403, "Forbidden", "jobs.batch is forbidden")
        elif name in store:
            self.status(409, "AlreadyExists", f'"{name}" already exists')
        else:
            store[name] = {**body, "status": {}, "_polls": 0}
            self.reply(201, body)

    def do_GET(self) -> None:
        self.calls.append(("GET", self.path))
        parts = self.path.split("?")[0].strip("/").split("/")
        if "services" in parts:
            name = parts[parts.index("services") + 1]
            if name in self.services:
                self.reply(200, self.services[name])
            else:
                self.status(404, "NotFound", f'services "{name}" not found')
            return
        if parts[-1] == "status":
            # As the chart's controller Role: `get` on jobs, not on the jobs/status subresource.
            self.status(403, "Forbidden", 'cannot get resource "jobs/status" in API group "batch"')
            return
        name = parts[parts.index("jobs") + 1]
        job = self.jobs.get(name)
        if job is None:
            self.status(404, "NotFound", f'jobs.batch "{name}" not found')
            return
        job["_polls"] += 1
        if job["_polls"] >= self.polls_to_finish:
            job["status"] = {"conditions": [{"type": self.outcome, "status": "True"}]}
        self.reply(200, {k: v for k, v in job.items() if k != "_polls"})


@pytest.fixture()
def api() -> Iterator[tuple[JobBackend, type[FakeApi]]]:
    handler = type("Api", (FakeApi,), {"jobs": {}, "services": {}, "calls": []})
    with serving(handler) as url:
        configuration = client.Configuration()
        configuration.host = url
        yield JobBackend(client.ApiClient(configuration)), handler


def test_backend_submits_single_node_job_without_service(api: tuple[JobBackend, type[FakeApi]]) -> None:
    backend, handler = api
    backend.submit(make_spec())
    assert list(handler.jobs) == ["run-1"]
    assert handler.calls == [("POST", "/apis/batch/v1/namespaces/ml/jobs")]
    sent = {k: v for k, v in handler.jobs["run-1"].items() if k not in ("status", "_polls")}
    assert sent == to_manifest(build_training_job(make_spec()))


def test_backend_creates_rendezvous_service_once_for_multi_node(api: tuple[JobBackend, type[FakeApi]]) -> None:
    backend, handler = api
    backend.submit(make_spec(nodes=2))
    backend.submit(make_spec(name="run-2", nodes=2))
    assert list(handler.services) == ["rel-synpref-train"]
    assert list(handler.jobs) == ["run-1", "run-2"]
    assert handler.calls.count(("POST", "/api/v1/namespaces/ml/services")) == 1


def test_backend_names_namespace_and_job_in_api_errors(api: tuple[JobBackend, type[FakeApi]]) -> None:
    backend, handler = api
    backend.submit(make_spec())
    with pytest.raises(JobError, match=r"creating Job ml/run-1 failed: HTTP 409"):
        backend.submit(make_spec())
    handler.forbid_jobs = True
    with pytest.raises(JobError, match=r"Job ml/run-9 failed: HTTP 403"):
        backend.submit(make_spec(name="run-9"))


def test_backend_rejects_missing_or_bad_names_before_calling(api: tuple[JobBackend, type[FakeApi]]) -> None:
    backend, handler = api
    for name in ("", "Run_1"):
        with pytest.raises(ValueError, match="DNS label"):
            backend.submit(make_spec(name=name))
    assert handler.calls == []


@pytest.mark.parametrize("outcome", ["Complete", "Failed"])
def test_backend_wait_returns_the_final_condition(api: tuple[JobBackend, type[FakeApi]], outcome: str) -> None:
    backend, handler = api
    handler.outcome = outcome
    backend.submit(make_spec())
    assert backend.wait("ml", "run-1", timeout_s=5, poll_s=0.01) == outcome


def test_backend_wait_times_out_and_reports_missing_jobs(api: tuple[JobBackend, type[FakeApi]]) -> None:
    backend, handler = api
    handler.polls_to_finish = 10**9
    backend.submit(make_spec())
    with pytest.raises(TimeoutError, match="ml/run-1"):
        backend.wait("ml", "run-1", timeout_s=0.2, poll_s=0.02)
    with pytest.raises(JobError, match=r"reading Job ml/nope failed: HTTP 404"):
        backend.wait("ml", "nope", timeout_s=1, poll_s=0.01)
    with pytest.raises(ValueError):
        backend.wait("ml", "run-1", timeout_s=math.nan)
