"""skaffold.yaml against skaffold's own JSON schema, and against the chart and images it names.

Skaffold itself is not built here (its module pulls in Docker, cloud SDKs and more: far
too long to compile on a CI machine), so `skaffold diagnose` is not run. The schema comes
from skaffold's Go module (docs-v2/content/en/schemas/<apiVersion>.json), fetched through
the Go module proxy into the module cache by `go mod download`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SKAFFOLD_MODULE = "github.com/GoogleContainerTools/skaffold/v2@v2.16.1"


def go() -> str:
    found = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    assert found, "the Go toolchain is needed to fetch skaffold's schema from the Go module proxy"
    return found


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "skaffold.yaml").read_text())


@pytest.fixture(scope="module")
def schema(config: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [go(), "mod", "download", "-json", SKAFFOLD_MODULE],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "GOFLAGS": "-mod=mod"},
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    module_dir = Path(json.loads(proc.stdout)["Dir"])
    version = config["apiVersion"].removeprefix("skaffold/")
    path = module_dir / "docs-v2" / "content" / "en" / "schemas" / f"{version}.json"
    assert path.exists(), f"skaffold {SKAFFOLD_MODULE} has no schema for {config['apiVersion']}"
    return json.loads(path.read_text())


def errors(schema: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_skaffold_yaml_matches_its_schema(schema: dict[str, Any], config: dict[str, Any]) -> None:
    assert errors(schema, config) == []


def test_schema_check_catches_mistakes(schema: dict[str, Any], config: dict[str, Any]) -> None:
    typo = json.loads(json.dumps(config))
    typo["deploy"]["helm"]["releases"][0]["chartPth"] = typo["deploy"]["helm"]["releases"][0].pop("chartPath")
    assert errors(schema, typo)
    wrong_type = json.loads(json.dumps(config))
    wrong_type["profiles"][0]["build"]["local"]["push"] = "no"
    assert errors(schema, wrong_type)


def test_skaffold_builds_both_images_from_the_dockerfiles(config: dict[str, Any]) -> None:
    artifacts = {a["image"]: a for a in config["build"]["artifacts"]}
    assert set(artifacts) == {"synpref", "synpref-cuda"}
    for artifact in artifacts.values():
        assert (ROOT / artifact["context"] / artifact["docker"]["dockerfile"]).is_file()


def releases(config: dict[str, Any], profile: str | None) -> list[dict[str, Any]]:
    if profile is None:
        return config["deploy"]["helm"]["releases"]
    (prof,) = [p for p in config["profiles"] if p["name"] == profile]
    return prof["deploy"]["helm"]["releases"]


def test_profiles_cpu_dev_and_gpu(config: dict[str, Any]) -> None:
    assert {p["name"] for p in config["profiles"]} == {"cpu-dev", "gpu"}
    (cpu,) = [p for p in config["profiles"] if p["name"] == "cpu-dev"]
    # The patch that drops the CUDA artifact must point at it.
    (patch,) = cpu["patches"]
    index = int(patch["path"].rsplit("/", 1)[1])
    assert patch["op"] == "remove" and config["build"]["artifacts"][index]["image"] == "synpref-cuda"
    (release,) = releases(config, "cpu-dev")
    assert release["valuesFiles"] == ["charts/synpref/examples/cpu-dev.yaml"]
    assert all("cuda" not in v for v in release["setValueTemplates"].values())
    (release,) = releases(config, "gpu")
    assert release["valuesFiles"] == ["charts/synpref/examples/gpu-cluster.yaml"]


@pytest.mark.parametrize("profile", [None, "cpu-dev", "gpu"])
def test_each_release_renders_as_skaffold_would_deploy_it(config: dict[str, Any], profile: str | None) -> None:
    """helm template with the release's chart, values files and image values filled in."""
    from test_chart import render  # the session's helm, built by tools/helm/build.sh

    helm = subprocess.run(["bash", str(ROOT / "tools/helm/build.sh")], capture_output=True, text=True, timeout=1200)
    assert helm.returncode == 0, helm.stderr
    (release,) = releases(config, profile)
    assert (ROOT / release["chartPath"]) == ROOT / "charts" / "synpref"
    args = [arg for f in release.get("valuesFiles", []) for arg in ("-f", str(ROOT / f))]
    for key, template in release["setValueTemplates"].items():
        # What skaffold substitutes for {{.IMAGE_REPO_x}} / {{.IMAGE_TAG_x}}@{{.IMAGE_DIGEST_x}}.
        value = "registry.example/synpref" if key.endswith("repository") else "abc1234@sha256:" + "0" * 64
        assert "{{.IMAGE_" in template
        args += ["--set", f"{key}={value}"]
    docs = render(str(ROOT / ".cache" / "bin" / "helm"), *args)
    images = {
        c["image"]
        for d in docs
        if d["kind"] in {"Deployment", "Job", "CronJob"}
        for c in (d["spec"]["jobTemplate"]["spec"]["template"] if d["kind"] == "CronJob" else d["spec"]["template"])[
            "spec"
        ]["containers"]
    }
    assert images == {"registry.example/synpref:abc1234@sha256:" + "0" * 64}
    # skaffold's port forwards name Services that the release creates.
    services = {d["metadata"]["name"].replace("rel-synpref", "synpref") for d in docs if d["kind"] == "Service"}
    for forward in config["portForward"]:
        assert forward["resourceName"] in services
