"""Training's pair reader (shared.sources underneath): Parquet, JSONL, the Skywork shape, raw hh-rlhf,
PandaLM ties, extra columns, problems by file#row, the split, RM-Bench."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synpref.shared.pairs import conversation_key
from synpref.training.data import load_hh_rlhf, load_pairs, load_rmbench, split_pairs, write_jsonl


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


PAIRS = [
    {
        "conversation": [msg("user", f"q{i}")],
        "chosen": [msg("assistant", f"good {i}")],
        "rejected": [msg("assistant", f"bad {i}")],
        "source": "s" + str(i % 3),
    }
    for i in range(30)
]


def test_parquet_dataset_folder_reads_like_the_writer_writes_it(tmp_path):
    folder = tmp_path / "synpref" / "v1"
    folder.mkdir(parents=True)
    for shard in range(2):
        rows = PAIRS[shard * 15 : (shard + 1) * 15]
        pq.write_table(pa.Table.from_pylist(rows), folder / f"part-{shard:05d}.parquet")
    got = load_pairs([str(folder)])
    assert not got.problems and len(got.pairs) == 30
    assert got.pairs[0]["chosen"] == [msg("assistant", "good 0")] and got.pairs[0]["source"] == "s0"
    assert len({p["id"] for p in got.pairs}) == 30


def test_jsonl_skywork_shape_and_bad_rows(tmp_path):
    rows = [
        # Skywork-Reward-Preference: whole conversations sharing a prefix, no conversation column.
        {
            "chosen": [msg("user", "hi"), msg("assistant", "hello!")],
            "rejected": [msg("user", "hi"), msg("assistant", "go")],
        },
        {"prompt": "plain prompt", "chosen": "plain good", "rejected": "plain bad", "margin": 0.5},
        {"conversation": [msg("user", "x")], "chosen": [msg("assistant", "")], "rejected": [msg("assistant", "b")]},
    ]
    path = write_jsonl(rows, tmp_path / "p.jsonl.gz")
    got = load_pairs([str(path)])
    assert got.problems == [f"{path.as_posix()}#2: empty message content"]
    assert len(got.pairs) == 2
    first, second = got.pairs
    assert first["conversation"] == [msg("user", "hi")] and first["chosen"] == [msg("assistant", "hello!")]
    assert second["conversation"] == [msg("user", "plain prompt")] and second["margin"] == 0.5
    assert first["source"] == "p"


def test_raw_hh_rlhf_transcripts(tmp_path):
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(
            json.dumps(
                {
                    "chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: good",
                    "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: bad",
                }
            )
            + "\n"
        )
        fh.write(
            json.dumps({"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: z\n\nAssistant: w"}) + "\n"
        )
    direct, via_datasets = load_hh_rlhf(path), load_pairs([str(path)])
    for got in (direct, via_datasets):
        assert len(got.pairs) == 1 and len(got.problems) == 1 and "prefix" in got.problems[0]
        pair = got.pairs[0]
        assert pair["conversation"] == [msg("user", "a"), msg("assistant", "b"), msg("user", "c")]
        assert (pair["chosen"], pair["rejected"]) == ([msg("assistant", "good")], [msg("assistant", "bad")])


def test_split_is_seeded_and_by_conversation():
    pairs = [*PAIRS, {**PAIRS[0], "chosen": [msg("assistant", "alt")]}]
    train, evals = split_pairs(pairs, 0.2, seed=0)
    assert (train, evals) == split_pairs(pairs, 0.2, seed=0)
    assert split_pairs(pairs, 0.2, seed=1) != (train, evals)
    # 30 conversations, 0.2 of them held out: 6, with the second pair of q0 wherever q0 went.
    assert len(train) + len(evals) == len(pairs) and len(evals) in (6, 7)
    held = {conversation_key(p["conversation"]) for p in evals}
    assert len(held) == 6 and not {conversation_key(p["conversation"]) for p in train} & held
    assert split_pairs(pairs, 0.0, seed=0) == (pairs, [])


def test_ties_extra_columns_and_own_ids(tmp_path):
    panda = [
        {"instruction": "i", "input": "", "response1": "a", "response2": "b", "annotator1": 1, "annotator2": 1},
        {"instruction": "i", "input": "", "response1": "a", "response2": "b", "annotator1": 0, "annotator2": 0},
    ]
    (tmp_path / "panda.json").write_text(json.dumps(panda))
    got = load_pairs([str(tmp_path / "panda.json")])
    assert len(got.pairs) == 1 and got.problems[0].startswith(f"{(tmp_path / 'panda.json').as_posix()}#1: ")
    assert "tie" in got.problems[0]
    rows = [{"id": "own-7", "prompt": "p", "chosen": "c", "rejected": "r", "margin": 2, "weight": 0.5}]
    path = write_jsonl(rows, tmp_path / "extra.jsonl")
    (pair,) = load_pairs([str(path)], columns_extra=("weight",)).pairs
    assert (pair["id"], pair["margin"], pair["weight"]) == ("own-7", 2, 0.5)


def test_rmbench_reader(tmp_path):
    item = {"id": 1, "subset": "x", "prompt": "p", "chosen": ["a", "b", "c"], "rejected": ["d", "e", "f"]}
    (tmp_path / "safety-refuse_filtered.json").write_text(json.dumps([item]))
    items = load_rmbench(tmp_path)
    assert items[0]["domain"] == "safety" and items[0]["chosen"] == ["a", "b", "c"]
    with pytest.raises(FileNotFoundError):
        load_rmbench(tmp_path / "missing")


def test_the_writers_own_version_folder_trains_from_its_manifest(tmp_path):
    # Defect 13 (the cluster's CronJob): `train_files: [<root>/<name>/<version>]` read manifest.json as a
    # pair file and failed. The manifest's shards are read instead, and a shard it does not list yet
    # (a writer mid-flush) is left out.
    from synpref.services.dataset_writer.dataset import DatasetVersion
    from synpref.shared.pairs import new_pair, new_record

    records = [
        new_record(new_pair([msg("user", f"q {i}")], [msg("assistant", f"good {i}")], [msg("assistant", "bad")], "w"))
        for i in range(12)
    ]
    version = DatasetVersion(tmp_path / "datasets", "curated", "v1")
    version.append(records[:7])
    version.append(records[7:])
    version.close()
    folder = tmp_path / "datasets" / "curated" / "v1"
    pq.write_table(pa.Table.from_pylist(PAIRS[:3]), folder / "part-99999.parquet")  # not in the manifest
    for path in (folder, tmp_path / "datasets"):
        got = load_pairs([str(path)])
        assert not got.problems, got.problems
        assert sorted(p["id"] for p in got.pairs) == sorted(r.pair.id for r in records)
