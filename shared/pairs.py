"""Operations on pairs, defined once: stable ids, v1 message conversion, sigmoid and the
p_best rule, and the train/held-out split by conversation."""

from __future__ import annotations

import hashlib
import json
import math
import random
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from synpref.v1.pair_pb2 import PREFERENCE_CHOSEN, PREFERENCE_REJECTED, Lineage, Message, Pair, PairRecord, Preference

MessageDicts = list[dict[str, str]]
ROLES = frozenset({"system", "user", "assistant", "tool"})
"""Message roles a chat template knows; any other is bad input."""
T = TypeVar("T")


def messages(items: Iterable[Mapping[str, str]]) -> list[Message]:
    """Message protos from `{"role", "content"}` mappings."""
    return [Message(role=str(m["role"]), content=str(m["content"])) for m in items]


def message_dicts(items: Iterable[Message]) -> MessageDicts:
    """`{"role", "content"}` dicts from Message protos."""
    return [{"role": m.role, "content": m.content} for m in items]


def pair_id(conversation: MessageDicts, chosen: MessageDicts, rejected: MessageDicts) -> str:
    """Content hash of the labelled triple: equal content gives an equal id, anywhere."""
    canonical = json.dumps([conversation, chosen, rejected], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def new_pair(
    conversation: MessageDicts,
    chosen: MessageDicts,
    rejected: MessageDicts,
    source: str,
    meta: Mapping[str, str] | None = None,
) -> Pair:
    """A Pair with its content-hash id (see `pair_id`) and the given messages, source and meta."""
    return Pair(
        id=pair_id(conversation, chosen, rejected),
        conversation=messages(conversation),
        chosen=messages(chosen),
        rejected=messages(rejected),
        source=source,
        meta=dict(meta or {}),
    )


def now() -> Timestamp:
    """The current time as a protobuf Timestamp."""
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


def new_record(pair: Pair) -> PairRecord:
    """A fresh PairRecord for `pair`, with ingested_at and updated_at set to now."""
    return PairRecord(pair=pair, lineage=Lineage(ingested_at=now(), updated_at=now()))


def swap_preference(value: Preference) -> Preference:
    """CHOSEN <-> REJECTED; other values (unspecified, tie, abstain) stay."""
    return {PREFERENCE_CHOSEN: PREFERENCE_REJECTED, PREFERENCE_REJECTED: PREFERENCE_CHOSEN}.get(value, value)


def flipped(record: PairRecord) -> PairRecord:
    """The same pair with chosen and rejected swapped, under a new content id.

    Everything stated relative to the label turns with it: model scores (rewards swap,
    p -> 1 - p), the judges' votes and aggregate (a vote for "chosen" becomes one for
    "rejected") and which candidate slot showed the chosen side. The one flip of the project:
    humans, judges and the consistency filter use it.
    """
    out = PairRecord()
    out.CopyFrom(record)
    pair = out.pair
    chosen = list(pair.chosen)
    rejected = list(pair.rejected)
    del pair.chosen[:]
    del pair.rejected[:]
    pair.chosen.extend(rejected)
    pair.rejected.extend(chosen)
    out.lineage.original_id = record.lineage.original_id or record.pair.id
    pair.id = pair_id(message_dicts(pair.conversation), message_dicts(pair.chosen), message_dicts(pair.rejected))
    for score in out.scores:
        score.reward_chosen, score.reward_rejected = score.reward_rejected, score.reward_chosen
        score.p = 1.0 - score.p
    for vote in out.votes:
        vote.preference = swap_preference(vote.preference)
        vote.candidate_order_swapped = not vote.candidate_order_swapped  # the new chosen sat in the other slot
    out.judge_aggregate.preference = swap_preference(out.judge_aggregate.preference)
    return out


def sigmoid(x: float) -> float:
    """1 / (1 + e^-x), computed without overflow for any x."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def preference_probability(reward_chosen: float, reward_rejected: float) -> float:
    """p = sigmoid(r_chosen - r_rejected): the RM's probability that the label is right."""
    return sigmoid(reward_chosen - reward_rejected)


def needs_annotation(p_best: float, band: float) -> bool:
    """The p_best rule: the best RM is wrong (p <= 0.5) or unsure (within `band` above 0.5).

    Such a pair is a gold candidate (Stage 1) and is judged by the LLMs; any other pair the
    best RM already gets right with margin.
    """
    return p_best <= 0.5 + band


def conversation_key(conversation: MessageDicts) -> str:
    """Content hash of a conversation's prompt: its messages up to its first user turn (all of them when it
    has none), system turns left out; the unit that a train/held-out split never cuts. Conversations that open
    alike and go on differently (hh-rlhf's multi-turn pairs) share it, so a held-out prompt never reaches training
    under another history; so do one prompt's askings under other system prompts, which would otherwise put the
    prompt on both sides. A conversation without a system turn keeps the key it always had (a single-turn one:
    the hash of the whole); one of system turns only is hashed whole, so such prompts stay apart."""
    prompt = [m for m in conversation if m.get("role") != "system"] or list(conversation)
    first_user = next((i for i, m in enumerate(prompt) if m.get("role") == "user"), len(prompt) - 1)
    text = json.dumps(prompt[: first_user + 1], ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def unit_interval(text: str) -> float:
    """A number in [0, 1) fixed by `text` (blake2b): a per-item coin that needs no count and no order."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2.0**64


def is_held_out(conversation: MessageDicts, fraction: float, seed: int) -> bool:
    """Whether a pair of this conversation is held out: each conversation is, with probability `fraction`.

    Decided per conversation by a seeded hash, so a split streams (no pass over all pairs first),
    every pair of one conversation lands on the same side, and a pair's side does not depend on
    which other pairs came with it.
    """
    return fraction > 0 and unit_interval(f"holdout:{seed}:{conversation_key(conversation)}") < fraction


def held_out_count(conversations: int, fraction: float) -> int:
    """How many of `conversations` a split holds out: fraction x count rounded half up, at
    least one when fraction > 0 (asking for held-out pairs never gives none), at most all."""
    if fraction <= 0 or conversations == 0:
        return 0
    return min(conversations, max(1, math.floor(fraction * conversations + 0.5)))


def held_out_positions(distinct: int, fraction: float, seed: int) -> array[int]:
    """Which of `distinct` sorted conversation keys a split holds out, as positions in that order: the first
    held_out_count(...) after a random.Random(seed) shuffle (8 bytes a key while it runs)."""
    order = array("q", range(distinct))
    random.Random(seed).shuffle(order)
    return order[: held_out_count(distinct, fraction)]


def split_by_conversation(
    items: Sequence[T], conversation: Callable[[T], MessageDicts], fraction: float, seed: int
) -> tuple[list[T], list[T]]:
    """(kept, held_out) with every item of one conversation on the same side.

    The distinct conversation keys are sorted, shuffled with random.Random(seed), and the
    first held_out_count(...) of them are held out. Items keep their input order on each
    side, so equal inputs and seed give equal splits on any machine.
    """
    keys = [conversation_key(conversation(item)) for item in items]
    distinct = sorted(set(keys))
    held = {distinct[i] for i in held_out_positions(len(distinct), fraction, seed)}
    kept = [item for item, key in zip(items, keys, strict=True) if key not in held]
    held_out = [item for item, key in zip(items, keys, strict=True) if key in held]
    return kept, held_out


def pair_problem(record: PairRecord) -> str | None:
    """Why this pair cannot be judged or scored, or None: checked per record by the stages, so one bad
    pair fails alone instead of making a stage raise on its whole batch."""
    pair = record.pair
    if not pair.chosen or not pair.rejected:
        return "pair has no chosen or no rejected response"
    for part in ("conversation", "chosen", "rejected"):
        for message in getattr(pair, part):
            if message.role not in ROLES:
                return f"{part} has a message with role {message.role!r}; roles are {', '.join(sorted(ROLES))}"
    return None
