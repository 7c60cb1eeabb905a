"""A client of the scorer's admin port (services/scorer/admin.py): reload and unload; and the
writer of scorer.models_file, which every scorer replica polls (an admin call reaches one).

Used by the controller after training and by `synpref scorer reload|unload` (an operator
publishing a checkpoint a kubectl-triggered training Job wrote, or rolling back to an older
one). Torch-free: the controller's image and an operator's laptop need only the standard
library for it.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from synpref.shared.files import write_text_atomic


class ScorerAdminError(RuntimeError):
    """An admin call the scorer refused (status: its HTTP status), or one that could not be made or whose 200
    was not the scorer's JSON object (status 0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message


def read_admin_token(path: str) -> str:
    """The bearer token in the file at `path` (the mounted Secret), stripped; ScorerAdminError when it is
    missing or empty, since a call without it can only be refused."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ScorerAdminError(0, f"cannot read the admin token file {path}: {exc.strerror or exc}") from None
    if not token:
        raise ScorerAdminError(0, f"the admin token file {path} is empty")
    return token


def admin_post(base_url: str, route: str, body: dict[str, Any], token: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """POST `body` to `base_url` + `route` with the bearer token; the JSON answer, or ScorerAdminError
    carrying the scorer's own words (its JSON `error`) and status."""
    url = base_url.rstrip("/") + route
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = "Bearer " + token
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            raw_answer = resp.read()
    except urllib.error.HTTPError as exc:
        try:
            raw = exc.read()
        except (OSError, http.client.HTTPException):  # cut off after its status (a pod stopping): the status stands
            raw = b""
        try:
            message = str(json.loads(raw).get("error") or raw.decode(errors="replace"))
        except (ValueError, AttributeError):
            message = raw.decode(errors="replace").strip() or str(exc.reason)
        raise ScorerAdminError(exc.code, message) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        # HTTPException: a scorer pod that stops mid-answer (IncompleteRead, BadStatusLine) is no OSError.
        reason = getattr(exc, "reason", exc)
        raise ScorerAdminError(0, f"cannot reach the scorer's admin port at {url}: {reason!r}") from None
    return _json_object(url, raw_answer)


def _json_object(url: str, raw: bytes) -> dict[str, Any]:
    """The JSON object a 200 carried (empty: {}); ScorerAdminError naming the URL and the first 200 characters
    otherwise: a proxy or a misrouted Service answering 200 with HTML is not the scorer, and its page says why."""
    try:
        answer = json.loads(raw or b"{}")
    except ValueError:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not text
        answer = None
    if not isinstance(answer, dict):
        shown = raw[:200].decode(errors="replace").strip()
        raise ScorerAdminError(0, f"{url} answered 200 with something other than a JSON object: {shown!r}")
    return answer


def reload_model(
    base_url: str, name: str, path: str, version: str = "", token: str = "", timeout_s: float = 120.0
) -> dict[str, Any]:
    """Serve the checkpoint folder `path` (under the scorer's model_root) as `name`: {model, version, model_id}."""
    return admin_post(base_url, "/admin/reload", {"model": name, "path": path, "version": version}, token, timeout_s)


def unload_model(base_url: str, name: str, token: str = "", timeout_s: float = 60.0) -> dict[str, Any]:
    """Stop serving `name`: {unloaded}."""
    return admin_post(base_url, "/admin/unload", {"model": name}, token, timeout_s)


def write_models_file(path: Path, models: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """Set `models` ({name: {path, version}}) in the scorers' scorer.models_file at `path`, keeping the names it
    lists besides (as an admin reload leaves the other names served); written atomically (temp file, fsync,
    rename), so a scorer polling it reads the old file or the new one. Returns what the file now lists."""
    try:
        listed = _parse_models(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or unreadable: the new entries alone
        listed = {}
    if not isinstance(listed, dict):
        listed = {}
    listed.update({name: {"path": ref["path"], "version": ref.get("version", "")} for name, ref in models.items()})
    write_text_atomic(path, json.dumps(listed, indent=1, sort_keys=True) + "\n")
    return listed


def _parse_models(text: str) -> Any:
    """The models file's content: JSON as written here, or YAML, which scorers read too (an operator's edit,
    docs/scorer.md): read as JSON alone, a YAML file's other names were dropped from it on the next write."""
    try:
        return json.loads(text)
    except ValueError:
        import yaml  # only for a file not written here; the admin client itself needs the standard library alone

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(str(exc)) from None
