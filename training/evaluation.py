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

from synpref.shared.modeling import Truncation, encode_conversation, score_sequences

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
    score: Callable[[list[Mapping[str, Any]]], Sequence[tuple[float, float]]],
    pairs: Iterable[Mapping[str, Any]],
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Any]]:
    """`score`'s (r_chosen, r_rejected) of `pairs` as reward_metrics takes them (chosen, rejected, source codes,
    names), read and scored EVAL_CHUNK_PAIRS at a time: what stays is 20 bytes a pair, where holding a
    multi-million-pair file's dicts and token lists took several KB a pair. Length batches form within a chunk,
    so a reward differs from whole-input batching by the float rounding of its padding only."""
    chosen, rejected, coded = array("d"), array("d"), array("i")
    codes: dict[Any, int] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="scoring", unit="pair")
    stream = iter(pairs)
    while chunk := list(itertools.islice(stream, EVAL_CHUNK_PAIRS)):
        rewards = score(chunk)
        if len(rewards) != len(chunk):
            raise ValueError(f"{len(rewards)} rewards for {len(chunk)} pairs")
        coded.extend(codes.setdefault(p.get("source", "unknown"), len(codes)) for p in chunk)
        chosen.extend(c for c, _ in rewards)
        rejected.extend(r for _, r in rewards)
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


def rmbench_matrix(chosen: Sequence[float], rejected: Sequence[float]) -> list[list[float]]:
    """3x3 grid for one item: cell (i, j) = 1 when chosen[i] beats rejected[j]."""
    return [[1.0 if c > r else 0.0 for r in rejected] for c in chosen]


def rmbench_slices(matrices: Sequence[list[list[float]]]) -> dict[str, float]:
    """RM-Bench's hard (i < j), normal (i = j) and easy (i > j) accuracies over items.

    Index 0/1/2 = concise / detailed plain / detailed markdown. Hard cells pit a less
    styled correct answer against a more styled wrong one.
    """
    k = len(matrices[0])
    mean = [[sum(m[i][j] for m in matrices) / len(matrices) for j in range(k)] for i in range(k)]
    hard = [mean[i][j] for i in range(k) for j in range(k) if i < j]
    normal = [mean[i][i] for i in range(k)]
    easy = [mean[i][j] for i in range(k) for j in range(k) if i > j]
    return {
        "hard": sum(hard) / len(hard),
        "normal": sum(normal) / len(normal),
        "easy": sum(easy) / len(easy),
        "items": float(len(matrices)),
    }


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

    `<slice>_domain_average` is the mean of the domain accuracies, as RM-Bench's own table reports it.
    """
    check_rmbench_items(items)
    seqs: list[list[int]] = []
    unfit = 0
    for item in items:
        for response in [*item["chosen"], *item["rejected"]]:
            msgs = [{"role": "user", "content": item["prompt"]}, {"role": "assistant", "content": str(response)}]
            enc = encode_conversation(tokenizer, msgs, max_length, truncation=truncation)
            unfit += not enc.fits
            seqs.append(enc.input_ids)
    rewards = score_sequences(model, seqs, int(tokenizer.pad_token_id), batch_size, progress=progress)
    matrices: dict[str, list[list[list[float]]]] = defaultdict(list)
    for n, item in enumerate(items):
        r = rewards[6 * n : 6 * n + 6]
        matrices[item["domain"]].append(rmbench_matrix(r[:3], r[3:]))
    per_domain = {d: rmbench_slices(m) for d, m in sorted(matrices.items())}
    overall = rmbench_slices([m for ms in matrices.values() for m in ms])
    out: dict[str, Any] = {**{k: v for k, v in overall.items() if k != "items"}, "items": len(items)}
    out["domains"] = per_domain
    for key in ("hard", "normal", "easy"):
        out[f"{key}_domain_average"] = sum(d[key] for d in per_domain.values()) / len(per_domain)
    out["unfit_sequences"] = unfit
    return out
