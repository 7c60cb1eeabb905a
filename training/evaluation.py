"""Reward-model metrics: pairwise accuracy (overall, per source), reward statistics, RM-Bench."""

from __future__ import annotations

import itertools
import math
import statistics
from array import array
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from synpref.shared.batched_rewards import score_sequences
from synpref.shared.modeling import (
    Encoded,
    Truncation,
    compared_sides,
    encode_conversation,
)

EVAL_CHUNK_PAIRS = 16384
"""Pairs encoded and scored at a time by stream_rewards: the pair dicts and token lists an input holds at once."""


def pairwise_metrics(rewards: Sequence[tuple[float, float]], sources: Sequence[Any] | None = None) -> dict[str, Any]:
    """Accuracy = share of pairs with r_chosen > r_rejected (ties count as wrong)."""
    chosen = np.fromiter((c for c, _ in rewards), np.float64, len(rewards))
    rejected = np.fromiter((r for _, r in rewards), np.float64, len(rewards))
    if sources is None:
        return reward_metrics(chosen, rejected)
    codes: dict[Any, int] = {}
    coded = np.fromiter((codes.setdefault(s, len(codes)) for s in sources), np.int64, len(sources))
    return reward_metrics(chosen, rejected, coded, list(codes))


def reward_metrics(
    chosen: np.ndarray, rejected: np.ndarray, sources: np.ndarray | None = None, names: Sequence[Any] = ()
) -> dict[str, Any]:
    """pairwise_metrics of flat float64 reward arrays and per-pair integer codes into `names`: a few bytes a
    pair, where a tuple and a source object per pair cost ~200 at 40M x eval_fraction pairs."""
    n = len(chosen)
    if n == 0:
        return {"pairs": 0}
    correct = chosen > rejected
    both = np.concatenate((chosen, rejected))
    # fsum and statistics' exact sums keep the figures bitwise those of the list code; a diverged model's NaN
    # or infinite reward gives NaN, where statistics.pstdev raised and lost the run's final model.
    out: dict[str, Any] = {
        "pairs": n,
        "accuracy": int(np.count_nonzero(correct)) / n,
        "reward_mean": _mean(both),
        "reward_std": statistics.pstdev(_floats(both)) if bool(np.isfinite(both).all()) else math.nan,
        "chosen_mean": _mean(chosen),
        "rejected_mean": _mean(rejected),
        "margin_mean": _mean(chosen - rejected),
    }
    if sources is not None:
        if len(sources) != n:
            raise ValueError(f"{len(sources)} sources for {n} pairs")
        pairs = np.bincount(sources, minlength=len(names))
        hits = np.bincount(sources[correct], minlength=len(names))
        by: dict[Any, list[int]] = {}
        for name, k, ok in zip(names, pairs.tolist(), hits.tolist(), strict=False):
            if k:
                total = by.setdefault(name, [0, 0])
                total[0] += ok
                total[1] += k
        out["accuracy_by_source"] = {s: ok / k for s, (ok, k) in sorted(by.items())}
        out["pairs_by_source"] = {s: k for s, (_, k) in sorted(by.items())}
    return out


def stream_rewards(
    score: Callable[[list[Mapping[str, Any]]], Sequence[tuple[float, float] | None]],
    pairs: Iterable[Mapping[str, Any]],
    progress: bool = False,
    limit: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Any]]:
    """`score`'s (r_chosen, r_rejected) of `pairs` as reward_metrics takes them (chosen, rejected, source codes,
    names), less the pairs it gives None (left out, as score_pairs does with leave_out_identical), read and scored
    EVAL_CHUNK_PAIRS at a time: what stays is 20 bytes a pair, where holding a
    multi-million-pair file's dicts and token lists took several KB a pair. Length batches form within a chunk,
    so a reward differs from whole-input batching by the float rounding of its padding only.

    `limit` > 0: the first `limit` rewards kept, `pairs` read no further than those need. A chunk is at most the
    rewards still wanted, so a pair left out is replaced by the next one read (the first `limit` pairs read gave
    fewer than `limit` rewards where some were left out)."""
    if limit < 0:
        raise ValueError(f"limit {limit} is below 0")
    chosen, rejected, coded = array("d"), array("d"), array("i")
    codes: dict[Any, int] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="scoring", unit="pair")
    stream = iter(pairs)

    def wanted() -> int:
        return EVAL_CHUNK_PAIRS if not limit else min(EVAL_CHUNK_PAIRS, limit - len(chosen))

    while (size := wanted()) > 0 and (chunk := list(itertools.islice(stream, size))):
        rewards = score(chunk)
        if len(rewards) != len(chunk):
            raise ValueError(f"{len(rewards)} rewards for {len(chunk)} pairs")
        for pair, reward in zip(chunk, rewards, strict=True):
            if reward is not None:
                coded.append(codes.setdefault(pair.get("source", "unknown"), len(codes)))
                chosen.append(reward[0])
                rejected.append(reward[1])
        if bar is not None:
            bar.update(len(chunk))
        del chunk, rewards  # before the next chunk is read, not after
    if bar is not None:
        bar.close()
    return np.frombuffer(chosen), np.frombuffer(rejected), np.frombuffer(coded, dtype=np.intc), list(codes)


def _floats(x: np.ndarray, chunk: int = 1 << 16) -> Iterator[float]:
    """The values as Python floats, a chunk at a time (statistics reads one pass)."""
    for a in range(0, len(x), chunk):
        yield from x[a : a + chunk].tolist()


def _mean(x: np.ndarray) -> float:
    # statistics.fmean is fsum / n; fsum raises on inf + -inf, hence numpy's NaN then.
    if np.isfinite(x).all():
        return math.fsum(_floats(x)) / len(x)
    with np.errstate(invalid="ignore"):
        return float(np.mean(x))


Cell = tuple[int, int] | None
"""An RM-Bench comparison: the indices of its chosen and rejected sequences, None where the two are the same
tokens (modeling.compared_sides), a tie whatever the model, left out of the accuracies."""


def rmbench_matrix(rewards: Sequence[float], cells: Sequence[Sequence[Cell]]) -> list[list[float | None]]:
    """3x3 grid for one item: cell (i, j) = 1 when chosen i's reward beats rejected j's, None where left out."""
    return [[None if c is None else 1.0 if rewards[c[0]] > rewards[c[1]] else 0.0 for c in row] for row in cells]


def rmbench_slices(matrices: Sequence[Sequence[Sequence[float | None]]]) -> dict[str, float | None]:
    """RM-Bench's hard (i < j), normal (i = j) and easy (i > j) accuracies over items.

    Index 0/1/2 = concise / detailed plain / detailed markdown. Hard cells pit a less
    styled correct answer against a more styled wrong one. A cell's mean is over the items
    that compare it (None: left out); a slice with none of them is None (null in the JSON result: a NaN there
    was a bare `NaN`, which strict JSON parsers refuse).
    """
    k = len(matrices[0])

    def share(values: Sequence[float | None]) -> float | None:
        seen = [v for v in values if v is not None]
        return sum(seen) / len(seen) if seen else None

    mean = [[share([m[i][j] for m in matrices]) for j in range(k)] for i in range(k)]
    slices = {
        "hard": share([mean[i][j] for i in range(k) for j in range(k) if i < j]),
        "normal": share([mean[i][i] for i in range(k)]),
        "easy": share([mean[i][j] for i in range(k) for j in range(k) if i > j]),
    }
    return {**slices, "items": float(len(matrices))}


RMBENCH_STYLES = 3
"""Responses per side of an RM-Bench item: concise, detailed plain, detailed markdown."""


def check_rmbench_items(items: Iterable[Mapping[str, Any]]) -> None:
    """Raise ValueError naming the first item that does not hold 3 chosen and 3 rejected responses: the rewards
    are read back 6 an item, so one such item shifted every later item's grid onto its neighbours' responses
    (silently wrong slices), or failed the run with an IndexError after all the scoring."""
    for n, item in enumerate(items):
        sides = [item.get("chosen"), item.get("rejected")]
        if not all(isinstance(s, list) and len(s) == RMBENCH_STYLES for s in sides):
            shape = " x ".join(str(len(s)) if isinstance(s, list) else type(s).__name__ for s in sides)
            raise ValueError(
                f"RM-Bench item {item.get('id', n)!r} ({item.get('subset', '?')}): chosen x rejected is {shape}, "
                f"not {RMBENCH_STYLES} x {RMBENCH_STYLES}"
            )


def _rmbench_cells(
    tokenizer: Any, item: Mapping[str, Any], max_length: int, truncation: Truncation, seqs: list[list[int]]
) -> tuple[list[list[Cell]], int]:
    """An item's 3x3 comparisons as cells into `seqs` (its sequences appended there), and how many of its
    responses do not fit. Each is the pair the trainer would compare (compared_sides): sides that `right` cut
    to the same tokens (a prompt over max_length) do not fit and are compared on their left-token-truncated
    ends; sides that are the same tokens uncut are left out (None)."""
    prompt = {"role": "user", "content": item["prompt"]}
    answers = [{"role": "assistant", "content": str(r)} for r in [*item["chosen"], *item["rejected"]]]
    encoded = [encode_conversation(tokenizer, [prompt, a], max_length, truncation=truncation) for a in answers]
    unfit = {k for k, enc in enumerate(encoded) if not enc.fits}
    index: dict[tuple[int, bool], int] = {}

    def sequence(k: int, side: Encoded) -> int:
        # A response is scored as encoded, or (not fitting) on its ends: one sequence each, whatever the cells.
        if not side.fits:
            unfit.add(k)
        if (k, side.fits) not in index:
            index[(k, side.fits)] = len(seqs)
            seqs.append(side.input_ids)
        return index[(k, side.fits)]

    grid: list[list[Cell]] = []
    for i in range(RMBENCH_STYLES):
        grid.append([])
        for j in range(RMBENCH_STYLES, 2 * RMBENCH_STYLES):
            pair = {"conversation": [prompt], "chosen": [answers[i]], "rejected": [answers[j]]}
            sides = compared_sides(tokenizer, pair, (encoded[i], encoded[j]), max_length, keep_unfit=True)
            grid[i].append(None if sides is None else (sequence(i, sides[0]), sequence(j, sides[1])))
    return grid, len(unfit)


def rmbench_eval(
    model: Any,
    tokenizer: Any,
    items: Sequence[dict[str, Any]],
    max_length: int = 4096,
    batch_size: int = 16,
    progress: bool = False,
    truncation: Truncation = "left_turns",
) -> dict[str, Any]:
    """Score every item's 3 chosen and 3 rejected responses; slices overall and per domain.

    `<slice>_domain_average` is the mean of the domain accuracies, as RM-Bench's own table reports it, over the
    domains that compare the slice; a slice nothing compares is None.
    Each comparison is the pair the trainer would compare (modeling.compared_sides): `unfit_sequences` counts
    the responses scored on their left-token-truncated ends (over max_length, or cut by `right` to the same
    tokens as the other side), `identical_comparisons` (present when there are some) the comparisons left out
    for sides that are the same tokens uncut. Before, `right` made every comparison of an item whose prompt is
    over max_length a tie, counted wrong and not unfit.
    """
    check_rmbench_items(items)
    seqs: list[list[int]] = []
    grids: list[list[list[Cell]]] = []
    unfit = identical = 0
    for item in items:
        grid, item_unfit = _rmbench_cells(tokenizer, item, max_length, truncation, seqs)
        grids.append(grid)
        unfit += item_unfit
        identical += sum(cell is None for row in grid for cell in row)
    rewards = score_sequences(model, seqs, int(tokenizer.pad_token_id), batch_size, progress=progress)
    matrices: dict[str, list[list[list[float | None]]]] = defaultdict(list)
    for item, grid in zip(items, grids, strict=True):
        matrices[item["domain"]].append(rmbench_matrix(rewards, grid))
    per_domain = {d: rmbench_slices(m) for d, m in sorted(matrices.items())}
    overall = rmbench_slices([m for ms in matrices.values() for m in ms])
    out: dict[str, Any] = {**{k: v for k, v in overall.items() if k != "items"}, "items": len(items)}
    out["domains"] = per_domain
    for key in ("hard", "normal", "easy"):
        # A domain whose slice compared nothing (None) has no accuracy to average: its NaN made the average NaN.
        seen = [v for d in per_domain.values() if (v := d[key]) is not None]
        out[f"{key}_domain_average"] = sum(seen) / len(seen) if seen else None
    out["unfit_sequences"] = unfit
    if identical:  # only then, as the pairs' identical_after_tokenizing: the usual figures stay as they were
        out["identical_comparisons"] = identical
    return out
