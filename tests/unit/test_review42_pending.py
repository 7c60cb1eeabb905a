"""Review 42, a training Job whose pod cannot run (no node with a free GPU, an image that does not pull, a missing
Secret): the Job is neither Complete nor Failed, and the controller waited silently for days. ClusterJobs.wait now
lists the Job's pods between slices of its wait and warns why one does not run.

The calls go through the kubernetes client over real HTTP to a loopback stand-in for the API server; the slices
are made short. The fake Job ends after a given number of pod lists, so each test waits on the API's own progress."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from kubernetes import client

from synpref.services.controller import job_pods
from synpref.services.controller.cluster_models import ClusterJobs
from synpref.training import k8s_api
from synpref.training.k8s_job import JobBackend
from testing.json_api import JsonHandler, serving

NAMESPACE, JOB = "curation", "rm-gold-r1-a1"
UNSCHEDULABLE = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."


def pending_pod(reason: str, message: str = "") -> dict[str, Any]:
    """A Pending pod of JOB: unschedulable, or scheduled with its container waiting for `reason`."""
    status: dict[str, Any] = {"phase": "Pending"}
    if reason == "Unschedulable":
        status["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": reason, "message": message}]
    else:
        status["conditions"] = [{"type": "PodScheduled", "status": "True"}]
        waiting = {"reason": reason, "message": message}
        status["containerStatuses"] = [
            {
                "name": "train",
                "image": "i",
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": {"waiting": waiting},
            }
        ]
    meta = {"name": f"{JOB}-x7k2p", "namespace": NAMESPACE, "labels": {"batch.kubernetes.io/job-name": JOB}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"containers": []}, "status": status}


class Api(JsonHandler):
    """JOB stays active until its pods were asked for `lists` times (answered or not), then ends `outcome`.
    Each pod list answers the next of `pods` (the last one again once they run out), or `refuse` as HTTP code."""

    pods: list[dict[str, Any]]
    lists: int
    asked: list[str]
    outcome = "Complete"
    refuse: int | None = None

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        resource = url.path.strip("/").split("/")[-2:]
        if resource[-1] == "pods":
            self.asked.append(parse_qs(url.query)["labelSelector"][0])
            if self.refuse:
                body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": self.refuse}
                self.reply(self.refuse, {**body, "reason": "Forbidden"})
                return
            pod = self.pods[min(len(self.asked), len(self.pods)) - 1]
            self.reply(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [pod]})
            return
        status: dict[str, Any] = {"active": 1}
        if len(self.asked) >= self.lists:
            status = {"conditions": [{"type": self.outcome, "status": "True"}]}
        self.reply(200, {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": JOB}, "status": status})


@pytest.fixture()
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ClusterJobs, type[Api]]]:
    monkeypatch.setattr(job_pods, "CHECK_S", 0.05)
    monkeypatch.setattr(k8s_api, "REQUEST_TIMEOUT_S", 5.0)
    handler = type("Cluster", (Api,), {"pods": [], "lists": 1, "asked": []})
    with serving(handler) as url:
        configuration = client.Configuration()
        configuration.host = url
        yield ClusterJobs(JobBackend(client.ApiClient(configuration))), handler


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "not running" in r.getMessage()]


def test_an_unschedulable_pod_is_named_with_its_reason(
    api: tuple[ClusterJobs, type[Api]], caplog: pytest.LogCaptureFixture
) -> None:
    """The Job waited on for days with its pod Pending (no node with a free GPU): the controller said nothing."""
    jobs, cluster = api
    cluster.pods, cluster.lists = [pending_pod("Unschedulable", UNSCHEDULABLE)], 2
    with caplog.at_level(logging.INFO):
        assert jobs.wait(NAMESPACE, JOB, 60) == "Complete"
    assert cluster.asked == [f"batch.kubernetes.io/job-name={JOB}"] * 2
    [line] = warnings(caplog)
    assert f"{NAMESPACE}/{JOB}" in line and f"pod {JOB}-x7k2p" in line, line
    assert f"Unschedulable: {UNSCHEDULABLE}" in line and "not running after 0m" in line, line


def test_a_reason_is_warned_once_and_again_when_it_changes(
    api: tuple[ClusterJobs, type[Api]], caplog: pytest.LogCaptureFixture
) -> None:
    """Not a line every slice: ErrImagePull and ImagePullBackOff alternate on every pull and count as one reason."""
    jobs, cluster = api
    pull = [pending_pod("ErrImagePull", "pull access denied"), pending_pod("ImagePullBackOff", "Back-off pulling")]
    cluster.pods = [pending_pod("Unschedulable", UNSCHEDULABLE)] * 3 + pull * 3
    cluster.lists = 9
    with caplog.at_level(logging.INFO):
        assert jobs.wait(NAMESPACE, JOB, 60) == "Complete"
    lines = warnings(caplog)
    assert len(lines) == 2, lines
    assert "Unschedulable" in lines[0] and "ErrImagePull: pull access denied" in lines[1]


@pytest.mark.parametrize("code", [403, 503])
def test_pods_that_cannot_be_listed_never_fail_the_wait(
    api: tuple[ClusterJobs, type[Api]], caplog: pytest.LogCaptureFixture, code: int
) -> None:
    """A Role from an older chart grants no `list` on pods: the wait still ends with the Job's outcome."""
    jobs, cluster = api
    cluster.refuse, cluster.lists, cluster.outcome = code, 3, "Failed"
    with caplog.at_level(logging.DEBUG, logger=job_pods.__name__):
        assert jobs.wait(NAMESPACE, JOB, 60) == "Failed"
    said = [r for r in caplog.records if "cannot list the pods" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.INFO, logging.DEBUG, logging.DEBUG]
    assert f"HTTP {code}" in said[0].getMessage() and not warnings(caplog)


def test_the_overall_timeout_and_its_error_are_kept(api: tuple[ClusterJobs, type[Api]]) -> None:
    jobs, cluster = api
    cluster.pods, cluster.lists = [pending_pod("Unschedulable", UNSCHEDULABLE)], 10**6
    with pytest.raises(TimeoutError, match=rf"^Job {NAMESPACE}/{JOB} did not finish within 0.3s$"):
        jobs.wait(NAMESPACE, JOB, 0.3)
    assert 1 <= len(cluster.asked) <= 7
    with pytest.raises(ValueError, match="timeout"):
        jobs.wait(NAMESPACE, JOB, float("nan"))


def test_a_backend_without_the_core_api_still_waits_on_the_job() -> None:

    class Backend:
        def wait(self, namespace: str, name: str, timeout_s: float) -> str:
            return "Complete"

    assert ClusterJobs(Backend()).wait(NAMESPACE, JOB, 60) == "Complete"


# --- which reason, and when: JobPods on its own clock ---------------------------------------------------------


def pod(reason: str, message: str = "") -> Any:
    """pending_pod as the client's V1Pod."""
    return client.ApiClient().deserialize(json.dumps(pending_pod(reason, message)), "V1Pod", "application/json")


@pytest.mark.parametrize(
    ("reason", "message"),
    [
        ("Unschedulable", UNSCHEDULABLE),
        ("ImagePullBackOff", 'Back-off pulling image "synpref/train:1"'),
        ("CreateContainerConfigError", 'secret "hf-token" not found'),
        ("CrashLoopBackOff", "back-off 5m0s restarting failed container"),
    ],
)
def test_the_reason_comes_from_the_condition_or_the_waiting_container(reason: str, message: str) -> None:
    assert job_pods.problem(pod(reason, message)) == (reason, message)
    running = pod("ContainerCreating")
    running.status.phase, running.status.container_statuses[0].state.waiting = "Running", None
    assert job_pods.problem(running) is None


def test_the_same_reason_is_repeated_after_repeat_s_and_a_slow_start_only_after_slow_s(
    caplog: pytest.LogCaptureFixture,
) -> None:
    watch = job_pods.JobPods(None, NAMESPACE, JOB)
    unschedulable = [("p", "Unschedulable", UNSCHEDULABLE)]
    with caplog.at_level(logging.WARNING, logger=job_pods.__name__):
        said = [watch.note(unschedulable, 1, now, now) for now in (0.0, 120.0, 800.0, 900.0, 1000.0)]
        assert [s is not None for s in said] == [True, False, False, True, False]
        creating = [("p", "ContainerCreating", "")]
        said = [watch.note(creating, 1, now, now) for now in (1000.0, 1500.0, 1600.0, 1700.0)]
        assert [s is not None for s in said] == [False, False, True, False]
    assert "ContainerCreating for 10m (a volume that does not mount" in str(said[2])
    assert "not running after 26m" in str(said[2])
