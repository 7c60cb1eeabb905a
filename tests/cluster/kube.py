"""What the cluster tests share: the tools, the release's names, running kubectl and helm, waiting.

The tests run against a live cluster whose node holds the locally built images, named by
KUBECONFIG: `make test` makes one with tools/cluster/test.sh (`make cluster`,
`bash tools/cluster/project-images.sh cpu kafka` by hand; docs/cluster.md). `_skip_reason` says
why not when there is none.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
VALUES = Path(__file__).with_name("values.yaml")
# Its name holds the chart's, so the objects are named synpref-<part>.
RELEASE = "synpref"
# The images tests/cluster/values.yaml names with pullPolicy Never: they must be on the node.
IMAGES = ("localhost/synpref/cpu:dev", "localhost/synpref/kafka:4.4.0")
PIPELINE_VALUES = Path(__file__).with_name("pipeline-values.yaml")  # the Stage-2 pipeline with judges
PANDALM = REPO.parent / "shared" / "data" / "PandaLM" / "testset-v1.json"
INSTALL_TIMEOUT_S = 900


def _tool(name: str, cached: Path) -> str | None:
    return str(cached) if cached.is_file() else shutil.which(name)


KUBECTL = _tool("kubectl", REPO / ".cache/cluster-bin/kubectl")
HELM = _tool("helm", REPO / ".cache/bin/helm")


def _free_port() -> int:
    """A loopback port nothing listens on now (for a port-forward's local end)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(args: list[str], timeout: float = 120, check: bool = True, stdin: str | None = None) -> str:
    proc = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def _kubectl_json(*args: str) -> Any:
    assert KUBECTL
    return json.loads(_run([KUBECTL, *args, "-o", "json"]))


def _skip_reason() -> str | None:
    """Why this machine has no cluster to install on, or None."""
    if os.environ.get("SYNPREF_CLUSTER_UNAVAILABLE"):
        # tools/cluster/test.sh found that this machine cannot host the cluster.
        return f"this machine cannot host the cluster: {os.environ['SYNPREF_CLUSTER_UNAVAILABLE']}"
    if not os.environ.get("KUBECONFIG"):
        return "KUBECONFIG is not set (start one with `make cluster`)"
    if not all(Path(f).is_file() for f in os.environ["KUBECONFIG"].split(os.pathsep)):
        # kubectl would fall back to localhost:8080 without saying so.
        return f"KUBECONFIG={os.environ['KUBECONFIG']} names no file (the cluster is down)"
    if not KUBECTL or not HELM:
        return "kubectl or helm not found (.cache/cluster-bin/kubectl, .cache/bin/helm or PATH)"
    proc = subprocess.run([KUBECTL, "get", "--raw", "/readyz"], capture_output=True, text=True, timeout=20)
    if proc.returncode != 0:
        return f"no live cluster at KUBECONFIG={os.environ['KUBECONFIG']}: {proc.stderr.strip()[:200]}"
    nodes = json.loads(_run([KUBECTL, "get", "nodes", "-o", "json"]))["items"]
    # Images known only by their ID (a replaced build) have names: null.
    on_node = {
        name for node in nodes for image in node["status"].get("images", []) for name in image.get("names") or []
    }
    missing = [image for image in IMAGES if image not in on_node]
    if missing:
        return f"the node lacks {missing} (tools/cluster/project-images.sh cpu kafka)"
    return None


def _wait_for(what: str, seconds: float, condition: Callable[[], bool], detail: Callable[[], str]) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:.0f}s waiting for {what}:\n{detail()}")
        time.sleep(2)


def _pods(namespace: str) -> list[dict[str, Any]]:
    return _kubectl_json("-n", namespace, "get", "pods")["items"]


def _unready(namespace: str) -> list[str]:
    """Pods that are not Ready, except those of finished Jobs."""
    out = []
    for pod in _pods(namespace):
        if pod["status"].get("phase") == "Succeeded":
            continue
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))
        if not ready:
            out.append(pod["metadata"]["name"])
    return out


def _describe(namespace: str) -> str:
    assert KUBECTL
    pods = _run([KUBECTL, "-n", namespace, "get", "pods,jobs,pvc", "-o", "wide"], check=False)
    events = _run([KUBECTL, "-n", namespace, "get", "events", "--sort-by=.lastTimestamp"], check=False)
    return f"{pods}\n{events[-4000:]}"


def _log_tails(namespace: str, lines: int = 15) -> str:
    """The last lines of every running pod's log (a stall's first clue)."""
    assert KUBECTL
    out = []
    for pod in _pods(namespace):
        if pod["status"].get("phase") != "Running":
            continue
        name = pod["metadata"]["name"]
        tail = _run([KUBECTL, "-n", namespace, "logs", name, "--all-containers", f"--tail={lines}"], check=False)
        out.append(f"--- {name}\n{tail}")
    return "\n".join(out)


def _helm(*args: str) -> float:
    assert HELM
    started = time.monotonic()
    _run(
        [HELM, *args, "--wait", "--wait-for-jobs", "--timeout", f"{INSTALL_TIMEOUT_S}s"], timeout=INSTALL_TIMEOUT_S + 60
    )
    return time.monotonic() - started


def _pod(namespace: str, component: str, wait_s: float = 180) -> str:
    """A Running pod of `component`, waiting up to wait_s for one (a replacement after a kill)."""
    deadline = time.monotonic() + wait_s
    while True:
        for pod in _pods(namespace):
            meta = pod["metadata"]
            mine = meta.get("labels", {}).get("app.kubernetes.io/component") == component
            if mine and pod["status"].get("phase") == "Running" and not meta.get("deletionTimestamp"):
                return str(meta["name"])
        if time.monotonic() > deadline:
            raise AssertionError(f"no running {component} pod:\n{_describe(namespace)}")
        time.sleep(2)
