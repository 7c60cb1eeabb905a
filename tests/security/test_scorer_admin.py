"""Issue 12, item 2: whoever reaches the scorer's RL-facing HTTP port must not be able to swap
the reward model. Admin lives on its own port, behind a bearer token, loads only folders under
scorer.model_root, and serves at most scorer.max_models names. Real servers on loopback."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from synpref.services.scorer.server import BackgroundScorer
from synpref.shared.config import ModelRef, ScorerSettings
from testing.tiny import build_tiny_reward_model

pytestmark = pytest.mark.integration
torch.set_num_threads(1)
TOKEN = "s3cret-admin-token-for-tests"


def post(url: str, body: Any, token: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, {"raw": raw.decode(errors="replace")}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model_root with two checkpoints; a third lies outside it."""
    base = tmp_path_factory.mktemp("scorer-admin")
    build_tiny_reward_model(base / "models" / "v1", arch="qwen3", seed=1)
    build_tiny_reward_model(base / "models" / "v2", arch="qwen3", seed=2)
    build_tiny_reward_model(base / "outside", arch="qwen3", seed=3)
    (base / "token").write_text(TOKEN + "\n")
    return base


def settings(root: Path, **kw: object) -> ScorerSettings:
    base: dict[str, object] = {
        "port": 0,
        "http_port": 0,
        "metrics_port": 0,
        "models": {"best": ModelRef(path=str(root / "models" / "v1"))},
    }
    base.update(kw)
    return ScorerSettings(**base)  # type: ignore[arg-type]


def admin_settings(root: Path, **kw: object) -> ScorerSettings:
    return settings(
        root,
        admin_enabled=True,
        admin_port=0,
        admin_token_file=str(root / "token"),
        model_root=str(root / "models"),
        **kw,
    )


def reward(bg: BackgroundScorer, model: str = "best") -> float:
    status, body = post(bg.http_url + "/get_reward", {"query": ["is this the same model?"], "model": model})
    assert status == 200, body
    return float(body["rewards"][0])


def test_rl_port_cannot_swap_the_model(root: Path) -> None:
    with BackgroundScorer(settings(root)) as bg:
        before = reward(bg)
        status, _ = post(bg.http_url + "/admin/reload", {"model": "best", "path": str(root / "models" / "v2")})
        assert status == 404
        assert reward(bg) == before


def test_admin_port_needs_the_bearer_token(root: Path) -> None:
    with BackgroundScorer(admin_settings(root)) as bg:
        admin = bg.admin_url
        assert admin != bg.http_url
        before = reward(bg)
        body = {"model": "best", "path": "v2", "version": "v2"}
        for token in (None, "", "wrong", TOKEN[:-1], TOKEN + "x"):
            status, answer = post(admin + "/admin/reload", body, token)
            assert status == 401, (token, answer)
        assert reward(bg) == before
        status, answer = post(admin + "/admin/reload", body, TOKEN)
        assert status == 200 and answer["version"] == "v2"
        assert reward(bg) != before
        # The RL-facing port has no admin routes even with the token.
        status, _ = post(bg.http_url + "/admin/reload", body, TOKEN)
        assert status == 404


def test_paths_outside_the_model_root_are_refused_alike(root: Path) -> None:
    with BackgroundScorer(admin_settings(root)) as bg:
        answers = []
        for path in (
            str(root / "outside"),  # a real checkpoint, outside the root
            "../outside",
            str(root / "models" / ".." / "outside"),
            "/etc",
            "/no/such/folder",
            "Qwen/Qwen3-0.6B",  # a hub id
            "absent",
        ):
            status, answer = post(bg.admin_url + "/admin/reload", {"model": "x", "path": path}, TOKEN)
            assert status == 400, (path, answer)
            assert path not in answer["error"] and str(root) not in answer["error"]
            answers.append(answer["error"])
        assert len(set(answers)) == 1, answers  # the same words whether the path exists or not
        assert sorted(json.loads(urllib.request.urlopen(bg.http_url + "/health").read())["models"]) == ["best"]


def test_served_models_are_capped_and_can_be_unloaded(root: Path) -> None:
    with BackgroundScorer(admin_settings(root, max_models=3)) as bg:
        statuses = [post(bg.admin_url + "/admin/reload", {"model": f"m{i}", "path": "v2"}, TOKEN)[0] for i in range(6)]
        assert statuses == [200, 200, 409, 409, 409, 409]
        assert len(bg.server.registry.models) == 3
        status, answer = post(bg.admin_url + "/admin/unload", {"model": "m0"}, TOKEN)
        assert status == 200 and answer == {"unloaded": "m0"}
        assert post(bg.http_url + "/get_reward", {"query": ["q"], "model": "m0"})[0] == 404
        assert post(bg.admin_url + "/admin/reload", {"model": "m2", "path": "v2"}, TOKEN)[0] == 200
        assert post(bg.admin_url + "/admin/unload", {"model": "nope"}, TOKEN)[0] == 404
        assert post(bg.admin_url + "/admin/unload", {"model": "m1"})[0] == 401


def test_admin_cannot_be_enabled_without_a_token(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="admin_token_file"):
        settings(root, admin_enabled=True, model_root=str(root / "models"))
    with pytest.raises(ValidationError, match="model_root"):
        settings(root, admin_enabled=True, admin_token_file=str(root / "token"))
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    bg = BackgroundScorer(settings(root, admin_enabled=True, admin_token_file=str(empty), model_root=str(root)))
    try:
        with pytest.raises(ValueError, match="empty"):
            bg.start(load=False)
    finally:
        bg.stop()


def test_the_controller_reloads_with_the_token(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    from synpref.services.controller.publish import reload_scorer
    from synpref.shared.scorer_admin import ScorerAdminError

    registry = {"best": {"path": str(root / "models" / "v2"), "version": "v2"}}
    with BackgroundScorer(admin_settings(root)) as bg:
        with pytest.raises(ScorerAdminError, match="401: admin calls need Authorization"):
            reload_scorer(bg.admin_url, registry)
        with caplog.at_level(logging.INFO, logger="synpref.services.controller.publish"):
            reload_scorer(bg.admin_url, registry, token_file=str(root / "token"))
        assert bg.server.registry.models["best"].version == "v2"
        # The log line carries the scorer's JSON answer (tests/cluster/test_controller.py greps it).
        assert any('"model": "best", "version": "v2"' in r.getMessage() for r in caplog.records)


def test_operators_reload_and_unload_from_the_command_line(
    root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from synpref.shared.cli import main as synpref

    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token")
    token = ["--token-file", str(root / "token")]
    with BackgroundScorer(admin_settings(root)) as bg:
        url = ["--url", bg.admin_url]
        before = reward(bg)
        assert synpref(["scorer", "reload", "best", "v2", *url, *token]) == 0
        answer = json.loads(capsys.readouterr().out)
        assert answer["model"] == "best" and answer["version"] == "v2"  # the folder's name by default
        assert bg.server.registry.models["best"].version == "v2" and reward(bg) != before

        # Refusals print the scorer's reason and exit 1; the served version stays.
        assert synpref(["scorer", "reload", "best", "../outside", *url, *token]) == 1
        assert "path must name a checkpoint folder under scorer.model_root" in capsys.readouterr().err
        assert synpref(["scorer", "reload", "best", "v1", *url, "--token-file", str(wrong)]) == 1
        assert "401: admin calls need Authorization" in capsys.readouterr().err
        assert synpref(["scorer", "reload", "best", "v1", *url, "--token-file", str(tmp_path / "none")]) == 1
        assert "cannot read the admin token file" in capsys.readouterr().err
        assert bg.server.registry.models["best"].version == "v2"

        # The controller's settings are the defaults: inside its pod no flag is needed.
        monkeypatch.setenv("SYNPREF_CONTROLLER__SCORER_RELOAD_URL", bg.admin_url)
        monkeypatch.setenv("SYNPREF_CONTROLLER__SCORER_ADMIN_TOKEN_FILE", str(root / "token"))
        assert synpref(["scorer", "reload", "canary", "v1", "--version", "v1-rc"]) == 0
        assert bg.server.registry.models["canary"].version == "v1-rc"
        capsys.readouterr()
        assert synpref(["scorer", "unload", "canary"]) == 0
        assert json.loads(capsys.readouterr().out) == {"unloaded": "canary"}
        assert "canary" not in bg.server.registry.models
        port = bg.admin_url.rsplit(":", 1)[1]
    # Nothing listening: said so, exit 1, no traceback.
    assert synpref(["scorer", "unload", "best", "--url", f"http://127.0.0.1:{port}", *token, "--timeout", "5"]) == 1
    assert "cannot reach the scorer's admin port" in capsys.readouterr().err
    monkeypatch.delenv("SYNPREF_CONTROLLER__SCORER_RELOAD_URL")
    assert synpref(["scorer", "unload", "best"]) == 2
    assert "--url http://<scorer>:8081" in capsys.readouterr().err


def test_a_reload_whose_caller_gave_up_still_completes(root: Path) -> None:
    # The controller's admin call gives up after 120 s, and a large model loads for longer: the admin server
    # cancelled the handler when its client left, so the loaded model was thrown away and every retry loaded it
    # again (and gave up again).
    import socket
    import time

    with BackgroundScorer(admin_settings(root)) as bg:
        registry = bg.server.registry
        load = registry.backend_factory

        def slow_load(*args: Any) -> Any:
            time.sleep(1.5)
            return load(*args)

        registry.backend_factory = slow_load
        before = reward(bg)
        body = json.dumps({"model": "best", "path": "v2", "version": "v2-late"}).encode()
        host, port = bg.admin_url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as conn:
            head = (
                f"POST /admin/reload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            conn.sendall(head.encode() + body)
            time.sleep(0.3)  # the load has started; the caller leaves
        deadline = time.monotonic() + 20
        while registry.models["best"].version != "v2-late" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert registry.models["best"].version == "v2-late"
        assert reward(bg) != before
