"""Review 45 (G), a save that a kill cannot lose: write_checkpoint deleted the previous checkpoint-N or final and then
renamed the new one in, so a kill between the two left only path.tmp, and the next start removed it as unfinished.
Now the previous save is moved aside (path.old) and remove_partial_saves finishes whatever a kill left."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from synpref.training import checkpointing
from synpref.training.checkpointing import (
    TRAINER_STATE,
    latest_checkpoint,
    prune_checkpoints,
    remove_checkpoints,
    remove_partial_saves,
    write_checkpoint,
)


class Saver:
    """A model or tokenizer whose save_pretrained writes one file naming its version."""

    def __init__(self, name: str, version: str) -> None:
        self.name, self.version = name, version

    def save_pretrained(self, folder: str, state_dict: object = None) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        Path(folder, self.name).write_text(self.version)


def save(path: Path, version: str) -> None:
    write_checkpoint(path, Saver("model.txt", version), Saver("tokenizer.txt", version), {}, {"step": version})


def version_of(path: Path) -> str:
    """The version a whole save holds (both files from the same save, and its trainer state)."""
    model, tokenizer = (path / "model.txt").read_text(), (path / "tokenizer.txt").read_text()
    assert model == tokenizer and (path / TRAINER_STATE).exists()
    return model


class Killed(BaseException):
    """A kill: nothing after it runs (not even except Exception handlers)."""


def kill_at(monkeypatch, step: int) -> list[str]:
    """Kill write_checkpoint at its `step`-th rename or removal (0 first); returns the steps' names as they ran."""
    done: list[str] = []

    def counted(name, real):
        def run(*args, **kwargs):
            if len(done) == step:
                raise Killed
            done.append(f"{name}({Path(args[0]).name})")
            return real(*args, **kwargs)

        return run

    monkeypatch.setattr(checkpointing, "replace_durably", counted("rename", checkpointing.replace_durably))
    monkeypatch.setattr(checkpointing.shutil, "rmtree", counted("rmtree", checkpointing.shutil.rmtree))
    return done


@pytest.mark.parametrize("name", ["final", "checkpoint-4"])
def test_a_kill_at_any_step_of_a_save_leaves_the_previous_or_the_new_one(tmp_path, monkeypatch, name):
    steps, step = None, 0
    while True:
        out = tmp_path / f"run{step}"
        out.mkdir()
        save(out / name, "previous")
        with monkeypatch.context() as patch:
            done = kill_at(patch, step)
            try:
                save(out / name, "new")
                steps = done
            except Killed:
                pass
        remove_partial_saves(out)  # the next start
        # Before: killed between deleting the previous save and renaming the new one in, neither was left.
        assert [p.name for p in out.iterdir()] == [name], (step, done)
        if steps is not None:  # the save ran to its end: no kill point left to try
            assert version_of(out / name) == "new"
            break
        assert version_of(out / name) in ("previous", "new"), (step, done)
        step += 1
    assert "rename(final)" in steps or "rename(checkpoint-4)" in steps  # the previous save moved aside


@pytest.mark.parametrize("name", ["final", "checkpoint-4"])
def test_a_kill_between_the_renames_keeps_the_new_save(tmp_path, monkeypatch, name):
    path = tmp_path / name
    save(path, "previous")
    real = checkpointing.replace_durably

    def killed_renaming_in(src: Path, dst: Path) -> None:
        if src.name.endswith(".tmp"):
            raise Killed
        real(src, dst)

    monkeypatch.setattr(checkpointing, "replace_durably", killed_renaming_in)
    with pytest.raises(Killed):
        save(path, "new")
    monkeypatch.undo()
    # Before: only path.tmp (whole, fsynced) was left, and remove_partial_saves deleted it: final, the run's
    # model, was gone; a later resume found no checkpoint-4.
    assert remove_partial_saves(tmp_path) == [tmp_path / f"{name}.old"]
    assert version_of(path) == "new" and [p.name for p in tmp_path.iterdir()] == [name]
    if name != "final":
        assert latest_checkpoint(tmp_path) == path


def make_save(path: Path, version: str) -> None:
    path.mkdir()
    for name in ("model.txt", "tokenizer.txt"):
        (path / name).write_text(version)
    (path / TRAINER_STATE).write_bytes(b"state")


@pytest.mark.parametrize(
    ("present", "kept"),
    [
        ({"final.old": "a", "final.tmp": "b"}, "b"),  # killed between the renames: the new one is whole
        ({"final.old": "a", "final": "b"}, "b"),  # killed removing the previous one
        ({"final.tmp": "b", "final": "a"}, "a"),  # killed writing the new one
        ({"final.old": "a"}, "a"),  # its .tmp removed by hand: the previous one is put back
        ({"final.tmp": "b"}, None),  # a first save killed while writing
    ],
)
def test_the_next_start_finishes_every_state_a_kill_leaves(tmp_path, present, kept):
    for name, version in present.items():
        make_save(tmp_path / name, version)
    remove_partial_saves(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == (["final"] if kept else [])
    if kept:
        assert version_of(tmp_path / "final") == kept


class KilledSaver(Saver):
    def save_pretrained(self, folder: str, state_dict: object = None) -> None:
        raise Killed


def test_a_save_after_a_kill_between_the_renames_does_not_write_into_the_whole_new_one(tmp_path):
    make_save(tmp_path / "final.old", "a")
    make_save(tmp_path / "final.tmp", "b")  # whole: it was fsynced before final was moved aside
    with pytest.raises(Killed):  # killed writing "c" into final.tmp: its model written, not its tokenizer
        write_checkpoint(tmp_path / "final", Saver("model.txt", "c"), KilledSaver("tokenizer.txt", "c"), {}, {})
    remove_partial_saves(tmp_path)
    # Written into final.tmp beside final.old, the next start took the half-written "c" for a whole save.
    assert version_of(tmp_path / "final") == "b" and [p.name for p in tmp_path.iterdir()] == ["final"]


def test_a_fresh_run_does_not_bring_back_a_checkpoint_killed_mid_replacement(tmp_path):
    make_save(tmp_path / "checkpoint-8.old", "a")
    make_save(tmp_path / "checkpoint-8.tmp", "b")  # an earlier run's, complete
    assert remove_checkpoints(tmp_path) == [tmp_path / "checkpoint-8"]
    # Before: checkpoint-8.old stayed; with the recovery alone, the next remove_partial_saves renamed checkpoint-8
    # in after remove_checkpoints had run, and a later resume took the earlier run's state for this run's.
    remove_partial_saves(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_an_old_or_tmp_folder_is_never_a_checkpoint(tmp_path):
    make_save(tmp_path / "checkpoint-2", "a")
    for name in ("checkpoint-9.old", "checkpoint-9.tmp", "checkpoint-x9", "checkpoint-old-9"):
        make_save(tmp_path / name, "b")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    prune_checkpoints(tmp_path, 1)
    assert len(list(tmp_path.iterdir())) == 5


def test_pruning_removes_a_linked_checkpoint_but_not_its_target(tmp_path):
    elsewhere = tmp_path / "kept" / "checkpoint-1"
    elsewhere.parent.mkdir()
    make_save(elsewhere, "a")
    out = tmp_path / "o"
    out.mkdir()
    os.symlink(elsewhere, out / "checkpoint-1")
    for step in (2, 3):
        make_save(out / f"checkpoint-{step}", "b")
    prune_checkpoints(out, 2)
    # Before: rmtree(ignore_errors) refused the link silently, and it outlived the rotation.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert version_of(elsewhere) == "a"
