"""Review 42, the controller's Kubernetes calls under a control-plane upgrade: an API server answering 5xx/429,
dropping the connection after acting on a create, or accepting a connection and never answering.

The calls go through the kubernetes client over real HTTP to a loopback stand-in for the API server; the
back-off's pauses run on a fake clock, the request timeouts in real time (made short)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from kubernetes import client

from synpref.services.controller import cluster_models
from synpref.services.controller.cluster_models import ClusterJobs, K8sModels
from synpref.shared.config import load_settings
from synpref.training import k8s_api
from synpref.training.k8s_job import JobBackend, JobError, main_submit
from testing.json_api import JsonHandler, serving

PAIRS = [
    {
        "conversation": [{"role": "user", "content": f"q{i}"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    for i in range(2)
]
SILENT_S = 30.0
"""How long a silent request is held unanswered: past any bound of the code under test."""


class FakeClock:
    """cluster_models' `time`: a sleep moves the clock at once."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class Api(JsonHandler):
    """Jobs (Complete once read), ConfigMaps and Services in memory. `faults` holds (method, resource, action)
    taken by the first matching request each: "503", "403" (answered, nothing done), "lost" (done, then the
    connection closed unanswered), "silent" (done, then held unanswered until `release`)."""

    jobs: dict[str, dict[str, Any]]
    config_maps: dict[str, dict[str, Any]]
    services: dict[str, dict[str, Any]]
    created: list[str]
    faults: list[tuple[str, str, str]]
    release: threading.Event
    delete_finished = False

    def status(self, code: int, reason: str) -> None:
        self.reply(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code})

    def route(self, method: str) -> tuple[str, str | None, str | None]:
        """(resource, name or None, the fault's action or None)."""
        parts = urlsplit(self.path).path.strip("/").split("/")
        at = parts.index("namespaces") + 2
        resource, name = parts[at], (parts[at + 1] if len(parts) > at + 1 else None)
        for i, (m, r, action) in enumerate(self.faults):
            if (m, r) == (method, resource):
                del self.faults[i]
                return resource, name, action
        return resource, name, None

    def unanswered(self, action: str | None) -> bool:
        """True when `action` leaves this request without an answer (after waiting, for a silent one)."""
        if action == "silent":
            self.release.wait(SILENT_S)
        self.close_connection = action in ("silent", "lost")
        return self.close_connection

    def store(self, resource: str) -> dict[str, dict[str, Any]]:
        return {"jobs": self.jobs, "configmaps": self.config_maps, "services": self.services}[resource]

    def do_POST(self) -> None:
        resource, _, action = self.route("POST")
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if action in ("503", "403"):
            self.status(int(action), "Refused")
            return
        name, store = body["metadata"]["name"], self.store(resource)
        if name in store:
            self.status(409, "AlreadyExists")
            return
        if resource == "jobs":
            body["metadata"]["uid"] = f"uid-{name}"
            self.created.append(name)
        store[name] = body
        if not self.unanswered(action):
            self.reply(201, body)

    def do_PUT(self) -> None:
        resource, name, action = self.route("PUT")
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if action in ("503", "403"):
            self.status(int(action), "Refused")
            return
        self.store(resource)[str(name)] = body
        if not self.unanswered(action):
            self.reply(200, body)

    def do_GET(self) -> None:
        resource, name, action = self.route("GET")
        if action in ("503", "403"):
            self.status(int(action), "Refused")
            return
        if self.unanswered(action):
            return
        if name is None:  # a list, by label selector
            query = parse_qs(urlsplit(self.path).query)["labelSelector"][0]
            wanted = dict(kv.split("=", 1) for kv in query.split(","))
            items = [j for j in self.jobs.values() if wanted.items() <= j["metadata"].get("labels", {}).items()]
            self.reply(200, {"kind": "JobList", "apiVersion": "batch/v1", "metadata": {}, "items": items})
            return
        found = self.store(resource).get(name)
        if found is None or (resource == "jobs" and self.delete_finished):
            self.status(404, "NotFound")
            return
        if resource == "jobs":
            found["status"] = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
        self.reply(200, found)


@pytest.fixture()
def api() -> Iterator[tuple[str, type[Api]]]:
    attrs = {"jobs": {}, "config_maps": {}, "services": {}, "created": [], "faults": [], "release": threading.Event()}
    handler = type("Cluster", (Api,), attrs)
    with serving(handler) as url:
        try:
            yield url, handler
        finally:
            handler.release.set()


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(cluster_models, "time", fake)
    monkeypatch.setattr(k8s_api, "REQUEST_TIMEOUT_S", 0.5, raising=False)  # none before the fix
    return fake


def cluster_jobs(url: str) -> ClusterJobs:
    configuration = client.Configuration()
    configuration.host = url
    return ClusterJobs(JobBackend(client.ApiClient(configuration)))


def models(tmp_path: Path, url: str, nodes: int = 1) -> K8sModels:
    job = {"image": "synpref/train:1", "namespace": "curation", "nodes": nodes}
    settings = load_settings(
        controller={"workdir": str(tmp_path), "training": "k8s", "backbone": "/models/m", "k8s_job": job}
    )
    return K8sModels(settings.controller, tmp_path, backend=cluster_jobs(url))


def bounded_call(call: Callable[[], Any], limit_s: float = 20.0) -> Any:
    """call()'s result, or its error raised here; fails when it is still running after `limit_s` (blocked)."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(("ok", call()))
        except BaseException as exc:  # handed to the test's thread
            outcome.append(("error", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), f"still blocked after {limit_s:g}s on an API server that never answers"
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


# --- (1, 2, 3) a transient error, a lost answer or a silent connection is asked again ------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        ("POST", "configmaps", "503"),  # the ConfigMap: a 5xx
        ("POST", "configmaps", "lost"),  # created, its answer lost: the retry meets 409 and replaces it
        ("POST", "configmaps", "silent"),  # created, never answered
        ("POST", "jobs", "503"),
        ("POST", "jobs", "lost"),  # created, its answer lost: the retry meets 409 and adopts it
        ("POST", "jobs", "silent"),
        ("GET", "jobs", "silent"),  # find's list
        ("PUT", "configmaps", "503"),  # the ConfigMap handed to its Job
    ],
)
def test_one_blip_of_the_api_server_does_not_fail_the_training_step(
    tmp_path: Path,
    api: tuple[str, type[Api]],
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    fault: tuple[str, str, str],
) -> None:
    """A create (ConfigMap, Job) raised the first 5xx, 429 or dropped connection, and every call blocked for ever
    on a connection that was never answered: one blip during a control-plane upgrade stopped the controller."""
    url, cluster = api
    cluster.faults.append(fault)
    with caplog.at_level(logging.WARNING, logger=cluster_models.__name__):
        handle = bounded_call(lambda: models(tmp_path, url).train("gold", PAIRS, [], tmp_path / "models"))
    assert handle.path == str(tmp_path / "models" / "gold" / "final")
    assert not cluster.faults, "the fault was met"
    assert len(cluster.created) == 1, f"{len(cluster.created)} Jobs: {cluster.created}"
    job = cluster.jobs[cluster.created[0]]
    owners = cluster.config_maps[f"{job['metadata']['name']}-config"]["metadata"].get("ownerReferences")
    assert [o["uid"] for o in owners or []] == [job["metadata"]["uid"]]
    asked_again = [r for r in caplog.records if "asking again" in r.getMessage()]
    if fault != ("GET", "jobs", "silent"):  # a silent read is asked again by the client itself, then fails
        assert len(asked_again) == len(clock.slept) == 1


def test_a_multi_node_jobs_rendezvous_service_outlasts_a_blip(
    tmp_path: Path, api: tuple[str, type[Api]], clock: FakeClock
) -> None:
    url, cluster = api
    cluster.faults.append(("GET", "services", "503"))
    models(tmp_path, url, nodes=2).train("gold", PAIRS, [], tmp_path / "models")
    assert list(cluster.services) == ["synpref-train"] and len(cluster.created) == 1 and clock.slept


# --- refusals still fail at once; an outage longer than the bound ends in one clear error -----------------------


@pytest.mark.parametrize("resource", ["configmaps", "jobs"])
def test_a_refusal_fails_at_once(tmp_path: Path, api: tuple[str, type[Api]], clock: FakeClock, resource: str) -> None:
    url, cluster = api
    cluster.faults.append(("POST", resource, "403"))
    with pytest.raises((client.ApiException, JobError), match="403"):
        models(tmp_path, url).train("gold", PAIRS, [], tmp_path / "models")
    assert not clock.slept and not cluster.created


def test_a_job_name_taken_before_the_first_try_is_not_adopted(
    tmp_path: Path, api: tuple[str, type[Api]], clock: FakeClock
) -> None:
    """Only a retried create's 409 is this attempt's own Job: a first try's 409 is someone else's."""
    url, _ = api
    jobs = cluster_jobs(url)
    spec = models(tmp_path, url).job_spec("gold")
    jobs.backend.submit(spec)
    with pytest.raises(JobError, match="HTTP 409"):
        jobs.submit(spec)
    assert not clock.slept


def test_an_outage_longer_than_the_bound_ends_in_one_clear_error(
    tmp_path: Path, api: tuple[str, type[Api]], clock: FakeClock
) -> None:
    url, cluster = api
    cluster.faults.extend([("POST", "configmaps", "503")] * 1000)
    with pytest.raises(JobError, match=r"writing the ConfigMap curation/\S+ failed for 900s; last error: HTTP 503"):
        models(tmp_path, url).train("gold", PAIRS, [], tmp_path / "models")
    assert clock.now == pytest.approx(cluster_models.FIND_WAIT_S) and 10 < len(clock.slept) < 100


def test_find_gives_up_on_a_silent_api_server_within_its_bound(
    api: tuple[str, type[Api]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """find passed no request timeout: an API server that accepts the connection and never answers blocked the
    controller for ever. Real time here: the bound is FIND_WAIT_S plus at most one request's timeouts."""
    url, cluster = api
    monkeypatch.setattr(cluster_models, "FIND_WAIT_S", 2.0)
    monkeypatch.setattr(k8s_api, "REQUEST_TIMEOUT_S", 0.3, raising=False)
    cluster.faults.extend([("GET", "jobs", "silent")] * 100)
    start = time.monotonic()
    with pytest.raises(JobError, match=r"listing the Jobs a=b in ns failed for 2s"):
        bounded_call(lambda: cluster_jobs(url).find("ns", {"a": "b"}))
    assert time.monotonic() - start < 2.0 + 4 * 0.3 + 3.0


# --- (4) `synpref train submit --wait` on a Job its TTL deleted --------------------------------------------------


def test_submit_wait_says_the_job_was_deleted_before_its_outcome_was_read(
    tmp_path: Path, api: tuple[str, type[Api]], capsys: pytest.CaptureFixture[str]
) -> None:
    """ttlSecondsAfterFinished: 0 deletes the Job as it finishes: the wait printed a bare HTTP 404 and its JSON."""
    url, cluster = api
    cluster.delete_finished = True
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": url}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    spec = tmp_path / "train-job.yaml"
    values = {"image": "synpref/train:1", "config_map": "c", "namespace": "ml", "ttl_seconds_after_finished": 0}
    spec.write_text(yaml.safe_dump(values))
    argv = ["run-1", "--spec", str(spec), "--kubeconfig", str(kubeconfig), "--wait", "--timeout", "30"]
    assert main_submit(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "ml/run-1" in err
    assert "deleted" in err and "before its outcome was read" in err, err
