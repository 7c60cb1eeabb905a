"""Packaging hook: folder-to-import mapping and protobuf code generation.

The top-level folders are subpackages of one import namespace, `synpref`:
shared/ -> synpref.shared, services/<name>/ -> synpref.services.<name>,
training/ -> synpref.training, and the code generated from protos/synpref/v1
(into the git-ignored gen/) -> synpref.v1. Generated code is never committed or
edited; `make protos` runs the same generation for editable installs.
"""

import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SOURCE_FOLDERS = {
    "shared": "synpref.shared",
    "services": "synpref.services",
    "training": "synpref.training",
    "client": "synpref.client",
}


def generate_protos() -> None:
    subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py")], check=True)


def discover_packages() -> tuple[list[str], dict[str, str]]:
    packages: list[str] = []
    package_dir: dict[str, str] = {}
    for folder, name in SOURCE_FOLDERS.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT)
            dotted = ".".join([name, *rel.parts[1:]])
            packages.append(dotted)
            package_dir[dotted] = rel.as_posix()
    packages.append("synpref.v1")
    package_dir["synpref.v1"] = "gen/synpref/v1"
    return packages, package_dir


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()


if not (ROOT / "gen" / "synpref" / "v1" / "__init__.py").exists():
    generate_protos()
_packages, _package_dir = discover_packages()
setup(packages=_packages, package_dir=_package_dir, cmdclass={"build_py": BuildPyWithProtos})
