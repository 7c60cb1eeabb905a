"""Review: Hugging Face save_to_disk folders as pair input, unique simulated-judge names, and configuration errors
that name the environment variable that set the bad value."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pytest

from synpref.shared.config import ConfigError, StudySettings, load_settings
from synpref.shared.source_files import SourceError, iter_records, source_files
from synpref.shared.sources import iter_source

ROWS = [{"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]


@pytest.fixture(autouse=True)
def _no_synpref_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("SYNPREF_"):
            monkeypatch.delenv(name)


def test_a_dataset_save_to_disk_folder_gives_its_pairs_and_not_its_metadata(tmp_path: Path) -> None:
    """state.json and dataset_info.json were read as pair files (errors), and the .arrow data was never read."""
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "prefs"))
    assert {p.name for p in (tmp_path / "prefs").iterdir()} >= {"state.json", "dataset_info.json"}

    assert [p.name for p in source_files(tmp_path)] == ["data-00000-of-00001.arrow"]
    rows = list(iter_source(tmp_path))
    assert [r.error for r in rows] == [None] * 5
    assert [r.pair["chosen"][0]["content"] for r in rows if r.pair] == [f"good {i}" for i in range(5)]
    assert {r.pair["source"] for r in rows if r.pair} == {"prefs"}  # the dataset's name, not "data-00000-of-00001"


def test_a_dataset_dict_folder_gives_every_split_and_not_dataset_dict_json(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    part = datasets.Dataset.from_list(ROWS)
    datasets.DatasetDict({"train": part, "test": part.select(range(2))}).save_to_disk(str(tmp_path / "prefs"))

    files = source_files(tmp_path / "prefs")
    assert [p.relative_to(tmp_path).as_posix() for p in files] == [
        "prefs/test/data-00000-of-00001.arrow",
        "prefs/train/data-00000-of-00001.arrow",
    ]
    rows = list(iter_source(tmp_path / "prefs"))
    assert [r.error for r in rows] == [None] * 7
    assert sorted({r.pair["source"] for r in rows if r.pair}) == ["prefs/test", "prefs/train"]


def _stream(path: Path, batches: int, rows: int = 3) -> None:
    table = pa.Table.from_pylist(ROWS[:rows])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for _ in range(batches):
            writer.write_table(table)


def test_an_arrow_stream_is_read_batch_by_batch(tmp_path: Path) -> None:
    """Rows come one record batch at a time: a damaged stream still gives the batches before the damage, so
    nothing holds the whole table."""
    path = tmp_path / "part.arrow"
    _stream(path, batches=3)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) - 40])  # the last batch cut short
    records = iter_records(path)
    got = [next(records)[1] for _ in range(6)]
    assert [r["chosen"] for r in got] == ["good 0", "good 1", "good 2"] * 2
    with pytest.raises((OSError, ValueError)):
        list(records)


def test_an_arrow_ipc_file_is_read_and_junk_is_a_source_error(tmp_path: Path) -> None:
    table = pa.Table.from_pylist(ROWS)
    with pa.OSFile(str(tmp_path / "random_access.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    assert [r[1]["rejected"] for r in iter_records(tmp_path / "random_access.arrow")] == [f"bad {i}" for i in range(5)]
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(SourceError, match=r"junk\.arrow"):
        list(iter_records(tmp_path / "junk.arrow"))


def test_a_hand_made_save_to_disk_folder_reads_only_the_files_state_json_lists(tmp_path: Path) -> None:
    """The layout save_to_disk writes, without the datasets package; a stale shard not listed is not read."""
    folder = tmp_path / "ds"
    folder.mkdir()
    _stream(folder / "data-00000-of-00001.arrow", batches=1)
    _stream(folder / "data-00000-of-00002.arrow", batches=1)  # left over from an earlier save
    (folder / "state.json").write_text('{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
    (folder / "dataset_info.json").write_text('{"features": {}}')
    assert source_files(tmp_path) == [folder / "data-00000-of-00001.arrow"]
    assert [r.error for r in iter_source(tmp_path)] == [None] * 3


def test_two_simulated_judges_with_one_name_are_refused() -> None:
    """Votes and seeded beliefs are keyed by the judge's name: two such judges voted as one."""
    with pytest.raises(ValueError, match="more than once"):
        StudySettings(judges=[{"name": "sim", "accuracy": 0.9}, {"name": "sim", "accuracy": 0.6}])
    with pytest.raises(ConfigError, match=r"controller\.study\.judges.*'sim'"):
        load_settings(controller={"study": {"judges": [{"name": "sim"}, {"name": "sim"}]}})
    assert len(StudySettings(judges=[{"name": "a"}, {"name": "b"}]).judges) == 2


def test_an_invalid_value_from_the_environment_names_the_variable_not_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "synpref.yaml"
    path.write_text("writer:\n  shard_rows: 0\n")
    monkeypatch.setenv("SYNPREF_CONTROLLER__SEED_PAIRS", "many")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    lines = str(caught.value).splitlines()
    env_line = next(line for line in lines if line.strip().startswith("controller.seed_pairs"))
    assert "SYNPREF_CONTROLLER__SEED_PAIRS" in env_line and "synpref.yaml" not in env_line
    file_line = next(line for line in lines if line.strip().startswith("writer.shard_rows"))
    assert "synpref.yaml" in file_line and "SYNPREF_" not in file_line


def test_a_section_set_as_json_in_the_environment_is_named_for_its_bad_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The section's JSON is merged with the file's section: either could hold the bad field."""
    path = tmp_path / "synpref.yaml"
    path.write_text("writer:\n  shard_rows: 0\n")
    monkeypatch.setenv("SYNPREF_WRITER", '{"flush_interval_s": 2}')
    with pytest.raises(ConfigError, match=r"writer\.shard_rows: .*\(set by SYNPREF_WRITER or in .*synpref\.yaml\)"):
        load_settings(path)
