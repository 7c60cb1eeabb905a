"""charts/synpref: where the controller's durable state and the judges' example index live.

The controller keeps pairs.sqlite, vectors.f16 and its models in config.controller.workdir and
rewrites the judges' example index at config.annotator.examples_index after each human round;
every annotator pod re-reads that folder. So, in every render with the controller on, both paths
must lie on the data PVC, mounted by the controller and by the annotator pods, and what the user
set is kept.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

import pytest
import yaml

from tests.integration.test_chart import EXAMPLES, RELEASE, helm, one, pod_spec, render, run_helm

__all__ = ["helm"]  # the session fixture, shared with test_chart.py

pytestmark = pytest.mark.integration

FULLNAME = f"{RELEASE}-synpref"
CASES: dict[str, list[str]] = {
    "default": [],
    **{f"example:{p.stem}": ["-f", str(p)] for p in EXAMPLES},
    # Without training the chart used to leave the workdir at its relative default, off the volume.
    "no-training": ["--set", "training.enabled=false"],
    "existing-claim": ["--set", "persistence.existingClaim=my-data"],
}


def pipeline_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(one(docs, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])


def claim_under(docs: list[dict[str, Any]], deployment: str, path: str) -> str | None:
    """The PVC that holds `path` in `deployment`'s container (the deepest mount containing it), or None."""
    spec = pod_spec(one(docs, "Deployment", f"{FULLNAME}-{deployment}"))
    (container,) = spec["containers"]
    target = PurePosixPath(path)
    assert target.is_absolute(), f"{deployment}: {path} is relative: it would resolve against the image's cwd"
    mounts = [m for m in container["volumeMounts"] if target.is_relative_to(m["mountPath"])]
    if not mounts:
        return None
    mount = max(mounts, key=lambda m: len(PurePosixPath(m["mountPath"]).parts))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    return volume.get("persistentVolumeClaim", {}).get("claimName")


@pytest.mark.parametrize("case", list(CASES))
def test_controller_workdir_is_on_the_data_pvc(helm: str, case: str) -> None:
    docs = render(helm, *CASES[case])
    workdir = pipeline_config(docs)["controller"]["workdir"]
    claim = "my-data" if case == "existing-claim" else f"{FULLNAME}-data"
    assert claim_under(docs, "controller", workdir) == claim, workdir


@pytest.mark.parametrize("case", list(CASES))
def test_annotators_mount_the_pvc_the_controller_writes_examples_to(helm: str, case: str) -> None:
    docs = render(helm, *CASES[case])
    examples = pipeline_config(docs)["annotator"].get("examples_index")
    assert examples, "the annotators are given no example index: the judges never see the verified pairs"
    claim = claim_under(docs, "controller", examples)
    assert claim is not None and claim_under(docs, "annotator", examples) == claim, examples


@pytest.mark.parametrize(
    ("args", "examples", "workdir"),
    [
        ([], "/data/examples", "/data/controller"),
        (
            ["--set", "config.annotator.examples_index=/data/shared/judge-examples,config.controller.workdir=/data/r1"],
            "/data/shared/judge-examples",
            "/data/r1",
        ),
    ],
)
def test_user_set_paths_are_kept_and_empty_ones_filled(helm: str, args: list[str], examples: str, workdir: str) -> None:
    config = pipeline_config(render(helm, *args))
    assert (config["annotator"]["examples_index"], config["controller"]["workdir"]) == (examples, workdir)


def test_without_the_controller_nothing_is_filled_in(helm: str) -> None:
    # No controller writes an index then: an examples_index would only name an empty folder.
    config = pipeline_config(render(helm, "--set", "controller.enabled=false"))
    assert not config["annotator"].get("examples_index") and "workdir" not in config.get("controller", {})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "persistence.enabled=false"], "controller.enabled needs persistence.enabled"),
        (["--set", "config.controller.workdir=/tmp/run"], "config.controller.workdir must be a folder under /data"),
        (["--set", "config.controller.workdir=artifacts/run"], "config.controller.workdir must be a folder under"),
        (["--set", "config.annotator.examples_index=/tmp/ex"], "config.annotator.examples_index must be a folder"),
    ],
)
def test_controller_state_off_the_data_volume_is_refused(helm: str, args: list[str], message: str) -> None:
    proc = run_helm(helm, *args)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_the_store_can_have_a_read_write_once_volume_of_its_own(helm: str) -> None:
    # A ReadWriteMany data volume is a network file system, which SQLite does not support.
    docs = render(helm, "--set", "controller.stateVolume.enabled=true", "--set", "controller.stateVolume.size=7Gi")
    controller = pipeline_config(docs)["controller"]
    assert controller["store_dir"] == "/state"
    assert claim_under(docs, "controller", controller["store_dir"]) == f"{FULLNAME}-controller-state"
    assert claim_under(docs, "controller", controller["workdir"]) == f"{FULLNAME}-data"  # models, datasets: shared
    claim = one(docs, "PersistentVolumeClaim", f"{FULLNAME}-controller-state")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "7Gi"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    default = render(helm)
    assert "store_dir" not in pipeline_config(default)["controller"]
    assert not [d for d in default if d["metadata"]["name"] == f"{FULLNAME}-controller-state"]


def test_the_controller_waits_a_day_for_sources_copied_in_after_the_install(helm):
    # Sources land on the volume after `helm install`; exiting meanwhile crash-looped the controller,
    # failed `helm install --wait`, and so kept the post-install topics hook from ever running.
    assert pipeline_config(render(helm))["controller"]["source_wait_s"] == 86400
    kept = render(helm, "--set", "config.controller.source_wait_s=0")
    assert pipeline_config(kept)["controller"]["source_wait_s"] == 0
