"""Batched reward forwards over token ids: right padding, length batches, rewards without gradients.

The scorer service, the trainer's evaluation, the curation loop's features and `modeling.score_pairs` run
their forwards through these, so a sequence gets the same reward in each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def pad_batch(
    batch_input_ids: Sequence[Sequence[int]], pad_id: int, device: Any = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row; returns (input_ids, attention_mask)."""
    width = max(len(ids) for ids in batch_input_ids)
    ids = torch.full((len(batch_input_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch_input_ids), width), dtype=torch.long)
    for row, seq in enumerate(batch_input_ids):
        ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def reward_of(model: Any, batch_input_ids: Sequence[Sequence[int]], pad_id: int) -> list[float]:
    """Rewards (logits[:, 0]) of a batch of id lists, padded on the right, without gradients."""
    if not batch_input_ids:
        return []
    ids, mask = pad_batch(batch_input_ids, pad_id, model_device(model))
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return [float(x) for x in logits[:, 0].float().cpu()]


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped by length (longest first) into batches of at most batch_size rows and
    at most max_tokens padded tokens, so little compute goes to padding."""
    return cut_in_order(sorted(range(len(lengths)), key=lambda i: -lengths[i]), lengths, batch_size, max_tokens)


def cut_in_order(
    order: Sequence[int], widths: Sequence[int], size: int, max_tokens: int | None, rows: int = 1
) -> list[list[int]]:
    """`order` (widest first) cut, in order, into runs of at most `size` indices whose padded tokens (`rows` rows an
    index, each as wide as the run's first) stay within max_tokens; a run always takes its first index."""
    runs: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = widths[current[0]] if current else widths[i]
        if current and (len(current) >= size or (max_tokens and rows * width * (len(current) + 1) > max_tokens)):
            runs.append(current)
            current = []
        current.append(i)
    if current:
        runs.append(current)
    return runs


def score_sequences(
    model: Any,
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 32,
    max_tokens: int | None = None,
    progress: bool = False,
) -> list[float]:
    """Rewards of many id lists, batched by length; results in input order."""
    out = [0.0] * len(sequences)
    batches = length_batches([len(s) for s in sequences], batch_size, max_tokens)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="scoring", unit="batch")
    for batch in batches:
        for i, r in zip(batch, reward_of(model, [sequences[i] for i in batch], pad_id), strict=True):
            out[i] = r
    return out
