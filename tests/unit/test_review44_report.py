"""Review 44: the controller's final steps and report; each test reproduces a defect found there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from synpref.services.dataset_writer import dataset
from testing import controller_fakes as fakes


class Killed(RuntimeError):
    pass


def run_settings(tmp_path: Path):
    from synpref.shared.config import load_settings

    data = fakes.write_synthetic(tmp_path / "pairs.jsonl", 160, seed=1)
    return load_settings(
        controller={
            "workdir": str(tmp_path / "run"),
            "sources": [str(data)],
            "seed_fraction": 0.1,
            "iterations": 1,
            "patience": 1,
            "human_budget": 6,
            "study": {"human": "oracle", "label_noise": 0.3, "judges": [{"name": "sim-a", "accuracy": 0.85}]},
        }
    )


def controller(settings):
    from synpref.services.controller.loop import Controller
    from synpref.services.controller.providers import OracleHumans
    from synpref.services.controller.simulated import SimulatedJudge

    judges = [SimulatedJudge(j, seed=0) for j in settings.controller.study.judges]
    return Controller(
        settings, fakes.BagOfWordsModels(), OracleHumans(), judges, embed=fakes.embed, progress=lambda _m: None
    )


def listed_rows(folder: Path) -> int | None:
    """The rows a reader of the version finds (its manifest's count); None where there is no version."""
    manifest = folder / dataset.MANIFEST
    return json.loads(manifest.read_text())["rows"] if manifest.exists() else None


def test_a_dataset_step_killed_part_way_leaves_no_partial_version_that_reads_as_whole(tmp_path, monkeypatch):
    # final.dataset committed each shard into the version's own folder: a controller killed (OOM, node drain,
    # disk full at 40-60 GB) part way through `kept` left datasets/<name>/kept with a valid manifest listing the
    # shards so far, which `load_dataset_version` and every reader take for the whole version. A version is now
    # built aside and put in place whole; the resumed step writes each one complete, once.
    from synpref.services.controller import final_steps

    monkeypatch.setattr(final_steps, "SHARD_ROWS", 7)
    append = dataset.DatasetVersion.append

    def killed_in_kept(self, records, offsets=None, split="train"):
        if self.version == "kept" and len(self.manifest["shards"]) == 2:
            raise Killed("controller killed while writing `kept`")
        return append(self, records, offsets, split)

    monkeypatch.setattr(dataset.DatasetVersion, "append", killed_in_kept)
    settings = run_settings(tmp_path)
    first = controller(settings)
    with pytest.raises(Killed):
        first.run()
    first.close()
    versions = Path(settings.controller.workdir) / "datasets" / settings.controller.dataset_name
    assert listed_rows(versions / "kept") is None, "a reader finds no version rather than part of one"

    monkeypatch.setattr(dataset.DatasetVersion, "append", append)
    again = controller(settings)
    state = again.run()
    pools = again.pool_sizes()
    again.close()
    written = state.results["datasets"]
    assert written["kept"]["dir"] == str(versions / "kept")
    curated = pools["gold"] + pools["silver"] + pools["stage2"]
    assert listed_rows(versions / "curated") == written["curated"]["rows"] == curated > 14
    assert listed_rows(versions / "kept") == written["kept"]["rows"] > 14
    assert listed_rows(versions / "heldout") == pools["holdout"]
    assert sorted(p.name for p in versions.iterdir()) == ["curated", "heldout", "human-verified", "kept"]
