"""The folder a run's model trains in under a workdir that outlives runs (a kept workdir, a store_dir of its own).

The trainer resumes from the newest checkpoint in its output folder. Shared between runs, a new run resumed the
earlier run's checkpoint (refused as other data on every attempt, or taken silently when only labels changed) and
overwrote the model the earlier run's registry points at. Each run claims its own folder instead; a restart of the
run finds it again and resumes its own checkpoints. Local trainers (models.FullModels) and Jobs (cluster_models) alike.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from synpref.shared.files import write_text_atomic

RUN_FILE = ".synpref-run"
"""In a model's output folder: the id of the run that trains there."""


def run_id(workdir: Path, new: bool = False) -> str:
    """This run's id: 8 hex digits made once (again when `new`) and kept in workdir/run_id, so restarts find their
    folders and Jobs."""
    path = workdir / "run_id"
    if new or not path.exists():
        write_text_atomic(path, uuid.uuid4().hex[:8] + "\n")
    return path.read_text().strip()


def claim_folder(out_dir: Path, name: str, run: str, adopting: bool = False) -> Path:
    """The folder run `run` trains model `name` in: out_dir/name, claimed for the run (RUN_FILE) when it is empty,
    else out_dir/<name>-<run>. `adopting`: an unclaimed, non-empty out_dir/name is the run's own (a Job of this
    run that started before folders were claimed, an upgrade while it ran, trains there)."""
    own, folder = out_dir / f"{name}-{run}", out_dir / name
    if own.is_dir():
        return own
    try:
        claimed: str | None = (folder / RUN_FILE).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        claimed = None
    if claimed == run:
        return folder
    if claimed is None and (not folder.exists() or not any(folder.iterdir())):
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / RUN_FILE, run + "\n")
        return folder
    if claimed is None and adopting:
        return folder
    own.mkdir(parents=True, exist_ok=True)
    return own
