"""`synpref run` as a user runs it: a real subprocess, the MiniLM head trainer, SIGKILL and resume.

A reference run goes through uninterrupted; a second run on the same data is killed with
SIGKILL while a Stage-1 training step is in flight, then started again with the same
command. It must resume (not redo finished steps) and end with the same pools, decisions,
dataset rows and accuracies as the reference.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from testing.controller_fakes import write_synthetic
from testing.numerics import fp32_forward_tolerance, near_ties

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def config(tmp_path: Path, name: str, data: Path) -> Path:
    values = {
        "controller": {
            "workdir": str(tmp_path / name),
            "sources": [str(data)],
            "holdout_fraction": 0.2,
            "seed_fraction": 0.15,
            "iterations": 2,
            "patience": 2,
            "human_budget": 4,
            "max_length": 48,
            "head_steps": 60,
            "head_eval_every": 20,
            "study": {
                "human": "oracle",
                "label_noise": 0.3,
                "judges": [{"name": "sim-a", "accuracy": 0.85}, {"name": "sim-b", "accuracy": 0.75}],
            },
        }
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def run(cfg: Path, kill_at: str | None = None) -> tuple[int, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "synpref.shared.cli", "run", "--config", str(cfg)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 600
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if kill_at and line.startswith(f"[{kill_at}] ..."):
            proc.send_signal(signal.SIGKILL)
            break
        assert time.monotonic() < deadline, "synpref run took too long"
    rc = proc.wait(timeout=60)
    proc.stdout.close()
    return rc, "".join(lines)


def outcome(workdir: Path) -> dict:
    from synpref.services.controller.state import read_pools

    state = json.loads((workdir / "state.json").read_text())
    rows = {}
    for version, written in state["results"]["datasets"].items():
        folder = Path(written["dir"])
        manifest = json.loads((folder / "manifest.json").read_text())
        table = [r for s in manifest["shards"] for r in pq.read_table(folder / s["file"]).to_pylist()]
        rows[version] = sorted((r["id"], r["decision"]["decision"], r["split"], json.dumps(r["chosen"])) for r in table)
    return {
        "pools": read_pools(workdir),
        "history": state["history"],
        "stage1": state["results"]["stage1"],
        "stage2": state["results"]["stage2"],
        "holdout": state["results"]["holdout_accuracy"],
        "rows": rows,
        "final": state["models"]["final"]["version"],
    }


def test_killed_run_resumes_and_matches_an_uninterrupted_one(tmp_path):
    data = write_synthetic(tmp_path / "pairs.jsonl", 60, seed=2)
    rc, out = run(config(tmp_path, "reference", data))
    assert rc == 0, out[-3000:]
    assert "serve it:" in out and "synpref scorer --config" in out
    reference = tmp_path / "reference"
    assert (reference / "report.md").exists() and (reference / "models" / "best" / "config.json").exists()

    cfg = config(tmp_path, "killed", data)
    rc, out = run(cfg, kill_at="s1.2.train")
    assert rc == -signal.SIGKILL, out[-3000:]
    killed = tmp_path / "killed"
    done = json.loads((killed / "state.json").read_text())["done"]
    assert "s1.1.curate" in done and "s1.2.train" not in done

    rc, out = run(cfg)
    assert rc == 0, out[-3000:]
    assert f"{len(done)} steps already done" in out
    assert "[seed] ..." not in out and "[s1.1.curate] ..." not in out, "finished steps are not redone"
    resumed, ref = outcome(killed), outcome(reference)
    assert resumed == ref
    assert set(ref["rows"]) == {"human-verified", "kept", "curated", "heldout"}
    assert len(ref["rows"]["heldout"]) == len(ref["pools"]["holdout"]) > 0
    served_accuracy_matches(reference)


def served_accuracy_matches(workdir: Path) -> None:
    """The registered final RM, served by the scorer from scorer.yaml, scores the held-out pairs
    exactly as the loop measured them."""
    from synpref.client import RewardClient
    from synpref.services.controller.state import StateStore, read_pools, read_records
    from synpref.services.gold_scorer.scoring import pair_dict
    from synpref.services.scorer.server import BackgroundScorer
    from synpref.shared.config import ScorerSettings

    state = StateStore(workdir).load()
    records = read_records(workdir)
    pairs = [pair_dict(records[k]) for k in read_pools(workdir)["holdout"]]
    scorer = yaml.safe_load((workdir / "models" / "scorer.yaml").read_text())["scorer"]
    settings = ScorerSettings(**scorer, port=0, http_port=0, metrics_port=0)
    bg = BackgroundScorer(settings).start()
    try:
        with RewardClient(bg.address, timeout=60) as client:
            scores = client.score_pairs(pairs, model="best")
    finally:
        bg.stop()
    # The loop scored with its head on cached features, the scorer runs the exported checkpoint:
    # the same fp32 model in other kernels, so only pairs tied within that rounding may change side.
    rewards = [(s.reward_chosen, s.reward_rejected) for s in scores]
    tolerance = fp32_forward_tolerance(max(abs(r) for pair in rewards for r in pair))
    served = sum(c > r for c, r in rewards)
    measured = round(state.results["holdout_accuracy"]["final"] * len(rewards))
    assert abs(served - measured) <= near_ties(rewards, tolerance)
