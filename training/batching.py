"""What goes into each forward pass of the Bradley–Terry trainer: pure functions, no model.

Encoding (pairs to token ids), the loss, the learning-rate schedule, the data order of an
epoch, the share of each rank, the micro-batches of a share (padded or packed), and the
token budget a micro-batch gets when the config leaves it to the trainer.
"""

from __future__ import annotations

import math
import random
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from synpref.shared.batched_rewards import cut_in_order
from synpref.shared.modeling import compared_sides, encode_pair

# Below about a thousand tokens per forward, a CPU spends a visible share of its time outside
# the matmuls (measured on the 5M-parameter benchmark model; see docs/training.md).
CPU_MIN_TOKENS = 1024
# Bytes of saved activations per token and hidden unit of one decoder layer under bf16
# autocast, without the s^2 attention term that flash / memory-efficient kernels do not keep
# (Korthikanti et al. 2022, "Reducing Activation Recomputation", table 2: 34 s b h).
ACTIVATION_BYTES_PER_TOKEN_HIDDEN_LAYER = 34
# fp32 weights, fp32 gradients and two fp32 AdamW moments.
STATE_BYTES_PER_PARAM = 16


@dataclass
class EncodedPair:
    """A training pair as token ids.

    Attributes:
        chosen: token ids of the conversation plus the chosen response.
        rejected: token ids of the conversation plus the rejected response.
        margin: subtracted from r_chosen - r_rejected in the loss (0.0 without a margin column).
    """

    chosen: list[int]
    rejected: list[int]
    margin: float = 0.0

    @property
    def width(self) -> int:
        """The longer side's length: the padded width the pair needs."""
        return max(len(self.chosen), len(self.rejected))

    @property
    def tokens(self) -> int:
        """Real tokens of both sides together: what the pair takes of a packed row."""
        return len(self.chosen) + len(self.rejected)


@dataclass
class EncodeReport:
    """What `encode_pairs` made of its input.

    Attributes:
        pairs: the encoded pairs, in input order.
        kept: the input index of each encoded pair.
        unfit: pairs with a side that does not fit under the truncation policy (skipped unless keep_unfit).
        truncated: encoded pairs with at least one side cut.
        identical: pairs whose chosen and rejected are the same (always skipped: see compared_sides).
    """

    pairs: list[EncodedPair]
    kept: list[int]
    """Indices (into the input) of the pairs that were encoded."""
    unfit: int = 0
    truncated: int = 0
    identical: int = 0


def encode_pairs(
    tokenizer: Any,
    pairs: Sequence[dict[str, Any]],
    max_length: int,
    truncation: str,
    margin_column: str = "",
    keep_unfit: bool = False,
) -> EncodeReport:
    """Encode pairs; those that do not fit under the policy are counted, and left out unless
    keep_unfit (evaluation then scores their left-token-truncated fallback, as score_pairs does)."""
    out = EncodeReport(pairs=[], kept=[])
    for i, pair in enumerate(pairs):
        sides = encode_pair(tokenizer, pair, max_length, truncation)  # type: ignore[arg-type]
        compared = compared_sides(tokenizer, pair, sides, max_length, keep_unfit)
        if compared is None:
            out.identical += 1
            continue
        chosen, rejected = compared
        if not (chosen.fits and rejected.fits):
            out.unfit += 1
            if not keep_unfit:
                continue
        out.truncated += chosen.truncated or rejected.truncated
        out.pairs.append(EncodedPair(chosen.input_ids, rejected.input_ids, pair_margin(pair, margin_column)))
        out.kept.append(i)
    return out


def pair_margin(pair: Mapping[str, Any], column: str) -> float:
    """The pair's margin from `column` (0.0 without a column or a value); ValueError for a NaN or infinite one,
    which would make the first step that trains on it NaN, hours into a run, and for one that is no number."""
    if not column:
        return 0.0
    value = pair.get(column)
    try:
        margin = float(value or 0.0)
    except (TypeError, ValueError):  # float()'s own message names neither the column nor the pair
        raise ValueError(
            f"margin_column {column!r} is {value!r} for pair {pair.get('id', '?')}: not a number; fix or drop the pair"
        ) from None
    if not math.isfinite(margin):
        raise ValueError(f"margin_column {column!r} is {margin} for pair {pair.get('id', '?')}: fix or drop the pair")
    return margin


def bt_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coefficient: float = 0.0,
) -> torch.Tensor:
    """Per-pair Bradley–Terry loss (not reduced)."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if center_coefficient:
        loss = loss + center_coefficient * (r_chosen + r_rejected) ** 2
    return loss


def check_finite(step: int, loss_sum: torch.Tensor, grad_norm: float) -> None:
    """Raise FloatingPointError when a step's loss or gradient norm is NaN or infinite, before the update:
    one step on it would make every weight NaN, and the run would go on to save a NaN final model as done."""
    if not (math.isfinite(grad_norm) and bool(torch.isfinite(loss_sum))):
        raise FloatingPointError(
            f"step {step}: non-finite loss or gradient norm (a diverged model, or a NaN or infinite margin); "
            "no update was made and output_dir's checkpoints are as they were"
        )


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """The LambdaLR factor for a step: linear warm-up over `warmup` steps, then for "linear" a linear
    decay to 0 at `total`; any other kind ("constant") stays at 1.
    """

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "linear":
            return max(0.0, (total - step) / max(1, total - warmup))
        return 1.0

    return fn


class EpochOrder:
    """The global batches of one epoch: one (steps, global_batch) int array, not a Python int a pair.

    `order[k]` is batch k as a list (one batch at a time is small); `rows` is the whole array.
    """

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> list[int]:
        return self.rows[k].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        return (self[k] for k in range(len(self)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EpochOrder) and np.array_equal(self.rows, other.rows)

    __hash__ = None  # type: ignore[assignment]


def _shuffled_range(n: int, rng: random.Random) -> np.ndarray:
    """`rng.shuffle(list(range(n)))` on a flat array: the same swaps and draws, so the same order (and rng
    state) as the list, at 4 bytes a pair instead of ~45 (and faster: ~20 s at 40M pairs on one core)."""
    order = array("i" if n < 2**31 else "q", range(n))
    randbelow = rng._randbelow  # type: ignore[attr-defined]  # what Random.shuffle draws each swap with
    for i in reversed(range(1, n)):
        j = randbelow(i + 1)
        order[i], order[j] = order[j], order[i]
    return np.frombuffer(order, dtype=np.int32 if order.typecode == "i" else np.int64)


def step_order(
    n: int, seed: int, epoch: int, global_batch: int, lengths: Sequence[int] | None, window: int
) -> EpochOrder:
    """The global batches of one epoch: a seeded permutation, optionally length-grouped (pairs sorted by
    length, longest first, within each `window` of batches, and the window's batches shuffled)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    steps = n // global_batch
    rows = _shuffled_range(n, rng)[: steps * global_batch].reshape(steps, global_batch)
    if lengths is None:
        return EpochOrder(rows)
    if window < 1:  # a negative step left `grouped` as np.empty made it: garbage pair indices
        raise ValueError(f"group_window must be >= 1, got {window}")
    widths = np.asarray(lengths)
    grouped = np.empty_like(rows)
    for start in range(0, steps, window):
        pool = rows[start : start + window].ravel()
        # stable, like sorted(key=-length): equal lengths keep their shuffled order
        chunk = pool[np.argsort(-widths[pool], kind="stable")].reshape(-1, global_batch)
        picks = list(range(len(chunk)))
        rng.shuffle(picks)  # the draws a shuffle of the chunk's batches makes
        grouped[start : start + len(chunk)] = chunk[picks]
    return EpochOrder(grouped)


def rank_share(batch: Sequence[int], widths: Sequence[int], rank: int, world: int) -> list[int]:
    """Sort a global batch by length and deal it round-robin, so every rank gets similar work."""
    ordered = sorted(batch, key=lambda i: -widths[i])
    return ordered[rank::world]


def micro_batches(share: Sequence[int], widths: Sequence[int], size: int, max_tokens: int) -> list[list[int]]:
    """Cut a length-sorted share into micro-batches of <= size pairs and <= max_tokens padded tokens (two rows, chosen
    and rejected, a pair)."""
    return cut_in_order(share, widths, size, max_tokens, rows=2)


def packed_micro_batches(
    share: Sequence[int], tokens: Sequence[int], max_tokens: int, max_pairs: int = 0
) -> list[list[int]]:
    """Cut a share into packed rows of <= max_tokens real tokens (both sides of each pair) and <= max_pairs
    pairs (0 = no cap; both 0: one row); a pair longer than the budget gets a row of its own. The pair cap
    is what bounds a row when the token cap is off (max_tokens_per_micro_batch 0), as it bounds a padded
    micro-batch: without it the whole share (or a rank's whole eval set) went into one forward."""
    out: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in share:
        full = (max_tokens and used + tokens[i] > max_tokens) or (max_pairs and len(current) >= max_pairs)
        if current and full:
            out.append(current)
            current, used = [], 0
        current.append(i)
        used += tokens[i]
    if current:
        out.append(current)
    return out


def memory_token_cap(free_bytes: int, params: int, layers: int, hidden: int, checkpointing: bool) -> int:
    """Tokens of one forward whose saved activations fit in half the memory left after the
    training state (the other half is headroom for temporaries and fragmentation)."""
    left = free_bytes - STATE_BYTES_PER_PARAM * params
    per_layer = ACTIVATION_BYTES_PER_TOKEN_HIDDEN_LAYER * hidden
    # With checkpointing only each layer's input (2 bytes per unit in bf16) stays, plus one layer's activations.
    per_token = 2 * hidden * layers + per_layer if checkpointing else per_layer * layers
    return max(0, left // 2 // max(1, per_token))


def auto_token_budget(max_length: int, micro_batch_size: int, device_type: str, memory_tokens: int = 0) -> int:
    """The token budget of one forward when max_tokens_per_micro_batch is -1 (auto).

    CPU: a forward costs its padded tokens and throughput is flat above ~1k tokens, so the
    smallest budget that holds a longest pair wastes least: 2 x max_length, at least 1024.
    GPU: the envelope micro_batch_size longest pairs need (2 x max_length x micro_batch_size),
    so short pairs fill it with more pairs, capped by what memory holds (memory_tokens > 0).
    Never below one longest pair, which always runs.
    """
    one_pair = 2 * max_length
    if device_type == "cpu":
        return max(one_pair, CPU_MIN_TOKENS)
    budget = one_pair * micro_batch_size
    if memory_tokens > 0:
        budget = min(budget, memory_tokens)
    return max(one_pair, budget)
