"""The loop's closing steps (datasets, final RM, registry, report) and the record lookups every
step uses, mixed into Controller (loop.py) so that file holds the orchestration of the stages."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from synpref.services.controller.embeddings import PairView
from synpref.services.controller.intake import pool_label_accuracy
from synpref.services.controller.models import ModelHandle, RewardModels
from synpref.services.controller.publish import export_registry, reload_scorer, write_registry
from synpref.services.controller.simulated import SimulatedJudge, judges_majority_label, pair_as_given
from synpref.services.controller.state import RunState
from synpref.services.gold_scorer.scoring import pair_dict
from synpref.shared.config import ControllerSettings, Settings
from synpref.shared.files import replace_durably
from synpref.shared.pairstore import PairStore
from synpref.shared.roles import BEST, GOLD
from synpref.shared.scorer_admin import write_models_file
from synpref.v1.pair_pb2 import DECISION_KEEP, PairRecord

SHARD_ROWS = 20_000
"""Pairs per Parquet shard of a dataset version the loop writes."""

STAGING = ".writing"
"""Folder of workdir/datasets where final.dataset builds a version before it moves it into place."""

CURATED = ("gold", "silver", "stage2")
"""The curated pools (kept + flipped): D_gold, D_silver and Stage 2's keeps and flips."""


class FinalSteps:
    """Steps final.dataset, final.train, final.register and report, plus model lookups.

    Controller sets the attributes declared here in its constructor.
    """

    settings: Settings
    c: ControllerSettings
    state: RunState
    pairstore: PairStore
    models: RewardModels
    root: Path
    say: Callable[[str], None]

    def view(self, pools: str | Sequence[str]) -> PairView:
        raise NotImplementedError  # Controller.view

    def handle(self, role: str) -> ModelHandle:
        """The ModelHandle recorded in the state for model role `role` (KeyError if none)."""
        return ModelHandle.from_dict(self.state.models[role])

    def records(
        self, pools: str | Sequence[str], keep: Callable[[PairRecord], bool] | None = None
    ) -> Iterator[PairRecord]:
        """The records of `pools` in row order (those `keep` accepts), streamed from the store."""
        for chunk in self.pairstore.scan(pools, batch=self.c.batch_pairs):
            yield from (r for _, r in chunk if keep is None or keep(r))

    def dataset_versions(self) -> dict[str, tuple[Iterator[PairRecord], str]]:
        """Version name -> (records, split) of the datasets final.dataset writes.

        kept: the curated pairs whose label was confirmed as given (DecisionRecord KEEP: humans' KEEP in
        D_gold, the judges' in D_silver, Stage 2's); curated adds the flipped ones (the paper trained on
        the kept 26M; its 40M includes the flips).
        """
        from synpref.services.dataset_writer.dataset import HELDOUT, TRAIN  # pyarrow: only when writing

        return {
            "human-verified": (self.records("gold"), TRAIN),
            "kept": (self.records(CURATED, lambda r: r.decision.decision == DECISION_KEEP), TRAIN),
            "curated": (self.records(CURATED), TRAIN),
            "heldout": (self.records("holdout"), HELDOUT),
        }

    def write_datasets(self) -> None:
        """Write the dataset versions (dataset_versions) under workdir/datasets/<name>/, each whole or not at all."""
        from synpref.services.dataset_writer.dataset import DatasetVersion, size_bounded, version_dir

        root = self.root / "datasets"
        staging = root / STAGING
        out = {}
        for version, (records, split) in self.dataset_versions().items():
            # version_dir first: a dataset_name such as ".." is refused before anything is removed.
            path = version_dir(root, self.c.dataset_name, version)
            # Built aside and moved into place once complete: each shard commits a manifest, so a version written in
            # place and killed part way read as a whole one with fewer rows. From empty, so a rerun after a kill does
            # not append to the first attempt's shards; the store's pairs are unique, so no set of ids is kept.
            building = version_dir(staging, self.c.dataset_name, version)
            shutil.rmtree(building, ignore_errors=True)
            with DatasetVersion(staging, self.c.dataset_name, version, dedup=False) as dv:
                # One Parquet shard per SHARD_ROWS pairs or writer.shard_bytes of them: a shard's records are held
                # before it is written (20,000 long pairs could be GBs).
                for shard in size_bounded(records, SHARD_ROWS, self.settings.writer.shard_bytes):
                    dv.append(shard, split=split)
                stats = dv.stats
            swap_in(building, path)
            out[version] = {"dir": str(path), **stats}
        shutil.rmtree(staging, ignore_errors=True)
        self.state.results["datasets"] = out

    def train_final(self) -> None:
        """Train the final RM on the curated set (kept + flipped); record its held-out accuracy beside
        as-given, best and gold."""
        s = self.state
        models_dir = self.root / "models"
        final = self.models.train("final", self.view(CURATED), [], models_dir)
        s.models["final"] = final.to_dict()
        acc: dict[str, float] = {"final": self.holdout_accuracy(final)}
        # The same budget on the pairs as they came in (in a study, with their noise): every pair that was
        # in D_un after ingest, with the label it came in with.
        given = PairView(self.pairstore, self.pairstore.all_rows(("unverified", "discarded", *CURATED)), self.as_given)
        baseline = self.models.train("as-given", given, [], models_dir)
        acc["as_given"] = self.holdout_accuracy(baseline)
        study = self.c.study
        if study is not None and study.judges:
            # A study's simulated judges (seeded as where they voted) label every pair for free; with LLM judges
            # this would be a judge pass over the whole pool, so production runs leave the baseline out.
            panel = [SimulatedJudge(j, self.c.seed) for j in study.judges]

            def judged(records: Sequence[PairRecord], rows: Sequence[int]) -> list[dict]:
                pairs = self.as_given(records, rows)
                return [judges_majority_label(panel, r, p) for r, p in zip(records, pairs, strict=True)]

            judges_only = self.models.train("judges-only", PairView(self.pairstore, given.rows, judged), [], models_dir)
            acc["judges_only"] = self.holdout_accuracy(judges_only)
        acc["best_working"] = self.holdout_accuracy(self.handle(BEST))
        acc[GOLD] = self.holdout_accuracy(self.handle(GOLD))
        s.results["holdout_accuracy"] = acc
        s.results["holdout_pairs"] = self.pairstore.count("holdout")
        s.results["curated_label_accuracy"] = self.label_accuracy(CURATED)
        self.say("held-out accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))

    def holdout_accuracy(self, handle: ModelHandle) -> float:
        """`accuracy` of `handle` on every held-out pair, scored controller.batch_pairs pairs at a time (as
        score_verified scores), so memory grows with the batch, not the held-out pool; NaN for none."""
        right = total = 0
        for chunk in self.pairstore.scan("holdout", batch=self.c.batch_pairs):
            rewards = self.models.score(handle, [pair_dict(r) for _, r in chunk])
            right += sum(1 for c, r in rewards if c > r)
            total += len(rewards)
        # accuracy()'s np.mean sums the booleans exactly in float64 and divides once: the same quotient.
        return right / total if total else float("nan")

    def as_given(self, records: Sequence[PairRecord], rows: Sequence[int]) -> list[dict]:
        """The pairs with the labels they had at ingest (after any study noise): flipped back where flipped since."""
        given = self.pairstore.given(rows)
        return [pair_as_given(r, given[row]) for r, row in zip(records, rows, strict=True)]

    def label_accuracy(self, pools: str | tuple[str, ...]) -> float | None:
        """Study only: share of the pairs of `pools` whose current label is the source's."""
        return pool_label_accuracy(self.pairstore, pools) if self.c.study is not None else None

    def register(self) -> None:
        """Export the final and gold RMs to models_dir, write the scorer registry, reload the scorer if configured."""
        s = self.state
        models_dir = Path(self.c.models_dir)
        if not models_dir.is_absolute():
            models_dir = self.root / models_dir
        registry = export_registry(self.models, {BEST: self.handle("final"), GOLD: self.handle(GOLD)}, models_dir)
        write_registry(models_dir, registry, self.c.max_length)
        s.results["registry"] = {"dir": str(models_dir.resolve()), **registry}
        if self.c.scorer_reload_url or self.c.scorer_models_file:
            self.reload(registry)

    def reload(self, registry: dict[str, dict[str, str]]) -> None:
        """Hot-swap the registry's models into the scorers: write them to controller.scorer_models_file, which
        every scorer replica polls (pods started later included), then reload them at
        controller.scorer_reload_url, whose one replica switches at once. The file goes first, so that the other
        replicas converge even when that call fails."""
        if self.c.scorer_models_file:
            path = Path(self.c.scorer_models_file)
            write_models_file(path if path.is_absolute() else self.root / path, registry)
        if self.c.scorer_reload_url:
            reload_scorer(self.c.scorer_reload_url, registry, token_file=self.c.scorer_admin_token_file)

    def report(self) -> None:
        """Write the run report (controller/report.py) and record its path in the results."""
        from synpref.services.controller.report import write_report

        path = write_report(self.root, self.state, self.settings)
        self.state.results["report"] = str(path)


def swap_in(built: Path, path: Path) -> None:
    """Move the complete version folder `built` to `path`, over the one there: a reader finds the old version, the
    new one or (between two renames) none, never part of one. Both folders are on the same file system."""
    old = built.with_name(f"{built.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)  # os.replace cannot put a folder over a non-empty one
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_durably(built, path)
    shutil.rmtree(old, ignore_errors=True)
