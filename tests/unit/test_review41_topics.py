"""Review 41, topics: what `synpref topics` asks the cluster for, against a fake admin client."""

from typing import Any

import pytest

from synpref.shared.config import KafkaSettings
from synpref.shared.kafka import admin as topic_admin


class FakeAdmin:
    """Records create_topics; every topic is new."""

    def __init__(self) -> None:
        self.created: dict[str, dict[str, Any]] = {}

    def create_topics(self, topics: dict[str, dict[str, Any]], **_: Any) -> dict[str, Any]:
        self.created.update(topics)
        return {"topics": [{"name": name, "error_code": 0} for name in topics]}

    def wait_for_topics(self, names: list[str], **_: Any) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def fake_admin(monkeypatch: pytest.MonkeyPatch) -> FakeAdmin:
    fake = FakeAdmin()
    monkeypatch.setattr(topic_admin, "make_admin", lambda *args, **kwargs: fake)
    return fake


def test_replicated_topics_need_two_in_sync_replicas_for_acks_all(fake_admin: FakeAdmin) -> None:
    """With the broker's default min.insync.replicas=1, acks=all is acknowledged by a leader whose followers
    fell behind, and the record is lost with that broker: 3 replicas must mean 2 in sync."""
    kafka = KafkaSettings(replication_factor=3)
    assert topic_admin.ensure_topics(kafka, ["a"]) == {"a": "created"}
    assert fake_admin.created["a"]["replication_factor"] == 3
    assert fake_admin.created["a"]["configs"]["min.insync.replicas"] == "2"


def test_unreplicated_topics_leave_min_insync_replicas_to_the_broker(fake_admin: FakeAdmin) -> None:
    topic_admin.ensure_topics(KafkaSettings(), ["a"], replication_factor=1)
    assert "min.insync.replicas" not in fake_admin.created["a"]["configs"]
