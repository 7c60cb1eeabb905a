"""Checkpoint pieces of the Bradley–Terry trainer: full state dicts (gathered under FSDP),
optimizer state, per-rank RNG states, and finding / pruning checkpoint-N folders.

A checkpoint is an HF folder plus `trainer_state.pt` (optimizer, scheduler, step, RNG).
The data order is a function of (seed, epoch), so the step number is the data position; a checkpoint records
what decides that order (data_order), and a resume on other data or in another order is refused.
"""

from __future__ import annotations

import hashlib
import logging
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synpref.shared.files import fsync_tree, replace_durably

TRAINER_STATE = "trainer_state.pt"

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch RNG states (and every CUDA device's when CUDA is there)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states `rng_state` returned; the CUDA ones when the state holds them and CUDA is available."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[-1])


def _numbered(root: Path) -> list[Path]:
    return sorted((p for p in root.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()), key=_step_of)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """Newest complete checkpoint-N folder (temporary .tmp folders are ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    done = [p for p in _numbered(root) if (p / TRAINER_STATE).exists()]
    return done[-1] if done else None


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Remove all but the newest `keep` checkpoint-N folders."""
    for old in _numbered(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def remove_checkpoints(output_dir: Path, source: str = "") -> list[Path]:
    """Remove every checkpoint-N folder (another run's, when a run starts without resuming) but the model this
    run started from (`source`, its model_name_or_path); returns the removed ones.

    Left in place they outlive this run's own: save_total_limit keeps the highest step numbers, so an old
    run's checkpoint-900 pruned this run's checkpoint-100 at once, and a later resume took the old run's."""
    start = Path(source).resolve() if source else None
    stale = [p for p in _numbered(output_dir) if p.resolve() != start] if output_dir.is_dir() else []
    for old in stale:
        log.warning("removing %s: a checkpoint of an earlier run, and this run does not resume", old)
        shutil.rmtree(old, ignore_errors=True)
    return stale


def data_order(train_tokens: Sequence[int], config: Any) -> dict[str, Any]:
    """What decides the pairs of every step (so what a checkpoint's step number means): the training pairs,
    fingerprinted by their token counts, and the order's config (seed, global batch, length grouping)."""
    digest = hashlib.sha256(np.ascontiguousarray(train_tokens, dtype=np.int64).data).hexdigest()
    order = {"pairs": len(train_tokens), "pair_tokens_sha256": digest, "seed": config.seed}
    order.update(global_batch_size=config.global_batch_size, group_by_length=config.group_by_length)
    if config.group_by_length:
        order["group_window"] = config.group_window
    return order


def check_data_order(checkpoint: Path, saved: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """Raise ValueError when a checkpoint's run took its steps from other data or in another order than this
    run would: resumed, its step N would be another place in other data (pairs trained twice or never).
    Checkpoints written before the order was recorded (saved None) are taken as they are."""
    if saved is None:
        return
    changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in now.items() if saved.get(k) != v]
    if changed:
        raise ValueError(
            f"cannot resume from {checkpoint}: it was trained on other data or in another order "
            f"({'; '.join(changed)}); set resume: false to start over, or use another output_dir"
        )


def full_state_dict(model: Any, strategy: str) -> dict[str, Any]:
    """The whole model's weights on the CPU (gathered from the shards under FSDP)."""
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def optimizer_state(model: Any, optimizer: torch.optim.Optimizer, strategy: str) -> dict[str, Any]:
    """The optimizer's state dict; under FSDP ("fsdp" strategy) gathered in full onto the CPU."""
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def load_optimizer_state(model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any], strategy: str) -> None:
    """Load a state dict `optimizer_state` wrote into `optimizer` (sharding it again under FSDP)."""
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def read_trainer_state(checkpoint: Path, mmap: bool = True, order: dict[str, Any] | None = None) -> dict[str, Any]:
    """A checkpoint's trainer_state.pt, memory-mapped unless `mmap` is False. Under FSDP every rank reads the whole
    optimizer state and keeps its shard: read into each rank's own memory that is the whole state once per rank
    (Adam's moments of an 8B model are 64 GB, times 8 ranks); mapped, the ranks share one copy in the page cache.
    Off where the optimizer would keep the loaded tensors themselves (unsharded, on the CPU): they would hold the
    file's disk space after the checkpoint is pruned. With `order` (this run's data_order), check_data_order first."""
    state: dict[str, Any] = torch.load(checkpoint / TRAINER_STATE, map_location="cpu", weights_only=False, mmap=mmap)
    if order is not None:
        check_data_order(checkpoint, state.get("order"), order)
    return state


def write_checkpoint(
    path: Path, model: Any, tokenizer: Any, weights: dict[str, Any], trainer_state: dict[str, Any] | None
) -> None:
    """Write an HF folder (plus trainer_state.pt when given) to path.tmp, fsync it, then rename it to path,
    so a kill or a power loss mid-write leaves the previous checkpoint whole and this one absent or whole."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), state_dict=weights)
    tokenizer.save_pretrained(str(tmp))
    if trainer_state is not None:
        torch.save(trainer_state, tmp / TRAINER_STATE)
    fsync_tree(tmp)
    shutil.rmtree(path, ignore_errors=True)
    replace_durably(tmp, path)
