"""Helpers for the v1 pair messages: stable ids, conversion, probabilities."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping

from google.protobuf.timestamp_pb2 import Timestamp

from synpref.v1.pair_pb2 import Lineage, Message, Pair, PairRecord

MessageDicts = list[dict[str, str]]


def messages(items: Iterable[Mapping[str, str]]) -> list[Message]:
    return [Message(role=str(m["role"]), content=str(m["content"])) for m in items]


def message_dicts(items: Iterable[Message]) -> MessageDicts:
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
    return Pair(
        id=pair_id(conversation, chosen, rejected),
        conversation=messages(conversation),
        chosen=messages(chosen),
        rejected=messages(rejected),
        source=source,
        meta=dict(meta or {}),
    )


def now() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


def new_record(pair: Pair) -> PairRecord:
    return PairRecord(pair=pair, lineage=Lineage(ingested_at=now(), updated_at=now()))


def flipped(record: PairRecord) -> PairRecord:
    """The same pair with chosen and rejected swapped, under a new content id."""
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
    return out


def preference_probability(reward_chosen: float, reward_rejected: float) -> float:
    """p = sigmoid(r_chosen - r_rejected), computed without overflow."""
    d = reward_chosen - reward_rejected
    if d >= 0:
        return 1.0 / (1.0 + math.exp(-d))
    e = math.exp(d)
    return e / (1.0 + e)
