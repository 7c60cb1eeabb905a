"""Padding-free packing for decoder reward models (OpenRLHF's trick).

The chosen and rejected sequences of many pairs are concatenated into one row with
`position_ids` restarting at 0 for each sequence and no attention mask. Transformers reads
the restarts as sequence boundaries: flash-attention kernels run varlen (no token attends
across a boundary and no compute goes to padding); SDPA and eager attention get a
block-diagonal causal mask, which is exact but still costs the whole row's square.
The reward of a sequence is the score head's output at its last token, read through a
forward hook on the head, so the call still goes through the DDP / FSDP / compiled wrapper.

Only decoder heads named `score` (Llama, Qwen, Mistral, Gemma, ... sequence classifiers)
are packed; encoders (BERT's `classifier`) attend both ways and keep padded batches.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch

# Attention implementations that take packed rows as varlen, without a square mask.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def packing_problem(model: Any) -> str:
    """Why the model cannot be packed, or "" when it can."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return "this transformers release does not read packed position_ids (needs >= 4.56)"
    if not isinstance(getattr(model, "score", None), torch.nn.Linear):
        return f"{type(model).__name__} has no decoder `score` head (encoders keep padded batches)"
    if getattr(model.config, "is_encoder_decoder", False):
        return "encoder-decoder models are not packed"
    if packed_sequences_leak(model):
        return f"{type(model).__name__} lets packed sequences attend to each other (it ignores position restarts)"
    return ""


@torch.no_grad()
def packed_sequences_leak(model: Any) -> bool:
    """Whether a sequence's packed reward depends on the sequence packed before it. Some decoders with a `score`
    head (OPT, Falcon, Bloom) build their mask or positions without reading position restarts: packed, every
    sequence attended to the ones before it in its row, and the model was trained and evaluated on that.

    The same row with only the first sequence's tokens changed: the shapes (so the kernels) are the same, and
    where boundaries hold the second reward is the same, in bf16 too."""
    was_training, device = model.training, next(model.parameters()).device
    ids = [t for t in range(1, 64) if t != model.config.pad_token_id][:8]
    tail = ids[6:8]
    flash = getattr(model.config, "_attn_implementation", "") in VARLEN_ATTENTION
    model.eval()  # dropout would differ between the two forwards
    try:
        rewards = []
        for head in (ids[0:3], ids[3:6]):
            capture = ScoreCapture(model.score, model.config.pad_token_id)
            try:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=flash):  # flash kernels take bf16
                    rewards.append(packed_rewards(model, capture, [head, tail], device)[1].float())
            finally:
                capture.handle.remove()
    finally:
        model.train(was_training)
    return not torch.allclose(rewards[0], rewards[1], rtol=1e-5, atol=1e-6)


def flash_attention_installed() -> bool:
    """Whether the flash_attn package can be imported."""
    return importlib.util.find_spec("flash_attn") is not None


class ScoreCapture:
    """Keeps the score head's per-token output of the forward run inside `with capture:`; `pad_id` is the
    model's config.pad_token_id, which decides the token its reward is read at (pack_sequences)."""

    def __init__(self, head: torch.nn.Module, pad_id: int | None = None) -> None:
        self.pad_id = pad_id
        self.armed = False
        self.value: torch.Tensor | None = None
        self.handle = head.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        if self.armed:
            self.value = output

    def __enter__(self) -> ScoreCapture:
        self.armed, self.value = True, None
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.armed = False

    def take(self) -> torch.Tensor:
        """The output captured in the last `with capture:` block, handed over once; RuntimeError if there is none."""
        if self.value is None:
            raise RuntimeError("the score head did not run in the packed forward")
        value, self.value = self.value, None
        return value


def pack_sequences(
    seqs: Sequence[Sequence[int]], device: Any = "cpu", pad_id: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [1, T], position_ids [1, T], index of the token each sequence's reward is read at).

    That token is the one transformers' sequence classifiers read in a padded batch: the last that is not
    `pad_id` (its start if all are). Where a tokenizer has no pad token, EOS stands in for it, and a chat
    template that ends with EOS then has its reward read at the token before: packed rewards must be read
    there too, or a model trained packed is served (and evaluated padded) at a position it never learned.
    """
    lengths = [len(s) for s in seqs]
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    positions = torch.cat([torch.arange(n, dtype=torch.long) for n in lengths])
    ends, start = [], 0
    for s in seqs:
        last = len(s) - 1
        while pad_id is not None and last > 0 and s[last] == pad_id:
            last -= 1
        ends.append(start + last)
        start += len(s)
    return ids[None].to(device), positions[None].to(device), torch.tensor(ends, dtype=torch.long).to(device)


def packed_rewards(
    module: Any,
    capture: ScoreCapture,
    seqs: Sequence[Sequence[int]],
    device: Any,
    forward_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Rewards (score at each sequence's last token) of seqs packed into one row."""
    ids, positions, ends = pack_sequences(seqs, device, capture.pad_id)
    # Transformers reads position restarts as boundaries only without a cache (and without a mask).
    kwargs = {**(forward_kwargs or {}), "use_cache": False}
    with capture:
        module(input_ids=ids, position_ids=positions, **kwargs)
    return capture.take()[0, ends, 0]
