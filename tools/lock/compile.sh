#!/usr/bin/env bash
# Writes constraints.txt: one exact version for every package the project installs (the
# runtime, dev, bench and judge-server extras, the wheel's build requirements, uv itself).
# `make setup`, the wheel smoke check and the images install under it, so a fresh machine gets
# the versions CI last passed with, not whatever PyPI published since (transformers 5.25 dropped
# the judge server's per-request log line the cluster test reads, mid-CI-run).
#   make lock                 re-resolve, keeping every pin that still fits pyproject.toml
#   make lock ARGS=--upgrade  move every pin to the newest release (then run the full suite)
#   make lock ARGS="--upgrade-package transformers"
set -euo pipefail
cd "$(dirname "$0")/../.."
UV="${UV:-.venv/bin/uv}"
extra_in="$(mktemp --suffix=.in)"
trap 'rm -f "$extra_in"' EXIT
python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))' \
  >"$extra_in"
echo "uv" >>"$extra_in"
# Linux x86-64 and Python 3.11: the machines, the images and CI (torch's CUDA wheels differ per platform).
"$UV" pip compile --quiet pyproject.toml "$extra_in" --extra dev --extra bench --extra judge-server \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --custom-compile-command "make lock" --no-emit-package synpref -o constraints.txt "$@"
# The temporary input's name in "# via" comments would change on every run.
sed -i "s|$extra_in|build requirements and uv (tools/lock/compile.sh)|" constraints.txt
