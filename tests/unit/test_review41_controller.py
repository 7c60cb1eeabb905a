"""Review 41, the controller's calls to the scorer (reload) and to Kubernetes, under failures.

The scorer's admin port is a loopback HTTP server standing in for services/scorer/admin.py; the Kubernetes
API is a fake of the client calls ClusterJobs makes."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from synpref.services.controller import publish
from synpref.shared.scorer_admin import ScorerAdminError

REGISTRY = {"best": {"path": "/data/models/final/final", "version": "final-rm-final-abc-a1"}}


class FakeClock:
    """publish's `time`: sleeping moves the clock; `on_sleep` runs at each sleep (the world changing meanwhile)."""

    def __init__(self, on_sleep=None) -> None:
        self.now = 0.0
        self.slept: list[float] = []
        self.on_sleep = on_sleep

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep()


class AdminPort:
    """A scorer's admin port on loopback: the first `slow` reloads hold their answer until released (a load
    longer than the caller's timeout), later ones answer as the scorer does once the load is done."""

    def __init__(self, slow: int = 0, listening: bool = True) -> None:
        self.calls: list[dict] = []
        self.slow = slow
        self.release = threading.Event()
        port = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                port.calls.append(body)
                if len(port.calls) <= port.slow:
                    port.release.wait(10)
                answer = json.dumps({"model": body["model"], "version": body["version"], "model_id": body["path"]})
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(answer.encode())
                except OSError:
                    pass  # the caller gave up on this one

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self.server.daemon_threads = True
        self.server.server_bind()  # bound, not listening: a connection is refused, as before a scorer starts
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread: threading.Thread | None = None
        if listening:
            self.listen()

    def listen(self) -> None:
        if self.thread is None:
            self.server.server_activate()
            self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
            self.thread.start()

    def close(self) -> None:
        self.release.set()
        if self.thread is not None:
            self.server.shutdown()
            self.thread.join(10)
        self.server.server_close()


@pytest.fixture
def admin_port() -> Iterator[type[AdminPort]]:
    made: list[AdminPort] = []

    def make(**kwargs) -> AdminPort:
        made.append(AdminPort(**kwargs))
        return made[-1]

    yield make  # type: ignore[misc]
    for port in made:
        port.close()


def test_a_reload_that_times_out_is_asked_again_and_joins_the_load(admin_port, monkeypatch) -> None:
    # An 8B checkpoint loads for longer than the controller's per-call timeout (120 s): the call timed out,
    # the error failed serve_models' step and the controller exited; the restart asked again. The scorer
    # answers a repeat of a reload under way by joining it, so asking again is what the controller should do.
    port = admin_port(slow=1)
    clock = FakeClock()
    monkeypatch.setattr(publish, "time", clock, raising=False)  # none before the fix
    publish.reload_scorer(port.url, REGISTRY, timeout_s=0.5)
    # The same reload asked again (2 calls; more only on a machine too busy to answer a call within 0.5 s).
    assert len(port.calls) >= 2 and all(call == port.calls[0] for call in port.calls)


def test_a_scorer_not_listening_yet_is_waited_for(admin_port, monkeypatch) -> None:
    # The chart starts the scorer and the controller together: a reload before the scorer's port is up was
    # refused and the controller crashed (a restart, and a CrashLoopBackOff when it repeats).
    port = admin_port(listening=False)
    clock = FakeClock(on_sleep=port.listen)
    monkeypatch.setattr(publish, "time", clock, raising=False)  # none before the fix
    publish.reload_scorer(port.url, REGISTRY, timeout_s=5)
    assert len(port.calls) == 1 and clock.slept


def test_a_scorer_that_never_answers_ends_in_one_clear_error(admin_port, monkeypatch) -> None:
    # Asked again, but not forever: after a bound, one error that says what was asked, for how long, and why.
    port = admin_port(listening=False)
    clock = FakeClock()
    monkeypatch.setattr(publish, "time", clock, raising=False)  # none before the fix
    with pytest.raises(
        ScorerAdminError, match=r"did not serve best \(.*\) within \d+s.*last error: cannot reach"
    ) as err:
        publish.reload_scorer(port.url, REGISTRY, timeout_s=5)
    wait = float(re.search(r"within (\d+)s", str(err.value)).group(1))  # type: ignore[union-attr]
    assert wait >= 600  # long enough for a scorer pod to start and load an 8B model
    assert wait <= clock.now <= wait + max(clock.slept)  # kept asking until the bound, and not past it


def test_a_refused_reload_is_not_asked_again(monkeypatch) -> None:
    # A refusal (bad path, bad token, too many models) will not change by asking again: it stops the step at once.
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise ScorerAdminError(400, "path must name a checkpoint folder under scorer.model_root")

    monkeypatch.setattr(publish, "reload_model", refuse)
    monkeypatch.setattr(publish, "time", FakeClock(), raising=False)
    with pytest.raises(ScorerAdminError, match="400: path must name"):
        publish.reload_scorer("http://127.0.0.1:1", REGISTRY)
    assert len(calls) == 1


# --- the Kubernetes API during a control-plane upgrade ---------------------------------------------------------


class FlakyBatchApi:
    """batch/v1's list_namespaced_job that fails with `errors` first (one per call), then lists `jobs`."""

    def __init__(self, errors: list[Exception], jobs: list[SimpleNamespace]) -> None:
        self.errors = list(errors)
        self.jobs = jobs
        self.calls = 0

    def list_namespaced_job(self, namespace: str, label_selector: str) -> SimpleNamespace:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return SimpleNamespace(items=list(self.jobs))


def k8s_job(name: str, condition: str | None) -> SimpleNamespace:
    conditions = [SimpleNamespace(type=condition, status="True")] if condition else []
    metadata = SimpleNamespace(name=name, creation_timestamp=None, deletion_timestamp=None)
    return SimpleNamespace(metadata=metadata, status=SimpleNamespace(conditions=conditions))


def test_finding_jobs_outlasts_transient_api_errors(monkeypatch) -> None:
    # During a control-plane upgrade the API server answers 503/429 or drops connections for a while. The
    # controller's look-up of its Jobs (every train, every restart) raised the first one and the controller
    # exited; JobBackend.wait already polls through them.
    import urllib3
    from kubernetes import client

    from synpref.services.controller import cluster_models
    from synpref.services.controller.cluster_models import ClusterJobs

    errors: list[Exception] = [
        client.ApiException(status=503, reason="Service Unavailable"),
        client.ApiException(status=429, reason="Too Many Requests"),
        urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError(104, "Connection reset by peer")),
    ]
    batch = FlakyBatchApi(errors, [k8s_job("rm-gold-abc-a1", "Complete")])
    clock = FakeClock()
    monkeypatch.setattr(cluster_models, "time", clock, raising=False)  # none before the fix
    jobs = ClusterJobs(SimpleNamespace(batch=batch, core=None))
    assert jobs.find("ns", {"synpref.io/run": "abc"}) == [("rm-gold-abc-a1", "Complete")]
    assert batch.calls == 4 and len(clock.slept) == 3


def test_finding_jobs_stops_at_a_refusal_and_after_a_bound(monkeypatch) -> None:
    from kubernetes import client

    from synpref.services.controller import cluster_models
    from synpref.services.controller.cluster_models import ClusterJobs

    clock = FakeClock()
    monkeypatch.setattr(cluster_models, "time", clock, raising=False)
    forbidden = FlakyBatchApi([client.ApiException(status=403, reason="Forbidden")], [])
    with pytest.raises(client.ApiException, match="403"):
        ClusterJobs(SimpleNamespace(batch=forbidden, core=None)).find("ns", {"a": "b"})
    assert forbidden.calls == 1 and not clock.slept
    down = FlakyBatchApi([client.ApiException(status=503, reason="Service Unavailable")] * 10_000, [])
    with pytest.raises(Exception, match=r"listing the Jobs a=b in ns failed for \d+s.*503"):
        ClusterJobs(SimpleNamespace(batch=down, core=None)).find("ns", {"a": "b"})
    assert 1 < down.calls < 10_000


# --- a new run in a kept workdir ---------------------------------------------------------------------------------

PAIRS = [
    {
        "conversation": [{"role": "user", "content": f"q{i}"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    for i in range(3)
]


class Jobs:
    """The cluster calls K8sModels makes, over in-memory Jobs (name, labels, status); keeps each RewardConfig."""

    def __init__(self, jobs: list[tuple[str, dict, str]] | None = None, status: str = "Complete") -> None:
        self.jobs = list(jobs or [])
        self.status = status
        self.output_dirs: list[str] = []

    def find(self, namespace, labels):
        return [(name, status) for name, have, status in self.jobs if labels.items() <= have.items()]

    def apply_config_map(self, manifest):
        import yaml

        self.output_dirs.append(yaml.safe_load(manifest["data"]["train.yaml"])["output_dir"])

    def submit(self, spec):
        self.jobs.append((spec.name, dict(spec.labels), self.status))

    def wait(self, namespace, name, timeout_s):
        return next(status for job, _, status in self.jobs if job == name)


def test_a_new_run_in_a_kept_workdir_trains_into_its_own_folder(tmp_path) -> None:
    # Run A's Jobs trained into workdir/models/<name>. Run B, started in the same workdir (new_run at its
    # ingest), pointed its Jobs at the same folders: its first attempt resumed from run A's checkpoints (refused
    # on other data, so every attempt of the model failed), and a Job of run A still running wrote run A's
    # checkpoints and `final` where run B's controller then loaded and published its model from.
    from synpref.services.controller.cluster_models import K8sModels
    from synpref.shared.config import load_settings
    from synpref.training.checkpointing import TRAINER_STATE, latest_checkpoint

    settings = load_settings(
        controller={"workdir": str(tmp_path), "training": "k8s", "k8s_job": {"image": "t:1", "namespace": "ns"}}
    ).controller
    models_dir = tmp_path / "models"
    run_a = K8sModels(settings, tmp_path, backend=Jobs(status="Failed"))
    with pytest.raises(RuntimeError, match="ended Failed"):
        run_a.train("final", PAIRS, [], models_dir)
    folder_a = Path(run_a.backend.output_dirs[0])
    (folder_a / "checkpoint-10").mkdir(parents=True)
    (folder_a / "checkpoint-10" / TRAINER_STATE).write_bytes(b"run A's step 10")

    # A restarted controller of run A resumes from run A's checkpoint: its next attempt trains into the same folder.
    restarted = K8sModels(settings, tmp_path, backend=Jobs(run_a.backend.jobs))
    handle = restarted.train("final", PAIRS, [], models_dir)
    assert restarted.backend.output_dirs == [str(folder_a)]
    assert Path(handle.path) == folder_a / "final"

    run_b = K8sModels(settings, tmp_path, backend=Jobs(run_a.backend.jobs))
    run_b.new_run()
    handle_b = run_b.train("final", PAIRS, [], models_dir)
    folder_b = Path(run_b.backend.output_dirs[0])
    assert folder_b != folder_a, "run B's Job trains into run A's folder"
    assert latest_checkpoint(folder_b) is None
    assert Path(handle_b.path) == folder_b / "final" and folder_b.parent == models_dir

    # And run B's own restart finds its folder again.
    again = K8sModels(settings, tmp_path, backend=Jobs([(n, labels, "Failed") for n, labels, _ in run_b.backend.jobs]))
    again.train("final", PAIRS, [], models_dir)
    assert again.backend.output_dirs == [str(folder_b)]


def test_a_job_started_before_the_upgrade_is_read_from_where_it_trains(tmp_path) -> None:
    # A controller upgraded (a rolling update) while its Job runs: that Job was told workdir/models/<name>, which
    # holds its checkpoints but no RUN_FILE. The adopting controller reads the model from there, not from an empty
    # folder of its own (a committed handle to nothing); a new attempt of the run starts in a folder of its own.
    from synpref.services.controller.cluster_models import K8sModels
    from synpref.shared.config import load_settings

    settings = load_settings(
        controller={"workdir": str(tmp_path), "training": "k8s", "k8s_job": {"image": "t:1", "namespace": "ns"}}
    ).controller
    models_dir = tmp_path / "models"
    (models_dir / "gold" / "checkpoint-5").mkdir(parents=True)
    probe = K8sModels(settings, tmp_path, backend=Jobs())
    running = Jobs([(probe.job_spec("gold").name, probe.job_labels("gold"), "Complete")])
    handle = K8sModels(settings, tmp_path, backend=running).train("gold", PAIRS, [], models_dir)
    assert Path(handle.path) == models_dir / "gold" / "final" and running.output_dirs == []
    failed = Jobs([(probe.job_spec("gold").name, probe.job_labels("gold"), "Failed")])
    K8sModels(settings, tmp_path, backend=failed).train("gold", PAIRS, [], models_dir)
    assert failed.output_dirs == [str(models_dir / f"gold-{probe.run_id}")]
