"""`synpref scorer reload|unload`: publish, roll back or drop a served model on a running scorer.

    synpref scorer reload best v4 --url http://synpref-scorer:8081 --token-file /secrets/admin-token
    synpref scorer unload canary

PATH is a checkpoint folder as the scorer sees it: relative to its scorer.model_root (or
absolute inside it). The URL and token file default to the controller's settings
(controller.scorer_reload_url, controller.scorer_admin_token_file; YAML or
SYNPREF_CONTROLLER__* variables), so inside the controller's pod no flag is needed. The old
version keeps serving until the new one has loaded; a refusal prints the scorer's reason.
"""

from __future__ import annotations

import argparse
import json
import sys

from synpref.shared.config import ConfigError, load_settings
from synpref.shared.scorer_admin import ScorerAdminError, read_admin_token, reload_model, unload_model


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse `synpref scorer reload|unload` options."""
    p = argparse.ArgumentParser(prog="synpref scorer", description="Reload or unload a model on a running scorer.")
    sub = p.add_subparsers(dest="command", required=True)
    reload = sub.add_parser("reload", help="serve a checkpoint folder under a name (replacing its old version)")
    reload.add_argument("name", help="the served name, e.g. best")
    reload.add_argument("path", help="checkpoint folder under the scorer's scorer.model_root")
    reload.add_argument("--version", default="", help="version label (default: the folder's name)")
    unload = sub.add_parser("unload", help="stop serving a name")
    unload.add_argument("name")
    for cmd in (reload, unload):
        cmd.add_argument("--url", help="the scorer's admin URL (default: controller.scorer_reload_url)")
        cmd.add_argument("--token-file", help="admin token file (default: controller.scorer_admin_token_file)")
        cmd.add_argument("--config", help="YAML settings file (default: $SYNPREF_CONFIG)")
        cmd.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the answer (a load)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    """0 when the scorer did it, 1 when it refused or could not be reached, 2 for bad usage."""
    args = parse_args(argv)
    url, token_file = args.url, args.token_file
    if not url or not token_file:  # the settings only fill in what the flags leave out
        try:
            controller = load_settings(args.config).controller
        except (ConfigError, ValueError) as exc:
            print(f"synpref scorer {args.command}: {exc}", file=sys.stderr)
            return 2
        url = url or controller.scorer_reload_url
        token_file = token_file or controller.scorer_admin_token_file
    if not url or not token_file:
        print(
            f"synpref scorer {args.command}: name the scorer's admin port and its token: --url http://<scorer>:8081 "
            "--token-file <file> (or controller.scorer_reload_url and controller.scorer_admin_token_file)",
            file=sys.stderr,
        )
        return 2
    try:
        token = read_admin_token(token_file)
        if args.command == "reload":
            answer = reload_model(url, args.name, args.path, args.version, token, args.timeout)
        else:
            answer = unload_model(url, args.name, token, args.timeout)
    except ScorerAdminError as exc:
        print(f"synpref scorer {args.command}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer, sort_keys=True))
    return 0
