"""Curation quality on real human-labelled pairs: does the loop repair label noise?

Setup (a study, every simulated part named): PandaLM's human-labelled test pairs
(../shared/data); 20% of conversations held out with their true labels; of the rest, a
seeded 30% of labels flipped; 10% verified by oracle "humans" (the true labels: study only);
simulated judges of stated accuracy. The loop runs in process with the CPU head trainer.

Measured, per seed and as a mean:
 (1) precision and recall of the loop's KEEP / FLIP / DISCARD decisions against the true
     labels (a KEEP is right on a clean pair, a FLIP on a noisy one; DISCARD precision =
     share of discarded pairs that were noisy);
 (2) held-out accuracy of RMs trained with the same backbone and budget on the noisy pool,
     the curated set, and the clean pool; and the share of the noisy-to-clean gap closed.

    .venv/bin/python benchmarks/curation_quality.py [--seeds 0 1 2] [--noise 0.3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from synpref.services.controller.loop import Controller
from synpref.services.controller.models import HeadModels, accuracy
from synpref.services.controller.providers import OracleHumans
from synpref.services.controller.simulated import NOISE_KEY, SimulatedJudge, label_is_true
from synpref.services.gold_scorer.scoring import pair_dict
from synpref.shared.config import load_settings
from synpref.v1.pair_pb2 import DECISION_DISCARD, DECISION_FLIP, DECISION_KEEP

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "PandaLM" / "testset-v1.json"
JUDGES = [
    {"name": "sim-judge-a", "accuracy": 0.8, "samples": 3, "sample_noise": 0.1},
    {"name": "sim-judge-b", "accuracy": 0.75, "samples": 3, "sample_noise": 0.1},
    {"name": "sim-judge-c", "accuracy": 0.7, "samples": 3, "sample_noise": 0.1},
]


class CachedEmbed:
    """The retrieval embedder, memoized across seeds (the texts are the same)."""

    def __init__(self) -> None:
        self.memo: dict[str, np.ndarray] = {}
        self.embedder = None

    def __call__(self, texts: list[str]) -> np.ndarray:
        todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if todo:
            if self.embedder is None:
                from synpref.shared.retrieval import Embedder

                self.embedder = Embedder(max_length=128)
            for t, v in zip(todo, self.embedder.embed(todo), strict=True):
                self.memo[t] = v
        return np.stack([self.memo[t] for t in texts])


def prf(pred: list[bool], truth: list[bool]) -> dict[str, float | int]:
    tp = sum(p and t for p, t in zip(pred, truth, strict=True))
    n_pred, n_true = sum(pred), sum(truth)
    return {
        "n": n_pred,
        "precision": tp / n_pred if n_pred else float("nan"),
        "recall": tp / n_true if n_true else float("nan"),
    }


def true_pair(record) -> dict:
    pair = pair_dict(record)
    if not label_is_true(record):
        pair["chosen"], pair["rejected"] = pair["rejected"], pair["chosen"]
    return pair


def noisy_pair(record, initial_id: str) -> dict:
    pair = pair_dict(record)
    if record.pair.id != initial_id:
        pair["chosen"], pair["rejected"] = pair["rejected"], pair["chosen"]
    return pair


def one_seed(seed: int, args, models: HeadModels, embed: CachedEmbed, workdir: Path) -> dict:
    settings = load_settings(
        controller={
            "workdir": str(workdir / f"seed-{seed}"),
            "sources": [str(args.data)],
            "holdout_fraction": 0.2,
            "seed_fraction": 0.1,
            "seed": seed,
            "iterations": args.iterations,
            "patience": 2,
            "human_budget": args.human_budget,
            "study": {"human": "oracle", "label_noise": args.noise, "judges": JUDGES},
            "max_length": args.max_length,
        },
        filter={"on_disagreement": args.on_disagreement},
    )
    judges = [SimulatedJudge(j, seed) for j in settings.controller.study.judges]
    ctl = Controller(settings, models, OracleHumans(), judges, embed=embed, progress=lambda m: None)
    started = time.perf_counter()
    state = ctl.run()
    loop_s = time.perf_counter() - started
    pool = sorted(state.results["initial_labels"])
    noisy = [NOISE_KEY in ctl.records[k].pair.meta for k in pool]
    decision = [ctl.records[k].decision.decision for k in pool]
    decisions = {
        "KEEP": prf([d == DECISION_KEEP for d in decision], [not n for n in noisy]),
        "FLIP": prf([d == DECISION_FLIP for d in decision], noisy),
        "DISCARD": prf([d == DECISION_DISCARD for d in decision], noisy),
    }
    undecided = sum(d not in (DECISION_KEEP, DECISION_FLIP, DECISION_DISCARD) for d in decision)
    by_rule: dict[str, dict[str, int]] = {}
    for k, n, d in zip(pool, noisy, decision, strict=True):
        rule = ctl.records[k].decision.rule or "none"
        counts = by_rule.setdefault(
            rule,
            {
                "KEEP_right": 0,
                "KEEP_wrong": 0,
                "FLIP_right": 0,
                "FLIP_wrong": 0,
                "DISCARD_noisy": 0,
                "DISCARD_clean": 0,
            },
        )
        if d == DECISION_KEEP:
            counts["KEEP_wrong" if n else "KEEP_right"] += 1
        elif d == DECISION_FLIP:
            counts["FLIP_right" if n else "FLIP_wrong"] += 1
        elif d == DECISION_DISCARD:
            counts["DISCARD_noisy" if n else "DISCARD_clean"] += 1
    hold = [ctl.records[k] for k in state.pools["holdout"]]
    test = [pair_dict(r) for r in hold]
    out_dir = Path(settings.controller.workdir) / "bench-models"
    trained = {
        "noisy": [noisy_pair(ctl.records[k], state.results["initial_labels"][k]) for k in pool],
        "curated": [pair_dict(ctl.records[k]) for k in ctl.curated_keys()],
        "clean": [true_pair(ctl.records[k]) for k in pool],
    }
    acc = {
        name: accuracy(models.score(models.train(name, pairs, [], out_dir), test)) for name, pairs in trained.items()
    }
    gap = acc["clean"] - acc["noisy"]
    return {
        "seed": seed,
        "pairs": len(pool),
        "holdout": len(test),
        "noisy_pairs": sum(noisy),
        "decisions": decisions,
        "by_rule": by_rule,
        "undecided": undecided,
        "label_accuracy": {
            "noisy": state.results["initial_label_accuracy"],
            "curated": state.results["curated_label_accuracy"],
        },
        "curated_pairs": len(trained["curated"]),
        "holdout_accuracy": acc,
        "gap_closed": (acc["curated"] - acc["noisy"]) / gap if gap > 0 else float("nan"),
        "stage1_iterations": state.iteration,
        "stage2_decisions": state.results["stage2"]["decisions"],
        "loop_seconds": round(loop_s, 1),
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--human-budget", type=int, default=24)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--on-disagreement", choices=["flip", "discard"], default="flip")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if not args.data.exists():
        print(f"no data at {args.data}", file=sys.stderr)
        return 2
    print(
        f"curation quality: {args.data.name}, noise {args.noise:.0%}, seeds {args.seeds}, judges "
        + ", ".join(f"{j['name']}@{j['accuracy']}" for j in JUDGES)
        + " (simulated), humans: oracle (study only)"
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="synpref-bench-") as tmp:
        workdir = Path(tmp)
        first = load_settings(controller={"workdir": str(workdir), "max_length": args.max_length})
        models = HeadModels(first.controller, workdir, progress=True)
        embed = CachedEmbed()
        for seed in args.seeds:
            r = one_seed(seed, args, models, embed, workdir)
            results.append(r)
            a = r["holdout_accuracy"]
            print(
                f"seed {seed}: held-out acc noisy {a['noisy']:.3f} curated {a['curated']:.3f} clean {a['clean']:.3f}"
                f" -> gap closed {r['gap_closed']:.2f}; label acc {r['label_accuracy']['noisy']:.3f} -> "
                f"{r['label_accuracy']['curated']:.3f}; loop {r['loop_seconds']}s"
            )
            for name, d in r["decisions"].items():
                print(f"    {name:8s} n={d['n']:4d} precision {d['precision']:.3f} recall {d['recall']:.3f}")
            for rule, counts in sorted(r["by_rule"].items()):
                print(f"    by rule {rule:20s} " + " ".join(f"{k}={v}" for k, v in counts.items() if v))
    mean = {k: statistics.mean(r["holdout_accuracy"][k] for r in results) for k in ("noisy", "curated", "clean")}
    gap = mean["clean"] - mean["noisy"]
    closed = (mean["curated"] - mean["noisy"]) / gap if gap > 0 else float("nan")
    print(
        f"mean over {len(results)} seeds: noisy {mean['noisy']:.3f} curated {mean['curated']:.3f} "
        f"clean {mean['clean']:.3f}; gap closed (of the means) {closed:.2f}"
    )
    for name in ("KEEP", "FLIP", "DISCARD"):
        ps = [r["decisions"][name]["precision"] for r in results]
        rs = [r["decisions"][name]["recall"] for r in results]
        print(f"  {name:8s} precision {statistics.mean(ps):.3f} recall {statistics.mean(rs):.3f} (mean over seeds)")
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
