"""Test support and developer tools; part of the source checkout, never of the wheel.

setup.py packages only shared/, services/, training/ and client/, so nothing here ships.
Tests import it through pytest's `pythonpath = ["."]`; benchmarks put the repo root on
sys.path themselves; `python -m testing.<module>` works from the repo root.

  local_kafka       a real single-node Apache Kafka broker from the jars `make kafka` fetched
  tiny              tiny locally built tokenizers and random reward models (hub-free checkpoints)
  controller_fakes  a bag-of-words RM, a hashing embedder and synthetic pairs for loop tests
  fake_judges       a deterministic OpenAI-compatible chat server with scripted failure modes
  group_consumer    fakes of kafka-python's consumer and producer, with its signatures and futures
  judge_server      a real one: `transformers serve` over tiny random chat LMs built on the spot
  passthrough       the pass-through stage and service (the plumbing's own cost)
  wait              wait_until: poll a condition with a deadline instead of sleeping
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
"""The source checkout; child processes that run `python -m testing.<module>` need it on PYTHONPATH."""
