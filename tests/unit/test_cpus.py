"""shared/cpus.py: the CPU list syntax, the binding plan, and binding a real thread."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from pydantic import ValidationError

from synpref.shared.config import ScorerSettings
from synpref.shared.cpus import (
    CpuBinding,
    bind_compute_thread,
    format_cpulist,
    parse_cpulist,
    plan,
)

FOUR = frozenset({0, 1, 2, 3})


@pytest.mark.parametrize(
    "text,cpus",
    [("0", {0}), ("0-3", {0, 1, 2, 3}), ("1,3-4,7", {1, 3, 4, 7}), (" 2-2 ", {2})],
)
def test_cpu_lists_parse_and_format_back(text: str, cpus: set[int]) -> None:
    assert parse_cpulist(text) == cpus
    assert parse_cpulist(format_cpulist(frozenset(cpus))) == cpus
    assert format_cpulist(frozenset({0, 1, 2, 5, 7, 8})) == "0-2,5,7-8"


@pytest.mark.parametrize("text", ["", "a", "1,,2", "3-1", "-1", "1-", "0x1"])
def test_bad_cpu_lists_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpulist(text)


@pytest.mark.parametrize(
    "mode,device,allowed",
    [("off", "cpu", FOUR), ("1-3", "cuda", FOUR), ("1-3", "cuda:0", FOUR), ("1-3", "vllm", FOUR)],
)
def test_off_or_a_gpu_binds_nothing(mode: str, device: str, allowed: frozenset[int]) -> None:
    assert plan(mode, device, allowed) is None


def test_a_cpu_list_names_the_forward_cpus_and_the_rest_serve() -> None:
    assert plan("2-3", "cpu", FOUR) == CpuBinding(forward=frozenset({2, 3}), serving=frozenset({0, 1}))
    assert plan("0", "cpu", FOUR) == CpuBinding(forward=frozenset({0}), serving=frozenset({1, 2, 3}))
    assert plan("0-3", "cpu", FOUR) == CpuBinding(forward=FOUR, serving=FOUR)
    with pytest.raises(ValueError, match=r"may not use: \[5\]"):
        plan("3,5", "cpu", FOUR)


def test_settings_refuse_a_bad_mode() -> None:
    assert ScorerSettings().cpu_binding == "off"
    assert ScorerSettings(cpu_binding="1-3").cpu_binding == "1-3"
    with pytest.raises(ValidationError, match="not a CPU list"):
        ScorerSettings(cpu_binding="auto")


def test_binding_a_compute_thread_leaves_the_calling_thread_alone() -> None:
    allowed = frozenset(os.sched_getaffinity(0))
    target = frozenset({max(allowed)})
    threads_before = torch.get_num_threads()
    seen: dict[str, object] = {}

    def compute() -> None:
        bind_compute_thread(target, 1)
        seen["affinity"] = frozenset(os.sched_getaffinity(0))
        seen["threads"] = torch.get_num_threads()
        inner = threading.Thread(target=lambda: seen.update(child=frozenset(os.sched_getaffinity(0))))
        inner.start()
        inner.join()

    worker = threading.Thread(target=compute)
    worker.start()
    worker.join()
    assert seen == {"affinity": target, "threads": 1, "child": target}  # threads it starts inherit it
    assert frozenset(os.sched_getaffinity(0)) == allowed
    assert torch.get_num_threads() == threads_before
