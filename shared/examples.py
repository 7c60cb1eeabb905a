"""The judges' example index (D_gold, human-verified pairs) is rewritten whole by the loop
(`write_example_index`) and re-read by every annotator (`ReloadingExamples`). Its folder:

    CURRENT              one line: the name of the live version folder
    v-<content hash>/    index.faiss + items.jsonl, never changed once named

A write builds a `.staging-*` folder, fsyncs it, renames it to `v-<hash of its files>`,
then replaces CURRENT atomically, and discards versions other than the new and the
previous one (renamed to `.trash-*` first, so a `v-*` folder is always whole). A reader
reads CURRENT, then loads that version; when a later write removed it meanwhile, it reads
CURRENT again. One writer at a time (the controller). A folder without CURRENT that holds
a `PairRetriever.save` index (index.faiss + items.jsonl) is read as a single version.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from synpref.shared.files import fsync_folder, replace_durably, write_text_atomic
from synpref.shared.retrieval import (
    EXAMPLE_KEYS,
    INDEX_FILE,
    ITEMS_FILE,
    Embed,
    Embedder,
    Example,
    VectorIndex,
    hit_examples,
    items_header_line,
    items_line,
    new_faiss_index,
    pair_text,
    record_item,
)
from synpref.v1.pair_pb2 import PairRecord

CURRENT_FILE = "CURRENT"
VERSION_PREFIX = "v-"
LOAD_TRIES = 10
"""Reads of CURRENT a load may take when writes keep removing the version it read."""


def write_example_index(
    folder: str | Path, records: Iterable[PairRecord], embed: Embed, dim: int, batch: int = 256
) -> int:
    """Replace the judges' example index in `folder` with `records` (human-verified pairs); returns their number.

    Each record is one example: id = its pair id, vector = `embed` of `pair_text` of its
    conversation and attributes, payload = what `Example` needs (`record_item`). A repeated
    id keeps its first record. Records are streamed: items are written as they come and texts
    embedded `batch` at a time. The same records give byte-identical files and the same
    version name. See the module docstring for the folder's layout and why a reader never
    sees a half-written index.
    """
    import faiss

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in [*folder.glob(".staging-*"), *folder.glob(".trash-*")]:
        shutil.rmtree(leftover, ignore_errors=True)  # a crashed writer's; there is one writer
    staging = folder / f".staging-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        index = new_faiss_index(dim)
        seen: set[str] = set()
        texts: list[str] = []

        def add_batch() -> None:
            vectors = np.asarray(embed(texts), dtype=np.float32)
            if vectors.shape != (len(texts), dim):
                raise ValueError(f"embed gave shape {vectors.shape} for {len(texts)} texts of dim {dim}")
            rows = np.arange(index.ntotal, index.ntotal + len(texts), dtype=np.int64)
            index.add_with_ids(np.ascontiguousarray(vectors), rows)
            texts.clear()

        with (staging / ITEMS_FILE).open("w", encoding="utf-8") as items:
            items.write(items_header_line(dim))
            for record in records:
                item = record_item(record)
                if item["id"] in seen:
                    continue
                seen.add(item["id"])
                items.write(items_line(item["id"], {key: item[key] for key in EXAMPLE_KEYS}))
                texts.append(pair_text(item["conversation"], item["attributes"]))
                if len(texts) >= batch:
                    add_batch()
            if texts:
                add_batch()
            items.flush()
            os.fsync(items.fileno())
        faiss.write_index(index, str(staging / INDEX_FILE))
        with (staging / INDEX_FILE).open("rb") as fh:
            os.fsync(fh.fileno())
        fsync_folder(staging)

        version = VERSION_PREFIX + _files_hash(staging / ITEMS_FILE, staging / INDEX_FILE)
        previous = _read_current(folder)
        if not (folder / version).exists():  # when it exists it is whole and has these very bytes
            replace_durably(staging, folder / version)
        write_text_atomic(folder / CURRENT_FILE, version + "\n")
        # The previous version stays for readers that read CURRENT just before this write.
        for child in folder.glob(VERSION_PREFIX + "*"):
            if child.name not in (version, previous):
                _discard(child)
        return len(seen)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _files_hash(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:20]


def _read_current(folder: Path) -> str | None:
    """The version CURRENT names, or None when there is no CURRENT."""
    try:
        name = (folder / CURRENT_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    if not name.startswith(VERSION_PREFIX) or "/" in name or os.sep in name:
        raise ValueError(f"{folder / CURRENT_FILE} names {name!r}, not a version folder")
    return name


def _discard(version_folder: Path) -> None:
    # Renamed away first: a crash mid-delete then leaves a .trash-* folder, never a partial version.
    trash = version_folder.with_name(f".trash-{uuid.uuid4().hex[:12]}")
    os.replace(version_folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


class ReloadingExamples:
    """The judges' ExampleSource over a folder `write_example_index` keeps rewriting.

    Every `examples` call reads CURRENT (one small file) and loads the index again when it
    names another version than the one in memory, so a batch published after a write is
    judged with that write's examples. No index yet: no examples. Safe to call from several
    threads: loads are serialised; a loaded index is never changed, only replaced.
    """

    def __init__(self, folder: str | Path, embedder: Embedder | Embed) -> None:
        self.folder = Path(folder)
        self._embed: Embed = embedder if callable(embedder) else embedder.embed
        self._lock = threading.Lock()
        self._loaded: tuple[str, VectorIndex] | None = None

    def examples(self, conversation: list[dict[str, str]], attributes: dict, k: int) -> list[Example]:
        """Up to `k` verified examples nearest to (conversation, attributes) in the folder's current index."""
        index = self.current_index()
        if index is None or k <= 0 or len(index) == 0:
            return []
        (hits,) = index.search(self._embed([pair_text(conversation, attributes)]), k)
        return hit_examples(index, hits)

    def current_index(self) -> VectorIndex | None:
        """The index the folder holds now (loaded when it changed since the last call); None when it holds none."""
        with self._lock:
            for _ in range(LOAD_TRIES):
                version = self._version_on_disk()
                if version is None:
                    self._loaded = None
                    return None
                if self._loaded is not None and self._loaded[0] == version:
                    return self._loaded[1]
                folder = self._version_folder(version)
                try:
                    index = VectorIndex.load(folder)
                except FileNotFoundError:
                    continue  # a newer write removed this version while it loaded: read CURRENT again
                except RuntimeError:
                    # FAISS reports a missing index file as RuntimeError: removed after its items were read.
                    if folder.exists():
                        raise
                    continue
                self._loaded = (version, index)
                return index
            raise RuntimeError(f"{self.folder}: no version could be loaded in {LOAD_TRIES} reads of {CURRENT_FILE}")

    def _version_on_disk(self) -> str | None:
        version = _read_current(self.folder)
        if version is not None:
            return version
        try:  # a single PairRetriever.save index: its index file, written last, names the version
            st = (self.folder / INDEX_FILE).stat()
        except FileNotFoundError:
            return None
        return f"flat:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"

    def _version_folder(self, version: str) -> Path:
        return self.folder if version.startswith("flat:") else self.folder / version
