"""`synpref eval`: pairwise accuracy of a reward model on pair files, and RM-Bench.

    synpref eval --model artifacts/rm/final --pairs eval.parquet --pairs more.jsonl
    synpref eval --model artifacts/rm/final --rmbench ../shared/data/RM-Bench
    synpref eval --model ... --hh-rlhf ../shared/data/hh-rlhf/harmless-base/test.jsonl.gz

Prints one JSON object: "model", "max_length", "truncation", "limit" (null: none), each input's metrics under its
file's name (its path where names repeat or the name is one of the result's own keys), and "rmbench". --out also
writes it to a file, atomically, before scoring and again after each input and RM-Bench: until the run ends the file
lists what is still to come under "pending", so a crash (RM-Bench out of memory after hours of pair scoring) keeps
every input scored before it; the finished file is the printed result. An input that cannot be read on (a truncated
gzip, invalid JSON), or an RM-Bench that fails while scored, gets {"error": ...} in place of its metrics, the rest is
still scored, and the exit status is 1. The result is strict JSON: a figure that is no finite number (a slice that
compared nothing, a diverged model's NaN rewards) is null.
"""

from __future__ import annotations

import argparse
import logging
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from synpref.shared.strict_json import strict_dumps

log = logging.getLogger("synpref.eval")

RESULT_FIELDS = ("model", "max_length", "truncation", "limit", "rmbench", "pending")
"""The result's own keys: no input is keyed by one of them."""
READ_ERRORS = (OSError, EOFError, ValueError, zlib.error)
"""What a file that cannot be read on raises (SourceError, JSON and Arrow errors are ValueErrors; a truncated gzip
is an EOFError, a corrupt one an OSError or zlib.error)."""


def whole_number(least: int) -> Callable[[str], int]:
    """An argparse type: an int of at least `least`."""

    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is below {least}")
        return value

    parse.__name__ = "int"  # argparse names the type in its "invalid int value" message
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The `synpref eval` argument parser."""
    parser = argparse.ArgumentParser(
        prog="synpref eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="checkpoint folder or hub id")
    parser.add_argument("--pairs", action="append", default=[], help="Parquet/JSONL pair file or folder (repeatable)")
    parser.add_argument("--hh-rlhf", action="append", default=[], help="an hh-rlhf .jsonl.gz file (repeatable)")
    parser.add_argument("--rmbench", help="RM-Bench folder with *_filtered.json")
    parser.add_argument("--max-length", type=whole_number(1), default=4096)
    parser.add_argument("--truncation", default="left_turns", choices=["left_turns", "left_tokens", "right", "none"])
    parser.add_argument("--batch-size", type=whole_number(1), default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--limit",
        # >= 0: a -1 meant as "no limit" read every pair but cut RM-Bench's last item (items[:-1]), silently.
        type=whole_number(0),
        default=0,
        help="score only the first N compared pairs of each input, so its pairs is N where it holds that many: a "
        "pair left out as a tie (identical_pairs, identical_after_tokenizing) is counted and the next one read in "
        "its place, and unreadable_rows counts the bad rows read on the way; RM-Bench: the first N items",
    )
    parser.add_argument("--out", help="also write the JSON result here")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def result_key(path: str, paths: list[str], taken: Collection[str] = RESULT_FIELDS) -> str:
    """The file's name; the path as given where names repeat (hh-rlhf's folders each hold a test.jsonl.gz) or the
    name is `taken` (the result's own keys); the absolute path where the path as given is taken too (`--pairs
    model`, which replaced the model's name, or `--pairs rmbench`, replaced by RM-Bench's figures). Of distinct
    files, no two get the same key: a name key holds no "/", so no other input's path or absolute path equals it."""
    name = Path(path).name
    if name not in taken and sum(Path(p).name == name for p in paths) == 1:
        return name
    return path if path not in taken else str(Path(path).absolute())


class PairReader:
    """The pairs of `path`, streamed, read only as far as they are asked for (stream_rewards' limit); `problems`
    counts the unreadable rows read, `identical` the pairs left out for a chosen the same as the rejected; `error`
    says why the file could not be read on, where it could not."""

    def __init__(self, path: str, fmt: str | None) -> None:
        self.path, self.fmt, self.problems, self.error = path, fmt, 0, ""
        self.identical = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from synpref.training.data import iter_pairs

        try:
            for pair, _ in iter_pairs([self.path], fmt=self.fmt):
                if pair is None:
                    self.problems += 1
                    continue
                if pair["chosen"] == pair["rejected"]:
                    # A tie whatever the model, so counted wrong: the trainer's evaluation leaves these out
                    # (modeling.compared_sides), and ingest drops them.
                    self.identical += 1
                    continue
                yield pair
        except READ_ERRORS as e:
            # Ends this input only: raised out of main, it lost the results of every input scored before it
            # (hours of scoring), printed nothing and wrote no --out.
            self.error = f"{self.path}: {type(e).__name__}: {e}"


def main(argv: list[str]) -> int:
    """`synpref eval`: score the inputs with the model and print the JSON result (also to --out);
    2 when no --pairs, --hh-rlhf or --rmbench is given, or one of them is missing or not RM-Bench's shape;
    1 when an input could not be read to its end (its entry says why).
    """
    args = build_parser().parse_args(argv)
    if not (args.pairs or args.hh_rlhf or args.rmbench):
        print("synpref eval: give --pairs, --hh-rlhf or --rmbench", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from synpref.shared.files import write_text_atomic
    from synpref.shared.modeling import load_reward_model, score_pairs
    from synpref.training.data import load_rmbench
    from synpref.training.evaluation import (
        check_rmbench_items,
        reward_metrics,
        rmbench_eval,
        stream_rewards,
    )

    # Checked before any scoring: a mistyped last input would otherwise end the run with a traceback, and no result,
    # after hours spent on the inputs before it. RM-Bench is a few thousand items, read first for the same reason.
    missing = [p for p in [*args.pairs, *args.hh_rlhf] if not Path(p).exists()]
    if missing:
        print(f"synpref eval: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    inputs = [(p, None) for p in args.pairs] + [(p, "hh-rlhf") for p in args.hh_rlhf]
    paths = [p for p, _ in inputs]
    resolved = [Path(p).resolve() for p in paths]
    if repeated := [p for p, r in zip(paths, resolved, strict=True) if resolved.count(r) > 1]:
        # Scored twice for nothing, and two inputs with one key would be one result.
        print(f"synpref eval: the same input given twice: {', '.join(repeated)}", file=sys.stderr)
        return 2
    try:
        items = load_rmbench(args.rmbench) if args.rmbench else []
        check_rmbench_items(items)
    except FileNotFoundError as e:
        print(f"synpref eval: {e}", file=sys.stderr)
        return 2
    except (ValueError, KeyError) as e:  # invalid JSON, a missing field, an item not 3 x 3
        print(f"synpref eval: {args.rmbench}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    # --truncation and --limit change the figures: a result on the first 1,000 pairs, or cut another way, must not
    # pass for one on the whole set as the trainer cuts it.
    result: dict[str, Any] = {
        "model": args.model,
        "max_length": args.max_length,
        "truncation": args.truncation,
        "limit": args.limit or None,
    }
    keys = [result_key(p, paths) for p in paths]
    pending = [*keys, *(["rmbench"] if args.rmbench else [])]

    def save() -> None:
        # Atomic, after every input: results were written once, at the end, so an RM-Bench out of memory (or any
        # crash or kill) after hours of pair scoring lost them all; a full disk or a kill mid-write left a truncated
        # JSON in place of the previous result. Its folder is made here.
        if args.out:
            partial = {**result, "pending": pending} if pending else result
            write_text_atomic(Path(args.out), strict_dumps(partial, indent=2) + "\n")

    save()  # before the model loads: an --out that cannot be written fails now, not after the scoring
    model, tokenizer = load_reward_model(args.model, device=args.device, dtype=args.dtype)
    progress = not args.no_progress
    failed = False
    # One input at a time, streamed a chunk of pairs at a time and read no further than --limit compared pairs
    # need: a 40M-pair file is not held, to score it whole or its first N.
    for (path, fmt), key in zip(inputs, keys, strict=True):
        reader = PairReader(path, fmt)
        unfit: Counter[str] = Counter()

        def score(chunk: list[Mapping[str, Any]], counts: Counter[str] = unfit) -> Sequence[tuple[float, float] | None]:
            length, batch, truncation = args.max_length, args.batch_size, args.truncation
            if callable(tokenizer):  # a Hugging Face tokenizer: the pairs as the trainer's evaluation compares them
                return score_pairs(
                    model, tokenizer, chunk, length, batch, truncation, False, counts, leave_out_identical=True
                )
            # No tokenizer to compare the sides with (a stand-in scorer): each pair scored as given.
            return score_pairs(model, tokenizer, chunk, length, batch, truncation, False, counts)

        # --limit counts the pairs compared: a same-token pair left out among the first N read was not replaced, so
        # a record of `--limit N` held fewer than N pairs, with no word of why beside identical_after_tokenizing.
        metrics = reward_metrics(*stream_rewards(score, reader, progress, args.limit))
        if reader.error:
            # The metrics of the pairs read before it are not the file's: only their count is kept.
            metrics = {"error": reader.error, "pairs_scored": metrics["pairs"]}
            failed = True
        metrics["unreadable_rows"] = reader.problems
        # Pairs with a side over --max-length, scored on its truncated end (RM-Bench's unfit_sequences; the
        # trainer's eval_unfit_pairs): only a log warning counted them, so the accuracy looked whole.
        metrics["unfit_pairs"], metrics["unfit_sequences"] = unfit["unfit_pairs"], unfit["unfit_sequences"]
        if reader.identical:  # only then, as the trainer's report: the metrics of the usual data stay as they were
            metrics["identical_pairs"] = reader.identical
        if unfit["identical_after_tokenizing"]:
            # Chosen and rejected that differ as text but not as tokens (whitespace a chat template trims): a tie
            # counted wrong, where the trainer's evaluation leaves them out as it does identical_pairs.
            metrics["identical_after_tokenizing"] = unfit["identical_after_tokenizing"]
        result[key] = metrics
        pending.remove(key)
        log.info("%s: %s", key, strict_dumps(metrics))  # on stderr as it comes, for a run without --out
        save()
    if args.rmbench:
        # A JSON array per subset (a few thousand items) read whole: --limit cuts it after reading.
        items = items[: args.limit] if args.limit else items
        try:
            result["rmbench"] = rmbench_eval(
                model, tokenizer, items, args.max_length, args.batch_size, progress, args.truncation
            )
        except Exception as e:  # out of GPU memory, a tokenizer error: the inputs' results are still printed
            log.exception("RM-Bench failed")
            result["rmbench"] = {"error": f"{type(e).__name__}: {e}"}
            failed = True
        pending.remove("rmbench")
    print(strict_dumps(result, indent=2))  # first: a final write that fails (a full disk) still leaves it printed
    save()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
