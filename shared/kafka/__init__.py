"""Kafka I/O on kafka-python: topic admin, payload codec, clients and the stage runner.

The local broker for tests and benchmarks is test support: testing/local_kafka.py in the source checkout."""
