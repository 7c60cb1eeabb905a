"""Curation quality: does the human-AI loop beat the obvious alternatives? A study, every simulated part named.

Pool: the learnable human-labelled sets of ../shared/data (PandaLM's non-tie majority pairs
and all 9 style pairs of every RM-Bench item), 20% of prompts held out with their true
labels; of the rest a seeded share of labels is flipped (label noise). "Humans" are an
oracle (the true labels, study only); judges are simulated (three, of stated accuracy), in
one of two error modes: independent coins, or length_correlated (a shared verbosity bias,
see services/controller/simulated.py).

For each noise level, judge error mode, human budget (share of the pool a human verifies:
half as the seed, half over the Stage-1 iterations) and seed, the real Controller runs to
the gold RM; Stage 2 then runs twice from the same state, once per disagreement rule.
Training sets compared, every one trained and evaluated identically:
  noisy            the pool as given
  gold only        the human-verified pairs alone (the same pairs the loop's humans saw)
  judges only      every pool pair labelled by the judges' majority, no humans ("raw LLM curation")
  curated (flip)   the loop's curated set, Stage 2 flipping on disagreement
  curated (discard) the same, discarding on disagreement
  clean            the pool with its true labels (an oracle: the ceiling)
Each set trains two reward models on frozen MiniLM features: the loop's own linear head
(HeadModels) and a small MLP head with capacity (hidden layer, early stopping on 10% of its
own training set); held-out accuracy on true labels, overall, per source set and on the
RM-Bench hard / normal / easy slices. A learning curve of both heads on clean pairs shows
whether quantity can matter at all. Writes report.md, results.json and PNG plots.

    .venv/bin/python benchmarks/curation_quality.py [--budgets 0.01 0.02 0.05 0.1] [--noise 0.15 0.3]
        [--error-modes independent length_correlated] [--seeds 0 1 2] [--out artifacts/quality]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from synpref.services.controller.final_steps import CURATED
from synpref.services.controller.loop import Controller
from synpref.services.controller.models import HeadModels, one_torch_thread
from synpref.services.controller.providers import OracleHumans
from synpref.services.controller.simulated import (
    SimulatedJudge,
    judges_majority_label,
    label_is_true,
    pair_as_given,
)
from synpref.services.gold_scorer.scoring import pair_dict
from synpref.shared.config import SimulatedJudgeSettings, load_settings
from synpref.shared.files import write_atomic, write_text_atomic
from synpref.v1.pair_pb2 import PairRecord

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SOURCES = [DATA / "PandaLM" / "testset-v1.json"] + [
    DATA / "RM-Bench" / f"{name}_filtered.json" for name in ("chat", "code", "safety-refuse", "safety-response")
]
JUDGES = [
    {"name": "sim-judge-a", "accuracy": 0.8, "samples": 3, "sample_noise": 0.1},
    {"name": "sim-judge-b", "accuracy": 0.75, "samples": 3, "sample_noise": 0.1},
    {"name": "sim-judge-c", "accuracy": 0.7, "samples": 3, "sample_noise": 0.1},
]
BASELINES = ["noisy", "gold only", "judges only", "curated (flip)", "curated (discard)", "clean"]
HEADS = ["mlp", "linear"]
# The heads the sweep trains (--heads); the learning curve always trains both.
SWEEP_HEADS = list(HEADS)
ITERATIONS = 2
# Set from the command line in main(): the RM sequence length and an optional pool sample.
ENCODING = {"max_length": 256, "max_pairs": 0}
Pair = dict[str, Any]


class CachedEmbed:
    """The retrieval embedder, memoized in memory and on disk (the texts repeat across runs)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.memo: dict[str, np.ndarray] = {}
        if path.exists():
            data = np.load(path)
            self.memo = dict(zip(data["texts"].tolist(), data["vectors"], strict=True))
        self.embedder = None

    def __call__(self, texts: list[str]) -> np.ndarray:
        todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if todo:
            if self.embedder is None:
                from synpref.shared.retrieval import Embedder

                self.embedder = Embedder(max_length=128)
            for t, v in zip(todo, self.embedder.embed(todo), strict=True):
                self.memo[t] = v
            # Atomic: a run stopped while saving would leave a memo that np.load cannot read on the next start.
            write_atomic(self.path, self._save)
        return np.stack([self.memo[t] for t in texts])

    def _save(self, path: Path) -> None:
        with path.open("wb") as fh:  # a file, not a name: np.savez would add ".npz" to the temp name
            np.savez(fh, texts=np.array(list(self.memo)), vectors=np.stack(list(self.memo.values())))


# ---------------------------------------------------------------- the MLP head


@one_torch_thread()
def train_mlp(hc: np.ndarray, hr: np.ndarray, seed: int, hidden: int = 128, max_epochs: int = 30) -> Any:
    """A Bradley-Terry MLP reward head on frozen features; early stopping on a seeded 10% of its own pairs.

    Hyperparameters are fixed a priori (never tuned on the held-out set): one hidden GELU layer,
    dropout 0.1, AdamW lr 1e-3, weight decay 0.01, batches of 128, patience 3 epochs.
    """
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(hc))
    n_valid = max(1, len(hc) // 10) if len(hc) >= 10 else 0
    valid, train = order[:n_valid], order[n_valid:]
    xc, xr = torch.tensor(hc, dtype=torch.float32), torch.tensor(hr, dtype=torch.float32)
    net = torch.nn.Sequential(
        torch.nn.Linear(hc.shape[1], hidden), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(hidden, 1)
    )
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)

    def valid_accuracy() -> float:
        net.eval()
        with torch.no_grad():
            v = torch.tensor(valid)
            acc = float((net(xc[v]) > net(xr[v])).float().mean())
        net.train()
        return acc

    best = (-1.0, {k: v.clone() for k, v in net.state_dict().items()})
    stale = 0
    for _ in range(max_epochs):
        for batch in np.array_split(rng.permutation(train), max(1, math.ceil(len(train) / 128))):
            b = torch.tensor(batch)
            loss = torch.nn.functional.softplus(-(net(xc[b]) - net(xr[b]))).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if not n_valid:
            continue
        acc = valid_accuracy()
        if acc > best[0]:
            best, stale = (acc, {k: v.clone() for k, v in net.state_dict().items()}), 0
        else:
            stale += 1
            if stale >= 3:
                break
    if n_valid:
        net.load_state_dict(best[1])
    return net.eval()


class Evaluator:
    """Trains both heads on a pair set and measures them on the held-out pairs (true labels)."""

    def __init__(self, models: HeadModels, workdir: Path) -> None:
        self.models = models
        self.workdir = workdir

    def heldout(self, records: list[PairRecord]) -> dict[str, Any]:
        pairs = [pair_dict(r) for r in records]
        groups: dict[str, list[int]] = {"all": list(range(len(records)))}
        for i, r in enumerate(records):
            groups.setdefault(r.pair.source.split("/")[0], []).append(i)
            if r.pair.meta.get("slice"):
                groups.setdefault(f"RM-Bench {r.pair.meta['slice']}", []).append(i)
        return {"pairs": pairs, "groups": groups, "features": self.models.cache.features(pairs)}

    def evaluate(
        self, name: str, train: list[Pair], test: dict[str, Any], seed: int, heads: list[str] | None = None
    ) -> dict[str, dict[str, float]]:
        heads = SWEEP_HEADS if heads is None else heads
        out: dict[str, dict[str, float]] = {}
        right: dict[str, np.ndarray] = {}
        if "linear" in heads:
            handle = self.models.train(name.replace(" ", "_"), train, [], self.workdir / "bench-models")
            right["linear"] = np.array([c > r for c, r in self.models.score(handle, test["pairs"])])
        hc, hr = self.models.cache.features(train)
        net = train_mlp(hc, hr, seed)
        import torch

        with torch.no_grad():
            tc, tr = (torch.tensor(x, dtype=torch.float32) for x in test["features"])
            right["mlp"] = (net(tc) > net(tr)).squeeze(1).numpy()
        for head, ok in right.items():
            out[head] = {g: float(ok[idx].mean()) for g, idx in test["groups"].items() if idx}
        return out


# ---------------------------------------------------------------- one loop run


class StopAfterGold(Exception):
    pass


def judge_panel(mode: str, seed: int) -> list[SimulatedJudge]:
    return [SimulatedJudge(SimulatedJudgeSettings(**j, error_mode=mode), seed) for j in JUDGES]


def loop_settings(workdir: Path, seed: int, noise: float, mode: str, seed_pairs: int, per_iteration: int, rule: str):
    return load_settings(
        controller={
            "workdir": str(workdir),
            "sources": [str(p) for p in SOURCES],
            # RM-Bench is a training source here (held out by prompt), so the default RM-Bench
            # decontamination would remove it: off, deliberately.
            "decontaminate": [],
            "holdout_fraction": 0.2,
            "seed_pairs": seed_pairs,
            "seed": seed,
            "iterations": ITERATIONS,
            "patience": 2,
            "human_budget": per_iteration,
            "study": {
                "human": "oracle",
                "label_noise": noise,
                "judges": [dict(j, error_mode=mode) for j in JUDGES],
            },
            "max_length": ENCODING["max_length"],
            "max_pairs": ENCODING["max_pairs"],
        },
        filter={"on_disagreement": rule},
    )


def run_loop(
    workdir: Path, seed: int, noise: float, mode: str, budget: int, models: HeadModels, embed: CachedEmbed
) -> tuple[dict[str, Controller], dict[str, Any]]:
    """The loop up to the gold RM, then Stage 2 once per disagreement rule from that same state; also what
    the auto rule measured and chose there."""
    seed_pairs = max(2, budget // 2)
    per_iteration = max(1, math.ceil((budget - seed_pairs) / ITERATIONS))

    def stop(step: str) -> None:
        if step == "s2.gold":
            raise StopAfterGold

    def controller(path: Path, rule: str, on_step=None) -> Controller:
        settings = loop_settings(path, seed, noise, mode, seed_pairs, per_iteration, rule)
        judges = judge_panel(mode, seed)
        return Controller(
            settings, models, OracleHumans(), judges, embed=embed, on_step=on_step, progress=lambda m: None
        )

    base = workdir / "flip"
    first = controller(base, "flip", stop)
    with contextlib.suppress(StopAfterGold):
        first.run()
    first.measure_gold()  # what `on_disagreement: auto` would choose here (the row's "auto")
    auto = first.state.results["gold_rm"]
    first.store.close()  # the copy below takes the SQLite file whole
    shutil.copytree(base, workdir / "discard")
    out = {}
    for rule in ("flip", "discard"):
        ctl = controller(workdir / rule, rule)
        ctl.step("s2.curate", ctl.curate_stage2)
        out[rule] = ctl
    return out, auto


def pool_of(ctl: Controller) -> list[tuple[PairRecord, Pair]]:
    """Every pair the loop curated from (not held out) with its label as given, in row order."""
    store = ctl.pairstore
    rows = list(store.all_rows(("unverified", "discarded", *CURATED)))
    given = store.given(rows)
    return [(r, pair_as_given(r, given[row])) for row, r in zip(rows, store.get(rows), strict=True)]


def judges_only(pool: list[tuple[PairRecord, Pair]], mode: str, seed: int) -> tuple[list[Pair], float]:
    """Every pool pair labelled by the judges' majority (ties keep the label as given); label accuracy."""
    panel = judge_panel(mode, seed)
    pairs = [judges_majority_label(panel, record, pair) for record, pair in pool]
    right = sum(pair["chosen"] == true_pair(record)["chosen"] for (record, _), pair in zip(pool, pairs, strict=True))
    return pairs, right / len(pool)


def true_pair(record: PairRecord) -> Pair:
    pair = pair_dict(record)
    if not label_is_true(record):
        pair["chosen"], pair["rejected"] = pair["rejected"], pair["chosen"]
    return pair


# ---------------------------------------------------------------- the sweep


def cell_of(row: dict) -> tuple[float, str, float, int]:
    return (float(row["noise"]), row["error_mode"], float(row["budget_share"]), int(row["seed"]))


def sweep(
    args, models: HeadModels, embed: CachedEmbed, evaluator: Evaluator, work: Path, say, on_row, done: list[dict]
) -> list[dict]:
    """Every (noise, mode, budget, seed) cell not already in `done` (rows of a resumed run, kept)."""
    rows: list[dict] = list(done)
    finished = {cell_of(r) for r in done}
    # Seeds innermost, so that a sweep cut short has every seed of the budgets it reached;
    # the budget-independent baselines are trained once per (noise, mode, seed).
    fixed_by: dict[tuple, dict[str, Any]] = {}
    for r in done:
        fixed_by[(r["noise"], r["error_mode"], r["seed"])] = {
            **{k: r["accuracy"][k] for k in ("noisy", "judges only", "clean")},
            "judges_label_accuracy": r["label_accuracy"]["judges only"],
        }
    for noise in args.noise:
        for mode in args.error_modes:
            for budget_share in args.budgets:
                for seed in args.seeds:
                    if (noise, mode, budget_share, seed) in finished:
                        continue
                    fixed = fixed_by.setdefault((noise, mode, seed), {})
                    started = time.perf_counter()
                    run_dir = work / f"n{noise}-{mode}-s{seed}-b{budget_share}"
                    shutil.rmtree(run_dir, ignore_errors=True)
                    budget = max(4, round(budget_share * args.pool_size))
                    ctls, auto = run_loop(run_dir, seed, noise, mode, budget, models, embed)
                    ctl = ctls["flip"]
                    pool = pool_of(ctl)
                    test = evaluator.heldout(list(ctl.records("holdout")))
                    if not fixed:
                        judged, judge_label_acc = judges_only(pool, mode, seed)
                        fixed |= {
                            "noisy": evaluator.evaluate("noisy", [given for _, given in pool], test, seed),
                            "judges only": evaluator.evaluate("judges only", judged, test, seed),
                            "clean": evaluator.evaluate("clean", [true_pair(r) for r, _ in pool], test, seed),
                            "judges_label_accuracy": judge_label_acc,
                        }
                    gold = list(ctl.view("gold"))
                    acc = {k: fixed[k] for k in ("noisy", "judges only", "clean")}
                    acc["gold only"] = evaluator.evaluate("gold only", gold, test, seed)
                    sizes = {"noisy": len(pool), "judges only": len(pool), "clean": len(pool), "gold only": len(gold)}
                    label_acc = {"noisy": ctl.state.results["initial_label_accuracy"]}
                    label_acc["judges only"] = fixed["judges_label_accuracy"]
                    for rule, c in ctls.items():
                        curated = list(c.view(CURATED))
                        acc[f"curated ({rule})"] = evaluator.evaluate(f"curated {rule}", curated, test, seed)
                        sizes[f"curated ({rule})"] = len(curated)
                        label_acc[f"curated ({rule})"] = c.label_accuracy(CURATED)
                    row = {
                        "noise": noise,
                        "error_mode": mode,
                        "seed": seed,
                        "budget_share": budget_share,
                        "humans_verified": len(gold),  # oracle humans verify every pair they are shown
                        "pool": len(pool),
                        "holdout": len(test["pairs"]),
                        "train_pairs": sizes,
                        "label_accuracy": label_acc,
                        "accuracy": acc,
                        "auto": auto,
                        "seconds": round(time.perf_counter() - started, 1),
                    }
                    rows.append(row)
                    on_row(rows)
                    shutil.rmtree(run_dir, ignore_errors=True)
                    say(
                        f"noise {noise} {mode} seed {seed} budget {budget_share:.0%} "
                        f"({row['humans_verified']} verified, {row['seconds']}s): "
                        + ", ".join(f"{b} {acc[b][SWEEP_HEADS[0]]['all']:.3f}" for b in BASELINES)
                        + f" ({SWEEP_HEADS[0]} head)"
                    )
    return rows


def learning_curve(args, models: HeadModels, evaluator: Evaluator, work: Path) -> list[dict]:
    """Both heads on clean pool pairs, 100 -> all, on seed 0's split (three subsample seeds)."""
    settings = loop_settings(work / "curve", 0, 0.0, "independent", 2, 1, "flip")
    ctl = Controller(settings, models, OracleHumans(), [], progress=lambda m: None)
    ctl.step("ingest", ctl.ingest)
    test = evaluator.heldout(list(ctl.records("holdout")))
    clean = [true_pair(r) for r, _ in pool_of(ctl)]
    sizes = [n for n in args.curve_sizes if n < len(clean)] + [len(clean)]
    out = []
    for n in sizes:
        for s in range(args.curve_samples if n < len(clean) else 1):
            pick = np.random.default_rng(s).choice(len(clean), n, replace=False)
            acc = evaluator.evaluate(f"curve-{n}", [clean[i] for i in pick], test, s, HEADS)
            out.append({"pairs": n, "sample": s, "mlp": acc["mlp"]["all"], "linear": acc["linear"]["all"]})
    shutil.rmtree(work / "curve", ignore_errors=True)
    return out


def count_pool(work: Path, models: HeadModels) -> int:
    """Pool size (seed 0's split), after encoding every pair once (the feature cache is saved as it completes)."""
    settings = loop_settings(work / "count", 0, 0.0, "independent", 2, 1, "flip")
    ctl = Controller(settings, models, OracleHumans(), [], progress=lambda m: None)
    ctl.step("ingest", ctl.ingest)
    models.prepare(ctl.view(("unverified", "holdout")))
    n = ctl.pairstore.count("unverified")
    shutil.rmtree(work / "count", ignore_errors=True)
    return n


# ---------------------------------------------------------------- report


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cells(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((r["noise"], r["error_mode"], r["budget_share"]), []).append(r)
    return out


def verdicts(rows: list[dict], head: str) -> list[str]:
    """The issue's two tests, per cell: paired per-seed differences, and the share of the gap closed."""
    lines = []
    for (noise, mode, share), rs in sorted(cells(rows).items()):
        for rule in ("flip", "discard"):
            cur = f"curated ({rule})"
            parts = []
            for rival in ("gold only", "judges only"):
                diffs = [r["accuracy"][cur][head]["all"] - r["accuracy"][rival][head]["all"] for r in rs]
                m, sd = mean_sd(diffs)
                if len(diffs) < 2:  # no spread to weigh it against: one seed's sd is 0, so any gain would "beat"
                    parts.append(f"vs {rival} {m:+.3f} (1 seed: no verdict)")
                    continue
                beats = all(d > 0 for d in diffs) and m > sd
                parts.append(f"vs {rival} {m:+.3f} (sd {sd:.3f}, {'beats' if beats else 'does not beat'})")
            acc = {b: statistics.mean(r["accuracy"][b][head]["all"] for r in rs) for b in ("noisy", cur, "clean")}
            gap = acc["clean"] - acc["noisy"]
            closed = (acc[cur] - acc["noisy"]) / gap if gap > 0 else float("nan")
            lines.append(f"| {noise:.0%} | {mode} | {share:.0%} | {rule} | {'; '.join(parts)} | {closed:.2f} |")
    return lines


def plots(rows: list[dict], curve: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if rows:  # a curve-only run (--budgets with no value) has no sweep to plot
        combos = sorted({(r["noise"], r["error_mode"]) for r in rows})
        for head in SWEEP_HEADS:
            fig, axes = plt.subplots(1, len(combos), figsize=(5.5 * len(combos), 4.2), squeeze=False)
            for ax, (noise, mode) in zip(axes[0], combos, strict=True):
                budgets = sorted({r["budget_share"] for r in rows if (r["noise"], r["error_mode"]) == (noise, mode)})
                for b in BASELINES:
                    ms, sds = [], []
                    for share in budgets:
                        vals = [
                            r["accuracy"][b][head]["all"]
                            for r in rows
                            if (r["noise"], r["error_mode"], r["budget_share"]) == (noise, mode, share)
                        ]
                        m, sd = mean_sd(vals)
                        ms.append(m)
                        sds.append(sd)
                    x = [100 * s for s in budgets]
                    ax.plot(x, ms, marker="o", label=b, linestyle="--" if b in ("noisy", "clean") else "-")
                    ax.fill_between(x, np.subtract(ms, sds), np.add(ms, sds), alpha=0.15)
                ax.set_xscale("log")
                ax.set_xticks([100 * s for s in budgets], [f"{100 * s:g}%" for s in budgets])
                ax.set_xlabel("human budget (share of pool verified)")
                ax.set_ylabel(f"held-out accuracy ({head} head)")
                ax.set_title(f"label noise {noise:.0%}, judges {mode}")
                ax.grid(alpha=0.3)
            axes[0][0].legend(fontsize=8)
            fig.tight_layout()
            name = f"budget_{head}.png"
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            written.append(name)
        # Per set and RM-Bench slices, at the largest budget of the first combo, MLP head.
        noise, mode = combos[0]
        share = max(r["budget_share"] for r in rows if (r["noise"], r["error_mode"]) == (noise, mode))
        rs = [r for r in rows if (r["noise"], r["error_mode"], r["budget_share"]) == (noise, mode, share)]
        for name, groups in (
            ("per_set.png", ["all", "PandaLM", "RM-Bench"]),
            ("rmbench_slices.png", ["RM-Bench hard", "RM-Bench normal", "RM-Bench easy"]),
        ):
            fig, ax = plt.subplots(figsize=(9, 4))
            width = 0.8 / len(BASELINES)
            for i, b in enumerate(BASELINES):
                # Over the seeds whose held-out set has the group (a small run's may lack one; statistics.stdev
                # raises on a NaN); a group no seed has is a NaN bar, not drawn.
                by_seed = [r["accuracy"][b][SWEEP_HEADS[0]] for r in rs]
                values = [[acc[g] for acc in by_seed if g in acc] for g in groups]
                stats = [mean_sd(v) if v else (float("nan"), 0.0) for v in values]
                ax.bar(
                    np.arange(len(groups)) + i * width,
                    [m for m, _ in stats],
                    width,
                    yerr=[s for _, s in stats],
                    label=b,
                )
            ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups)
            # From 0: a below-chance bar (length-biased judges on RM-Bench hard) is the finding, not to be cut off.
            ax.set_ylim(0, 1)
            ax.axhline(0.5, color="k", lw=0.5, ls=":")
            ax.set_ylabel(f"held-out accuracy ({SWEEP_HEADS[0]} head)")
            ax.set_title(f"noise {noise:.0%}, judges {mode}, budget {share:.0%}; mean ± sd over seeds")
            ax.legend(fontsize=7, ncol=3)
            fig.tight_layout()
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            written.append(name)
    if not curve:  # --no-curve with none to keep: no figure, rather than an empty one
        return written
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for head in HEADS:
        sizes = sorted({c["pairs"] for c in curve})
        stats = [mean_sd([c[head] for c in curve if c["pairs"] == n]) for n in sizes]
        ax.errorbar(sizes, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", label=f"{head} head")
    ax.set_xscale("log")
    ax.set_xlabel("clean training pairs")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("learning curve (clean labels)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png", dpi=110)
    plt.close(fig)
    written.append("learning_curve.png")
    return written


def report(args, rows: list[dict], curve: list[dict], figures: list[str], pool: int) -> str:
    lines = [
        "# Curation quality: the loop against the obvious alternatives (a study)",
        "",
        f"Pool: PandaLM + RM-Bench (all 9 style pairs), about {pool} pairs to curate, 20% of prompts held out."
        f" Noise {args.noise}, judge error modes {args.error_modes}, budgets {args.budgets}, seeds {args.seeds}."
        " Judges simulated: " + ", ".join(f"{j['name']}@{j['accuracy']}" for j in JUDGES) + "; humans: oracle.",
        "",
        "## Held-out accuracy, mean ± sd over seeds",
        "",
    ]
    for head in SWEEP_HEADS:
        lines += [f"### {head} head", "", "| noise | judges | budget | verified | " + " | ".join(BASELINES) + " |"]
        lines.append("|" + "---|" * (4 + len(BASELINES)))
        for (noise, mode, share), rs in sorted(cells(rows).items()):
            vals = [mean_sd([r["accuracy"][b][head]["all"] for r in rs]) for b in BASELINES]
            verified = statistics.mean(r["humans_verified"] for r in rs)
            lines.append(
                f"| {noise:.0%} | {mode} | {share:.0%} | {verified:.0f} | "
                + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in vals)
                + " |"
            )
        lines += [
            "",
            "Curated vs the rivals (paired over seeds; 'beats' = better in every seed and mean > sd; one seed gives "
            "no verdict), gap closed = "
            "(curated - noisy) / (clean - noisy) of the means:",
            "",
            "| noise | judges | budget | rule | curated minus rival | gap closed |",
            "|---|---|---|---|---|---|",
            *verdicts(rows, head),
            "",
        ]
    lines += [
        "## What `filter.on_disagreement: auto` chose",
        "",
        "A probe gold RM trained on 80% of D_gold, scored on the other 20%; auto flips only if its accuracy's "
        "90% lower bound reaches flip_min_gold_accuracy, else discards (so its accuracy is that rule's column).",
        "",
        "| noise | judges | budget | held-out D_gold pairs | probe accuracy | lower bound | auto chose |",
        "|---|---|---|---|---|---|---|",
    ]
    for (noise, mode, share), rs in sorted(cells(rows).items()):
        autos = [r["auto"] for r in rs if r.get("auto")]
        if not autos:
            continue
        measured = [a["held_out_accuracy"] for a in autos if a["held_out_accuracy"] is not None]
        chose = ", ".join(f"{rule} x{n}" for rule, n in Counter(a["on_disagreement"] for a in autos).items())
        probe = f"{statistics.mean(measured):.3f}" if measured else "-"
        lines.append(
            f"| {noise:.0%} | {mode} | {share:.0%} | {statistics.mean(a['held_out_pairs'] for a in autos):.0f} | "
            f"{probe} | {statistics.mean(a['accuracy_lower_bound'] for a in autos):.3f} | {chose} |"
        )
    lines += ["", "## Training-set label accuracy and size (mean over seeds)", "", "| noise | judges | budget | "]
    lines[-1] += " | ".join(b for b in BASELINES if b not in ("clean", "gold only")) + " | curated sizes |"
    lines.append("|" + "---|" * 8)
    for (noise, mode, share), rs in sorted(cells(rows).items()):
        la = [statistics.mean(r["label_accuracy"][b] for r in rs) for b in BASELINES if b not in ("clean", "gold only")]
        size = [statistics.mean(r["train_pairs"][f"curated ({k})"] for r in rs) for k in ("flip", "discard")]
        lines.append(
            f"| {noise:.0%} | {mode} | {share:.0%} | "
            + " | ".join(f"{v:.3f}" for v in la)
            + f" | {size[0]:.0f} / {size[1]:.0f} |"
        )
    lines += [
        "",
        "## Learning curve on clean pairs (held-out accuracy)",
        "",
        "| pairs | mlp | linear |",
        "|---|---|---|",
    ]
    if not curve:
        lines.append("| not run (--no-curve) | | |")
    for n in sorted({c["pairs"] for c in curve}):
        m = [mean_sd([c[h] for c in curve if c["pairs"] == n]) for h in HEADS]
        lines.append(f"| {n} | {m[0][0]:.3f} ± {m[0][1]:.3f} | {m[1][0]:.3f} ± {m[1][1]:.3f} |")
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def write_outputs(args, rows: list[dict], curve: list[dict]) -> str:
    """results.json, the figures and report.md in --out; the report's text. Called after every row, so that a
    sweep cut short still leaves its figures; atomic, so that one stopped while writing leaves the last
    results.json whole for --resume (a truncated one lost every row)."""
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "curve": curve}
    write_text_atomic(args.out / "results.json", json.dumps(results, indent=1))
    figures = plots(rows, curve, args.out)
    text = report(args, rows, curve, figures, args.pool_size)
    write_text_atomic(args.out / "report.md", text)
    return text


# Settings a kept row must share with this run; the sweep's axes (noise, modes, budgets,
# seeds) may differ, which is the point of resuming.
SAME_FOR_RESUME = ("heads", "max_length", "max_pairs")


def resumed_rows(args) -> list[dict]:
    """The rows of a previous run in --out, if it used the same settings (else SystemExit)."""
    path = args.out / "results.json"
    if not path.exists():
        return []
    previous = json.loads(path.read_text())
    differing = [k for k in SAME_FOR_RESUME if previous["args"].get(k) != str(getattr(args, k))]
    if differing:
        raise SystemExit(f"--resume: {path} was made with other {differing}; use another --out")
    return list(previous["rows"])


def resumed_curve(args) -> list[dict]:
    """The learning curve in --out/results.json ([] if none); its settings are checked by resumed_rows."""
    path = args.out / "results.json"
    return list(json.loads(path.read_text()).get("curve", [])) if path.exists() else []


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--noise", type=float, nargs="+", default=[0.15, 0.3])
    p.add_argument("--budgets", type=float, nargs="*", default=[0.01, 0.02, 0.05, 0.1])
    p.add_argument(
        "--error-modes",
        nargs="+",
        choices=["independent", "length_correlated"],
        default=["independent", "length_correlated"],
    )
    p.add_argument("--heads", nargs="+", choices=HEADS, default=HEADS, help="heads the sweep trains")
    p.add_argument("--no-curve", action="store_true", help="skip the learning curve")
    p.add_argument("--curve-sizes", type=int, nargs="+", default=[100, 200, 400, 800, 1600, 3200])
    p.add_argument("--curve-samples", type=int, default=3, help="subsamples per learning-curve size")
    p.add_argument("--out", type=Path, default=ROOT / "artifacts" / "quality")
    p.add_argument("--work", type=Path, default=ROOT / "artifacts" / "quality-work", help="feature caches, runs")
    p.add_argument("--max-length", type=int, default=256, help="RM sequence length (tokens)")
    p.add_argument("--max-pairs", type=int, default=0, help="use a seeded sample of this many pairs (0 = all)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows of --out/results.json made with the same settings and run only the missing cells",
    )
    args = p.parse_args(argv)
    missing = [s for s in SOURCES if not s.exists()]
    if missing:
        print(f"no data at {missing}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    ENCODING.update(max_length=args.max_length, max_pairs=args.max_pairs)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.0f}s] {message}", flush=True)

    settings = load_settings(controller={"workdir": str(work), "max_length": args.max_length})
    models = HeadModels(settings.controller, work, progress=True)
    embed = CachedEmbed(work / "retrieval-memo.npz")
    evaluator = Evaluator(models, work)
    args.pool_size = count_pool(work, models)
    say(f"pool: {args.pool_size} pairs to curate; sources {[s.name for s in SOURCES]}")

    SWEEP_HEADS[:] = args.heads
    done = resumed_rows(args) if args.resume else []
    if done:
        say(f"resuming: {len(done)} rows kept from {args.out / 'results.json'}")
    # A resumed run keeps the curve it found until it has its own: every row rewrites results.json, so writing []
    # lost it at the first row (and for good with --no-curve).
    kept = resumed_curve(args) if args.resume else []
    rows = sweep(args, models, embed, evaluator, work, say, lambda rows: write_outputs(args, rows, kept), done)
    curve = kept if args.no_curve else learning_curve(args, models, evaluator, work)
    if curve:
        say("learning curve: " + ", ".join(f"{c['pairs']}: mlp {c['mlp']:.3f} lin {c['linear']:.3f}" for c in curve))
    print(write_outputs(args, rows, curve))
    say(f"wrote {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
