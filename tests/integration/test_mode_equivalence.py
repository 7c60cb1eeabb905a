"""The same seeded run over real pairs gives the same decisions and datasets in process and over Kafka.

The small version of benchmarks/mode_equivalence.py (read it for the set-up): 200 real pairs,
`synpref run` in process, then `synpref controller` with the gold-scorer, annotator, filter,
scorer and desk as separate processes on the broker, with the controller and the gold-scorer
SIGKILLed mid-Stage-1 and the annotator and the filter mid-Stage-2 (each restarted; the
controller commits Stage-1 and Stage-2 batches of 64 pairs). The benchmark's clean Kafka run is
left out here: the killed run passes through everything it does, and a clean run over Kafka is
compared with the in-process loop by test_controller_kafka.py (a third of this test's time). Judges: the
deterministic fake OpenAI server; humans: the web desk (embedded in process, the desk service
over Kafka), answered over HTTP from one deterministic verdict list in both modes.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # about 4 minutes on 2 cores: two runs, seven processes

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "mode_equivalence.py"
PAIRS = 200
DECISIONS = ("record only in one run", "pool", "decision", "rule", "label", "flipped", "votes", "scored roles")


def load_benchmark() -> Any:
    spec = importlib.util.spec_from_file_location("mode_equivalence", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = load_benchmark()


@pytest.fixture(scope="module")
def report(kafka_bootstrap, tmp_path_factory) -> dict[str, Any]:
    if not BENCH.DATA.exists():
        pytest.skip("../shared/data is not present")
    root = tmp_path_factory.mktemp("mode-equivalence")
    found = BENCH.run_equivalence(PAIRS, root, kafka_bootstrap, timeout_s=1500, modes=("kafka-killed",), humans="desk")
    (root / "report.md").write_text(BENCH.markdown(found))
    print(json.dumps(found["seconds"]))
    return found


def differences(report: dict[str, Any], run: str, kinds: tuple[str, ...]) -> dict[str, Any]:
    """The run's differences whose kind starts with one of `kinds`."""
    return {k: v for k, v in report[run]["differences"].items() if k.startswith(kinds)}


def unexplained(report: dict[str, Any], run: str) -> dict[str, Any]:
    """Differences no known cause explains (dataset columns included)."""
    return {k: v for k, v in report[run]["differences"].items() if v["cause"] == "unexplained"}


@pytest.mark.parametrize("run", ["kafka-killed"])
def test_pools_decisions_labels_votes_and_datasets_match(report, run):
    assert report[run]["pools"] == report["in_process"]["pools"]
    assert report[run]["decisions"] == report["in_process"]["decisions"]
    assert report[run]["datasets"] == report["in_process"]["datasets"]
    assert differences(report, run, DECISIONS) == {}
    assert unexplained(report, run) == {}
    assert report[run]["max_p_gap"] < 1e-4


def test_the_killed_run_really_was_killed_mid_step(report):
    controller, gold_scorer, annotator, filter_ = report["kafka-killed"]["events"]
    assert controller.startswith("controller SIGKILLed") and "batch in flight" in controller, controller
    assert gold_scorer.startswith("gold-scorer SIGKILLed") and " in s1." in gold_scorer, gold_scorer
    assert annotator.startswith("annotator SIGKILLed") and "in s2.curate" in annotator, annotator
    assert filter_.startswith("filter SIGKILLed") and "in s2.curate" in filter_, filter_


@pytest.mark.parametrize("run", ["kafka-killed"])
def test_score_versions_match(report, run):
    # Each score names the RM version that scored it: in the cluster the version the scorer served
    # for that response (it reloads each iteration), in process the trained handle's; per record and
    # per dataset row.
    assert {k: v for k, v in report[run]["differences"].items() if "version" in k} == {}
