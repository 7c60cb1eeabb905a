#!/usr/bin/env bash
# What the lent GPU machine needs to run issue 15's GPU benchmarks, gathered here into the
# git-ignored .gpu/ (it travels with the working tree; the machine reaches no package index):
#   .gpu/wheels  this project's wheel (with the generated protobuf code) and the pinned
#                (constraints.txt) wheels of what the GPU benchmarks import that the machine's
#                image lacks (device-packages.txt) or holds at another version than the
#                generated code or transformers need;
#   .gpu/data    the hh-rlhf test split gpu_scorer_load.py reads (../shared does not travel).
# Then, on the machine: `bash tools/gpu/run.sh` (docs/gpu.md).
#
#   bash tools/gpu/bundle.sh            # wheels for the machine's Python (3.12)
#   bash tools/gpu/bundle.sh --check    # also: this machine's Python, and the CPU paths of both
#                                       # benchmarks run with only the image's packages + the bundle
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
DATA=${DATA:-$ROOT/../shared/data/hh-rlhf/harmless-base/test.jsonl.gz}
CHECK=0
[[ ${1:-} == --check ]] && CHECK=1

# grpcio/protobuf: the generated code refuses older runtimes; pydantic*: the config (absent there);
# transformers/tokenizers/regex: the version the suite passes with (transformers checks regex's).
PACKAGES=(grpcio grpcio-health-checking grpcio-reflection protobuf
  pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection typing-extensions
  transformers tokenizers regex)

pins() {
  local p line
  for p in "${PACKAGES[@]}"; do
    line=$(grep -i -E "^${p}==" constraints.txt) || { echo "bundle: $p is not pinned in constraints.txt" >&2; exit 1; }
    echo "$line"
  done
}

download() { # python version, folder
  local platforms=() n
  for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$1" --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d "$2" $(pins)
}

# Versions read on the image (device-packages.txt) whose imports differ from this venv's.
IMAGE_VERSIONS="huggingface_hub==1.33.0 httpx==0.28.1 httpcore==1.0.9"

[[ -x $PY ]] || { echo "bundle: no .venv here: run make install first" >&2; exit 1; }
[[ -f $DATA ]] || { echo "bundle: $DATA not found (set DATA=)" >&2; exit 1; }
rm -rf .gpu
mkdir -p .gpu/wheels .gpu/data
"$ROOT/.venv/bin/uv" build --quiet --wheel --python "$PY" --build-constraint constraints.txt --out-dir .gpu/wheels .
download 3.12 .gpu/wheels
cp "$DATA" .gpu/data/
echo "bundle: $(ls .gpu/wheels | wc -l) wheels, $(du -sh .gpu | cut -f1) in .gpu/ (the working tree may carry 64 MiB)"

if ((CHECK)); then
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/synpref-gpu-check.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
  mkdir -p "$WORK/wheels"
  cp .gpu/wheels/synpref-*.whl "$WORK/wheels/"
  download "$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" "$WORK/wheels"
  "$PY" tools/gpu/emulate_site.py "$WORK/device-site"
  # Where the image's version of a pure-Python package differs in its imports from this venv's
  # (huggingface_hub 1.x uses httpx, 2.x httpx2), the image's goes in front.
  "$PY" -m pip install --quiet --no-deps --target "$WORK/image-versions" $IMAGE_VERSIONS
  # -S: nothing of .venv's site-packages but what the image holds (device-site) and the bundle.
  PYTHON="$PY -S" PIP_PYTHON="$PY" WHEELS="$WORK/wheels" SITE="$WORK/site" EXTRA_PATH="$WORK/image-versions:$WORK/device-site" OUT="$WORK/out" \
    bash tools/gpu/run.sh --dry-run
  for step in mfu serve; do
    grep -q "^== $step exit 0$" "$WORK/out/$step.log" || { echo "bundle --check: $step failed" >&2; exit 1; }
  done
  echo "bundle --check: both benchmarks ran their CPU paths on the image's packages and the bundle"
fi
