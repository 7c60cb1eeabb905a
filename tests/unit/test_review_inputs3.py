"""Review: a JSON list file is read record by record (not loaded whole), and a folder scan reads neither the
cache-*.arrow files nor the dataset_info.json of a Hugging Face `datasets` folder as pair files, and a null
prompt column does not hide the prompt another column holds."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synpref.shared import source_files
from synpref.shared.source_files import SourceError, iter_records
from synpref.shared.sources import iter_source

TRICKY = [
    {"prompt": "brackets ] [ and braces } { in text", "chosen": 'a "quoted" ]}, word', "rejected": "back\\slash\\"},
    {"prompt": "unicode \u00e9\u4e2d\U0001f600 and \\u0041 literal", "chosen": "\n\t\r", "rejected": '"}]'},
    {"prompt": "numbers", "chosen": 1234567890123, "rejected": -1.25e-7, "n": [1, [2, [3, {}]], []], "t": True},
    {"prompt": "", "chosen": None, "rejected": False, "meta": {"k": "v ] , }", "empty": {}}},
    [1, 2, "not an object"],
    "a string record",
    98765,
    -1.5e300,
    0.25,
    1234.5678e-3,
    {"prompt": "\u0000\u001f control escapes", "chosen": "x" * 300, "rejected": "y"},
]


def _write(path: Path, text: str, bom: bool = False) -> Path:
    data = (b"\xef\xbb\xbf" if bom else b"") + text.encode()
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def _records(path: Path) -> list:
    rows = list(iter_records(path))
    assert [i for i, _, _ in rows] == list(range(len(rows)))
    assert all(error is None for _, _, error in rows)
    return [record for _, record, _ in rows]


def test_a_json_list_file_is_read_record_by_record_not_held_whole(tmp_path: Path) -> None:
    """A .json list was loaded whole with json.load (its text and every record at once): tens of GB at 40M pairs,
    where JSON lines, Parquet and Arrow stream."""
    path = tmp_path / "big.json"
    with path.open("w") as fh:
        fh.write("[\n")
        for i in range(40_000):
            row = {"prompt": f"question {i} " + "q" * 200, "chosen": f"good {i}", "rejected": f"bad {i} " + "r" * 100}
            fh.write(("," if i else "") + json.dumps(row) + "\n")
        fh.write("]\n")
    size = path.stat().st_size
    assert size > 14_000_000
    count = 0
    tracemalloc.start()
    try:
        for _, record, _ in iter_records(path):
            count += record is not None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 40_000
    assert peak < size / 5, f"peak {peak} bytes for a {size}-byte file"


@pytest.mark.parametrize("window", [1, 2, 3, 5, 7, 16, 64, 1 << 18])
@pytest.mark.parametrize("name", ["pairs.json", "pairs.json.gz"])
def test_a_json_list_read_in_windows_gives_what_json_load_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window: int, name: str
) -> None:
    """Records split at every place by the read window (strings holding brackets, braces, escaped quotes and
    unicode escapes, numbers, nesting) come out equal to json.load's, with a BOM and with gzip."""
    monkeypatch.setattr(source_files, "JSON_WINDOW", window, raising=False)
    text = json.dumps(TRICKY, indent=1) + "\n\n"
    assert _records(_write(tmp_path / name, text, bom=True)) == json.loads(text)
    compact = json.dumps(TRICKY, ensure_ascii=False, separators=(",", ":"))
    assert _records(_write(tmp_path / name, compact)) == TRICKY
    wrapped = json.dumps({"version": "1", "meta": {"list": "[1]", "n": 3}, "data": TRICKY, "end": None})
    assert _records(_write(tmp_path / name, wrapped)) == TRICKY
    assert _records(_write(tmp_path / name, " [ ] ")) == []
    assert _records(_write(tmp_path / name, '{"rows": []}')) == []


@pytest.mark.parametrize("window", [1, 4, 1 << 18])
@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n ",
        "[",
        "[1,]",
        "[1 2]",
        '[{"a": 1},\n {"a": x}]',
        '[{"a": "unterminated',
        '[{"a": 1}] [2]',
        '[{"a": "bad \\q escape"}]',
        '[{"a": "raw\nnewline"}]',
        '[{"a": 1}, \n\n  {"b": 2}\n  {"c": 3}]',
        '{"data": [1, 2], }',
        '{"data": [1, 2] "x": 1}',
        '{"data" [1]}',
        "{3: [1]}",
        "nul",
    ],
)
def test_malformed_json_fails_the_file_with_json_loads_message_and_position(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window: int, text: str
) -> None:
    monkeypatch.setattr(source_files, "JSON_WINDOW", window, raising=False)
    path = _write(tmp_path / "bad.json", text)
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(SourceError) as got:
        list(iter_records(path))
    assert str(got.value) == f"{path}: invalid JSON: {expected.value}"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"a": 1, "b": "x"}', "one list in an object"),
        ("{}", "one list in an object"),
        ("5", "not int"),
        ('"text"', "not str"),
        ("null", "not NoneType"),
    ],
)
def test_a_json_file_without_one_list_is_a_source_error(tmp_path: Path, text: str, why: str) -> None:
    with pytest.raises(SourceError, match=why):
        list(iter_records(_write(tmp_path / "x.json", text)))


def test_invalid_utf8_in_a_json_list_is_a_source_error(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_bytes(b'[{"a": "\xff"}]')
    with pytest.raises(SourceError, match="invalid JSON"):
        list(iter_records(path))


def test_a_deeply_nested_json_record_is_a_source_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.json", "[" + "[" * 100_000 + "]" * 100_000 + "]")
    with pytest.raises(SourceError, match="nested too deeply"):
        list(iter_records(path))


ROWS = [{"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]


def _arrow_stream(path: Path, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _dataset_info() -> str:
    # What `datasets` writes beside the Arrow files of its cache folder (a load_dataset result, no state.json).
    features = {name: {"dtype": "string", "_type": "Value"} for name in ("prompt", "chosen", "rejected")}
    return json.dumps(
        {
            "description": "",
            "citation": "",
            "features": features,
            "builder_name": "json",
            "config_name": "default",
            "splits": {"train": {"name": "train", "num_examples": 4, "dataset_name": "json"}},
            "download_checksums": {},
            "dataset_size": 100,
        }
    )


def _cache_folder(root: Path) -> Path:
    folder = root / "json" / "default-1a2b" / "0.0.0" / "abc123"
    folder.mkdir(parents=True)
    _arrow_stream(folder / "json-train.arrow", ROWS)
    return folder


def test_a_folder_scan_skips_the_cache_arrow_files_of_datasets(tmp_path: Path) -> None:
    """cache-*.arrow (a map/filter result `datasets` keeps beside the data) was read as more pairs: the rows
    counted twice, or more."""
    folder = _cache_folder(tmp_path)
    _arrow_stream(folder / "cache-5f1e2d3c4b.arrow", ROWS)
    _arrow_stream(folder / "cache-5f1e2d3c4b_00000_of_00002.arrow", ROWS[:2])
    _arrow_stream(tmp_path / "loose.arrow", ROWS[:1])  # any other .arrow name stays a pair file

    assert source_files.source_files(tmp_path) == [folder / "json-train.arrow", tmp_path / "loose.arrow"]
    rows = list(iter_source(tmp_path))
    assert [r.error for r in rows] == [None] * 5
    assert sorted(r.pair["chosen"][0]["content"] for r in rows if r.pair) == sorted(
        [r["chosen"] for r in ROWS] + ["good 0"]
    )
    # Named on its own, a cache file is read: only a folder scan leaves it out.
    assert len(list(iter_source(folder / "cache-5f1e2d3c4b.arrow"))) == 4


def test_a_folder_scan_skips_the_dataset_info_json_of_a_datasets_cache_folder(tmp_path: Path) -> None:
    """dataset_info.json of a load_dataset cache folder (no state.json) was read as a pair file: a SourceError
    that failed the whole folder (the controller's ingest, `synpref ingest` exit 2)."""
    folder = _cache_folder(tmp_path)
    (folder / "dataset_info.json").write_text(_dataset_info())
    assert source_files.source_files(tmp_path) == [folder / "json-train.arrow"]
    assert [r.error for r in iter_source(tmp_path)] == [None] * 4


def test_a_pair_list_named_dataset_info_json_is_still_read(tmp_path: Path) -> None:
    (tmp_path / "dataset_info.json").write_text(json.dumps(ROWS))
    assert len([r for r in iter_source(tmp_path) if r.pair]) == 4


def test_a_null_prompt_field_does_not_hide_the_prompt_another_field_holds(tmp_path: Path) -> None:
    """A file mixing rows with a `conversation` list and rows with a `prompt` string (a concatenated dataset, or
    pandas' JSON lines export) gives every row both keys, one null: the null `conversation` was taken as "no
    prompt", so the prompt was dropped silently and the pair came out with an empty conversation."""
    table = pa.Table.from_pydict(
        {
            "conversation": [[{"role": "user", "content": "q1"}], None],
            "prompt": [None, "q2"],
            "chosen": ["a1", "a2"],
            "rejected": ["b1", "b2"],
        }
    )
    pq.write_table(table, tmp_path / "mixed.parquet")
    lines = [json.dumps(row) for row in table.to_pylist()]
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    for name in ("mixed.parquet", "mixed.jsonl"):
        rows = [r.pair for r in iter_source(tmp_path / name)]
        assert [p["conversation"] if p else None for p in rows] == [
            [{"role": "user", "content": "q1"}],
            [{"role": "user", "content": "q2"}],
        ], name


def test_a_folder_scan_skips_hidden_files_and_folders(tmp_path):
    # Before: macOS's `._pairs.json` (AppleDouble bytes) and Jupyter's `.ipynb_checkpoints/` copies were read as
    # pair files: the first failed the file, the second counted every pair twice.
    from synpref.shared.source_files import source_files

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    (tmp_path / "._pairs.jsonl").write_bytes(b"\x00\x05\x16\x07Mac OS X")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "pairs-checkpoint.jsonl").write_text(pairs.read_text())
    assert source_files(tmp_path) == [pairs]
    assert source_files(tmp_path / "._pairs.jsonl") == [tmp_path / "._pairs.jsonl"]  # named directly: read


@pytest.mark.parametrize("rows", [1, 3])
def test_json_lines_under_a_json_name_are_read_as_json_lines(tmp_path, rows):
    # `Dataset.to_json("x.json")` writes JSON lines by default. Before: "Extra data" failed the file, and a
    # one-line file of a message-list pair was read as a wrapper object, its `chosen` messages taken for records.
    from datasets import Dataset

    from synpref.shared.source_files import iter_records

    pair = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    pair["rejected"] = [pair["chosen"][0], {"role": "assistant", "content": "b"}]
    path = tmp_path / "pairs.json"
    Dataset.from_list([pair] * rows).to_json(str(path))
    assert [r for _, r, _ in iter_records(path)] == [pair] * rows
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text('{"data": [\n' + ",\n".join([json.dumps(pair)] * rows) + "\n]}\n")
    assert [r for _, r, _ in iter_records(wrapped)] == [pair] * rows
    one_line = tmp_path / "one_line.json"
    one_line.write_text(json.dumps({"data": [pair] * rows}))
    assert [r for _, r, _ in iter_records(one_line)] == [pair] * rows
