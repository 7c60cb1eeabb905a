"""Review 46, the trainer's data path: what the token cache's key covers, a cache left in part, and margin values."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from transformers import AutoTokenizer

from synpref.shared import source_formats
from synpref.shared.modeling import encode_pair
from synpref.shared.source_files import SourceError
from synpref.training import data_cache
from synpref.training.batching import pair_margin
from synpref.training.data import write_jsonl
from synpref.training.data_cache import prepare_data
from synpref.training.reward_config import RewardConfig
from testing.tiny import build_tiny_tokenizer


def _pair(i: int, **extra) -> dict:
    return {
        "conversation": [{"role": "user", "content": f"q {i}"}],
        "chosen": [{"role": "assistant", "content": f"good {i}"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
        "source": "s",
        **extra,
    }


TEXTS = [f"q {i} good bad" for i in range(12)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), TEXTS, vocab_size=120)


def _config(tmp_path, **kw) -> RewardConfig:
    train = write_jsonl([_pair(i, weight=i / 8) for i in range(8)], tmp_path / "train.jsonl")
    base = dict(output_dir=str(tmp_path / "out"), train_files=[str(train)], max_length=64, encode_workers=1)
    return RewardConfig(**{**base, **kw})


def test_the_cache_key_covers_the_per_format_readers(tokenizer, tmp_path, monkeypatch):
    # sources.py hands each row to source_formats.py (hh-rlhf, PandaLM, LLMBar, RM-Bench, the pairs shape): a fix
    # there changes which rows are pairs and what they hold, and the cache of the old reading was mapped as current.
    cfg = _config(tmp_path)
    key = data_cache.cache_key(cfg, tokenizer)[0]
    changed = tmp_path / "source_formats.py"
    shutil.copy(source_formats.__file__, changed)
    with open(changed, "a", encoding="utf-8") as fh:
        fh.write("\n# another reading of hh-rlhf\n")
    monkeypatch.setattr(source_formats, "__file__", str(changed))
    assert data_cache.cache_key(cfg, tokenizer)[0] != key


def test_the_cache_key_covers_the_named_bos_and_eos(tmp_path):
    # The template writes bos_token by name and encoding prepends BOS by id; tokenizer_sha256 hashed neither name.
    # A tokenizer_config.json naming another BOS over the same vocabulary gave other ids under the same key.
    folder = tmp_path / "tok"
    before = build_tiny_tokenizer(folder, TEXTS, style="llama", vocab_size=120)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "<|end_of_text|>"}))
    after = AutoTokenizer.from_pretrained(folder)
    pair = _pair(1)
    assert encode_pair(before, pair, 64)[0].input_ids != encode_pair(after, pair, 64)[0].input_ids
    cfg = _config(tmp_path)
    assert data_cache.cache_key(cfg, before)[0] != data_cache.cache_key(cfg, after)[0]
    # The pad token is never in the cached ids (the trainer sets one where a tokenizer has none): no rebuild for it.
    padded = AutoTokenizer.from_pretrained(folder)
    padded.pad_token = padded.eos_token
    assert data_cache.cache_key(cfg, padded)[0] == data_cache.cache_key(cfg, after)[0]


@pytest.mark.parametrize("damage", ["ids_cut", "store_gone", "array_gone"])
def test_a_cache_that_lost_files_is_built_again_not_taken_as_whole(tokenizer, tmp_path, caplog, damage):
    # The trainer removes its cache once training ends (and a build removes other keys' folders): a kill during that
    # rmtree left report.json beside missing or cut stores, and every later run in this output_dir failed on them.
    cfg = _config(tmp_path, eval_fraction=0.25)
    built = prepare_data(cfg, tokenizer, tmp_path / "out")
    want = (built.report, [(p.chosen, p.rejected, p.margin) for p in built.train.pairs])
    folder = built.folder
    assert folder is not None
    del built
    if damage == "ids_cut":
        ids = folder / "train" / "ids.int32"
        ids.write_bytes(ids.read_bytes()[:8])
    elif damage == "store_gone":
        (folder / "eval" / "store.json").unlink()
    else:
        (folder / "train" / "margins.npy").unlink()
    with caplog.at_level(logging.WARNING, logger=data_cache.__name__):
        again = prepare_data(cfg, tokenizer, tmp_path / "out")
    assert "incomplete" in caplog.text
    assert again.folder == folder
    assert (again.report, [(p.chosen, p.rejected, p.margin) for p in again.train.pairs]) == want


def test_a_margin_that_is_no_number_names_its_column_and_pair():
    # float()'s "could not convert string to float: 'high'" named neither, raised hours into the cache's build.
    with pytest.raises(ValueError, match=r"margin_column 'weight' is 'high' for pair p7: not a number"):
        pair_margin({"id": "p7", "weight": "high"}, "weight")
    with pytest.raises(ValueError, match=r"margin_column 'weight' is \[1\] for pair \?"):
        pair_margin({"weight": [1]}, "weight")
    assert pair_margin({"weight": "0.5"}, "weight") == 0.5 and pair_margin({"weight": None}, "weight") == 0.0


def test_pairs_without_a_margin_value_are_counted_and_logged(tokenizer, tmp_path, caplog):
    # A misspelt margin_column trained every pair with margin 0, and nothing said so.
    with caplog.at_level(logging.WARNING, logger=data_cache.__name__):
        got = prepare_data(_config(tmp_path, margin_column="weigth"), tokenizer, tmp_path / "out")
    assert got.report["train_margin_missing"] == got.report["train_pairs"] == 8
    assert "8 of 8 training pairs have no 'weigth' value" in caplog.text
    reused = prepare_data(_config(tmp_path, margin_column="weigth"), tokenizer, tmp_path / "out")
    assert reused.report == got.report
    right = prepare_data(_config(tmp_path, margin_column="weight"), tokenizer, tmp_path / "out2")
    assert "train_margin_missing" not in right.report
    assert sorted(p.margin for p in right.train.pairs) == [i / 8 for i in range(8)]


@pytest.mark.parametrize("which", ["train_files", "eval_files"])
def test_a_path_without_pair_files_is_an_error_not_left_out(tokenizer, tmp_path, which):
    # A folder of .csv files added nothing and said nothing: training went on from the other train paths, or
    # without any eval, or stopped at "0 usable training pairs < global_batch_size" that named no path.
    other = tmp_path / "exported"
    other.mkdir()
    (other / "pairs.csv").write_text("conversation,chosen,rejected\n")
    cfg = _config(tmp_path)
    cfg = RewardConfig(**{**cfg.to_dict(), which: [*getattr(cfg, which), str(other)]})
    with pytest.raises(SourceError, match=rf"{other}: no pair files in it \(none ending .json, .jsonl"):
        prepare_data(cfg, tokenizer, tmp_path / "out")
