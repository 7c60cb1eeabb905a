"""Reward models trained as Kubernetes Jobs (controller.training = k8s): K8sModels and the
cluster calls it makes (ClusterJobs)."""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from synpref.services.controller import job_pods
from synpref.services.controller.models import FullModels, ModelHandle, Pair, accuracy
from synpref.services.controller.run_folders import claim_folder, run_id
from synpref.shared.retry import backoff_pauses

RUN_LABEL = "synpref.io/run"
MODEL_LABEL = "synpref.io/model"
MAX_FAILED_ATTEMPTS = 3
"""Failed Jobs of a model after which no new attempt starts: each restart of the controller would start one."""
MIN_TTL_S = 24 * 3600
"""Least ttlSecondsAfterFinished of the controller's Jobs: a finished Job must outlive the controller's next
read of it, and a restart of the controller, or its model is trained again (TTL 0 deletes it before a read)."""
FIND_WAIT_S = 900.0
"""Longest ClusterJobs asks again an API server answering a transient error (a control-plane upgrade): in each
look-up of the Jobs, each write of a ConfigMap, each create of a Job."""
log = logging.getLogger(__name__)
T = TypeVar("T")


def dns_part(text: str, limit: int) -> str:
    """`text` as lowercase letters, digits and '-', at most `limit` long, no '-' at either end."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return cleaned[:limit].rstrip("-") or "x"


def next_attempt(jobs: Iterable[str]) -> int:
    """The attempt number after the highest one among `jobs` (this run's Job names for a model), 1 for none.

    Not their count: each finished Job is deleted on its own TTL, oldest first, so with a1 gone and a2 left
    a count would name the next attempt a2 again (HTTP 409 on every restart until a2's TTL runs out).
    """
    found = (re.fullmatch(r".*-a(\d+)", name) for name in jobs)
    return max((int(m.group(1)) for m in found if m), default=0) + 1


class K8sModels(FullModels):
    """Training as a Kubernetes Job on a shared volume; scoring as FullModels: the controller
    loads the Job's checkpoint from the shared volume and scores in its own process.

    Each attempt gets its own Job name (<model>-<run id>-a<n>), so a rerun never meets HTTP 409
    from a finished Job still inside its TTL. Jobs carry the run id and model in labels: a
    restarted controller adopts this run's Job for the model (waits for a running one, takes a
    complete one, never one being deleted) instead of training again; after a failed attempt it starts the next one,
    which resumes from the checkpoints the failed one left in the same output folder, up to
    MAX_FAILED_ATTEMPTS failed ones.
    """

    def __init__(self, settings, workdir: Path, backend: Any = None, timeout_s: float | None = None) -> None:
        from synpref.training.k8s_job import MAX_WAIT_S

        super().__init__(settings, workdir)
        self.workdir = workdir
        self.backend = backend
        # The Job's own activeDeadlineSeconds is the limit on its run: a shorter wait here only made the controller
        # give up on a healthy Job (a final RM at 40M pairs trains for days), crash, and wait on it again.
        self.timeout_s = MAX_WAIT_S if timeout_s is None else timeout_s
        self.run_id = run_id(workdir)

    def new_run(self) -> None:
        """A new run starts in this workdir (its ingest step): a new run id. The workdir outlives a run's store
        (controller.store_dir, its own volume): a run started on a new store would otherwise adopt the earlier
        run's finished Jobs, still there within their TTL, and curate with RMs trained on another run's pairs."""
        self.run_id = run_id(self.workdir, new=True)

    def job_labels(self, name: str) -> dict[str, str]:
        """Labels that find this run's Jobs for model `name` again after a restart."""
        return {**dict(self.s.k8s_job).get("labels", {}), RUN_LABEL: self.run_id, MODEL_LABEL: dns_part(name, 40)}

    def job_spec(self, name: str, attempt: int = 1) -> Any:
        """The TrainingJobSpec of attempt `attempt` of model `name`: the settings' k8s_job values, a unique name."""
        from synpref.training.k8s_job import TrainingJobSpec

        values = dict(self.s.k8s_job)
        suffix = f"-{self.run_id}-a{attempt}"
        job = dns_part(f"rm-{name}", 52 - len(suffix) - len("-config")) + suffix
        values.update(name=job, config_map=f"{job}-config", labels=self.job_labels(name))
        spec = TrainingJobSpec(**values)
        ttl = spec.ttl_seconds_after_finished
        if ttl is not None and ttl < MIN_TTL_S:
            log.warning(
                "training Jobs are kept %ds after they finish, not %ds: the controller reads them", MIN_TTL_S, ttl
            )
            spec = spec.model_copy(update={"ttl_seconds_after_finished": MIN_TTL_S})
        return spec

    def output_dir(self, out_dir: Path, name: str, adopting: bool = False) -> Path:
        """The folder this run's Jobs of model `name` train into: out_dir/name, claimed for this run (RUN_FILE)
        when it is empty, else out_dir/<name>-<run id>. A restart of the run finds the same one, and an attempt
        resumes from the checkpoints an earlier attempt left there; another run's folder (a kept workdir) is
        never used: its checkpoints are refused as other data (every attempt failed), and a Job of that run
        still running would write its `final` where this run's model is read from."""
        return claim_folder(out_dir, name, self.run_id, adopting)

    def adopted(self, namespace: str, job: str, name: str) -> str | None:
        """How adopted Job `job` ended (wait), None when it is gone: a finished Job deleted after it was listed (its
        TTL) is trained again; the 404 crashed the controller, whose restart then trained it again."""
        from synpref.training.k8s_api import JobError

        try:
            return str(self.backend.wait(namespace, job, self.timeout_s))
        except JobError as exc:
            if exc.status != 404:
                raise
        log.warning("Job %s/%s was deleted before its outcome was read: training %s again", namespace, job, name)
        return None

    def config_map(
        self, spec: Any, train_file: Path, valid_file: Path, out_dir: Path, role: str = ""
    ) -> dict[str, Any]:
        """The ConfigMap the Job mounts: the RewardConfig as YAML (paths on the shared volume)."""
        import yaml

        config = self.reward_config(out_dir, role)
        config.train_files = [str(train_file)]
        config.eval_files = [str(valid_file)]
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": spec.config_map, "namespace": spec.namespace, "labels": spec.pod_labels()},
            "data": {spec.config_key: yaml.safe_dump(config.to_dict(), sort_keys=True)},
        }

    def train(self, name: str, train: Sequence[Pair], valid: Sequence[Pair], out_dir: Path) -> ModelHandle:
        """Adopt this run's Job for `name`, or write the pairs, the ConfigMap and a new attempt's Job; wait for it."""
        from synpref.services.controller.models import role_of
        from synpref.training.data import write_jsonl

        if self.backend is None:
            self.backend = ClusterJobs.connect()
        namespace = self.job_spec(name).namespace
        jobs = self.backend.find(namespace, self.job_labels(name))
        adopt = next((job for job, status in jobs if status in ("Active", "Complete")), None)
        failed = [job for job, status in jobs if status == "Failed"]
        if adopt is None and len(failed) >= MAX_FAILED_ATTEMPTS:
            # Not a new Job on every restart: a failure that repeats (OOM, a bad image or config) needs a person.
            raise RuntimeError(
                f"training {name}: {len(failed)} attempts failed ({', '.join(failed)} in {namespace}); see their logs"
                f" (kubectl logs job/<name>), fix the cause, and delete them to try again"
            )
        folder = self.output_dir(out_dir, name, adopting=adopt is not None)
        status = None if adopt is None else self.adopted(namespace, adopt, name)
        # This run's own files: a Job of an earlier run in a kept workdir, still running, never reads this run's pairs.
        files = [out_dir / f"{name}-{self.run_id}.{part}.jsonl" for part in ("train", "valid")]
        if status is None:
            out_dir.mkdir(parents=True, exist_ok=True)
            train_file, valid_file = write_jsonl(train, files[0]), write_jsonl(valid, files[1])
            spec = self.job_spec(name, attempt=next_attempt(job for job, _ in jobs))
            self.backend.apply_config_map(self.config_map(spec, train_file, valid_file, folder, role_of(name)))
            self.backend.submit(spec)
            adopt = spec.name
            status = self.backend.wait(namespace, adopt, self.timeout_s)
        if status != "Complete":
            # Why, read from the cluster: "ended Failed" alone sent people to kubectl for an OOM or a bad image.
            why = getattr(self.backend, "why_failed", lambda namespace, name: "")(namespace, adopt)
            raise RuntimeError(f"training job {namespace}/{adopt} ended {status}{f': {why}' if why else ''}")
        # Only a Job reads them and a new attempt writes them again: kept, a copy per model and run filled the workdir.
        for path in files:
            path.unlink(missing_ok=True)
        handle = ModelHandle(name, str(folder / "final"), f"{name}-{adopt}")
        if valid:
            handle.metrics["valid_accuracy"] = accuracy(self.score(handle, valid))
        return handle


class ClusterJobs:
    """JobBackend plus the ConfigMap call the controller needs (create, or replace on a rerun).

    A submitted Job becomes the owner of its ConfigMap, so the garbage collector deletes the
    ConfigMap with the Job (ttlSecondsAfterFinished): the Role grants no delete on ConfigMaps,
    and one ConfigMap per attempt would otherwise stay forever.
    """

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.pending: dict[tuple[str, str], dict[str, Any]] = {}
        """ConfigMaps applied and not yet owned, by (namespace, name); submit hands each to its Job."""

    @classmethod
    def connect(cls) -> ClusterJobs:
        """ClusterJobs over a JobBackend connected to the current cluster."""
        from synpref.training.k8s_job import JobBackend

        return cls(JobBackend.connect())

    def _asking_again(self, what: str, call: Callable[[], T]) -> T:
        """call(), asked again with a capped back-off for up to FIND_WAIT_S while it fails with a transient error;
        then JobError naming `what` and the last error. Any other error is raised at once, as it came."""
        import urllib3
        from kubernetes import client

        from synpref.training.k8s_job import TRANSIENT_STATUSES, JobError

        pauses = backoff_pauses(time.monotonic() + FIND_WAIT_S, time.monotonic)
        while True:
            try:
                return call()
            except (client.ApiException, urllib3.exceptions.HTTPError, JobError) as exc:
                # A 5xx, 429, dropped or silent connection is routine while the control plane is upgraded: without
                # asking again the controller exited, and every restart met the same unavailable API.
                if isinstance(exc, client.ApiException):
                    if exc.status not in TRANSIENT_STATUSES:
                        raise
                    why = f"HTTP {exc.status} {exc.reason}"
                elif isinstance(exc, JobError):
                    if not exc.transient:
                        raise
                    why = str(exc)
                else:
                    why = repr(exc)
                pause = next(pauses, None)
                if pause is None:
                    raise JobError(f"{what} failed for {FIND_WAIT_S:.0f}s; last error: {why}") from exc
                log.warning("%s failed (%s); asking again", what, why)
                time.sleep(pause)

    def apply_config_map(self, manifest: dict[str, Any]) -> None:
        """Create the ConfigMap, or replace it if one of that name exists (also one an earlier try created
        whose answer was lost)."""
        from kubernetes import client

        core = self.backend.core
        meta = manifest["metadata"]

        def apply() -> None:
            try:
                core.create_namespaced_config_map(meta["namespace"], manifest)
            except client.ApiException as exc:
                if exc.status != 409:
                    raise
                core.replace_namespaced_config_map(meta["name"], meta["namespace"], manifest)

        self._asking_again(f"writing the ConfigMap {meta['namespace']}/{meta['name']}", apply)
        self.pending[(meta["namespace"], meta["name"])] = manifest

    def find(self, namespace: str, labels: dict[str, str]) -> list[tuple[str, str]]:
        """(name, "Active" | "Complete" | "Failed" | "Deleting") of the Jobs carrying all `labels`, oldest first."""
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        found = self._asking_again(
            f"listing the Jobs {selector} in {namespace}",
            lambda: self.backend.batch.list_namespaced_job(namespace, label_selector=selector).items,
        )
        found.sort(key=lambda job: job.metadata.creation_timestamp or 0)
        out = []
        for job in found:
            done = [c.type for c in (job.status and job.status.conditions) or [] if c.status == "True"]
            status = next((t for t in done if t in ("Complete", "Failed")), "Active")
            # Listed until its pods are gone: a Job the TTL controller (or a person) deletes is not to be adopted.
            out.append((job.metadata.name, "Deleting" if job.metadata.deletion_timestamp else status))
        return out

    def submit(self, spec: Any) -> Any:
        """Submit the training Job of `spec`, then make it the owner of the ConfigMap it mounts."""
        import urllib3
        from kubernetes import client

        from synpref.training.k8s_job import JobError

        tries = 0

        def create() -> Any:
            nonlocal tries
            tries += 1
            try:
                return self.backend.submit(spec)
            except JobError as exc:
                if exc.status != 409 or tries == 1:
                    raise
            # An earlier try created the Job and its answer was lost (a dropped or silent connection): the name is
            # this attempt's own, so the Job is too. Failing here left it running untracked until a restart.
            log.warning("Job %s/%s exists: created by a try whose answer was lost", spec.namespace, spec.name)
            return self.backend.batch.read_namespaced_job(spec.name, spec.namespace)

        job = self._asking_again(f"creating the Job {spec.namespace}/{spec.name}", create)
        manifest = self.pending.pop((spec.namespace, spec.config_map), None)
        if manifest is None or job is None or not job.metadata.uid:
            return job
        # The ConfigMap is created before the Job (a pod would wait on a missing volume, and one
        # never made after a crash would hold an adopted Job forever), so ownership comes after:
        # `update`, which the Role grants; no blockOwnerDeletion, which would need jobs/finalizers.
        owner = {"apiVersion": "batch/v1", "kind": "Job", "name": job.metadata.name, "uid": job.metadata.uid}
        owned = {**manifest, "metadata": {**manifest["metadata"], "ownerReferences": [owner]}}
        try:
            self._asking_again(
                f"handing the ConfigMap {spec.namespace}/{spec.config_map} to its Job",
                lambda: self.backend.core.replace_namespaced_config_map(spec.config_map, spec.namespace, owned),
            )
        except (client.ApiException, urllib3.exceptions.HTTPError, JobError) as exc:
            # The Job is running: a ConfigMap left behind is not worth failing the training for.
            log.warning("ConfigMap %s/%s not handed to its Job (left behind): %s", spec.namespace, spec.config_map, exc)
        return job

    def why_failed(self, namespace: str, name: str) -> str:
        """Why Job `namespace/name` failed: its Failed condition's reason and message, and each failed pod's
        (OOMKilled, the exit code, Evicted); "" when none can be read (only a diagnosis: it raises nothing)."""
        from synpref.training import k8s_api

        said = []
        try:
            job = self.backend.batch.read_namespaced_job(name, namespace, _request_timeout=k8s_api.REQUEST_TIMEOUT_S)
            for cond in (job.status and job.status.conditions) or []:
                if cond.type == "Failed" and cond.status == "True":
                    said.append(f"{cond.reason}: {cond.message}" if cond.message else str(cond.reason or "Failed"))
        except Exception as exc:  # the Job's outcome is known: a failed read only leaves the reason out
            log.info("cannot read Job %s/%s for why it failed: %s", namespace, name, exc)
        said.extend(job_pods.JobPods(getattr(self.backend, "core", None), namespace, name).failures())
        return "; ".join(said)

    def wait(self, namespace: str, name: str, timeout_s: float) -> str:
        """Wait up to timeout_s for Job `namespace/name` to end: "Complete" or "Failed" (TimeoutError after).

        Waited in slices of job_pods.CHECK_S: after each, a warning says why the Job's pod does not run, if it
        does not (no node with a free GPU, an image that does not pull): the Job is neither Complete nor Failed
        then, and the controller said nothing for days."""
        from synpref.training.k8s_job import validate_timeout

        timeout_s = validate_timeout(timeout_s)
        start = time.monotonic()
        pods = job_pods.JobPods(getattr(self.backend, "core", None), namespace, name)
        last_error = ""
        # Each slice lasts at least its length (JobBackend.wait's own clock): the count only bounds the loop.
        for _ in range(math.ceil(timeout_s / job_pods.CHECK_S) + 1):
            left = start + timeout_s - time.monotonic()
            if left <= 0:
                break
            try:
                return self.backend.wait(namespace, name, min(job_pods.CHECK_S, left))
            except TimeoutError as exc:
                last_error = str(exc).partition("; last error:")[2]
            now = time.monotonic()
            if now - start < timeout_s:
                pods.check(now, now - start)
        last = f"; last error:{last_error}" if last_error else ""
        raise TimeoutError(f"Job {namespace}/{name} did not finish within {timeout_s:g}s{last}")
