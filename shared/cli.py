"""The `synpref` console script: one subcommand per process the project runs.

Subcommands live next to the code they run; each module exposes
`main(argv: list[str]) -> int`. Modules are imported only when their command
is invoked, so `synpref topics` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module exposing main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "topics": ("synpref.shared.kafka.cli", "create the pipeline's Kafka topics (idempotent)"),
    "secrets": ("synpref.shared.k8s_secrets", "create the release's token Secrets once (the chart's hook Job)"),
    "train": (
        "synpref.training.cli",
        "train a Bradley-Terry reward model (`synpref train submit` runs it as a K8s Job)",
    ),
    "eval": ("synpref.training.eval_cli", "evaluate a reward model on pair files or RM-Bench"),
    "scorer": (
        "synpref.services.scorer.main",
        "serve reward models over gRPC and HTTP (`reload`/`unload` one on a running scorer)",
    ),
    "score": ("synpref.client.cli", "score pairs or conversations against a running scorer"),
    "ingest": ("synpref.services.ingest.main", "read pair files, normalize, dedup, decontaminate, publish"),
    "annotator": ("synpref.services.annotator.main", "attribute and judge annotation service"),
    "gold-scorer": ("synpref.services.gold_scorer.main", "score pairs with the gold and best RMs"),
    "filter": ("synpref.services.consistency_filter.main", "route and decide KEEP/FLIP/DISCARD"),
    "writer": ("synpref.services.dataset_writer.main", "write curated pairs to versioned Parquet datasets"),
    "desk": ("synpref.services.desk.main", "web desk for human verification"),
    "run": ("synpref.services.controller.embedded", "run the whole curation loop on one machine (no cluster)"),
    "controller": ("synpref.services.controller.main", "drive the curation loop in a cluster"),
    "health": ("synpref.shared.health_cli", "check gRPC health and HTTP endpoints (the chart's `helm test`)"),
}


def usage() -> str:
    """The `synpref` usage text listing every command and its help line."""
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: synpref <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`synpref <command> --help` describes a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch `synpref <command> ...` to the command module's `main`; its exit code, or 2 for an unknown command."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"synpref: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
