"""Publishing the run's models: the registry files a scorer serves from, and hot reload of a running one."""

from __future__ import annotations

import http.client
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from synpref.shared.files import replace_durably, write_text_atomic
from synpref.shared.retry import backoff_pauses
from synpref.shared.roles import BEST
from synpref.shared.scorer_admin import ScorerAdminError, read_admin_token, reload_model

log = logging.getLogger(__name__)
RELOAD_WAIT_S = 1800.0
"""Longest reload_scorer asks again a scorer that is not up yet (the chart starts it with the controller) or still
loading (an 8B checkpoint from a volume can take longer than one call's timeout)."""
RETRY_STATUSES = frozenset({502, 503, 504})
"""Answers a proxy or a scorer that is starting or overloaded gives; any other is the scorer's refusal."""


def reload_scorer(
    base_url: str,
    registry: dict[str, Any],
    timeout_s: float = 120.0,
    token_file: str = "",
    wait_s: float = RELOAD_WAIT_S,
) -> None:
    """Hot-swap each registered model in a running scorer (POST /admin/reload on its admin
    port, with the bearer token from token_file); ScorerAdminError with the scorer's words on a refusal.

    A call that timed out or found no scorer is made again, up to wait_s in all: the scorer answers a repeat
    of a reload under way by waiting for that load (services/scorer/registry.py), so nothing is loaded twice."""
    token = read_admin_token(token_file) if token_file else ""
    deadline = time.monotonic() + wait_s
    for name, ref in registry.items():
        pauses = backoff_pauses(deadline, time.monotonic)
        while True:
            try:
                answer = reload_model(base_url, name, ref["path"], ref["version"], token, timeout_s)
                break
            except ScorerAdminError as exc:
                # Status 0 is also a 200 that was not the scorer's JSON (a misrouted Service): only a failed
                # connection or read (the OSError or cut-off answer it was raised from) is worth asking again.
                unreached = isinstance(exc.__context__, OSError | http.client.HTTPException)
                if exc.status not in RETRY_STATUSES and not (exc.status == 0 and unreached):
                    raise
                pause = next(pauses, None)
                if pause is None:
                    raise ScorerAdminError(
                        exc.status,
                        f"the scorer at {base_url} did not serve {name} ({ref['path']}, version {ref['version']})"
                        f" within {wait_s:.0f}s of asking; last error: {exc.message}",
                    ) from None
                log.warning("scorer reload of %s not done yet (%s); asking again", name, exc.message)
                time.sleep(pause)
        # The scorer answers with the name and version it now serves. Any other 200 (`{}`, another service's JSON on a
        # misrouted scorer_reload_url) loaded nothing: taken as success, the run went on scoring with the old model.
        if (answer.get("model"), answer.get("version")) != (name, ref["version"] or answer.get("version")):
            raise ScorerAdminError(
                0,
                f"{base_url} answered the reload of {name} (version {ref['version']}) with {json.dumps(answer)[:200]}:"
                " not a scorer serving it; check controller.scorer_reload_url names the scorer's admin port",
            )
        # As the scorer answered it (JSON): the cluster test and operators grep `"version": "final-`.
        log.info("scorer reloaded %s: %s", name, json.dumps(answer))


def write_registry(models_dir: Path, registry: dict[str, Any], max_length: int) -> None:
    """models/best -> the final checkpoint, registry.json, and a scorer.yaml that serves the registry."""
    import yaml

    link = models_dir / BEST
    tmp = models_dir / ".best.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    # Relative to the link's folder, wherever the checkpoint is: the full trainer's and the k8s Jobs' final model is
    # models/final/final, and a link to its last name alone pointed at models/final (no checkpoint there). Both sides
    # resolved: the registry's paths are, and a relative target is followed from the folder's real place, so one made
    # from a workdir reached through a link (macOS's /tmp, a linked volume) climbed out of it and dangled.
    tmp.symlink_to(os.path.relpath(Path(registry[BEST]["path"]).resolve(), models_dir.resolve()))
    replace_durably(tmp, link)
    write_text_atomic(models_dir / "registry.json", json.dumps(registry, indent=1, sort_keys=True))
    scorer = {"scorer": {"models": registry, "default_model": BEST, "max_length": max_length}}
    write_text_atomic(models_dir / "scorer.yaml", yaml.safe_dump(scorer, sort_keys=True))


def export_registry(models: Any, handles: dict[str, Any], models_dir: Path) -> dict[str, dict[str, str]]:
    """Export each role's ModelHandle under models_dir/<version>; returns the registry (role -> path, version)."""
    registry = {}
    for role, handle in handles.items():
        path = models.export(handle, models_dir / handle.version)
        registry[role] = {"path": str(path.resolve()), "version": handle.version}
    return registry
