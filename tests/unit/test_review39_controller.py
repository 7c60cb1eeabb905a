"""Review 39, area E: the controller's loop after ingest (rounds, models, report), one test per defect."""

from __future__ import annotations

from pathlib import Path

import pytest

from synpref.services.controller.cluster_models import K8sModels
from synpref.shared.config import load_settings
from synpref.training.k8s_job import JobError
from testing.group_consumer import RecordingProducer, Topics, TopicsConsumer

PAIRS = [
    {
        "conversation": [{"role": "user", "content": f"question {i}"}],
        "chosen": [{"role": "assistant", "content": f"a careful right answer {i}"}],
        "rejected": [{"role": "assistant", "content": f"wrong {i}"}],
    }
    for i in range(8)
]


class Jobs:
    """The cluster calls K8sModels makes over in-memory Jobs; creating a name that exists is HTTP 409, as there."""

    def __init__(self, existing: list[tuple[str, dict, str]]) -> None:
        self.jobs = list(existing)
        self.submitted: list[str] = []

    def find(self, namespace, labels):
        return [(name, status) for name, have, status in self.jobs if labels.items() <= have.items()]

    def apply_config_map(self, manifest):
        pass

    def submit(self, spec):
        if any(name == spec.name for name, _, _ in self.jobs):
            raise JobError(f"creating Job {spec.namespace}/{spec.name} failed: HTTP 409 Conflict: AlreadyExists")
        self.submitted.append(spec.name)
        self.jobs.append((spec.name, dict(spec.labels), "Active"))

    def wait(self, namespace, name, timeout_s):
        return "Complete"


def test_a_retry_after_older_attempts_expired_gets_a_new_job_name(tmp_path):
    # Attempt 1 failed and its TTL has deleted it; attempt 2 failed later and is still there. The next
    # attempt is a3: counting the Jobs left named it a2 again, refused with 409 on every restart.
    settings = load_settings(
        controller={"workdir": str(tmp_path), "training": "k8s", "k8s_job": {"image": "t:1", "namespace": "ns"}}
    )
    probe = K8sModels(settings.controller, tmp_path, backend=Jobs([]))
    a2 = probe.job_spec("gold", attempt=2).name
    jobs = Jobs([(a2, probe.job_labels("gold"), "Failed")])
    handle = K8sModels(settings.controller, tmp_path, backend=jobs).train("gold", PAIRS, [], tmp_path / "models")
    assert jobs.submitted == [probe.job_spec("gold", attempt=3).name]
    assert handle.version == f"gold-{jobs.submitted[0]}"


def test_an_exported_head_checkpoint_is_on_disk_before_it_is_renamed_into_place(tmp_path, fsynced):
    # register (and each Stage-2 export) is recorded done once export returns: the checkpoint's files must be
    # fsynced before the rename that publishes them, or a power loss leaves a named folder of empty files
    # that a resumed run reuses (config.json exists) and the scorer is pointed at.
    from synpref.services.controller.models import HeadModels

    settings = load_settings(controller={"workdir": str(tmp_path), "max_length": 32, "head_steps": 5})
    models = HeadModels(settings.controller, tmp_path, progress=False)
    handle = models.train("final", PAIRS[:6], PAIRS[6:], tmp_path / "models")
    fsynced.clear()  # the export's, not the training's
    folder = models.export(handle, tmp_path / "models" / handle.version)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors"} <= names
    synced_names = {Path(p).name for p in fsynced if Path(p).parent.name == f".{folder.name}.tmp"}
    assert names <= synced_names, f"not fsynced before the rename: {sorted(names - synced_names)}"


def test_a_new_run_in_a_kept_workdir_trains_its_own_models(tmp_path):
    # A run's store lives apart from the shared workdir (controller.store_dir, its own volume). A new run on a
    # new store beside the old workdir adopted the old run's finished Job for working-1 (same run id, same
    # model label) and curated with an RM trained on the other run's pairs.
    from synpref.services.controller.loop import Controller
    from synpref.services.controller.providers import OracleHumans
    from testing import controller_fakes as fakes

    data = fakes.write_synthetic(tmp_path / "pairs.jsonl", 40, seed=1)
    values = {
        "workdir": str(tmp_path / "work"),
        "sources": [str(data)],
        "training": "k8s",
        "k8s_job": {"image": "t:1", "namespace": "ns"},
        "study": {"human": "oracle"},
    }
    first = load_settings(controller={**values, "store_dir": str(tmp_path / "state-1")}).controller
    old = K8sModels(first, Path(first.workdir), backend=Jobs([]))
    old.train("working-1", PAIRS, [], Path(first.workdir) / "models")  # the old run's Job, Complete
    settings = load_settings(controller={**values, "store_dir": str(tmp_path / "state-2")})
    jobs = Jobs(old.backend.jobs)
    models = K8sModels(settings.controller, Path(settings.controller.workdir), backend=jobs)
    controller = Controller(settings, models, OracleHumans(), [], embed=fakes.embed, progress=lambda _m: None)
    try:
        controller.step("ingest", controller.ingest)
    finally:
        controller.store.close()
        controller.verdicts.close()
    handle = models.train("working-1", PAIRS, [], Path(settings.controller.workdir) / "models")
    assert len(jobs.submitted) == 1, "the old run's Job was adopted"
    assert handle.version != f"working-1-{old.backend.submitted[0]}"


class SlowPipeline(Topics):
    """Topics and a Stage-2 pipeline that decides `per_poll` input messages per consumer poll, each poll taking a
    second of a fake clock; the executor's consumer and producer over them."""

    def __init__(self, topics, per_poll: int) -> None:
        super().__init__()
        self.names, self.per_poll, self.now, self.done = topics, per_poll, 0.0, 0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def work(self, poll: int) -> None:
        from synpref.shared.kafka.codec import decode_record, encode_record
        from synpref.v1.pair_pb2 import DECISION_KEEP

        self.now += 1.0
        for msg in self.messages(self.names.s2_raw)[self.done : self.done + self.per_poll]:
            record = decode_record(msg.value, msg.headers)
            record.decision.decision = DECISION_KEEP
            sent = encode_record(record, self.names.s2_decided)
            self.append(sent.topic, sent.key, sent.value, sent.headers)
            self.done += 1

    def producer(self):
        return RecordingProducer(self)

    def consumer(self):
        return TopicsConsumer(self, self.work)


def stage2_records(n: int) -> list:
    from synpref.shared.pairs import new_pair, new_record

    return [
        new_record(new_pair(p["conversation"], p["chosen"], p["rejected"], source="unit"))
        for p in ({**PAIRS[0], "conversation": [{"role": "user", "content": f"slow question {i}"}]} for i in range(n))
    ]


@pytest.mark.parametrize("per_poll", [1, 0])
def test_a_batch_still_coming_back_is_waited_for_and_a_stalled_one_times_out(monkeypatch, per_poll):
    # 30 pairs at one a second against a 10 s timeout: the old whole-batch deadline raised at 10 s, and the
    # restarted step republished the batch behind the first one's backlog and timed out again, for ever. A
    # pipeline that returns nothing for the timeout still fails the step.
    from synpref.services.controller import executors
    from synpref.shared.config import Settings, TopicSettings
    from synpref.shared.kafka import clients

    topics = TopicSettings()
    pipeline = SlowPipeline(topics, per_poll)
    monkeypatch.setattr(executors, "time", pipeline)
    monkeypatch.setattr(clients, "make_producer", lambda kafka: pipeline.producer())
    monkeypatch.setattr(clients, "make_consumer", lambda kafka, group, **kw: pipeline.consumer())
    records = stage2_records(30)
    executor = executors.KafkaExecutor(Settings(topics=topics), timeout_s=10)
    if per_poll == 0:
        with pytest.raises(TimeoutError, match="30 of 30 records not back"):
            executor.run("stage2", records)
        assert pipeline.now <= 11
        return
    result = executor.run("stage2", records)
    assert sorted(r.pair.id for _, r in result.routed) == sorted(r.pair.id for r in records)
    assert {route for route, _ in result.routed} == {"curated"} and not result.failed
    assert len(pipeline.messages(topics.s2_raw)) == 30, "published once"


if __name__ == "__main__":
    pytest.main([__file__])


@pytest.mark.parametrize("where", ["models/final/final", "models/v3", "elsewhere/ckpt"])
def test_models_best_points_at_the_final_checkpoint_wherever_it_was_written(tmp_path, where):
    # The link named the checkpoint folder's last name inside models/: right for the head trainer's models/<version>,
    # but the full trainer's and the k8s Jobs' final model is models/final/final (best -> models/final, no
    # checkpoint), and a models_dir elsewhere left a dangling link. report.md tells users to serve models/best.
    from synpref.services.controller.publish import write_registry
    from synpref.shared.roles import BEST

    models_dir = tmp_path / "models"
    models_dir.mkdir()
    checkpoint = tmp_path / where
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")
    write_registry(models_dir, {BEST: {"path": str(checkpoint)}}, 128)
    assert (models_dir / "best" / "config.json").exists()
    assert (models_dir / "best").resolve() == checkpoint.resolve()


def test_a_dataset_name_that_is_not_one_folder_name_removes_nothing(tmp_path):
    # write_datasets removed <workdir>/datasets/<name>/<version> before DatasetVersion refused the name: with
    # dataset_name ".." that was <workdir>/curated, beside the datasets folder.
    from types import SimpleNamespace

    from synpref.services.controller.final_steps import FinalSteps

    (tmp_path / "datasets").mkdir()  # a workdir after its first run
    kept = tmp_path / "curated"
    kept.mkdir()
    (kept / "keep.txt").write_text("x")
    steps = SimpleNamespace(
        root=tmp_path,
        c=SimpleNamespace(dataset_name=".."),
        state=SimpleNamespace(results={}),
        dataset_versions=lambda: {"curated": (iter([]), "train")},
    )
    with pytest.raises(ValueError, match="one plain folder name"):
        FinalSteps.write_datasets(steps)  # type: ignore[arg-type]
    assert (kept / "keep.txt").exists()


def test_a_prepare_step_stopped_part_way_goes_on_where_it_stopped(tmp_path, monkeypatch):
    # The pool's embeddings had no progress: a controller stopped at 90% of a 40M-pair prepare (hours of MiniLM)
    # embedded all of it again, since the step started over and VectorFile.create emptied the file.
    from synpref.services.controller import embeddings
    from synpref.services.controller.loop import VECTORS_FILE
    from testing import controller_fakes as fakes
    from tests.unit.test_review_intake import controller_for, settings_for

    monkeypatch.setattr(embeddings, "COMMIT_EVERY", 2)
    source = fakes.write_synthetic(tmp_path / "pairs.jsonl", 400, seed=1)
    settings = settings_for(tmp_path, [source])
    embedded: list[str] = []

    def embed_then_stop(texts: list[str]):
        if len(embedded) >= 5 * 16:  # stopped in the sixth batch: batches 1-4 committed, the fifth not
            raise KeyboardInterrupt
        embedded.extend(texts)
        return fakes.embed(texts)

    controller = controller_for(settings)
    controller.step("ingest", controller.ingest)
    from functools import partial

    from synpref.services.controller import loop

    monkeypatch.setattr(loop, "embed_pool", partial(embeddings.embed_pool, batch=16))
    controller.embed = embed_then_stop
    with pytest.raises(KeyboardInterrupt):
        controller.step("prepare", controller.prepare)
    first = len(embedded)
    assert 0 < first < controller.pairstore.count("unverified")

    again = controller_for(settings)  # a restart
    again.embed = lambda texts: embedded.extend(texts) or fakes.embed(texts)
    again.step("prepare", again.prepare)
    total = again.pairstore.count("unverified")
    assert first == 80 and len(embedded) == total + 16  # only the fifth batch, not committed, embedded twice
    rows = list(again.pairstore.all_rows("unverified"))
    texts = [embeddings.retrieval_text(r) for r in again.pairstore.get(rows)]
    want = fakes.embed(texts).astype("float16").astype("float32")
    got = embeddings.VectorFile(again.store.root / VECTORS_FILE).read(rows)
    assert (abs(got - want) < 1e-6).all()  # every row written, the first attempt's rows too


def test_stage_2_does_not_keep_stage_1s_retrieval_index_up_to_date(tmp_path, monkeypatch):
    # After Stage 1 nothing queries the index of D_un, but it stayed in memory and every Stage 2 batch removed its
    # pairs from it (an IVF remove scans every list).
    from synpref.services.controller import embeddings
    from testing import controller_fakes as fakes
    from tests.unit.test_review_intake import controller_for, settings_for

    left: list[str] = []
    leave = embeddings.PoolRetrieval.leave

    def spy(self, rows):
        left.append(controller.current_step)
        return leave(self, rows)

    monkeypatch.setattr(embeddings.PoolRetrieval, "leave", spy)
    source = fakes.write_synthetic(tmp_path / "pairs.jsonl", 150, seed=2)
    controller = controller_for(settings_for(tmp_path, [source]))
    controller.run()
    assert any(step.startswith("s1.") for step in left)
    assert not [step for step in left if step.startswith("s2.")]
