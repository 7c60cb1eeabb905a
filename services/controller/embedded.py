"""`synpref run`: the whole curation loop in one process, on one machine (no Kafka, no cluster).

    synpref run --config examples/demo.yaml

Reads the pairs the config names, runs Stage 1 and Stage 2 with the same stage functions
the services run, writes datasets, the final RM and report.md under controller.workdir,
and prints how to serve the model. Rerunning the command resumes an interrupted run;
--fresh starts over.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from synpref.shared.config import ConfigError, Settings, load_settings
from synpref.shared.roles import BEST


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse `synpref run` options: --config, --workdir, --fresh and --quiet."""
    p = argparse.ArgumentParser(prog="synpref run", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="YAML settings file (default: $SYNPREF_CONFIG)")
    p.add_argument("--workdir", help="override controller.workdir")
    p.add_argument("--fresh", action="store_true", help="remove the workdir first instead of resuming")
    p.add_argument("--quiet", action="store_true", help="no progress lines or bars")
    return p.parse_args(argv)


def check_runnable(settings: Settings) -> None:
    """Refuse, with what to set, a loop that has no pairs or no judges (there is no silent simulated default)."""
    c = settings.controller
    if not c.sources:
        raise ConfigError("controller.sources is empty: list the pair files or folders to curate")
    if not settings.annotator.judges and not (c.study and c.study.judges):
        raise ConfigError(
            "no LLM judges configured: set annotator.judges (OpenAI-compatible endpoints:"
            " name = the model name, base_url, api_key_env;"
            " see docs/pipeline.md), or, for a study with simulated judges, controller.study.judges"
        )


def build_judges(settings: Settings, seed: int) -> tuple[list[Any], Any]:
    """The study's simulated judges when it lists any, else the annotator's LLM judges."""
    study = settings.controller.study
    if study is not None and study.judges:
        from synpref.services.controller.simulated import SimulatedJudge

        return [SimulatedJudge(j, seed) for j in study.judges], None
    from synpref.services.annotator.main import build_annotator

    annotator = build_annotator(settings)
    if not annotator.judges:
        raise ConfigError("no judges: set annotator.judges (LLMs) or, for a study, controller.study.judges")
    return annotator.judges, annotator.labeller


def labels_file(c: Any) -> str:
    """The study's human labels file, or "" when the controller settings `c` hold no study."""
    return c.study.human_labels_file if c.study is not None else ""


# What a run writes into its workdir and store_dir (state.py, loop.py, models.py, report.py): --fresh empties
# only a folder holding some of them, never one that holds something else alone (`--workdir .`, a home).
RUN_ENTRIES = frozenset(
    {"state.json", "pairs.sqlite", "verdicts.sqlite", "retrieval", "models", "datasets", "examples", "features"}
    | {"plots", "report.md", "run_id"}
)


def fresh_refusal(folder: Path, sources: list[str], folders: list[Path]) -> str:
    """Why --fresh must not empty `folder` ("" when it may): it holds a source of the run, or it is not empty
    and holds nothing a run writes (its entries, or the run's other folder of `folders`)."""
    if not folder.is_dir():
        return ""
    inside = [src for src in sources if Path(src).resolve().is_relative_to(folder.resolve())]
    if inside:
        return f"--fresh would delete the sources {', '.join(inside)} inside {folder}: set another workdir"
    own = {f.resolve() for f in folders}
    names = {child.name for child in folder.iterdir()}
    if names and not names & RUN_ENTRIES and not any(child.resolve() in own for child in folder.iterdir()):
        return f"--fresh refuses to empty {folder}: it holds no run ({', '.join(sorted(names)[:3])}, ...)"
    return ""


def start_over(folder: Path) -> None:
    """--fresh: empty `folder`. A symlinked workdir has its target emptied: rmtree refuses a link, and ignoring
    that resumed the old run instead of starting over."""
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def build_controller(settings: Settings, progress: bool = True, executor: Any = None, on_step: Any = None):
    """A Controller that runs every stage in this process (unless `executor` is given).

    Its models, human provider and judges come from `settings`; `progress` prints progress lines,
    and `on_step` is called with each step's name once the step is committed.
    """
    from synpref.services.controller.loop import Controller
    from synpref.services.controller.models import make_models
    from synpref.services.controller.providers import make_provider

    c = settings.controller
    models = make_models(c, Path(c.workdir), progress)
    humans = make_provider(c.human_provider, labels_file(c), settings.desk, c.seed)
    judges, labeller = build_judges(settings, c.seed)
    say = print if progress else (lambda _msg: None)
    return Controller(settings, models, humans, judges, executor, on_step=on_step, progress=say, labeller=labeller)


def main(argv: list[str]) -> int:
    """`synpref run`: run (or resume) the curation loop and print where its report, final RM and
    datasets are; 0 when done, 1 when the humans' input ended (a rerun resumes), 2 for a bad config or
    unreadable sources.
    """
    args = parse_args(argv)
    try:
        settings = load_settings(args.config)
        if args.workdir:
            settings = settings.model_copy(
                update={"controller": settings.controller.model_copy(update={"workdir": args.workdir})}
            )
        check_runnable(settings)
    except ConfigError as exc:
        print(f"synpref run: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # faiss logs each CPU-feature build it fails to find at INFO; that reads like an error.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    c = settings.controller
    folders = [Path(f) for f in sorted({c.workdir, c.store_dir} - {""})]
    for folder in folders:
        if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
            print(f"synpref run: {folder} exists and is not a folder: set another workdir", file=sys.stderr)
            return 2
    for folder in folders if args.fresh else ():
        if refusal := fresh_refusal(folder, c.sources, folders):
            print(f"synpref run: {refusal}", file=sys.stderr)
            return 2
    try:
        for folder in folders if args.fresh else ():
            start_over(folder)
    except OSError as exc:
        print(f"synpref run: --fresh cannot remove {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        controller = build_controller(settings, progress=not args.quiet)
    except (ConfigError, ValueError) as exc:
        print(f"synpref run: {exc}", file=sys.stderr)
        return 2
    resumed = len(controller.state.done)
    if resumed:
        print(f"resuming {c.workdir}: {resumed} steps already done ({controller.state.done[-1]} last)")
        ingested = controller.state.results.get("ingest", {}).get("sources", c.sources)
        if ingested != c.sources:
            print(
                f"synpref run: warning: this run's pairs came from {', '.join(ingested)}; controller.sources now "
                f"lists {', '.join(c.sources)}, which a resumed run does not read (--fresh to curate them)",
                file=sys.stderr,
            )
    from synpref.services.controller.providers import HumanInputEnded
    from synpref.services.controller.report import interval_text
    from synpref.shared.sources import SourceError

    try:
        state = controller.run()
    except SourceError as exc:
        print(f"synpref run: cannot read the sources: {exc}", file=sys.stderr)
        return 2
    except HumanInputEnded as exc:  # the verdicts given are kept: rerunning goes on from them
        print(f"synpref run: stopped, {exc}", file=sys.stderr)
        return 1
    finally:
        controller.close()  # checkpoints the stores' WAL files into pairs.sqlite and verdicts.sqlite
    close = getattr(controller.humans, "close", None)
    if close is not None:
        close()
    r = state.results
    reg = r["registry"]
    print()
    print(f"done in {time.perf_counter() - started:.0f}s (this invocation)")
    print(f"report:   {r['report']}")
    print(f"final RM: {reg[BEST]['path']} (version {reg[BEST]['version']})")
    n = r.get("holdout_pairs")
    for name, acc in r.get("holdout_accuracy", {}).items():
        interval = f" (95% {interval_text(acc, n)} on {n} pairs)" if n else ""
        print(f"  held-out accuracy, {name}: {acc:.3f}{interval}")
    print(f"datasets: {', '.join(v['dir'] for v in r['datasets'].values())}")
    print("serve it:")
    print(f"  synpref scorer --config {reg['dir']}/scorer.yaml")
    print("  synpref score --help   # then score pairs against it")
    return 0
