"""A Hugging Face Hub dataset's shards are one source per split, not one per shard file."""

from __future__ import annotations

from pathlib import Path

import pytest

from synpref.shared.sources import default_source


@pytest.mark.parametrize(
    ("path", "source"),
    [
        ("Skywork-80K/data/train-00000-of-00001.parquet", "Skywork-80K/train"),
        ("Skywork-80K/data/train-00003-of-00004.parquet", "Skywork-80K/train"),
        ("uf_binarized/data/train_prefs-00000-of-00001-17309c769bfe5733.parquet", "uf_binarized/train_prefs"),
        ("some-set/test-00001-of-00002.jsonl.gz", "some-set/test"),
        ("pairs.jsonl", "pairs"),  # other names as before
        ("hh/data-00000-of-00001.arrow", "hh"),  # a save_to_disk shard as before
    ],
)
def test_a_hub_shard_is_named_after_its_dataset_and_split(tmp_path: Path, path: str, source: str) -> None:
    # Before: "train-00000-of-00001", "train-00003-of-00004", ...: by_source counts and each pair's source per shard.
    assert default_source(tmp_path / path, "pairs") == source
