"""`synpref train`: train a Bradley–Terry reward model from a YAML config plus overrides.

synpref train --config rm.yaml --set learning_rate=1e-5 --set train_files=[a.parquet]
torchrun --nproc-per-node 8 -m synpref.training.cli --config rm.yaml   # DDP / FSDP
synpref train submit ...                                                # as a Kubernetes Job
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from synpref.training.reward_config import PRESETS, RewardConfig


def build_parser() -> argparse.ArgumentParser:
    """The `synpref train` argument parser."""
    parser = argparse.ArgumentParser(
        prog="synpref train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML file with RewardConfig fields (see --help-config)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="start from a paper recipe (dev or final)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field; the value is parsed as YAML (repeatable)",
    )
    parser.add_argument("--help-config", action="store_true", help="list every config field with its help")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str]) -> int:
    """`synpref train`: train per the config (--config, --preset, --set) and print the final
    checkpoint and metrics as one JSON line on rank 0; `synpref train submit ...` submits a
    Kubernetes Job instead (k8s_job.main_submit). 2 for a bad config or no model_name_or_path.
    """
    if argv and argv[0] == "submit":
        from synpref.training import k8s_job

        return int(k8s_job.main_submit(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    if args.help_config:
        defaults = RewardConfig().to_dict()
        for name, help_ in RewardConfig.field_help().items():
            print(f"{name} (default {defaults[name]!r})\n    {help_}")
        return 0
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = RewardConfig.load(args.config, args.overrides, preset=args.preset)
    except (ValueError, OSError) as exc:
        print(f"synpref train: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    if not config.model_name_or_path:
        print("synpref train: model_name_or_path is required", file=sys.stderr)
        return 2
    from synpref.training.reward_trainer import train_reward_model

    result = train_reward_model(config)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line per job, not per rank
        print(json.dumps({"checkpoint_dir": str(result.checkpoint_dir), **result.metrics}, default=str))
    leave_process_group()
    return 0


def leave_process_group() -> None:
    """Tear the process group down before the interpreter exits: left to the exit handlers, a
    gloo rank can abort ("terminate called without an active exception") while its peer is
    still closing the shared connections, failing a job whose training finished.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
