"""A server row and the offline ceiling, interleaved on the CPU (scorer_load.py's CPU method).

On a shared VM the same forward pass costs 10-20% more CPU in one minute than in the next, so a
ceiling measured before and after a row still moves its ratio by +-5%. Here the row and the
ceiling take turns in short quanta instead: the server and its clients each run in a process of
their own, the ceiling in a third, and this process alternates them with SIGSTOP/SIGCONT
(quantum q: the row runs q, then the ceiling runs q, ...). Whatever the machine does at the scale
of seconds, both see it alike; the cost of a switch (caches refilled) is paid by both. What it
cannot remove is per process: two copies of the ceiling in turns (ceiling_against_itself, an A/A
test) still differed by up to 9% on a 2-core VM, so read one repeat's ratio with that spread.

Each side measures only its own CPU: the server's process time while the clients ran, the
ceiling's CPU around each of its forwards. The ceiling cycles through its globally sorted
batches in a shuffled order per pass until the row ends, so the part of a pass it reaches is not
biased toward short or long items. Throughput counts only the time each side was running;
latencies are not reported (a request's wall time includes the quanta its server was stopped).
CPU only: on a GPU, kernels keep running while a process is stopped.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Ceiling:
    """The offline pass to interleave: the model, the pre-tokenized items and how to batch them."""

    path: Path
    ids: list[list[int]]
    max_batch_tokens: int
    max_batch_items: int
    device: str
    dtype: str
    torch_threads: int
    binding: tuple[frozenset[int], int] | None = None
    seed: int = 0
    compile: bool = False


def _server_main(settings: Any, conn: Any) -> None:
    """The scorer, in its own process: report its address, then answer CPU readings until told to stop."""
    from scorer_load import FORWARD_MODEL, thread_cpu

    from synpref.services.scorer.server import BackgroundScorer

    with BackgroundScorer(settings) as bg:
        conn.send((bg.address, bg.http_url))
        batcher = bg.server.registry.get(FORWARD_MODEL).batcher
        while conn.recv() == "read":
            conn.send((time.process_time(), thread_cpu(), batcher.forwards))


def _ceiling_main(spec: Ceiling, conn: Any) -> None:
    """The offline pass, in its own process: batches of the global sort, in a shuffled order per
    pass, until told to stop; reports its CPU, items and forwards."""
    import torch
    from scorer_load import _bound, ceiling_backend

    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    with _bound(spec.binding):
        backend, batches = ceiling_backend(
            spec.path, spec.ids, spec.max_batch_tokens, spec.max_batch_items, spec.device, spec.dtype, spec.compile
        )
        rng = random.Random(spec.seed)
        conn.send("ready")
        conn.recv()  # go
        cpu, items, forwards, order = 0.0, 0, 0, []
        while not conn.poll():
            if not order:
                order = list(batches)
                rng.shuffle(order)
            batch = order.pop()
            c0 = time.process_time()
            backend.forward([spec.ids[i] for i in batch])
            cpu += time.process_time() - c0
            items += len(batch)
            forwards += 1
        conn.recv()  # stop
        padded = sum(len(b) * max(len(spec.ids[i]) for i in b) for b in batches)
        conn.send({"cpu": cpu, "items": items, "forwards": forwards, "batches": len(batches), "padded": padded})
        backend.close()


def take_turns(
    first: list[Any], second: list[Any], quantum_s: float, first_turn: Callable[[float], bool]
) -> tuple[float, float, int]:
    """Run the `first` processes while `first_turn(quantum_s)` waits, then, unless it returned True
    (done), stop them and run the `second` (stopped on entry) for `quantum_s`, and again. Returns the
    seconds each group ran and the second's turns; both groups are running on return."""
    first_s = second_s = 0.0
    turns = 0
    while True:
        t0 = time.perf_counter()
        done = first_turn(quantum_s)
        first_s += time.perf_counter() - t0
        if done:
            for p in second:
                os.kill(p.pid, signal.SIGCONT)
            return first_s, second_s, turns
        for p in reversed(first):
            os.kill(p.pid, signal.SIGSTOP)
        t0 = time.perf_counter()
        for p in second:
            os.kill(p.pid, signal.SIGCONT)
        time.sleep(quantum_s)
        for p in second:
            os.kill(p.pid, signal.SIGSTOP)
        second_s += time.perf_counter() - t0
        turns += 1
        for p in first:
            os.kill(p.pid, signal.SIGCONT)


def ceiling_against_itself(
    ceiling: Ceiling, seconds: float, quantum_s: float = 0.5
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two copies of the same ceiling, in turns for about `seconds`: an A/A test of this method.
    What their ratio moves by from repeat to repeat is the method's own spread on this machine."""
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    try:
        for k in range(2):
            conn, child = ctx.Pipe()
            proc = ctx.Process(target=_ceiling_main, args=(replace(ceiling, seed=ceiling.seed + k), child), daemon=True)
            proc.start()
            procs.append(proc)
            conns.append(conn)
        if any(c.recv() != "ready" for c in conns):
            raise RuntimeError("a ceiling process did not start")
        os.kill(procs[1].pid, signal.SIGSTOP)
        for c in conns:
            c.send("go")
        end = time.perf_counter() + seconds

        def a_turn(quantum: float) -> bool:
            time.sleep(quantum)
            return time.perf_counter() >= end

        a_s, b_s, turns = take_turns(procs[:1], procs[1:], quantum_s, a_turn)
        results = []
        for c in conns:
            c.send("stop")
            results.append(c.recv())
    finally:
        for p in procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGCONT)
            p.join(60)
            if p.is_alive():
                p.kill()
    results[0].update(wall=a_s, turns=turns)
    results[1].update(wall=b_s, turns=turns)
    return results[0], results[1]


def serve_and_drive(
    settings: Any,
    work: list[Any],
    concurrency: int,
    transport: str,
    ceiling: Ceiling,
    quantum_s: float = 0.5,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One server row (the scorer with `settings`, `concurrency` closed-loop clients sending `work`
    over `transport`) interleaved with `ceiling`. Returns (row, ceiling): the row's rewards,
    wall (running time only), cpu, per-thread CPU and forwards; the ceiling's cpu, items, forwards,
    wall (running time only) and turns."""
    from scorer_load import _client_process, cpu_by_thread

    ctx = mp.get_context("spawn")
    server_conn, child = ctx.Pipe()
    server = ctx.Process(target=_server_main, args=(settings, child), daemon=True)
    server.start()
    procs = [server]
    try:
        address, http_url = server_conn.recv()
        clients_conn, child = ctx.Pipe()
        target = http_url if transport == "http" else address
        clients = ctx.Process(target=_client_process, args=(child, target, work, concurrency, transport), daemon=True)
        clients.start()
        procs.append(clients)
        ceiling_conn, child = ctx.Pipe()
        offline = ctx.Process(target=_ceiling_main, args=(ceiling, child), daemon=True)
        offline.start()
        procs.append(offline)
        if clients_conn.recv() != "ready" or ceiling_conn.recv() != "ready":
            raise RuntimeError("the client or ceiling process did not start")

        server_conn.send("read")
        cpu0, threads0, forwards0 = server_conn.recv()
        os.kill(offline.pid, signal.SIGSTOP)
        ceiling_conn.send("go")  # taken up at its first turn
        clients_conn.send("go")
        row_s, ceiling_s, turns = take_turns([server, clients], [offline], quantum_s, clients_conn.poll)
        result = clients_conn.recv()
        server_conn.send("read")
        cpu1, threads1, forwards1 = server_conn.recv()
        ceiling_conn.send("stop")
        off = ceiling_conn.recv()
        server_conn.send("stop")
    finally:
        for p in procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGCONT)
        for p in reversed(procs):
            p.join(60)
            if p.is_alive():
                p.kill()
    result.update(wall=row_s, cpu=cpu1 - cpu0, forwards=forwards1 - forwards0)
    result["threads"] = cpu_by_thread(threads0, threads1)
    result["latencies"] = None  # they include the quanta the server was stopped
    off.update(wall=ceiling_s, turns=turns)
    return result, off
