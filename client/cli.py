"""`synpref score`: score pairs or conversations against a running scorer.

    synpref score pairs ../shared/data/hh-rlhf/harmless-base/test.jsonl.gz -o scored.jsonl
    synpref score items conversations.jsonl --model gold
    synpref score info

pairs: any pair file shared.sources reads (hh-rlhf, PandaLM, LLMBar, RM-Bench, Skywork-style
chosen/rejected lists, ...); writes one JSON line per pair with reward_chosen,
reward_rejected, p = sigmoid(r_chosen - r_rejected), version (the served model's: a reload or rolling update during
the run changes it, and stderr warns) and locator: `path#row`, plus `/sub` for one pair of a record of several
(RM-Bench's "c0-r2"), row the 0-based record index (JSON lines: line number - 1). Rows that are no pair are counted
on stderr under the same locator, never guessed at.
items: JSON lines, each a message list, {"messages": [...]}, {"text": rendered text} or {"token_ids": [...]};
writes {"reward": r, "line": n} per item (n: its input line), in order.
Both keep --concurrency requests in flight and write their results in input order: a file of any size runs in
bounded memory, and a failure keeps the lines written before it (stderr says how many). --timeout bounds each
request (retries included), not the run: a large file takes as long as it takes.
The address defaults to scoring.scorer_address of the settings (--config / SYNPREF_*).
An output that is the input (or one of the files of an input folder) is refused before either is opened.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from itertools import chain, islice
from pathlib import Path
from typing import Any, TextIO, TypeVar

import grpc

from synpref.client.channel import MAX_TIMEOUT_S
from synpref.client.client import RewardClient
from synpref.client.messages import Item, PairDict, TokenIds, to_item

T = TypeVar("T")
R = TypeVar("R")
ItemT = TypeVar("ItemT", bound=Item)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse `synpref score` options and its subcommand (pairs, items or info); the options go before or after it."""
    p = argparse.ArgumentParser(prog="synpref score", description="Score pairs or conversations with a running scorer.")
    _options(p, after=False)
    sub = p.add_subparsers(dest="what", required=True)
    after = argparse.ArgumentParser(add_help=False)
    _options(after, after=True)
    pairs = sub.add_parser("pairs", parents=[after], help="score preference pairs from a file")
    pairs.add_argument("path")
    pairs.add_argument("--format", default=None, help="force a shared.sources format (auto-detected otherwise)")
    pairs.add_argument("-o", "--output", default="-", help="JSON lines out (default stdout)")
    items = sub.add_parser("items", parents=[after], help="score conversations or rendered texts from JSON lines")
    items.add_argument("path", help="JSON lines file, or - for stdin")
    items.add_argument("-o", "--output", default="-")
    sub.add_parser("info", parents=[after], help="print the served models (with --model: that one)")
    return p.parse_args(argv)


def _options(p: argparse.ArgumentParser, after: bool) -> None:
    """The options of every subcommand. The docs write them after it too (`items x.jsonl --model gold`), which
    argparse refused; there a default is SUPPRESS, so that it does not overwrite a value given before the name."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if after else value

    p.add_argument("--config", default=default(None), help="YAML settings file (for scoring.scorer_address)")
    p.add_argument("--address", default=default(None), help="scorer host:port (default: scoring.scorer_address)")
    p.add_argument("--model", default=default(""), help="served model name (default: the server's default)")
    p.add_argument("--timeout", type=float, default=default(600.0), help="seconds per request, its retries included")
    p.add_argument("--chunk-size", type=int, default=default(256), help="items per request")
    p.add_argument(
        "--concurrency",
        type=int,
        default=default(4),
        help="requests in flight at once (the server batches them together)",
    )


def read_numbered_items(stream: TextIO) -> Iterator[tuple[int, Item]]:
    """(line number, item) of each non-blank JSON line: a message list, `{"messages": [...]}`, `{"text": ...}` or
    `{"token_ids": [...]}`; ValueError otherwise."""
    for n, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            value: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {n}: not JSON: {exc}") from None
        if isinstance(value, dict) and isinstance(value.get("text"), str):
            yield n, value["text"]
        elif isinstance(value, dict) and isinstance(value.get("messages"), list):
            yield n, _checked(n, value["messages"])
        elif isinstance(value, dict) and _int_list(value.get("token_ids")):
            yield n, _checked(n, TokenIds(value["token_ids"]))
        elif isinstance(value, list):
            yield n, _checked(n, value)
        else:
            raise ValueError(
                f'line {n}: expected a message list, {{"messages": [...]}}, {{"text": "..."}} or {{"token_ids": [...]}}'
            )


def _checked(n: int, item: ItemT) -> ItemT:
    """`item`, or ValueError naming line `n` when no request can hold it: a message that is no {role, content} of
    strings, an id outside int32 (found when the line is read: from the request it failed in a worker thread, without
    the line, after the requests before it were scored)."""
    try:
        to_item(item)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"line {n}: {exc}") from None
    return item


def _int_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)


def _batches(values: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(values)
    while batch := list(islice(it, size)):
        yield batch


def _in_order(
    pool: ThreadPoolExecutor, call: Callable[[list[T]], R], chunks: Iterator[list[T]], ahead: int
) -> Iterator[tuple[list[T], R]]:
    """(chunk, call(chunk)) in input order, `ahead` calls in flight: memory is bounded by them, not by the file.
    A failed call raises once every chunk before it is yielded; the calls after it are cancelled."""
    pending: deque[tuple[list[T], Future[R]]] = deque()
    try:
        while True:
            while len(pending) < ahead and (chunk := next(chunks, None)) is not None:
                pending.append((chunk, pool.submit(call, chunk)))
            if not pending:
                return
            chunk, future = pending.popleft()
            yield chunk, future.result()
    finally:
        for _, future in pending:
            future.cancel()


def _refuse_overwrite(inputs: Iterable[Path], output: str) -> None:
    """ValueError when `output` is one of `inputs` (by inode: a symlink or another spelling of the path too): opening
    it for writing would truncate the input while it is being read."""
    if output == "-" or not os.path.exists(output):
        return
    for path in inputs:
        if os.path.samefile(path, output):
            raise ValueError(f"output {output} is the input {path}: write the scores to another file")


@contextmanager
def _output(path: str, batches: Iterator[list[T]]) -> Iterator[tuple[TextIO, Iterator[list[T]]]]:
    """The output stream and the batches, the first read before the output is truncated (a missing or unreadable
    input fails with the old output intact); written lines are flushed batch by batch by the caller."""
    first = next(batches, [])
    rest = chain([first], batches)
    if path == "-":
        yield sys.stdout, rest
        return
    with open(path, "w", encoding="utf-8") as out:
        yield out, rest


def main(argv: list[str]) -> int:
    """`synpref score`: run the subcommand against the scorer; 1 for a gRPC error, 2 for bad input or settings,
    141 when the reader of stdout closed it (`| head`)."""
    args = parse_args(argv)
    # NaN and inf passed `> 0`, and then every request failed at once as DEADLINE_EXCEEDED, "no answer" (exit 1).
    if args.concurrency < 1 or args.chunk_size < 1 or not 0 < args.timeout <= MAX_TIMEOUT_S:
        print(
            f"synpref score: --concurrency and --chunk-size must be >= 1 and --timeout > 0 and <= {MAX_TIMEOUT_S:g}",
            file=sys.stderr,
        )
        return 2
    try:
        address = args.address
        if not address:
            from synpref.shared.config import load_settings

            address = load_settings(args.config).scoring.scorer_address  # a bad file: ConfigError, a ValueError
        with RewardClient(address, model=args.model, timeout=args.timeout, chunk_size=args.chunk_size) as client:
            if args.what == "info":
                for m in client.info(args.model).models:
                    print(
                        json.dumps(
                            {
                                "name": m.name,
                                "model_id": m.model_id,
                                "version": m.version,
                                "backend": m.backend,
                                "dtype": m.dtype,
                                "max_length": m.max_length,
                            }
                        )
                    )
                return 0
            if args.what == "pairs":
                return score_pairs(client, args)
            return score_items(client, args)
    except grpc.RpcError as exc:
        print(f"synpref score: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `synpref score pairs x | head`: the reader has what it wanted. Exit as a process SIGPIPE ends does
        # (128 + 13), and point stdout at /dev/null so that the interpreter's last flush of what is still
        # buffered does not print "Exception ignored ... BrokenPipeError".
        _quiet_stdout()
        return 141
    except (ValueError, OSError) as exc:
        print(f"synpref score: {exc}", file=sys.stderr)
        return 2


def _quiet_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # a stdout with no file descriptor (embedded, captured): nothing to flush there
        pass


def score_pairs(client: RewardClient, args: argparse.Namespace) -> int:
    """Score the pairs of a source file and write one JSON line per pair (rewards and p), batch by batch in
    input order: a failure keeps what was written before it.

    Rows that are no pair are counted (the first ten printed) on stderr.
    """
    from synpref.shared.source_files import source_files
    from synpref.shared.sources import iter_source

    bad = scored = agree = 0
    versions: set[str] = set()
    _refuse_overwrite(source_files(Path(args.path)), args.output)

    def pairs() -> Iterator[tuple[str, PairDict]]:
        nonlocal bad
        for r in iter_source(Path(args.path), fmt=args.format):
            if r.pair is not None:
                yield r.locator, r.pair
                continue
            if bad < 10:
                print(f"not a pair: {r.locator}: {r.error}", file=sys.stderr)
            bad += 1

    def call(chunk: list[tuple[str, PairDict]]) -> list[Any]:
        return client.score_pairs([pair for _, pair in chunk], timeout=args.timeout)

    try:
        with (
            _output(args.output, _batches(pairs(), max(1, args.chunk_size // 2))) as (out, chunks),
            _pool(args.concurrency) as pool,
        ):
            for chunk, scores in _in_order(pool, call, chunks, args.concurrency):
                for (locator, pair), s in zip(chunk, scores, strict=True):
                    meta = {k: pair[k] for k in ("source",) if k in pair}
                    rewards = {"reward_chosen": s.reward_chosen, "reward_rejected": s.reward_rejected, "p": s.p}
                    row = {**meta, **rewards, "version": s.version, "locator": locator}
                    versions.add(s.version)
                    out.write(_json_line(row))
                out.flush()
                scored += len(scores)
                agree += sum(s.p > 0.5 for s in scores)
    finally:  # on an error too: what was written, for a rerun on the rest
        print(f"scored {scored} pairs ({bad} rows were no pair); p > 0.5 on {agree}", file=sys.stderr)
        if len(versions) > 1:  # the figures above mix models: say so, not only in each line
            print(
                f"warning: scored by several model versions {sorted(versions)}: see each line's version",
                file=sys.stderr,
            )
    return 0


@contextmanager
def _pool(workers: int) -> Iterator[ThreadPoolExecutor]:
    """Threads for the blocking client's calls; on leaving, queued calls are cancelled and running ones are not
    waited for (the client's channel closes next, which ends them)."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="synpref-score")
    try:
        yield pool
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _json_line(row: dict[str, Any]) -> str:
    """One output line; a diverged model's NaN or infinite reward is null: Python's `NaN` is no JSON, and strict
    readers (jq, Go, JavaScript) reject the whole file."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}) + "\n"


def score_items(client: RewardClient, args: argparse.Namespace) -> int:
    """Score the items of a JSON lines file (or stdin) and write one `{"reward", "line"}` line per item, batch by batch
    in input order: a failure keeps what was written before it."""
    scored = 0
    _refuse_overwrite([] if args.path == "-" else [Path(args.path)], args.output)

    def call(chunk: list[tuple[int, Item]]) -> list[float]:
        return client.score([item for _, item in chunk], timeout=args.timeout)

    try:
        with (
            nullcontext(sys.stdin) if args.path == "-" else open(args.path, encoding="utf-8") as stream,
            _output(args.output, _batches(read_numbered_items(stream), args.chunk_size)) as (out, chunks),
            _pool(args.concurrency) as pool,
        ):
            for chunk, rewards in _in_order(pool, call, chunks, args.concurrency):
                # The input's line: blank lines are skipped, so the output's line number is not the input's.
                for (line, _), r in zip(chunk, rewards, strict=True):
                    out.write(_json_line({"reward": r, "line": line}))
                out.flush()
                scored += len(chunk)
    finally:
        print(f"scored {scored} items", file=sys.stderr)
    return 0
