"""Publishing the run's models: the registry files a scorer serves from, and hot reload of a running one."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from synpref.shared.files import replace_durably, write_text_atomic
from synpref.shared.roles import BEST
from synpref.shared.scorer_admin import read_admin_token, reload_model

log = logging.getLogger(__name__)


def reload_scorer(base_url: str, registry: dict[str, Any], timeout_s: float = 120.0, token_file: str = "") -> None:
    """Hot-swap each registered model in a running scorer (POST /admin/reload on its admin
    port, with the bearer token from token_file); ScorerAdminError with the scorer's words on a refusal."""
    token = read_admin_token(token_file) if token_file else ""
    for name, ref in registry.items():
        answer = reload_model(base_url, name, ref["path"], ref["version"], token, timeout_s)
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
    # models/final/final, and a link to its last name alone pointed at models/final (no checkpoint there).
    tmp.symlink_to(os.path.relpath(registry[BEST]["path"], models_dir))
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
