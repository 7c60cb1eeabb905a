"""scorer.models_file: every scorer replica converges on the models the controller publishes.

An admin reload reaches one pod behind the scorer's Service; the others (and pods started later) serve
nothing until they read the models file the controller writes. Real scorers on loopback with tiny
checkpoints; the chart half renders with the real helm.
"""

from __future__ import annotations

import json
import logging
import subprocess
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml

from synpref.services.controller.final_steps import FinalSteps
from synpref.services.scorer.server import BackgroundScorer
from synpref.shared.config import ControllerSettings, ScorerSettings
from synpref.shared.files import write_text_atomic
from testing.tiny import build_tiny_reward_model
from testing.wait import wait_until

pytestmark = pytest.mark.integration
torch.set_num_threads(1)
TOKEN = "models-file-admin-token"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model_root with two checkpoints, and the admin token beside it."""
    base = tmp_path_factory.mktemp("models-file")
    build_tiny_reward_model(base / "models" / "v1", arch="qwen3", seed=1)
    build_tiny_reward_model(base / "models" / "v2", arch="qwen3", seed=2)
    (base / "token").write_text(TOKEN + "\n")
    return base


def settings(root: Path, models_file: str, **kw: Any) -> ScorerSettings:
    base: dict[str, Any] = {
        "port": 0,
        "http_port": 0,
        "metrics_port": 0,
        "model_root": str(root / "models"),
        "models_file": models_file,
        "models_file_poll_s": 0.1,
        "admin_port": 0,
        "admin_token_file": str(root / "token"),
    }
    base.update(kw)
    return ScorerSettings(**base)


def served(bg: BackgroundScorer, name: str = "best") -> str | None:
    model = bg.server.registry.models.get(name)
    return model.version if model is not None else None


def reward(bg: BackgroundScorer) -> float:
    body = json.dumps({"query": ["which model is this?"], "model": "best"}).encode()
    req = urllib.request.Request(bg.http_url + "/get_reward", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return float(json.loads(resp.read())["rewards"][0])


def publish(path: Path, models: dict[str, dict[str, str]]) -> None:
    write_text_atomic(path, json.dumps(models))


def test_a_model_written_to_the_file_after_start_is_served_and_a_change_switches_it(root: Path, tmp_path: Path) -> None:
    file = tmp_path / "served.json"  # absolute, outside model_root: the file may live anywhere
    with BackgroundScorer(settings(root, str(file))) as bg:
        assert bg.server.registry.models == {}  # nothing listed yet: serves no model
        publish(file, {"best": {"path": "v1", "version": "v1"}})
        wait_until(lambda: served(bg) == "v1", 60, "the scorer to load v1 from its models file")
        assert bg.server.registry.models["best"].model_id == str((root / "models" / "v1").resolve())
        first = reward(bg)
        publish(file, {"best": {"path": str(root / "models" / "v2"), "version": "v2"}})
        wait_until(lambda: served(bg) == "v2", 60, "the scorer to switch to v2")
        assert reward(bg) != first


def test_the_file_loads_at_start_and_a_bad_entry_is_retried_not_fatal(
    root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file = root / "models" / "at-start.json"  # relative to model_root in the settings
    late = root / "models" / "late"
    publish(file, {"best": {"path": "v1", "version": "v1"}, "gold": {"path": "late"}, "bad": {"path": "../token"}})
    try:
        with (
            caplog.at_level(logging.WARNING, logger="synpref.services.scorer.server"),
            BackgroundScorer(settings(root, "at-start.json")) as bg,
        ):
            assert served(bg) == "v1"  # loaded by start() itself, before the first poll
            assert served(bg, "gold") is None and served(bg, "bad") is None
            build_tiny_reward_model(late, arch="qwen3", seed=3)  # the checkpoint lands later
            wait_until(lambda: served(bg, "gold") == "late", 60, "gold to load once its folder exists")
            assert served(bg, "bad") is None  # outside model_root: refused as an admin reload would be
            # Not JSON: logged, and what is served stays.
            write_text_atomic(file, "{not: [json")
            wait_until(lambda: "is not {name" in caplog.text, 30, "the bad file to be logged")
            assert served(bg) == "v1"
            publish(file, {"best": {"path": "v2", "version": "v2"}})
            wait_until(lambda: served(bg) == "v2", 60, "best to switch after the bad file was replaced")
            assert served(bg, "gold") == "late"  # a name the file stops listing keeps serving
        assert any("'bad'" in r.getMessage() and "does not load" in r.getMessage() for r in caplog.records)
    finally:
        file.unlink(missing_ok=True)


def test_the_controller_writes_the_file_so_a_replica_its_reload_does_not_reach_converges(
    root: Path, tmp_path: Path
) -> None:
    file = tmp_path / "shared" / "scorer-models.json"
    file.parent.mkdir()
    publish(file, {"best": {"path": "v1", "version": "v1"}, "canary": {"path": "v1", "version": "c1"}})
    first = {"path": str(root / "models" / "v1"), "version": "v1"}
    with (
        BackgroundScorer(settings(root, str(file), admin_enabled=True)) as reached,
        BackgroundScorer(settings(root, str(file), admin_enabled=True)) as other,
    ):
        assert served(reached) == served(other) == "v1"
        controller = SimpleNamespace(
            c=ControllerSettings(
                scorer_reload_url=reached.admin_url,
                scorer_admin_token_file=str(root / "token"),
                scorer_models_file="shared/scorer-models.json",  # relative to the workdir
            ),
            root=tmp_path,
        )
        registry = {"best": {"path": str(root / "models" / "v2"), "version": "v2"}, "gold": first}
        FinalSteps.reload(controller, registry)  # type: ignore[arg-type]
        assert served(reached) == "v2"  # the admin call switched the pod it reached at once
        wait_until(lambda: served(other) == "v2" and served(other, "gold") == "v1", 60, "the other replica")
        # A replica started after the swap (an HPA scale-up, a restart) serves the same at once.
        with BackgroundScorer(settings(root, str(file))) as later:
            assert (served(later), served(later, "gold"), served(later, "canary")) == ("v2", "v1", "c1")
    written = json.loads(file.read_text())
    assert written == {**registry, "canary": {"path": "v1", "version": "c1"}}  # other names are kept
    assert not [p for p in file.parent.iterdir() if p.name.endswith(".tmp")]


def test_the_controller_writes_the_file_without_a_reload_url(tmp_path: Path) -> None:
    controller = SimpleNamespace(c=ControllerSettings(scorer_models_file=str(tmp_path / "m.json")), root=tmp_path)
    FinalSteps.reload(controller, {"best": {"path": "/data/x", "version": "x"}})  # type: ignore[arg-type]
    assert json.loads((tmp_path / "m.json").read_text()) == {"best": {"path": "/data/x", "version": "x"}}


def helm_config(*args: str) -> dict[str, Any]:
    helm = ROOT / ".cache" / "bin" / "helm"
    if not helm.exists():
        pytest.skip("helm is not built (tools/helm/build.sh)")
    chart = ROOT / "charts" / "synpref"
    proc = subprocess.run(
        [str(helm), "template", "rel", str(chart), "-n", "ml", "-f", str(chart / "ci" / "base-values.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    for doc in yaml.safe_load_all(proc.stdout):
        if doc and doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "rel-synpref-config":
            config: dict[str, Any] = yaml.safe_load(doc["data"]["config.yaml"])
            return config
    raise AssertionError("no config ConfigMap")


def test_the_chart_points_scorer_and_controller_at_one_file_on_the_data_volume() -> None:
    config = helm_config()
    path = config["scorer"]["models_file"]
    assert path == config["controller"]["scorer_models_file"] == "/data/controller/scorer-models.json"
    custom = helm_config("--set", "config.controller.scorer_models_file=/data/elsewhere/m.json")
    assert custom["scorer"]["models_file"] == custom["controller"]["scorer_models_file"] == "/data/elsewhere/m.json"
    # Without the controller (which needs the PVC) nothing writes the file: none is set.
    assert not helm_config("--set", "controller.enabled=false")["scorer"].get("models_file")
