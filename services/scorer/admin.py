"""The scorer's admin API, on its own port (scorer.admin_port), for the controller only.

RL code trained against a reward model must not be able to swap it (that is reward hacking
by design), so the RL-facing HTTP port has no admin routes. Here every call needs
`Authorization: Bearer <token>`, the token read from scorer.admin_token_file (a mounted
Secret) and compared in constant time; the chart admits only the controller to this port.

- `POST /admin/reload {"model", "path", "version"}` ("version" a string, optional; else 400): serve
  the checkpoint folder `path` (relative to scorer.model_root, or absolute inside it) as `model`,
  draining the version it replaces. Paths resolving outside the root (symlinks and `..` included), missing folders
  and hub ids are all refused with the same words, so answers do not tell which paths exist.
  A new name beyond scorer.max_models is 409. A reload of the checkpoint and version the name
  serves already answers at once, and a repeat of a reload under way waits for that one: a
  caller that gave up on a long load (the controller after 120 s; an 8B model loads longer)
  and asks again must not load it all over again, and time out again. A load past scorer.load_timeout_s
  (20 minutes by default) is 504. A reload or unload here drops a models_file entry of the name waiting for a retry.
- `POST /admin/unload {"model"}`: stop serving a name.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from synpref.services.scorer.errors import InvalidInput, ScorerError, Unauthorized
from synpref.services.scorer.http import Handler, _error, _json_body
from synpref.services.scorer.registry import ModelRegistry, ServedModel, version_of
from synpref.shared.config import ModelRef

if TYPE_CHECKING:
    from synpref.services.scorer.server import ModelsFile

log = logging.getLogger(__name__)
MAX_ADMIN_BODY = 64 * 1024
REFUSED = "path must name a checkpoint folder under scorer.model_root"


def read_token(path: str) -> str:
    """The admin token in the file at `path`, stripped; ValueError when it is empty."""
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"scorer.admin_token_file {path} is empty: refusing to serve admin without a token")
    return token


def checkpoint_under(root: Path, path: str) -> Path:
    """The resolved checkpoint folder `path` names inside `root`, or InvalidInput(REFUSED)."""
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = root / candidate
    try:
        resolved = candidate.resolve(strict=True)
    except (OSError, RuntimeError, ValueError):  # ValueError: a NUL byte in the path (else a 500)
        raise InvalidInput(REFUSED) from None
    if not resolved.is_relative_to(root) or not (resolved / "config.json").is_file():
        raise InvalidInput(REFUSED)
    return resolved


class AdminApi:
    """The admin routes (`POST /admin/reload`, `POST /admin/unload`), each behind `Authorization: Bearer <token>`.

    Args:
        registry: the served models.
        token: the admin token; a call without it gets 401.
        model_root: reload only accepts checkpoint folders inside this one.
        models_file: the scorer.models_file watcher, if any: told of each reload and unload done here.
    """

    def __init__(
        self, registry: ModelRegistry, token: str, model_root: str, models_file: ModelsFile | None = None
    ) -> None:
        self.registry = registry
        self._token = token.encode()
        self.root = Path(model_root).resolve()
        self.models_file = models_file

    def app(self) -> web.Application:
        """The aiohttp application with the token guard and both admin routes."""
        app = web.Application(client_max_size=MAX_ADMIN_BODY, middlewares=[self._guard])
        app.router.add_post("/admin/reload", self.reload)
        app.router.add_post("/admin/unload", self.unload)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # surrogateescape: a header that is not UTF-8 is a wrong token (401), not an encoding error (500).
        presented = given.strip().encode("utf-8", "surrogateescape")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented, self._token):
            log.warning("admin call to %s without a valid token from %s", request.path, request.remote)
            return _error(Unauthorized.http_status, "admin calls need Authorization: Bearer <scorer admin token>")
        try:
            return await handler(request)
        except ScorerError as exc:
            return _error(exc.http_status, str(exc))

    async def reload(self, request: web.Request) -> web.Response:
        """`{"model", "path", "version"?}`: serve the checkpoint folder (inside model_root) under the name,
        replacing the old model. A checkpoint that fails to load answers 400; the log says why.
        """
        body = await _json_body(request, MAX_ADMIN_BODY)
        name, path = body.get("model"), body.get("path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise InvalidInput('reload needs {"model": name, "path": checkpoint folder} (and optionally "version")')
        version = body.get("version")
        if version is not None and not isinstance(version, str):
            # str() of it served 3 as "3", a list as "['v5']" and 0 or false as no version at all.
            raise InvalidInput(f'reload\'s "version" must be a string (or left out), not {type(version).__name__}')
        folder = checkpoint_under(self.root, path)
        ref = ModelRef(path=str(folder), version=version or "")
        try:
            served = await self._reload_once(name, ref)
        except ScorerError:
            raise
        except Exception:  # not a loadable checkpoint: details go to the log, not the caller
            log.exception("reloading %s from %s failed", name, folder)
            raise InvalidInput("that checkpoint does not load; the scorer's log says why") from None
        self._overridden(name)
        return web.json_response({"model": served.name, "version": served.version, "model_id": served.model_id})

    async def _reload_once(self, name: str, ref: ModelRef) -> ServedModel:
        """`ref` served as `name`: at once when it is served and no load of the name is under way (one of another
        version would replace it after); else by the registry, which joins a load of it under way (this port's, or
        the models file's) or queues a new one behind any under way."""
        served = self.registry.models.get(name)
        key = (ref.path, version_of(ref))
        if served is not None and name not in self.registry.loading and (served.model_id, served.version) == key:
            return served
        return await self.registry.reload(name, ref)

    async def unload(self, request: web.Request) -> web.Response:
        """`{"model"}`: stop serving the named model."""
        body = await _json_body(request, MAX_ADMIN_BODY)
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise InvalidInput('unload needs {"model": name}')
        await self.registry.unload(name)
        self._overridden(name)
        return web.json_response({"unloaded": name})

    def _overridden(self, name: str) -> None:
        """An operator's reload or unload wins over a models_file entry of the name that failed to load and waits for
        a retry, until the file changes (else that retry loaded the file's version over a rollback)."""
        if self.models_file is not None:
            self.models_file.overridden(name)
