"""Review 46, area S: the vector and digest files are allocated when made (a full volume fails then, with the path and
the bytes, not with a SIGBUS hours into embedding), and a search pads a missing hit with score 0 wherever it comes
from, as documented."""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from synpref.shared.ann import AnnIndex, TextDigests, VectorFile


def fallocate_raising(code: int) -> Any:
    def fallocate(fd: int, offset: int, size: int) -> None:
        raise OSError(code, os.strerror(code))

    return fallocate


def test_a_full_volume_fails_vector_file_creation_with_the_path_and_bytes_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the file was made sparse (truncate) and creation succeeded; the volume filling while embedding then
    # killed the process with SIGBUS at the first page the memory map could not get.
    monkeypatch.setattr(os, "posix_fallocate", fallocate_raising(errno.ENOSPC))
    path = tmp_path / "vectors.f16"
    with pytest.raises(OSError, match=re.escape(f"cannot allocate the 2400 bytes {path} needs")) as raised:
        VectorFile.create(path, rows=100, dim=12)
    assert raised.value.errno == errno.ENOSPC
    assert sorted(tmp_path.iterdir()) == []  # neither the file nor its shape note


def test_a_full_volume_fails_digest_creation_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vectors = VectorFile.create(tmp_path / "vectors.f16", rows=100, dim=12)
    monkeypatch.setattr(os, "posix_fallocate", fallocate_raising(errno.ENOSPC))
    with pytest.raises(OSError, match=re.escape(f"the 800 bytes {tmp_path}/vectors.f16.digests needs")) as raised:
        TextDigests.beside(vectors, create=True)
    assert raised.value.errno == errno.ENOSPC
    assert not (tmp_path / "vectors.f16.digests").exists()


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate here")
def test_created_files_are_allocated_on_disk_and_read_back_zeros(tmp_path: Path) -> None:
    vectors = VectorFile.create(tmp_path / "vectors.f16", rows=1000, dim=16)
    digests = TextDigests.beside(vectors, create=True)
    assert digests is not None
    for path, size in ((vectors.path, 1000 * 16 * 2), (digests.path, 1000 * 8)):
        st = os.stat(path)
        assert st.st_size == size and st.st_blocks * 512 >= size, f"{path} is sparse"
    assert not vectors.read(np.arange(1000)).any() and not digests.read(range(1000)).any()
    VectorFile.create(tmp_path / "empty.f16", rows=0, dim=16)  # nothing to allocate: not fallocate's EINVAL


@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.EINVAL])
def test_a_filesystem_that_cannot_allocate_ahead_gets_a_sparse_file_and_a_warning(
    code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(os, "posix_fallocate", fallocate_raising(code))
    with caplog.at_level(logging.WARNING, logger="synpref.shared.ann"):
        vectors = VectorFile.create(tmp_path / "vectors.f16", rows=10, dim=4)
        digests = TextDigests.beside(vectors, create=True)
    assert digests is not None and not vectors.read(range(10)).any() and not digests.read(range(10)).any()
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and all("sparse" in m for m in warned), warned


def test_a_hit_faiss_did_not_find_scores_0_as_documented() -> None:
    # An IVF search probing one list returns -1 with FAISS's -3.4e38 (-FLT_MAX) past that list's hits; those came
    # through as scores, where padding past the fetched columns (and an empty index) gave the documented 0.
    import faiss

    rng = np.random.default_rng(0)
    centres = np.eye(4, dtype=np.float32)
    index = faiss.index_factory(4, "IVF4,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(centres)
    ann = AnnIndex(index, nprobe=1)
    vectors = np.repeat(centres, 5, axis=0) + rng.normal(scale=0.01, size=(20, 4)).astype(np.float32)
    ann.add(np.arange(20), vectors)
    ids, scores = ann.search(centres[:1], 8)
    assert sorted(ids[0, :5]) == [0, 1, 2, 3, 4] and (ids[0, 5:] == -1).all()
    assert (scores[0, 5:] == 0).all() and (scores[0, :5] > 0.9).all()
