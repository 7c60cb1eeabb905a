"""The last mile in the cluster: the final RM trained by `kubectl create job --from=cronjob/<release>-train`
from the curated dataset on the volume, hot-loaded by the scorer, and read by RL-side clients.

- `train_from_the_cronjob`: the operator's command, then the Job to Complete (a Failed one fails
  at once, with its log).
- `check_serving`: the scorer's admin port (through a port-forward, with the token of the Secret
  the chart made) loads the checkpoint as `final`; `synpref.client` over a port-forward gets the
  same rewards, within 1e-4, as AutoModelForSequenceClassification on the checkpoint copied off
  the volume; OpenRLHF's `/get_reward` and vLLM's `/classify`, called from a pod in the namespace
  through the scorer's Service, agree with them.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from synpref.client import RewardClient
from tests.cluster.kube import KUBECTL, RELEASE, _describe, _free_port, _kubectl_json, _pod, _run, _wait_for

log = logging.getLogger("synpref.tests.cluster")
TOLERANCE = 1e-4
TRAIN_TIMEOUT_S = 900
CONVERSATIONS = [
    [
        {"role": "user", "content": f"Question {i}: how do I {task}?"},
        {"role": "assistant", "content": f"To {task}, start small. " + "Then check the result. " * (i % 4)},
    ]
    for i, task in enumerate(["boil an egg", "sort a list", "write a haiku", "fix a flat tyre", "learn chess"])
]


def _job_state(namespace: str, job: str) -> str:
    status = _kubectl_json("-n", namespace, "get", "job", job)["status"]
    for condition in status.get("conditions", []):
        if condition["status"] == "True" and condition["type"] in ("Complete", "Failed"):
            return str(condition["type"])
    return "Running"


def train_from_the_cronjob(namespace: str, job: str) -> float:
    """`kubectl create job --from=cronjob/<release>-train <job>`, waited to Complete; its seconds."""
    assert KUBECTL
    started = time.monotonic()
    _run([KUBECTL, "-n", namespace, "create", "job", f"--from=cronjob/{RELEASE}-train", job])
    states: list[str] = []

    def finished() -> bool:
        states.append(_job_state(namespace, job))
        return states[-1] != "Running"

    _wait_for(f"Job {job} to finish", TRAIN_TIMEOUT_S, finished, lambda: _describe(namespace))
    logs = _run([KUBECTL, "-n", namespace, "logs", f"job/{job}", "--tail=30"], check=False)
    assert states[-1] == "Complete", f"Job {job} {states[-1]}:\n{logs}\n{_describe(namespace)}"
    log.info("Job %s (from the CronJob) Complete in %.0fs; log tail:\n%s", job, time.monotonic() - started, logs)
    return time.monotonic() - started


@contextmanager
def port_forward(namespace: str, target: str, *remote_ports: int) -> Iterator[list[int]]:
    """`kubectl port-forward <target> local:remote ...`; the local ports, once the first one accepts."""
    assert KUBECTL
    local = [_free_port() for _ in remote_ports]
    mapping = [f"{here}:{there}" for here, there in zip(local, remote_ports, strict=True)]
    proc = subprocess.Popen(
        [KUBECTL, "-n", namespace, "port-forward", target, *mapping],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", local[0]), timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.terminate()
                    why = proc.communicate(timeout=10)[1]
                    raise AssertionError(f"port-forward {target} {mapping} failed: {why}") from None
                time.sleep(0.3)
        yield local
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _post(url: str, body: dict[str, Any], token: str = "") -> Any:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


class Reference:
    """Rewards straight from AutoModelForSequenceClassification: logits[0][0], one conversation at a time."""

    def __init__(self, path: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()

    def rendered(self, messages: list[dict[str, str]]) -> str:
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False))

    def reward(self, messages: list[dict[str, str]]) -> float:
        encoded = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
        with torch.no_grad():
            return float(self.model(torch.tensor([encoded["input_ids"]])).logits[0][0])


# Run in a release pod (`python -`): the shims through the scorer's Service, as an RL pod would call them.
SHIMS_IN_POD = """
import json, sys, urllib.request
base, model, texts = sys.argv[1], sys.argv[2], json.loads(sys.stdin.readline())
def post(path, body):
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())
rewards = post("/get_reward", {"query": texts, "model": model})["rewards"]
classified = [d["probs"][-1] for d in post("/classify", {"model": model, "input": texts})["data"]]
print(json.dumps({"get_reward": rewards, "classify": classified}))
"""


def check_serving(
    namespace: str, checkpoint: str, base: Path, tmp_path: Path, model: str = "final"
) -> dict[str, float]:
    """Load `checkpoint` (a path on the volume, trained from `base`) into the scorer as `model` and check
    what clients get; the largest difference from the reference of each way in."""
    assert KUBECTL
    local = tmp_path / "checkpoint"
    writer = _pod(namespace, "writer")
    _run([KUBECTL, "-n", namespace, "cp", f"{writer}:{checkpoint}", str(local)], timeout=300)
    reference = Reference(local)
    expected = [reference.reward(c) for c in CONVERSATIONS]
    texts = [reference.rendered(c) for c in CONVERSATIONS]

    secret = _kubectl_json("-n", namespace, "get", "secret", f"{RELEASE}-scorer-admin")
    token = base64.b64decode(secret["data"]["token"]).decode().strip()
    scorer = _pod(namespace, "scorer")
    with port_forward(namespace, f"pod/{scorer}", 8081, 50060) as (admin, grpc_port):
        loaded = _post(
            f"http://127.0.0.1:{admin}/admin/reload", {"model": model, "path": checkpoint, "version": "cronjob"}, token
        )
        log.info("scorer loaded %s", loaded)
        assert loaded["model"] == model and loaded["version"] == "cronjob", loaded
        with RewardClient(f"127.0.0.1:{grpc_port}", timeout=60) as client:
            got = client.score(CONVERSATIONS, model=model)
            pair = client.score_pairs(
                [
                    {
                        "conversation": CONVERSATIONS[0][:1],
                        "chosen": CONVERSATIONS[0][1:],
                        "rejected": CONVERSATIONS[1][1:],
                    }
                ],
                model=model,
            )[0]

    script = [KUBECTL, "-n", namespace, "exec", "-i", writer, "--", "python", "-c", SHIMS_IN_POD]
    shims = json.loads(_run([*script, f"http://{RELEASE}-scorer:8080", model], stdin=json.dumps(texts) + "\n"))

    gaps = {
        "grpc client": max(abs(a - b) for a, b in zip(got, expected, strict=True)),
        "/get_reward": max(abs(a - b) for a, b in zip(shims["get_reward"], expected, strict=True)),
        "/classify": max(abs(a - b) for a, b in zip(shims["classify"], expected, strict=True)),
    }
    log.info("final RM rewards %s; largest gap to AutoModelForSequenceClassification: %s", expected, gaps)
    for way, gap in gaps.items():
        assert gap <= TOLERANCE, f"{way}: {gap} > {TOLERANCE}: expected {expected}, got {got}, shims {shims}"
    assert abs(pair.reward_chosen - expected[0]) <= TOLERANCE, (pair, expected[0])
    assert pair.version == "cronjob", pair
    # The checkpoint was trained: its rewards moved away from those of the model it started from.
    moved = max(abs(a - Reference(base).reward(c)) for a, c in zip(expected, CONVERSATIONS, strict=True))
    log.info("largest change of a reward from the base model by training: %.4f", moved)
    assert moved > 1e-3, f"the trained checkpoint scores like its base ({moved})"
    return gaps
