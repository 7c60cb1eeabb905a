"""A dataset version's shard that no manifest lists yet is not read, nor a version being built in a hidden folder."""

from __future__ import annotations

import json
from pathlib import Path

from synpref.shared.source_files import source_files


def version(folder: Path, listed: list[str], unlisted: list[str], manifest: bool = True) -> None:
    folder.mkdir(parents=True)
    (folder / ".writer.lock").write_text("")
    for name in listed + unlisted:
        (folder / name).write_bytes(b"PAR1")
    if manifest:
        (folder / "manifest.json").write_text(json.dumps({"shards": [{"file": f} for f in listed]}))


def test_a_version_with_no_manifest_yet_contributes_nothing(tmp_path: Path) -> None:
    # Before: its first shard, renamed into place before the manifest that commits it, was read as a loose file
    # (trained on), though the writer deletes it as an orphan on its next open and writes its rows again.
    version(tmp_path / "d" / "v1", [], ["part-00000.parquet"], manifest=False)
    version(tmp_path / "d" / "v2", ["part-00000.parquet"], ["part-00001.parquet"])
    assert source_files(tmp_path) == [tmp_path / "d" / "v2" / "part-00000.parquet"]


def test_a_version_built_in_a_hidden_folder_is_not_read(tmp_path: Path) -> None:
    # The loop builds each version under datasets/.writing/ and moves it into place whole; its manifest there lists
    # the shards written so far, which a scan of datasets/ read as a version.
    version(tmp_path / ".writing" / "synpref" / "kept", ["part-00000.parquet"], [])
    version(tmp_path / "synpref" / "kept", ["part-00000.parquet", "part-00001.parquet"], [])
    kept = tmp_path / "synpref" / "kept"
    assert source_files(tmp_path) == [kept / "part-00000.parquet", kept / "part-00001.parquet"]
