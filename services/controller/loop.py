"""The controller: the two-stage curation loop of DESIGN.md section 1, as resumable steps.

Steps, in order, each run once (a restarted controller skips the ones the run state lists):
ingest, attributes, prepare, seed, s1.<t>.train and s1.<t>.curate per Stage-1 iteration, s2.gold,
s2.curate, final.dataset, final.train, final.register, report. Pairs and pools live in the
PairStore (state.py), never all in memory: steps stream pools a batch at a time. docs/curation.md
says what each step does; the method's rules are in services/consistency_filter/rules.py,
retrieval in embeddings.py, ingest in intake.py, publishing in publish.py.
"""

from __future__ import annotations

import json
import logging
import random
import time
from array import array
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from synpref.services.annotator.annotate import Annotator
from synpref.services.annotator.judges import Judge
from synpref.services.consistency_filter.rules import make_filter_stage
from synpref.services.controller.curation import CurationSteps
from synpref.services.controller.embeddings import (
    FILLED_INDEX_FILE,
    TRAINED_INDEX_FILE,
    VECTORS_FILE,
    PairView,
    PoolRetrieval,
    embed_pool,
    fill_index,
    train_index,
)
from synpref.services.controller.executors import InProcessExecutor, StageExecutor, chain
from synpref.services.controller.final_steps import FinalSteps
from synpref.services.controller.known_vectors import KnownVectors
from synpref.services.controller.models import ModelHandle, RewardModels, accuracy
from synpref.services.controller.providers import HumanProvider
from synpref.services.controller.publish import export_registry
from synpref.services.controller.state import VERDICTS_FILE, RunState, StateStore, VerdictLog, key_of, review_once
from synpref.services.gold_scorer.scoring import ScoringModel, make_scoring_stage
from synpref.shared.ann import VectorFile
from synpref.shared.config import Settings
from synpref.shared.roles import BEST, GOLD
from synpref.shared.stage import Stage
from synpref.v1.pair_pb2 import STAGE_ONE, PairRecord

log = logging.getLogger(__name__)


class Controller(CurationSteps, FinalSteps):
    """The two-stage curation loop over one workdir, run as resumable named steps.

    Args:
        settings: the whole configuration; `settings.controller` (kept as `self.c`) holds the
            workdir, sources, iteration limits, budgets and executor choice.
        models: trains, scores and exports reward models (RewardModels).
        humans: the human verifiers asked about Stage-1 gold candidates and the seed.
        judges: the LLM judges the in-process annotator stage calls.
        executor: runs the "stage1" and "stage2" chains (score -> annotate -> filter); default: in
            process, built by `in_process_stage`.
        embed: texts -> vectors for retrieval and the judges' examples; default: an Embedder of
            `settings.annotator.embedding_model`, built on first use.
        on_step: called with each step's name after the step is committed.
        progress: receives one-line progress messages (default `print`).
        labeller: the attribute labeller handed to the annotator, if any.

    Construction opens the workdir's PairStore and reads the committed run state, so a new
    Controller on an existing workdir resumes where the last one stopped: `run` skips every
    step already in `state.done`, and a long step goes on after its last committed batch.
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
        self.store = StateStore(self.c.store_dir or self.c.workdir)
        self.pairstore = self.store.pairs
        self.verdicts = VerdictLog(self.store.root / VERDICTS_FILE)  # human verdicts, durable as they arrive
        self.root = Path(self.c.workdir)  # models, datasets, the report: what Jobs and other pods share
        self.root.mkdir(parents=True, exist_ok=True)
        self.state = self.store.load()
        self.current_step = ""
        self._vectors: VectorFile | None = None
        self._retrieval: PoolRetrieval | None = None
        self.known = KnownVectors(self.vectors, self._embed)  # prepare's vectors, for the judges and examples
        self._examples: Any = None
        self._stage_models: list[ScoringModel] = []
        """The RMs the scoring stage of the current stage uses (in the cluster the scorer serves them)."""
        self._annotators: dict[int, Annotator] = {}
        """One per stage for the whole run: its event loop and the judges' HTTP sessions are reused."""

    # ------------------------------------------------------------ plumbing

    def step(self, name: str, fn: Callable[[], None]) -> None:
        """Run `fn` as step `name` unless state.done lists it: its writes and the state naming it done commit
        together (a long step also commits after each batch, see `commit_batch`)."""
        if name in self.state.done:
            return
        started = time.perf_counter()
        self.say(f"[{name}] ...")
        self.current_step = name
        try:
            with self.pairstore.transaction():
                fn()
                self.state.done.append(name)
                self.state.results.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 2)
                self.state.results["pools"] = self.pool_sizes()
                self.store.save(self.state)
        except BaseException:
            # Rolled back: forget what this process changed in memory and go back to the committed state.
            self.state = self.store.load()
            self._retrieval = None
            raise
        self.store.mirror(self.state)
        self.say(f"[{name}] done in {time.perf_counter() - started:.1f}s  pools: {self.pool_sizes()}")
        if self.on_step is not None:
            self.on_step(name)

    def commit_batch(self, progress: dict[str, Any]) -> None:
        """Commit the current step's writes so far with its `progress` (cursor, counters): a restart goes on
        from here."""
        self.pairstore.set_meta(f"progress:{self.current_step}", json.dumps(progress, sort_keys=True))
        self.pairstore.commit_point()

    def progress_of(self, default: dict[str, Any]) -> dict[str, Any]:
        """The current step's last committed progress, or `default` when it has none."""
        text = self.pairstore.meta(f"progress:{self.current_step}")
        return json.loads(text) if text else default

    def pool_sizes(self) -> dict[str, int]:
        """Pool name -> number of pairs in it, sorted by name."""
        return dict(sorted(self.pairstore.counts().items()))

    def view(self, pools: str | Sequence[str]) -> PairView:
        """The pairs of `pools` as pair dicts, in row order, read as used."""
        return PairView(self.pairstore, self.pairstore.all_rows(pools))

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
                self.judges, self.labeller, self.example_source(), max_examples, skip_confident=True, band=f.band
            )
        return chain(make_scoring_stage(self._stage_models), self._annotators[stage].stage(), make_filter_stage(f))

    def close_stages(self) -> None:
        """Close the in-process annotators' judge sessions and event loops (a later stage makes new ones)."""
        for annotator in self._annotators.values():
            annotator.close()
        self._annotators.clear()

    def close(self) -> None:
        """Close the annotators, the VerdictLog and the PairStore; the controller is done. Twice is fine."""
        self.close_stages()
        self.verdicts.close()
        self.store.close()

    # ------------------------------------------------------------ retrieval and examples

    def _embed(self, texts: list[str]) -> np.ndarray:
        if self.embed is None:
            from synpref.shared.retrieval import Embedder

            # MiniLM's own limit (256 word pieces): conversation and attributes are embedded whole where they fit.
            self.embed = Embedder(self.settings.annotator.embedding_model).embed
        return self.embed(texts)

    def vectors(self) -> VectorFile:
        """The retrieval vectors of the prepare step, by store row."""
        if self._vectors is None:
            self._vectors = VectorFile(self.store.root / VECTORS_FILE)
        return self._vectors

    def retrieval(self) -> PoolRetrieval:
        """The ANN index over D_un (mapped from disk; D_un's rows from the store) once this process needs it."""
        if self._retrieval is None:
            trained, filled = self.store.root / TRAINED_INDEX_FILE, self.store.root / FILLED_INDEX_FILE
            self._retrieval = PoolRetrieval(self.pairstore, self.vectors(), trained, filled)
        return self._retrieval

    def left_unverified(self, rows: Sequence[int]) -> None:
        """Rows that moved out of D_un leave the ANN index too (if this process has built it)."""
        if self._retrieval is not None and rows:
            self._retrieval.leave(rows)

    @property
    def examples_dir(self) -> Path:
        """Where the judges' example index lives: annotator.examples_index (the cluster's annotators read it
        there), else <workdir>/examples."""
        configured = self.settings.annotator.examples_index
        return Path(configured) if configured else self.root / "examples"

    def example_source(self) -> Any:
        """The judges' human-verified examples, re-read whenever the loop rewrites the index."""
        if self._examples is None:
            from synpref.shared.examples import ReloadingExamples

            self._examples = ReloadingExamples(self.examples_dir, self.known.embed)
        return self._examples

    def refresh_examples(self) -> None:
        """Rewrite the judges' example index from today's D_gold (with attributes), before the next batch."""
        gold = (row_record for chunk in self.pairstore.scan("gold") for row_record in chunk)
        n = self.known.write_examples(self.examples_dir, gold, self.vectors().dim)
        self.say(f"examples: {n} human-verified pairs indexed for the judges")

    # ------------------------------------------------------------ the loop

    def run(self) -> RunState:
        """Run every step not yet done, in order (Stage 1 until it stops, then Stage 2, final), and return the state."""
        try:
            return self._run_steps()
        finally:
            self.close_stages()  # the stores stay open for the caller (close() closes them)

    def _run_steps(self) -> RunState:
        self.step("ingest", self.ingest)
        self.step("attributes", self.label_attributes)
        self.step("prepare", self.prepare)
        prepare = getattr(self.models, "prepare", None)
        if prepare is not None:
            prepare(self.view(("unverified", "holdout", "gold", "silver", "stage2", "discarded")))
        self.step("seed", self.seed)
        while not self.state.stage1_stopped:
            t = self.state.iteration + 1
            self.step(f"s1.{t}.train", partial(self.train_working, t))
            if self.state.stage1_stopped:
                break
            self.step(f"s1.{t}.curate", partial(self.curate_stage1, t))
        # Stage 2 queries no index: its mapping and D_un's bitmap are dropped.
        self._retrieval = None
        self.step("s2.gold", self.train_gold)
        self.step("s2.curate", self.curate_stage2)
        self.step("final.dataset", self.write_datasets)
        self.step("final.train", self.train_final)
        self.step("final.register", self.register)
        self.step("report", self.report)
        return self.state

    # ------------------------------------------------------------ steps

    def ingest(self) -> None:
        """Stream the sources into the PairStore: preprocessed, split by conversation into D_un and held-out."""
        from synpref.services.controller.intake import ingest_sources

        if self.pairstore.size():
            raise RuntimeError(f"{self.pairstore.path} already holds pairs from another run; use a new workdir")
        self.verdicts.clear()
        new_run = getattr(self.models, "new_run", None)
        if new_run is not None:
            new_run()  # K8sModels: Jobs left by an earlier run in this workdir are not this run's
        self.state.results.update(
            ingest_sources(self.pairstore, self.c, self.say, self.settings.kafka.max_message_bytes)
        )

    def label_attributes(self) -> None:
        """Label every pair to be curated with its attribute 5-tuple (the annotator's labeller), a batch at a
        time, so retrieval embeds (conversation, attributes) as DESIGN.md 1 says; nothing to do without a
        labeller (annotator.attribute_model), and pairs whose answer is unusable stay unlabelled."""
        if self.labeller is None:
            self.say("attributes: no labeller configured (annotator.attribute_model); retrieval embeds conversations")
            return
        if 0 not in self._annotators:
            self._annotators[0] = Annotator([], self.labeller)
        progress = self.progress_of({"after": -1, "labelled": 0, "unusable": 0})
        for chunk in self.pairstore.scan("unverified", batch=self.c.batch_pairs, after=progress["after"]):
            labels = self._annotators[0].label([r for _, r in chunk])
            labelled = []
            for (row, record), attributes in zip(chunk, labels, strict=True):
                if attributes is not None:
                    record.attributes.CopyFrom(attributes)
                    labelled.append((row, record))
            self.pairstore.put(labelled)
            progress = {
                "after": chunk[-1][0],
                "labelled": progress["labelled"] + len(labelled),
                "unusable": progress["unusable"] + len(chunk) - len(labelled),
            }
            self.commit_batch(progress)
            self.say(f"attributes: {progress['labelled']} pairs labelled, {progress['unusable']} unusable answers")
        self.state.results["attributes"] = {k: progress[k] for k in ("labelled", "unusable")}

    def prepare(self) -> None:
        """Embed D_un for retrieval (vectors by row on disk) and train the ANN index for its size."""
        progress = self.progress_of({"after": -1, "embedded": 0})
        vectors = embed_pool(
            self.pairstore,
            self.store.root / VECTORS_FILE,
            ("unverified",),
            self._embed,
            self.say,
            resume=(progress["after"], progress["embedded"]),
            commit=lambda after, done: self.commit_batch({"after": after, "embedded": done}),
        )
        train_index(self.pairstore, vectors, self.store.root / TRAINED_INDEX_FILE)
        fill_index(self.pairstore, vectors, self.store.root / TRAINED_INDEX_FILE, self.store.root / FILLED_INDEX_FILE)
        self._vectors = vectors

    def seed(self) -> None:
        """Sample the seed (controller.seed_pairs, or seed_fraction of the pool) for humans to verify into D_gold."""
        pool = array("q", self.pairstore.all_rows("unverified"))  # 8 bytes a row, not a list's ~40 (40M pairs)
        n = self.c.seed_size(len(pool))
        picked = sorted(random.Random(f"seed:{self.c.seed}").sample(pool, min(n, len(pool))))
        verified, dropped = self.ask_humans(picked, iteration=0)
        self.state.results["seed_gold"] = [key_of(r) for r in self.pairstore.get(verified)]
        left = len(picked) - len(verified) - len(dropped)  # undecided by the provider: they stay in D_un
        self.state.results["seed_human"] = {"verified": len(verified), "discarded": len(dropped), "undecided": left}

    def ask_humans(self, rows: list[int], iteration: int) -> tuple[list[int], list[int]]:
        """Humans decide `rows`: verified ones join D_gold (flipped if they preferred rejected), the rest are
        discarded; the judges' example index is rewritten. Each verdict is kept as it arrives (state.VerdictLog): a
        retried step asks only about the pairs not decided by its earlier attempts."""
        records = self.pairstore.get(rows)
        row_of = {key_of(r): row for r, row in zip(records, rows, strict=True)}
        for record in records:
            record.lineage.stage = STAGE_ONE  # human verification is Stage 1's, seed included
        verified: list[int] = []
        dropped: list[int] = []
        updates: list[tuple[int, PairRecord]] = []
        for route, record in review_once(self.humans, self.verdicts, self.current_step, records, self.say):
            record.lineage.iteration = iteration
            row = row_of[key_of(record)]
            updates.append((row, record))
            (verified if route == "verified" else dropped).append(row)
        self.pairstore.put(updates)
        self.pairstore.move(verified, "gold", self.current_step)
        self.pairstore.move(dropped, "discarded", self.current_step)
        self.left_unverified(verified + dropped)
        self.refresh_examples()
        return verified, dropped

    def train_working(self, t: int) -> None:
        """Iteration t's working RM (on D_silver, chosen on all of D_gold); picks the best RM; decides whether
        Stage 1 goes on."""
        s = self.state
        pools = ("silver", "unverified") if self.c.working_train == "silver+unverified" else ("silver",)
        gold = self.view("gold")
        train = self.view(pools)
        # With no D_silver yet (the first iteration) the RM learns from the seed D_gold, and nothing is left
        # to choose its checkpoint on: its D_gold accuracy is then a training figure.
        on_gold = len(train) == 0
        if on_gold:
            train, pools = gold, ("gold",)
        handle = self.models.train(f"working-{t}", train, [] if on_gold else gold, self.root / "models")
        gold_acc = accuracy(self.models.score(handle, gold))
        holdout = self.holdout_sample()
        holdout_acc = accuracy(self.models.score(handle, holdout)) if len(holdout) else float("nan")
        s.models[f"working-{t}"] = handle.to_dict()
        counts = self.pairstore.counts()
        entry = {
            "iteration": t - 1,
            "model": handle.version,
            "train_pairs": len(train),
            "trained_on_gold": on_gold,
            "valid_accuracy": float(handle.metrics.get("valid_accuracy", float("nan"))),
            "gold_accuracy": gold_acc,
            "holdout_accuracy": holdout_acc,
            "gold": counts["gold"],
            "silver": counts["silver"],
            "unverified": counts["unverified"],
            "label_accuracy": self.label_accuracy(pools),
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
        elif not counts["unverified"]:
            s.stage1_stopped = "no unverified pairs left"

    def holdout_sample(self) -> PairView:
        """The held-out pairs a Stage-1 iteration is measured on: at most controller.eval_pairs, evenly spaced."""
        rows = np.fromiter(self.pairstore.all_rows("holdout"), dtype=np.int64)
        cap = self.c.eval_pairs
        if cap and len(rows) > cap:
            rows = rows[:: -(-len(rows) // cap)][:cap]
        return PairView(self.pairstore, rows.tolist())

    def select_best(self) -> int:
        """The best RM: of this run's working RMs, the most accurate on all of today's D_gold (re-scored, as
        D_gold grows), earliest on ties; RMs that learned from D_gold compete only while no other exists."""
        s = self.state
        gold = self.view("gold")
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
        gold-scorer service scores through the scorers, which are given them (controller.scorer_models_file, polled by
        every replica, and controller.scorer_reload_url, which switches one at once)."""
        self._stage_models = [
            ScoringModel(role, handle.version, partial(self.models.score, handle)) for role, handle in handles.items()
        ]
        if self.c.executor == "kafka" and (self.c.scorer_reload_url or self.c.scorer_models_file):
            self.reload(export_registry(self.models, handles, self.root / "models"))

    def train_gold(self) -> None:
        """Train the gold RM on D_gold alone and record it under the gold role; under `filter.on_disagreement:
        auto`, first measure how far a gold RM trained so can be trusted (measure_gold)."""
        if self.settings.filter.on_disagreement == "auto":
            self.measure_gold()
        handle = self.models.train(GOLD, self.view("gold"), [], self.root / "models")
        self.state.models[GOLD] = handle.to_dict()
