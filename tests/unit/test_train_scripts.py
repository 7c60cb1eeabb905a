"""The GPU benchmark scripts run end to end without a GPU (--dry-run, --smoke), so a GPU
session spends its minutes measuring, not debugging."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, *args: str, timeout: float = 600) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow  # a fresh process imports torch and transformers
def test_gpu_train_mfu_dry_run_prints_the_flop_arithmetic_and_the_h200_budget():
    out = run("gpu_train_mfu.py", "--dry-run")
    assert "596.1M parameters" in out and "4.052 GFLOP (full attention)" in out
    assert "auto token budget on an H200" in out and "needs 109,832 tokens/s" in out


@pytest.mark.slow  # trains a 2-layer model for 3 steps through RewardTrainer
def test_gpu_train_mfu_smoke_trains_through_the_trainer(tmp_path):
    out = run("gpu_train_mfu.py", "--smoke", "--packing", "on", "--json", str(tmp_path / "r.json"))
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["packed"] is True and result["tokens_per_s"] > 0 and "training tokens/s" in out


@pytest.mark.slow  # a fresh process imports torch and transformers and serves a shrunk model
def test_gpu_scorer_load_dry_run_completes():
    cpu = str(min(os.sched_getaffinity(0)))  # the dry run is on CPU: bind the forwards and the ceiling there
    out = run("gpu_scorer_load.py", "--dry-run", "--cpu-binding", cpu)
    assert f"CPU binding forwards and ceiling on CPUs {cpu};" in out
    assert "scorer / ceiling (b), throughput" in out
    assert "ceiling / scorer, grpc-stream CPU cost" in out  # the clients also ran on ScoreStreams
    assert "ceiling / scorer, grpc-stream-ids CPU cost" in out  # and sent token ids on them
    # Each item's reward came back to its own item, though two client processes sent them (every other item each).
    diffs = [float(x) for x in re.findall(r"max \|reward - offline\| (\S+)", out)]
    assert len(diffs) == 4 and max(diffs) < 1e-4, diffs  # fp32 batched vs batched: a few ulps of float32
