"""Kafka payloads: PairRecord protobufs keyed by pair id, with a schema-version header.

Every message the pipeline writes carries `synpref-schema: v1` and the protobuf type
it holds, so a consumer can refuse a payload from a newer or foreign producer instead
of misreading it. Dead-letter messages keep the original key, value and headers and
add `synpref-dlq-*` headers that say why and where the message came from; a copy the
dead-letter topic would refuse as too large keeps only the key and those headers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

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
DLQ_DROPPED = "synpref-dlq-dropped-bytes"
"""Set when the payload was left out of the dead-letter entry: how many bytes it had."""

Headers = list[tuple[str, bytes]]
"""Kafka headers as kafka-python sends and returns them."""

MAX_REASON_CHARS = 2000
"""Reasons are truncated: a header is no place for a whole traceback."""


FRAMING_BYTES = 128
"""Over key, value and header bytes: the record batch header (61 bytes) and the record's own varints."""
HEADER_FRAMING_BYTES = 10
"""The two length varints of each header."""
MAX_KEPT_KEY_BYTES = 1024
"""A reduced dead-letter entry keeps the key only up to this size (a pair id is 32 bytes)."""


class PayloadError(ValueError):
    """A message that is not a v1 PairRecord this code can read."""


@dataclass(frozen=True)
class Outgoing:
    """One message to produce: what the runner hands to the producer."""

    topic: str
    key: bytes | None
    value: bytes
    headers: Headers

    @property
    def size(self) -> int:
        """Bytes the broker counts against max.message.bytes for this message sent alone, uncompressed."""
        headers = sum(len(name.encode()) + len(value) + HEADER_FRAMING_BYTES for name, value in self.headers)
        return len(self.key or b"") + len(self.value) + headers + FRAMING_BYTES


class Message(Protocol):
    """What is read from a consumed message (kafka-python's ConsumerRecord has it)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Any


def header_map(headers: Iterable[tuple[str, bytes | None]] | None) -> dict[str, str]:
    """Headers as str -> str; a repeated name keeps its last value."""
    out: dict[str, str] = {}
    for name, value in headers or ():
        out[name] = (value or b"").decode("utf-8", errors="replace")
    return out


def record_headers() -> Headers:
    """The Kafka headers every PairRecord message carries: schema version and record type."""
    return [(SCHEMA_HEADER, SCHEMA_VERSION.encode()), (TYPE_HEADER, RECORD_TYPE.encode())]


def encode_record(record: PairRecord, topic: str) -> Outgoing:
    """A PairRecord as a message keyed by its pair id, so the versions of a pair share a partition while they keep
    its orientation (a flip makes a new id)."""
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
    max_bytes: int | None = None,
) -> Outgoing:
    """The original message, unchanged, plus headers that say why it could not be processed.

    kind is "undecodable" (bad payload), "failed" (the stage rejected the record),
    "stage-error" (the stage raised on it), "bad-route" or "too-large" (an output over the
    limit). A copy over `max_bytes` would be refused by the broker, and a refused dead
    letter stops the service on every restart: it is reduced to the source position, with
    DLQ_DROPPED saying how many bytes were left out, and the key (when small) and the reason
    as far as they fit.
    """
    provenance = [
        (DLQ_KIND, kind.encode()),
        (DLQ_SERVICE, service.encode()),
        (DLQ_TOPIC, source_topic.encode()),
        (DLQ_PARTITION, str(source_partition).encode()),
        (DLQ_OFFSET, str(source_offset).encode()),
    ]
    kept = [(name, v or b"") for name, v in headers or () if not name.startswith("synpref-dlq-")]
    full = Outgoing(topic, key, value or b"", [*kept, *provenance, (DLQ_REASON, _reason(reason))])
    if max_bytes is None or full.size <= max_bytes:
        return full
    dropped = len(value or b"") + sum(len(v) for _, v in kept)
    reason = f"{reason}; the message ({dropped} bytes) is left out: its dead-letter copy is over {max_bytes} bytes"
    small_key = key if key is not None and len(key) <= MAX_KEPT_KEY_BYTES else None
    reduced = Outgoing(topic, small_key, b"", [*provenance, (DLQ_DROPPED, str(dropped).encode()), (DLQ_REASON, b"")])
    # MAX_REASON_CHARS counts characters (up to 4 bytes each) and the key may be 1 KiB: under a small limit (the
    # config allows 1 KiB) that alone is refused. The provenance is what must get through, then the key (the pair id:
    # the controller ends the record by it), and the reason takes what room is left.
    room = max_bytes - reduced.size
    if small_key is not None and room < 0:
        reduced, room = Outgoing(topic, None, b"", reduced.headers), room + len(small_key)
    text = _reason(reason)[: max(0, room)].decode("utf-8", errors="ignore").encode()
    return Outgoing(topic, reduced.key, b"", [*reduced.headers[:-1], (DLQ_REASON, text)])


def dead_letter_for(
    msg: Message | None,
    topic: str,
    *,
    kind: str,
    reason: str,
    service: str,
    record: PairRecord | None = None,
    max_bytes: int | None = None,
) -> Outgoing:
    """The dead-letter entry for consumed message `msg`: the message itself, or `record` (the
    stage's version of it) when given. msg is None only for a record with no source message."""
    if record is not None:
        original = encode_record(record, topic)
    else:
        assert msg is not None, "a dead letter needs a message or a record"
        original = Outgoing(topic, msg.key, msg.value or b"", list(msg.headers or ()))
    return dead_letter(
        topic,
        key=original.key,
        value=original.value,
        headers=original.headers,
        kind=kind,
        reason=reason,
        service=service,
        source_topic=msg.topic if msg else "",
        source_partition=msg.partition if msg else -1,
        source_offset=msg.offset if msg else -1,
        max_bytes=max_bytes,
    )


def _reason(reason: str) -> bytes:
    return reason[:MAX_REASON_CHARS].encode("utf-8", errors="replace")
