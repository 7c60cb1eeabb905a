"""Review 39 of charts/synpref: grace periods that cover the services' drains, no secrets in the ConfigMap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from synpref.shared.config import load_settings
from tests.integration.test_chart import RELEASE, render
from tests.integration.test_chart import helm as helm  # the fixture: helm built once
from tests.integration.test_chart import run_helm as template

pytestmark = pytest.mark.integration


def grace(docs: list[dict[str, Any]], component: str) -> int:
    name = f"{RELEASE}-synpref-{component}"
    (doc,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == name]
    return int(doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])


def rendered_settings(docs: list[dict[str, Any]], tmp_path: Path) -> Any:
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == f"{RELEASE}-synpref-config"]
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    return load_settings(str(path))


@pytest.mark.parametrize(
    "args",
    [[], ["--set", "config.annotator.batch_deadline_s=300,config.scoring.timeout_s=100,config.scorer.drain_s=120.5"]],
    ids=["defaults", "tuned"],
)
def test_grace_periods_outlast_the_drains_the_config_asks_for(helm: str, tmp_path: Path, args: list[str]) -> None:
    # On SIGTERM a stage finishes and commits the batch in hand, then drains gRPC for shutdown_grace_s: an
    # annotator batch may take batch_deadline_s (480 s), a gold-scorer batch 3 deadlines for each of its two
    # models. With a fixed 30 s every such batch in flight on a rollout, drain or scale-down was SIGKILLed.
    docs = render(helm, *args)
    settings = rendered_settings(docs, tmp_path)
    after_batch = settings.service.shutdown_grace_s
    assert grace(docs, "annotator") > settings.annotator.batch_deadline_s + after_batch
    assert grace(docs, "gold-scorer") > 6 * settings.scoring.timeout_s + after_batch
    for quick in ("filter", "writer"):
        assert grace(docs, quick) > after_batch
    # The scorer drains for drain_s (HTTP for a fixed 30 s beside it), then closes its models.
    assert grace(docs, "scorer") > max(settings.scorer.drain_s, 30.0)


@pytest.mark.parametrize(
    ("args", "secret"),
    [
        (["--set", "config.desk.tokens=alice:s3cret-desk-token"], "s3cret-desk-token"),
        (["--set-json", 'config.annotator.judges=[{"name":"gpt","api_key":"sk-LEAKED-1"}]'], "sk-LEAKED-1"),
        (["--set-json", 'config.annotator.attribute_model={"name":"gpt","api_key":"sk-LEAKED-2"}'], "sk-LEAKED-2"),
    ],
    ids=["desk-tokens", "judge-api-key", "attribute-model-api-key"],
)
def test_secrets_in_config_are_refused_not_rendered_into_the_configmap(helm: str, args: list[str], secret: str) -> None:
    # config.yaml is a ConfigMap every pod mounts and every ConfigMap reader reads: a token or API key put
    # there was rendered in plain text. The chart refuses, names the Secret value to use, and never echoes it.
    proc = template(helm, *args)
    assert proc.returncode != 0, f"rendered with a secret in the ConfigMap:\n{proc.stdout[:2000]}"
    assert "Secret" in proc.stderr and "ConfigMap" in proc.stderr, proc.stderr
    assert secret not in proc.stdout + proc.stderr


def test_config_without_inline_secrets_still_renders(helm: str) -> None:
    # The refusals look at secrets only: key variables, an empty token list and no labeller still render.
    judges = '[{"name":"gpt","base_url":"https://api.openai.com/v1","api_key_env":"OPENAI_API_KEY"}]'
    docs = render(
        helm,
        "--set-json",
        f"config.annotator.judges={judges}",
        "--set-json",
        "config.annotator.attribute_model=null",
        "--set",
        "config.desk.tokens=",
    )
    assert any(d["kind"] == "ConfigMap" for d in docs)
