"""The annotator stage: attributes, retrieved examples, judge votes, aggregate.

For each pair: (a) the attribute 5-tuple from the labeller (kept if the record already has
one); (b) up to k human-verified examples similar to (conversation, attributes), k by the
paper's rule when the record carries p_best (8 if p <= 0.5, else ceil(8 (1 - p))), else
max_examples; (c) n votes from every judge, run concurrently; (d) the aggregate.

Pairs the best RM already gets right with margin (p_best > 0.5 + band) need no judges in
Stage 2; when the record carries p_best (the gold-scorer ran first), they are skipped if
`skip_confident` is set, which saves the calls and changes nothing the filter decides.
A Stage-1 record's p_best is the working RM's, the one Stage 1 checks: judges see every
such pair with max_examples examples, whatever its p.

A batch has a deadline (`batch_deadline_s`; the service sets annotator.batch_deadline_s): judge
and labeller calls still running when it passes are cancelled and their samples abstain, with the
deadline as the rationale (as do the judges of a pair whose examples are not retrieved by then).
The Kafka consumer must poll again within max.poll.interval.ms (10 min); a slow or hung judge
would otherwise keep the batch past it, the consumer would leave its group, and the same batch
would be read and overrun again for as long as the judge stays slow.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from prometheus_client import Counter

from synpref.services.annotator.chat import ChatStats
from synpref.services.annotator.judges import AttributeLabeller, Judge, JudgeRequest, aggregate, examples_shown
from synpref.services.annotator.prompts import Example, attributes_dict
from synpref.shared.pairs import message_dicts, needs_annotation, now, pair_id, pair_problem
from synpref.shared.roles import BEST
from synpref.shared.stage import Stage, StageResult
from synpref.v1.pair_pb2 import PREFERENCE_ABSTAIN, STAGE_ONE, Attributes, JudgeVote, PairRecord

log = logging.getLogger(__name__)
STEP = "annotator"
T = TypeVar("T")
LATE = "no answer before the batch deadline (annotator.batch_deadline_s)"
JUDGE_LATE = Counter(
    "synpref_judge_deadline_calls",
    "Judge calls cancelled at the annotator's batch deadline: their samples abstain",
    ["model"],
)


class ExampleSource(Protocol):
    """Human-verified examples similar to a pair (shared/retrieval.py provides one)."""

    def examples(self, conversation: list[dict[str, str]], attributes: dict, k: int) -> list[Example]:
        """Up to `k` verified examples for a pair with this conversation and these attributes."""
        ...


def k_for(p: float | None, k_max: int = 8) -> int:
    """The paper's retrieval size: k_max when the RM is wrong, fewer the surer it is right."""
    from synpref.shared.retrieval import k_rule

    return k_max if p is None else min(k_max, k_rule(p, k_max))


class Annotator:
    """Adds attributes, retrieved examples, judge votes and their aggregate to pair records.

    Args:
        judges: every judge votes on every annotated pair; judges run concurrently.
        labeller: labels the attribute 5-tuple of records that have none; None skips it.
        examples: where retrieved human-verified examples come from; None sends none.
        max_examples: most examples per pair (k_for picks fewer when p_best is known); 0 sends none.
        skip_confident: when a record carries a p_best score the best RM gets right by more
            than `band`, pass it through without judges.
        band: the margin around 0.5 used by `skip_confident`.
        batch_deadline_s: seconds a batch may take; calls still running then abstain. None: no deadline.

    Input records are never mutated: each result is a copy.
    """

    def __init__(
        self,
        judges: list[Judge],
        labeller: AttributeLabeller | None = None,
        examples: ExampleSource | None = None,
        max_examples: int = 8,
        skip_confident: bool = False,
        band: float = 0.05,
        batch_deadline_s: float | None = None,
    ) -> None:
        self.judges = judges
        self.labeller = labeller
        self.examples = examples
        self.max_examples = max_examples
        self.skip_confident = skip_confident
        self.band = band
        self.batch_deadline_s = batch_deadline_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        # Retrieval (an encoder forward pass and an index search, tens of ms) runs here, off the event loop, so the
        # batch's judge I/O goes on meanwhile. One thread: an example source need not be thread-safe (the encoder's
        # fast tokenizer is not, and faiss_threads sets a process-wide OpenMP setting).
        self._retrieval: ThreadPoolExecutor | None = None
        # Backends warned that most of a batch's answers were cut off at max_tokens; one warns again only after a
        # batch where most were not (one warning per outage-like period, not one per batch).
        self._cut_off_warned: set[int] = set()

    async def annotate_one(
        self, record: PairRecord, deadline: float | None = None, late: dict[str, int] | None = None
    ) -> PairRecord:
        """An annotated copy of `record` (votes, aggregate and retrieved example ids replaced); calls still
        running at `deadline` (the event loop's clock) abstain, counted per model in `late` (else each logged)."""
        out = PairRecord()
        out.CopyFrom(record)
        pair = out.pair
        request = JudgeRequest(
            pair.id, message_dicts(pair.conversation), message_dicts(pair.chosen), message_dicts(pair.rejected)
        )
        if self.labeller is not None and not out.attributes.task_category:
            attributes = await _until(self.labeller.label(request), deadline, self.labeller.name, late)
            if attributes is not None:
                out.attributes.CopyFrom(attributes)
        attrs = attributes_dict(out.attributes) if out.attributes.task_category else {}
        # A NaN p (a diverged RM) is no score: it neither skips the judges nor trims the examples.
        scores = (s.p for s in out.scores if s.model == BEST and math.isfinite(s.p))
        best = None if out.lineage.stage == STAGE_ONE else next(scores, None)
        if self.skip_confident and best is not None and not needs_annotation(best, self.band):
            out.lineage.steps.append(STEP)
            return out
        examples: list[Example] = []
        if self.examples is not None and self.max_examples > 0:
            k = k_for(best, self.max_examples)
            # Never the pair itself, nor its flipped twin (a FLIP verdict puts the pair in D_gold under the id of
            # the swapped orientation): either would show the judges the very verdict they are asked for.
            twin = pair_id(request.conversation, request.rejected, request.chosen)
            own = {pair.id, out.lineage.original_id, twin} - {""}
            if self._retrieval is None:
                self._retrieval = ThreadPoolExecutor(1, thread_name_prefix="synpref-examples")
            found = asyncio.get_running_loop().run_in_executor(
                self._retrieval, self._nearest, request.conversation, attrs, k, own
            )
            try:
                examples = await found if deadline is None else await asyncio.wait_for(found, _left(deadline))
            except TimeoutError:  # past the deadline the judges abstain at once: no examples needed
                examples = []
        request = JudgeRequest(
            pair.id, request.conversation, request.chosen, request.rejected, attrs, examples, dict(pair.meta)
        )
        results = await asyncio.gather(*(_votes(judge, request, deadline, late) for judge in self.judges))
        del out.votes[:]
        for votes in results:
            out.votes.extend(votes)
        out.judge_aggregate.CopyFrom(aggregate(list(out.votes)))
        del out.retrieved_example_ids[:]
        # Only those some judge's prompt held: a prompt budget (max_prompt_chars) drops the last ones.
        out.retrieved_example_ids.extend(e.id for e in examples_shown(self.judges, request))
        out.lineage.steps.append(STEP)
        out.lineage.updated_at.CopyFrom(now())
        return out

    def _nearest(self, conversation: list[dict[str, str]], attrs: dict, k: int, own: set[str]) -> list[Example]:
        """Up to `k` examples nearest to the pair, none of them with an id in `own` (in the retrieval thread)."""
        assert self.examples is not None
        found = self.examples.examples(conversation, attrs, k + 1)
        examples = [e for e in found if e.id not in own]
        if len(examples) < k and len(found) == k + 1:  # more than one of them was among the nearest
            found = self.examples.examples(conversation, attrs, k + len(own))
            examples = [e for e in found if e.id not in own]
        return examples[:k]

    async def annotate(self, records: list[PairRecord]) -> list[PairRecord | BaseException]:
        """Annotate `records` concurrently; each entry is the annotated record or the exception it raised."""
        deadline = None
        if self.batch_deadline_s is not None:
            deadline = asyncio.get_running_loop().time() + self.batch_deadline_s
        before = self._answer_counts()
        late: dict[str, int] = {}
        results = await asyncio.gather(*(self.annotate_one(r, deadline, late) for r in records), return_exceptions=True)
        # One line per model and batch: a hung judge misses the deadline on every pair of it at the same instant.
        for name, calls in late.items():
            log.warning(
                "%s: %d calls had no answer before the batch deadline (annotator.batch_deadline_s)", name, calls
            )
        self._warn_cut_off(before)
        return results

    def _answer_counts(self) -> list[tuple[Any, int, int]]:
        """(backend, answers, cut off) so far for each judge's and the labeller's backend that counts them."""
        backends = [getattr(judge, "backend", None) for judge in self.judges]
        backends += [self.labeller.backend] if self.labeller is not None else []
        stats = [(b, getattr(b, "stats", None)) for b in backends]
        return [(b, s.answers, s.cut_off) for b, s in stats if isinstance(s, ChatStats)]

    def _warn_cut_off(self, before: list[tuple[Any, int, int]]) -> None:
        """Warn, once per backend and period, when most of its answers since `before` were cut off at max_tokens.

        Each such answer abstains, and silently: a reasoning model (its hidden reasoning counts against max_tokens)
        abstained on every pair while the batches went on as if the judge had no opinion.
        """
        for backend, answers_before, cut_before in before:
            answers = backend.stats.answers - answers_before
            cut = backend.stats.cut_off - cut_before
            if not answers:
                continue
            if 2 * cut <= answers:
                self._cut_off_warned.discard(id(backend))
            elif id(backend) not in self._cut_off_warned:
                self._cut_off_warned.add(id(backend))
                log.warning(
                    "%s: %d of %d answers in this batch were cut off at max_tokens (%s; no end of answer) and "
                    "abstained: a reasoning model's hidden reasoning counts against it; raise annotator.max_tokens "
                    "(max_new_tokens for a LocalChat)",
                    backend.name,
                    cut,
                    answers,
                    getattr(backend, "max_tokens", "?"),
                )

    def run(self, records: list[PairRecord]) -> list[PairRecord | BaseException]:
        """Annotate synchronously on the annotator's own event loop (kept between batches).

        The Kafka runner and gRPC ProcessBatch threads share the loop (and its HTTP sessions):
        one batch at a time; the requests inside a batch run concurrently.
        """
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                self._loop = asyncio.new_event_loop()
            return self._loop.run_until_complete(self.annotate(records))

    def label(self, records: list[PairRecord]) -> list[Attributes | None]:
        """The labeller's attribute 5-tuple for each record, concurrently on the annotator's event loop; None where
        the answer was unusable or the call failed (the annotator stage asks again when it judges the pair)."""
        labeller = self.labeller
        if labeller is None:
            return [None] * len(records)

        async def one(record: PairRecord) -> Attributes | None:
            pair = record.pair
            request = JudgeRequest(
                pair.id, message_dicts(pair.conversation), message_dicts(pair.chosen), message_dicts(pair.rejected)
            )
            try:
                return await labeller.label(request)
            except Exception as exc:  # one failed call leaves one pair unlabelled, not the batch
                log.warning("attribute labelling of %s failed: %r", pair.id, exc)
                return None

        async def all_of() -> list[Attributes | None]:
            before = self._answer_counts()
            labels = list(await asyncio.gather(*(one(r) for r in records)))
            self._warn_cut_off(before)
            return labels

        with self._lock:
            if self._loop is None or self._loop.is_closed():
                self._loop = asyncio.new_event_loop()
            return self._loop.run_until_complete(all_of())

    def stage(self) -> Stage:
        """The annotator as a Stage: annotated records go to route "annotated", failures to the failed list."""

        def annotator(batch: list[PairRecord]) -> StageResult:
            result = StageResult()
            judgeable = []
            for record in batch:
                problem = pair_problem(record)
                if problem is None:
                    judgeable.append(record)
                else:
                    result.fail(record, problem)
            for record, out in zip(judgeable, self.run(judgeable) if judgeable else [], strict=True):
                if isinstance(out, BaseException):
                    log.warning("annotation of %s failed: %r", record.pair.id, out)
                    result.fail(record, f"annotation failed: {type(out).__name__}: {out}")
                else:
                    result.emit("annotated", out)
            return result

        return annotator

    def close(self) -> None:
        """Close the judges' and labeller's backends on the annotator's event loop, then the loop itself, and end
        the retrieval thread."""
        with self._lock:
            self._close()
            if self._retrieval is not None:
                self._retrieval.shutdown(cancel_futures=True)
                self._retrieval = None

    def _close(self) -> None:
        if self._loop is None or self._loop.is_closed():
            return
        closers: list[Callable] = []
        for judge in self.judges:
            backend = getattr(judge, "backend", None)
            if backend is not None and hasattr(backend, "close"):
                closers.append(backend.close)
        if self.labeller is not None and hasattr(self.labeller.backend, "close"):
            closers.append(self.labeller.backend.close)
        for close in closers:
            self._loop.run_until_complete(close())
        self._loop.close()


def _left(deadline: float) -> float:
    """Seconds until `deadline` on the running event loop's clock; 0 once it has passed."""
    return max(0.0, deadline - asyncio.get_running_loop().time())


async def _until(call: Awaitable[T], deadline: float | None, name: str, late: dict[str, int] | None = None) -> T | None:
    """`await call`, or None (the call cancelled) once the event loop's clock passes `deadline`: counted in `late` by
    `name` when given (the caller logs the batch's count), else logged."""
    if deadline is None:
        return await call
    try:
        return await asyncio.wait_for(call, _left(deadline))
    except TimeoutError:
        JUDGE_LATE.labels(name).inc()
        if late is None:
            log.warning("%s: no answer before the batch deadline (annotator.batch_deadline_s)", name)
        else:
            late[name] = late.get(name, 0) + 1
        return None


async def _votes(
    judge: Judge, request: JudgeRequest, deadline: float | None, late: dict[str, int] | None
) -> list[JudgeVote]:
    """The judge's votes, or one abstention per sample naming the deadline when the call outlasts it."""
    votes = await _until(judge.judge(request), deadline, judge.name, late)
    if votes is not None:
        return votes
    version = getattr(judge, "prompt_version", "")
    return [
        JudgeVote(judge=judge.name, sample=i, preference=PREFERENCE_ABSTAIN, rationale=LATE, prompt_version=version)
        for i in range(getattr(judge, "samples", 1))
    ]
