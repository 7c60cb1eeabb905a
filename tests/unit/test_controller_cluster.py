"""The cluster side of the controller without a cluster: K8s Job training and `synpref controller` wiring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from synpref.services.controller import main as controller_main
from synpref.services.controller.cluster_models import K8sModels
from synpref.services.controller.executors import KafkaExecutor
from synpref.services.controller.providers import KafkaDeskHumans, OracleHumans
from synpref.shared.config import load_settings
from synpref.training.k8s_job import build_training_job, to_manifest
from synpref.training.reward_config import RewardConfig


class FakeJobs:
    def __init__(self, status: str = "Complete") -> None:
        self.status = status
        self.calls: list[tuple[str, object]] = []

    def apply_config_map(self, manifest):
        self.calls.append(("config_map", manifest))

    def submit(self, spec):
        self.calls.append(("submit", spec))

    def wait(self, namespace, name, timeout_s):
        self.calls.append(("wait", (namespace, name)))
        return self.status


def k8s_settings(tmp_path):
    return load_settings(
        controller={
            "workdir": str(tmp_path),
            "training": "k8s",
            "backbone": "/models/qwen3-0.6b",
            "train": {"learning_rate": 4e-6, "global_batch_size": 256},
            "k8s_job": {
                "image": "synpref/train:1",
                "namespace": "curation",
                "data_claim": "synpref-data",
                "gpus_per_node": 1,
            },
        }
    )


PAIRS = [
    {
        "conversation": [{"role": "user", "content": f"q{i}"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    for i in range(3)
]


def test_k8s_training_writes_data_config_and_job(tmp_path):
    jobs = FakeJobs()
    models = K8sModels(k8s_settings(tmp_path).controller, tmp_path, backend=jobs)
    handle = models.train("working-1", PAIRS, [], tmp_path / "models")
    kinds = [c[0] for c in jobs.calls]
    assert kinds == ["config_map", "submit", "wait"]
    manifest, spec = jobs.calls[0][1], jobs.calls[1][1]
    assert spec.name == "synpref-rm-working-1" and spec.config_map == manifest["metadata"]["name"]
    assert manifest["metadata"]["namespace"] == spec.namespace == "curation"
    config = RewardConfig.from_dict(yaml.safe_load(manifest["data"][spec.config_key]))
    assert config.model_name_or_path == "/models/qwen3-0.6b" and config.learning_rate == 4e-6
    assert config.output_dir == str(tmp_path / "models" / "working-1")
    train = [json.loads(line) for line in Path(config.train_files[0]).read_text().splitlines()]
    assert [p["conversation"] for p in train] == [p["conversation"] for p in PAIRS]
    assert handle.path == str(tmp_path / "models" / "working-1" / "final")
    job = to_manifest(build_training_job(spec))
    assert job["kind"] == "Job" and job["metadata"]["name"] == "synpref-rm-working-1"


def test_a_failed_training_job_stops_the_step(tmp_path):
    models = K8sModels(k8s_settings(tmp_path).controller, tmp_path, backend=FakeJobs("Failed"))
    with pytest.raises(RuntimeError, match="ended Failed"):
        models.train("gold", PAIRS, [], tmp_path / "models")


def test_cluster_controller_wires_kafka_executor_desk_and_k8s(tmp_path):
    settings = load_settings(
        controller={
            "workdir": str(tmp_path),
            "executor": "kafka",
            "human": "desk",
            "training": "k8s",
            "k8s_job": {"image": "x"},
        }
    )
    controller = controller_main.build(settings)
    assert isinstance(controller.executor, KafkaExecutor)
    assert isinstance(controller.humans, KafkaDeskHumans)
    assert isinstance(controller.models, K8sModels)
    assert controller.judges == []


def test_embedded_controller_uses_in_process_stages(tmp_path):
    sims = [{"name": f"sim-judge-{x}", "accuracy": 0.8} for x in "abc"]
    study = {"human": "oracle", "judges": sims}
    settings = load_settings(controller={"workdir": str(tmp_path), "trainer": "full", "study": study})
    controller = controller_main.build(settings)
    assert isinstance(controller.humans, OracleHumans)
    assert controller.executor.stage("annotate") is not None
    assert [j.name for j in controller.judges] == ["sim-judge-a", "sim-judge-b", "sim-judge-c"]


def test_synpref_run_reports_unreadable_sources_and_bad_config(tmp_path, capsys):
    from synpref.services.controller import embedded

    cfg = tmp_path / "run.yaml"
    study = {"judges": [{"name": "sim-a"}]}
    cfg.write_text(yaml.safe_dump({"controller": {"sources": [str(tmp_path / "missing.jsonl")], "study": study}}))
    assert embedded.main(["--config", str(cfg), "--workdir", str(tmp_path / "w"), "--quiet"]) == 2
    assert "cannot read the sources" in capsys.readouterr().err
    cfg.write_text(yaml.safe_dump({"controller": {"iterations": 0}}))
    assert embedded.main(["--config", str(cfg)]) == 2
    assert "controller.iterations" in capsys.readouterr().err


def test_a_real_run_refuses_to_start_without_judges_or_sources(tmp_path, capsys):
    # Production is the default: no study section means real judges and real humans, and no
    # simulated judge stands in when none is configured.
    from synpref.services.controller import embedded
    from synpref.services.controller import main as cluster_main

    data = tmp_path / "pairs.jsonl"
    data.write_text("")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"controller": {"sources": [str(data)], "workdir": str(tmp_path / "w")}}))
    assert embedded.main(["--config", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no LLM judges configured" in err and "annotator.judges" in err and "controller.study.judges" in err
    assert cluster_main.main(["--config", str(cfg)]) == 2
    assert "no LLM judges configured" in capsys.readouterr().err
    cfg.write_text(yaml.safe_dump({"controller": {"study": {"judges": [{"name": "sim-a"}]}}}))
    assert embedded.main(["--config", str(cfg), "--quiet"]) == 2
    assert "controller.sources is empty" in capsys.readouterr().err


def test_the_defaults_are_a_real_run_with_the_desk():
    c = load_settings().controller
    assert c.study is None and c.human == "desk" and c.human_provider == "desk"
    assert c.seed_size(40_000_000) == 500 and c.seed_size(100) == 100  # a count, not a share of 40M
    assert c.model_copy(update={"seed_fraction": 0.1}).seed_size(1000) == 100
