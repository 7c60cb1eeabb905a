"""Kafka I/O on kafka-python: topic admin, payload codec, clients, the stage runner,
and a real local broker for tests and benchmarks (local_broker)."""
