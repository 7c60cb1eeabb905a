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
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synpref.shared.files import fsync_tree, replace_durably
from synpref.training.batching import EncodedPair
from synpref.training.token_store import PairStore

TRAINER_STATE = "trainer_state.pt"
# write_checkpoint's folders next to a save (checkpoint-N or final): the new one being written, and the previous
# one moved aside while the new one is renamed in.
TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"
_NUMBERED = re.compile(r"checkpoint-[0-9]+")
_ASIDE = re.compile(r"(checkpoint-[0-9]+|final)(\.tmp|\.old)")

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
    # Whole names only: checkpoint-N.tmp (unfinished) and checkpoint-N.old (being replaced) are no checkpoints.
    return sorted((p for p in root.glob("checkpoint-*") if _NUMBERED.fullmatch(p.name)), key=_step_of)


def _remove(folder: Path) -> None:
    # rmtree refuses a link (ignore_errors hides it): the link would stay for a later resume to take.
    if folder.is_symlink():
        folder.unlink()
    else:
        shutil.rmtree(folder, ignore_errors=True)


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
        _remove(old)


def remove_checkpoints(output_dir: Path) -> list[Path]:
    """Remove every checkpoint-N folder (another run's, when a run starts without resuming); returns them.
    check_source has refused a run that starts from one. A checkpoint-N that is a link loses the link only.

    Left in place they outlive this run's own: save_total_limit keeps the highest step numbers, so an old
    run's checkpoint-900 pruned this run's checkpoint-100 at once, and a later resume took the old run's."""
    if not output_dir.is_dir():
        return []
    # Saves killed mid-replacement first: a checkpoint-N renamed in after this would outlive this run's own.
    remove_partial_saves(output_dir)
    stale = _numbered(output_dir)
    for old in stale:
        log.warning("removing %s: a checkpoint of an earlier run, and this run does not resume", old)
        _remove(old)
    return stale


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _finish_replacement(path: Path) -> list[Path]:
    """Bring a save `path` (checkpoint-N or final) killed in write_checkpoint to one whole folder; returns the
    folders removed. path.old (the previous save moved aside) exists only once path.tmp is complete and fsynced,
    so with no path, path.tmp is renamed in; a path.tmp with no path.old is unfinished and removed."""
    tmp, old = path.with_name(path.name + TMP_SUFFIX), path.with_name(path.name + OLD_SUFFIX)
    whole = tmp.is_dir() and not tmp.is_symlink()
    aside = old.is_dir() or old.is_symlink()  # path moved aside: a folder, or a link to one
    if aside and not _present(path):
        # Killed between the two renames. Without its .tmp (removed by hand), the previous save is put back.
        log.warning("renaming %s to %s: its save was stopped between the two renames", tmp if whole else old, path)
        replace_durably(tmp if whole else old, path)
        aside, whole = _present(old), False
    removed = []
    if aside:
        log.warning("removing %s: the save it held was replaced", old)
        _remove(old)
        removed.append(old)
    if whole:
        log.warning("removing %s: a save that did not finish (its run was stopped while writing it)", tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def remove_partial_saves(output_dir: Path) -> list[Path]:
    """Finish or undo the saves (checkpoint-N, final) of output_dir killed in write_checkpoint; returns the
    folders removed. An unfinished path.tmp is removed: left alone, each (a whole model, maybe with its optimizer
    state) stayed until that step's save. A kill between moving the previous save aside and renaming the new one
    in left no path: the new one (complete) is renamed in, else the next start removed it and the save was lost."""
    bases = {m[1] for p in output_dir.iterdir() if (m := _ASIDE.fullmatch(p.name))} if output_dir.is_dir() else set()
    return [gone for base in sorted(bases) for gone in _finish_replacement(output_dir / base)]


def check_source(source: str, output_dir: Path) -> None:
    """Raise ValueError when a run starts from a model that is (or lies in) one of output_dir's checkpoint-N
    folders or its final folder, links resolved on both sides. Whether or not the run saves checkpoints:
    - checkpoint-N: a save of step N replaces it, save_total_limit's rotation removes it, and kept (a run that
      saves none), a later resume: true in output_dir took that other run's state for this run's;
    - final: this run's end replaces it, so a rerun of the same config started from this run's model, and a kill
      between deleting the old folder and renaming the new one in lost the model the config names."""
    if not Path(source).exists():
        return
    start, root = Path(source).resolve(), output_dir.resolve()
    for folder in [*_numbered(output_dir), output_dir / "final"]:
        target = folder.resolve()
        if start != target and not start.is_relative_to(target):
            continue
        where = "is" if start == target else "lies in"
        if folder.name == "final":
            why = "this run's final save replaces it (a rerun of this config would start from this run's model)"
            instead = ""
        else:
            why = (
                "this run's saves would replace it or save_total_limit's rotation remove it, and a later resume "
                "would take that other run's state for this run's"
            )
            instead = ", or set resume: true to continue from output_dir's newest checkpoint"
        raise ValueError(
            f"model_name_or_path {start} {where} {folder.name} of output_dir {root}: {why}. Copy it out of "
            f"output_dir (or use another output_dir){instead}"
        )


def data_order(train: Sequence[EncodedPair], config: Any) -> dict[str, Any]:
    """What decides the pairs of every step (so what a checkpoint's step number means): the training pairs,
    fingerprinted by every side's token ids and length in order, chosen before rejected (so a relabelled set,
    some pairs' sides swapped, differs), and the order's config (seed, global batch, length grouping).
    With a margin_column and a non-zero margin, the margins too (margins_sha256): the loss subtracts them, so a
    resume on other margins would mix two objectives. A margin-free set's fingerprint has no such entry, as
    before margins were fingerprinted, so its earlier checkpoints still resume."""
    if isinstance(train, PairStore):
        offsets, ids, margins = train.offsets, train.ids, train.margins
    else:
        sides = [side for pair in train for side in (pair.chosen, pair.rejected)]
        offsets = np.zeros(len(sides) + 1, dtype=np.int64)
        np.cumsum([len(side) for side in sides], out=offsets[1:])
        ids = np.fromiter((t for side in sides for t in side), dtype=np.int32, count=int(offsets[-1]))
        margins = np.fromiter((pair.margin for pair in train), dtype=np.float64, count=len(train))
    digest = hashlib.sha256(np.ascontiguousarray(offsets, dtype=np.int64).data)
    digest.update(np.ascontiguousarray(ids, dtype=np.int32).data)
    order = {"pairs": len(train), "pair_ids_sha256": digest.hexdigest(), "seed": config.seed}
    if config.margin_column and np.any(margins != 0):
        order["margins_sha256"] = hashlib.sha256(np.ascontiguousarray(margins, dtype=np.float64).data).hexdigest()
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
    if "pair_ids_sha256" not in saved:
        raise ValueError(
            f"cannot resume from {checkpoint}: pair_ids_sha256 not recorded, it was written by an earlier version "
            "whose data fingerprint (token counts) did not tell a relabelled dataset (chosen and rejected swapped) "
            "from this one; set resume: false to start over, or use another output_dir"
        )
    # Over both sides' keys: a run that had an entry this one lacks (margins, a length grouping's window) differs.
    keys = [*now, *(k for k in saved if k not in now)]
    changed = [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]
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


def restore_state(
    path: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    strategy: str,
    rank: int,
    *,
    mmap: bool,
    order: dict[str, Any],
) -> int:
    """Load a checkpoint's optimizer, scheduler and this rank's RNG states into a run; returns the checkpoint's
    step. `mmap` and `order` as read_trainer_state takes them (a checkpoint of other data or order is refused)."""
    state = read_trainer_state(path, mmap, order)
    load_optimizer_state(model, optimizer, state["optimizer"], strategy)
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    set_rng_state(rng[rank] if rank < len(rng) and rng[rank] is not None else rng[0])
    log.info("resumed from %s at step %d", path, int(state["step"]))
    return int(state["step"])


def write_checkpoint(
    path: Path, model: Any, tokenizer: Any, weights: dict[str, Any], trainer_state: dict[str, Any] | None
) -> None:
    """Write an HF folder (plus trainer_state.pt when given) to path.tmp and fsync it; then move the previous
    path aside to path.old, rename path.tmp to path and remove path.old, each rename made durable. A kill or a
    power loss at any point leaves the previous save or this one whole, and remove_partial_saves keeps it."""
    tmp, old = path.with_name(path.name + TMP_SUFFIX), path.with_name(path.name + OLD_SUFFIX)
    # An earlier replacement killed mid-way is finished first: path.old marks path.tmp complete, and this
    # write would otherwise turn that path.tmp into a partial one.
    _finish_replacement(path)
    _remove(tmp)  # a link or file of that name: not written through
    model.save_pretrained(str(tmp), state_dict=weights)
    tokenizer.save_pretrained(str(tmp))
    if trainer_state is not None:
        torch.save(trainer_state, tmp / TRAINER_STATE)
    fsync_tree(tmp)
    if _present(path):
        replace_durably(path, old)
    replace_durably(tmp, path)
    _remove(old)
