"""The dataset's row format: one Parquet row per curated pair, and the conversion from a PairRecord.

Columns (the Skywork-Reward-Preference format plus lineage):
  id, conversation, chosen, rejected   -- chosen/rejected are FULL message lists, conversation
                                          included, as in Skywork-Reward-Preference; the
                                          conversation alone is its own column
  source, meta_json, attributes, judge_aggregate, decision, scores, lineage,
  split                                -- "train" (pairs to train on) or "heldout" (the
                                          controller's measurement split, never curated)
"""

from __future__ import annotations

import json

import pyarrow as pa

from synpref.shared.pairs import message_dicts
from synpref.v1.pair_pb2 import Controversiality, Decision, Objectivity, PairRecord, Preference, Stage

TRAIN, HELDOUT = "train", "heldout"
SPLITS = (TRAIN, HELDOUT)

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("conversation", MESSAGES),
        ("chosen", MESSAGES),
        ("rejected", MESSAGES),
        ("source", pa.string()),
        ("meta_json", pa.string()),
        (
            "attributes",
            pa.struct(
                [
                    ("task_category", pa.string()),
                    ("objectivity", pa.string()),
                    ("controversiality", pa.string()),
                    ("desired_attributes", pa.list_(pa.string())),
                    ("annotation_guideline", pa.string()),
                    ("annotator_model", pa.string()),
                ]
            ),
        ),
        (
            "judge_aggregate",
            pa.struct(
                [
                    ("preference", pa.string()),
                    ("agreement", pa.float64()),
                    ("judges_voting", pa.int32()),
                    ("judges_abstaining", pa.int32()),
                ]
            ),
        ),
        ("decision", pa.struct([("decision", pa.string()), ("rule", pa.string()), ("reason", pa.string())])),
        (
            "scores",
            pa.list_(
                pa.struct(
                    [
                        ("model", pa.string()),
                        ("version", pa.string()),
                        ("reward_chosen", pa.float64()),
                        ("reward_rejected", pa.float64()),
                        ("p", pa.float64()),
                    ]
                )
            ),
        ),
        (
            "lineage",
            pa.struct(
                [
                    ("stage", pa.string()),
                    ("iteration", pa.int32()),
                    ("steps", pa.list_(pa.string())),
                    ("original_id", pa.string()),
                    ("ingested_at", pa.string()),
                    ("votes", pa.int32()),
                ]
            ),
        ),
        ("split", pa.string()),
    ]
)


def _enum(enum, value: int, prefix: str) -> str:
    # proto3 enums are open: a newer producer's value parses here without a name; it is written
    # as its number, so the pair is kept rather than failing the whole shard.
    try:
        return enum.Name(value).removeprefix(prefix).lower()
    except ValueError:
        return str(value)


def _ingested_at(lineage) -> str:
    # The one part of a record that may not convert: a Timestamp out of RFC 3339's range (ValueError).
    return lineage.ingested_at.ToJsonString() if lineage.HasField("ingested_at") else ""


def row_problem(record: PairRecord) -> str | None:
    """Why `record` cannot become a dataset row (record_row would raise), else None: checked per record before
    a shard is built, without building the row (the writer's stage would otherwise build every row twice)."""
    try:
        _ingested_at(record.lineage)
    except ValueError as exc:
        return f"lineage.ingested_at: {exc}"
    return None


def record_row(record: PairRecord, split: str = TRAIN) -> dict:
    """The Parquet row of `record`, in split `split` (SPLITS)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    pair, attrs, agg, lin = record.pair, record.attributes, record.judge_aggregate, record.lineage
    conversation = message_dicts(pair.conversation)
    return {
        "id": pair.id,
        "conversation": conversation,
        "chosen": conversation + message_dicts(pair.chosen),
        "rejected": conversation + message_dicts(pair.rejected),
        "source": pair.source,
        "meta_json": json.dumps(dict(pair.meta), ensure_ascii=False, sort_keys=True),
        "attributes": {
            "task_category": attrs.task_category,
            "objectivity": _enum(Objectivity, attrs.objectivity, "OBJECTIVITY_"),
            "controversiality": _enum(Controversiality, attrs.controversiality, "CONTROVERSIALITY_"),
            "desired_attributes": list(attrs.desired_attributes),
            "annotation_guideline": attrs.annotation_guideline,
            "annotator_model": attrs.annotator_model,
        },
        "judge_aggregate": {
            "preference": _enum(Preference, agg.preference, "PREFERENCE_"),
            "agreement": agg.agreement,
            "judges_voting": agg.judges_voting,
            "judges_abstaining": agg.judges_abstaining,
        },
        "decision": {
            "decision": _enum(Decision, record.decision.decision, "DECISION_"),
            "rule": record.decision.rule,
            "reason": record.decision.reason,
        },
        "scores": [
            {
                "model": s.model,
                "version": s.version,
                "reward_chosen": s.reward_chosen,
                "reward_rejected": s.reward_rejected,
                "p": s.p,
            }
            for s in record.scores
        ],
        "lineage": {
            "stage": _enum(Stage, lin.stage, "STAGE_"),
            "iteration": lin.iteration,
            "steps": list(lin.steps),
            "original_id": lin.original_id,
            "ingested_at": _ingested_at(lin),
            "votes": len(record.votes),
        },
        "split": split,
    }
