"""Scorer under load: 64 concurrent single-item clients (how OpenRLHF calls a remote RM).

Model: a ~5M-parameter Qwen3-shaped reward model with random weights and a BPE tokenizer
trained on the texts themselves (testing.tiny). Texts: real hh-rlhf conversations
(../shared/data/hh-rlhf/harmless-base/test.jsonl.gz, conversation + chosen response).

Three figures, same model, same texts, same torch thread count:
  (a) naive server: the same gRPC server with batching off (max_batch_items=1,
      max_wait_ms=0): one forward per request, one at a time, as OpenRLHF's serve_rm does;
  (s) the scorer: cross-request dynamic batching, with its default max_batch_tokens (--scorer-budget);
  (b) offline ceiling: the texts pre-tokenized, sorted by length over the whole set and run
      in batches of the best of --budgets, no server, no tokenization in the timing. On CPU
      (--ceiling interleaved) it runs in turns with each server row, half a second each
      (benchmarks/interleave.py), so both see the same machine; on GPU (--ceiling beside) it
      runs before and after every server row, which is compared with the mean of the two.
Clients run in a separate process (grpc.aio, one item per request, closed loop), so the
server's event loop does not share a GIL with them. Run: .venv/bin/python benchmarks/scorer_load.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# testing/ (tiny models: test support, not installed) lives at the repo root.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"

Conversation = list[dict[str, str]]


# ------------------------------------------------------------------ load generator (child)


def drive(
    address: str,
    items: list[Conversation] | list[list[int]],
    concurrency: int,
    channels: int = 8,
    stream: bool = False,
    ready: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Send every item as its own Score request from `concurrency` closed-loop clients; with
    `stream`, each client holds one ScoreStream and sends each item as its next message. An item
    is a conversation, or its token ids (a list of ints: sent as TokenIds)."""
    import grpc

    from synpref.v1 import pair_pb2, reward_pb2, reward_pb2_grpc

    def item(x: Conversation | list[int]) -> reward_pb2.ScoreItem:
        if x and isinstance(x[0], int):
            return reward_pb2.ScoreItem(token_ids=reward_pb2.TokenIds(ids=x))
        messages = [pair_pb2.Message(**m) for m in x]  # type: ignore[arg-type]
        return reward_pb2.ScoreItem(conversation=reward_pb2.Conversation(messages=messages))

    requests = [reward_pb2.ScoreRequest(items=[item(x)]) for x in items]

    async def main() -> dict[str, Any]:
        chans = [
            grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(channels)
        ]
        stubs = [reward_pb2_grpc.RewardServiceStub(c) for c in chans]
        for stub in stubs:  # connect and warm every channel
            await stub.Score(requests[0], timeout=60, wait_for_ready=True)
        ready()
        latencies = [0.0] * len(requests)
        rewards = [0.0] * len(requests)
        batch_sizes = [0] * len(requests)
        cursor = iter(range(len(requests)))

        async def client(k: int) -> None:
            stub = stubs[k % len(stubs)]
            call = stub.ScoreStream(timeout=300) if stream else None
            for i in cursor:
                t = time.perf_counter()
                if call is None:
                    resp = await stub.Score(requests[i], timeout=300)
                else:
                    await call.write(requests[i])
                    resp = await call.read()
                latencies[i] = time.perf_counter() - t
                rewards[i] = resp.rewards[0]
                batch_sizes[i] = resp.metadata.batch_size
            if call is not None:
                await call.done_writing()
                await call.code()

        t0 = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(concurrency)))
        wall = time.perf_counter() - t0
        for c in chans:
            await c.close()
        return {"wall": wall, "latencies": latencies, "rewards": rewards, "batch_sizes": batch_sizes}

    return asyncio.run(main())


def drive_http(
    url: str, texts: list[str], concurrency: int, ready: Callable[[], None] = lambda: None
) -> dict[str, Any]:
    """OpenRLHF's way: POST /get_reward {"query": [one rendered text]} per request."""
    import aiohttp

    async def main() -> dict[str, Any]:
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(WARMUP_REQUESTS):
                async with session.post(url + "/get_reward", json={"query": [texts[0]]}) as resp:
                    resp.raise_for_status()
            ready()
            latencies = [0.0] * len(texts)
            rewards = [0.0] * len(texts)
            cursor = iter(range(len(texts)))

            async def client() -> None:
                for i in cursor:
                    t = time.perf_counter()
                    async with session.post(url + "/get_reward", json={"query": [texts[i]]}) as resp:
                        resp.raise_for_status()
                        body = await resp.json()
                    latencies[i] = time.perf_counter() - t
                    rewards[i] = body["rewards"][0]

            t0 = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(concurrency)))
            wall = time.perf_counter() - t0
        return {"wall": wall, "latencies": latencies, "rewards": rewards, "batch_sizes": [0] * len(texts)}

    return asyncio.run(main())


# ------------------------------------------------------------------ setup


def load_conversations(path: Path, n: int) -> list[Conversation]:
    from synpref.shared.sources import iter_pairs

    out: list[Conversation] = []
    for pair in iter_pairs(path):
        conv = list(pair["conversation"]) + list(pair["chosen"])
        if conv and conv[-1]["role"] == "assistant" and any(m["content"].strip() for m in conv):
            out.append(conv)
        if len(out) >= n:
            break
    return out


def build_model(out: Path, convs: list[Conversation], shape: dict[str, int]) -> Path:
    from testing.tiny import build_tiny_reward_model

    texts = [m["content"] for c in convs for m in c]
    return build_tiny_reward_model(out, arch="qwen3", texts=texts, **shape)


def param_count(path: Path) -> tuple[int, int]:
    """(all parameters, parameters outside the embedding)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path)
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    return total, total - embed


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


# ------------------------------------------------------------------ measurements


def offline_ceiling(
    path: Path,
    ids: list[list[int]],
    max_batch_tokens: int,
    max_batch_items: int,
    device: str,
    dtype: str,
    binding: tuple[frozenset[int], int] | None = None,
    compile: bool = False,
) -> dict[str, Any]:
    """Batched forwards over the pre-tokenized set, sorted by length globally; with `binding` (CPUs,
    torch threads), on the CPUs and with the threads the scorer's forward thread gets; with `compile`,
    through the compiled forward the scorer then serves (scorer.compile)."""
    import torch

    with _bound(binding):
        backend, batches = ceiling_backend(path, ids, max_batch_tokens, max_batch_items, device, dtype, compile)
        rewards = [0.0] * len(ids)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        for b in batches:
            for i, r in zip(b, backend.forward([ids[i] for i in b]), strict=True):
                rewards[i] = r
        sync()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        backend.close()
        padded = sum(len(b) * max(len(ids[i]) for i in b) for b in batches)
        return {"wall": wall, "cpu": cpu, "rewards": rewards, "forwards": len(batches), "padded": padded}


@contextlib.contextmanager
def _bound(binding: tuple[frozenset[int], int] | None) -> Iterator[None]:
    """This thread on `binding`'s CPUs with its torch threads for the block, as the scorer binds its forward thread."""
    if binding is None:
        yield
        return
    import torch

    from synpref.shared import cpus

    before, threads = cpus.allowed_cpus(), torch.get_num_threads()
    cpus.bind_compute_thread(*binding)
    try:
        yield
    finally:
        cpus.bind_compute_thread(before, threads)


def ceiling_backend(
    path: Path,
    ids: list[list[int]],
    max_batch_tokens: int,
    max_batch_items: int,
    device: str,
    dtype: str,
    compile: bool = False,
) -> tuple[Any, list[list[int]]]:
    """The ceiling's backend, warmed up, and its batches: the whole set sorted by length and cut as the server would."""
    from synpref.services.scorer.backends import TorchBackend
    from synpref.services.scorer.batcher import plan_batches
    from synpref.services.scorer.registry import overhead_tokens
    from synpref.shared.config import ScorerSettings

    backend = TorchBackend(str(path), device, dtype, compile)
    if compile and not backend.compiled:
        raise RuntimeError("--compile: the model did not compile (see the warning above)")
    overhead = overhead_tokens(ScorerSettings(device=device), backend)  # as the server would
    batches = plan_batches([len(x) for x in ids], max_batch_tokens, max_batch_items, overhead)
    backend.forward([ids[0]])  # warm-up
    return backend, batches


def _decoy_server(settings: Any, seconds_per_padded_token: float, conn: Any) -> None:
    """A scorer whose forwards sleep as long as the real ones take (no CPU), serving until told to stop."""
    from synpref.services.scorer.backends import make_backend
    from synpref.services.scorer.server import BackgroundScorer

    def sleeping(batch: list[list[int]]) -> list[float]:
        time.sleep(seconds_per_padded_token * len(batch) * max(len(x) for x in batch))
        return [0.0] * len(batch)

    def factory(kind: str, path: str, device: str, dtype: str, max_length: int, compile: bool) -> Any:
        backend = make_backend(kind, path, device, dtype, max_length)  # sleeps instead of forwards: nothing to compile
        backend.forward = sleeping  # type: ignore[method-assign]
        return backend

    with BackgroundScorer(settings, factory) as bg:
        conn.send(bg.address)
        conn.recv()


def offline_ceiling_neighbour_busy(
    path: Path,
    ids: list[list[int]],
    budget: int,
    args: argparse.Namespace,
    settings: Any,
    items: list[Conversation],
    seconds_per_padded_token: float,
) -> dict[str, Any]:
    """The ceiling's pass while the other cores carry what they carry while (s) serves: the same
    64 clients, against a decoy scorer in another process whose forwards sleep. On a 2-core machine
    the model's own CPU time per item rises when the neighbour core is busy (shared cache, memory
    bandwidth, clock), and (s) always runs beside its clients; this ceiling pays that too."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    decoy = ctx.Process(target=_decoy_server, args=(settings, seconds_per_padded_token, child), daemon=True)
    decoy.start()
    try:
        address = parent.recv()
        with ctx.Pool(1) as pool:
            pool.apply_async(drive, (address, items * 20, args.concurrency))
            time.sleep(3.0)  # the clients are connected and in their closed loop
            off = offline_ceiling(
                path, ids, budget, args.max_batch_items, args.device, args.dtype, args.binding, args.compile
            )
            pool.terminate()
    finally:
        parent.send("stop")
        decoy.join(60)
    return off


def thread_cpu() -> dict[tuple[int, str], float]:
    """CPU seconds of each live thread of this process so far, by (thread id, name): Python's name
    without its pool suffix ("scorer-best" for the forward thread of model "best"), else the OS's."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[tuple[int, str], float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            comm = (task / "comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat.rpartition(")")[2].split()
        tid = int(task.name)
        name = names.get(tid, f"native {comm}").rstrip("_0123456789")
        out[(tid, name)] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def cpu_by_thread(before: dict[tuple[int, str], float], after: dict[tuple[int, str], float]) -> dict[str, float]:
    """CPU seconds each thread name spent between two `thread_cpu()` readings."""
    out: dict[str, float] = {}
    for key, seconds in after.items():
        out[key[1]] = out.get(key[1], 0.0) + seconds - before.get(key, 0.0)
    return out


def _client_process(conn: Any, target: str, items: list[Any], concurrency: int, transport: str) -> None:
    """The clients, in a spawned process: connect and warm up, report ready, wait for go, run."""

    def ready() -> None:
        conn.send("ready")
        conn.recv()

    if transport == "http":
        result = drive_http(target, items, concurrency, ready)
    else:
        result = drive(target, items, concurrency, stream=transport.startswith("grpc-stream"), ready=ready)
    conn.send(result)


def serve_and_drive(
    settings: Any,
    items: list[Conversation],
    concurrency: int,
    texts: list[str] | None = None,
    around: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
    transport: str = "grpc",
    ids: list[list[int]] | None = None,
    client_processes: int = 1,
) -> dict[str, Any]:
    """Server in this process (its threads), clients in spawned ones. `cpu` is this
    process's CPU time while the clients ran, after they connected and warmed up: the
    serving cost, forwards included, and nothing of the harness (bare Processes and Pipes:
    no pool threads here). `around()` wraps the clients' run only (scorer_profile.py
    attaches a profiler there). transport: grpc (a unary Score per item), grpc-stream (each
    client sends its items on one ScoreStream), grpc-stream-ids (the same with each item's
    token ids `ids`, as a client sharing the model's tokenizer sends them) or http (`texts` to
    POST /get_reward). `client_processes` splits the clients and the items (every k-th)
    between that many processes: a Python gRPC client spends ~0.5 ms of CPU per request (measured
    on a 2-core CPU, docs/gpu.md), so one process of clients sends at most ~2,000 a second, which
    on a GPU could bound the rate instead of the scorer; then `wall` runs from "go" to the last
    process's answer."""
    from synpref.services.scorer.server import BackgroundScorer

    with BackgroundScorer(settings) as bg:
        ctx = mp.get_context("spawn")
        target = bg.http_url if transport == "http" else bg.address
        work = _work_for(transport, items, texts, ids)
        k = max(1, min(client_processes, concurrency, len(work)))
        conns, procs = [], []
        for j in range(k):
            parent, child = ctx.Pipe()
            share = concurrency // k + (1 if j < concurrency % k else 0)
            args = (child, target, work[j::k], share, transport)
            procs.append(ctx.Process(target=_client_process, args=args, daemon=True))
            procs[-1].start()
            conns.append(parent)
        try:
            if any(conn.recv() != "ready" for conn in conns):
                raise RuntimeError("a client process did not start")
            batcher = bg.server.registry.get().batcher
            forwards = batcher.forwards
            with around():
                c0, threads0 = time.process_time(), thread_cpu()
                t0 = time.perf_counter()
                for conn in conns:
                    conn.send("go")
                parts = [conn.recv() for conn in conns]
                wall = time.perf_counter() - t0
                cpu = time.process_time() - c0
                threads = cpu_by_thread(threads0, thread_cpu())
            result = _merge_clients(parts, len(work))
            # One process timed its own clients; several are timed from "go" to the last answer.
            result.update(wall=parts[0]["wall"] if k == 1 else wall, cpu=cpu, threads=threads)
            result["forwards"] = batcher.forwards - forwards
        finally:
            for proc in procs:
                proc.join(60)
        result["scored"] = len(items)
    return result


def _merge_clients(parts: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """The client processes' results as one: part j holds items j, j+k, j+2k, ... in order."""
    k = len(parts)
    merged: dict[str, Any] = {}
    for key in ("latencies", "rewards", "batch_sizes"):
        values = [0.0] * n
        for j, part in enumerate(parts):
            values[j::k] = part[key]
        merged[key] = values
    return merged


def _work_for(
    transport: str, convs: list[Conversation], texts: list[str] | None, ids: list[list[int]] | None
) -> list[Any]:
    """What the clients of `transport` send: rendered texts (http), token ids (grpc-stream-ids) or conversations."""
    return {"http": texts, "grpc-stream-ids": ids}.get(transport) or convs


WARMUP_REQUESTS = 8  # drive_http() warms its connections with this many requests


def summarize(name: str, wall: float, n: int, tokens: int, latencies: list[float] | None) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name, "wall_s": wall, "items_per_s": n / wall, "tokens_per_s": tokens / wall}
    row["mean_len"] = tokens / n
    if latencies and any(latencies):
        row["p50_ms"] = percentile(latencies, 0.50) * 1000
        row["p99_ms"] = percentile(latencies, 0.99) * 1000
        row["mean_ms"] = statistics.fmean(latencies) * 1000
    return row


def run(
    args: argparse.Namespace, build: Callable[[Path, list[Conversation]], Path], label: str
) -> list[dict[str, Any]]:
    """All three measurements, `args.repeats` times; `build(folder, conversations)` saves the model."""
    import torch

    from synpref.services.scorer.backends import resolve_device
    from synpref.services.scorer.encoding import Encoder
    from synpref.shared import cpus
    from synpref.shared.config import ModelRef, ScorerSettings
    from synpref.shared.modeling import load_reward_model

    if args.threads:
        torch.set_num_threads(args.threads)
    convs = load_conversations(Path(args.data), args.items)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="scorer-bench-"))
    args.workdir = str(work)
    path = build(work / label, convs)
    total, non_embed = param_count(path)
    base = {
        "port": 0,
        "http_port": 0,
        "metrics_port": 0,
        "models": {FORWARD_MODEL: ModelRef(path=str(path))},
        "device": args.device,
        "dtype": args.dtype,
        "compile": args.compile,
        "max_length": args.max_length,
        "max_batch_items": args.max_batch_items,
        "max_wait_ms": args.max_wait_ms,
        "max_queue": 100_000,
        "torch_threads": args.threads,
        "cpu_binding": args.cpu_binding,
    }
    # The ceiling computes where and as the scorer's forward thread does (scorer.cpu_binding: shared/cpus.py).
    binding = cpus.plan(args.cpu_binding, resolve_device(args.device), cpus.allowed_cpus())
    args.binding = None if binding is None else (binding.forward, binding.torch_threads(args.threads))

    _, tok = load_reward_model(str(path), "cpu", "float32")
    enc = Encoder(tok, args.max_length)
    t0 = time.perf_counter()
    ids = [enc.conversation(c) for c in convs]
    tokenize_s = time.perf_counter() - t0
    # HTTP clients (OpenRLHF) send text already rendered with the chat template.
    texts = [tok.apply_chat_template(c, tokenize=False) for c in convs]
    tokens = sum(len(x) for x in ids)
    lengths = sorted(len(x) for x in ids)
    print(
        f"[{label}] {len(convs)} hh-rlhf conversations, {tokens} tokens (median {lengths[len(lengths) // 2]}, "
        f"max {lengths[-1]}); model {total / 1e6:.2f}M params ({non_embed / 1e6:.2f}M outside the embedding); "
        f"device {args.device}, dtype {args.dtype}, torch threads {torch.get_num_threads()}, "
        f"CPU binding {_binding_text(args.binding)}; "
        f"tokenizing all items takes {tokenize_s * 1000:.0f} ms; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )

    # (b) is the best of several token budgets, so the ceiling is not handicapped by a
    # budget chosen for the server; the scorer runs with its own default budget (--scorer-budget). Chosen on
    # CPU time per item on CPU (robust to other processes' load), on wall time on GPU. Each
    # budget runs twice, in the order A B C C B A: a single pass each would pick whichever
    # budget ran while the machine was fastest (the same pass drifts by 10-20% within minutes).
    on_gpu = args.device.startswith("cuda")
    costs: dict[int, list[float]] = {budget: [] for budget in args.budgets}
    references: dict[int, list[float]] = {}
    for budget in [*args.budgets, *reversed(args.budgets)]:
        off = offline_ceiling(
            path, ids, budget, args.max_batch_items, args.device, args.dtype, args.binding, args.compile
        )
        costs[budget].append(off["wall"] if on_gpu else off["cpu"])
        references[budget] = off["rewards"]
        print(
            f"  offline, budget {budget:6d} tokens: {len(ids) / off['wall']:.1f} items/s, "
            f"{off['cpu'] / len(ids) * 1000:.1f} CPU ms/item",
            flush=True,
        )
    best_budget = min(args.budgets, key=lambda budget: statistics.fmean(costs[budget]))
    print(
        f"  ceiling budget: {best_budget} tokens; the scorer's max_batch_tokens: "
        f"{scorer_budget(args.scorer_budget, best_budget)} (--scorer-budget {args.scorer_budget})",
        flush=True,
    )
    method = args.ceiling if args.ceiling != "auto" else ("beside" if on_gpu else "interleaved")
    if method == "interleaved" and on_gpu:
        raise SystemExit("--ceiling interleaved is for CPU: a stopped process's GPU kernels keep running")
    reference = references[best_budget]
    settings = {
        "(a) naive server": ScorerSettings(**{**base, "max_batch_items": 1, "max_wait_ms": 0.0}),
        "(s) scorer": ScorerSettings(**{**base, "max_batch_tokens": scorer_budget(args.scorer_budget, best_budget)}),
    }

    # Each transport after the first is its own scorer row, run side by side in every repeat.
    runs = [] if args.skip_naive else [("(a) naive server", settings["(a) naive server"], args.transport[0])]
    runs += [(scorer_row(t, args.transport), settings["(s) scorer"], t) for t in args.transport]
    rows: list[dict[str, Any]] = []
    workload = Workload(path, convs, texts, ids, tokens, best_budget, reference)
    print(f"  ceiling method: {method}", flush=True)
    if args.ceiling_aa and method != "interleaved":
        print("  --ceiling-aa applies to --ceiling interleaved only: no A/A rows", flush=True)
    if args.client_processes > 1 and method == "interleaved":
        print("  --client-processes applies to --ceiling beside only: the clients run in one process", flush=True)
    for rep in range(args.repeats):
        repeat = _interleaved_repeat if method == "interleaved" else _beside_repeat
        rows += repeat(args, rep, runs, workload)
        if args.ceiling_neighbour_busy:
            ceiling = next(r for r in reversed(rows) if r["name"] == "(b) offline batched")
            per_token = ceiling["wall_s"] / ceiling["padded"]  # the decoy's forwards sleep as long as the real ones
            busy = offline_ceiling_neighbour_busy(
                path, ids, best_budget, args, settings["(s) scorer"], convs, per_token
            )
            rows.append(_ceiling_row(NEIGHBOUR_BUSY, busy, rep, len(ids), tokens, best_budget))
            _progress(rep, rows[-1])
    return rows


@dataclass(frozen=True)
class Workload:
    """What every repeat measures on: the model, the items in each client form, and the ceiling's
    budget and rewards (the budget sweep's pass at that budget)."""

    path: Path
    convs: list[Conversation]
    texts: list[str]
    ids: list[list[int]]
    tokens: int
    budget: int
    reference: list[float]


def _server_row(name: str, res: dict[str, Any], rep: int, w: Workload, budget: int) -> dict[str, Any]:
    """The report row of one server run (`res` from serve_and_drive), before its ceiling is added."""
    ids = w.ids
    diff = max(abs(a - b) for a, b in zip(res["rewards"], w.reference, strict=True))
    row = summarize(name, res["wall"], len(ids), w.tokens, res["latencies"])
    row.update(rep=rep, forwards=res["forwards"], max_abs_diff=diff, budget=budget)
    row["mean_batch"] = len(ids) / res["forwards"]  # items per forward, as offline
    row["cpu_ms_per_item"] = res["cpu"] / len(ids) * 1000
    # The forward thread's CPU is the model's cost inside the server; the rest is serving.
    forward = res["threads"].get(f"scorer-{FORWARD_MODEL}", 0.0) / len(ids) * 1000
    row["forward_cpu_ms_per_item"] = forward
    row["serving_cpu_ms_per_item"] = row["cpu_ms_per_item"] - forward
    return row


def _interleaved_repeat(
    args: argparse.Namespace, rep: int, runs: list[tuple[str, Any, str]], w: Workload
) -> list[dict[str, Any]]:
    """Every server row of one repeat, each in turns with its own ceiling (benchmarks/interleave.py)."""
    import interleave

    ids, tokens, budget = w.ids, w.tokens, w.budget
    spec = interleave.Ceiling(
        w.path,
        ids,
        budget,
        args.max_batch_items,
        args.device,
        args.dtype,
        args.threads,
        args.binding,
        seed=rep,
        compile=args.compile,
    )
    rows, ceilings = [], []
    for name, s, transport in runs:
        work = _work_for(transport, w.convs, w.texts, ids)
        res, off = interleave.serve_and_drive(s, work, args.concurrency, transport, spec, args.quantum_ms / 1000)
        row = _server_row(name, res, rep, w, s.max_batch_tokens)
        row["ceiling_cpu_ms_per_item"] = off["cpu"] / off["items"] * 1000
        row["ceiling_items_per_s"] = off["items"] / off["wall"]
        row["ceiling_turns"] = off["turns"]
        rows.append(row)
        ceilings.append(off)
        _progress(rep, row, f"; ceiling in turns with it {row['ceiling_cpu_ms_per_item']:.1f} CPU ms/item")
    done = sum(c["items"] for c in ceilings)
    total = {"wall": sum(c["wall"] for c in ceilings), "cpu": sum(c["cpu"] for c in ceilings)}
    # Per item of the set: the ceiling's pass over all len(ids) items, from the parts of passes it ran.
    mean = {"wall": total["wall"] / done * len(ids), "cpu": total["cpu"] / done * len(ids)}
    mean["forwards"] = ceilings[0]["batches"]
    row = _ceiling_row("(b) offline batched", mean, rep, len(ids), tokens, budget)
    row["padded"] = ceilings[0]["padded"]
    rows.append(row)
    _progress(rep, row, f" (in turns with the rows: {done / len(ids):.2f} passes)")
    if args.ceiling_aa:
        seconds = rows[0]["wall_s"] + ceilings[0]["wall"]  # as long as the first row took, turns included
        a, b = interleave.ceiling_against_itself(spec, seconds, args.quantum_ms / 1000)
        row = {"name": CEILING_AA, "rep": rep, "a_cpu_ms_per_item": a["cpu"] / a["items"] * 1000}
        row["b_cpu_ms_per_item"] = b["cpu"] / b["items"] * 1000
        row["ratio"] = row["a_cpu_ms_per_item"] / row["b_cpu_ms_per_item"]
        rows.append(row)
        print(
            f"  rep {rep} {CEILING_AA}: A / B CPU cost {row['ratio']:.3f} ({row['a_cpu_ms_per_item']:.1f}, "
            f"{row['b_cpu_ms_per_item']:.1f} CPU ms/item; {a['turns']} turns)",
            flush=True,
        )
    return rows


CEILING_AA = "(b/b) ceiling A/A"


def _beside_repeat(
    args: argparse.Namespace, rep: int, runs: list[tuple[str, Any, str]], w: Workload
) -> list[dict[str, Any]]:
    """Every server row of one repeat, with the ceiling run before and after each (GPU)."""
    # The ceiling runs before and after every server row, which counts against the mean of the
    # two passes beside it: on shared cores the same work's CPU time drifts by 10% and more
    # within a minute, so a ceiling measured once per repeat favours whichever row ran nearer it.
    path, ids, tokens, budget = w.path, w.ids, w.tokens, w.budget
    passes = [
        offline_ceiling(path, ids, budget, args.max_batch_items, args.device, args.dtype, args.binding, args.compile)
    ]
    w = replace(w, reference=passes[0]["rewards"])  # this repeat's own first pass, as before
    rows = []
    for name, s, transport in runs:
        res = serve_and_drive(
            s, w.convs, args.concurrency, w.texts, transport=transport, ids=ids, client_processes=args.client_processes
        )
        passes.append(
            offline_ceiling(
                path, ids, budget, args.max_batch_items, args.device, args.dtype, args.binding, args.compile
            )
        )
        row = _server_row(name, res, rep, w, s.max_batch_tokens)
        beside = passes[-2:]
        row["ceiling_cpu_ms_per_item"] = statistics.fmean(p["cpu"] for p in beside) / len(ids) * 1000
        row["ceiling_items_per_s"] = len(ids) / statistics.fmean(p["wall"] for p in beside)
        rows.append(row)
        _progress(rep, row)
    mean = {k: statistics.fmean(p[k] for p in passes) for k in ("wall", "cpu", "forwards")}
    row = _ceiling_row("(b) offline batched", mean, rep, len(ids), tokens, budget)
    row["cpu_ms_passes"] = [p["cpu"] / len(ids) * 1000 for p in passes]
    row["padded"] = passes[0]["padded"]
    rows.append(row)
    _progress(rep, row, " (passes: " + ", ".join(f"{x:.1f}" for x in row["cpu_ms_passes"]) + ")")
    return rows


def scorer_budget(choice: str, ceiling_budget: int) -> int:
    """The scorer's max_batch_tokens for --scorer-budget: its own default, the ceiling's best budget, or a number."""
    from synpref.shared.config import ScorerSettings

    if choice == "default":
        return ScorerSettings().max_batch_tokens
    return ceiling_budget if choice == "ceiling" else int(choice)


def _scorer_budget_choice(value: str) -> str:
    if value in ("default", "ceiling") or (value.isdigit() and int(value) >= 8):
        return value
    raise argparse.ArgumentTypeError(
        f"--scorer-budget is default, ceiling or a token count of at least 8; got {value!r}"
    )


def _binding_text(binding: tuple[frozenset[int], int] | None) -> str:
    from synpref.shared.cpus import format_cpulist

    return "off" if binding is None else f"forwards and ceiling on CPUs {format_cpulist(binding[0])}"


FORWARD_MODEL = "best"  # the served name; its batcher's thread is "scorer-best"


def scorer_row(transport: str, transports: list[str]) -> str:
    """The report name of the scorer's row for `transport`: the first one given is "(s) scorer"."""
    return "(s) scorer" if transport == transports[0] else f"(s) scorer, {transport}"


def _ceiling_row(name: str, off: dict[str, Any], rep: int, n: int, tokens: int, budget: int) -> dict[str, Any]:
    """A report row of an offline pass (its wall, cpu and forwards)."""
    row = summarize(name, off["wall"], n, tokens, None)
    row.update(rep=rep, forwards=off["forwards"], mean_batch=n / off["forwards"], budget=budget)
    row["cpu_ms_per_item"] = off["cpu"] / n * 1000
    return row


NEIGHBOUR_BUSY = "(b') ceiling, busy"


def _progress(rep: int, row: dict[str, Any], note: str = "") -> None:
    diff = f", max |reward - offline| {row['max_abs_diff']:.1e}" if "max_abs_diff" in row else ""
    if "forward_cpu_ms_per_item" in row:
        diff += f" (forward thread {row['forward_cpu_ms_per_item']:.1f}, serving {row['serving_cpu_ms_per_item']:.2f})"
    diff += note
    where = " (serving process)" if "forward_cpu_ms_per_item" in row else ""
    print(
        f"  rep {rep} {row['name']:20s}: {row['items_per_s']:6.1f} items/s, "
        f"{row['cpu_ms_per_item']:5.1f} CPU ms/item{where}{diff}; load {os.getloadavg()[0]:.1f}",
        flush=True,
    )


def report(rows: list[dict[str, Any]], flops_per_token: float | None = None, peak_flops: float | None = None) -> None:
    by_name: dict[str, list[dict[str, Any]]] = {}
    aa = [r["ratio"] for r in rows if r["name"] == CEILING_AA]
    for r in rows:
        if r["name"] != CEILING_AA:
            by_name.setdefault(r["name"], []).append(r)
    print(f"\nmedian over {len(next(iter(by_name.values())))} repeats:")
    head = ["items/s", "tokens/s", "CPU ms/it", "p50 ms", "p99 ms", "forwards", "mean batch", "budget"]
    print(f"  {'':22s} " + " ".join(f"{h:>10s}" for h in head) + ("  MFU" if flops_per_token and peak_flops else ""))
    med: dict[str, dict[str, float]] = {}
    for name, rs in by_name.items():
        m = {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
        med[name] = m
        cells = [
            f"{m['items_per_s']:10.1f}",
            f"{m['tokens_per_s']:10.0f}",
            f"{m['cpu_ms_per_item']:10.1f}",
            f"{m.get('p50_ms', float('nan')):10.1f}",
            f"{m.get('p99_ms', float('nan')):10.1f}",
            f"{m['forwards']:10.0f}",
            f"{m['mean_batch']:10.1f}",
            f"{m['budget']:10.0f}",
        ]
        extra = ""
        if flops_per_token and peak_flops:
            extra = f"  {m['tokens_per_s'] * flops_per_token / peak_flops * 100:.2f}%"
        print(f"  {name:22s} " + " ".join(cells) + extra)
    reps = {r["rep"] for r in rows}
    paired = {n: {r["rep"]: r for r in rs} for n, rs in by_name.items()}
    ratios: list[float] = []
    cpu: list[float] = []
    if {"(b) offline batched", "(s) scorer"} <= paired.keys():
        ps = paired["(s) scorer"]
        # Every server row carries the ceiling of the passes beside it (run()).
        ratios = [ps[k]["items_per_s"] / ps[k]["ceiling_items_per_s"] for k in sorted(reps) if k in ps]
        cpu = [ps[k]["ceiling_cpu_ms_per_item"] / ps[k]["cpu_ms_per_item"] for k in sorted(reps) if k in ps]
        print("\n  each scorer row against its ceiling (in turns with it, or the passes just before and after it):")
        print("  per repeat, scorer / ceiling throughput: " + ", ".join(f"{x:.3f}" for x in ratios))
        print("  per repeat, ceiling / scorer CPU cost:   " + ", ".join(f"{x:.3f}" for x in cpu))
        model = [ps[k]["forward_cpu_ms_per_item"] / ps[k]["ceiling_cpu_ms_per_item"] for k in sorted(reps) if k in ps]
        serving = [ps[k]["serving_cpu_ms_per_item"] for k in sorted(reps) if k in ps]
        print(
            "  per repeat, the scorer's forward thread / ceiling CPU cost: "
            + ", ".join(f"{x:.3f}" for x in model)
            + "; serving (all its other threads), CPU ms/item: "
            + ", ".join(f"{x:.2f}" for x in serving)
        )
        for other in sorted(n for n in paired if n.startswith("(s) scorer, ")):
            po = paired[other]
            cost = [po[k]["ceiling_cpu_ms_per_item"] / po[k]["cpu_ms_per_item"] for k in sorted(reps) if k in po]
            print(
                f"  per repeat, ceiling / {other[4:]} CPU cost: "
                + ", ".join(f"{x:.3f}" for x in cost)
                + f" (median {statistics.median(cost):.3f})"
            )
        if aa:
            print(
                "  per repeat, the ceiling against itself in turns (A/A: the method's own spread): "
                + ", ".join(f"{x:.3f}" for x in aa)
            )
        if NEIGHBOUR_BUSY in paired:
            pn = paired[NEIGHBOUR_BUSY]
            busy = [pn[k]["cpu_ms_per_item"] / ps[k]["cpu_ms_per_item"] for k in sorted(reps) if k in pn and k in ps]
            print(
                "  per repeat, ceiling with the clients running / scorer CPU cost: "
                + ", ".join(f"{x:.3f}" for x in busy)
                + f" (median {statistics.median(busy):.3f})"
            )
    a, b, s = (med.get(k) for k in ("(a) naive server", "(b) offline batched", "(s) scorer"))
    if ratios and cpu:
        throughput, cost = statistics.median(ratios), statistics.median(cpu)
        print(f"\n  scorer / ceiling (b), throughput          = {throughput:.3f}  (median; goal >= 0.95 on a GPU)")
        print(f"  ceiling (b) / scorer, CPU cost per item    = {cost:.3f}  (median; goal >= 0.95 on CPU)")
    if a and s:
        print(f"  scorer / naive server (a), throughput      = {s['items_per_s'] / a['items_per_s']:.3f}  (goal >= 5)")
    if a and b:
        print(f"  ceiling (b) / naive (a), throughput        = {b['items_per_s'] / a['items_per_s']:.3f}")


TRANSPORTS = ("grpc", "grpc-stream", "grpc-stream-ids", "http")


def _transports(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in TRANSPORTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"transports must be among {', '.join(TRANSPORTS)}; got {value!r}")
    return list(dict.fromkeys(names))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--items", type=int, default=512)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="processes the clients are split between (--ceiling beside only): on a GPU one process of 64 "
        "Python gRPC clients, not the scorer, could bound the rate",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads for every measurement (0 = default)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--cpu-binding",
        default="off",
        help="the scorer's scorer.cpu_binding (off, or the forward CPUs); the ceiling computes on the same CPUs",
    )
    p.add_argument("--dtype", default="float32")
    p.add_argument(
        "--compile", action="store_true", help="scorer.compile, and the ceiling through the same compiled forward"
    )
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--max-batch-items", type=int, default=64)
    p.add_argument(
        "--budgets",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[512, 2048, 8192],
        help="token budgets tried offline; the best is the ceiling (b) and the scorer's max_batch_tokens",
    )
    p.add_argument(
        "--scorer-budget",
        type=_scorer_budget_choice,
        default="default",
        help="the scorer's max_batch_tokens: default (its own setting, as deployed), ceiling (the budget the "
        "ceiling chose) or a token count; the ceiling always takes the best of --budgets",
    )
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument(
        "--transport",
        type=_transports,
        default=["grpc"],
        help="comma-separated, each a scorer row of its own (the first is '(s) scorer'): grpc: a unary Score "
        "call per item; grpc-stream: each client sends its items on one ScoreStream; http: OpenRLHF's POST "
        "/get_reward per item; grpc-stream-ids: grpc-stream with token ids (TokenIds) instead of conversations",
    )
    p.add_argument(
        "--ceiling-neighbour-busy",
        action="store_true",
        help="also time the ceiling while the clients load a decoy scorer whose forwards sleep (b')",
    )
    p.add_argument(
        "--ceiling",
        choices=("auto", "interleaved", "beside"),
        default="auto",
        help="how (b) is timed against each server row: interleaved (in turns, --quantum-ms each; CPU only) or "
        "beside (a pass before and after the row); auto: interleaved on CPU, beside on GPU",
    )
    p.add_argument("--quantum-ms", type=float, default=500.0, help="the turn length of --ceiling interleaved")
    p.add_argument(
        "--ceiling-aa",
        action="store_true",
        help="with --ceiling interleaved, also run two copies of the ceiling in turns each repeat (an A/A test: "
        "how far the method's ratio moves when both sides do the same work)",
    )
    p.add_argument("--workdir", default="")
    p.add_argument("--json", default="", help="also write the rows here")
    return p


TINY_QWEN3 = {"layers": 6, "hidden": 256, "heads": 4, "kv_heads": 2, "intermediate": 512, "vocab_size": 4000}
SHAPES = {
    "tiny": TINY_QWEN3,  # 4.57M parameters: the figure
    # 11M parameters, ~2.7x the compute per token: shows how the fixed cost of a request weighs
    # against a larger model's forward (real reward models are 100x larger still).
    "small": {"layers": 6, "hidden": 384, "heads": 6, "kv_heads": 3, "intermediate": 1024, "vocab_size": 4000},
}


def main() -> int:
    p = parser()
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="the random Qwen3-shaped model's size")
    args = p.parse_args()
    if not Path(args.data).exists():
        print(f"data not found: {args.data}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    shape = SHAPES[args.shape]
    rows = run(args, lambda out, convs: build_model(out, convs, shape), f"{args.shape}-qwen3")
    report(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
