"""Review findings in the Kubernetes integration: training/k8s_job.py, training/eval_cli.py, the chart."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from synpref.training import eval_cli
from synpref.training.k8s_job import JobBackend, JobError, build_training_job, load_spec, to_manifest
from testing.json_api import JsonHandler

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "synpref"
HELM = ROOT / ".cache" / "bin" / "helm"
BASE = CHART / "ci" / "base-values.yaml"


def backend_at(port: int) -> JobBackend:
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{port}"
    return JobBackend(client.ApiClient(configuration))


# --- fractional quantities: the chart's schema allows `cpu: 0.5`, so must the spec --------------


def test_fractional_cpu_from_the_charts_spec_file_builds_the_job(tmp_path: Path) -> None:
    spec_file = tmp_path / "train-job.yaml"
    spec_file.write_text(
        "image: synpref-cuda:0.1.0\nconfig_map: rel-synpref-config\n"
        'resources: {"limits":{"cpu":1.5,"memory":"64Gi"},"requests":{"cpu":0.5,"memory":"32Gi"}}\n'
    )
    job = to_manifest(build_training_job(load_spec(spec_file, name="run-1")))
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"]["cpu"] == "0.5"
    assert container["resources"]["limits"]["cpu"] == "1.5"


@pytest.mark.skipif(not HELM.exists(), reason="helm is not built (make helm)")
def test_chart_with_fractional_cpu_gives_submit_the_cronjobs_job(tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(
        "training:\n  resources:\n    requests: {cpu: 0.5, memory: 32Gi}\n    limits: {cpu: 1.5, memory: 64Gi}\n"
    )
    proc = subprocess.run(
        [str(HELM), "template", "rel", str(CHART), "--namespace", "ml", *("-f", str(BASE)), "-f", str(values)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "rel-synpref-config")
    cron = next(d for d in docs if d["kind"] == "CronJob")
    spec_file = tmp_path / "train-job.yaml"
    spec_file.write_text(config["data"]["train-job.yaml"])
    built = to_manifest(build_training_job(load_spec(spec_file, name="run-1")))
    (ours,) = built["spec"]["template"]["spec"]["containers"]
    (theirs,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert ours["resources"] == theirs["resources"]


# --- waiting on a Job over hours: a stalled connection or a blip of the API server ------------


@pytest.fixture()
def silent_server() -> Iterator[int]:
    """Accepts connections and reads requests but never answers (a half-open API server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    stop = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join(2)
        for conn in held:
            conn.close()
        sock.close()


def test_wait_keeps_its_deadline_when_the_api_server_stops_answering(silent_server: int) -> None:
    backend = backend_at(silent_server)
    outcome: list[BaseException | str] = []

    def run() -> None:
        try:
            outcome.append(backend.wait("ml", "run-1", timeout_s=1, poll_s=0.1))
        except BaseException as exc:  # reported to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "wait() blocked on a stalled connection past its 1 s deadline"
    assert isinstance(outcome[0], TimeoutError) and "ml/run-1" in str(outcome[0])
    assert time.monotonic() - start < 30


class FlakyApi(JsonHandler):
    """Answers the first `blips` reads of the Job with 503, then the Job as Complete."""

    blips = 2
    reads = 0

    def do_GET(self) -> None:
        cls = type(self)
        cls.reads += 1
        if cls.reads <= cls.blips:
            code, body = 503, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503}
        else:
            code = 200
            body = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "run-1", "namespace": "ml"},
                    "status": {"conditions": [{"type": "Complete", "status": "True"}]}}  # fmt: skip
        self.reply(code, body)


def test_wait_rides_out_a_brief_api_server_outage() -> None:
    handler = type("Api", (FlakyApi,), {"reads": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert backend_at(server.server_address[1]).wait("ml", "run-1", timeout_s=10, poll_s=0.01) == "Complete"
    finally:
        server.shutdown()
        server.server_close()
    assert handler.reads == 3


# --- synpref eval: one result per input, even where file names repeat --------------------------


def test_eval_keeps_every_input_whose_file_names_repeat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import synpref.shared.modeling as modeling
    from synpref.training.data import write_jsonl

    def pair(i: int) -> dict[str, Any]:
        return {
            "conversation": [{"role": "user", "content": f"q{i}"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        }

    # As in hh-rlhf: harmless-base/test.jsonl.gz and helpful-base/test.jsonl.gz.
    for folder, n in (("harmless-base", 3), ("helpful-base", 5)):
        (tmp_path / folder).mkdir()
        write_jsonl([pair(i) for i in range(n)], tmp_path / folder / "test.jsonl")
    monkeypatch.setattr(modeling, "load_reward_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(modeling, "score_pairs", lambda model, tok, pairs, *a: [(1.0, 0.0)] * len(pairs))
    harmless, helpful = str(tmp_path / "harmless-base" / "test.jsonl"), str(tmp_path / "helpful-base" / "test.jsonl")
    assert eval_cli.main(["--model", "m", "--pairs", harmless, "--pairs", helpful, "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    counts = sorted(v["pairs"] for k, v in result.items() if isinstance(v, dict))
    assert counts == [3, 5]
    assert result[harmless]["pairs"] == 3 and result[helpful]["pairs"] == 5


def test_eval_keys_a_lone_file_by_its_name() -> None:
    assert eval_cli.result_key("/x/eval.parquet", ["/x/eval.parquet"], {"model": "m"}) == "eval.parquet"
    assert eval_cli.result_key("/x/model", ["/x/model"], {"model": "m"}) == "/x/model"


# --- a helm upgrade must not hide the controller's running Job from it -------------------------


class FakeJobs:
    """The cluster calls K8sModels makes, over in-memory Jobs; a name taken is HTTP 409 as on a cluster."""

    def __init__(self) -> None:
        self.jobs: list[tuple[str, dict[str, str], str]] = []
        self.submitted: list[str] = []

    def find(self, namespace: str, labels: dict[str, str]) -> list[tuple[str, str]]:
        return [(name, status) for name, have, status in self.jobs if labels.items() <= have.items()]

    def apply_config_map(self, manifest: dict[str, Any]) -> None:
        pass

    def submit(self, spec: Any) -> None:
        if any(name == spec.name for name, _, _ in self.jobs):
            raise JobError(f"creating Job {spec.namespace}/{spec.name} failed: HTTP 409 Conflict")
        self.submitted.append(spec.name)
        self.jobs.append((spec.name, dict(spec.labels), "Complete"))

    def wait(self, namespace: str, name: str, timeout_s: float) -> str:
        return "Complete"


def render_config(chart: Path, tmp_path: Path) -> Path:
    proc = subprocess.run(
        [str(HELM), "template", "rel", str(chart), "--namespace", "ml", "-f", str(BASE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "rel-synpref-config")
    train = tmp_path / f"train-{chart.parent.name}.yaml"
    train.write_text(config["data"]["train.yaml"])
    data = yaml.safe_load(config["data"]["config.yaml"])
    data["controller"]["train_config_file"] = str(train)  # the pod's /etc/synpref/train.yaml
    path = tmp_path / f"config-{chart.parent.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.skipif(not HELM.exists(), reason="helm is not built (make helm)")
def test_controller_restarted_by_a_chart_upgrade_adopts_its_training_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from synpref.services.controller.cluster_models import K8sModels
    from synpref.shared.config import load_settings

    monkeypatch.delenv("SYNPREF_CONFIG", raising=False)
    upgraded = tmp_path / "next" / "synpref"
    shutil.copytree(CHART, upgraded)
    meta = yaml.safe_load((upgraded / "Chart.yaml").read_text())
    meta.update(version="9.9.9", appVersion="9.9.9")
    (upgraded / "Chart.yaml").write_text(yaml.safe_dump(meta))
    workdir = tmp_path / "work"
    workdir.mkdir()
    jobs = FakeJobs()
    for chart in (CHART, upgraded):  # the controller before and after `helm upgrade` (same volume)
        settings = load_settings(render_config(chart, tmp_path))
        models = K8sModels(settings.controller, workdir, backend=jobs)
        models.train("working-1", [], [], workdir / "models")
    assert len(jobs.submitted) == 1, jobs.submitted
