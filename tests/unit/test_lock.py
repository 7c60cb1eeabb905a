"""constraints.txt, the lock `make setup`, the wheel smoke check and the images install under.

Every requirement pyproject.toml names (the runtime, the dev, bench and judge-server extras,
the wheel's build requirements) must be pinned there to one version that satisfies it, or a
fresh machine resolves that package to whatever PyPI published last; and this venv must hold
exactly the pinned versions, or the suite ran on something CI will not install.
"""

from __future__ import annotations

import re
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
# vLLM pins its own torch and CUDA wheels; it is installed on GPU machines without the lock.
UNLOCKED_EXTRAS = {"vllm"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def pins() -> dict[str, Version]:
    found: dict[str, Version] = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = PIN.match(line.strip())
        assert match, f"constraints.txt:{number}: not a `name==version` pin: {line!r}"
        name = canonicalize_name(match.group(1))
        assert name not in found, f"constraints.txt:{number}: {name} pinned twice"
        found[name] = Version(match.group(2))
    return found


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = list(project["project"]["dependencies"]) + list(project["build-system"]["requires"])
    for extra, listed in project["project"]["optional-dependencies"].items():
        if extra not in UNLOCKED_EXTRAS:
            names += listed
    return [Requirement(r) for r in names]


def test_every_requirement_is_pinned_to_a_version_that_satisfies_it() -> None:
    locked = pins()
    for requirement in requirements():
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement} is not in constraints.txt: run `make lock`"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"constraints.txt pins {name}=={locked[name]}, outside pyproject's {requirement}: run `make lock`"
        )
    assert "uv" in locked  # the Makefile installs uv at this version


def test_this_venv_holds_the_pinned_versions() -> None:
    locked = pins()
    # The venv's own site-packages only: importing setuptools (torch.compile's C++ builds do) puts
    # its _vendor folder, with its own packaging release, on sys.path for the rest of the process.
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {canonicalize_name(d.metadata["Name"]): Version(d.version) for d in metadata.distributions(path=site)}
    # Local labels (torch's +cpu, +cu128) are builds of the same release.
    differ = {
        name: f"{installed[name]} installed, {version} pinned"
        for name, version in locked.items()
        if name in installed and Version(installed[name].public) != version
    }
    assert not differ, f"{differ}: run `make install` (or `make lock` after choosing new versions)"
    assert {"torch", "transformers", "grpcio", "kafka-python"} <= installed.keys() & locked.keys()
