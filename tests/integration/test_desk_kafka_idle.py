"""An idle desk whose broker goes away and comes back: /readyz follows it (KafkaDeskQueues' metadata request).

The broker is a private LocalKafka, not the session's: this test stops it.
"""

from __future__ import annotations

import atexit
import json
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from kafka_broker import make_unique_topics

from synpref.services.desk import ReviewDesk, serve_in_thread
from synpref.services.desk.kafka_queue import KafkaDeskQueues
from synpref.shared.config import DeskSettings, KafkaSettings
from testing.local_kafka import LocalKafka
from testing.wait import wait_until

pytestmark = pytest.mark.integration
TOKENS = {"a": "a-token-0123456789abcdef-ghijklmn"}
UNREADY_AFTER_S = 4.0  # idle: a metadata request every 1 s, each given 1 s


class RestartableKafka(LocalKafka):
    """A LocalKafka that stops and starts again on the same ports and data."""

    def __init__(self) -> None:
        super().__init__(keep_dir=True)

    def restart(self) -> None:
        assert self.dir is not None and self.process is None
        with (self.dir / "stdout.log").open("ab") as out:
            self.process = subprocess.Popen(
                self._java("kafka.Kafka", str(self.dir / "server.properties")),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        atexit.register(self.stop)
        self._wait_ready()

    def remove(self) -> None:
        self.keep_dir = False
        self.stop()


def readyz(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_an_idle_desk_is_unready_while_its_broker_is_gone() -> None:
    broker = RestartableKafka().start()
    try:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        topics = make_unique_topics(kafka, "desk-idle")
        queues = KafkaDeskQueues(kafka, topics, "g-desk-idle", unready_after_s=UNREADY_AFTER_S)
        desk = ReviewDesk(queues.source, queues.sink, DeskSettings(), tokens=TOKENS)
        with serve_in_thread(desk) as server:
            wait_until(lambda: queues.runner.consumer is not None, 30, "the desk's Kafka clients")
            assert readyz(server.url) == (200, {"status": "ready"})
            gone = time.monotonic()
            broker.stop()  # nothing arrives and nobody decides: no Kafka operation fails
            wait_until(lambda: readyz(server.url)[0] == 503, UNREADY_AFTER_S + 15, "/readyz to answer 503")
            noticed_s = time.monotonic() - gone
            # unready_after_s after the broker was last heard from, at most a request interval and a tick (1.5 s)
            # before it went; the broker's shutdown, the ticks and a loaded machine add to that.
            assert UNREADY_AFTER_S - 2 <= noticed_s <= UNREADY_AFTER_S + 5, noticed_s
            reason = readyz(server.url)[1]["reason"]
            # The idle desk's metadata probe times out; on a loaded machine kafka-python's poll may meet the dropped
            # connection first (KafkaConnectionError from `read`): either names the broker as the cause.
            metadata = reason.startswith("Kafka metadata failing for ") and "KafkaTimeoutError" in reason
            read = reason.startswith("Kafka read failing for ") and "KafkaConnectionError" in reason
            assert metadata or read, reason
            broker.restart()
            wait_until(lambda: readyz(server.url)[0] == 200, 30, "/readyz to answer 200 again")
    finally:
        broker.remove()
