"""Review of the controller's intake and the embedded run's outputs (report, run state): each test reproduces
a bug found there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from synpref.services.controller import embedded
from synpref.services.controller.loop import Controller
from synpref.services.controller.providers import OracleHumans
from synpref.services.controller.simulated import SimulatedJudge
from synpref.services.controller.state import StateStore
from synpref.shared.config import load_settings
from testing import controller_fakes as fakes

JUDGES = [{"name": "sim-a", "accuracy": 0.85}, {"name": "sim-b", "accuracy": 0.8}, {"name": "sim-c", "accuracy": 0.75}]


def settings_for(tmp_path: Path, sources: list[Path], **controller):
    values = {
        "workdir": str(tmp_path / "run"),
        "sources": [str(s) for s in sources],
        "seed_fraction": 0.1,
        "iterations": 2,
        "patience": 2,
        "human_budget": 6,
        "study": {"human": "oracle", "label_noise": 0.3, "judges": JUDGES},
        **controller,
    }
    return load_settings(controller=values)


def controller_for(settings) -> Controller:
    judges = [SimulatedJudge(j, seed=0) for j in settings.controller.study.judges]
    return Controller(
        settings, fakes.BagOfWordsModels(), OracleHumans(), judges, embed=fakes.embed, progress=lambda _m: None
    )


def run_main(monkeypatch, settings, argv: list[str]) -> int:
    """`synpref run` on `settings`, with the test's fast models and embedder."""
    monkeypatch.setattr(embedded, "load_settings", lambda _path: settings)
    monkeypatch.setattr(embedded, "build_controller", lambda s, progress=True: controller_for(s))
    return embedded.main(["--quiet", *argv])


def test_an_empty_pool_is_refused_at_ingest_with_exit_2_and_a_fixed_source_then_runs(tmp_path, monkeypatch, capsys):
    # Every row unreadable: ingest stored nothing, was recorded done, and `prepare` died with a traceback
    # ("nothing to embed"); every rerun failed the same way, even after the sources were fixed.
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps({"no": "pair"}) + "\n" for _ in range(5)))
    settings = settings_for(tmp_path, [source])
    assert run_main(monkeypatch, settings, []) == 2
    assert "no pair" in capsys.readouterr().err
    assert "ingest" not in StateStore(settings.controller.workdir).load().done
    fakes.write_synthetic(source, 120, seed=1)
    assert run_main(monkeypatch, settings, []) == 0
    assert StateStore(settings.controller.workdir).load().done[-1] == "report"


def interrupted(monkeypatch, cls: type, method: str, part: bytes) -> None:
    """`cls.method(path, ...)` writes `part` to its path and is then interrupted (a kill mid-write)."""

    def write(self, path, *args, **kwargs):
        Path(path).write_bytes(part)
        raise KeyboardInterrupt

    monkeypatch.setattr(cls, method, write)


def test_a_report_interrupted_mid_write_leaves_no_half_report_or_plot(tmp_path, monkeypatch):
    # report.md and the plots were written in place: a reader (or a run killed mid-write and then found done by
    # a look at the folder) saw a truncated report or PNG.
    from matplotlib.figure import Figure

    from synpref.services.controller.report import write_report
    from synpref.services.controller.state import RunState

    settings = load_settings(controller={"workdir": str(tmp_path), "sources": ["pairs.jsonl"]})
    state = RunState(
        history=[
            {
                "iteration": 0,
                "gold_accuracy": 0.5,
                "holdout_accuracy": 0.5,
                "gold": 1,
                "silver": 0,
                "unverified": 9,
                "train_pairs": 1,
            }
        ]
    )
    interrupted(monkeypatch, Figure, "savefig", b"\x89PNG half")
    with pytest.raises(KeyboardInterrupt):
        write_report(tmp_path, state, settings)
    assert not list((tmp_path / "plots").glob("*.png"))
    monkeypatch.undo()
    original = Path.write_text
    monkeypatch.setattr(Path, "write_text", lambda self, data, *a, **k: interrupted_text(original, self, data, *a, **k))
    with pytest.raises(KeyboardInterrupt):
        write_report(tmp_path, state, settings)
    assert not (tmp_path / "report.md").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def interrupted_text(original, path: Path, data: str, *args, **kwargs):
    if "report.md" not in path.name:
        return original(path, data, *args, **kwargs)
    original(path, data[: len(data) // 2], *args, **kwargs)
    raise KeyboardInterrupt


def test_the_decisions_plot_counts_the_seeds_human_verdicts(tmp_path, monkeypatch):
    # The "Stage 1: humans" bar summed the iterations only: the seed's verdicts (humans, Stage 1, most of D_gold)
    # were left out, so the bar showed 2 verified where D_gold held 7.
    from matplotlib.axes import Axes

    from synpref.services.controller.report import plot_all
    from synpref.services.controller.state import RunState

    results = {
        "seed_human": {"verified": 5, "discarded": 1},
        "stage1": [{"iteration": 1, "human_verified": 2, "human_discarded": 1, "silver_kept": 4}],
        "pools": {"gold": 7},
    }
    labels: list[str] = []
    original = Axes.text
    monkeypatch.setattr(
        Axes, "text", lambda self, x, y, s, *a, **k: labels.append(s) or original(self, x, y, s, *a, **k)
    )
    plot_all(tmp_path, RunState(results=results))
    assert "verified\n7" in labels and "discarded\n2" in labels


def test_a_source_still_being_copied_while_ingest_reads_it_is_refused_not_ingested_in_part(tmp_path, monkeypatch):
    # The chart's flow: the controller waits for /data/input, then `kubectl cp` fills it. Ingest began as soon as
    # the folder existed and stored what was there: the files copied after its listing and the rest of a file
    # being written were lost, and ingest was recorded done.
    from synpref.shared import sources

    folder = tmp_path / "input"
    folder.mkdir()
    fakes.write_synthetic(folder / "a.jsonl", 60, seed=1)
    original = sources.iter_source

    def copying(path, *args, **kwargs):
        yield from original(path, *args, **kwargs)
        fakes.write_synthetic(folder / "b.jsonl", 60, seed=2)  # the copy goes on meanwhile

    monkeypatch.setattr(sources, "iter_source", copying)
    settings = settings_for(tmp_path, [folder])
    controller = controller_for(settings)
    with pytest.raises(sources.SourceError, match="changed while"):
        controller.step("ingest", controller.ingest)
    assert "ingest" not in controller.state.done and controller.pairstore.size() == 0
    monkeypatch.setattr(sources, "iter_source", original)
    controller.step("ingest", controller.ingest)  # the copy done: all of it
    assert controller.state.results["ingest"]["counts"]["published"] == 120


def test_the_ingest_counts_reconcile_with_the_pools_when_max_pairs_samples_the_pool(tmp_path):
    # controller.max_pairs dropped pairs after they were counted as published, and said nothing: the report's
    # ingest line (published 120) and its pools (50 pairs) did not add up.
    source = fakes.write_synthetic(tmp_path / "pairs.jsonl", 120, seed=1)
    controller = controller_for(settings_for(tmp_path, [source], max_pairs=50))
    controller.step("ingest", controller.ingest)
    counts, pools = controller.state.results["ingest"]["counts"], controller.pool_sizes()
    assert pools["unverified"] + pools["holdout"] == 50
    assert counts["published"] - counts.get("sampled_out", 0) == 50


def stop_here(_controller: Controller) -> None:
    from synpref.shared.sources import SourceError

    raise SourceError("stopped by the test")


def test_a_run_resumed_with_other_sources_says_so_and_reports_the_sources_it_curated(tmp_path, monkeypatch, capsys):
    # Sources are read once, at ingest. A run resumed after controller.sources was edited went on with the old
    # pool without a word, and its report named the new sources (and the config's label noise) as curated.
    from synpref.services.controller.report import write_report

    first = fakes.write_synthetic(tmp_path / "first.jsonl", 120, seed=1)
    other = fakes.write_synthetic(tmp_path / "other.jsonl", 120, seed=2)
    controller = controller_for(settings_for(tmp_path, [first]))
    controller.step("ingest", controller.ingest)
    controller.close()
    edited = settings_for(tmp_path, [other], study={"human": "oracle", "label_noise": 0.1, "judges": JUDGES})
    monkeypatch.setattr(Controller, "run", stop_here)  # the warning comes before the loop runs
    assert run_main(monkeypatch, edited, []) == 2
    assert f"pairs came from {first}" in capsys.readouterr().err
    report = write_report(tmp_path, StateStore(edited.controller.workdir).load(), edited).read_text()
    assert f"- sources: {first}\n" in report and "label noise: 30%" in report


def test_the_max_pairs_sample_is_taken_in_one_pass_without_holding_the_rows():
    # random.sample(range(n), k) held a list of n ints and a set of k: ~1.8 GB for 20M of 40M pairs.
    import random
    import tracemalloc
    from array import array

    from synpref.services.controller.intake import unsampled

    rows = array("q", range(1000, 401_000))
    tracemalloc.start()
    try:
        out = 0
        for _ in unsampled(rows, 100_000, random.Random("sample:0")):
            out += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out == 300_000
    assert peak < 100_000, peak
    dropped = list(unsampled(rows[:20], 7, random.Random("sample:1")))
    assert len(dropped) == 13 and dropped == sorted(dropped)  # in row order, each row once
    assert dropped == list(unsampled(rows[:20], 7, random.Random("sample:1")))  # the seed decides the sample
    # Uniform: every row is kept with probability k / n.
    kept = [0] * 10
    for trial in range(4000):
        left_out = set(unsampled(range(10), 3, random.Random(trial)))
        for row in range(10):
            kept[row] += row not in left_out
    assert all(abs(k / 4000 - 0.3) < 0.03 for k in kept), kept
