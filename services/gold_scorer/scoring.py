"""Score each pair with the RMs of its stage; record p_gold and p_best.

Stage 1 has no gold RM yet: its records get the iteration's working RM's p under the BEST
role (the stage-1 rule reads it). Stage 2 records, and records no controller staged, get
every configured model (gold and best).

A PairScorer is any function from a list of pair dicts ({"conversation", "chosen",
"rejected"} message lists) to [(reward_chosen, reward_rejected)]. Two come with the
project: in process through shared/modeling (ScoringSettings.mode = "in_process") and over
gRPC through the scorer service (mode = "grpc"). Tests and benchmarks pass their own. In process, a device failure
that a small ordinary pair meets too (a broken CUDA context) is StageBroken: the service exits to be restarted.

Over gRPC, with scorer.models_file set (the chart sets it in every pod's config), a score from a
scorer replica that still serves another version than the file names is not recorded: the batch is
read again shortly (StageUnavailable). The controller writes each stage's models to that file; the
replica its admin call reached switches at once, the others within their next poll of the file.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

from synpref.services.gold_scorer.versions import ExpectedVersions, model_version
from synpref.shared.config import KafkaSettings, ModelRef, ScorerSettings, ScoringSettings
from synpref.shared.kafka.runner import RETRY_SHARE
from synpref.shared.pairs import message_dicts, new_pair, new_record, now, pair_id, pair_problem, preference_probability
from synpref.shared.roles import BEST, GOLD
from synpref.shared.stage import Stage, StageBroken, StageResult, StageUnavailable
from synpref.v1.pair_pb2 import STAGE_ONE, ModelScore, PairRecord

STAGE_ONE_ROLES = (BEST,)
"""What Stage 1 is scored with: the working RM, served and recorded as BEST."""

ScoredPair = tuple[float, float] | tuple[float, float, str]
"""(reward chosen, reward rejected), and from a served model the version that scored them."""
PairScorer = Callable[[list[dict]], Sequence[ScoredPair]]
STEP = "gold-scorer"
log = logging.getLogger("synpref.services.gold_scorer")


def stage_budget_s(kafka: KafkaSettings) -> float:
    """Seconds one call of the service's stage may spend scoring (ScoringModel.budget_s of models_from_settings'
    models): RETRY_SHARE (half) of the consumer's kafka.max_poll_interval_ms, as the runner's own retry
    (shared/kafka/runner.py); the rest is for sending and committing. A batch past it is read again
    (StageUnavailable) and the scores got meanwhile are kept for that read, so a batch too slow for one call gets
    through in a few rather than outrunning the interval and being read and scored again for ever."""
    return RETRY_SHARE * kafka.max_poll_interval_ms / 1000


STAGE_BUDGET_S = stage_budget_s(KafkaSettings())
"""The budget with the default kafka settings (300 s)."""

Scores = dict[str, dict[str, ScoredPair]]
"""Role -> pair key (pair_key) -> that pair's row from the role's scorer."""
_deadline: ContextVar[tuple[float, float] | None] = ContextVar("gold_scorer_deadline", default=None)
"""(the time.monotonic() the stage call in progress must end by, its budget), where it has one."""
_scored: ContextVar[dict[str, ScoredPair] | None] = ContextVar("gold_scorer_scored", default=None)
"""Where the model being called keeps the rows of its partial answers (a gRPC batch scored in halves)."""


@dataclass(frozen=True)
class ScoringModel:
    """One RM the gold scorer runs: its role, the version written into each ModelScore, and its pair scorer."""

    role: str
    """GOLD or BEST (shared.roles): the ModelScore.model the filter reads."""
    version: str
    score: PairScorer
    budget_s: float | None = None
    """Most seconds a stage call scoring with this model may take (the least of its models'); None: no limit, as
    in the controller's own process, where no poll interval runs."""


def pair_dict(record: PairRecord) -> dict:
    """The record's conversation, chosen and rejected as message dicts, the shape a PairScorer takes."""
    pair = record.pair
    return {
        "conversation": message_dicts(pair.conversation),
        "chosen": message_dicts(pair.chosen),
        "rejected": message_dicts(pair.rejected),
    }


def pair_key(pair: dict) -> str:
    """What a scorer's answer for `pair` (a pair_dict) is kept under: its content's hash."""
    return pair_id(pair["conversation"], pair["chosen"], pair["rejected"])


def time_left() -> float | None:
    """Seconds left to the stage call in progress (None: no limit); StageUnavailable once it has none."""
    deadline = _deadline.get()
    if deadline is None:
        return None
    left = deadline[0] - time.monotonic()
    if left <= 0:
        why = f"scoring the batch took its {deadline[1]:g}s (half of kafka.max_poll_interval_ms)"
        raise StageUnavailable(f"{why}: it is read again, and what is scored is kept for that read")
    return left


def set_score(record: PairRecord, role: str, version: str, reward_chosen: float, reward_rejected: float) -> float:
    """Replace `record`'s score by `role` with these rewards; returns p = sigmoid(r_chosen - r_rejected)."""
    p = preference_probability(float(reward_chosen), float(reward_rejected))
    kept = [s for s in record.scores if s.model != role]
    del record.scores[:]
    record.scores.extend(kept)
    record.scores.append(
        ModelScore(
            model=role, version=version, reward_chosen=float(reward_chosen), reward_rejected=float(reward_rejected), p=p
        )
    )
    return p


def make_scoring_stage(models: list[ScoringModel]) -> Stage:
    """A stage that appends one ModelScore per model of the record's stage (replacing an older score of
    the same role): Stage-1 records only the BEST role's, the others every model's. A record with no
    model to score it fails. A call past its models' budget_s raises StageUnavailable, and the scores it got are
    the next call's (the batch's re-read, within budget_s) to go on from."""

    def stage_models(record: PairRecord) -> list[ScoringModel]:
        if record.lineage.stage == STAGE_ONE:
            return [m for m in models if m.role in STAGE_ONE_ROLES]
        return models

    budgets = [m.budget_s for m in models if m.budget_s is not None]
    budget = min(budgets) if budgets else None
    kept: tuple[Scores, float] = ({}, 0.0)
    """The scores of the last call that ran out of time (or found the scorer unavailable), and when."""

    def gold_scorer(batch: list[PairRecord]) -> StageResult:
        nonlocal kept
        start = time.monotonic()
        memo: Scores = {}
        if budget is not None and kept[0] and start - kept[1] <= budget:
            # The re-read of a batch that ran out of time goes on from where it stopped (bounded: this batch's).
            keys = {pair_key(pair_dict(r)) for r in batch}
            memo = {role: {k: v for k, v in rows.items() if k in keys} for role, rows in kept[0].items()}
        token = _deadline.set(None if budget is None else (start + budget, budget))
        try:
            return score_stage(batch, memo)
        except StageUnavailable:
            if budget is not None:
                kept = (memo, time.monotonic())
            raise
        finally:
            _deadline.reset(token)

    def score_stage(batch: list[PairRecord], memo: Scores) -> StageResult:
        result = StageResult()
        groups: dict[tuple[str, ...], list[PairRecord]] = {}
        for record in batch:
            problem = pair_problem(record)
            if problem is None and not stage_models(record):
                problem = f"no scoring model for stage {record.lineage.stage}"
            if problem is None:
                groups.setdefault(tuple(m.role for m in stage_models(record)), []).append(record)
            else:
                result.fail(record, problem)
        for records in groups.values():
            for record, error in score_each_alone_on_error(records, stage_models(records[0]), memo):
                if error is None:
                    result.emit("scored", record)
                else:
                    result.fail(record, error)
        return result

    return gold_scorer


class ScoreCountError(StageUnavailable):
    """A scorer returned another number of scores than it was given pairs: its fault, not any pair's, so the
    batch is read again later (a dead letter per pair would lose the stream to one scorer bug)."""


class ScorerFailed(RuntimeError):
    """The scorer answered an error that names no pair (INTERNAL: a forward failed, say of CUDA memory; UNKNOWN;
    ...): a pair's fault only where the scorer scores others meanwhile, else the scorer's (see below)."""


class DeviceFailed(ScorerFailed):
    """A model in this process failed on its device (device_failure): where the canary fails so too, the CUDA
    context is broken for good and only a new process mends it (StageBroken)."""


def score_each_alone_on_error(
    batch: list[PairRecord], models: list[ScoringModel], memo: Scores | None = None
) -> list[tuple[PairRecord, str | None]]:
    """(scored copy, None) for each record of `batch`; where scoring the batch raises, each record is scored
    alone and one that still raises is (itself, the reason) instead: one pair a chat template or the scorer
    refuses must not fail its batch (in process, that stopped the controller on every restart). A pair the
    scorer failed alone (ScorerFailed) while others scored is tried alone once more first: that may be transient.
    StageUnavailable (ScoreCountError too) is no pair's fault and propagates. Where no pair scores, alone
    either, a ScorerFailed among the errors is the scorer's state unless it scores a small ordinary pair now
    (scores_a_canary), and raises StageUnavailable: the runner reads the batch again later, and plan_batch retries
    a raising stage one record at a time; StageBroken where the canary failed on this process's own device. Else
    the batch's error propagates (a broken in-process scorer).
    `memo` holds the scores got so far (score_batch): a pair scored in the batch by one model is not again."""
    memo = {} if memo is None else memo
    try:
        return [(record, None) for record in score_batch(batch, models, memo)]
    except StageUnavailable:
        raise
    except Exception as exc:
        if len(batch) == 1:
            alone: list[tuple[PairRecord, Exception | None]] = [(batch[0], exc)]
        else:
            log.warning("scoring a batch of %d raised %r; scoring its pairs one at a time", len(batch), exc)
            alone = [score_alone(record, models, memo) for record in batch]
            if any(error is None for _, error in alone):
                # Others score meanwhile, so a pair the scorer failed (not refused) may be its own fault, or one
                # transient failure (a CUDA hiccup): one more try alone before it is dead-lettered.
                alone = [score_alone(r, models, memo) if isinstance(e, ScorerFailed) else (r, e) for r, e in alone]
        if all(error is not None for _, error in alone):
            failed = next((e for _, e in alone if isinstance(e, ScorerFailed)), None)
            if failed is None and len(batch) > 1:
                raise
            if failed is not None and not scores_a_canary(models):
                why = f"every pair of a batch of {len(batch)} failed, alone too: {failed}"
                raise StageUnavailable(f"{why}; a small ordinary pair fails as well") from failed
        return [(r, None if e is None else f"scoring raised {type(e).__name__}: {e}") for r, e in alone]


CANARY = new_record(
    new_pair(
        [{"role": "user", "content": "Hello"}],
        [{"role": "assistant", "content": "Hello! How can I help you today?"}],
        [{"role": "assistant", "content": "Hi."}],
        source="gold-scorer-canary",
    )
)


def scores_a_canary(models: list[ScoringModel]) -> bool:
    """Whether `models` score a small ordinary pair now. Where every pair of a batch failed alone, yes says the
    pairs are at fault (dead-lettered): a batch of one pair too long for the device, the last of a stream, was read
    again for ever, as was a batch of such pairs, since no other pair scored beside them to show the scorer works.
    StageBroken where the canary fails on this process's device (DeviceFailed): reading the batch again, as for a
    scorer replica away over gRPC, failed it for ever, since only a new process clears a broken CUDA context."""
    try:
        score_batch([CANARY], models, {})
    except StageUnavailable:
        raise
    except DeviceFailed as exc:
        raise StageBroken(f"a small ordinary pair fails too, on this process's device: {exc}") from exc
    except Exception:
        return False
    return True


def score_alone(record: PairRecord, models: list[ScoringModel], memo: Scores) -> tuple[PairRecord, Exception | None]:
    """(scored copy, None), or (record, the error) where scoring it raises anything but StageUnavailable."""
    try:
        return score_batch([record], models, memo)[0], None
    except StageUnavailable:
        raise
    except Exception as exc:
        return record, exc


def score_batch(batch: list[PairRecord], models: list[ScoringModel], memo: Scores) -> list[PairRecord]:
    """Copies of `batch` with each model's score set; ScoreCountError when a scorer returns the wrong count.
    Each model scores only the pairs `memo` has no row of its for, and its rows go into `memo`; StageUnavailable
    when the stage call's time is up (time_left) before a model is called."""
    pairs = [pair_dict(r) for r in batch]
    keys = [pair_key(p) for p in pairs]
    scored: dict[str, Sequence[ScoredPair]] = {}
    for model in models:
        known = memo.setdefault(model.role, {})
        missing = list({k: p for k, p in zip(keys, pairs, strict=True) if k not in known}.items())
        if missing:
            time_left()
            token = _scored.set(known)
            try:
                rewards = model.score([p for _, p in missing])
            finally:
                _scored.reset(token)
            if len(rewards) != len(missing):
                raise ScoreCountError(f"{model.role} scorer returned {len(rewards)} scores for {len(missing)} pairs")
            known.update(zip((k for k, _ in missing), rewards, strict=True))
        scored[model.role] = [known[k] for k in keys]
    out = []
    for i, record in enumerate(batch):
        copy = PairRecord()
        copy.CopyFrom(record)
        for model in models:
            row = scored[model.role][i]
            # A served model says which version scored the pair: the scorer may have reloaded since start-up.
            version = row[2] if len(row) == 3 and row[2] else model.version
            set_score(copy, model.role, version, row[0], row[1])
        copy.lineage.steps.append(STEP)
        copy.lineage.updated_at.CopyFrom(now())
        out.append(copy)
    return out


def device_failure(exc: BaseException) -> bool:
    """Whether `exc` is the accelerator's failure rather than its pairs': torch >= 2.8 raises AcceleratorError for a
    CUDA error, older versions a RuntimeError whose message says so."""
    import torch

    accelerator_error = getattr(torch, "AcceleratorError", None)
    return (accelerator_error is not None and isinstance(exc, accelerator_error)) or str(exc).startswith("CUDA error")


def in_process_scorer(ref: ModelRef, settings: ScoringSettings, max_length: int | None = None) -> PairScorer:
    """Load the RM once and score batches with shared/modeling (no service needed)."""
    from synpref.shared import modeling

    model, tokenizer = modeling.load_reward_model(ref.path)
    max_length = max_length or settings.max_length

    def score(pairs: list[dict]) -> list[tuple[float, float]]:
        import torch

        try:
            return modeling.score_pairs(model, tokenizer, pairs, max_length, settings.batch_size)
        except torch.OutOfMemoryError as exc:
            # The device's memory, not the pairs: where nothing scores, alone either, the batch is read again later
            # (score_each_alone_on_error), where a RuntimeError per pair dead-lettered them all; one pair too
            # large to score alone while others score is still dead-lettered alone.
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise ScorerFailed(f"{ref.path} ran out of memory scoring {len(pairs)} pair(s): {exc}") from exc
        except RuntimeError as exc:
            # A broken CUDA context (an illegal memory access, a lost GPU) fails every later forward whatever the
            # pairs: as a pair's error it dead-lettered the whole stream until the pod was restarted.
            if not device_failure(exc):
                raise
            raise DeviceFailed(f"{ref.path} failed on its device scoring {len(pairs)} pair(s): {exc}") from exc

    return score


SPLIT_TIMEOUTS = 3
"""How many of its timeouts one batch may spend on halving itself before the scorer counts as too slow now."""


def grpc_scorer(
    address: str,
    model_name: str,
    client=None,
    timeout_s: float = 60.0,
    expected: Callable[[str], str | None] | None = None,
) -> PairScorer:
    """Score through the scorer service's RewardService.ScorePairs, each call within `timeout_s`. The scorer
    starting, restarting or draining, shedding load, serving no model yet or not (yet) this one (models arrive
    by reloads), or too slow, is StageUnavailable: the runner reads the batch again later. INVALID_ARGUMENT and
    OUT_OF_RANGE are the pairs' own (grpc.RpcError); any other error is ScorerFailed.

    A batch that misses the deadline is scored again in halves, each with its own deadline, while the batch has
    spent under SPLIT_TIMEOUTS of them: re-reading the same batch could only miss it again when the batch's
    size, not the scorer's state, is why. The bound keeps one batch well inside Kafka's poll interval. A
    request over the scorer's message limit is split likewise; a single pair over it is the pair's error."""
    import grpc

    from synpref.client.client import too_large

    if client is None:
        from synpref.client import RewardClient

        client = RewardClient(address, timeout=timeout_s)
    codes = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "NOT_FOUND", "DEADLINE_EXCEEDED")
    not_serving_now = frozenset(getattr(grpc.StatusCode, code) for code in codes)
    # What the scorer answers for a request it refuses for its content (services/scorer/errors.py InvalidInput).
    the_pairs_own = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE})

    def call(pairs: list[dict], split_until: float) -> list[ScoredPair]:
        left = time_left()  # within the stage call's budget too: Stage 2 calls two models one after the other
        try:
            scored = client.score_pairs(
                pairs, model=model_name, timeout=timeout_s if left is None else min(timeout_s, left)
            )
        except grpc.RpcError as exc:
            code, size = exc.code(), too_large(exc)
            slow = code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() < split_until
            if (slow or size) and len(pairs) > 1:
                half = len(pairs) // 2
                return call(pairs[:half], split_until) + call(pairs[half:], split_until)
            if size:  # one pair over the scorer's message limit: the pair's own error (dead-lettered)
                raise
            if code in not_serving_now:
                why = f"scorer {address} cannot score with {model_name!r} now: {exc.details()}"
                raise StageUnavailable(why) from exc
            if code in the_pairs_own:
                raise
            # INTERNAL, UNKNOWN, CANCELLED ...: a failed forward fails every item batched with it, other callers'
            # too, so the caller sorts out (score_each_alone_on_error) whether a pair or the scorer is at fault.
            why = f"scorer {address} failed {len(pairs)} pair(s) with {model_name!r}: {code.name}: {exc.details()}"
            raise ScorerFailed(why) from exc
        rows: list[ScoredPair] = [(s.reward_chosen, s.reward_rejected, s.version) for s in scored]
        want = expected(model_name) if expected is not None else None
        stale = sorted({v for row in rows if want and isinstance(v := row[-1], str) and v and v != want})
        if stale:
            why = f"scorer {address} served {model_name!r} as {stale}, scorer.models_file names {want!r}"
            raise StageUnavailable(f"{why}: a replica that has not loaded it yet")
        keep = _scored.get()
        if keep is not None and len(rows) == len(pairs):  # a half scored is not scored again on the batch's re-read
            keep.update(zip(map(pair_key, pairs), rows, strict=True))
        return rows

    def score(pairs: list[dict]) -> list[ScoredPair]:
        return call(pairs, time.monotonic() + SPLIT_TIMEOUTS * timeout_s)

    return score


def served_version(client, model_name: str, fallback: str) -> str:
    """The version the scorer reports for a served model at start-up, else the configured one: the label of
    a score whose response names no version (each response names the version that scored it).
    """
    try:
        info = client.info(model_name, timeout=10)
    except Exception:  # the scorer may come up later; its answers still score, the label is the config's
        return fallback
    return next((m.version for m in info.models if m.name == model_name and m.version), fallback)


def models_from_settings(
    settings: ScoringSettings, scorer: ScorerSettings | None = None, kafka: KafkaSettings | None = None
) -> list[ScoringModel]:
    """The gold and best RMs named in settings (in process, a role with an empty path is left out), each with the
    stage_budget_s of `kafka` (the default settings' where None).

    In grpc mode the roles are served model names ("gold", "best") of the scorer service; with `scorer`'s
    models_file, a score of another version than the file names is retried (see the module docstring).
    """
    out = []
    client = None
    budget_s = STAGE_BUDGET_S if kafka is None else stage_budget_s(kafka)
    expected = ExpectedVersions.from_settings(scorer) if scorer is not None else None
    if settings.mode == "grpc":
        from synpref.client import RewardClient

        client = RewardClient(settings.scorer_address, timeout=settings.timeout_s)
    for role, ref in ((GOLD, settings.gold), (BEST, settings.best)):
        if client is not None:
            version = served_version(client, role, model_version(ref) or role)
            pair_scorer = grpc_scorer(settings.scorer_address, role, client, settings.timeout_s, expected)
            out.append(ScoringModel(role, version, pair_scorer, budget_s))
        elif ref.path:
            out.append(ScoringModel(role, model_version(ref), in_process_scorer(ref, settings), budget_s))
    return out
