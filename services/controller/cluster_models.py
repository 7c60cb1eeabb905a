"""Reward models trained as Kubernetes Jobs (controller.training = k8s): K8sModels and the
cluster calls it makes (ClusterJobs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from synpref.services.controller.models import FullModels, ModelHandle, Pair, accuracy


class K8sModels(FullModels):
    """Training as a Kubernetes Job on a shared volume; scoring as FullModels: the controller
    loads the Job's checkpoint from the shared volume and scores in its own process."""

    def __init__(self, settings, workdir: Path, backend: Any = None, timeout_s: float = 6 * 3600.0) -> None:
        super().__init__(settings, workdir)
        self.workdir = workdir
        self.backend = backend
        self.timeout_s = timeout_s

    def job_spec(self, name: str) -> Any:
        """The TrainingJobSpec of run `name`: the settings' k8s_job values, with a Job name derived from `name`."""
        from synpref.training.k8s_job import TrainingJobSpec

        values = dict(self.s.k8s_job)
        job = f"synpref-rm-{name}".lower().replace("_", "-").replace(".", "-")[:52]
        values.update(name=job, config_map=f"{job}-config")
        return TrainingJobSpec(**values)

    def config_map(self, spec: Any, train_file: Path, valid_file: Path, out_dir: Path) -> dict[str, Any]:
        """The ConfigMap the Job mounts: the RewardConfig as YAML (paths on the shared volume)."""
        import yaml

        config = self.reward_config(out_dir)
        config.train_files = [str(train_file)]
        config.eval_files = [str(valid_file)]
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": spec.config_map, "namespace": spec.namespace, "labels": spec.pod_labels()},
            "data": {spec.config_key: yaml.safe_dump(config.to_dict(), sort_keys=True)},
        }

    def train(self, name: str, train: list[Pair], valid: list[Pair], out_dir: Path) -> ModelHandle:
        """Write the pairs to the shared volume, create the ConfigMap and the Job, wait for it."""
        from synpref.training.data import write_jsonl

        if self.backend is None:
            self.backend = ClusterJobs.connect()
        out_dir.mkdir(parents=True, exist_ok=True)
        train_file = write_jsonl(train, out_dir / f"{name}.train.jsonl")
        valid_file = write_jsonl(valid, out_dir / f"{name}.valid.jsonl")
        spec = self.job_spec(name)
        self.backend.apply_config_map(self.config_map(spec, train_file, valid_file, out_dir / name))
        self.backend.submit(spec)
        status = self.backend.wait(spec.namespace, spec.name, self.timeout_s)
        if status != "Complete":
            raise RuntimeError(f"training job {spec.namespace}/{spec.name} ended {status}")
        handle = ModelHandle(name, str(out_dir / name / "final"), f"{name}-{spec.name}")
        if valid:
            handle.metrics["valid_accuracy"] = accuracy(self.score(handle, valid))
        return handle


class ClusterJobs:
    """JobBackend plus the ConfigMap call the controller needs (create, or replace on a rerun)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    @classmethod
    def connect(cls) -> ClusterJobs:
        """ClusterJobs over a JobBackend connected to the current cluster."""
        from synpref.training.k8s_job import JobBackend

        return cls(JobBackend.connect())

    def apply_config_map(self, manifest: dict[str, Any]) -> None:
        """Create the ConfigMap, or replace it if one of that name exists."""
        from kubernetes import client

        core = self.backend.core
        meta = manifest["metadata"]
        try:
            core.create_namespaced_config_map(meta["namespace"], manifest)
        except client.ApiException as exc:
            if exc.status != 409:
                raise
            core.replace_namespaced_config_map(meta["name"], meta["namespace"], manifest)

    def submit(self, spec: Any) -> Any:
        """Submit the training Job of `spec`."""
        return self.backend.submit(spec)

    def wait(self, namespace: str, name: str, timeout_s: float) -> str:
        """Wait up to timeout_s for Job `namespace/name` to end: "Complete" or "Failed" (TimeoutError after)."""
        return self.backend.wait(namespace, name, timeout_s)
