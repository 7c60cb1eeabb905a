"""Which CPUs a serving process's threads run on, when its model computes on CPU (`scorer.cpu_binding`).

On CPU the model's forwards are nearly all of the scorer's work, and the rest (gRPC, the event
loop, tokenizing) comes in short bursts, several per item. Left to the scheduler, a burst can
land on a core a forward is computing on, or torch's threads can spin on the core a burst
needs. Binding the forward threads to CPUs of their own and the serving threads to the others
keeps them apart, as vLLM's CPU backend binds its compute threads and reserves a core for its
frontend. Off by default: on a host of a few cores, a core reserved for serving is a large
share of the compute taken from the model, and on the 2-core machine it was measured on it
changed nothing beyond the noise (docs/scorer.md, "CPU binding").
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_CPULIST = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


@dataclass(frozen=True)
class CpuBinding:
    """CPUs for the forward threads (and torch's threads they start) and for everything else."""

    forward: frozenset[int]
    serving: frozenset[int]

    def torch_threads(self, configured: int) -> int:
        """Torch threads per forward thread: the configured count, or (0) one per forward CPU."""
        return configured or len(self.forward)


def parse_cpulist(text: str) -> frozenset[int]:
    """Linux's CPU list syntax ("1-3,6") as a set; ValueError for anything else or an empty range."""
    text = text.strip()
    if not _CPULIST.match(text):
        raise ValueError(f"not a CPU list (like 1-3,6): {text!r}")
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        lo, hi = int(first), int(last or first)
        if hi < lo:
            raise ValueError(f"empty CPU range {part!r} in {text!r}")
        cpus.update(range(lo, hi + 1))
    return frozenset(cpus)


def format_cpulist(cpus: frozenset[int]) -> str:
    """The set in Linux's CPU list syntax, ranges merged: {0, 1, 2, 5} -> "0-2,5"."""
    runs: list[list[int]] = []  # [first, last] of each run of consecutive CPUs
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def validate_mode(mode: str) -> str:
    """`off`, or a CPU list (the forward CPUs); raises ValueError otherwise."""
    if mode != "off":
        parse_cpulist(mode)
    return mode


def plan(mode: str, device: str, allowed: frozenset[int]) -> CpuBinding | None:
    """The binding `mode` asks for on `device`, given the CPUs this process may use; None: bind nothing.

    A CPU list: those CPUs compute, the other allowed ones serve (all of them serve too when the
    list is every allowed CPU). off, or any device but the CPU: None.
    """
    if mode == "off" or device != "cpu":
        return None
    forward = parse_cpulist(mode)
    if not forward <= allowed:
        raise ValueError(
            f"scorer.cpu_binding {mode!r} names CPUs this process may not use: {sorted(forward - allowed)} "
            f"(allowed: {sorted(allowed)})"
        )
    return CpuBinding(forward=forward, serving=(allowed - forward) or forward)


def allowed_cpus() -> frozenset[int]:
    """The CPUs the calling thread may run on (its cpuset)."""
    return frozenset(os.sched_getaffinity(0))


def bind_this_thread(cpus: frozenset[int]) -> None:
    """Restrict the calling thread (and the threads it starts from now on) to `cpus`."""
    os.sched_setaffinity(0, cpus)


def bind_compute_thread(cpus: frozenset[int], torch_threads: int) -> None:
    """Bind the calling thread to `cpus` and give its torch work `torch_threads` threads (torch's
    OpenMP threads start from this thread, so they inherit the binding; the count is this thread's:
    other threads of the process keep theirs)."""
    bind_this_thread(cpus)
    import torch

    torch.set_num_threads(torch_threads)


def usable_cpu_count(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """CPUs this process can keep busy: its cpuset, capped by a cgroup v2 CPU quota (a pod's CPU limit is a quota,
    not a cpuset, so the cpuset alone reports every CPU of the node)."""
    count = len(allowed_cpus())
    try:
        with open(os.path.join(cgroup_root, "cpu.max")) as fh:
            quota, period = fh.read().split()[:2]
        if quota != "max":
            count = min(count, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 CPU controller here: the cpuset decides
    return count
