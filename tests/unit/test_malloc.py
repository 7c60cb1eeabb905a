"""Which malloc a process runs on (shared/malloc.py) and what the scorer says of it at start."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from synpref.services.scorer.main import log_allocator
from synpref.shared.malloc import allocator_in

GLIBC_ONLY = """\
55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 123 /usr/bin/python3.11
7f1c2a000000-7f1c2a022000 r--p 00000000 08:01 456 /usr/lib/x86_64-linux-gnu/libc.so.6
7f1c2b000000-7f1c2b021000 rw-p 00000000 00:00 0
7ffd1e000000-7ffd1e021000 rw-p 00000000 00:00 0                          [stack]
"""


def test_a_mapped_allocator_library_names_the_allocator() -> None:
    tc = "7f1c29000000-7f1c29020000 r-xp 00000000 08:01 789 /usr/local/lib/libtcmalloc_minimal.so.4\n"
    je = "7f1c29000000-7f1c29020000 r-xp 00000000 08:01 789 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"
    assert allocator_in(GLIBC_ONLY + tc) == "tcmalloc"
    assert allocator_in(je + GLIBC_ONLY) == "jemalloc"
    assert allocator_in(GLIBC_ONLY) == "glibc"
    assert allocator_in("") == "glibc"


def test_a_directory_named_like_an_allocator_is_not_one() -> None:
    line = "7f1c29000000-7f1c29020000 r-xp 00000000 08:01 789 /opt/libtcmalloc-build/lib/libfoo.so\n"
    assert allocator_in(GLIBC_ONLY + line) == "glibc"


def test_a_python_without_a_preload_runs_on_glibc() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    code = "from synpref.shared.malloc import current_allocator; print(current_allocator())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "glibc"


@pytest.mark.parametrize(
    ("allocator", "device", "hint"),
    [("glibc", "cpu", True), ("glibc", "auto", True), ("glibc", "cuda:0", False), ("tcmalloc", "cpu", False)],
)
def test_the_scorer_hints_at_tcmalloc_only_where_a_cpu_model_runs_on_glibc(
    allocator: str, device: str, hint: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("synpref.shared.malloc.current_allocator", lambda: allocator)
    with caplog.at_level(logging.INFO, logger="synpref.scorer"):
        log_allocator(device)
    [message] = [r.getMessage() for r in caplog.records if r.name == "synpref.scorer"]
    assert message.startswith(f"memory allocator: {allocator}")
    assert ("LD_PRELOAD" in message) is hint
