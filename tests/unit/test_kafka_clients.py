"""Config -> kafka-python client settings: delivery guarantees and external-cluster security."""

import pytest

from synpref.shared.config import KafkaSettings, load_settings
from synpref.shared.kafka.clients import consumer_config, producer_config


def test_producer_is_idempotent_and_waits_for_all_replicas():
    config = producer_config(KafkaSettings(bootstrap_servers="a:1, b:2", max_message_bytes=2048))
    assert config["bootstrap_servers"] == ["a:1", "b:2"]
    assert config["acks"] == "all"
    assert config["enable_idempotence"] is True
    assert config["max_in_flight_requests_per_connection"] <= 5
    assert config["retries"] > 0
    assert config["max_request_size"] == 2048
    assert producer_config(KafkaSettings(), linger_ms=0)["linger_ms"] == 0


def test_consumer_commits_by_hand_in_batches_of_max_batch():
    config = consumer_config(KafkaSettings(max_batch=17), "group-x")
    assert config["group_id"] == "group-x"
    assert config["enable_auto_commit"] is False
    assert config["max_poll_records"] == 17
    assert config["auto_offset_reset"] == "earliest"


def test_sasl_ssl_settings_reach_every_client(monkeypatch, tmp_path):
    ca = tmp_path / "ca.pem"
    monkeypatch.setenv("SYNPREF_KAFKA__BOOTSTRAP_SERVERS", "broker.example:9093")
    monkeypatch.setenv("SYNPREF_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("SYNPREF_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("SYNPREF_KAFKA__SASL_USERNAME", "svc")
    monkeypatch.setenv("SYNPREF_KAFKA__SASL_PASSWORD", "s3cret")
    monkeypatch.setenv("SYNPREF_KAFKA__SSL_CAFILE", str(ca))
    kafka = load_settings().kafka
    for config in (producer_config(kafka), consumer_config(kafka, "g")):
        assert config["bootstrap_servers"] == ["broker.example:9093"]
        assert config["security_protocol"] == "SASL_SSL"
        assert config["sasl_mechanism"] == "SCRAM-SHA-512"
        assert (config["sasl_plain_username"], config["sasl_plain_password"]) == ("svc", "s3cret")
        assert config["ssl_cafile"] == str(ca)


def test_plaintext_sends_no_security_options():
    config = producer_config(KafkaSettings())
    assert config["security_protocol"] == "PLAINTEXT"
    assert not any(key.startswith(("sasl_", "ssl_")) for key in config)


@pytest.mark.parametrize("bad", [{"security_protocol": "TLS"}, {"max_batch": 0}])
def test_invalid_kafka_settings_fail_loudly(bad):
    from synpref.shared.config import ConfigError

    with pytest.raises(ConfigError):
        load_settings(kafka=bad)


def test_local_broker_cluster_ids_never_start_with_a_dash():
    # StorageTool reads "-t -abc..." as an option: such an id made a broker start fail at random.
    from testing.local_kafka import new_cluster_id

    ids = [new_cluster_id() for _ in range(5000)]  # ~78 would start with "-" if nothing prevented it
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)
