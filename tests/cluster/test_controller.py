"""The curation loop in the cluster: the controller, its training Jobs, the scorer's hot reload, the desk.

The release of values.yaml + pipeline-values.yaml + controller-values.yaml. The controller starts
before its pairs are on the volume and waits for them (Ready meanwhile, so `helm install --wait`
passes and the topics hook runs). The test then copies the models and 150 PandaLM pairs in and
answers every pair the desk shows, over HTTP through `kubectl port-forward`, with the token the
secrets hook made. The controller runs seed, Stage 1, Stage 2 and the final steps through the
stage pods and the dev judges, trains each RM as a Kubernetes Job under its own ServiceAccount,
and hot-reloads the scorer with them; the test waits for "curation finished" and checks the Jobs,
the reloads, the report and the datasets on the volume. Mid-run the controller's pod is force-deleted
twice (waiting for a training Job, then in Stage 2): every pair taken in must still end in exactly one
pool and the curated dataset must hold each curated pair once.

    KUBECONFIG=$PWD/.cache/cluster/admin.kubeconfig .venv/bin/python -m pytest -m cluster tests/cluster -s
"""

from __future__ import annotations

import ast
import base64
import json
import logging
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from testing.judge_server import build_tiny_chat_lm
from tests.cluster.kube import (
    HELM,
    KUBECTL,
    PANDALM,
    PIPELINE_VALUES,
    RELEASE,
    REPO,
    VALUES,
    _describe,
    _free_port,
    _helm,
    _kubectl_json,
    _pod,
    _run,
)

# Above LOOP_TIMEOUT_S and the install, so a stall fails with the controller's log.
pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(2400)]

log = logging.getLogger("synpref.tests.cluster")
CONTROLLER_VALUES = Path(__file__).with_name("controller-values.yaml")
LOOP_TIMEOUT_S = 1200
OUTCOMES_SCRIPT = Path(__file__).with_name("controller_outcomes_in_pod.py")


class DeskHumans:
    """Answers every pair the desk shows (1 and 2 in turn), through a port-forward it restarts
    whenever the desk pod changes."""

    def __init__(self, namespace: str) -> None:
        assert KUBECTL
        secret = _kubectl_json("-n", namespace, "get", "secret", f"{RELEASE}-desk-tokens")
        entry = base64.b64decode(secret["data"]["tokens"]).decode().split()[0]
        self.token = entry.split(":", 1)[1]
        self.namespace = namespace
        self.answered = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _forward(self) -> tuple[subprocess.Popen[bytes], str]:
        assert KUBECTL
        port = _free_port()
        args = [KUBECTL, "-n", self.namespace, "port-forward", f"svc/{RELEASE}-desk", f"{port}:8000"]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2)
        return proc, f"http://127.0.0.1:{port}"

    def _call(self, url: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        with urllib.request.urlopen(urllib.request.Request(url + path, data=data, headers=headers), timeout=30) as r:
            return dict(json.loads(r.read()))

    def _run(self) -> None:
        proc, url = self._forward()
        try:
            while not self.stop.is_set():
                try:
                    pair = self._call(url, "/api/next")["pair"]
                    if pair:
                        choice = 1 + self.answered % 2
                        self._call(url, "/api/verdict", {"pair_id": pair["pair_id"], "choice": choice})
                        self.answered += 1
                    else:
                        self.stop.wait(2)
                except (urllib.error.URLError, OSError):
                    proc.terminate()
                    self.stop.wait(2)
                    proc, url = self._forward()
        finally:
            proc.terminate()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=40)


def _job_names(namespace: str) -> list[str]:
    return [job["metadata"]["name"] for job in _kubectl_json("-n", namespace, "get", "jobs")["items"]]


def _force_delete_controller(namespace: str) -> tuple[str, str]:
    """Force-delete the running controller pod; its name and its log up to then."""
    assert KUBECTL
    victim = _pod(namespace, "controller")
    before = _run([KUBECTL, "-n", namespace, "logs", victim], check=False)
    _run([KUBECTL, "-n", namespace, "delete", "pod", victim, "--grace-period=0", "--force"])
    log.info("force-deleted %s after: %s", victim, before.strip().splitlines()[-1:] if before.strip() else "")
    return victim, before


def _every_pair_once(namespace: str, first_log: str) -> None:
    """Every pair the intake took in (the first pod's "[ingest] done" line) ended in one pool, none still
    unverified, and the curated dataset holds the curated pools' pairs, each once."""
    assert KUBECTL
    taken = re.search(r"\[ingest\] done in [0-9.]+s\s+pools: (\{[^}]*\})", first_log)
    assert taken, f"no '[ingest] done' line in the first controller's log:\n{first_log[-3000:]}"
    ingested = sum(ast.literal_eval(taken.group(1)).values())
    script = OUTCOMES_SCRIPT.read_text()
    report = json.loads(
        _run([KUBECTL, "-n", namespace, "exec", "-i", _pod(namespace, "writer"), "--", "python", "-"], stdin=script)
    )
    log.info(
        "controller outcomes after two kills: ingested %d, pools %s, %d curated rows",
        ingested,
        report["pools"],
        len(report["row_ids"]),
    )
    assert report["stored"] == sum(report["pools"].values()) == ingested > 0, (ingested, report["pools"])
    assert report["pools"]["unverified"] == 0, report["pools"]
    rows = report["row_ids"]
    assert len(rows) == len(set(rows)), "a curated row is written twice"
    assert sorted(rows) == sorted(report["curated_ids"]), "the curated dataset differs from the curated pools"


def test_the_controller_runs_the_loop_with_jobs_reloads_and_the_desk(namespace: str, tmp_path: Path) -> None:
    assert KUBECTL and HELM
    started = time.monotonic()
    models = tmp_path / "models"
    _run([sys.executable, "-m", "testing.tiny", str(models / "tiny-base")], timeout=300)
    _run([sys.executable, "-m", "testing.tiny", str(models / "tiny-rm")], timeout=300)
    build_tiny_chat_lm(models / "judge-a", seed=1)
    build_tiny_chat_lm(models / "judge-b", seed=2)

    chart = str(REPO / "charts/synpref")
    values = ["-f", str(VALUES), "-f", str(PIPELINE_VALUES), "-f", str(CONTROLLER_VALUES)]
    installed_s = _helm("install", RELEASE, chart, "-n", namespace, *values)
    log.info("helm install with the controller (no sources yet) took %.0fs", installed_s)
    controller = _pod(namespace, "controller")
    waiting = _run([KUBECTL, "-n", namespace, "logs", controller])
    assert "waiting for sources" in waiting, waiting[-2000:]

    writer = _pod(namespace, "writer")
    _run([KUBECTL, "-n", namespace, "exec", writer, "--", "mkdir", "-p", "/data/input"])
    _run([KUBECTL, "-n", namespace, "cp", str(models), f"{writer}:/data/models"], timeout=300)
    _run([KUBECTL, "-n", namespace, "cp", str(PANDALM), f"{writer}:/data/input/pandalm.json"], timeout=300)

    humans = DeskHumans(namespace)
    # Chaos: the controller's pod force-deleted (no SIGTERM) while it waits for its first training Job,
    # and its replacement force-deleted again once it is in Stage 2 (pairs out on Kafka); each new pod
    # resumes from the state on the volume. Each victim's log is kept (its pod is gone afterwards).
    kills: list[tuple[str, str]] = []
    try:
        deadline = time.monotonic() + LOOP_TIMEOUT_S
        logs = [KUBECTL, "-n", namespace, "logs", f"deploy/{RELEASE}-controller"]
        # A replacement pod that is not running yet has no log to show.
        while "curation finished" not in (text := _run(logs, check=False)):
            if time.monotonic() > deadline:
                tail = f"{text[-3000:]}\n{_describe(namespace)}"
                raise AssertionError(f"no 'curation finished' after {LOOP_TIMEOUT_S}s:\n{tail}")
            first = not kills and any(n.startswith("rm-working-1-") for n in _job_names(namespace))
            if first or (len(kills) == 1 and "[s2.curate] ..." in text):
                kills.append(_force_delete_controller(namespace))
            time.sleep(3)
    finally:
        humans.close()
    log.info("loop finished in %.0fs; the desk's humans answered %d pairs", time.monotonic() - started, humans.answered)
    assert humans.answered >= 16  # the seed, at least
    assert len(kills) == 2, f"the controller was killed {len(kills)} times, not twice: {[k for k, _ in kills]}"
    _every_pair_once(namespace, kills[0][1])

    pod = _kubectl_json("-n", namespace, "get", "pod", _pod(namespace, "controller"))
    assert pod["spec"]["serviceAccountName"] == f"{RELEASE}-controller"
    jobs = _kubectl_json("-n", namespace, "get", "jobs")["items"]
    done = {
        j["metadata"]["name"]
        for j in jobs
        if any(c["type"] == "Complete" and c["status"] == "True" for c in j["status"].get("conditions", []))
    }
    log.info("training Jobs completed: %s", sorted(done))
    for role in ("working-1", "final", "gold"):
        assert any(name.startswith(f"rm-{role}-") for name in done), (role, sorted(done))
    # The first replacement adopted the Job its predecessor was waiting for instead of starting another.
    assert not [name for name in _job_names(namespace) if name.startswith("rm-working-1-") and "-a1" not in name]
    reloads = [line for line in text.splitlines() if "scorer reloaded" in line]
    assert any('"version": "final-' in line for line in reloads), reloads
    assert any('"model": "gold"' in line for line in reloads), reloads
    # An operator's reload and unload as docs/deploy.md writes them: the CLI in the controller's pod, its
    # admin URL and token file from the chart, the checkpoint path relative to the scorer's model_root.
    operator = [KUBECTL, "-n", namespace, "exec", f"deploy/{RELEASE}-controller", "--", "synpref", "scorer"]
    reloaded = json.loads(_run([*operator, "reload", "canary", "models/tiny-rm", "--version", "operator-1"]))
    assert (reloaded["model"], reloaded["version"]) == ("canary", "operator-1"), reloaded
    assert json.loads(_run([*operator, "unload", "canary"])) == {"unloaded": "canary"}
    log.info("operator reload and unload through `synpref scorer` in the controller's pod: %s", reloaded)

    listing = _run([KUBECTL, "-n", namespace, "exec", writer, "--", "ls", "/data/controller/datasets/synpref"])
    assert {"curated", "human-verified", "kept"} <= set(listing.split()), listing
    report = _run([KUBECTL, "-n", namespace, "exec", writer, "--", "cat", "/data/controller/report.md"])
    assert "## Final RM" in report
    log.info("controller loop in the cluster: %.0fs in all", time.monotonic() - started)
