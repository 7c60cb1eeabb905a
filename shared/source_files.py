"""Reading pair files as records: JSON, JSON lines (gzipped or not), Parquet and Arrow (a Hugging Face
`Dataset.save_to_disk` folder), one record at a time.

shared/sources.py turns these records into pairs, format by format.
"""

from __future__ import annotations

import codecs
import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FILE_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet", ".arrow")
BATCH_ROWS = 1024


class SourceError(ValueError):
    """A file that cannot be read at all (not a single bad row)."""


def _open_text(path: Path):
    # utf-8-sig: a file saved with a byte-order mark (Windows editors) would otherwise not parse at all.
    gz = path.name.lower().endswith(".gz")  # lower: iter_records picks the reader by the lower-cased name
    return gzip.open(path, "rt", encoding="utf-8-sig") if gz else path.open(encoding="utf-8-sig")


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else path.open("rb")


def _json_line(raw: bytes) -> tuple[Any, str | None]:
    """One JSON line: (record, None) or (None, why it is no record). Decoded line by line, so a
    bad byte costs its own row only, not the rest of the file."""
    try:
        return json.loads(raw.decode("utf-8")), None
    except UnicodeDecodeError as exc:
        return None, f"invalid UTF-8: byte 0x{raw[exc.start]:02x} at column {exc.start + 1}"
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON line: {exc.msg} at column {exc.colno}"
    except RecursionError:
        return None, "invalid JSON line: nested too deeply"


def iter_records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(index, record, parse error) for each record of one file."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        index = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS):
            for record in batch.to_pylist():
                yield index, record, None
                index += 1
        return
    if name.endswith(".arrow"):
        index = 0
        for batch in _arrow_batches(path):
            # Sliced: a writer may have put a whole split in one record batch; to_pylist of it all would not be bounded.
            for start in range(0, batch.num_rows, BATCH_ROWS):
                for record in batch.slice(start, BATCH_ROWS).to_pylist():
                    yield index, record, None
                    index += 1
        return
    if name.endswith((".jsonl", ".jsonl.gz")):
        with _open_binary(path) as raw_lines:
            for index, raw in enumerate(raw_lines):
                if index == 0:
                    raw = raw.removeprefix(codecs.BOM_UTF8)  # else the first record is "invalid JSON"
                if raw.strip():
                    record, error = _json_line(raw)
                    yield index, record, error
        return
    with _open_text(path) as fh:
        try:
            data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SourceError(f"{path}: invalid JSON: {exc}") from exc
        except RecursionError:
            raise SourceError(f"{path}: invalid JSON: nested too deeply") from None
    if isinstance(data, dict):
        # A few dumps wrap the list: {"data": [...]} or {"rows": [...]}.
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise SourceError(f"{path}: a JSON file must hold a list of records (or one list in an object)")
        data = lists[0]
    if not isinstance(data, list):
        raise SourceError(f"{path}: a JSON file must hold a list of records, not {type(data).__name__}")
    yield from ((i, r, None) for i, r in enumerate(data))


def _arrow_batches(path: Path) -> Iterator[Any]:
    """The record batches of an Arrow IPC file, one at a time: the stream format `datasets` writes, else the
    random-access file format."""
    import pyarrow as pa

    with pa.OSFile(str(path), "rb") as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            reader = None
        if reader is not None:
            yield from reader
            return
    with pa.OSFile(str(path), "rb") as source:
        try:
            file_reader = pa.ipc.open_file(source)
        except pa.ArrowInvalid as exc:
            raise SourceError(f"{path}: not an Arrow IPC stream or file: {exc}") from exc
        for i in range(file_reader.num_record_batches):
            yield file_reader.get_batch(i)


# The dataset writer's version folder (services/dataset_writer/dataset.py): its manifest lists the shards.
DATASET_MANIFEST = "manifest.json"


def _manifest_shards(folder: Path) -> list[Path] | None:
    """The shards a dataset version's manifest lists, or None when `folder` holds no such manifest."""
    try:
        shards = json.loads((folder / DATASET_MANIFEST).read_text()).get("shards")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(shards, list) or not all(isinstance(s, dict) and isinstance(s.get("file"), str) for s in shards):
        return None
    return [folder / s["file"] for s in shards]


# A Hugging Face `Dataset.save_to_disk` folder: state.json lists the Arrow files; it and dataset_info.json are
# metadata. A DatasetDict adds dataset_dict.json ({"splits": [...]}) above one such folder per split.
SAVED_STATE, SAVED_DICT = "state.json", "dataset_dict.json"


def _saved_dataset_files(folder: Path) -> list[Path] | None:
    """The Arrow files a save_to_disk folder's state.json lists, or None when `folder` is no such folder."""
    try:
        files = json.loads((folder / SAVED_STATE).read_text()).get("_data_files")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(files, list) or not all(
        isinstance(f, dict) and isinstance(f.get("filename"), str) for f in files
    ):
        return None
    return [folder / f["filename"] for f in files]


def _is_saved_dict(path: Path) -> bool:
    try:
        splits = json.loads(path.read_text()).get("splits")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(splits, list)


def source_files(path: Path) -> list[Path]:
    """The readable files under `path` (recursively, sorted), or `[path]` itself for a file.

    A dataset version folder of the writer (one with a manifest listing shards) contributes the shards its
    manifest lists, not its manifest or a shard still being written; a Hugging Face save_to_disk folder
    contributes the Arrow files its state.json lists, not its metadata. Raises SourceError when `path`
    does not exist.
    """
    if path.is_dir():
        # `is not None`: a version whose manifest lists no shard yet (only offsets committed) is still a version;
        # its manifest is no pair file and a shard not yet listed is not committed.
        found = ((m.parent, _manifest_shards(m.parent)) for m in path.rglob(DATASET_MANIFEST))
        versions = {folder: shards for folder, shards in found if shards is not None}
        saved = ((s.parent, _saved_dataset_files(s.parent)) for s in path.rglob(SAVED_STATE))
        versions.update((folder, files) for folder, files in saved if files is not None and folder not in versions)
        listed = [shard for shards in versions.values() for shard in shards]
        loose = [
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.name.lower().endswith(FILE_SUFFIXES)
            and not any(v in p.parents for v in versions)
            and not (p.name == SAVED_DICT and _is_saved_dict(p))
        ]
        return sorted(listed + loose)
    if not path.exists():
        raise SourceError(f"{path}: no such file or directory")
    return [path]
