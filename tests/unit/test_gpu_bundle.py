"""tools/gpu: what travels to the lent GPU machine (its image reaches no package index), so a GPU
session spends its minutes measuring. `bash tools/gpu/bundle.sh --check` runs the benchmarks there
as the image would; these tests keep the bundle's lists honest without the network."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "gpu"))

import emulate_site  # noqa: E402

# Imported here but not needed there: grpc tries grpc_tools for its runtime protos and torch
# tries dill (both only when present), setuptools' hook comes with any venv, and httpx2,
# httpcore2, truststore and sniffio are huggingface_hub 2.x's HTTP stack in this venv (the
# image's huggingface_hub 1.x uses its own httpx; bundle.sh --check runs with that one).
OPTIONAL = {"grpcio-tools", "dill", "setuptools", "truststore", "httpx2", "httpcore2", "sniffio"}


def carried() -> set[str]:
    text = (ROOT / "tools" / "gpu" / "bundle.sh").read_text()
    block = re.search(r"PACKAGES=\((.*?)\)", text, re.S)
    assert block, "bundle.sh names its PACKAGES=(...)"
    return {emulate_site.normalise(w) for w in block.group(1).split()}


def test_every_carried_package_is_pinned_in_the_lock():
    pins = {
        emulate_site.normalise(line.split("==")[0])
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    assert carried() - pins == set()


def test_the_device_list_parses_and_lacks_what_is_carried_for_absence():
    image = emulate_site.device_packages()
    assert {"torch", "transformers", "grpcio", "protobuf", "aiohttp", "prometheus-client"} <= image
    # pydantic and grpc's health and reflection services are why the bundle exists at all.
    assert {"pydantic", "pydantic-settings", "grpcio-health-checking", "grpcio-reflection"} & image == set()


def test_requirement_names_and_closure():
    class Dist:
        def __init__(self, requires: list[str]) -> None:
            self.requires = requires

    installed = {
        "a": Dist(["B>=1; python_version >= '3.8'", "c[x]~=2.0", "d ; extra == 'dev'"]),
        "b": Dist(["Typing_Extensions (>=4)"]),
        "c": Dist([]),
        "typing-extensions": Dist([]),
        "d": Dist([]),
    }
    assert emulate_site.requirement_names(installed["a"]) == {"b", "c"}  # type: ignore[arg-type]
    assert emulate_site.closure({"a", "absent"}, installed) == {"a", "b", "c", "typing-extensions"}  # type: ignore[arg-type]


@pytest.mark.slow  # a fresh process imports torch, transformers and the scorer
def test_what_the_gpu_paths_import_is_on_the_image_or_carried():
    code = """
import importlib.metadata as md, json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/benchmarks"]
import gpu_scorer_load, gpu_train_mfu, scorer_load, testing.tiny
import synpref.services.scorer.server, synpref.services.scorer.backends, synpref.shared.config
import synpref.training.reward_trainer, synpref.training.reward_config, synpref.training.batching
import transformers, tokenizers
from transformers import AutoModelForSequenceClassification, Qwen3Config
top = {name.split(".")[0] for name in sys.modules}
owners = md.packages_distributions()
print(json.dumps(sorted({d for t in top for d in owners.get(t, [])})))
"""
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    imported = {emulate_site.normalise(d) for d in json.loads(out.stdout.splitlines()[-1])}
    missing = imported - emulate_site.device_packages() - carried() - OPTIONAL - {"synpref"}
    assert missing == set(), f"add these to tools/gpu/bundle.sh PACKAGES (the GPU image lacks them): {missing}"
