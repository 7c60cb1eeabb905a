"""Session 43's review of reading pair files and `synpref score`'s error paths: a truncated or corrupt file raised a
bare EOFError/zlib/Arrow error naming no file (a traceback out of `synpref score`, the controller's intake), a bad
--config a traceback, and `synpref score ... | head` a "Broken pipe" error with exit 2."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synpref.client import PairScore, cli
from synpref.shared.source_files import iter_records
from synpref.shared.sources import SourceError, iter_source

N = 3000


def _rows(n: int = N) -> list[dict[str, str]]:
    return [{"prompt": f"q{i}", "chosen": f"good answer {i} " * 5, "rejected": f"bad {i}"} for i in range(n)]


def _lines(n: int = N) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in _rows(n)).encode()


def _half(path: Path, whole: bytes) -> Path:
    path.write_bytes(whole[: len(whole) // 2])  # an interrupted download
    return path


def _arrow_stream(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=256):
            writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=256)
    return sink.getvalue().to_pybytes()


def _corrupt_gzip(path: Path) -> Path:
    data = bytearray(gzip.compress(_lines()))
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # a damaged block: zlib.error or a CRC error
    path.write_bytes(bytes(data))
    return path


def _damaged(tmp_path: Path, kind: str) -> tuple[Path, bool]:
    """A damaged file of `kind` and whether records before the damage can be read."""
    table = pa.Table.from_pylist(_rows())
    if kind == "jsonl.gz":
        return _half(tmp_path / "pairs.jsonl.gz", gzip.compress(_lines())), True
    if kind == "json.gz":
        # A JSON list is read a window (JSON_WINDOW characters) at a time: some windows before the cut.
        return _half(tmp_path / "pairs.json.gz", gzip.compress(json.dumps(_rows(4 * N)).encode())), True
    if kind == "tiny.jsonl.gz":  # cut inside the gzip header
        return _half(tmp_path / "tiny.jsonl.gz", gzip.compress(_lines())[:12]), False
    if kind == "corrupt.jsonl.gz":
        return _corrupt_gzip(tmp_path / "corrupt.jsonl.gz"), True
    if kind == "parquet":
        return _half(tmp_path / "pairs.parquet", _parquet(table)), False
    return _half(tmp_path / "pairs.arrow", _arrow_stream(table)), True


KINDS = ["jsonl.gz", "json.gz", "tiny.jsonl.gz", "corrupt.jsonl.gz", "parquet", "arrow"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_file_is_a_source_error_naming_it_after_the_rows_before_the_damage(tmp_path: Path, kind: str) -> None:
    # Before: EOFError ("Compressed file ended before the end-of-stream marker was reached"), zlib.error,
    # BadGzipFile, ArrowInvalid ("Parquet magic bytes not found") or OSError ("Expected to be able to read ...
    # bytes"): none names the file, and the controller's intake, which stops on a SourceError, crashed on them.
    path, some_first = _damaged(tmp_path, kind)
    read: list[Any] = []
    with pytest.raises(SourceError) as caught:
        for row in iter_source(path):
            read.append(row)
    assert str(path) in str(caught.value)
    if not kind.startswith("corrupt"):  # damaged deflate data may decode to some garbage lines first
        assert all(r.pair is not None for r in read)  # the damage is the file's error, not a bad row's
    assert (0 < len(read) < 4 * N) if some_first else not read


def test_a_damaged_file_in_a_folder_names_that_file(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(_lines(5))
    bad = _half(tmp_path / "b.jsonl.gz", gzip.compress(_lines()))
    (tmp_path / "c.jsonl").write_bytes(_lines(5))
    with pytest.raises(SourceError, match=r"b\.jsonl\.gz: unreadable after .* records .*truncated.*EOFError"):
        for _ in iter_source(tmp_path):
            pass
    assert bad.exists()


class FakeClient:
    """RewardClient's surface for the CLI: every pair scores (1, 0)."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def score_pairs(self, pairs: Sequence[dict[str, Any]], *, timeout: float | None = None) -> list[PairScore]:
        return [PairScore(1.0, 0.0, 0.73, "v1") for _ in pairs]


def test_score_pairs_on_a_truncated_gzip_says_which_file_and_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: the EOFError escaped main (a traceback, exit 1: the code the usage gives a gRPC error).
    monkeypatch.setattr(cli, "RewardClient", FakeClient)
    path = _half(tmp_path / "pairs.jsonl.gz", gzip.compress(_lines()))
    out = tmp_path / "scored.jsonl"
    assert cli.main(["--address", "127.0.0.1:1", "pairs", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"synpref score: {path}: unreadable after" in err and "truncated" in err
    lines = out.read_text().splitlines()
    assert all(json.loads(line)["locator"].startswith(f"{path.as_posix()}#") for line in lines)


@pytest.mark.parametrize("content", [None, "scoring: [1, 2\n", "scoring:\n  no_such_field: 1\n"])
def test_a_bad_config_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None
) -> None:
    # Before: load_settings ran outside main's try: a ConfigError traceback, exit 1.
    config = tmp_path / "bad.yaml"
    if content is not None:
        config.write_text(content)
    assert cli.main(["--config", str(config), "info"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("synpref score: ") and str(config) in err, err


CHILD = """
import sys
import tracemalloc
from synpref.client import PairScore, cli

class Client:
    def __init__(self, address, **kwargs): pass
    def __enter__(self): return self
    def __exit__(self, *exc): pass
    def score_pairs(self, pairs, *, timeout=None): return [PairScore(1.0, 0.0, 0.73, "v1") for _ in pairs]

cli.RewardClient = Client
sys.exit(cli.main(["--address", "127.0.0.1:1", "pairs", sys.argv[1]]))
"""


def test_a_closed_stdout_ends_the_run_quietly(tmp_path: Path) -> None:
    # `synpref score pairs x.jsonl | head -1`. Before: "synpref score: [Errno 32] Broken pipe", exit 2, then
    # "Exception ignored ... BrokenPipeError" from the interpreter's last flush of stdout.
    src = tmp_path / "pairs.jsonl"
    src.write_bytes(_lines(20_000))  # some 2 MB of output: far more than a pipe holds, so the write must fail
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(src)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path
    )
    assert child.stdout is not None and child.stderr is not None
    first = child.stdout.readline()
    child.stdout.close()  # what `head -1` does once it has its line
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 141, err
    assert json.loads(first)["locator"] == f"{src.as_posix()}#0"
    assert "Broken pipe" not in err and "Exception ignored" not in err and "Traceback" not in err, err


@pytest.mark.parametrize("suffix", [".json", ".json.gz"])
def test_a_one_line_json_list_is_not_read_whole_to_detect_json_lines(tmp_path: Path, suffix: str) -> None:
    # json.dump writes a list on one line; the JSON-lines check read that first line, i.e. the whole file (40M
    # pairs: tens of GB), before the windowed reader that exists to never hold it whole.
    text = json.dumps(_rows(100_000)).encode()  # ~10 MB
    path = tmp_path / f"pairs{suffix}"
    path.write_bytes(gzip.compress(text) if suffix.endswith(".gz") else text)
    tracemalloc.start()
    try:
        records = iter_records(path)
        index, record, error = next(records)
        records.close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (index, record["prompt"], error) == (0, "q0", None)
    assert peak < len(text) // 4, f"peak {peak} bytes for a {len(text)} byte file"


def test_synpref_controller_names_a_truncated_source_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: the EOFError escaped the controller's intake (it stops on a SourceError only): a traceback naming no
    # file, in a restart loop.
    from synpref.services.controller import main as controller_main

    data = _half(tmp_path / "pairs.jsonl.gz", gzip.compress(_lines()))
    cfg = tmp_path / "c.yaml"
    controller = {"sources": [str(data)], "workdir": str(tmp_path / "w"), "study": {"judges": [{"name": "sim-a"}]}}
    cfg.write_text(json.dumps({"controller": controller, "service": {"grpc_port": 0, "metrics_port": 0}}))
    assert controller_main.main(["--config", str(cfg), "--exit-when-done"]) == 1
    err = capsys.readouterr().err
    assert f"synpref controller: cannot read the sources: {data}: unreadable after" in err, err
