"""docker/*.Dockerfile: what can be checked without a Docker engine (none runs here).

Each Dockerfile is multi-stage, ends as the numeric non-root user the chart runs pods as,
and copies only paths that exist and that its .dockerignore lets through. Then the wheel
is built from exactly those paths, as `pip install .` does in the build stage: the copied
context is enough, the protobuf code is generated at build, and the console script and
the modules the chart runs are in it.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    lines, current = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += line.removesuffix("\\").strip() + " "
        if not line.endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            lines.append((word.upper(), rest.strip()))
            current = ""
    return lines


def build_copies(dockerfile: Path) -> list[str]:
    """Sources of the COPY lines that read the build context (not --from=another stage)."""
    sources = []
    for word, rest in instructions(dockerfile):
        if word == "COPY" and not rest.startswith("--from"):
            sources += rest.split()[:-1]
    return sources


def runtime_steps(dockerfile: Path) -> list[tuple[str, str]]:
    """The instructions of the last stage, the one the image is."""
    steps = instructions(dockerfile)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def test_both_images_exist() -> None:
    # The two SynPref images, and the dev broker's (the chart's devKafka where no registry serves one).
    assert {p.name for p in DOCKERFILES} == {"cpu.Dockerfile", "cuda.Dockerfile", "kafka.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_multi_stage_and_non_root(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    stages = [rest for word, rest in steps if word == "FROM"]
    assert len(stages) >= 2, "build and runtime stages"
    runtime = runtime_steps(dockerfile)
    users = [rest for word, rest in runtime if word == "USER"]
    assert users == ["${UID}:${UID}"]
    uid = next(rest.split("=", 1)[1] for word, rest in runtime if word == "ARG" and rest.startswith("UID="))
    chart_uid = yaml.safe_load((ROOT / "charts/synpref/values.yaml").read_text())["podSecurityContext"]["runAsUser"]
    assert int(uid) == chart_uid
    # The runtime stage gets what the build stage made (venv, jars), never the sources or a compiler.
    assert all(rest.startswith("--from=build") for word, rest in runtime if word == "COPY")
    assert not any("gcc" in rest or "build-essential" in rest for word, rest in runtime if word == "RUN")


def test_the_cpu_image_preloads_the_tcmalloc_it_installs() -> None:
    # docs/scorer.md, "Memory allocator": a preload of a path that is not there would only warn at every start.
    runtime = runtime_steps(ROOT / "docker/cpu.Dockerfile")
    runs = " ".join(rest for word, rest in runtime if word == "RUN")
    preload = re.search(r"LD_PRELOAD=(\S+)", " ".join(rest for word, rest in runtime if word == "ENV"))
    assert preload, "no LD_PRELOAD in the runtime stage"
    assert "libtcmalloc-minimal4" in runs
    assert "ln -s" in runs and f"test -e {preload.group(1)}" in runs


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_paths_exist_and_pass_the_dockerignore(dockerfile: Path) -> None:
    ignore = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
    allowed = [p[1:].rstrip("/") for p in ignore if p.startswith("!")]
    assert "*" in ignore, "the context starts from nothing and lets named paths back in"
    for source in build_copies(dockerfile):
        source = source.rstrip("/")
        assert (ROOT / source).exists(), source
        assert any(fnmatch.fnmatch(source, a) for a in allowed), f"{source} is excluded by the .dockerignore"


def test_wheel_builds_from_the_docker_context_alone(tmp_path: Path) -> None:
    (dockerfile,) = [p for p in DOCKERFILES if p.name == "cpu.Dockerfile"]
    context = tmp_path / "context"
    for source in build_copies(dockerfile):
        src = ROOT / source.rstrip("/")
        if src.is_dir():
            shutil.copytree(src, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            context.mkdir(exist_ok=True)
            shutil.copy2(src, context / source)
    assert not (context / "gen").exists()
    proc = subprocess.run(
        [
            str(ROOT / ".venv/bin/uv"),
            "build",
            "--wheel",
            "--build-constraint",
            str(ROOT / "constraints.txt"),
            "--out-dir",
            str(tmp_path / "dist"),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("synpref-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ["synpref/v1/pair_pb2.py", "synpref/v1/reward_pb2_grpc.py", "synpref/shared/cli.py"]:
        assert module in names
    assert "synpref/training/k8s_job.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "synpref = synpref.shared.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
