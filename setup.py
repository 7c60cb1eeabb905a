"""Build hook: generate the protobuf code, and make editable installs strict.

Packages and their folders (shared/ -> synpref.shared, ..., gen/synpref/v1 -> synpref.v1)
are declared statically in pyproject.toml. This file only adds what a static table cannot:

- protos/generate.py compiles protos/synpref/v1/*.proto into the git-ignored gen/ before
  the build (and before setuptools lists the package files, so an sdist or a fresh clone
  builds); generated code is never committed or edited.
- Editable installs are strict: setuptools builds a link tree under build/ and puts it on
  sys.path with one static line in site-packages, instead of an import hook that only a
  running interpreter understands, so mypy, pyright and IDEs resolve `synpref.*` to the
  files. The price: a module added or removed needs a reinstall (`make` redoes it).
"""

import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def generate_protos() -> None:
    subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py")], check=True)


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()


if not (ROOT / "gen" / "synpref" / "v1" / "__init__.py").exists():
    generate_protos()
setup(cmdclass={"build_py": BuildPyWithProtos}, options={"editable_wheel": {"mode": "strict"}})
