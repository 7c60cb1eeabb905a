"""A real `helm install` of charts/synpref on a live cluster, then `helm uninstall`.

Runs only against a live cluster whose node already holds the locally built images
(`make cluster`, `bash tools/cluster/project-images.sh cpu kafka`; docs/cluster.md): KUBECONFIG
must point at it. Otherwise the test is skipped and says why. `make test` runs it through
tools/cluster/test.sh, which starts that cluster and builds the images first.

    KUBECONFIG=$PWD/.cache/cluster/admin.kubeconfig .venv/bin/python -m pytest -m cluster tests/cluster -s

The release comes up in two steps, as a user brings one up: `helm install` without the scorer
(the chart creates the data PVC, which the scorer's model goes on), the tiny reward model
copied onto the PVC through the writer's pod, then `helm upgrade` with tests/cluster/values.yaml
as it is. Both steps run the hook Jobs (secrets before, topics after); a `kubectl --watch` records
them reaching Complete, since Helm deletes a hook Job as soon as it succeeded.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.cluster.kube import (
    HELM,
    IMAGES,
    INSTALL_TIMEOUT_S,
    KUBECTL,
    RELEASE,
    REPO,
    VALUES,
    _describe,
    _helm,
    _kubectl_json,
    _pods,
    _run,
    _unready,
    _wait_for,
)

# Above the two helm waits (INSTALL_TIMEOUT_S each), so a stuck install fails with its own diagnostics.
pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(2 * INSTALL_TIMEOUT_S + 600)]

log = logging.getLogger("synpref.tests.cluster")
# What `helm uninstall` leaves on purpose (docs/deploy.md): the token Secrets the secrets hook
# made (they belong to no release) and the data PVC (helm.sh/resource-policy: keep). The dev
# broker's PVC goes with its StatefulSet (persistentVolumeClaimRetentionPolicy).
KEPT = {
    ("Secret", f"{RELEASE}-desk-tokens"),
    ("Secret", f"{RELEASE}-scorer-admin"),
    ("Secret", f"{RELEASE}-grpc-token"),
    ("PersistentVolumeClaim", f"{RELEASE}-data"),
}
# Objects every namespace has, or that the API server makes by itself.
NAMESPACE_DEFAULTS = {("ConfigMap", "kube-root-ca.crt"), ("ServiceAccount", "default")}
HOOK_JOBS = (f"{RELEASE}-secrets", f"{RELEASE}-topics")


class JobWatch:
    """`kubectl get jobs --watch` in the background: every condition each Job reached."""

    def __init__(self, namespace: str) -> None:
        assert KUBECTL
        self.conditions: dict[str, set[str]] = {}
        self._lock = threading.Lock()
        self._proc = subprocess.Popen(
            [KUBECTL, "-n", namespace, "get", "jobs", "--watch", "--output-watch-events", "-o", "json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout
        decoder = json.JSONDecoder()
        buffer = ""
        for line in self._proc.stdout:
            buffer += line
            while buffer.strip():
                try:
                    event, end = decoder.raw_decode(buffer.lstrip())
                except json.JSONDecodeError:
                    break  # an object still being written
                buffer = buffer.lstrip()[end:]
                job = event.get("object", {})
                reached = {c["type"] for c in job.get("status", {}).get("conditions", []) if c.get("status") == "True"}
                with self._lock:
                    self.conditions.setdefault(job.get("metadata", {}).get("name", "?"), set()).update(reached)

    def reached(self, job: str, condition: str) -> bool:
        with self._lock:
            return condition in self.conditions.get(job, set())

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=10)


def _leftovers(namespace: str) -> set[tuple[str, str]]:
    """(kind, name) of every object in the namespace, events and endpoint slices aside."""
    assert KUBECTL
    kinds = _run([KUBECTL, "api-resources", "--verbs=list", "--namespaced", "-o", "name"]).split()
    skip = {"events", "events.events.k8s.io", "endpointslices.discovery.k8s.io", "endpoints"}
    listed = _kubectl_json("-n", namespace, "get", ",".join(k for k in kinds if k not in skip))
    return {(item["kind"], item["metadata"]["name"]) for item in listed["items"]}


def _orphans(namespace: str) -> set[tuple[str, str]]:
    return _leftovers(namespace) - KEPT - NAMESPACE_DEFAULTS


def test_install_every_pod_ready_and_uninstall_leaves_only_kept(namespace: str, tmp_path: Path) -> None:
    assert KUBECTL and HELM
    started = time.monotonic()
    model = tmp_path / "tiny-rm"
    _run([sys.executable, "-m", "testing.tiny", str(model)], timeout=300)
    jobs = JobWatch(namespace)
    try:
        chart = str(REPO / "charts/synpref")
        base = ["-n", namespace, "-f", str(VALUES)]
        installed_s = _helm("install", RELEASE, chart, *base, "--set", "scorer.enabled=false")
        log.info("helm install (no scorer) took %.0fs", installed_s)
        _wait_for("every pod Ready after install", 300, lambda: not _unready(namespace), lambda: _describe(namespace))
        for job in HOOK_JOBS:
            assert jobs.reached(job, "Complete"), f"hook Job {job} never reached Complete: {jobs.conditions}"

        writer = next(
            p["metadata"]["name"] for p in _pods(namespace) if p["metadata"]["name"].startswith(f"{RELEASE}-writer")
        )
        _run([KUBECTL, "-n", namespace, "exec", writer, "--", "mkdir", "-p", "/data/models"])
        _run([KUBECTL, "-n", namespace, "cp", str(model), f"{writer}:/data/models/tiny-rm"], timeout=300)

        upgraded_s = _helm("upgrade", RELEASE, chart, *base)
        log.info("helm upgrade (scorer on) took %.0fs", upgraded_s)
        _wait_for("every pod Ready after upgrade", 300, lambda: not _unready(namespace), lambda: _describe(namespace))
        pods = _pods(namespace)
        components = {p["metadata"]["labels"].get("app.kubernetes.io/component") for p in pods}
        assert {"scorer", "desk", "kafka", "gold-scorer", "filter", "writer"} <= components, components
        # The CPU image (the scorer's here) preloads tcmalloc; the scorer logs which malloc it got.
        scorer_log = _run([KUBECTL, "-n", namespace, "logs", f"deploy/{RELEASE}-scorer"])
        assert "memory allocator: tcmalloc" in scorer_log, scorer_log[-2000:]

        # `helm test`: the chart's test Pod asks every stage, the scorer and the desk for their health.
        # A passed test Pod is deleted at once (its hook policy), so its log is not asked for here.
        tested = _run([HELM, "test", RELEASE, "-n", namespace, "--timeout", "300s"], timeout=360)
        log.info("helm test:\n%s", tested[: tested.find("NOTES:")])
        assert re.search(r"Phase:\s+Succeeded", tested), tested

        version = _kubectl_json("version")["serverVersion"]["gitVersion"]
        node = _kubectl_json("get", "nodes")["items"][0]["status"]["nodeInfo"]
        log.info("Kubernetes %s, node runtime %s", version, node["containerRuntimeVersion"])
        digests = {
            (s["image"], s["imageID"])
            for p in pods
            for s in p["status"].get("containerStatuses", [])
            if s.get("imageID")
        }
        for image, digest in sorted(digests):
            log.info("image %s = %s", image, digest)
        assert {image for image, _ in digests} >= set(IMAGES)

        _run([HELM, "uninstall", RELEASE, "-n", namespace, "--wait", "--timeout", "300s"], timeout=360)
    finally:
        jobs.stop()
    # Deletion is asynchronous (the garbage collector, finalizers): wait until only the kept
    # objects are left, and fail naming the rest.
    _wait_for(
        "helm uninstall to leave only the kept Secrets and PVC",
        180,
        lambda: not _orphans(namespace),
        lambda: f"left: {sorted(_orphans(namespace))}",
    )
    missing = KEPT - _leftovers(namespace)
    assert not missing, f"objects the chart keeps on purpose are gone: {sorted(missing)}"
    log.info("install, upgrade, uninstall in %.0fs", time.monotonic() - started)
