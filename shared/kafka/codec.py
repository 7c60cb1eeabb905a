"""Kafka payloads: PairRecord protobufs keyed by pair id, with a schema-version header.

Every message the pipeline writes carries `synpref-schema: v1` and the protobuf type
it holds, so a consumer can refuse a payload from a newer or foreign producer instead
of misreading it. Dead-letter messages keep the original key, value and headers and
add `synpref-dlq-*` headers that say why and where the message came from.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from synpref.v1.pair_pb2 import PairRecord

SCHEMA_HEADER = "synpref-schema"
SCHEMA_VERSION = "v1"
TYPE_HEADER = "synpref-type"
RECORD_TYPE = PairRecord.DESCRIPTOR.full_name  # "synpref.v1.PairRecord"

DLQ_REASON = "synpref-dlq-reason"
DLQ_KIND = "synpref-dlq-kind"
DLQ_SERVICE = "synpref-dlq-service"
DLQ_TOPIC = "synpref-dlq-source-topic"
DLQ_PARTITION = "synpref-dlq-source-partition"
DLQ_OFFSET = "synpref-dlq-source-offset"

Headers = list[tuple[str, bytes]]
"""Kafka headers as kafka-python sends and returns them."""

MAX_REASON_CHARS = 2000
"""Reasons are truncated: a header is no place for a whole traceback."""


class PayloadError(ValueError):
    """A message that is not a v1 PairRecord this code can read."""


@dataclass(frozen=True)
class Outgoing:
    """One message to produce: what the runner hands to the producer."""

    topic: str
    key: bytes | None
    value: bytes
    headers: Headers


def header_map(headers: Iterable[tuple[str, bytes | None]] | None) -> dict[str, str]:
    """Headers as str -> str; a repeated name keeps its last value."""
    out: dict[str, str] = {}
    for name, value in headers or ():
        out[name] = (value or b"").decode("utf-8", errors="replace")
    return out


def record_headers() -> Headers:
    return [(SCHEMA_HEADER, SCHEMA_VERSION.encode()), (TYPE_HEADER, RECORD_TYPE.encode())]


def encode_record(record: PairRecord, topic: str) -> Outgoing:
    """A PairRecord as a message keyed by its pair id, so all versions of a pair share a partition."""
    key = record.pair.id.encode() if record.pair.id else None
    return Outgoing(topic=topic, key=key, value=record.SerializeToString(), headers=record_headers())


def decode_record(value: bytes | None, headers: Iterable[tuple[str, bytes | None]] | None) -> PairRecord:
    """Parse a message written by encode_record; PayloadError says what is wrong with it."""
    found = header_map(headers)
    schema = found.get(SCHEMA_HEADER)
    if schema is None:
        raise PayloadError(f"missing {SCHEMA_HEADER} header")
    if schema != SCHEMA_VERSION:
        raise PayloadError(f"unsupported {SCHEMA_HEADER} {schema!r} (this build reads {SCHEMA_VERSION})")
    kind = found.get(TYPE_HEADER, RECORD_TYPE)
    if kind != RECORD_TYPE:
        raise PayloadError(f"{TYPE_HEADER} is {kind!r}, expected {RECORD_TYPE}")
    if not value:
        raise PayloadError("empty payload")
    record = PairRecord()
    try:
        record.ParseFromString(value)
    except DecodeError as exc:
        raise PayloadError(f"not a {RECORD_TYPE} protobuf: {exc}") from None
    if not record.pair.id:
        raise PayloadError("record has no pair id")
    return record


def dead_letter(
    topic: str,
    *,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]] | None,
    kind: str,
    reason: str,
    service: str,
    source_topic: str,
    source_partition: int,
    source_offset: int,
) -> Outgoing:
    """The original message, unchanged, plus headers that say why it could not be processed.

    kind is "undecodable" (bad payload), "failed" (the stage rejected the record) or
    "stage-error" (the stage raised on the batch holding it).
    """
    kept = [(name, v or b"") for name, v in headers or () if not name.startswith("synpref-dlq-")]
    kept += [
        (DLQ_KIND, kind.encode()),
        (DLQ_REASON, reason[:MAX_REASON_CHARS].encode("utf-8", errors="replace")),
        (DLQ_SERVICE, service.encode()),
        (DLQ_TOPIC, source_topic.encode()),
        (DLQ_PARTITION, str(source_partition).encode()),
        (DLQ_OFFSET, str(source_offset).encode()),
    ]
    return Outgoing(topic=topic, key=key, value=value or b"", headers=kept)
