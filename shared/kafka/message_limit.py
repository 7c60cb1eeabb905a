"""Whether a PairRecord fits a Kafka topic's message limit: the `oversized` bucket of `synpref ingest` and of the
controller's intake, so that a pair too large for the topics is refused when it is read, not when a publish fails.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from synpref.shared.kafka.codec import HEADER_FRAMING_BYTES, record_headers
from synpref.v1.pair_pb2 import PairRecord

FRAMING_BYTES = 256
"""Over the record's, key's and headers' own bytes: the record batch header and varints."""
HEADER_BYTES = sum(len(name.encode()) + len(value) + HEADER_FRAMING_BYTES for name, value in record_headers())


@dataclass(frozen=True)
class MessageLimit:
    """Called with a record: why a topic taking messages of up to `limit` bytes would refuse it, or None.
    `text_over` says the same from a pair's texts alone where that is already certain, before any work on them."""

    limit: int
    limit_of: str
    """Whose limit it is, for the reasons: "topic synpref.s2.raw"."""

    def __call__(self, record: PairRecord) -> str | None:
        size = record.ByteSize() + len(record.pair.id.encode()) + HEADER_BYTES + FRAMING_BYTES
        if size <= self.limit:
            return None
        return f"record of {size} bytes is over the {self.limit}-byte message limit of {self.limit_of}"

    def text_over(self, texts: Iterable[str]) -> str | None:
        """Why a record holding `texts` is certainly too large, or None. Its messages' contents are in it verbatim
        and a character is at least one UTF-8 byte, so characters over the limit are bytes over it; len() costs
        nothing, where encoding the text would read it all."""
        chars = sum(len(text) for text in texts)
        if chars <= self.limit:
            return None
        return f"its text alone is {chars} characters, over the {self.limit}-byte message limit of {self.limit_of}"
