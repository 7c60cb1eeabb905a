"""Dataset writer: shards + manifest, dedup per version, offsets committed with the shard."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from synpref.services.dataset_writer.dataset import ID_INDEX, MANIFEST, DatasetVersion, load_dataset_version
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import DECISION_FLIP, DECISION_KEEP, ModelScore


def rec(i: int, decision=DECISION_KEEP, source="s1", category="coding"):
    r = new_record(new_pair([{"role": "user", "content": f"q{i}"}], [{"role": "assistant", "content": "a"}],
                            [{"role": "assistant", "content": "b"}], source, {"i": str(i)}))  # fmt: skip
    r.decision.decision = decision
    r.decision.rule = "stage2.consistency"
    r.attributes.task_category = category
    r.scores.append(ModelScore(model="gold", version="g1", reward_chosen=1.0, reward_rejected=0.5, p=0.62))
    return r


def records(start: int, stop: int) -> list:
    return [rec(i) for i in range(start, stop)]


def test_append_dedups_and_keeps_stats(tmp_path):
    ds = DatasetVersion(tmp_path, "synpref", "v1")
    first = ds.append([rec(0), rec(1, DECISION_FLIP, "s2", "math"), rec(0)], {"t:0": 3})
    assert (first.written, first.duplicates) == (2, 1)
    second = ds.append([rec(1), rec(2)], {"t:0": 5})
    assert (second.written, second.duplicates) == (1, 1)
    assert ds.append([rec(2)], {"t:0": 6}).shard is None  # offsets still advance
    ds.close()
    reopened = DatasetVersion(tmp_path, "synpref", "v1")
    assert reopened.offsets == {"t:0": 6}
    assert reopened.stats == {
        "rows": 3,
        "by_decision": {"keep": 2, "flip": 1},
        "by_source": {"s1": 2, "s2": 1},
        "by_category": {"coding": 2, "math": 1},
        "by_split": {"train": 3},
    }
    assert reopened.append([rec(0), rec(1), rec(2)]).duplicates == 3


def test_split_must_be_train_or_heldout(tmp_path):
    ds = DatasetVersion(tmp_path, "d", "v1")
    with pytest.raises(ValueError, match="split must be one of"):
        ds.append([rec(0)], split="test")
    assert ds.stats["rows"] == 0 and ds.files() == []


def test_orphan_shard_from_a_crash_is_removed(tmp_path):
    ds = DatasetVersion(tmp_path, "d", "v1")
    ds.append([rec(0)], {"t:0": 1})
    # A crash between the shard and its manifest leaves a shard the manifest does not list.
    pq.write_table(pq.read_table(ds.files()[0]), ds.dir / "part-00001.parquet")
    ds.close()
    reopened = DatasetVersion(tmp_path, "d", "v1")
    assert not (ds.dir / "part-00001.parquet").exists()
    assert reopened.append([rec(1)]).written == 1  # rows of the lost shard come back from Kafka
    assert reopened.stats["rows"] == 2


def test_loads_with_datasets_in_skywork_format(tmp_path):
    ds = DatasetVersion(tmp_path, "d", "v1")
    ds.append([rec(0), rec(1)], {"t:0": 2})
    ds.append([rec(2, DECISION_FLIP)], {"t:0": 3}, split="heldout")
    loaded = load_dataset_version(tmp_path, "d", "v1")
    assert loaded.num_rows == 3
    assert dict(zip(loaded["id"], loaded["split"], strict=True)) == {
        rec(0).pair.id: "train",
        rec(1).pair.id: "train",
        rec(2, DECISION_FLIP).pair.id: "heldout",
    }
    assert ds.stats["by_split"] == {"train": 2, "heldout": 1}
    row = loaded[0]
    assert row["chosen"] == [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a"}]
    assert row["conversation"] == [{"role": "user", "content": "q0"}]
    assert row["decision"]["decision"] == "keep" and row["attributes"]["task_category"] == "coding"
    assert row["scores"][0]["p"] == 0.62 and json.loads(row["meta_json"]) == {"i": "0"}
    assert sorted(loaded["id"]) == sorted(r.pair.id for r in (rec(0), rec(1), rec(2)))
    manifest = json.loads((ds.dir / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [2, 1]


def test_grpc_process_batch_writes_only_curated_decisions(tmp_path):
    from synpref.services.dataset_writer.main import DatasetSink, WriterServicer
    from synpref.v1.pair_pb2 import DECISION_DISCARD
    from synpref.v1.pipeline_pb2 import ProcessBatchRequest

    class Counts:
        def __init__(self):
            self.calls = []

        def count_grpc(self, processed, failed):
            self.calls.append((processed, failed))

    service = Counts()
    servicer = WriterServicer(service, DatasetSink(DatasetVersion(tmp_path, "d", "v2")))
    request = ProcessBatchRequest(records=[rec(0), rec(1, DECISION_FLIP), rec(2, DECISION_DISCARD), rec(0)])
    response = servicer.ProcessBatch(request, None)
    assert (response.dataset_version, response.written, response.duplicates) == ("v2", 2, 1)
    assert service.calls == [(4, 1)]
    # The DISCARD was dropped: the answer names it (before: nothing told it from a duplicate or a write).
    assert list(response.failed_ids) == [rec(2, DECISION_DISCARD).pair.id]


def test_manifest_sink_writes_a_shard_with_its_offsets_when_due(tmp_path):
    from kafka.structs import TopicPartition

    from synpref.services.dataset_writer.main import DatasetSink, ManifestSink, writable_only
    from synpref.shared.config import WriterSettings
    from synpref.v1.pair_pb2 import DECISION_DISCARD

    target = DatasetSink(DatasetVersion(tmp_path, "d", "v1"))
    sink = ManifestSink(target, WriterSettings(root=str(tmp_path), shard_rows=2, flush_interval_s=3600))
    routed = writable_only([rec(0), rec(1, DECISION_DISCARD), rec(2, DECISION_FLIP)])
    assert [r.pair.id for r, _ in routed.failed] == [rec(1).pair.id]
    assert not sink.due()
    sink.write(routed.routed[:1])
    assert not sink.due(), "one row, young: not due"
    sink.write(routed.routed[1:])
    assert sink.due()
    sink.flush({TopicPartition("t", 0): 3, TopicPartition("t", 1): 8})
    assert not sink.due() and sink.buffer == []
    assert sink.stored_offsets() == {TopicPartition("t", 0): 3, TopicPartition("t", 1): 8}
    target.dataset.close()
    reopened = DatasetVersion(tmp_path, "d", "v1")
    assert reopened.stats["rows"] == 2 and reopened.offsets == {"t:0": 3, "t:1": 8}


def test_a_record_that_cannot_become_a_row_goes_to_the_dead_letter_topic_not_the_shard(tmp_path):
    """An out-of-range timestamp would fail the shard's flush on every restart; an enum value this
    build does not name (a newer producer's) is written as its number."""
    from synpref.services.dataset_writer.main import writable_only

    bad_time, new_enum = rec(1), rec(2)
    bad_time.lineage.ingested_at.seconds = 10**12
    new_enum.attributes.objectivity = 7
    routed = writable_only([rec(0), bad_time, new_enum])
    assert [(r.pair.id, why.split(":")[0]) for r, why in routed.failed] == [
        (bad_time.pair.id, "not writable as a dataset row")
    ]
    ds = DatasetVersion(tmp_path, "d", "v1")
    ds.append([r for _, r in routed.routed])
    ds.close()
    rows = load_dataset_version(tmp_path, "d", "v1")
    assert sorted(r["attributes"]["objectivity"] for r in rows) == ["7", "unspecified"]


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(0, 0), (253402300799, 999999999), (-62135596800, 0), (253402300800, 0), (-62135596801, 0), (10**12, 0)],
)
def test_row_problem_names_exactly_the_records_record_row_refuses(seconds, nanos):
    """The writer's stage checks records with row_problem instead of building each row (it built every row twice,
    ~30% of the writer's CPU); the check must refuse what record_row refuses and nothing else."""
    from synpref.services.dataset_writer.rows import record_row, row_problem

    r = rec(0)
    r.lineage.ingested_at.seconds, r.lineage.ingested_at.nanos = seconds, nanos
    try:
        record_row(r)
        converts = True
    except ValueError:
        converts = False
    problem = row_problem(r)
    assert (problem is None) == converts
    assert converts or problem.startswith("lineage.ingested_at")


def two_shards(tmp_path, first: int, last: int, keep: str) -> tuple[DatasetVersion, bytes]:
    """Pairs 0..first-1 and first..last-1 as two shards; the closed version and its file `keep` after the first."""
    ds = DatasetVersion(tmp_path, "d", "v1")
    ds.append(records(0, first))
    saved = (tmp_path / "d" / "v1" / keep).read_bytes()
    ds.append(records(first, last))
    ds.close()
    return ds, saved


def test_dedup_ids_live_on_disk_and_catch_up_after_a_crash(tmp_path):
    # The version's ids are in its IdIndex, not a set: reopening reads no shard when the index is current.
    ds, saved = two_shards(tmp_path, 5, 9, ID_INDEX)
    assert not hasattr(ds, "ids")
    # A crash after the manifest listed the second shard but before its ids were indexed.
    index_file = tmp_path / "d" / "v1" / ID_INDEX
    for extra in index_file.parent.glob(ID_INDEX + "-*"):
        extra.unlink()
    index_file.write_bytes(saved)
    reopened = DatasetVersion(tmp_path, "d", "v1")
    assert reopened.index is not None and len(reopened.index) == 9
    result = reopened.append(records(3, 12))
    assert (result.written, result.duplicates) == (3, 6)
    assert reopened.stats["rows"] == 12
    reopened.close()


def test_an_index_ahead_of_the_manifest_is_rebuilt(tmp_path):
    _, manifest = two_shards(tmp_path, 4, 8, MANIFEST)
    # The manifest restored to its first shard by hand: the second shard is an orphan and its pairs are new again.
    (tmp_path / "d" / "v1" / MANIFEST).write_bytes(manifest)
    reopened = DatasetVersion(tmp_path, "d", "v1")
    assert reopened.index is not None and len(reopened.index) == 4
    assert reopened.append(records(2, 8)).written == 4
    reopened.close()


HOLDER = """
import sys
from synpref.services.dataset_writer.dataset import DatasetVersion
from tests.unit.test_writer import records
ds = DatasetVersion(sys.argv[1], "d", "v1")
ds.append(records(0, 4), {"t:0": 4})
print("held", flush=True)
sys.stdin.readline()
ds.append(records(4, 7), {"t:0": 7})  # written after the second writer asked for the version
"""


def test_a_second_writer_waits_for_the_first_and_reads_what_it_left(tmp_path):
    """A rolling update's new writer pod opens the version while the old one still writes: it must wait, then
    see the old one's last shard (before the lock it kept a stale manifest and lost those pairs)."""
    import subprocess
    import sys
    import threading
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    first = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=repo, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == "held"
        with pytest.raises(TimeoutError, match=r"held by .* pid \d+"):
            DatasetVersion(tmp_path, "d", "v1", lock_timeout_s=0.5)
        opened: list[DatasetVersion] = []
        second = threading.Thread(target=lambda: opened.append(DatasetVersion(tmp_path, "d", "v1")), daemon=True)
        second.start()
        second.join(1.0)
        assert not opened, "the second writer opened the version while the first still held it"
        first.communicate("go\n", timeout=60)
        assert first.returncode == 0
        second.join(30)
    finally:
        first.kill()
    [ds] = opened
    assert ds.stats["rows"] == 7 and ds.offsets == {"t:0": 7}
    assert ds.append(records(0, 8)).written == 1  # re-delivered pairs are duplicates; none is lost
    ds.close()
    DatasetVersion(tmp_path, "d", "v1", lock_timeout_s=0).close()  # close() released it


def test_opening_a_version_twice_in_one_process_fails_at_once(tmp_path):
    with DatasetVersion(tmp_path, "d", "v1") as ds:
        with pytest.raises(RuntimeError, match="already held by this process"):
            DatasetVersion(tmp_path, "d", "v1")
        ds.append(records(0, 2))
    with pytest.raises(RuntimeError, match="was closed"):
        ds.append(records(2, 3))
    with DatasetVersion(tmp_path, "d", "v1") as reopened:
        assert reopened.stats["rows"] == 2
