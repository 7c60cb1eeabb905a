"""A folder that makes importable only what the GPU machine's image holds (device-packages.txt),
linked from this interpreter's own site-packages, with the dist-info of each (transformers checks
versions through importlib.metadata). Run the benchmarks with `python -S` and PYTHONPATH set to the
carried wheels' folder, then this one: an import of anything neither holds fails here as it would
there. Versions are this venv's, not the image's: only presence is emulated.

    python tools/gpu/emulate_site.py OUT_DIR
"""

from __future__ import annotations

import importlib.metadata as md
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as normalise

HERE = Path(__file__).resolve().parent


def device_packages() -> set[str]:
    words = []
    for line in (HERE / "device-packages.txt").read_text().splitlines():
        if not line.startswith("#"):
            words += line.split()
    return {normalise(w) for w in words}


def requirement_names(dist: md.Distribution) -> set[str]:
    """The names `dist` requires outside its extras, under this interpreter's markers."""
    names = set()
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.add(normalise(req.name))
    return names


def closure(roots: set[str], installed: dict[str, md.Distribution]) -> set[str]:
    """`roots` and what they require, transitively, among the installed distributions."""
    seen: set[str] = set()
    todo = [r for r in roots if r in installed]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += [r for r in requirement_names(installed[name]) if r in installed and r not in seen]
    return seen


def top_level_entries(dist: md.Distribution) -> set[Path]:
    """The site-packages entries (packages, modules, extension files, the dist-info) of `dist`."""
    base = Path(str(dist.locate_file("")))
    entries = set()
    for f in dist.files or []:
        first = Path(str(f)).parts[0]
        if first in ("..", "__pycache__") or first.endswith(".pth"):
            continue
        entries.add(base / first)
    return {e for e in entries if e.exists()}


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    installed = {normalise(d.metadata["Name"]): d for d in md.distributions()}
    wanted = device_packages()
    # torch's own CUDA libraries come with it on the image whatever their names here.
    chosen = {n for n in wanted if n in installed} | closure({"torch"}, installed)
    linked = 0
    for name in sorted(chosen):
        for entry in top_level_entries(installed[name]):
            link = out / entry.name
            if not link.exists():
                link.symlink_to(entry)
                linked += 1
    missing = sorted(wanted - set(installed))
    print(
        f"emulated device site {out}: {len(chosen)} distributions, {linked} entries linked; "
        f"{len(missing)} listed ones not installed here (not emulated)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
