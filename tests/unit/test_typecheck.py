"""Packaging that static tools can follow.

The `synpref` namespace spans top-level folders (shared/ -> synpref.shared, ...). The
mapping is a static table in pyproject.toml, and the editable install is a link tree on a
static sys.path entry, so mypy resolves first-party imports to their real types: a type
error across modules is caught, not hidden behind Any.
"""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path

import pytest
from mypy import api as mypy_api

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
GENERATED = "synpref.v1"


def setuptools_table() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]


def run_mypy(program: str, tmp_path: Path) -> tuple[str, int]:
    # The project's own settings, so the override that forbids an unresolved synpref import applies.
    stdout, stderr, status = mypy_api.run(
        ["--config-file", str(PYPROJECT), "--cache-dir", str(tmp_path / "mypy_cache"), "-c", program]
    )
    return stdout + stderr, status


def test_the_static_package_table_lists_every_source_package() -> None:
    table = setuptools_table()
    folders = {name: folder for name, folder in table["package-dir"].items() if name != GENERATED}
    on_disk = set()
    for name, folder in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            on_disk.add(".".join([name, *rel.parts]))
    assert sorted(set(table["packages"]) - {GENERATED}) == sorted(on_disk)


def test_the_editable_install_resolves_synpref_without_an_import_hook() -> None:
    hooks = [f for f in sys.meta_path if "__editable__" in getattr(f, "__module__", "")]
    assert not [f for f in hooks if "synpref" in f.__module__], "synpref is installed with an import hook"
    spec = importlib.util.find_spec("synpref.shared.pairs")
    assert spec is not None and spec.origin is not None
    # Found by the ordinary path finder on a static sys.path entry: a link to the source file.
    assert Path(spec.origin).resolve() == ROOT / "shared" / "pairs.py"


def test_the_editable_install_links_every_source_module() -> None:
    spec = importlib.util.find_spec("synpref")
    assert spec is not None and spec.submodule_search_locations is not None
    installed = [Path(p) for p in spec.submodule_search_locations]
    missing = []
    for name, folder in setuptools_table()["package-dir"].items():
        if name == GENERATED:
            continue
        for source in (ROOT / folder).rglob("*.py"):
            rel = Path(name.removeprefix("synpref.")) / source.relative_to(ROOT / folder)
            if not any((root / rel).exists() for root in installed):
                missing.append(str(source.relative_to(ROOT)))
    # The link tree holds the modules that existed at install time.
    assert not missing, f"modules newer than the editable install (run `make install`): {missing}"


# Two cross-module errors: pair_id returns str (shared/pairs.py), and a Pair's id is a string
# field (the stubs generated from protos/). Both would be Any, and pass, if synpref did not resolve.
PLANTED = """\
from synpref.shared.pairs import flipped, pair_id
from synpref.v1.pair_pb2 import PairRecord

def key() -> int:
    return pair_id([], [], [])

def flipped_key(record: PairRecord) -> int:
    return flipped(record).pair.id
"""
CORRECT = PLANTED.replace("-> int:", "-> str:")


@pytest.mark.slow
def test_mypy_resolves_first_party_types_and_catches_a_planted_error(tmp_path: Path) -> None:
    output, status = run_mypy(PLANTED, tmp_path)
    assert status == 1, output
    wrong_return = 'error: Incompatible return value type (got "str", expected "int")'
    assert f"<string>:5: {wrong_return}" in output, output
    assert f"<string>:8: {wrong_return}" in output, output

    output, status = run_mypy(CORRECT, tmp_path)
    assert status == 0, output


def test_mypy_reports_an_unresolved_synpref_module(tmp_path: Path) -> None:
    output, status = run_mypy("import synpref.shared.no_such_module\n", tmp_path)
    assert status == 1, output
    assert 'Cannot find implementation or library stub for module named "synpref.shared.no_such_module"' in output
