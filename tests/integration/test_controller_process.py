"""`synpref controller` as a pod runs it: health for the probes, the loop, then idle until SIGTERM.

The chart probes the controller with grpc.health.v1 and runs it in a Deployment, so the
process must answer health while the loop runs and stay up (not exit and be restarted)
once the loop is finished.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from testing.controller_fakes import write_synthetic

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def test_controller_serves_health_finishes_and_stops_on_sigterm(tmp_path):
    data = write_synthetic(tmp_path / "pairs.jsonl", 40, seed=3)
    values = {
        "service": {"host": "127.0.0.1", "grpc_port": 0, "metrics_port": 0, "shutdown_grace_s": 1},
        "controller": {
            "workdir": str(tmp_path / "work"),
            "sources": [str(data)],
            "iterations": 1,
            "human_budget": 4,
            "max_length": 48,
            "head_steps": 40,
            "head_eval_every": 20,
            "study": {"human": "oracle", "judges": [{"name": "sim-a", "accuracy": 0.85}]},
        },
    }
    cfg = tmp_path / "controller.yaml"
    cfg.write_text(yaml.safe_dump(values))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "synpref.shared.cli", "controller", "--config", str(cfg)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    port = None
    finished = False
    deadline = time.monotonic() + 300
    try:
        for line in proc.stdout:
            lines.append(line)
            found = re.search(r"controller ready: grpc=127\.0\.0\.1:(\d+)", line)
            if found:
                port = int(found.group(1))
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            if "curation finished" in line:
                finished = True
                break
            assert time.monotonic() < deadline, "controller took too long:\n" + "".join(lines[-50:])
        assert port is not None and finished, "".join(lines[-50:])
        time.sleep(0.5)
        assert proc.poll() is None, "a finished controller must stay up for its Deployment"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
