"""Checkpoint pieces of the Bradley–Terry trainer: full state dicts (gathered under FSDP),
optimizer state, per-rank RNG states, and finding / pruning checkpoint-N folders.

A checkpoint is an HF folder plus `trainer_state.pt` (optimizer, scheduler, step, RNG).
The data order is a function of (seed, epoch), so the step number is the data position.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synpref.shared.files import fsync_tree, replace_durably

TRAINER_STATE = "trainer_state.pt"


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


def read_trainer_state(checkpoint: Path, mmap: bool = True) -> dict[str, Any]:
    """A checkpoint's trainer_state.pt, memory-mapped unless `mmap` is False. Under FSDP every rank reads the whole
    optimizer state and keeps its shard: read into each rank's own memory that is the whole state once per rank
    (Adam's moments of an 8B model are 64 GB, times 8 ranks); mapped, the ranks share one copy in the page cache.
    Off where the optimizer would keep the loaded tensors themselves (unsharded, on the CPU): they would hold the
    file's disk space after the checkpoint is pruned."""
    return torch.load(checkpoint / TRAINER_STATE, map_location="cpu", weights_only=False, mmap=mmap)  # type: ignore[no-any-return]


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
