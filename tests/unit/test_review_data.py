"""Review findings in dataset writing and pair input: each test failed before its fix."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from itertools import chain
from pathlib import Path

from synpref.services.dataset_writer.dataset import DatasetVersion
from synpref.services.ingest.preprocess import Preprocessor
from synpref.shared.pairs import flipped, new_pair, new_record
from synpref.shared.pairstore import PairStore
from synpref.shared.source_files import source_files
from synpref.shared.sources import iter_source
from synpref.v1.pair_pb2 import DECISION_KEEP


def hh(i: int) -> dict:
    prompt = f"\n\nHuman: question {i}\n\nAssistant:"
    return {"chosen": prompt + " good", "rejected": prompt + " bad"}


def kept(i: int):
    r = new_record(new_pair([{"role": "user", "content": f"q{i}"}], [{"role": "assistant", "content": "a"}],
                            [{"role": "assistant", "content": "b"}], "s"))  # fmt: skip
    r.decision.decision = DECISION_KEEP
    return r


def test_a_version_with_offsets_but_no_shard_yet_is_read_as_an_empty_version(tmp_path: Path) -> None:
    # The writer's first checkpoint can hold only dead letters or duplicates: its manifest lists no shard.
    # The folder was then taken for loose files, and manifest.json for a pair file, which failed the read.
    with DatasetVersion(tmp_path, "d", "v1") as dv:
        dv.append([], {"t:0": 4})
    (tmp_path / "d" / "v1" / "part-00000.parquet").write_bytes(b"a shard not committed yet")
    with DatasetVersion(tmp_path, "d", "v2") as dv:
        dv.append([kept(0), kept(1)], {"t:0": 2})
    assert [p.name for p in source_files(tmp_path)] == ["part-00000.parquet"]
    assert "v2" in source_files(tmp_path)[0].parts
    assert len([r for r in iter_source(tmp_path) if r.pair is not None]) == 2


def test_a_bad_first_line_does_not_decide_the_format_of_the_file(tmp_path: Path) -> None:
    # The format was detected from the first record even when it did not parse: an hh-rlhf file whose first
    # line holds a bad byte was read as "pairs", and every one of its good rows came out "no conversation".
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"chosen": "\xff"}\n' + b"".join(json.dumps(hh(i)).encode() + b"\n" for i in range(3)))
    rows = list(iter_source(path))
    assert rows[0].error is not None and rows[0].error.startswith("invalid UTF-8")
    assert [r.pair["conversation"] for r in rows[1:] if r.pair] == [
        [{"role": "user", "content": f"question {i}"}] for i in range(3)
    ]
    pre = Preprocessor()
    assert len(list(pre.run(iter_source(path)))) == 3 and pre.counts.unreadable == 1


def test_a_byte_order_mark_is_not_a_bad_record(tmp_path: Path) -> None:
    # Files saved by Windows tools start with a UTF-8 BOM: a JSON list did not parse at all (SourceError for
    # the file) and a JSON-lines file lost its first record as "invalid JSON".
    bom = b"\xef\xbb\xbf"
    (tmp_path / "list.json").write_bytes(bom + json.dumps([hh(0), hh(1)]).encode())
    (tmp_path / "lines.jsonl").write_bytes(bom + b"".join(json.dumps(hh(i)).encode() + b"\n" for i in (2, 3)))
    rows = list(iter_source(tmp_path))
    assert [r.error for r in rows] == [None] * 4 and len(rows) == 4


def test_an_upper_case_gz_suffix_is_decompressed(tmp_path: Path) -> None:
    # The reader was chosen by the lower-cased name, but gzip only for a lower-case ".gz": PAIRS.JSONL.GZ was
    # read as raw compressed bytes, every line unreadable.
    path = tmp_path / "PAIRS.JSONL.GZ"
    path.write_bytes(gzip.compress(b"".join(json.dumps(hh(i)).encode() + b"\n" for i in range(3))))
    assert [r.error for r in iter_source(path)] == [None] * 3


def test_identical_chosen_and_rejected_are_dropped_at_ingest(tmp_path: Path) -> None:
    # A pair with the same response on both sides (hh-rlhf has some) carries no preference: its loss is log 2
    # whatever the model, no model gets it right held out, judges were asked about it, and a flip kept its id.
    same = {"prompt": "q", "chosen": "same answer", "rejected": "same answer"}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(same) + "\n" + json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    pre = Preprocessor()
    published = list(pre.run(iter_source(path)))
    assert len(published) == 1 and pre.counts.identical == 1 and pre.counts.reconciles()
    assert [(r.locator.rsplit("/", 1)[-1], r.bucket) for r in pre.rejections] == [("p.jsonl#0", "identical")]
    assert all(flipped(r).pair.id != r.pair.id for r in published)


def test_a_pair_seen_with_its_sides_swapped_is_a_duplicate(tmp_path: Path) -> None:
    # Two sources with the same comparison and opposite labels gave two pairs that train the model in opposite
    # directions (a net loss of log 2 on the pair): the first read is kept, for curation to check its label.
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "b", "rejected": "a"}]
    rows.append({"prompt": "q2", "chosen": "b", "rejected": "a"})  # another prompt: not the same comparison
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pre = Preprocessor()
    published = list(pre.run(iter_source(path)))
    assert [r.pair.chosen[0].content for r in published] == ["a", "b"]
    assert (pre.counts.duplicate, pre.counts.swapped) == (1, 1) and pre.counts.reconciles()
    [rejection] = pre.rejections
    assert rejection.locator.endswith("p.jsonl#1") and published[0].pair.id in rejection.reason
    # Against ids taken by an earlier run (`synpref ingest --seen`, the controller's store) as well.
    again = Preprocessor(seen={flipped(published[0]).pair.id})
    assert [r.pair.source for r in again.run(iter_source(path))] == [published[1].pair.source]
    assert (again.counts.duplicate, again.counts.swapped) == (2, 1)


def test_dropping_most_of_a_large_pool_streams_the_rows(tmp_path: Path) -> None:
    # intake drops all rows but a max_pairs sample with a generator; drop() made a set and a sorted list of
    # every row first (~70 MB a million rows: gigabytes at 40M pairs).
    with PairStore(tmp_path / "p.sqlite") as store:
        rec = new_record(new_pair([{"role": "user", "content": "q"}], [], [], "s"))
        store.add([(f"k{i}", "unverified", rec) for i in range(3)])
        tracemalloc.start()
        try:
            deleted = store.drop(chain((2, 2), range(4, 400_000)))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert deleted == 1 and store.size() == 2
        assert peak < 2_000_000, peak
