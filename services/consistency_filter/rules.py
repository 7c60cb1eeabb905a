"""The decisions of the method, one pure function per record.

Stage 1 (human in the loop): a pair the best RM gets wrong or is unsure of
(p_best <= 0.5 + band) is a gold candidate: REVIEW, to the human review topic. A pair
it already gets right is SKIPped this iteration (to the audit topic, still unverified).

Stage 2 (automatic): KEEP when the label agrees with the gold RM (p_gold > 0.5) AND with
either the LLM judges (aggregate prefers chosen) or the best RM (p_best > 0.5). Otherwise
FLIP (recycle with chosen and rejected swapped, as SynPref-40M did for 14M pairs) or
DISCARD, per FilterSettings.on_disagreement. Under `auto` the filter discards, and the
controller recycles those pairs (`recycle`) once it has measured the gold RM strong enough
(`disagreement_rule`): a flip overrules the label on the gold RM's word, which pays only
where that word is more often right than the label. A gold tie (p_gold exactly 0.5) is DISCARDed whatever
on_disagreement says, and never recycled: the gold RM prefers neither side, so a flip would rest on nothing.

Routes: KEEP/FLIP -> "curated", REVIEW -> "review", DISCARD/SKIP -> "discarded" (kept for
audit). A record missing a score the rule needs is a failure (dead-letter), not a guess; so is one
whose score is NaN (a diverged RM), which every comparison would otherwise read as a disagreement.
"""

from __future__ import annotations

import math
from typing import TypeVar

from synpref.shared.config import FilterSettings
from synpref.shared.pairs import flipped, needs_annotation, now
from synpref.shared.roles import BEST, GOLD
from synpref.shared.stage import Stage, StageResult
from synpref.v1.pair_pb2 import (
    DECISION_DISCARD,
    DECISION_FLIP,
    DECISION_KEEP,
    DECISION_REVIEW,
    DECISION_SKIP,
    PREFERENCE_CHOSEN,
    PREFERENCE_REJECTED,
    STAGE_ONE,
    STAGE_TWO,
    Decision,
    DecisionRecord,
    ModelScore,
    PairRecord,
)

ROUTE_OF = {
    DECISION_KEEP: "curated",
    DECISION_FLIP: "curated",
    DECISION_REVIEW: "review",
    DECISION_DISCARD: "discarded",
    DECISION_SKIP: "discarded",
}
STEP = "consistency-filter"
STAGE2_RULE = "stage2.consistency"
LOWER_BOUND_Z = 1.2816
"""z of a one-sided 90% bound."""


class MissingScore(ValueError):
    """The rule needs a model score the record does not carry."""


Key = TypeVar("Key", str, int)


def score_of(record: PairRecord, model: str) -> ModelScore | None:
    """The record's ModelScore from `model` (GOLD or BEST), or None, also when its p is not finite."""
    return next((s for s in record.scores if s.model == model and math.isfinite(s.p)), None)


def _decided(record: PairRecord, decision: Decision, rule: str, reason: str, stage) -> PairRecord:
    out = PairRecord()
    out.CopyFrom(record)
    out.decision.CopyFrom(DecisionRecord(decision=decision, rule=rule, reason=reason))
    out.lineage.stage = stage
    out.lineage.steps.append(STEP)
    out.lineage.updated_at.CopyFrom(now())
    return out


def stage1(record: PairRecord, settings: FilterSettings) -> PairRecord:
    """Stage 1, error-driven: REVIEW (a gold candidate for humans) when the best RM is wrong or within
    `band` of 0.5, else SKIP. MissingScore without the best RM's score.
    """
    best = score_of(record, BEST)
    if best is None:
        raise MissingScore("stage 1 needs the best RM's score (ModelScore 'best' with a finite p)")
    if needs_annotation(best.p, settings.band):
        why = "the best RM prefers the rejected side" if best.p <= 0.5 else "the best RM is unsure"
        reason = f"p_best={best.p:.3f} <= 0.5+{settings.band:g}: {why}; gold candidate for human review"
        return _decided(record, DECISION_REVIEW, "stage1.error_driven", reason, STAGE_ONE)
    reason = f"p_best={best.p:.3f} > 0.5+{settings.band:g}: the best RM already agrees; not re-annotated"
    return _decided(record, DECISION_SKIP, "stage1.error_driven", reason, STAGE_ONE)


def silver_label(record: PairRecord) -> PairRecord | None:
    """Stage 1's label for a retrieved pair not sent to humans: the judges' (D_silver).

    KEEP when the judges prefer the chosen side, FLIP (swapped) when they prefer the rejected
    one; None when the panel abstained, which leaves the pair unverified.
    """
    pref = record.judge_aggregate.preference
    if pref == PREFERENCE_CHOSEN:
        out, decision, reason = record, DECISION_KEEP, "judges agree with the label"
    elif pref == PREFERENCE_REJECTED:
        out, decision, reason = flipped(record), DECISION_FLIP, "judges prefer the rejected response"
    else:
        return None
    out.decision.CopyFrom(DecisionRecord(decision=decision, rule="stage1.judges", reason=reason))
    out.lineage.updated_at.CopyFrom(now())
    return out


def human_candidates(p_best: dict[Key, float], budget: int) -> list[Key]:
    """Stage 1's choice for humans among the gold candidates: the RM's worst errors first (lowest
    p_best, ties by key or store row for a reproducible order), up to the human budget."""
    return sorted(p_best, key=lambda k: (p_best[k], k))[:budget]


def stage2(record: PairRecord, settings: FilterSettings) -> PairRecord:
    """Stage 2, consistency: KEEP when the gold RM agrees with the label and so do the judges or the best RM;
    otherwise FLIP (recycled with the sides swapped) or DISCARD, as settings.on_disagreement says; DISCARD when the
    gold RM ties (p_gold == 0.5). MissingScore without the gold RM's score, or where the best RM's would decide and
    its p is not finite.
    """
    gold = score_of(record, GOLD)
    if gold is None:
        raise MissingScore("stage 2 needs the gold RM's score (ModelScore 'gold' with a finite p)")
    best = score_of(record, BEST)
    judges = record.judge_aggregate.preference
    gold_agrees = gold.p > 0.5
    judges_agree = judges == PREFERENCE_CHOSEN
    if gold_agrees and not judges_agree and best is None and any(s.model == BEST for s in record.scores):
        # The best RM's word decides this pair, and it scored it NaN (diverged): read as "no best RM", a
        # pair the gold RM agrees with would be flipped or discarded on no evidence.
        raise MissingScore("stage 2 needs the best RM's score here (gold agrees, judges do not); its p is not finite")
    best_agrees = best is not None and best.p > 0.5
    facts = [
        f"gold {'agrees' if gold_agrees else 'ties' if gold.p == 0.5 else 'disagrees'} (p_gold={gold.p:.3f})",
        "judges agree"
        if judges_agree
        else "judges disagree"
        if judges == PREFERENCE_REJECTED
        else "judges abstain or were not asked",
        f"best RM {'agrees' if best_agrees else 'disagrees'} (p_best={best.p:.3f})" if best else "no best RM score",
    ]
    reason = "; ".join(facts)
    if gold_agrees and (judges_agree or best_agrees):
        return _decided(record, DECISION_KEEP, STAGE2_RULE, reason, STAGE_TWO)
    if gold.p == 0.5:
        # A tie (equal rewards: a bf16 RM rounds close ones alike) backs neither side: swapped, the pair would take
        # the label that the judges and the best RM may both reject, on no word of the gold RM's.
        return _decided(record, DECISION_DISCARD, STAGE2_RULE, reason + "; not recycled", STAGE_TWO)
    if settings.on_disagreement == "flip":
        return _decided(flipped(record), DECISION_FLIP, STAGE2_RULE, reason + "; recycled swapped", STAGE_TWO)
    return _decided(record, DECISION_DISCARD, STAGE2_RULE, reason, STAGE_TWO)


def accuracy_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson interval of an accuracy measured on `n` pairs (z 1.96: 95%, two-sided); (0, 1) for no pairs."""
    if n <= 0:
        return 0.0, 1.0
    centre = accuracy + z * z / (2 * n)
    spread = z * ((accuracy * (1 - accuracy) + z * z / (4 * n)) / n) ** 0.5
    return (centre - spread) / (1 + z * z / n), (centre + spread) / (1 + z * z / n)


def accuracy_lower_bound(correct: int, n: int, z: float = LOWER_BOUND_Z) -> float:
    """Wilson lower bound of the accuracy `correct`/`n`; 0 for no pairs. Few held-out pairs give a low bound,
    so a gold RM measured on a handful of pairs is not trusted on its point estimate."""
    return accuracy_interval(correct / n, n, z)[0] if n > 0 else 0.0


MIN_HELD_OUT_PAIRS: int = FilterSettings.model_fields["flip_min_held_out_pairs"].default
"""The configured default, so the rule and the settings cannot disagree."""


def disagreement_rule(
    correct: int, n: int, min_accuracy: float, min_pairs: int = MIN_HELD_OUT_PAIRS
) -> tuple[str, float]:
    """What `on_disagreement: auto` does after a gold RM got `correct` of `n` held-out human-verified pairs
    right: ("flip" or "discard", the accuracy's lower bound). Flip only when the bound reaches min_accuracy
    on at least min_pairs pairs."""
    bound = accuracy_lower_bound(correct, n)
    return ("flip" if bound >= min_accuracy and n >= min_pairs else "discard"), bound


def recycle(record: PairRecord, why: str) -> PairRecord:
    """A pair Stage 2 discarded for disagreement (under auto), recycled instead: the FLIP the flip rule makes,
    its reason extended by `why`. Other records (a gold tie's discard too) are returned unchanged."""
    d = record.decision
    gold = score_of(record, GOLD)
    if d.decision != DECISION_DISCARD or d.rule != STAGE2_RULE or (gold is not None and gold.p == 0.5):
        return record  # a gold tie is no disagreement (stage2): nothing to recycle
    out = flipped(record)
    reason = f"{d.reason}; recycled swapped ({why})"
    out.decision.CopyFrom(DecisionRecord(decision=DECISION_FLIP, rule=STAGE2_RULE, reason=reason))
    out.lineage.updated_at.CopyFrom(now())
    return out


def decide(record: PairRecord, settings: FilterSettings) -> tuple[str, PairRecord]:
    """(route, decided record) for one pair."""
    out = stage1(record, settings) if settings.stage == 1 else stage2(record, settings)
    return ROUTE_OF[out.decision.decision], out


def make_filter_stage(settings: FilterSettings) -> Stage:
    """The filter as a Stage: each record routed by its decision; a record missing a score fails."""

    def consistency_filter(batch: list[PairRecord]) -> StageResult:
        result = StageResult()
        for record in batch:
            try:
                route, out = decide(record, settings)
            except MissingScore as exc:
                result.fail(record, str(exc))
                continue
            result.emit(route, out)
        return result

    return consistency_filter
