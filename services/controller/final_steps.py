"""The loop's closing steps (datasets, final RM, registry, report) and the record lookups every
step uses, mixed into Controller (loop.py) so that file holds the orchestration of the stages."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from synpref.services.controller.models import ModelHandle, RewardModels, accuracy
from synpref.services.controller.publish import export_registry, reload_scorer, write_registry
from synpref.services.controller.simulated import label_accuracy, pair_as_given
from synpref.services.controller.state import RunState
from synpref.services.gold_scorer.scoring import pair_dict
from synpref.shared.config import ControllerSettings, Settings
from synpref.shared.roles import BEST, GOLD
from synpref.v1.pair_pb2 import DECISION_KEEP, PairRecord


class FinalSteps:
    """Steps final.dataset, final.train, final.register and report, plus record lookups.

    Controller sets the attributes declared here in its constructor.
    """

    settings: Settings
    c: ControllerSettings
    state: RunState
    records: dict[str, PairRecord]
    models: RewardModels
    root: Path
    say: Callable[[str], None]

    def pairs(self, keys: list[str]) -> list[dict]:
        """The records of `keys` as pair dicts (gold_scorer.scoring.pair_dict), in order."""
        return [pair_dict(self.records[k]) for k in keys]

    def handle(self, role: str) -> ModelHandle:
        """The ModelHandle recorded in the state for model role `role` (KeyError if none)."""
        return ModelHandle.from_dict(self.state.models[role])

    def curated_keys(self) -> list[str]:
        """Keys of the curated set (kept + flipped): D_gold, then D_silver, then the Stage-2 keeps and flips."""
        s = self.state
        return s.pool("gold") + s.pool("silver") + s.pool("stage2")

    def kept_keys(self) -> list[str]:
        """Keys of the curated pairs whose label was confirmed as given: DecisionRecord KEEP.

        That is humans' KEEP in D_gold, the judges' KEEP in D_silver and Stage 2's KEEP; a pair
        whose label was swapped (FLIP, by humans, judges or Stage 2) is in `curated` only.
        """
        return [k for k in self.curated_keys() if self.records[k].decision.decision == DECISION_KEEP]

    def dataset_versions(self) -> dict[str, tuple[list[str], str]]:
        """Version name -> (record keys, split) of the datasets final.dataset writes."""
        from synpref.services.dataset_writer.dataset import HELDOUT, TRAIN  # pyarrow: only when writing

        return {
            "human-verified": (self.state.pool("gold"), TRAIN),
            "kept": (self.kept_keys(), TRAIN),
            "curated": (self.curated_keys(), TRAIN),
            "heldout": (self.state.pool("holdout"), HELDOUT),
        }

    def write_datasets(self) -> None:
        """Write the dataset versions (dataset_versions) under workdir/datasets/<name>/."""
        from synpref.services.dataset_writer.dataset import DatasetVersion

        root = self.root / "datasets"
        out = {}
        for version, (keys, split) in self.dataset_versions().items():
            dv = DatasetVersion(root, self.c.dataset_name, version)
            dv.append((self.records[k] for k in sorted(keys)), split=split)
            out[version] = {"dir": str(dv.dir), **dv.stats}
        self.state.results["datasets"] = out

    def train_final(self) -> None:
        """Train the final RM on the curated set (kept + flipped); record its held-out accuracy beside
        as-given, best and gold."""
        s = self.state
        models_dir = self.root / "models"
        final = self.models.train("final", self.pairs(self.curated_keys()), [], models_dir)
        s.models["final"] = final.to_dict()
        holdout = s.pool("holdout")
        acc: dict[str, float] = {"final": accuracy(self.models.score(final, self.pairs(holdout)))}
        # The same budget on the pairs as they came in (in a study, with their noise).
        given = [self.as_given(k) for k in sorted(s.results["initial_labels"])]
        baseline = self.models.train("as-given", given, [], models_dir)
        acc["as_given"] = accuracy(self.models.score(baseline, self.pairs(holdout)))
        acc["best_working"] = accuracy(self.models.score(self.handle(BEST), self.pairs(holdout)))
        acc[GOLD] = accuracy(self.models.score(self.handle(GOLD), self.pairs(holdout)))
        s.results["holdout_accuracy"] = acc
        s.results["curated_label_accuracy"] = self.label_accuracy(self.curated_keys())
        self.say("held-out accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))

    def as_given(self, key: str) -> dict:
        """The pair with the label it had at ingest (after any study noise); only flips change an id."""
        return pair_as_given(self.records[key], self.state.results["initial_labels"][key])

    def label_accuracy(self, keys: list[str]) -> float | None:
        """Study only: share of these pairs whose current label is the source's."""
        return label_accuracy([self.records[k] for k in keys])

    def register(self) -> None:
        """Export the final and gold RMs to models_dir, write the scorer registry, reload the scorer if configured."""
        s = self.state
        models_dir = Path(self.c.models_dir)
        if not models_dir.is_absolute():
            models_dir = self.root / models_dir
        registry = export_registry(self.models, {BEST: self.handle("final"), GOLD: self.handle(GOLD)}, models_dir)
        write_registry(models_dir, registry, self.c.max_length)
        s.results["registry"] = {"dir": str(models_dir.resolve()), **registry}
        if self.c.scorer_reload_url:
            self.reload(registry)

    def reload(self, registry: dict[str, dict[str, str]]) -> None:
        """Hot-swap the registry's models into the scorer at controller.scorer_reload_url."""
        reload_scorer(self.c.scorer_reload_url, registry, token_file=self.c.scorer_admin_token_file)

    def report(self) -> None:
        """Write the run report (controller/report.py) and record its path in the results."""
        from synpref.services.controller.report import write_report

        path = write_report(self.root, self.state, self.settings)
        self.state.results["report"] = str(path)
