"""The human verification desk: a web page where Stage-1 annotators verify review pairs.

Embedded use (no Kafka), e.g. from `synpref run`:

    queue, sink = MemoryReviewQueue(), MemoryVerdictSink()
    desk = ReviewDesk(queue, sink, settings.desk)
    with DeskServer(desk, settings.desk.host, settings.desk.port) as server:
        queue.push(review_records)            # the pairs the controller sends humans (route "review")
        result = sink.drain()                 # StageResult: ("verified" | "discarded", record)

With Kafka, `synpref desk` reads the review topic and writes the verified and discarded
topics (kafka_queue.py). docs/desk.md describes the page, the API and the guarantees.
"""

from synpref.services.desk.core import Decided, DeskCore, DeskError, aggregate, decide
from synpref.services.desk.queues import MemoryReviewQueue, MemoryVerdictSink, ReviewSource, VerdictSink
from synpref.services.desk.web import DeskServer, ReviewDesk, make_app, serve_in_thread

__all__ = [
    "Decided",
    "DeskCore",
    "DeskError",
    "DeskServer",
    "MemoryReviewQueue",
    "MemoryVerdictSink",
    "ReviewDesk",
    "ReviewSource",
    "VerdictSink",
    "aggregate",
    "decide",
    "make_app",
    "serve_in_thread",
]
