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
    """The cluster calls K8sModels makes, over an in-memory list of Jobs (name, labels, status)."""

    def __init__(self, status: str = "Complete", existing: list[tuple[str, dict, str]] | None = None) -> None:
        self.status = status
        self.jobs: list[tuple[str, dict, str]] = list(existing or [])
        self.calls: list[tuple[str, object]] = []

    def find(self, namespace, labels):
        self.calls.append(("find", labels))
        return [(name, status) for name, have, status in self.jobs if labels.items() <= have.items()]

    def apply_config_map(self, manifest):
        self.calls.append(("config_map", manifest))

    def submit(self, spec):
        self.calls.append(("submit", spec))
        self.jobs.append((spec.name, dict(spec.labels), "Active"))

    def wait(self, namespace, name, timeout_s):
        self.calls.append(("wait", (namespace, name)))
        maps = [m for kind, m in self.calls if kind == "config_map"]
        if maps:  # the pairs the Job reads while it runs: the controller removes them once it is Complete
            config = yaml.safe_load(next(iter(maps[-1]["data"].values())))
            self.read = [json.loads(line) for line in Path(config["train_files"][0]).read_text().splitlines()]
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
    assert kinds == ["find", "config_map", "submit", "wait"]
    manifest, spec = jobs.calls[1][1], jobs.calls[2][1]
    run = (tmp_path / "run_id").read_text().strip()
    assert spec.name == f"rm-working-1-{run}-a1" and spec.config_map == manifest["metadata"]["name"]
    assert spec.labels["synpref.io/run"] == run and spec.labels["synpref.io/model"] == "working-1"
    assert manifest["metadata"]["namespace"] == spec.namespace == "curation"
    config = RewardConfig.from_dict(yaml.safe_load(manifest["data"][spec.config_key]))
    assert config.model_name_or_path == "/models/qwen3-0.6b" and config.learning_rate == 4e-6
    assert config.output_dir == str(tmp_path / "models" / "working-1")
    assert [p["conversation"] for p in jobs.read] == [p["conversation"] for p in PAIRS]
    assert Path(config.train_files[0]).name == f"working-1-{run}.train.jsonl"
    assert handle.path == str(tmp_path / "models" / "working-1" / "final")
    job = to_manifest(build_training_job(spec))
    assert job["kind"] == "Job" and job["metadata"]["name"] == spec.name


def test_a_restarted_controller_adopts_its_job_and_retries_a_failed_one_under_a_new_name(tmp_path):
    settings = k8s_settings(tmp_path).controller
    first = K8sModels(settings, tmp_path, backend=FakeJobs())
    labels = first.job_labels("gold")
    # A Job of this run for "gold" is still running: the restarted controller waits for it, creating nothing.
    running = FakeJobs(existing=[("rm-gold-x-a1", labels, "Active")])
    handle = K8sModels(settings, tmp_path, backend=running).train("gold", PAIRS, [], tmp_path / "models")
    assert [c[0] for c in running.calls] == ["find", "wait"] and running.calls[1][1] == ("curation", "rm-gold-x-a1")
    assert handle.path == str(tmp_path / "models" / "gold" / "final")
    # Attempt 1 failed: attempt 2 gets its own name (no 409 from the finished Job within its TTL).
    failed = FakeJobs(existing=[("rm-gold-x-a1", labels, "Failed")])
    K8sModels(settings, tmp_path, backend=failed).train("gold", PAIRS, [], tmp_path / "models")
    submitted = [c[1] for c in failed.calls if c[0] == "submit"]
    assert [s.name for s in submitted] == [f"rm-gold-{first.run_id}-a2"]
    # Another run (another workdir) never adopts this run's Jobs.
    other = FakeJobs(existing=[("rm-gold-x-a1", labels, "Active")])
    K8sModels(settings, tmp_path / "other", backend=other).train("gold", PAIRS, [], tmp_path / "models")
    assert any(c[0] == "submit" for c in other.calls)


def test_controller_jobs_train_with_the_charts_config_and_per_role_overrides(tmp_path):
    chart_config = tmp_path / "train.yaml"
    chart_config.write_text(yaml.safe_dump({"learning_rate": 1e-6, "max_length": 8192, "gradient_checkpointing": True}))
    base = k8s_settings(tmp_path).controller
    settings = base.model_copy(
        update={"train_config_file": str(chart_config), "train": {}, "train_roles": {"final": {"learning_rate": 3e-6}}}
    )
    jobs = FakeJobs()
    models = K8sModels(settings, tmp_path, backend=jobs)
    models.train("working-2", PAIRS, [], tmp_path / "models")
    models.train("final", PAIRS, [], tmp_path / "models")
    maps = [m for kind, m in jobs.calls if kind == "config_map"]
    configs = [RewardConfig.from_dict(yaml.safe_load(m["data"]["train.yaml"])) for m in maps]
    assert [c.learning_rate for c in configs] == [1e-6, 3e-6]
    assert all(c.max_length == 8192 and c.gradient_checkpointing for c in configs)
    assert configs[1].output_dir == str(tmp_path / "models" / "final")


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


def test_controller_over_kafka_with_no_way_to_serve_its_rms_is_a_config_error(tmp_path, capsys):
    # Before: it started, and the gold scorer scored every stage with whatever the scorers held (or waited for a
    # model until stage_timeout_s), so no decision came from the RMs the loop trained.
    config = tmp_path / "c.yaml"
    controller = {"workdir": str(tmp_path), "executor": "kafka", "human": "desk", "sources": ["x.jsonl"]}
    config.write_text(yaml.safe_dump({"controller": controller}))
    assert controller_main.main(["--config", str(config), "--exit-when-done"]) == 2
    err = capsys.readouterr().err
    assert "scorer_models_file" in err and "scorer_reload_url" in err
    for key in ("scorer_models_file", "scorer_reload_url"):
        ok = load_settings(controller={**controller, key: "http://s:8081" if key.endswith("url") else "m.json"})
        controller_main.check_kafka_models(ok)  # either one is enough


def test_embedded_controller_uses_in_process_stages(tmp_path):
    sims = [{"name": f"sim-judge-{x}", "accuracy": 0.8} for x in "abc"]
    study = {"human": "oracle", "judges": sims}
    settings = load_settings(controller={"workdir": str(tmp_path), "trainer": "full", "study": study})
    controller = controller_main.build(settings)
    assert isinstance(controller.humans, OracleHumans)
    assert controller.executor.stage("stage1") is not None
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


def test_synpref_controller_says_in_one_line_that_its_sources_hold_no_pair(tmp_path, capsys):
    # Before: a traceback (exit 1) from deep in the loop; the pod's restart is still what retries.
    data = tmp_path / "pairs.jsonl"
    data.write_text("not json\n")
    cfg = tmp_path / "c.yaml"
    controller = {"sources": [str(data)], "workdir": str(tmp_path / "w"), "study": {"judges": [{"name": "sim-a"}]}}
    cfg.write_text(yaml.safe_dump({"controller": controller, "service": {"grpc_port": 0, "metrics_port": 0}}))
    assert controller_main.main(["--config", str(cfg), "--exit-when-done"]) == 1
    err = capsys.readouterr().err
    assert "synpref controller: cannot read the sources: no pair to curate" in err and "Traceback" not in err


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
