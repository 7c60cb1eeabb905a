"""Reading pair files as records: JSON, JSON lines (plain or compressed: .gz, .bz2, .xz, .zst), Parquet and Arrow (a
Hugging Face `Dataset.save_to_disk` folder), one record at a time.

shared/sources.py turns these records into pairs, format by format.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import io
import json
import lzma
import re
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn, TextIO

COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
"""The compressed forms of a JSON or JSON lines file read (by its name's last suffix, in any case)."""
FILE_SUFFIXES = (
    ".json",
    ".jsonl",
    *(f"{kind}{c}" for c in COMPRESSIONS for kind in (".json", ".jsonl")),
    ".parquet",
    ".arrow",
)
BATCH_ROWS = 1024
JSON_WINDOW = 1 << 18
"""Characters of a JSON file read at a time: a JSON list is decoded record by record from such a window (one
record larger than it widens it), so a file of 40M pairs is never held whole."""
_SPACE = re.compile(r"[ \t\n\r]*")  # the white space JSON allows
_CUT = 16  # a decode error this near the window's end may be a token the window cut, not bad JSON
_ONE_LIST = "a JSON file must hold a list of records (or one list in an object)"
_LEAD = 1024  # bytes enough to tell a JSON list from an object
FIRST_LINE_BYTES = 1 << 26
"""The most of a `.json` file's first line read to tell JSON lines from an object wrapping a list written on one line
(read by the window then): a first record longer than this is taken for such an object."""


class SourceError(ValueError):
    """A file that cannot be read at all (not a single bad row)."""


def _open_text(path: Path):
    # utf-8-sig: a file saved with a byte-order mark (Windows editors) would otherwise not parse at all.
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8-sig")


def _open_binary(path: Path):
    name = path.name.lower()  # lower: iter_records picks the reader by the lower-cased name
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".bz2"):
        return bz2.open(path, "rb")
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    if name.endswith(".zst"):
        import pyarrow as pa  # the stdlib reads no zstd before Python 3.14; pyarrow is a dependency already

        if not pa.Codec.is_available("zstd"):
            raise SourceError(f"{path}: this pyarrow reads no zstd; decompress it or give it as .gz, .bz2 or .xz")
        # Buffered: pyarrow's stream has no readline, which JSON lines are read by.
        return io.BufferedReader(pa.input_stream(str(path), compression="zstd"))
    return path.open("rb")


def _plain_name(name: str) -> str:
    """The name without its compression suffix: what the file holds decides how it is read."""
    return next((name.removesuffix(c) for c in COMPRESSIONS if name.endswith(c)), name)


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


def _is_json_lines(path: Path) -> bool:
    """Whether a `.json` file holds JSON lines, as `datasets`' Dataset.to_json and pandas' to_json(lines=True) write
    under that name: its first line is a whole object and another line follows, or that object is a pair."""
    with _open_binary(path) as fh:
        first = fh.readline(_LEAD).removeprefix(codecs.BOM_UTF8)
        if not first.lstrip().startswith(b"{"):
            return False  # a list, which json.dump writes on one line: reading that line would read the whole file
        if not first.endswith(b"\n"):
            first += fh.readline(FIRST_LINE_BYTES)
        record, error = _json_line(first)
        if error is not None or not isinstance(record, dict):
            return False  # an object over several lines: one that wraps the list
        return "chosen" in record or any(line.strip() for line in fh)


def iter_records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(index, record, parse error) for each record of one file.

    Raises SourceError naming the file when it cannot be read on (a truncated or corrupt gzip, Parquet or Arrow
    file, an I/O error), after the records before the damage: the bare error (EOFError, zlib.error, ArrowInvalid)
    names no file, and the readers stop or skip the file only on a SourceError.
    """
    done = 0
    try:
        for record in _records(path):
            yield record
            done += 1
    except SourceError:
        raise
    except Exception as exc:
        if not _unreadable(exc):
            raise
        hint = " (truncated: an interrupted download or copy?)" if isinstance(exc, EOFError) else ""
        raise SourceError(f"{path}: unreadable after {done} records{hint}: {type(exc).__name__}: {exc}") from exc


def _unreadable(exc: Exception) -> bool:
    """An error of the file's bytes or of reading them, not of the code."""
    # gzip.BadGzipFile and a bad bz2 or zstd stream are OSErrors; a truncated gzip, bz2 or xz file an EOFError.
    if isinstance(exc, OSError | EOFError | zlib.error | lzma.LZMAError):
        return True
    pa = sys.modules.get("pyarrow")  # imported by the Parquet, Arrow and zstd readers only, which raise its errors
    return pa is not None and isinstance(exc, pa.ArrowException)


def _records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
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
    if _plain_name(name).endswith(".jsonl") or _is_json_lines(path):
        with _open_binary(path) as raw_lines:
            for index, raw in enumerate(raw_lines):
                if index == 0:
                    raw = raw.removeprefix(codecs.BOM_UTF8)  # else the first record is "invalid JSON"
                if raw.strip():
                    record, error = _json_line(raw)
                    yield index, record, error
        return
    yield from ((i, r, None) for i, r in enumerate(_json_records(path)))


class _JsonText:
    """A JSON text read through a window, one value at a time (json.JSONDecoder.raw_decode); errors name the
    line, column and character as json.load would."""

    def __init__(self, fh: TextIO, path: Path) -> None:
        self.fh, self.path, self.decoder = fh, path, json.JSONDecoder()
        self.buf, self.pos, self.eof = "", 0, False
        self.start = 0  # file position (in characters) of buf[0]
        self.lines, self.line_start = 0, 0  # newlines before buf[0]; the file position after the last of them

    def _more(self) -> bool:
        """Drop what was decoded and append the next piece of the file; False at its end."""
        if self.eof:
            return False
        # At least what is left: a record larger than the window doubles it, so decoding it stays linear.
        chunk = self.fh.read(max(JSON_WINDOW, len(self.buf) - self.pos))
        if not chunk:
            self.eof = True  # buf stays as it is: an error names a position in it
            return False
        if newlines := self.buf.count("\n", 0, self.pos):
            self.lines += newlines
            self.line_start = self.start + self.buf.rfind("\n", 0, self.pos) + 1
        self.start += self.pos
        self.buf, self.pos = self.buf[self.pos :] + chunk, 0
        return True

    def fail(self, msg: str) -> NoReturn:
        pos = self.pos
        line = self.lines + self.buf.count("\n", 0, pos) + 1
        last = self.buf.rfind("\n", 0, pos)
        column = pos - last if last >= 0 else self.start + pos - self.line_start + 1
        raise SourceError(f"{self.path}: invalid JSON: {msg}: line {line} column {column} (char {self.start + pos})")

    def peek(self) -> str:
        """The next character after white space, or "" at the end of the file."""
        while True:
            self.pos = _SPACE.match(self.buf, self.pos).end()  # type: ignore[union-attr]  # matches ""
            if self.pos < len(self.buf) or not self._more():
                return self.buf[self.pos : self.pos + 1]

    def take(self, chars: str, expected: str) -> str:
        char = self.peek()
        if not char or char not in chars:
            self.fail(f"Expecting {expected}")
        self.pos += 1
        return char

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                # An unterminated string reports where it starts; any other cut token fails at the window's end.
                cut = exc.msg.startswith("Unterminated string") or exc.pos >= len(self.buf) - _CUT
                if not (cut and self._more()):
                    self.pos = exc.pos
                    self.fail(exc.msg)
            except RecursionError:
                raise SourceError(f"{self.path}: invalid JSON: nested too deeply") from None
            else:
                # A number decoded this near the window's end may go on past it ("1.", "1e-" cut there decode as 1).
                if end < len(self.buf) - _CUT or not self._more():
                    self.pos = end
                    return value

    def items(self) -> Iterator[Any]:
        """The values of the list that starts here."""
        self.take("[", "'['")
        if self.peek() == "]":
            self.pos += 1
            return
        while True:
            yield self.value()
            if self.take(",]", "',' delimiter") == "]":
                return

    def wrapped_items(self) -> Iterator[Any]:
        """The values of the one list among the values of the object that starts here ({"data": [...]}). A second
        list is an error found only once the first was read."""
        self.take("{", "'{'")
        lists = 0
        if self.peek() == "}":
            self.pos += 1
        else:
            while True:
                if self.peek() != '"':
                    self.fail("Expecting property name enclosed in double quotes")
                self.value()
                self.take(":", "':' delimiter")
                if self.peek() != "[":
                    self.value()
                elif lists:
                    raise SourceError(f"{self.path}: {_ONE_LIST}")
                else:
                    lists = 1
                    yield from self.items()
                if self.take(",}", "',' delimiter") == "}":
                    break
        if lists == 0:
            raise SourceError(f"{self.path}: {_ONE_LIST}")


def _json_records(path: Path) -> Iterator[Any]:
    """The records of a JSON file holding a list of them (or an object with one list among its values), one by one."""
    with _open_text(path) as fh:
        text = _JsonText(fh, path)
        try:
            first = text.peek()
            if first == "[":
                yield from text.items()
            elif first == "{":
                yield from text.wrapped_items()
            else:
                data = text.value()
            if text.peek():
                text.fail("Extra data")
        except UnicodeDecodeError as exc:
            raise SourceError(f"{path}: invalid JSON: {exc}") from exc
    if first not in ("[", "{"):
        raise SourceError(f"{path}: a JSON file must hold a list of records, not {type(data).__name__}")


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


# The dataset writer's version folder (services/dataset_writer/dataset.py): its manifest lists the shards; its lock
# file is there from the writer's first open, before any manifest.
DATASET_MANIFEST = "manifest.json"
DATASET_WRITER_LOCK = ".writer.lock"


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
SAVED_STATE, SAVED_DICT, SAVED_INFO = "state.json", "dataset_dict.json", "dataset_info.json"


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


def _is_metadata(path: Path) -> bool:
    """A DatasetDict's dataset_dict.json, or the dataset_info.json that `datasets` writes beside its Arrow files
    (in its cache folder too, which has no state.json): metadata, not pair files."""
    if path.name not in (SAVED_DICT, SAVED_INFO):
        return False
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if path.name == SAVED_INFO:
        return isinstance(meta, dict) and "features" in meta
    return isinstance(meta, dict) and isinstance(meta.get("splits"), list)


def _is_cache_file(path: Path) -> bool:
    """An Arrow file `datasets` wrote for a map/filter result (cache-<fingerprint>[_<rank>_of_<n>].arrow): a
    derived copy of rows a folder already holds, so a scan that read it would count them twice."""
    name = path.name.lower()
    return name.startswith("cache-") and name.endswith(".arrow")


def source_files(path: Path) -> list[Path]:
    """The readable files under `path` (recursively, sorted), or `[path]` itself for a file.

    A dataset version folder of the writer (one with a manifest listing shards) contributes the shards its
    manifest lists, not its manifest or a shard still being written; a Hugging Face save_to_disk folder
    contributes the Arrow files its state.json lists, not its metadata. A loose `datasets` cache file
    (cache-*.arrow) or dataset_info.json is no pair file either, nor a hidden one. Raises SourceError when
    `path` does not exist.
    """
    if path.is_dir():
        # `is not None`: a version whose manifest lists no shard yet (only offsets committed) is still a version;
        # its manifest is no pair file and a shard not yet listed is not committed.
        found = ((m.parent, _manifest_shards(m.parent)) for m in path.rglob(DATASET_MANIFEST))
        versions = {folder: shards for folder, shards in found if shards is not None}
        # A version whose first shard is renamed into place but not yet in a manifest (or whose writer died there)
        # has committed nothing: read as loose files, that shard was trained on, then deleted and written again.
        versions.update((lock.parent, []) for lock in path.rglob(DATASET_WRITER_LOCK) if lock.parent not in versions)
        # A hidden folder's versions are not the user's either: the loop builds each version under
        # datasets/.writing/ before moving it into place whole.
        versions = {f: s for f, s in versions.items() if not any(p.startswith(".") for p in f.relative_to(path).parts)}
        saved = ((s.parent, _saved_dataset_files(s.parent)) for s in path.rglob(SAVED_STATE))
        versions.update((folder, files) for folder, files in saved if files is not None and folder not in versions)
        listed = [shard for shards in versions.values() for shard in shards]
        loose = [
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.name.lower().endswith(FILE_SUFFIXES)
            and not any(v in p.parents for v in versions)
            and not _is_cache_file(p)
            and not _is_metadata(p)
            # Hidden files and folders (macOS `._x.json`, `.ipynb_checkpoints/`) hold no pairs of the user's.
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
        return sorted(listed + loose)
    if not path.exists():
        raise SourceError(f"{path}: no such file or directory")
    return [path]
