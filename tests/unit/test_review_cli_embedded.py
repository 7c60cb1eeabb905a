"""Review of the command line, the embedded runner (`synpref run`), the study's simulated parts and the
curation-quality benchmark: each test reproduces a bug found there."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from synpref.services.controller.simulated import SimulatedJudge, digest
from synpref.shared.config import SimulatedJudgeSettings
from synpref.v1.pair_pb2 import PREFERENCE_CHOSEN, PREFERENCE_REJECTED

ROOT = Path(__file__).resolve().parents[2]


def answer(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


@pytest.mark.parametrize("mode", ["independent", "length_correlated"])
def test_a_simulated_judge_draws_its_belief_per_pair_not_per_chosen_response(mode):
    # RM-Bench, in curation_quality's pool: each chosen response is paired with three rejected ones. A belief
    # keyed by the chosen response alone gave all of them the same votes, so "independent" errors came in triplets.
    judge = SimulatedJudge(SimulatedJudgeSettings(name="j", accuracy=0.5, samples=1, error_mode=mode), seed=0)
    chosen = answer("the right answer, in a few words")
    truth = digest(chosen)
    prefs = [
        judge.votes_for(f"p{i}", chosen, truth, answer(f"a wrong answer {i:03d}"))[0].preference for i in range(40)
    ]
    assert set(prefs) == {PREFERENCE_CHOSEN, PREFERENCE_REJECTED}
    # Still one belief per pair whatever its orientation: the swapped pair gets the mirrored vote.
    for i, pref in enumerate(prefs):
        (vote,) = judge.votes_for(f"p{i}", answer(f"a wrong answer {i:03d}"), truth, chosen)
        assert vote.preference == (PREFERENCE_REJECTED if pref == PREFERENCE_CHOSEN else PREFERENCE_CHOSEN)


def quality_bench():
    spec = importlib.util.spec_from_file_location("curation_quality", ROOT / "benchmarks" / "curation_quality.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_row(bench, seed: int) -> dict:
    curated = ("curated (flip)", "curated (discard)")
    return {
        "noise": 0.3,
        "error_mode": "independent",
        "seed": seed,
        "budget_share": 0.05,
        "humans_verified": 10,
        "pool": 100,
        "holdout": 20,
        "train_pairs": {b: 50 for b in bench.BASELINES},
        "label_accuracy": {b: 0.7 for b in ("noisy", "judges only", *curated)},
        "accuracy": {b: {h: {"all": 0.6} for h in bench.HEADS} for b in bench.BASELINES},
        "auto": None,
        "seconds": 1.0,
    }


def interrupted_write(monkeypatch, name: str) -> None:
    """Path.write_text, for files whose name contains `name`, writes half the text and is then interrupted."""
    original = Path.write_text

    def write_text(self, data, *args, **kwargs):
        if name not in self.name:
            return original(self, data, *args, **kwargs)
        original(self, data[: len(data) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", write_text)


def test_quality_sweep_stopped_while_writing_results_keeps_the_rows_for_resume(tmp_path, monkeypatch):
    # results.json is rewritten after every row of a sweep that runs for an hour or more; one Ctrl-C
    # while it was written left it truncated, and --resume then failed on it, every row lost.
    bench = quality_bench()
    args = argparse.Namespace(
        out=tmp_path,
        noise=[0.3],
        error_modes=["independent"],
        budgets=[0.05],
        seeds=[0, 1],
        heads=list(bench.HEADS),
        max_length=128,
        max_pairs=0,
        pool_size=100,
    )
    bench.write_outputs(args, [bench_row(bench, 0)], [])
    interrupted_write(monkeypatch, "results.json")
    with pytest.raises(KeyboardInterrupt):
        bench.write_outputs(args, [bench_row(bench, 0), bench_row(bench, 1)], [])
    monkeypatch.undo()
    assert [r["seed"] for r in bench.resumed_rows(args)] == [0]


def test_quality_retrieval_memo_stopped_while_saving_stays_readable(tmp_path, monkeypatch):
    bench = quality_bench()

    class Embedder:
        def embed(self, texts):
            return np.ones((len(texts), 4), dtype=np.float32)

    memo = bench.CachedEmbed(tmp_path / "memo.npz")
    memo.embedder = Embedder()
    memo(["first text"])
    original = np.savez

    def savez(file, *args, **kwargs):  # a process stopped halfway through the save
        with open(file, "wb") if isinstance(file, (str, Path)) else contextlib.nullcontext(file) as fh:
            fh.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", savez)
    with pytest.raises(KeyboardInterrupt):
        memo(["second text"])
    monkeypatch.setattr(np, "savez", original)
    assert list(bench.CachedEmbed(tmp_path / "memo.npz").memo) == ["first text"]


def test_run_fresh_starts_over_in_a_symlinked_workdir(tmp_path, light_run, capsys):
    # artifacts/ on a bigger disk, linked: rmtree refuses a symlink and the error was ignored, so --fresh
    # resumed the finished run and printed its old results as the new ones.
    from synpref.services.controller import embedded

    (tmp_path / "disk").mkdir()
    (tmp_path / "workdir").symlink_to(tmp_path / "disk")
    assert embedded.main(["--config", str(light_run(tmp_path, tmp_path / "workdir", 40)), "--quiet"]) == 0
    capsys.readouterr()
    assert embedded.main(["--config", str(light_run(tmp_path, tmp_path / "workdir", 60)), "--quiet", "--fresh"]) == 0
    assert "resuming" not in capsys.readouterr().out
    state = json.loads((tmp_path / "disk" / "state.json").read_text())
    assert state["results"]["ingest"]["counts"]["read"] == 60
    assert (tmp_path / "workdir").is_symlink()


@pytest.mark.parametrize("fresh", [[], ["--fresh"]])
def test_run_refuses_a_workdir_that_is_a_file(tmp_path, light_run, capsys, fresh):
    from synpref.services.controller import embedded

    (tmp_path / "workdir").write_text("notes")
    assert embedded.main(["--config", str(light_run(tmp_path, tmp_path / "workdir", 40)), "--quiet", *fresh]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert (tmp_path / "workdir").read_text() == "notes"


def test_report_names_the_best_working_rm_it_measured_not_the_last(tmp_path):
    # Stage 1 stopped by patience: iteration 2's RM was not better than iteration 1's, which is the one the
    # final table measures (state.models["best"]); the report said it was the last one.
    from synpref.services.controller.report import write_report
    from synpref.services.controller.state import RunState
    from synpref.shared.config import load_settings

    entry = {"train_pairs": 5, "gold_accuracy": 0.8, "holdout_accuracy": 0.7, "gold": 5, "silver": 3, "unverified": 9}
    history = [dict(entry, iteration=t, best_iteration=1) for t in range(3)]
    state = RunState(iteration=2, stage1_stopped="patience", history=history)
    state.results = {"best_rm": {"iteration": 1}, "holdout_accuracy": {"final": 0.7, "best_working": 0.65}}
    settings = load_settings(controller={"workdir": str(tmp_path), "sources": ["pairs.jsonl"]})
    row = next(
        line for line in write_report(tmp_path, state, settings).read_text().splitlines() if "best_working" in line
    )
    assert "the last Stage-1 working RM" not in row and "most accurate on D_gold" in row
