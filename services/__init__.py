"""Deployable services: each a thin shell binding a pure stage function to Kafka and gRPC."""
