"""The curation loop end to end, in process, on synthetic pairs with a bag-of-words RM."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from synpref.services.controller.loop import Controller
from synpref.services.controller.providers import OracleHumans
from synpref.services.controller.report import interval_text
from synpref.services.controller.simulated import SimulatedJudge, label_is_true
from synpref.services.controller.state import StateStore, key_of, read_pools, read_records
from synpref.shared.config import load_settings
from testing import controller_fakes as fakes


class Crash(RuntimeError):
    pass


def settings_for(tmp_path: Path, **controller):
    data = fakes.write_synthetic(tmp_path / "pairs.jsonl", 160, seed=1)
    values = {
        "workdir": str(tmp_path / "run"),
        "sources": [str(data)],
        "seed_fraction": 0.1,
        "iterations": 3,
        "patience": 3,
        "human_budget": 6,
        "study": {
            "human": "oracle",
            "label_noise": 0.3,
            "judges": [
                {"name": "sim-a", "accuracy": 0.85},
                {"name": "sim-b", "accuracy": 0.8},
                {"name": "sim-c", "accuracy": 0.75},
            ],
        },
        **controller,
    }
    return load_settings(controller=values)


def controller_for(settings, on_step=None, models=None) -> Controller:
    judges = [SimulatedJudge(j, seed=0) for j in settings.controller.study.judges]
    return Controller(
        settings,
        models or fakes.BagOfWordsModels(),
        OracleHumans(),
        judges,
        embed=fakes.embed,
        on_step=on_step,
        progress=lambda _msg: None,
    )


def read_rows(folder: str) -> list[dict]:
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    return [row for shard in manifest["shards"] for row in pq.read_table(Path(folder) / shard["file"]).to_pylist()]


def outcome(workdir: Path, store: Path | None = None) -> dict:
    state = StateStore(store or workdir).load()
    rows = read_rows(state.results["datasets"]["curated"]["dir"])
    return {
        "pools": read_pools(store or workdir),
        "history": state.history,
        "stage2": state.results["stage2"],
        "holdout": state.results["holdout_accuracy"],
        "curated": sorted((r["id"], r["decision"]["decision"]) for r in rows),
    }


def test_loop_runs_both_stages_and_repairs_labels(tmp_path):
    settings = settings_for(tmp_path)
    state = controller_for(settings).run()
    pools = read_pools(settings.controller.workdir)
    records = read_records(settings.controller.workdir)
    everything = [k for keys in pools.values() for k in keys]
    assert len(everything) == len(set(everything)) == 160, "every pair is in exactly one pool"
    assert pools["unverified"] == []
    assert len(state.history) >= 2 and state.iteration >= 1
    assert state.results["stage1"][0]["retrieved"] > 0
    assert sum(e.get("to_humans", 0) for e in state.results["stage1"]) > 0
    assert sum(state.results["stage2"]["decisions"].values()) == state.results["stage2"]["pairs"]
    # Oracle humans and judges better than chance must leave better labels than 30% noise.
    # The noise flips each pool label with probability 0.3 (a seeded coin per pair): within 4 sigma.
    n = 160 - len(pools["holdout"])
    assert abs(state.results["initial_label_accuracy"] - 0.7) < 4 * (0.21 / n) ** 0.5
    assert state.results["curated_label_accuracy"] > state.results["initial_label_accuracy"] + 0.1
    acc = state.results["holdout_accuracy"]
    assert acc["final"] >= acc["as_given"]
    # The alternatives a team weighs, trained the same way: humans only (gold) and judges only (a study's).
    assert set(acc) == {"final", "as_given", "judges_only", "best_working", "gold"}
    # D_gold is human-verified: every label there is the source label.
    assert all(label_is_true(records[k]) for k in pools["gold"])
    # Artifacts: datasets with a manifest, the registry, the best link, the report and its plots.
    workdir = Path(settings.controller.workdir)
    registry = json.loads((workdir / "models" / "registry.json").read_text())
    assert set(registry) == {"best", "gold"}
    assert (workdir / "models" / "best").resolve() == Path(registry["best"]["path"])
    assert (workdir / "models" / "scorer.yaml").exists()
    report = (workdir / "report.md").read_text()
    assert "Study run" in report and "oracle" in report
    assert "| judges_only | every pool pair labelled by the judges' majority, no humans |" in report
    assert "| gold | the human-verified pairs only (D_gold) |" in report
    # Each accuracy with its 95% interval on the held-out pairs: a small run's differences read as the noise they are.
    assert state.results["holdout_pairs"] == len(pools["holdout"])
    assert f"| {interval_text(acc['final'], len(pools['holdout']))} |" in report
    assert f"on the {len(pools['holdout'])} held-out pairs" in report
    for png in ("accuracy_per_iteration.png", "decisions_per_stage.png", "final_accuracy.png"):
        assert (workdir / "plots" / png).stat().st_size > 1000
    datasets = state.results["datasets"]
    assert list(datasets) == ["human-verified", "kept", "curated", "heldout"]
    rows = {version: read_rows(v["dir"]) for version, v in datasets.items()}
    assert len(rows["curated"]) == len(pools["gold"]) + len(pools["silver"]) + len(pools["stage2"])
    assert len(rows["human-verified"]) == len(pools["gold"])
    # kept = the curated rows whose label was confirmed (KEEP); flipped ones (humans', judges', Stage 2's) are not.
    decided = [(r["decision"]["decision"], r["id"]) for r in rows["curated"]]
    by_decision = {d: sorted(i for decision, i in decided if decision == d) for d in ("keep", "flip")}
    assert by_decision["keep"] and by_decision["flip"], "this run exercises both kept and flipped pairs"
    assert sorted(r["id"] for r in rows["kept"]) == by_decision["keep"]
    assert len(by_decision["keep"]) + len(by_decision["flip"]) == len(rows["curated"])
    assert {r["decision"]["decision"] for r in rows["human-verified"]} <= {"keep", "flip"}
    # The held-out fifth is written too, and every row says which split it is in.
    holdout_ids = sorted(records[k].pair.id for k in pools["holdout"])
    assert holdout_ids and sorted(r["id"] for r in rows["heldout"]) == holdout_ids
    assert {r["split"] for r in rows["heldout"]} == {"heldout"}
    assert {r["split"] for v in ("human-verified", "kept", "curated") for r in rows[v]} == {"train"}
    assert datasets["heldout"]["by_split"] == {"heldout": len(holdout_ids)}
    assert "## Datasets" in report and "heldout" in report and "kept" in report


def test_stage1_stops_when_accuracy_stops_improving(tmp_path):
    settings = settings_for(tmp_path, iterations=8, patience=1)
    state = controller_for(settings).run()
    bests = [h["best_iteration"] for h in state.history]
    # patience=1: Stage 1 ends at the first iteration whose RM is not the best on today's D_gold
    # (the best RM is re-chosen on all of D_gold each iteration; a tie keeps the earlier one).
    stale = [h["iteration"] for h in state.history if h["iteration"] - h["best_iteration"] >= 1]
    assert stale, f"every iteration's RM was the best ({bests}): this run does not exercise patience"
    assert state.history[-1]["iteration"] == stale[0] < 8
    assert state.models["best"] == state.models[f"working-{bests[-1] + 1}"]
    assert state.stage1_stopped == "D_gold accuracy did not improve for 1 iterations"


@pytest.fixture(scope="module")
def reference_outcome(tmp_path_factory) -> dict:
    """One uninterrupted run that every crash-and-resume run must reproduce."""
    settings = settings_for(tmp_path_factory.mktemp("reference"))
    controller_for(settings).run()
    return outcome(Path(settings.controller.workdir))


@pytest.mark.parametrize("crash_after", ["seed", "s1.1.curate", "s2.curate", "final.train"])
def test_restart_after_a_crash_gives_the_same_result(tmp_path, crash_after, reference_outcome):
    settings = settings_for(tmp_path / "b")

    def crash(step: str) -> None:
        if step == crash_after:
            raise Crash(step)

    with pytest.raises(Crash):
        controller_for(settings, on_step=crash).run()
    done = StateStore(settings.controller.workdir).load().done
    assert done[-1] == crash_after
    resumed = controller_for(settings)
    models = resumed.models
    resumed.run()
    assert outcome(Path(settings.controller.workdir)) == reference_outcome
    if crash_after == "final.train":
        assert models.trained == 0, "a resumed run does not retrain models it already has"


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_a_kill_between_batches_resumes_after_the_last_committed_batch(tmp_path, stage, reference_outcome):
    # Small batches, each committed with its cursor: the third batch of a step raises (a kill
    # mid-step); the restarted run sends only the batches not yet committed, and the outcome is the
    # uninterrupted run's (one batch of 10,000).
    settings = settings_for(tmp_path, batch_pairs=8)
    controller = controller_for(settings)
    inner = controller.executor
    sent: dict[str, list[int]] = {}

    class Dies:
        def run(self, name, records):
            if name == stage:
                step = sent.setdefault(controller.current_step, [])
                if len(step) == 2:
                    raise Crash(f"killed in batch 3 of {controller.current_step}")
                step.append(len(records))
            return inner.run(name, records)

    controller.executor = Dies()
    with pytest.raises(Crash):
        controller.run()
    killed_in = controller.current_step
    with StateStore(settings.controller.workdir).pairs as store:
        assert json.loads(store.meta(f"progress:{killed_in}")) != {}, (
            "a batch of the step was committed before the kill"
        )
    resumed = controller_for(settings)
    again: list[int] = []
    first = resumed.executor

    class Counts:
        def run(self, name, records):
            if name == stage:
                again.append(len(records))
            return first.run(name, records)

    resumed.executor = Counts()
    state = resumed.run()
    assert outcome(Path(settings.controller.workdir)) == reference_outcome
    if stage == "stage1":
        total = sum(e["retrieved"] for e in state.results["stage1"])
    else:
        total = state.results["stage2"]["pairs"]
    assert sum(again) == total - sum(map(sum, sent.values())), "the committed batches are not sent again"


class CategoryLabeller:
    """A test labeller: a category from the pair's id; no usable answer for about every fifth pair."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.backend = None

    async def label(self, request):
        from synpref.v1.pair_pb2 import Attributes

        self.asked.append(request.pair_id)
        number = int(request.pair_id[:8], 16)
        if number % 5 == 0:
            return None
        return Attributes(task_category=f"topic-{number % 3}", desired_attributes=["correct"])


def test_the_attributes_step_labels_the_pool_before_retrieval_embeds_it(tmp_path):
    # DESIGN.md 1: retrieval embeds (conversation, attributes), so the pool is labelled before the prepare
    # step embeds it; an unusable answer leaves the pair unlabelled (the annotator asks again when judging).
    settings = settings_for(tmp_path, iterations=1, patience=1)
    labeller = CategoryLabeller()
    controller = controller_for(settings)
    controller.labeller = labeller
    texts: list[str] = []

    def embed(batch: list[str]):
        texts.extend(batch)
        return fakes.embed(batch)

    controller.embed = embed
    state = controller.run()
    attributes = state.results["attributes"]
    pools = read_pools(settings.controller.workdir)
    curated_from = 160 - len(pools["holdout"])
    assert attributes["labelled"] + attributes["unusable"] == curated_from
    assert attributes["unusable"] > 0 and attributes["labelled"] > attributes["unusable"]
    records = read_records(settings.controller.workdir)
    assert sum(bool(r.attributes.task_category) for r in records.values()) >= attributes["labelled"]
    # Every labelled pair was embedded with its category (the first curated_from texts are the prepare step's).
    embedded = texts[:curated_from]
    assert sum("category: topic-" in t for t in embedded) == attributes["labelled"]
    assert not any(records[k].attributes.task_category for k in pools["holdout"]), "held-out pairs are not curated"


def test_iterations_are_measured_on_a_capped_evenly_spaced_sample_of_the_held_out_pairs(tmp_path):
    settings = settings_for(tmp_path, eval_pairs=5)
    controller = controller_for(settings)
    controller.step("ingest", controller.ingest)
    held = read_pools(settings.controller.workdir)["holdout"]
    sample = controller.holdout_sample()
    assert len(held) > 10 and len(sample) == 5
    rows = sample.rows.tolist()
    assert rows == sorted(rows) and rows[0] == controller.pairstore.rows("holdout")[0]
    controller.c = controller.c.model_copy(update={"eval_pairs": 0})
    assert len(controller.holdout_sample()) == len(held)


def test_datasets_are_written_a_shard_at_a_time(tmp_path, monkeypatch):
    # The dataset step streams each version from the store: a shard's rows are the only ones in memory.
    from synpref.services.controller import final_steps

    monkeypatch.setattr(final_steps, "SHARD_ROWS", 7)
    settings = settings_for(tmp_path, iterations=1, patience=1)
    state = controller_for(settings).run()
    curated = state.results["datasets"]["curated"]
    manifest = json.loads((Path(curated["dir"]) / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]][:-1] == [7] * (len(manifest["shards"]) - 1)
    pools = read_pools(settings.controller.workdir)
    assert curated["rows"] == len(pools["gold"]) + len(pools["silver"]) + len(pools["stage2"]) > 14
    assert len(read_rows(curated["dir"])) == curated["rows"]


def test_ingest_drops_duplicates_against_the_store_not_a_set_in_memory(tmp_path):
    # The source twice over, in two files: every pair of the second copy is a duplicate, found by the
    # store's keys (ingest keeps no set of every id), and counted.
    from synpref.services.controller.intake import StoredIds

    settings = settings_for(tmp_path)
    source = Path(settings.controller.sources[0])
    copy = tmp_path / "again.jsonl"
    copy.write_text(source.read_text())
    settings = settings.model_copy(
        update={"controller": settings.controller.model_copy(update={"sources": [str(source), str(copy)]})}
    )
    controller = controller_for(settings)
    controller.step("ingest", controller.ingest)
    counts = controller.state.results["ingest"]["counts"]
    assert counts["published"] == 160 and counts["duplicate"] == 160
    assert controller.pairstore.size() == 160
    ids = StoredIds(controller.pairstore)
    key = read_pools(settings.controller.workdir)["unverified"][0]
    assert key in ids and "not-a-key" not in ids
    ids.add("pending")
    assert "pending" in ids and not ids.written() and "pending" not in ids


def test_a_step_interrupted_before_its_commit_runs_again(tmp_path):
    settings = settings_for(tmp_path)
    controller = controller_for(settings)

    def boom() -> None:
        raise Crash("in the middle of s2.gold")

    controller.train_gold = boom  # type: ignore[method-assign]
    with pytest.raises(Crash):
        controller.run()
    state = StateStore(settings.controller.workdir).load()
    assert "s2.gold" not in state.done and "gold" not in state.models
    assert controller_for(settings).run().models["gold"]["version"].startswith("gold-")


class CountingHumans(OracleHumans):
    """Oracle verdicts, counting how often each pair is put to the humans."""

    def __init__(self, asked: Counter[str]) -> None:
        self.asked = asked

    def review(self, records):
        self.asked.update(key_of(r) for r in records)
        return super().review(records)


@pytest.mark.parametrize("step", ["seed", "s1.1.curate"])
def test_verdicts_given_before_a_crash_are_not_asked_again(tmp_path, step, reference_outcome):
    # Killed after the humans answered, before the step committed: the step's writes roll back, but
    # the verdicts were kept as they came (state.VerdictLog), so the retried step asks nobody again.
    settings = settings_for(tmp_path)
    asked: Counter[str] = Counter()
    controller = controller_for(settings)
    controller.humans = CountingHumans(asked)
    refresh = controller.refresh_examples

    def killed() -> None:  # the last thing ask_humans does, inside the step's transaction
        if controller.current_step == step:
            raise Crash(f"killed in {step} after the humans answered")
        refresh()

    controller.refresh_examples = killed  # type: ignore[method-assign]
    with pytest.raises(Crash):
        controller.run()
    assert step not in StateStore(settings.controller.workdir).load().done
    before = sum(asked.values())
    resumed = controller_for(settings)
    resumed.humans = CountingHumans(asked)
    state = resumed.run()
    assert max(asked.values()) == 1, f"asked twice: {[k for k, n in asked.items() if n > 1]}"
    to_humans = state.results["seed_human"]["verified"] + state.results["seed_human"]["discarded"]
    assert sum(asked.values()) == to_humans + sum(e.get("to_humans", 0) for e in state.results["stage1"])
    assert sum(asked.values()) > before > 0
    assert outcome(Path(settings.controller.workdir)) == reference_outcome


def test_desk_verdicts_are_kept_one_by_one_while_the_loop_waits(tmp_path, reference_outcome):
    # A provider that, like the desk, gets verdicts one at a time records each in the journal as it
    # comes: a pod killed during the long wait loses none of the verdicts already given.
    settings = settings_for(tmp_path)
    asked: Counter[str] = Counter()

    class SlowDesk:
        name = "desk (test)"
        journals = True

        def __init__(self, die_after: int = 0) -> None:
            self.die_after = die_after

        def review(self, records, journal=None):
            out = []
            for record in records:
                asked[key_of(record)] += 1
                out.extend(OracleHumans().review([record]))
                journal.record(*out[-1])
                if len(out) == self.die_after:
                    raise Crash(f"pod restarted after {len(out)} verdicts of {len(records)}")
            return out

    controller = controller_for(settings)
    controller.humans = SlowDesk(die_after=5)
    with pytest.raises(Crash):
        controller.run()
    assert "seed" not in StateStore(settings.controller.workdir).load().done and sum(asked.values()) == 5
    resumed = controller_for(settings)
    resumed.humans = SlowDesk()
    resumed.run()
    assert max(asked.values()) == 1
    assert outcome(Path(settings.controller.workdir)) == reference_outcome


class RecordingModels(fakes.BagOfWordsModels):
    """Remembers which prompts each model trained and validated on (prompts are unique per pair)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, set[str], set[str]]] = []

    def train(self, name, train, valid, out_dir):
        prompts = [{p["conversation"][0]["content"] for p in pairs} for pairs in (train, valid)]
        self.calls.append((name, *prompts))
        return super().train(name, train, valid, out_dir)


def test_the_working_rm_learns_d_silver_and_the_best_is_chosen_on_all_of_d_gold(tmp_path):
    # DESIGN.md 1: train on D_silver, choose on D_gold. Only the first iteration (no D_silver yet)
    # learns from the seed D_gold; later RMs never see D_gold, and the best is re-chosen on all of it.
    models = RecordingModels()
    settings = settings_for(tmp_path, iterations=3, patience=3)
    controller = controller_for(settings, models=models)
    state = controller.run()
    prompt = {k: r.pair.conversation[0].content for k, r in read_records(settings.controller.workdir).items()}
    first, *later = [c for c in models.calls if c[0].startswith("working-")]
    assert first[1] == {prompt[k] for k in state.results["seed_gold"]} and first[2] == set()
    gold = {prompt[k] for k in read_pools(settings.controller.workdir)["gold"]}
    for name, train, valid in later:
        assert train and not train & gold, name  # D_silver only
        assert valid and valid <= gold, name  # chosen on D_gold (as it was then)
    assert state.results["best_rm"]["gold_pairs"] == len(gold)
    assert state.models["best"] == state.models[f"working-{state.results['best_rm']['iteration'] + 1}"]


def test_the_store_can_live_apart_from_the_shared_workdir(tmp_path, reference_outcome):
    # The chart's controller.stateVolume: SQLite on its own ReadWriteOnce volume, the rest on the shared one.
    settings = settings_for(tmp_path / "split", store_dir=str(tmp_path / "state"))
    controller_for(settings).run()
    workdir, store = Path(settings.controller.workdir), tmp_path / "state"
    assert outcome(workdir, store) == reference_outcome
    assert {"pairs.sqlite", "state.json", "retrieval"} <= {p.name for p in store.iterdir()}
    assert not (workdir / "pairs.sqlite").exists() and not (workdir / "retrieval").exists()
    assert (workdir / "models").is_dir() and (workdir / "datasets").is_dir() and (workdir / "report.md").is_file()


@pytest.mark.parametrize(("min_accuracy", "resolved"), [(0.51, "flip"), (1.0, "discard")])
def test_auto_disagreement_rule_flips_only_with_a_gold_rm_measured_strong(tmp_path, min_accuracy, resolved):
    """`on_disagreement: auto` measures a probe gold RM on held-out D_gold and then decides Stage 2's
    disagreements exactly as the rule it resolved to would have (only the reasons say why)."""
    auto = load_settings(
        controller=settings_for(tmp_path / "auto").controller.model_dump(),
        # The synthetic D_gold holds a few held-out pairs only: the minimum count is lowered to 1 here.
        filter={"on_disagreement": "auto", "flip_min_gold_accuracy": min_accuracy, "flip_min_held_out_pairs": 1},
    )
    state = controller_for(auto).run()
    gold = state.results["gold_rm"]
    assert gold["on_disagreement"] == resolved
    assert gold["held_out_pairs"] > 0 and gold["accuracy_lower_bound"] <= gold["held_out_accuracy"]
    decisions = state.results["stage2"]["decisions"]
    assert ("FLIP" in decisions) == (resolved == "flip") and ("DISCARD" in decisions) == (resolved == "discard")

    fixed = load_settings(
        controller=settings_for(tmp_path / "fixed").controller.model_dump(), filter={"on_disagreement": resolved}
    )
    controller_for(fixed).run()
    assert outcome(Path(auto.controller.workdir))["curated"] == outcome(Path(fixed.controller.workdir))["curated"]
    reasons = [
        r.decision.reason
        for r in read_records(auto.controller.workdir).values()
        if r.decision.rule == "stage2.consistency"
    ]
    assert any("auto: gold RM held-out accuracy" in r for r in reasons) == (resolved == "flip")
    assert (
        f"- disagreements (auto): {resolved}; probe gold RM accuracy"
        in (Path(auto.controller.workdir) / "report.md").read_text()
    )


class ScoreSizes(fakes.BagOfWordsModels):
    """Records the step and the number of pairs of every score call, and the handle of every model trained."""

    def __init__(self) -> None:
        super().__init__()
        self.step = lambda: ""
        self.scored: list[tuple[str, int]] = []
        self.handles: dict[str, object] = {}

    def train(self, name, train, valid, out_dir):
        self.handles[name] = handle = super().train(name, train, valid, out_dir)
        return handle

    def score(self, handle, pairs):
        self.scored.append((self.step(), len(pairs)))
        return super().score(handle, pairs)


def test_the_final_step_scores_the_held_out_pairs_a_batch_at_a_time(tmp_path):
    # final.train measures every RM on all held-out pairs, but never hands the scorer more than
    # controller.batch_pairs of them at once (tokenized pairs or features of 8M held-out pairs would
    # not fit the controller); the accuracies are those of scoring the whole held-out set in one call.
    import numpy as np

    from synpref.services.controller.models import ModelHandle, accuracy, save_npz

    models = ScoreSizes()
    settings = settings_for(tmp_path, batch_pairs=7)
    controller = controller_for(settings, models=models)
    models.step = lambda: controller.current_step
    state = controller.run()
    held = controller.view("holdout")
    assert len(held) > 3 * 7 and len(held) % 7, "several batches, the last one short"
    final = [n for step, n in models.scored if step == "final.train"]
    assert sum(final) == 5 * len(held) and max(final) == 7
    handles = {
        "final": models.handles["final"],
        "as_given": models.handles["as-given"],
        "judges_only": models.handles["judges-only"],
        "best_working": ModelHandle.from_dict(state.models["best"]),
        "gold": ModelHandle.from_dict(state.models["gold"]),
    }

    def whole(handle: ModelHandle) -> float:
        return accuracy(fakes.BagOfWordsModels.score(models, handle, held))

    assert state.results["holdout_accuracy"] == {key: whole(h) for key, h in handles.items()}
    # The models above are all right on this easy set; a random one is not, and is measured the same.
    path = tmp_path / "random.npz"
    save_npz(path, w=np.random.default_rng(0).normal(size=fakes.DIM))
    random = ModelHandle("random", str(path), "random-0")
    assert 0 < controller.holdout_accuracy(random) == whole(random) < 1


def test_the_dataset_step_cuts_shards_at_writer_shard_bytes_too(tmp_path):
    # Shards were cut by row count only (20,000 pairs held before each write, GBs of long conversations): the
    # in-process writer follows writer.shard_bytes as the writer service does.
    settings = settings_for(tmp_path, iterations=1, patience=1)
    settings = settings.model_copy(update={"writer": settings.writer.model_copy(update={"shard_bytes": 1})})
    state = controller_for(settings).run()
    curated = state.results["datasets"]["curated"]
    manifest = json.loads((Path(curated["dir"]) / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [1] * curated["rows"] and curated["rows"] > 14
