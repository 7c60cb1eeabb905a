"""Reward-model metrics: pairwise accuracy (overall, per source), reward statistics, RM-Bench."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from synpref.shared.modeling import encode_conversation, score_sequences


def pairwise_metrics(rewards: Sequence[tuple[float, float]], sources: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy = share of pairs with r_chosen > r_rejected (ties count as wrong)."""
    n = len(rewards)
    if n == 0:
        return {"pairs": 0}
    correct = [c > r for c, r in rewards]
    flat = [x for pair in rewards for x in pair]
    out: dict[str, Any] = {
        "pairs": n,
        "accuracy": sum(correct) / n,
        "reward_mean": statistics.fmean(flat),
        "reward_std": statistics.pstdev(flat),
        "chosen_mean": statistics.fmean(c for c, _ in rewards),
        "rejected_mean": statistics.fmean(r for _, r in rewards),
        "margin_mean": statistics.fmean(c - r for c, r in rewards),
    }
    if sources is not None:
        by: dict[str, list[bool]] = defaultdict(list)
        for ok, src in zip(correct, sources, strict=True):
            by[src].append(ok)
        out["accuracy_by_source"] = {s: sum(v) / len(v) for s, v in sorted(by.items())}
        out["pairs_by_source"] = {s: len(v) for s, v in sorted(by.items())}
    return out


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


def rmbench_eval(
    model: Any,
    tokenizer: Any,
    items: Sequence[dict[str, Any]],
    max_length: int = 4096,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, Any]:
    """Score every item's 3 chosen and 3 rejected responses; slices overall and per domain.

    `average` is the mean of the domain accuracies, as RM-Bench's own table reports it.
    """
    seqs: list[list[int]] = []
    unfit = 0
    for item in items:
        for response in [*item["chosen"], *item["rejected"]]:
            msgs = [{"role": "user", "content": item["prompt"]}, {"role": "assistant", "content": str(response)}]
            enc = encode_conversation(tokenizer, msgs, max_length, truncation="left_turns")
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
