"""benchmarks/scorer_load.py at a small size with its CPU method: the scorer row and the offline
ceiling take turns (benchmarks/interleave.py), the report pairs each row with its ceiling, and the
A/A check runs the ceiling against itself the same way."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.skipif(not DATA.exists(), reason="../shared/data is not present")
@pytest.mark.timeout(300)
def test_scorer_rows_and_the_ceiling_take_turns(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    argv = [sys.executable, str(REPO / "benchmarks" / "scorer_load.py"), "--items", "48", "--repeats", "1"]
    argv += [
        "--budgets",
        "1024",
        "--skip-naive",
        "--transport",
        "grpc-stream-ids,grpc",
        "--quantum-ms",
        "100",
        "--ceiling-aa",
    ]
    argv += ["--workdir", str(tmp_path / "work"), "--json", str(out)]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "ceiling method: interleaved" in proc.stdout
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"(s) scorer", "(s) scorer, grpc", "(b) offline batched", "(b/b) ceiling A/A"}
    aa = rows["(b/b) ceiling A/A"]  # two copies of the ceiling in turns: both measured, their ratio printed
    assert aa["a_cpu_ms_per_item"] > 0 and aa["b_cpu_ms_per_item"] > 0
    assert f"the method's own spread): {aa['ratio']:.3f}" in proc.stdout
    for name in ("(s) scorer", "(s) scorer, grpc"):
        row = rows[name]
        assert row["max_abs_diff"] < 1e-4  # the served rewards are the offline pass's
        assert row["ceiling_turns"] >= 2  # the ceiling ran in turns while the clients were served
        assert row["ceiling_cpu_ms_per_item"] > 0 and row["ceiling_items_per_s"] > 0
        assert row["forward_cpu_ms_per_item"] > 0 and row["serving_cpu_ms_per_item"] > 0
        assert "p50_ms" not in row  # latencies would include the turns the server was stopped
    ceiling = rows["(b) offline batched"]
    assert ceiling["forwards"] >= 1 and ceiling["padded"] >= 48
    assert "ceiling (b) / scorer, CPU cost per item" in proc.stdout and "ceiling / scorer, grpc CPU cost" in proc.stdout
