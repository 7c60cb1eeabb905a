"""The loop's curation steps (Stage-1 curate, Stage 2) and their batching, mixed into Controller (loop.py).

Both stages send pairs through the executor's chain (score -> annotate -> filter) a batch of
`controller.batch_pairs` at a time and commit each batch's records with the step's progress,
so a killed controller goes on after the last committed batch; the rules that decide what a
result means (silver label, human candidates, KEEP / FLIP) are in consistency_filter/rules.py.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from synpref.services.consistency_filter.rules import (
    disagreement_rule,
    human_candidates,
    recycle,
    score_of,
    silver_label,
)
from synpref.services.controller.embeddings import PairView, PoolRetrieval
from synpref.services.controller.executors import StageExecutor
from synpref.services.controller.known_vectors import KnownVectors
from synpref.services.controller.models import ModelHandle, RewardModels
from synpref.services.controller.state import RunState, key_of
from synpref.services.gold_scorer.scoring import pair_dict, set_score
from synpref.shared.config import ControllerSettings, Settings
from synpref.shared.pairs import conversation_key, held_out_positions, message_dicts
from synpref.shared.pairstore import PairStore
from synpref.shared.roles import BEST, GOLD
from synpref.v1.pair_pb2 import (
    DECISION_FLIP,
    DECISION_KEEP,
    DECISION_REVIEW,
    STAGE_ONE,
    STAGE_TWO,
    Decision,
    PairRecord,
)

GOLD_PROBE_HELD_OUT = 0.2
"""Share of D_gold's conversations the auto rule's probe gold RM is scored on, not trained on."""


def k_rules(p: np.ndarray, k_max: int) -> np.ndarray:
    """shared/retrieval.k_rule of every p at once (k_max where p <= 0.5 or NaN, else ceil(k_max (1 - p))
    clipped to 0..k_max), as int32: 4 bytes a verified pair, not a list's 8 built by a Python loop over millions."""
    p = np.asarray(p, dtype=np.float64)
    k = np.clip(np.ceil(k_max * (1.0 - p)), 0, k_max)
    return np.where(p > 0.5, k, k_max).astype(np.int32)


def lowest_p(rows: np.ndarray, p: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """The `budget` entries of lowest p, ties by lower row (rules.human_candidates' order), in that order."""
    order = np.lexsort((rows, p))[: max(budget, 0)]
    return rows[order], p[order]


class CurationSteps:
    """Steps s<t>.curate and s2.curate. Controller provides the attributes and methods declared here."""

    c: ControllerSettings
    settings: Settings
    root: Path
    state: RunState
    pairstore: PairStore
    models: RewardModels
    executor: StageExecutor
    known: KnownVectors
    current_step: str
    say: Callable[[str], None]
    handle: Callable[[str], ModelHandle]
    retrieval: Callable[[], PoolRetrieval]
    serve_models: Callable[[dict[str, ModelHandle]], None]
    ask_humans: Callable[[list[int], int], tuple[list[int], list[int]]]
    left_unverified: Callable[[Sequence[int]], None]
    commit_batch: Callable[[dict[str, Any]], None]
    progress_of: Callable[[dict[str, Any]], dict[str, Any]]

    def score_verified(self, handle: ModelHandle) -> tuple[np.ndarray, np.ndarray]:
        """Score D_gold and D_silver with `handle` (as BEST, written into the records); their rows (int64) and
        p (float64, as set_score gives it: k_rule's ceil is taken of the same number), 16 bytes a pair.

        A record already scored by this very model (its version) keeps that p: a restarted step finds the scores its
        first attempt committed with its first batch, and scoring D_gold and D_silver again (millions of pairs at
        40M, hours with a large RM) on every restart would give the same numbers."""
        rows = array("q")
        ps = array("d")
        for chunk in self.pairstore.scan(("gold", "silver"), batch=self.c.batch_pairs):
            known: dict[int, float] = {}
            for row, record in chunk:
                score = score_of(record, BEST)
                if score is not None and score.version == handle.version:
                    known[row] = score.p
            todo = [(row, record) for row, record in chunk if row not in known]
            rewards = self.models.score(handle, [pair_dict(r) for _, r in todo]) if todo else []
            for (row, record), (rc, rr) in zip(todo, rewards, strict=True):
                known[row] = set_score(record, BEST, handle.version, rc, rr)
            for row, _ in chunk:
                rows.append(row)
                ps.append(known[row])
            self.pairstore.put(todo)
        return np.frombuffer(rows, dtype=np.int64), np.frombuffer(ps, dtype=np.float64)

    def curate_stage1(self, t: int) -> None:
        """Stage-1 iteration t: retrieve, annotate and route unverified pairs.

        Retrieves unverified pairs near the verified ones (more neighbours for those the working
        RM gets wrong), runs them through score -> annotate -> the stage-1 filter a batch at a
        time (each batch committed), then sends review candidates to the humans (within
        human_budget) and gives the rest the judges' label into D_silver, or leaves them
        unverified when the panel abstains.
        """
        handle = self.handle(f"working-{t}")
        verified, p = self.score_verified(handle)
        retrieved = self.retrieval().nearest_rows(verified, k_rules(p, self.c.k_max))
        errors = int(np.count_nonzero(p <= 0.5))
        self.say(
            f"stage 1 iteration {t}: RM wrong on {errors}/{len(verified)} verified pairs; "
            f"retrieved {len(retrieved)} unverified pairs"
        )
        entry: dict[str, Any] = {"iteration": t, "rm_errors": errors, "retrieved": len(retrieved)}
        if len(retrieved):
            self.serve_models({BEST: handle})
            failed = self.run_batches("stage1", retrieved, t)
            # Scored by the working RM, judged, and decided by the stage-1 rule: pairs the RM gets
            # wrong or is unsure of are gold candidates (REVIEW). Of those only the human_budget that
            # human_candidates picks are kept (lowest p, ties by row), so memory is the budget plus a batch.
            parts: list[np.ndarray] = []
            best_rows, best_p = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
            candidates = 0
            for start in range(0, len(retrieved), self.c.batch_pairs):
                rows = retrieved[start : start + self.c.batch_pairs].tolist()
                done: list[int] = []
                review: dict[int, float] = {}
                for row, record in zip(rows, self.pairstore.get(rows), strict=True):
                    if record.lineage.stage != STAGE_ONE or record.lineage.iteration != t:
                        continue  # failed in every attempt: not annotated this iteration
                    done.append(row)
                    score = score_of(record, BEST)
                    if record.decision.decision == DECISION_REVIEW and score is not None:
                        review[row] = score.p
                parts.append(np.array(done, dtype=np.int64))
                candidates += len(review)
                best_rows, best_p = lowest_p(
                    np.concatenate([best_rows, np.fromiter(review, dtype=np.int64, count=len(review))]),
                    np.concatenate([best_p, np.fromiter(review.values(), dtype=np.float64, count=len(review))]),
                    self.c.human_budget,
                )
            to_humans = human_candidates(
                dict(zip(best_rows.tolist(), best_p.tolist(), strict=True)), self.c.human_budget
            )
            gold_added, dropped = self.ask_humans(to_humans, t)
            annotated = np.concatenate(parts)
            silver, flipped, abstained = self.judge_labels(annotated[~np.isin(annotated, to_humans)])
            entry.update(
                annotated=len(annotated),
                failed=failed,
                gold_candidates=candidates,
                to_humans=len(to_humans),
                human_verified=len(gold_added),
                human_discarded=len(dropped),
                human_undecided=len(to_humans) - len(gold_added) - len(dropped),  # left in D_un, asked again later
                silver_kept=silver,
                silver_flipped=flipped,
                judges_abstained=abstained,
            )
        self.state.iteration = t
        self.state.results.setdefault("stage1", []).append(entry)

    def run_batches(self, name: str, rows: np.ndarray, t: int) -> int:
        """Send `rows` through the executor's stage-1 chain a batch at a time, committing each batch's
        records; goes on after the last committed batch on a restart. Returns how many failed."""
        progress = self.progress_of({"next": 0, "failed": 0})
        for start in range(progress["next"], len(rows), self.c.batch_pairs):
            batch = rows[start : start + self.c.batch_pairs].tolist()
            records = self.pairstore.get(batch)
            for record in records:
                record.lineage.stage = STAGE_ONE
                record.lineage.iteration = t
            row_of = {key_of(r): row for r, row in zip(records, batch, strict=True)}
            self.known.note(batch, records)  # the in-process annotator then reads their vectors, not embeds them
            result = self.executor.run(name, records)
            self.known.forget()
            self.pairstore.put((row_of[key_of(r)], r) for _, r in result.routed)
            progress = {"next": start + len(batch), "failed": progress["failed"] + len(result.failed)}
            self.commit_batch(progress)
            self.say(f"{name}: {progress['next']}/{len(rows)} pairs through score, annotate and filter")
        return int(progress["failed"])

    def judge_labels(self, rows: np.ndarray) -> tuple[int, int, int]:
        """D_silver gets the judges' label (rules.silver_label); an abstaining panel leaves the pair unverified."""
        counts: Counter[int] = Counter()
        for start in range(0, len(rows), self.c.batch_pairs):
            batch = rows[start : start + self.c.batch_pairs].tolist()
            labelled = []
            for row, record in zip(batch, self.pairstore.get(batch), strict=True):
                out = silver_label(record)
                if out is not None:
                    counts[out.decision.decision] += 1
                    labelled.append((row, out))
            self.pairstore.put(labelled)
            moved = [row for row, _ in labelled]
            self.pairstore.move(moved, "silver", self.current_step)
            self.left_unverified(moved)
        return counts[DECISION_KEEP], counts[DECISION_FLIP], len(rows) - sum(counts.values())

    def measure_gold(self) -> None:
        """For `filter.on_disagreement: auto`: how far a gold RM can be trusted to overrule labels. A probe
        gold RM learns from D_gold less a held-out fifth of its conversations (seeded) and is scored on that fifth;
        Stage 2 then flips disagreements if its accuracy's lower bound reaches flip_min_gold_accuracy on at least
        flip_min_held_out_pairs pairs, else discards them."""
        rows_of: list[int] = []
        prompts: list[str] = []
        for chunk in self.pairstore.scan("gold", batch=self.c.batch_pairs):
            rows_of.extend(row for row, _ in chunk)
            prompts.extend(conversation_key(message_dicts(r.pair.conversation)) for _, r in chunk)
        # Held out by conversation, as the pool's held-out pairs are: pairs sharing a prompt (RM-Bench's style
        # pairs, a pair and its flipped twin) on both sides let a probe that learned the prompt look accurate.
        distinct = sorted(set(prompts))
        held_prompts = {distinct[i] for i in held_out_positions(len(distinct), GOLD_PROBE_HELD_OUT, self.c.seed)}
        rows = np.array(rows_of, dtype=np.int64)
        held = np.array([k in held_prompts for k in prompts], dtype=bool)
        correct = n = 0
        if 0 < held.sum() < len(rows):
            probe = self.models.train("gold-probe", PairView(self.pairstore, rows[~held]), [], self.root / "models")
            rewards = self.models.score(probe, PairView(self.pairstore, rows[held]))
            correct, n = int(sum(bool(c > r) for c, r in rewards)), len(rewards)
        minimum = self.settings.filter.flip_min_gold_accuracy
        rule, bound = disagreement_rule(correct, n, minimum, self.settings.filter.flip_min_held_out_pairs)
        self.state.results["gold_rm"] = {
            "held_out_pairs": n,
            "held_out_accuracy": correct / n if n else None,
            "accuracy_lower_bound": bound,
            "flip_min_gold_accuracy": minimum,
            "flip_min_held_out_pairs": self.settings.filter.flip_min_held_out_pairs,
            "on_disagreement": rule,
        }
        acc = f"{correct / n:.3f} on {n} held-out D_gold pairs" if n else f"not measurable ({len(rows)} D_gold pairs)"
        self.say(f"stage 2: gold RM accuracy {acc}, lower bound {bound:.3f} vs {minimum:g}: disagreements {rule}")

    def resolve_disagreements(self, routed: list[tuple[str, PairRecord]]) -> list[tuple[str, PairRecord]]:
        """Under auto with a gold RM measured strong, the pairs the filter discarded for disagreement are
        recycled swapped (rules.recycle), in process and from the cluster's filter alike."""
        gold = self.state.results.get("gold_rm") or {}
        if self.settings.filter.on_disagreement != "auto" or gold.get("on_disagreement") != "flip":
            return routed
        why = (
            f"auto: gold RM held-out accuracy {gold['held_out_accuracy']:.3f}, lower bound "
            f"{gold['accuracy_lower_bound']:.3f} >= {gold['flip_min_gold_accuracy']:g}"
        )
        out = []
        for route, record in routed:
            recycled = recycle(record, why)
            out.append(("curated", recycled) if recycled is not record else (route, record))
        return out

    def curate_stage2(self) -> None:
        """Stage 2: score, annotate and filter every pair still unverified, a batch at a time (each batch
        committed with its cursor); curated ones join the stage2 pool, the rest are discarded."""
        self.serve_models({GOLD: self.handle(GOLD), BEST: self.handle(BEST)})
        progress = self.progress_of({"after": -1, "pairs": 0, "annotated": 0, "failed": 0, "decisions": {}})
        decisions: Counter[str] = Counter(progress["decisions"])
        while rows := self.pairstore.rows("unverified", after=progress["after"], limit=self.c.batch_pairs):
            records = self.pairstore.get(rows)
            for record in records:
                record.lineage.stage = STAGE_TWO
                # Stage 1's judging of a pair it left here is not Stage 2's: kept, a pair Stage 2's annotator
                # skips (the best RM is sure) would be counted, and explained, as judged by Stage 2.
                del record.votes[:]
                record.ClearField("judge_aggregate")
                del record.retrieved_example_ids[:]
            row_of = {key_of(r): row for r, row in zip(records, rows, strict=True)}
            self.known.note(rows, records)
            result = self.executor.run("stage2", records)
            self.known.forget()
            result.routed = self.resolve_disagreements(result.routed)
            curated: list[int] = []
            dropped: list[int] = []
            for route, record in result.routed:
                decisions[Decision.Name(record.decision.decision).removeprefix("DECISION_")] += 1
                (curated if route == "curated" else dropped).append(row_of[key_of(record)])
            self.pairstore.put((row_of[key_of(r)], r) for _, r in result.routed)
            self.pairstore.move(curated, "stage2", self.current_step)
            self.pairstore.move(dropped, "discarded", self.current_step)
            self.left_unverified(curated + dropped)
            progress = {
                "after": rows[-1],
                "pairs": progress["pairs"] + len(rows),
                "annotated": progress["annotated"] + sum(1 for _, r in result.routed if len(r.votes)),
                "failed": progress["failed"] + len(result.failed),
                "decisions": dict(decisions),
            }
            self.commit_batch(progress)
            self.say(f"stage 2: {progress['pairs']} pairs decided, {progress['failed']} failed")
        routed = progress["pairs"] - progress["failed"]
        self.state.results["stage2"] = {
            "pairs": progress["pairs"],
            "decisions": dict(decisions),
            "annotated": progress["annotated"],
            "skipped_annotation": routed - progress["annotated"],
            "failed": progress["failed"],
        }
        self.say(f"stage 2: {dict(decisions)} of {progress['pairs']} pairs ({progress['annotated']} sent to judges)")
