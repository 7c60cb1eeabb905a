"""Training runs as Kubernetes Jobs: one pure builder, a thin API backend, `synpref train submit`.

The Helm chart renders the same Job twice from one set of values: as the jobTemplate of the suspended CronJob
`<release>-train` (for `kubectl create job --from=cronjob/...`) and as a spec file (`train-job.yaml` in the release
ConfigMap) that `synpref train submit` reads and hands to `build_training_job`. tests/integration/test_chart.py renders
both and proves the two Jobs equal, so the chart template and this builder cannot drift apart silently.

One node with one GPU runs `synpref train`; more GPUs or nodes run torchrun. Multi-node is an Indexed Job whose pods
share the subdomain of a headless Service, so pod 0 is reachable at `<job>-0.<service>` and serves the c10d rendezvous.
The job name comes from the pod's own `batch.kubernetes.io/job-name` label, which is what lets a Job cloned from the
CronJob under any name find its own pod 0.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Literal

import urllib3
import yaml
from kubernetes import client
from kubernetes.config.config_exception import ConfigException
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from synpref.training import k8s_api
from synpref.training.k8s_api import TRANSIENT_STATUSES, JobError, bounded, to_manifest

DEFAULT_SPEC_PATH = "/etc/synpref/train-job.yaml"
"""Where the chart mounts the spec file rendered from its `training` values."""
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
CONTAINER_NAME = "train"
MAX_WAIT_S = 7 * 24 * 3600.0
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class Toleration(BaseModel):
    """A Kubernetes pod toleration (fields as in the pod spec; tolerationSeconds may be given by its API name)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, alias="tolerationSeconds")


class EnvVar(BaseModel):
    """One environment variable set in the training container."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    value: str


class SecurityContext(BaseModel):
    """The identity the pod runs as; everything else in the hardening is fixed, not configurable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_as_user: int = Field(default=10001, ge=1)
    run_as_group: int = Field(default=10001, ge=1)
    fs_group: int = Field(default=10001, ge=1)


class TrainingJobSpec(BaseModel):
    """Everything that decides the shape of a training Job (the chart renders it from values)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="", max_length=52)
    """Job name; required at submit time. At most 52 characters, since pods append -<index>-<hash>."""
    namespace: str = "default"
    image: str
    """CUDA training image (docker/cuda.Dockerfile)."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list)
    config_map: str
    """ConfigMap holding the training config under `config_key`; mounted read-only at config_dir."""
    config_key: str = "train.yaml"
    config_dir: str = "/etc/synpref"
    nodes: int = Field(default=1, ge=1, le=1024)
    gpus_per_node: int = Field(default=1, ge=0, le=64)
    gpu_resource_name: str = "nvidia.com/gpu"
    resources: dict[str, dict[str, str | int | float]] = Field(default_factory=dict)
    """Container requests/limits for cpu and memory; the GPU limit is added from gpus_per_node.
    Numbers are allowed because the chart's schema allows them (`cpu: 0.5` in values)."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    service_account: str = "default"
    """Used only for its name: the training pod gets no API token (it never calls the API)."""
    data_claim: str | None = None
    """PersistentVolumeClaim with datasets and checkpoints, mounted at data_mount_path; None = no PVC."""
    data_mount_path: str = "/data"
    shm_size: str = "8Gi"
    """Size of the in-memory /dev/shm that NCCL and DataLoader workers need."""
    env: list[EnvVar] = Field(default_factory=list)
    env_from_secrets: list[str] = Field(default_factory=list)
    """Existing Secrets whose keys become environment variables (object-store credentials, tokens)."""
    backoff_limit: int = Field(default=0, ge=0)
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)
    active_deadline_seconds: int | None = Field(default=None, ge=1)
    rendezvous_service: str = "synpref-train"
    """Headless Service whose DNS subdomain the pods of a multi-node Job share."""
    rendezvous_port: int = Field(default=29400, ge=1, le=65535)
    labels: dict[str, str] = Field(default_factory=dict)
    """Labels on the Job; the pods get them too, plus app.kubernetes.io/component=train."""
    security: SecurityContext = SecurityContext()

    @property
    def multi_node(self) -> bool:
        """True when the Job spans more than one node (it then needs the rendezvous Service)."""
        return self.nodes > 1

    def pod_labels(self) -> dict[str, str]:
        """The pod's labels: the spec's labels plus `app.kubernetes.io/component: train`."""
        return {**self.labels, "app.kubernetes.io/component": "train"}

    def service_selector(self) -> dict[str, str]:
        """Selects the training pods of this release, whatever the Job they belong to."""
        selector = {"app.kubernetes.io/component": "train"}
        if "app.kubernetes.io/instance" in self.labels:
            selector["app.kubernetes.io/instance"] = self.labels["app.kubernetes.io/instance"]
        return selector


def load_spec(path: str | Path, **overrides: Any) -> TrainingJobSpec:
    """Read a spec file (YAML) and apply overrides such as name= or nodes=."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a training job spec is a mapping, not {type(data).__name__}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return TrainingJobSpec(**data)


def training_command(spec: TrainingJobSpec) -> list[str]:
    """The container command: plain `synpref train` on one GPU, torchrun otherwise."""
    config = f"{spec.config_dir.rstrip('/')}/{spec.config_key}"
    if not spec.multi_node and spec.gpus_per_node <= 1:
        return ["synpref", "train", "--config", config]
    launcher = ["torchrun", "--nproc-per-node", str(max(spec.gpus_per_node, 1))]
    if spec.multi_node:
        # $(SYNPREF_JOB_NAME) is expanded by the kubelet from the env var below.
        endpoint = f"$(SYNPREF_JOB_NAME)-0.{spec.rendezvous_service}:{spec.rendezvous_port}"
        launcher += [
            "--nnodes",
            str(spec.nodes),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            endpoint,
            "--rdzv-id",
            "$(SYNPREF_JOB_NAME)",
        ]
    else:
        launcher += ["--standalone"]
    return [*launcher, "-m", "synpref.training.cli", "--config", config]


def _container(spec: TrainingJobSpec) -> client.V1Container:
    # Quantities travel as strings ("4", "64Gi"), as the API server returns them.
    limits = {k: str(v) for k, v in spec.resources.get("limits", {}).items()}
    if spec.gpus_per_node:
        limits[spec.gpu_resource_name] = str(spec.gpus_per_node)
    requests = {k: str(v) for k, v in spec.resources.get("requests", {}).items()}
    env = [
        client.V1EnvVar(
            name="SYNPREF_JOB_NAME",
            value_from=client.V1EnvVarSource(
                field_ref=client.V1ObjectFieldSelector(field_path=f"metadata.labels['{JOB_NAME_LABEL}']")
            ),
        ),
        # The root filesystem is read-only: caches and home go to the /tmp emptyDir.
        client.V1EnvVar(name="HOME", value="/tmp"),
        client.V1EnvVar(name="HF_HOME", value="/tmp/hf"),
        *(client.V1EnvVar(name=e.name, value=e.value) for e in spec.env),
    ]
    mounts = [
        client.V1VolumeMount(name="config", mount_path=spec.config_dir, read_only=True),
        client.V1VolumeMount(name="tmp", mount_path="/tmp"),
        client.V1VolumeMount(name="shm", mount_path="/dev/shm"),
    ]
    if spec.data_claim:
        mounts.append(client.V1VolumeMount(name="data", mount_path=spec.data_mount_path))
    return client.V1Container(
        name=CONTAINER_NAME,
        image=spec.image,
        image_pull_policy=spec.image_pull_policy,
        command=training_command(spec),
        env=env,
        env_from=[client.V1EnvFromSource(secret_ref=client.V1SecretEnvSource(name=s)) for s in spec.env_from_secrets]
        or None,
        ports=[client.V1ContainerPort(name="rendezvous", container_port=spec.rendezvous_port)]
        if spec.multi_node
        else None,
        resources=client.V1ResourceRequirements(limits=limits or None, requests=requests or None),
        security_context=client.V1SecurityContext(
            allow_privilege_escalation=False,
            read_only_root_filesystem=True,
            run_as_non_root=True,
            capabilities=client.V1Capabilities(drop=["ALL"]),
        ),
        volume_mounts=mounts,
    )


def _volumes(spec: TrainingJobSpec) -> list[client.V1Volume]:
    volumes = [
        client.V1Volume(name="config", config_map=client.V1ConfigMapVolumeSource(name=spec.config_map)),
        client.V1Volume(name="tmp", empty_dir=client.V1EmptyDirVolumeSource()),
        client.V1Volume(name="shm", empty_dir=client.V1EmptyDirVolumeSource(medium="Memory", size_limit=spec.shm_size)),
    ]
    if spec.data_claim:
        volumes.append(
            client.V1Volume(
                name="data",
                persistent_volume_claim=client.V1PersistentVolumeClaimVolumeSource(claim_name=spec.data_claim),
            )
        )
    return volumes


def build_training_job(spec: TrainingJobSpec) -> client.V1Job:
    """The training Job for `spec`: pure, no API calls (an unnamed spec gives an unnamed Job)."""
    pod = client.V1PodSpec(
        restart_policy="Never",
        service_account_name=spec.service_account,
        automount_service_account_token=False,
        node_selector=spec.node_selector or None,
        tolerations=[client.V1Toleration(**t.model_dump(exclude_none=True)) for t in spec.tolerations] or None,
        image_pull_secrets=[client.V1LocalObjectReference(name=s) for s in spec.image_pull_secrets] or None,
        security_context=client.V1PodSecurityContext(
            run_as_non_root=True,
            run_as_user=spec.security.run_as_user,
            run_as_group=spec.security.run_as_group,
            fs_group=spec.security.fs_group,
            seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault"),
        ),
        subdomain=spec.rendezvous_service if spec.multi_node else None,
        containers=[_container(spec)],
        volumes=_volumes(spec),
    )
    # Evicted, preempted or drained pods are made again, not counted: with backoffLimit 0 a node upgrade failed the run.
    disruption = client.V1PodFailurePolicyOnPodConditionsPattern(type="DisruptionTarget", status="True")
    ignore = client.V1PodFailurePolicyRule(action="Ignore", on_pod_conditions=[disruption])
    job_spec = client.V1JobSpec(
        backoff_limit=spec.backoff_limit,
        pod_failure_policy=client.V1PodFailurePolicy(rules=[ignore]),
        ttl_seconds_after_finished=spec.ttl_seconds_after_finished,
        active_deadline_seconds=spec.active_deadline_seconds,
        template=client.V1PodTemplateSpec(metadata=client.V1ObjectMeta(labels=spec.pod_labels()), spec=pod),
    )
    if spec.multi_node:
        job_spec.completion_mode = "Indexed"
        job_spec.completions = spec.nodes
        job_spec.parallelism = spec.nodes
    return client.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=client.V1ObjectMeta(name=spec.name or None, namespace=spec.namespace, labels=spec.labels or None),
        spec=job_spec,
    )


def build_rendezvous_service(spec: TrainingJobSpec) -> client.V1Service:
    """Headless Service giving each pod of a multi-node Job a DNS name before it is ready."""
    return client.V1Service(
        api_version="v1",
        kind="Service",
        metadata=client.V1ObjectMeta(
            name=spec.rendezvous_service, namespace=spec.namespace, labels=spec.pod_labels() or None
        ),
        spec=client.V1ServiceSpec(
            cluster_ip="None",
            publish_not_ready_addresses=True,
            selector=spec.service_selector(),
            ports=[client.V1ServicePort(name="rendezvous", port=spec.rendezvous_port, target_port="rendezvous")],
        ),
    )


def validate_timeout(timeout_s: float) -> float:
    """`timeout_s` as a float; ValueError unless it is a finite number in (0, MAX_WAIT_S]."""
    if not isinstance(timeout_s, int | float) or isinstance(timeout_s, bool) or not math.isfinite(timeout_s):
        raise ValueError(f"timeout must be a finite number of seconds, got {timeout_s!r}")
    if not 0 < timeout_s <= MAX_WAIT_S:
        raise ValueError(f"timeout must be in (0, {MAX_WAIT_S:.0f}] seconds, got {timeout_s}")
    return float(timeout_s)


class JobBackend:
    """Thin layer over the batch/v1 and core/v1 APIs; every failure names namespace/name."""

    def __init__(self, api_client: client.ApiClient) -> None:
        api_client = bounded(api_client)  # every call of the backend, and of ClusterJobs over it
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)

    @classmethod
    def connect(cls, kubeconfig: str | None = None, context: str | None = None) -> JobBackend:
        """In-cluster credentials when running in a pod, otherwise the kube config file."""
        from synpref.shared.kube import api_client

        return cls(api_client(kubeconfig, context))

    @staticmethod
    def _error(action: str, kind: str, namespace: str, name: str, exc: client.ApiException) -> JobError:
        why = f"{action} {kind} {namespace}/{name} failed: HTTP {exc.status} {exc.reason}: {exc.body or ''}"
        return JobError(why, exc.status, exc.status in TRANSIENT_STATUSES)

    def _unreachable(self, action: str, kind: str, namespace: str, name: str, exc: Exception) -> JobError:
        host, reason = self.batch.api_client.configuration.host, getattr(exc, "reason", None) or exc
        why = f"{action} {kind} {namespace}/{name} failed: API server {host} unreachable: {reason}"
        return JobError(why, transient=True)

    def ensure_rendezvous_service(self, spec: TrainingJobSpec) -> None:
        """Create the headless Service unless it exists (the chart creates it for multi-node values)."""
        name = spec.rendezvous_service
        try:
            self.core.read_namespaced_service(name, spec.namespace)
            return
        except client.ApiException as exc:
            if exc.status != 404:
                raise self._error("reading", "Service", spec.namespace, name, exc) from exc
        except urllib3.exceptions.HTTPError as exc:
            raise self._unreachable("reading", "Service", spec.namespace, name, exc) from exc
        try:
            self.core.create_namespaced_service(spec.namespace, build_rendezvous_service(spec))
        except client.ApiException as exc:
            if exc.status != 409:  # created meanwhile by another submit: fine
                raise self._error("creating", "Service", spec.namespace, name, exc) from exc
        except urllib3.exceptions.HTTPError as exc:
            raise self._unreachable("creating", "Service", spec.namespace, name, exc) from exc

    def submit(self, spec: TrainingJobSpec) -> client.V1Job:
        """Create the training Job (and, for a multi-node one, its rendezvous Service first).

        Raises ValueError for a name that is no DNS label, JobError when the API refuses.
        """
        if not spec.name or not _DNS_LABEL.match(spec.name):
            raise ValueError(f"a Job name is a DNS label (lowercase letters, digits, '-'), got {spec.name!r}")
        if spec.multi_node:
            self.ensure_rendezvous_service(spec)
        try:
            return self.batch.create_namespaced_job(spec.namespace, build_training_job(spec))
        except client.ApiException as exc:
            raise self._error("creating", "Job", spec.namespace, spec.name, exc) from exc
        except urllib3.exceptions.HTTPError as exc:
            # Connection refused, DNS, TLS: the CLI prints one line naming the server, not a traceback.
            raise self._unreachable("creating", "Job", spec.namespace, spec.name, exc) from exc

    def wait(self, namespace: str, name: str, timeout_s: float, poll_s: float = 5.0) -> str:
        """Poll until the Job completes or fails; returns "Complete" or "Failed".

        A wait lasts hours: an API server that is briefly away (restart, upgrade, 5xx, 429, a dropped
        connection) is polled again until the deadline; a missing or forbidden Job fails at once.
        """
        deadline = time.monotonic() + validate_timeout(timeout_s)
        last_error = ""
        while True:
            remaining = deadline - time.monotonic()
            try:
                # The Job itself carries its status: `get` on jobs, which the chart's controller Role
                # grants; read_namespaced_job_status needs jobs/status as well (403 on the cluster).
                # Bounded: without a request timeout a stalled connection blocks past any deadline.
                job = self.batch.read_namespaced_job(
                    name, namespace, _request_timeout=min(max(remaining, 1.0), k8s_api.REQUEST_TIMEOUT_S)
                )
            except client.ApiException as exc:
                if exc.status == 404:  # ttlSecondsAfterFinished 0, or a person: not a bare 404 and its JSON body
                    gone = "the Job was deleted (its ttlSecondsAfterFinished, or someone) before its outcome was read"
                    raise JobError(f"reading Job {namespace}/{name} failed: HTTP 404 Not Found: {gone}", 404) from exc
                if exc.status not in TRANSIENT_STATUSES:
                    raise self._error("reading", "Job", namespace, name, exc) from exc
                last_error = f"; last error: HTTP {exc.status} {exc.reason}"
            except urllib3.exceptions.HTTPError as exc:
                last_error = f"; last error: {type(exc).__name__}: {exc}"
            else:
                last_error = ""
                for cond in (job.status and job.status.conditions) or []:
                    if cond.status == "True" and cond.type in ("Complete", "Failed"):
                        return str(cond.type)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"Job {namespace}/{name} did not finish within {timeout_s:g}s{last_error}")
            time.sleep(min(poll_s, remaining))


def main_submit(argv: list[str]) -> int:
    """`synpref train submit NAME`: create the chart's training Job through the API."""
    parser = argparse.ArgumentParser(prog="synpref train submit", description=main_submit.__doc__)
    parser.add_argument("name", help="name of the Job to create (a DNS label)")
    parser.add_argument(
        "--spec",
        default=os.environ.get("SYNPREF_TRAIN_JOB_SPEC", DEFAULT_SPEC_PATH),
        help="job spec file rendered by the chart (default: $SYNPREF_TRAIN_JOB_SPEC or %(default)s)",
    )
    parser.add_argument("--namespace", help="override the spec's namespace")
    parser.add_argument("--nodes", type=int, help="override the number of nodes (>1 = indexed Job + torchrun)")
    parser.add_argument("--gpus-per-node", type=int, help="override GPUs per node")
    parser.add_argument("--image", help="override the training image")
    parser.add_argument("--kubeconfig", help="kube config file (default: in-cluster, then ~/.kube/config)")
    parser.add_argument("--context", help="kube config context")
    parser.add_argument("--dry-run", action="store_true", help="print the Job (and Service) as YAML; create nothing")
    parser.add_argument("--wait", action="store_true", help="wait for the Job to finish")
    parser.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds to wait (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.wait:
            validate_timeout(args.timeout)
        spec = load_spec(
            args.spec,
            name=args.name,
            namespace=args.namespace,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            image=args.image,
        )
    except (OSError, ValueError, ValidationError) as exc:
        print(f"synpref train submit: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        docs = [to_manifest(build_training_job(spec))]
        if spec.multi_node:
            docs.insert(0, to_manifest(build_rendezvous_service(spec)))
        print(yaml.safe_dump_all(docs, sort_keys=False), end="")
        return 0
    try:
        backend = JobBackend.connect(args.kubeconfig, args.context)
        backend.submit(spec)
        print(f"created Job {spec.namespace}/{spec.name} ({spec.nodes} node(s) x {spec.gpus_per_node} GPU(s))")
        if not args.wait:
            return 0
        outcome = backend.wait(spec.namespace, spec.name, args.timeout)
    except (JobError, TimeoutError, ValueError, ConfigException) as exc:
        # ConfigException: no kube config and not in a pod, or a context that is not in it.
        print(f"synpref train submit: {exc}", file=sys.stderr)
        return 1
    print(f"Job {spec.namespace}/{spec.name}: {outcome}")
    return 0 if outcome == "Complete" else 1
