#!/usr/bin/env bash
# On the lent GPU machine, from the repo root (the working tree with .gpu/ from bundle.sh):
# install the carried wheels into a folder of their own, record the machine, then run
#   gpu_train_mfu.py  the Qwen3-0.6B shape, bf16 (tokens/s and MFU; goal >= 45%);
#   gpu_scorer_load.py 64 single-item clients against the naive server and the offline
#                     ceiling (goals >= 5x naive, >= 0.95x the ceiling).
# Logs and JSON go to $OUT (the device tool brings them back). Each step has its own time
# limit, so one that hangs leaves time for the next. `--dry-run`: the CPU paths only (bundle.sh --check).
set -uo pipefail
OUT=${OUT:-/tmp/synpref-gpu-out}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.gpu/wheels}
SITE=${SITE:-/tmp/synpref-site}
DATA=${DATA:-.gpu/data/test.jsonl.gz}
DRY=0
[[ ${1:-} == --dry-run ]] && DRY=1
mkdir -p "$OUT"

${PIP_PYTHON:-$PYTHON} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" "$WHEELS"/*.whl || { echo "run: installing the carried wheels failed" >&2; exit 1; }
export PYTHONPATH="$SITE${EXTRA_PATH:+:$EXTRA_PATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
  nproc
  $PYTHON - <<'PY'
import importlib.metadata as md
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for name in ("transformers", "tokenizers", "grpcio", "protobuf", "pydantic", "synpref", "flash_attn"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
import synpref.v1.reward_pb2_grpc  # noqa: F401  (the generated code accepts this grpcio and protobuf)
PY
} 2>&1 | tee "$OUT/env.txt"
[[ ${PIPESTATUS[0]} == 0 ]] || { echo "run: the environment check failed (env.txt)" >&2; exit 1; }

step() { # name, seconds, command...: its output to $OUT/name.log, its status in the log's last line
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  echo "== $name exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.log"
}

if ((DRY)); then
  step mfu 300 $PYTHON benchmarks/gpu_train_mfu.py --smoke --json "$OUT/mfu.json"
  step serve 300 $PYTHON benchmarks/gpu_scorer_load.py --dry-run --skip-naive --data "$DATA" --json "$OUT/serve.json"
  exit 0
fi
# The limits keep the whole run inside one device call (600 s); MFU_ARGS and SERVE_ARGS add
# flags for a rerun (say SERVE_ARGS="--items 1152" if the first one ran out of time).
step mfu 180 $PYTHON benchmarks/gpu_train_mfu.py --json "$OUT/mfu.json" ${MFU_ARGS:-}
step serve 380 $PYTHON benchmarks/gpu_scorer_load.py --data "$DATA" --json "$OUT/serve.json" ${SERVE_ARGS:-}
