"""The controller: the two-stage curation loop of DESIGN.md section 1, as resumable steps.

Steps, in order, each run once (a restarted controller skips the ones state.json lists):
ingest, prepare, seed, s1.<t>.train and s1.<t>.curate per Stage-1 iteration, s2.gold,
s2.curate, final.dataset, final.train, final.register, report. docs/curation.md says what
each does and which stage functions it calls; the method's rules are in
services/consistency_filter/rules.py, retrieval in embeddings.py, publishing in publish.py.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from synpref.services.annotator.annotate import Annotator
from synpref.services.annotator.judges import Judge
from synpref.services.consistency_filter.rules import human_candidates, make_filter_stage, score_of, silver_label
from synpref.services.controller.embeddings import EmbeddingTable, load_or_embed_table
from synpref.services.controller.executors import InProcessExecutor, StageExecutor, chain
from synpref.services.controller.final_steps import FinalSteps
from synpref.services.controller.models import ModelHandle, RewardModels, accuracy
from synpref.services.controller.providers import HumanProvider
from synpref.services.controller.publish import export_registry
from synpref.services.controller.simulated import add_label_noise, mark_truth
from synpref.services.controller.state import RunState, StateStore, key_of
from synpref.services.gold_scorer.scoring import ScoringModel, make_scoring_stage, set_score
from synpref.shared.config import Settings
from synpref.shared.pairs import message_dicts, split_by_conversation
from synpref.shared.retrieval import k_rule
from synpref.shared.roles import BEST, GOLD
from synpref.shared.stage import Stage
from synpref.v1.pair_pb2 import (
    DECISION_FLIP,
    DECISION_KEEP,
    DECISION_REVIEW,
    STAGE_ONE,
    STAGE_TWO,
    Decision,
    PairRecord,
)

log = logging.getLogger(__name__)
Records = dict[str, PairRecord]


def _conversation(record: PairRecord) -> list[dict[str, str]]:
    return message_dicts(record.pair.conversation)


class Controller(FinalSteps):
    """The two-stage curation loop over one workdir, run as resumable named steps.

    Args:
        settings: the whole configuration; `settings.controller` (kept as `self.c`) holds the
            workdir, sources, iteration limits, budgets and executor choice.
        models: trains, scores and exports reward models (RewardModels).
        humans: the human verifiers asked about Stage-1 gold candidates and the seed.
        judges: the LLM judges the in-process annotator stage calls.
        executor: runs the "stage1" and "stage2" chains (score -> annotate -> filter); default: in
            process, built by `in_process_stage`.
        embed: texts -> vectors for retrieval; default: an Embedder of
            `settings.annotator.embedding_model`, built on first use.
        on_step: called with each step's name after the step is committed.
        progress: receives one-line progress messages (default `print`).
        labeller: the attribute labeller handed to the annotator, if any.

    Construction loads state.json and the records snapshot it names, so a new Controller on
    an existing workdir resumes where the last one stopped: `run` skips every step already in
    `state.done`.
    """

    def __init__(
        self,
        settings: Settings,
        models: RewardModels,
        humans: HumanProvider,
        judges: list[Judge],
        executor: StageExecutor | None = None,
        embed: Callable[[list[str]], np.ndarray] | None = None,
        on_step: Callable[[str], None] | None = None,
        progress: Callable[[str], None] = print,
        labeller: Any = None,
    ) -> None:
        self.settings = settings
        self.c = settings.controller
        self.models = models
        self.humans = humans
        self.judges = judges
        self.labeller = labeller
        self.executor = executor or InProcessExecutor(self.in_process_stage)
        self.embed = embed
        self.on_step = on_step
        self.say = progress
        self.store = StateStore(self.c.workdir)
        self.root = self.store.root
        self.state = self.store.load()
        self.records: Records = self.store.read_records(self.state.records)
        self.table: EmbeddingTable | None = None
        self._stage_models: list[ScoringModel] = []
        """The RMs the scoring stage of the current stage uses (in the cluster the scorer serves them)."""
        self._annotators: dict[int, Annotator] = {}
        """One per stage for the whole run: its event loop and the judges' HTTP sessions are reused."""

    # ------------------------------------------------------------ plumbing

    def step(self, name: str, fn: Callable[[], None]) -> None:
        """Run `fn` as step `name` unless state.done lists it, then snapshot the records and commit the state."""
        if name in self.state.done:
            return
        started = time.perf_counter()
        self.say(f"[{name}] ...")
        fn()
        self.state.records = self.store.write_records(name.replace("/", "_"), self.records)
        self.state.done.append(name)
        self.state.results.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 2)
        self.store.save(self.state)
        self.say(f"[{name}] done in {time.perf_counter() - started:.1f}s  pools: {self.pool_sizes()}")
        if self.on_step is not None:
            self.on_step(name)

    def pool_sizes(self) -> dict[str, int]:
        """Pool name -> number of record keys in it, sorted by name."""
        return {k: len(v) for k, v in sorted(self.state.pools.items())}

    def in_process_stage(self, name: str) -> Stage:
        """The Stage for executor stage `name`: "stage1" or "stage2"; KeyError otherwise.

        Both chain the same three stages the cluster's services run: scoring (Stage 1: the working
        RM as BEST; Stage 2: gold and best), the annotator (in Stage 2 it skips the pairs the best
        RM already gets right; Stage-1 pairs are all judged) and the filter with the stage's rule.
        """
        stage = {"stage1": 1, "stage2": 2}[name]
        f = self.settings.filter.model_copy(update={"stage": stage})
        if stage not in self._annotators:
            max_examples = min(self.c.k_max, 8) if stage == 1 else 8
            self._annotators[stage] = Annotator(
                self.judges, self.labeller, self.table, max_examples, skip_confident=True, band=f.band
            )
        return chain(make_scoring_stage(self._stage_models), self._annotators[stage].stage(), make_filter_stage(f))

    def close(self) -> None:
        """Close the in-process annotators' judge sessions and event loops (a later stage makes new ones)."""
        for annotator in self._annotators.values():
            annotator.close()
        self._annotators.clear()

    # ------------------------------------------------------------ the loop

    def run(self) -> RunState:
        """Run every step not yet done, in order (Stage 1 until it stops, then Stage 2, final), and return the state."""
        try:
            return self._run_steps()
        finally:
            self.close()

    def _run_steps(self) -> RunState:
        self.step("ingest", self.ingest)
        self.ensure_table()
        self.step("seed", self.seed)
        while not self.state.stage1_stopped:
            t = self.state.iteration + 1
            self.step(f"s1.{t}.train", partial(self.train_working, t))
            if self.state.stage1_stopped:
                break
            self.step(f"s1.{t}.curate", partial(self.curate_stage1, t))
        self.step("s2.gold", self.train_gold)
        self.step("s2.curate", self.curate_stage2)
        self.step("final.dataset", self.write_datasets)
        self.step("final.train", self.train_final)
        self.step("final.register", self.register)
        self.step("report", self.report)
        return self.state

    # ------------------------------------------------------------ steps

    def ingest(self) -> None:
        """Read, preprocess and split the sources into the unverified pool and a held-out set (by conversation)."""
        from synpref.services.ingest.preprocess import ingest_paths

        c = self.c
        records, pre = ingest_paths(c.sources, c.source_format, None, c.decontaminate)
        if c.max_pairs and len(records) > c.max_pairs:
            records = random.Random(f"sample:{c.seed}").sample(records, c.max_pairs)
        study = c.study is not None
        label_noise = c.study.label_noise if c.study is not None else 0.0
        if study:
            for r in records:
                mark_truth(r)
        pool, holdout = split_by_conversation(records, _conversation, c.holdout_fraction, c.seed)
        pool.sort(key=key_of)
        if label_noise:
            pool = add_label_noise(pool, label_noise, c.seed)
        self.records = {key_of(r): r for r in pool + holdout}
        self.state.pools = {
            "holdout": sorted(key_of(r) for r in holdout),
            "unverified": sorted(key_of(r) for r in pool),
        }
        counts = {k: v for k, v in pre.counts.as_dict().items() if isinstance(v, int)}
        self.state.results["ingest"] = {"counts": counts, "study": study, "label_noise": label_noise}
        self.state.results["initial_labels"] = {key_of(r): r.pair.id for r in pool}
        self.state.results["initial_label_accuracy"] = self.label_accuracy(sorted(self.state.results["initial_labels"]))
        self.say(f"ingest: {len(pool)} pairs to curate, {len(holdout)} held out")

    def ensure_table(self) -> None:
        """Retrieval embeddings (cached in the workdir) and, for the head trainer, RM features."""
        if self.table is not None:
            return
        keys = sorted(k for k in self.records if k not in set(self.state.pools.get("holdout", [])))
        path = self.root / "features" / "retrieval.npz"
        self.table = load_or_embed_table(path, keys, lambda: self.records, self._embed, self.say)
        self.table.example_keys = [k for k in self.state.pools.get("gold", []) if k in self.table.row]
        prepare = getattr(self.models, "prepare", None)
        if prepare is not None:
            prepare(self.pairs(sorted(self.records)))

    def _embed(self, texts: list[str]) -> np.ndarray:
        if self.embed is None:
            from synpref.shared.retrieval import Embedder

            # MiniLM's own limit (256 word pieces): conversation and attributes are embedded whole where they fit.
            embedder = Embedder(self.settings.annotator.embedding_model)
            self.embed = embedder.embed
        return self.embed(texts)

    def seed(self) -> None:
        """Sample the seed (controller.seed_pairs, or seed_fraction of the pool) for humans to verify into D_gold."""
        pool = list(self.state.pool("unverified"))
        rng = random.Random(f"seed:{self.c.seed}")
        n = self.c.seed_size(len(pool))
        picked = sorted(rng.sample(pool, min(n, len(pool))))
        verified, dropped = self.ask_humans(picked, iteration=0)
        self.state.results["seed_gold"] = verified
        self.state.results["seed_human"] = {"verified": len(verified), "discarded": len(dropped)}

    def ask_humans(self, keys: list[str], iteration: int) -> tuple[list[str], list[str]]:
        """Humans decide `keys`: verified ones join D_gold (flipped if they preferred rejected)."""
        for key in keys:
            self.records[key].lineage.stage = STAGE_ONE  # human verification is Stage 1's, seed included
        routed = self.humans.review([self.records[k] for k in keys])
        verified: list[str] = []
        dropped: list[str] = []
        for route, record in routed:
            record.lineage.iteration = iteration
            key = key_of(record)
            self.records[key] = record
            (verified if route == "verified" else dropped).append(key)
        self.state.move(verified, "gold")
        self.state.move(dropped, "discarded")
        if self.table is not None:
            self.table.example_keys = [k for k in self.state.pool("gold") if k in self.table.row]
        return verified, dropped

    def train_working(self, t: int) -> None:
        """Iteration t's working RM (on D_silver, chosen on all of D_gold); picks the best RM; decides whether
        Stage 1 goes on."""
        s = self.state
        gold = s.pool("gold")
        train_keys = s.pool("silver") + (s.pool("unverified") if self.c.working_train == "silver+unverified" else [])
        # With no D_silver yet (the first iteration) the RM learns from the seed D_gold, and nothing is left
        # to choose its checkpoint on: its D_gold accuracy is then a training figure.
        on_gold = not train_keys
        train_keys = train_keys or gold
        valid = [] if on_gold else gold
        handle = self.models.train(f"working-{t}", self.pairs(train_keys), self.pairs(valid), self.root / "models")
        gold_acc = accuracy(self.models.score(handle, self.pairs(gold)))
        valid_acc = float(handle.metrics.get("valid_accuracy", float("nan")))
        holdout = s.pool("holdout")
        holdout_acc = accuracy(self.models.score(handle, self.pairs(holdout))) if holdout else float("nan")
        s.models[f"working-{t}"] = handle.to_dict()
        entry = {
            "iteration": t - 1,
            "model": handle.version,
            "train_pairs": len(train_keys),
            "trained_on_gold": on_gold,
            "valid_accuracy": valid_acc,
            "gold_accuracy": gold_acc,
            "holdout_accuracy": holdout_acc,
            "gold": len(s.pool("gold")),
            "silver": len(s.pool("silver")),
            "unverified": len(s.pool("unverified")),
            "label_accuracy": self.label_accuracy(train_keys),
        }
        s.history.append(entry)
        best = self.select_best()
        entry["best_iteration"] = best
        self.say(
            f"stage 1, after {t - 1} iterations: D_gold acc {gold_acc:.3f}, held-out acc {holdout_acc:.3f}; "
            f"best RM: iteration {best}"
        )
        if t - 1 >= self.c.iterations:
            s.stage1_stopped = f"ran {self.c.iterations} iterations"
        elif t - 1 - best >= self.c.patience:
            s.stage1_stopped = f"D_gold accuracy did not improve for {self.c.patience} iterations"
        elif not s.pool("unverified"):
            s.stage1_stopped = "no unverified pairs left"

    def select_best(self) -> int:
        """The best RM: of this run's working RMs, the most accurate on all of today's D_gold (re-scored, as
        D_gold grows), earliest on ties; RMs that learned from D_gold compete only while no other exists."""
        s = self.state
        gold = self.pairs(s.pool("gold"))
        candidates = [h for h in s.history if not h["trained_on_gold"]] or s.history
        scored = []
        for h in candidates:
            handle = self.handle(f"working-{h['iteration'] + 1}")
            scored.append((accuracy(self.models.score(handle, gold)), -h["iteration"]))
        acc, neg_iteration = max(scored)
        s.models[BEST] = s.models[f"working-{-neg_iteration + 1}"]
        s.results["best_rm"] = {"iteration": -neg_iteration, "gold_accuracy": acc, "gold_pairs": len(gold)}
        return -neg_iteration

    def serve_models(self, handles: dict[str, ModelHandle]) -> None:
        """The RMs the next stage's scoring uses, by role: in process, scored here; in the cluster the
        gold-scorer service scores through the scorer, which is given them (controller.scorer_reload_url)."""
        self._stage_models = [
            ScoringModel(role, handle.version, partial(self.models.score, handle)) for role, handle in handles.items()
        ]
        if self.c.executor == "kafka" and self.c.scorer_reload_url:
            self.reload(export_registry(self.models, handles, self.root / "models"))

    def score_into(self, keys: list[str], handle: ModelHandle, role: str) -> dict[str, float]:
        """Score `keys` with `handle`, replace each record's `role` score, and return key -> p(chosen > rejected)."""
        rewards = self.models.score(handle, self.pairs(keys))
        return {
            key: set_score(self.records[key], role, handle.version, rc, rr)
            for key, (rc, rr) in zip(keys, rewards, strict=True)
        }

    def curate_stage1(self, t: int) -> None:
        """Stage-1 iteration t: retrieve, annotate and route unverified pairs.

        Retrieves unverified pairs near the verified ones (more neighbours for those the working
        RM gets wrong), annotates them and runs the stage-1 filter; review candidates go to the
        humans (within human_budget), the rest get the judges' label into D_silver, or stay
        unverified when the panel abstains.
        """
        s = self.state
        assert self.table is not None
        handle = self.handle(f"working-{t}")
        verified = s.pool("gold") + s.pool("silver")
        p = self.score_into(verified, handle, BEST)
        ks = [k_rule(p[k], self.c.k_max) for k in verified]
        hits = self.table.nearest(verified, ks, s.pool("unverified"))
        retrieved = sorted({k for h in hits for k in h})
        errors = sum(1 for k in verified if p[k] <= 0.5)
        self.say(
            f"stage 1 iteration {t}: RM wrong on {errors}/{len(verified)} verified pairs; "
            f"retrieved {len(retrieved)} unverified pairs"
        )
        entry: dict[str, Any] = {"iteration": t, "rm_errors": errors, "retrieved": len(retrieved)}
        if retrieved:
            for key in retrieved:
                record = self.records[key]
                record.lineage.stage = STAGE_ONE
                record.lineage.iteration = t
            self.serve_models({BEST: handle})
            # Scored by the working RM, judged, and decided by the stage-1 rule: pairs the RM gets
            # wrong or is unsure of are gold candidates (REVIEW).
            result = self.executor.run("stage1", [self.records[k] for k in retrieved])
            annotated = {key_of(r): r for _, r in result.routed}
            self.records.update(annotated)
            review = [k for k, r in annotated.items() if r.decision.decision == DECISION_REVIEW]
            pb = {k: score.p for k in review if (score := score_of(annotated[k], BEST)) is not None}
            to_humans = human_candidates(pb, self.c.human_budget)
            gold_added, dropped = self.ask_humans(to_humans, t)
            silver, flipped, abstained = self.judge_labels([k for k in sorted(annotated) if k not in set(to_humans)], t)
            entry.update(
                annotated=len(annotated),
                failed=len(result.failed),
                gold_candidates=len(review),
                to_humans=len(to_humans),
                human_verified=len(gold_added),
                human_discarded=len(dropped),
                silver_kept=silver,
                silver_flipped=flipped,
                judges_abstained=abstained,
            )
        s.iteration = t
        s.results.setdefault("stage1", []).append(entry)

    def judge_labels(self, keys: list[str], t: int) -> tuple[int, int, int]:
        """D_silver gets the judges' label (rules.silver_label); an abstaining panel leaves the pair unverified."""
        counts: Counter[int] = Counter()
        moved = []
        for key in keys:
            record = silver_label(self.records[key])
            if record is None:
                continue
            counts[record.decision.decision] += 1
            self.records[key] = record
            moved.append(key)
        self.state.move(moved, "silver")
        return counts[DECISION_KEEP], counts[DECISION_FLIP], len(keys) - len(moved)

    def train_gold(self) -> None:
        """Train the gold RM on D_gold alone and record it under the gold role."""
        s = self.state
        handle = self.models.train(GOLD, self.pairs(s.pool("gold")), [], self.root / "models")
        s.models[GOLD] = handle.to_dict()

    def curate_stage2(self) -> None:
        """Stage 2: score, annotate and filter every pair still unverified; curated ones join the stage2 pool."""
        s = self.state
        keys = s.pool("unverified")
        for key in keys:
            self.records[key].lineage.stage = STAGE_TWO
        self.serve_models({GOLD: self.handle(GOLD), BEST: self.handle(BEST)})
        result = self.executor.run("stage2", [self.records[k] for k in keys])
        decisions: Counter[str] = Counter()
        curated: list[str] = []
        dropped: list[str] = []
        for route, record in result.routed:
            key = key_of(record)
            self.records[key] = record
            decisions[Decision.Name(record.decision.decision).removeprefix("DECISION_")] += 1
            (curated if route == "curated" else dropped).append(key)
        s.move(curated, "stage2")
        s.move(dropped, "discarded")
        annotated = sum(1 for _, r in result.routed if len(r.votes))
        s.results["stage2"] = {
            "pairs": len(keys),
            "decisions": dict(decisions),
            "annotated": annotated,
            "skipped_annotation": len(result.routed) - annotated,
            "failed": len(result.failed),
        }
        self.say(f"stage 2: {dict(decisions)} of {len(keys)} pairs ({annotated} sent to judges)")
