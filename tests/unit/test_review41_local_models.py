"""The local trainers across runs in a kept workdir and across restarts of one run (review 41)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from synpref.services.controller.models import FullModels
from synpref.shared.config import load_settings
from testing.tiny import build_tiny_reward_model

torch.set_num_threads(1)


def pairs(n: int, offset: int = 0) -> list[dict]:
    return [
        {
            "conversation": [{"role": "user", "content": f"tell me about stone {i + offset}"}],
            "chosen": [{"role": "assistant", "content": f"thank you, gladly: stone {i}"}],
            "rejected": [{"role": "assistant", "content": "no, go away"}],
        }
        for i in range(n)
    ]


def flipped(batch: list[dict]) -> list[dict]:
    return [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in batch]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    words = [m["content"] for p in pairs(12) for part in ("conversation", "chosen", "rejected") for m in p[part]]
    return build_tiny_reward_model(tmp_path_factory.mktemp("tiny"), arch="qwen3", seed=3, texts=words, vocab_size=200)


def full_models(workdir: Path, backbone: Path, new_run: bool) -> FullModels:
    """The controller's FullModels; `new_run` as the loop's ingest step starts one (a restart does not)."""
    settings = load_settings(
        controller={
            "workdir": str(workdir),
            "trainer": "full",
            "backbone": str(backbone),
            "max_length": 256,
            # A resumable checkpoint every step, as a cluster's train config has (save_steps), kept at the end.
            "train": {"max_steps": 2, "save_steps": 1, "learning_rate": 5e-3, "lr_scheduler": "constant"},
        }
    ).controller
    models = FullModels(settings, workdir)
    start = getattr(models, "new_run", None)  # as Controller.ingest calls it
    if new_run and start is not None:
        start()
    return models


def weights(folder: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def starts(folder: str) -> list[dict]:
    """The trainer's `start` events in the folder the checkpoint was trained in."""
    lines = (Path(folder).parent / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "start"]


def test_a_new_run_in_a_kept_workdir_trains_its_own_model_not_the_earlier_runs(tmp_path, backbone):
    """Same pairs, labels flipped (a study rerun with other curation settings): the data order's fingerprint
    (pair token counts, seed, batch) matched, so the new run resumed the earlier run's last checkpoint at its
    last step, trained nothing, and reported the earlier run's RM as its own."""
    models_dir = tmp_path / "models"
    first = full_models(tmp_path, backbone, new_run=True).train("final", pairs(8), [], models_dir)
    before = weights(first.path)
    second = full_models(tmp_path, backbone, new_run=True).train("final", flipped(pairs(8)), [], models_dir)
    assert starts(second.path)[-1]["resumed_from"] == "", "the new run resumed the earlier run's checkpoint"
    after = weights(second.path)
    assert any(not torch.equal(before[k], after[k]) for k in before), "the new run's RM is the earlier run's"
    assert second.path != first.path and second.version != first.version  # the scorer reloads it, not "same"
    kept = weights(first.path)  # the earlier run's registry still points at its own model
    assert all(torch.equal(before[k], kept[k]) for k in before)


def test_a_new_run_on_other_pairs_is_not_refused_on_every_attempt(tmp_path, backbone):
    """Other pairs: the earlier run's checkpoint was refused as other data, on every restart of the step."""
    models_dir = tmp_path / "models"
    full_models(tmp_path, backbone, new_run=True).train("working-1", pairs(8), [], models_dir)
    handle = full_models(tmp_path, backbone, new_run=True).train("working-1", pairs(10, offset=50), [], models_dir)
    assert (Path(handle.path) / "config.json").exists()


def test_a_restart_of_the_same_run_resumes_its_own_checkpoint(tmp_path, backbone):
    models_dir = tmp_path / "models"
    full_models(tmp_path, backbone, new_run=True).train("final", pairs(8), [], models_dir)  # the first run
    first = full_models(tmp_path, backbone, new_run=True).train("final", pairs(8, offset=9), [], models_dir)
    again = full_models(tmp_path, backbone, new_run=False).train("final", pairs(8, offset=9), [], models_dir)
    assert again.path == first.path and again.version == first.version
    resumed = starts(again.path)[-1]["resumed_from"]
    assert resumed and Path(resumed).parent == Path(first.path).parent  # its own checkpoint-2, not the first run's


def test_a_run_after_fresh_has_a_version_the_scorer_reloads(tmp_path, backbone):
    """`synpref run --fresh` empties the workdir, so the new final RM has the earlier one's path: with its version
    too ("final-final"), a scorer serving the earlier RM answers the reload as done and keeps serving it."""
    workdir = tmp_path / "run"
    first = full_models(workdir, backbone, new_run=True).train("final", pairs(8), [], workdir / "models")
    shutil.rmtree(workdir)  # embedded.start_over
    second = full_models(workdir, backbone, new_run=True).train("final", flipped(pairs(8)), [], workdir / "models")
    assert second.path == first.path
    assert second.version != first.version


def test_the_head_trainers_feature_cache_is_not_read_for_another_checkpoint_at_the_same_path(tmp_path):
    """trainer: head caches [CLS] states in <workdir>/features/, keyed by the backbone's path: a backbone replaced
    there (a newer fine-tune, a rebuilt folder) was served the earlier checkpoint's states, so the head trained on
    and the loop scored with another model's features than the exported checkpoint computes."""
    from synpref.services.controller.models import FeatureCache

    batch = pairs(3)
    words = [m["content"] for p in batch for part in ("conversation", "chosen", "rejected") for m in p[part]]
    backbone = tmp_path / "bert"
    build_tiny_reward_model(backbone, arch="bert", seed=1, texts=words, vocab_size=200)
    FeatureCache(str(backbone), 128, tmp_path / "features").features(batch)  # the earlier run's cache
    other = build_tiny_reward_model(tmp_path / "other", arch="bert", seed=2, texts=words, vocab_size=200)
    shutil.copy(other / "model.safetensors", backbone / "model.safetensors")  # new weights, the same tokenizer
    fresh = FeatureCache(str(backbone), 128, tmp_path / "elsewhere").features(batch)
    again = FeatureCache(str(backbone), 128, tmp_path / "features").features(batch)
    assert np.allclose(again[0], fresh[0]) and np.allclose(again[1], fresh[1]), "stale features of the old backbone"
