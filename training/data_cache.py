"""The trainer's data: pair files streamed once through the tokenizer into PairStores, cached on disk.

No pair dict outlives its encoding. With `train_files` the pairs are read one at a time
(training/data.py `iter_pairs`), encoded (training/token_store.py) and appended to memory-mapped
arrays under output_dir/token_cache/<key>/ (train/, eval/, report.json). The key hashes what
decides the token ids and the split: the files' paths, sizes and mtimes, the tokenizer's
fingerprint (shared/tokenizer_hash.py: its named special tokens too), max_length, truncation,
margin_column, eval_fraction and split_seed, the source files of the reading, splitting and
encoding code, and the transformers / tokenizers versions. A rerun or resume with the same key
maps the cache (when whole) instead of encoding again; the ranks of one run take a file lock, so
one of them encodes and the others map its files (one page cache for all). Building a new key
removes the other keys' folders.

With `eval_fraction` (no eval_files) a first pass reads only the conversations' keys (32 bytes a
pair, ~50 with their sort order at the peak: 2 GB at 40M pairs) and makes the split of
shared.pairs.split_by_conversation, pair for pair; the second pass encodes each pair into the train or
the eval store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from synpref.shared import modeling, pairs, source_files, source_formats, sources
from synpref.shared.files import FileLock, fsync_tree, replace_durably
from synpref.shared.pairs import conversation_key, held_out_positions
from synpref.shared.tokenizer_hash import tokenizer_sha256
from synpref.training import batching, data, parallel_encoding, token_store
from synpref.training.parallel_encoding import PairEncoding, resolve_workers
from synpref.training.token_store import EncodedSet, PairEncoder, PairStore

log = logging.getLogger(__name__)

CACHE_DIR = "token_cache"
REPORT_FILE = "report.json"
# Bump when the layout of a cache folder changes.
CACHE_VERSION = 1
PROBLEMS_KEPT = 20
# Sorted keys compared a chunk at a time by held_out_mask: 2 MiB of keys.
SPLIT_CHUNK = 1 << 16


@dataclass
class TrainingData:
    """Encoded train and eval pairs, and the data report of metrics.jsonl's start line.

    Attributes:
        train: training pairs that fit, in input order, with their margins.
        eval: every eval pair (an unfit one as its left-token-truncated fallback), with its source.
        report: train_pairs, train_unfit, train_truncated, eval_pairs, eval_unfit, unreadable_rows (train), and
            train_identical / eval_identical where pairs with the same chosen and rejected were left out,
            eval_unreadable_rows where eval files held rows that are no pair, train_margin_missing where training
            pairs had no margin_column value (margin 0).
        problems: the first unreadable rows (train, then eval), "file#row: why".
        folder: the cache folder the stores are mapped from; None when built in memory.
    """

    train: EncodedSet
    eval: EncodedSet
    report: dict[str, int]
    problems: list[str]
    folder: Path | None = None


def prepare_data(
    config: Any,
    tokenizer: Any,
    out: Path,
    train_pairs: Iterable[Mapping[str, Any]] | None = None,
    eval_pairs: Iterable[Mapping[str, Any]] | None = None,
) -> TrainingData:
    """Pairs given: encoded in memory. Else config.train_files / eval_files, from the cache under `out`
    (built first when missing). Logs the first unreadable rows and the unfit count."""
    if train_pairs is not None:
        result = _encode(config, tokenizer, None, train_pairs, eval_pairs or [], None, [])
    else:
        if not config.train_files:
            raise ValueError("no train_files given")
        result = _cached(config, tokenizer, out / CACHE_DIR)
    report = result.report
    for problem in result.problems:
        log.warning("skipped: %s", problem)
    if report["unreadable_rows"]:
        log.warning("%d unreadable training rows skipped", report["unreadable_rows"])
    if report.get("eval_unreadable_rows"):
        log.warning("%d unreadable eval rows skipped", report["eval_unreadable_rows"])
    if report.get("train_identical"):
        log.warning("%d training pairs have the same chosen and rejected and are skipped", report["train_identical"])
    if report.get("train_margin_missing"):
        log.warning(
            "%d of %d training pairs have no %r value and train with margin 0",
            report["train_margin_missing"],
            report["train_pairs"],
            config.margin_column,
        )
    if report["train_unfit"]:
        log.warning(
            "%d of %d training pairs do not fit max_length=%d under %s and are skipped",
            report["train_unfit"],
            report["train_pairs"] + report["train_unfit"],
            config.max_length,
            config.truncation,
        )
    return result


Listing = list[tuple[str, list[Path]]]
"""Each train or eval path with the files under it (shared.source_files) at one moment."""


def list_files(paths: list[str]) -> Listing:
    """`paths` with their files now: the key and every pass of a build read this one listing, so a shard a
    dataset writer commits meanwhile is in neither (the next run's key sees it). SourceError for a path with no
    pair file: a folder of other files (.csv) or a version with nothing committed added no pair and no word, so
    training went on from the other paths, or without eval, or failed as "0 usable training pairs"."""
    listing = [(path, source_files.source_files(Path(path))) for path in paths]
    for path, found in listing:
        if not found:
            suffixes = ", ".join(source_files.FILE_SUFFIXES)
            raise source_files.SourceError(
                f"{path}: no pair files in it (none ending {suffixes}, nor a dataset version's committed shards)"
            )
    return listing


def key_of_rank0(config: Any, tokenizer: Any) -> tuple[tuple[Listing, Listing], str, dict[str, Any]]:
    """(listing, key, spec) as rank 0 makes them, on every rank. Ranks that each listed or statted the files on
    their own could see a shard a writer committed between them, or another size or mtime (a file written
    meanwhile): other cache keys, two builds at once (each removing the other's folder), and ranks training on
    other data (other step counts: a hang)."""

    def make() -> tuple[tuple[Listing, Listing], str, dict[str, Any]]:
        listing = (list_files(config.train_files), list_files(config.eval_files))
        return (listing, *cache_key(config, tokenizer, listing))

    return _of_rank0(make)


def _of_rank0(make: Callable[[], Any]) -> Any:
    """`make()` on rank 0, broadcast to every rank (when several); a SourceError there is raised on every rank."""
    import torch.distributed as dist

    many = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    box: list[Any] = [None]
    if not many or dist.get_rank() == 0:
        try:
            box[0] = make()
        except source_files.SourceError as exc:
            box[0] = exc  # sent on, so the other ranks raise it too instead of waiting for a listing
    if many:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], source_files.SourceError):
        raise box[0]
    return box[0]


def cache_key(
    config: Any, tokenizer: Any, listing: tuple[Listing, Listing] | None = None
) -> tuple[str, dict[str, Any]]:
    """(key, what it hashes) of the cache folder for config's files (as `listing` lists the train and eval
    files, else as listed now) under this tokenizer."""
    train, evals = listing or (list_files(config.train_files), list_files(config.eval_files))

    def files(paths: Listing) -> list[Any]:
        out = []
        for path, found in paths:
            listed = []
            for file in found:
                try:
                    stat = file.stat()
                except FileNotFoundError:
                    # Only a file a manifest or state.json lists can be missing here: name that list.
                    raise source_files.SourceError(
                        f"{file}: no such file, but {_listed_by(file, Path(path))} lists it"
                    ) from None
                listed.append([str(file.resolve()), stat.st_size, stat.st_mtime_ns])
            out.append([str(path), listed])
        return out

    import tokenizers
    import transformers

    code = hashlib.sha256()
    # batching: the margin and whether a pair's sides compare are decided there. source_formats: the per-format
    # readers (hh-rlhf, PandaLM, ...) that sources.py calls, so which rows are pairs and what they hold.
    encoding = (modeling, pairs, sources, source_formats, source_files, data, batching, token_store, parallel_encoding)
    for module in (*encoding, sys.modules[__name__]):
        code.update(Path(str(module.__file__)).read_bytes())
    spec = {
        "version": CACHE_VERSION,
        "train_files": files(train),
        "eval_files": files(evals),
        "eval_fraction": 0.0 if config.eval_files else config.eval_fraction,
        "split_seed": config.split_seed,
        "margin_column": config.margin_column,
        "max_length": config.max_length,
        "truncation": config.truncation,
        "tokenizer": tokenizer_sha256(tokenizer),
        "code": code.hexdigest(),
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32], spec


def _listed_by(file: Path, root: Path) -> str:
    """The dataset manifest or save_to_disk state.json under `root` that lists `file`."""
    for folder in file.parents:
        if folder != root and root not in folder.parents:
            break
        for name in (source_files.DATASET_MANIFEST, source_files.SAVED_STATE):
            if (folder / name).is_file():
                return str(folder / name)
    return f"a manifest.json or state.json under {root}"


def held_out_mask(
    paths: Iterable[str | Path], columns_extra: tuple[str, ...], fraction: float, seed: int
) -> np.ndarray | None:
    """Per readable pair of `paths` (in reading order), whether split_by_conversation holds it out;
    None when nothing is. Holds the conversation keys (32 bytes a pair) and their sort order (8) while it runs:
    ~50 bytes a pair at the peak, where np.unique and np.isin's copies of the keys took ~200."""
    if fraction <= 0:
        return None
    digests = bytearray()
    for pair, _ in data.iter_pairs(paths, columns_extra):
        if pair is not None:
            digests += bytes.fromhex(conversation_key(list(pair.get("conversation") or [])))
    keys = np.frombuffer(digests, dtype="S32")
    order = np.argsort(keys)  # sorted raw digests are sorted hex keys: split_by_conversation's order
    first = np.zeros(len(keys), dtype=bool)  # where a sorted run of equal keys (one conversation) starts
    for a in range(0, len(keys), SPLIT_CHUNK):
        run = keys[order[max(a - 1, 0) : a + SPLIT_CHUNK]]  # a chunk's copy of the keys, not the whole's
        first[a : a + SPLIT_CHUNK] = run[1:] != run[:-1] if a else np.r_[True, run[1:] != run[:-1]]
    distinct = int(np.count_nonzero(first))
    held = np.zeros(distinct, dtype=bool)
    held[np.frombuffer(held_out_positions(distinct, fraction, seed), dtype=np.int64)] = True
    mask = np.zeros(len(keys), dtype=bool)
    done = 0
    for a in range(0, len(keys), SPLIT_CHUNK):
        rank = done + np.cumsum(first[a : a + SPLIT_CHUNK]) - 1  # each sorted key's place among the distinct ones
        mask[order[a : a + SPLIT_CHUNK]] = held[rank]
        done = int(rank[-1]) + 1
    return mask


def _encode(
    config: Any,
    tokenizer: Any,
    folder: Path | None,
    train_pairs: Iterable[Mapping[str, Any] | None],
    eval_pairs: Iterable[Mapping[str, Any]],
    held: np.ndarray | None,
    problems: list[str],
) -> TrainingData:
    """Encode train pairs (a None is an unreadable row, its problem already listed) and eval pairs;
    the train pairs `held` marks (by readable-pair number) go to eval instead."""
    args = (tokenizer, config.max_length, config.truncation)
    train = PairEncoder(*args, config.margin_column, folder=folder / "train" if folder else None)
    evals = PairEncoder(*args, keep_unfit=True, folder=folder / "eval" if folder else None)
    unreadable = readable = 0
    with PairEncoding(*args, resolve_workers(config.encode_workers)) as encoding:
        for pair, sides in encoding.map(train_pairs):
            if pair is None or sides is None:
                unreadable += 1
                continue
            if held is not None and readable >= len(held):
                raise _changed(len(held), "more")
            (evals if held is not None and held[readable] else train).add_encoded(pair, sides)
            readable += 1
        if held is not None and readable < len(held):
            raise _changed(len(held), f"{readable}")
        for pair, sides in encoding.map(eval_pairs):
            evals.add_encoded(pair, sides)  # type: ignore[arg-type]
    train_set, eval_set = train.finish(), evals.finish()
    report = {
        "train_pairs": len(train_set.pairs),
        "train_unfit": train_set.unfit,
        "train_truncated": train_set.truncated,
        "eval_pairs": len(eval_set.pairs),
        "eval_unfit": eval_set.unfit,
        "unreadable_rows": unreadable,
    }
    for name, encoded in (("train", train_set), ("eval", eval_set)):
        if encoded.identical:  # only then: the report's fields stay what they were for the usual data
            report[f"{name}_identical"] = encoded.identical
    if train.margin_missing:  # likewise
        report["train_margin_missing"] = train.margin_missing
    return TrainingData(train_set, eval_set, report, problems[:PROBLEMS_KEPT], folder)


def _changed(split: int, now: str) -> source_files.SourceError:
    # The split's mask is by position: another count means another pairing of mask and pairs.
    return source_files.SourceError(
        f"the train files changed while the token cache was built ({split} readable pairs when the split was made, "
        f"{now} when encoded): train from files that are no longer written to"
    )


def _build(config: Any, tokenizer: Any, folder: Path, spec: dict[str, Any], listing: tuple[Listing, Listing]) -> None:
    """Stream the listed files into stores under `folder`, then write report.json."""
    extra = (config.margin_column,) if config.margin_column else ()
    train_files, eval_files = ([file for _, files in paths for file in files] for paths in listing)
    held = None
    if not config.eval_files:
        held = held_out_mask(train_files, extra, config.eval_fraction, config.split_seed)
    problems: list[str] = []

    def train_rows() -> Iterable[Mapping[str, Any] | None]:
        for pair, problem in data.iter_pairs(train_files, extra):
            if pair is None and len(problems) < PROBLEMS_KEPT:
                problems.append(problem)
            yield pair

    eval_unreadable = 0

    def eval_rows() -> Iterable[Mapping[str, Any]]:
        nonlocal eval_unreadable
        for pair, problem in data.iter_pairs(eval_files, extra):
            if pair is not None:
                yield pair
                continue
            eval_unreadable += 1
            if len(problems) < PROBLEMS_KEPT:
                problems.append(problem)

    built = _encode(config, tokenizer, folder, train_rows(), eval_rows(), held, problems)
    if eval_unreadable:  # only then: the report's fields stay what they were for the usual data
        built.report["eval_unreadable_rows"] = eval_unreadable
    record = {
        "report": built.report,
        "eval_truncated": built.eval.truncated,
        "problems": problems,
        "key": spec,
    }
    (folder / REPORT_FILE).write_text(json.dumps(record, indent=1))


def _open(folder: Path) -> TrainingData:
    record = json.loads((folder / REPORT_FILE).read_text())
    report = record["report"]
    same = report.get("train_identical", 0), report.get("eval_identical", 0)
    train = EncodedSet(PairStore.open(folder / "train"), report["train_unfit"], report["train_truncated"], same[0])
    evals = EncodedSet(PairStore.open(folder / "eval"), report["eval_unfit"], record["eval_truncated"], same[1])
    return TrainingData(train, evals, report, record["problems"], folder)


def _reusable(folder: Path) -> TrainingData | None:
    """The cache in `folder`, or None where there is none or only part of one. A published folder can lose files
    after the fact: a kill during the removal of a finished run's cache (the trainer's, or this module's of another
    key's) leaves report.json beside missing or cut stores, and taking it as whole failed every later run in this
    output_dir until someone removed it by hand."""
    if not (folder / REPORT_FILE).exists():
        return None
    try:
        return _open(folder)
    except (OSError, ValueError, KeyError) as exc:  # a file missing, cut short, or that does not parse
        log.warning("token cache: %s is incomplete (%s); building it again", folder, exc)
        return None


def _cached(config: Any, tokenizer: Any, root: Path) -> TrainingData:
    root.mkdir(parents=True, exist_ok=True)
    listing, key, spec = key_of_rank0(config, tokenizer)
    folder = root / key
    lock = FileLock(root / f"{key}.lock")
    try:
        reused = _reusable(folder)
        if reused is not None:
            log.info("token cache: reusing %s", folder)
            return reused
        for dead in root.glob(f".{key}.*.tmp"):
            # A build of this key killed mid-way (OOM, preemption): we hold the key's lock, so no one writes it.
            # Removed first, else the disk holds it and the new build at once (~2 x 320 GB at 40M pairs).
            log.info("token cache: removing %s (a build that did not finish)", dead)
            shutil.rmtree(dead, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete one: the same disk reason
        tmp = root / f".{key}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            _build(config, tokenizer, tmp, spec, listing)
            # report.json and the store folders' entries too: after a power loss a published folder with an
            # empty report would fail every later attempt (they resume in this output_dir) until removed.
            fsync_tree(tmp)
            replace_durably(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for other in root.iterdir():
            # Other keys' folders (and folders left by a killed build) go; lock files stay.
            if other.is_dir() and other.name != key:
                log.info("token cache: removing %s (other inputs)", other)
                shutil.rmtree(other, ignore_errors=True)
        log.info("token cache: built %s", folder)
        return _open(folder)
    finally:
        lock.release()
