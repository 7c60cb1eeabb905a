"""benchmarks/loop_scale.py at a small size: the whole loop runs and the per-step report is complete and sane.

About 3,000 synthetic pairs from ../shared/data, 2 Stage-1 iterations, the hashed embedder and RM:
~20 s alone on the shared 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCHMARK = REPO / "benchmarks" / "loop_scale.py"
DATA = REPO.parent / "shared" / "data"
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def load_benchmark() -> Any:
    spec = importlib.util.spec_from_file_location("loop_scale", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not DATA.exists(), reason="../shared/data is not present")
@pytest.mark.timeout(180)
def test_loop_scale_reports_every_step_of_a_small_run(tmp_path: Path) -> None:
    bench = load_benchmark()
    out = tmp_path / "results.json"
    argv = ["--pairs", "3000", "--iterations", "2", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert run["pairs"] == run["pairs_written"] == 3000
    # ingest dropped nothing: every synthetic pair is distinct and clean, so the pools hold all of them
    assert sum(run["pools"].values()) == 3000
    names = [s["step"] for s in run["steps"]]
    assert names == run["done"], "one report entry per committed step, in the controller's order"
    for step in ("ingest", "seed", "s1.1.train", "s1.1.curate", "s1.2.curate", "s2.gold", "s2.curate"):
        assert step in names
    assert names[-4:] == ["final.dataset", "final.train", "final.register", "report"]
    for s in run["steps"]:
        assert s["seconds"] > 0 and s["cpu_s"] >= 0, s
        assert 10 < s["peak_rss_mb"] < 4096, s
        assert 0 < s["rss_after_mb"] < 4096, s
        assert 0 < s["sampled_peak_anon_mb"] <= s["peak_rss_mb"] + 1, s
    assert 0 < sum(s["cpu_s"] for s in run["steps"]) < 4 * run["total_s"]
    assert run["max_rss_mb"] >= max(s["peak_rss_mb"] for s in run["steps"])
    assert sum(s["seconds"] for s in run["steps"]) == pytest.approx(run["total_s"], rel=0.05)
    assert result["rss_check"] == {"3000": "under"}
    assert not (tmp_path / "work" / "pairs-3000").exists(), "the size's workdir is removed unless --keep"
