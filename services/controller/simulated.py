"""Simulated judges, simulated label noise and the true-label helpers they share. STUDY ONLY.

Studies need to know the truth: at ingest a study run writes, into each pair's meta, a
digest of the response its source labelled as better (TRUTH_KEY). Any later orientation
of the pair (flipped by noise, by a judge, by a human) can then be checked against it.
A real run never reads it; nothing here stands in for a real annotator in production.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Mapping, Sequence

from synpref.services.annotator.judges import JudgeRequest, aggregate
from synpref.services.controller.state import key_of
from synpref.shared.config import SimulatedJudgeSettings
from synpref.shared.pairs import flipped, unit_interval
from synpref.v1.pair_pb2 import (
    PREFERENCE_ABSTAIN,
    PREFERENCE_CHOSEN,
    PREFERENCE_REJECTED,
    JudgeVote,
    PairRecord,
)

TRUTH_KEY = "study_true_chosen"
NOISE_KEY = "study_label_noise"


def digest(messages: Sequence[Mapping[str, str]]) -> str:
    """A 16-hex-digit hash of a message list's roles and contents: how a study marks the true chosen side."""
    text = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _dicts(messages) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def mark_truth(record: PairRecord) -> None:
    """Remember which response the source preferred (before any noise)."""
    record.pair.meta[TRUTH_KEY] = digest(_dicts(record.pair.chosen))


def label_is_true(record: PairRecord) -> bool | None:
    """Does the record's current chosen side match its source label? None when unknown."""
    truth = record.pair.meta.get(TRUTH_KEY)
    if not truth:
        return None
    return digest(_dicts(record.pair.chosen)) == truth


def with_label_noise(record: PairRecord, rate: float, seed: int) -> PairRecord:
    """The record flipped with probability `rate` (a seeded coin per pair key), marked NOISE_KEY when it is."""
    key = record.lineage.original_id or record.pair.id
    if rate <= 0 or unit_interval(f"noise:{seed}:{key}") >= rate:
        return record
    noisy = flipped(record)
    noisy.pair.meta[NOISE_KEY] = "1"
    return noisy


class SimulatedJudge:
    """A judge of stated accuracy, for studies: it knows the truth and lies on purpose.

    Per (judge, pair) a seeded belief is drawn: the true label with probability `accuracy`. The pair is
    both its responses (the true chosen and the other), so pairs that share one response (RM-Bench pairs
    each chosen response with three rejected ones) get beliefs of their own.
    Each of `samples` votes repeats that belief, flipped with probability `sample_noise`
    (so self-consistency has something to do), or abstains with probability `abstain`.
    Deterministic: the same pair gets the same votes on every replay.

    error_mode "length_correlated" (correlated errors, study only): the belief is wrong with
    probability error_probability(...), higher where the better response is the shorter one,
    and the coin is shared by every judge of the panel (keyed by pair, not judge), so a pair
    that fools one judge fools every judge at least as error-prone; majority voting then
    cannot average the errors away, as it can with independent judges.
    """

    def __init__(self, settings: SimulatedJudgeSettings, seed: int = 0) -> None:
        self.name = settings.name
        self.settings = settings
        self.seed = seed

    def votes_for(
        self,
        pair_id: str,
        chosen: Sequence[Mapping[str, str]],
        truth: str,
        rejected: Sequence[Mapping[str, str]] = (),
    ) -> list[JudgeVote]:
        """The judge's seeded votes on a pair whose true chosen side hashes to `truth` (see the class).

        The belief is keyed by both responses; without `rejected` by the chosen one alone, and error_mode
        length_correlated raises ValueError.
        """
        s = self.settings
        chosen_is_true = digest(chosen) == truth
        better, worse = (chosen, rejected) if chosen_is_true else (rejected, chosen)
        # Keyed by the true side and the other one, not the current orientation: a flipped copy of a
        # pair gets the same belief about which response is better.
        key = f"{truth}:{digest(worse)}" if rejected else truth
        rng = random.Random(f"{self.seed}:{self.name}:{key}")
        if s.error_mode == "independent":
            believes_truth = rng.random() < s.accuracy
        else:
            if not rejected:
                raise ValueError(f"error_mode {s.error_mode} needs the rejected response of pair {pair_id}")
            shared = random.Random(f"{self.seed}:panel:{key}").random()
            believes_truth = shared >= error_probability(s.accuracy, s.length_bias, better, worse)
        belief = PREFERENCE_CHOSEN if believes_truth == chosen_is_true else PREFERENCE_REJECTED
        other = PREFERENCE_REJECTED if belief == PREFERENCE_CHOSEN else PREFERENCE_CHOSEN
        votes = []
        for i in range(s.samples):
            if rng.random() < s.abstain:
                pref = PREFERENCE_ABSTAIN
            else:
                pref = other if rng.random() < s.sample_noise else belief
            votes.append(
                JudgeVote(
                    judge=self.name,
                    sample=i,
                    preference=pref,  # type: ignore[arg-type]
                    rationale=f"simulated judge (accuracy {s.accuracy:g}); study only",
                    prompt_version="simulated",
                )
            )
        return votes

    async def judge(self, request: JudgeRequest) -> list[JudgeVote]:
        """Votes on the request; ValueError when its meta lacks the study's truth key."""
        truth = request.meta.get(TRUTH_KEY)
        if not truth:
            raise ValueError(f"pair {request.pair_id} has no {TRUTH_KEY}: a simulated judge needs a study run")
        return self.votes_for(request.pair_id, request.chosen, truth, request.rejected)


def error_probability(
    accuracy: float, length_bias: float, better: Sequence[Mapping[str, str]], worse: Sequence[Mapping[str, str]]
) -> float:
    """A length-biased judge's chance of preferring `worse`: (1 - accuracy) at equal lengths, up to
    twice that (capped at 1) where the better response is much the shorter, down to 0 where it is much
    the longer. d = (len worse - len better) / (len worse + len better), in characters."""
    n_better = sum(len(m["content"]) for m in better)
    n_worse = sum(len(m["content"]) for m in worse)
    d = (n_worse - n_better) / max(1, n_worse + n_better)
    return min(1.0, 2.0 * (1.0 - accuracy) / (1.0 + math.exp(-length_bias * d)))


def label_accuracy(records: Sequence[PairRecord]) -> float | None:
    """Study only: share of these records whose current label is the source's (None when none is known)."""
    truths = [label_is_true(r) for r in records]
    known = [t for t in truths if t is not None]
    return (sum(known) / len(known)) if known else None


def pair_as_given(record: PairRecord, ingest_id: str) -> dict:
    """The pair with the label it had at ingest (id `ingest_id`): flipped back if it was flipped since."""
    from synpref.services.gold_scorer.scoring import pair_dict

    pair = pair_dict(record)
    if record.pair.id != ingest_id:
        pair["chosen"], pair["rejected"] = pair["rejected"], pair["chosen"]
    return pair


def judges_majority_label(panel: Sequence[SimulatedJudge], record: PairRecord, pair: dict) -> dict:
    """`pair` (record's pair, as given) labelled by the panel alone: swapped when the majority of every
    judge's votes prefers its rejected side, left as it is on a tie or when all abstain. The votes are the
    seeded ones the judges cast on this pair in the loop, so this is the "judges only" baseline (the
    paper's raw LLM curation: LLM labels on every pair, no humans) that a study can afford."""
    truth = record.pair.meta[TRUTH_KEY]
    votes = [v for j in panel for v in j.votes_for(key_of(record), pair["chosen"], truth, pair["rejected"])]
    if aggregate(votes).preference == PREFERENCE_REJECTED:
        return dict(pair, chosen=pair["rejected"], rejected=pair["chosen"])
    return pair
