#!/usr/bin/env bash
# Wheel smoke check, as a user gets the package: build the sdist and, from it, the wheel;
# install the wheel into a clean venv (no source tree, no editable link tree) and run it
# from there: `synpref --help`, every subcommand's module imports, and one conversation
# scored by `synpref scorer` (a tiny random model built from a transformers config) through
# `synpref score`. Dependencies come from the uv cache that `make setup` filled.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
UV=$ROOT/.venv/bin/uv
WORK=$(mktemp -d "${TMPDIR:-/tmp}/synpref-wheel.XXXXXX")
SCORER_PID=""

cleanup() {
  if [[ -n $SCORER_PID ]] && kill -0 "$SCORER_PID" 2>/dev/null; then
    kill "$SCORER_PID"
    wait "$SCORER_PID" || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

fail() {
  echo "wheel smoke: $*" >&2
  exit 1
}

echo "wheel smoke: building the sdist and the wheel"
"$UV" build --quiet --python "$ROOT/.venv/bin/python" --build-constraint "$ROOT/constraints.txt" --out-dir "$WORK/dist" "$ROOT"
SDIST=$(echo "$WORK"/dist/synpref-*.tar.gz)
WHEEL=$(echo "$WORK"/dist/synpref-*.whl)
[[ -f $SDIST && -f $WHEEL ]] || fail "uv build made no sdist or no wheel"

# The sdist carries the .proto sources and no generated code; the wheel carries the code
# generated at build time and none of the repo's test support.
"$ROOT/.venv/bin/python" - "$SDIST" "$WHEEL" <<'EOF'
import sys
import tarfile
import zipfile

sdist = tarfile.open(sys.argv[1]).getnames()
wheel = zipfile.ZipFile(sys.argv[2]).namelist()
root = sdist[0].split("/")[0]
for proto in ("pair", "pipeline", "reward"):
    assert f"{root}/protos/synpref/v1/{proto}.proto" in sdist, f"sdist lacks protos/synpref/v1/{proto}.proto"
assert f"{root}/protos/generate.py" in sdist, "sdist lacks protos/generate.py"
assert not [n for n in sdist if "/gen/" in n or n.endswith("_pb2.py")], "sdist ships generated code"
for module in ("pair_pb2.py", "pipeline_pb2_grpc.py", "reward_pb2.py", "reward_pb2_grpc.py", "reward_pb2.pyi"):
    assert f"synpref/v1/{module}" in wheel, f"wheel lacks synpref/v1/{module}"
assert "synpref/shared/py.typed" in wheel, "wheel lacks the py.typed marker"
assert not [n for n in wheel if not n.startswith(("synpref/", "synpref-"))], "wheel ships more than synpref"
EOF

echo "wheel smoke: installing the wheel into a clean venv"
"$UV" venv --quiet --python "$ROOT/.venv/bin/python" "$WORK/venv"
"$UV" pip install --quiet --python "$WORK/venv/bin/python" -c "$ROOT/constraints.txt" "$WHEEL"
BIN=$WORK/venv/bin
cd "$WORK" # nothing of the checkout on sys.path from here on

"$BIN/synpref" --help >"$WORK/help.txt" || fail "synpref --help failed"
grep -q "scorer" "$WORK/help.txt" || fail "synpref --help lists no scorer command"

# Every subcommand's module imports from the wheel (one process, so torch loads once). Then
# a tiny Qwen3 reward model with random weights and a byte-level BPE tokenizer trained on the
# spot: no model hub is reachable, and the wheel must not need the repo's test helpers.
"$BIN/python" - "$WORK/model" <<'EOF'
import importlib
import sys

import synpref.shared
import torch
from synpref.shared.cli import COMMANDS
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast, Qwen3Config

assert synpref.shared.__file__.startswith(sys.prefix), f"synpref.shared from {synpref.shared.__file__}, not the venv"
for module, _ in COMMANDS.values():
    importlib.import_module(module)

out = sys.argv[1]
template = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
bpe = Tokenizer(models.BPE())
bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
bpe.decoder = decoders.ByteLevel()
specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
trainer = trainers.BpeTrainer(
    vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
)
bpe.train_from_iterator(["How do I bake bread? Mix flour, water, salt and yeast, then bake it."], trainer)
tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=template
)
tokenizer.save_pretrained(out)
config = Qwen3Config(
    vocab_size=len(tokenizer),
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    intermediate_size=64,
    pad_token_id=tokenizer.pad_token_id,
    eos_token_id=tokenizer.eos_token_id,
    num_labels=1,
)
torch.manual_seed(0)
AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
EOF

echo "wheel smoke: scoring one conversation with the installed scorer"
"$BIN/synpref" scorer --model tiny="$WORK/model" --host 127.0.0.1 --port 0 --http-port 0 --metrics-port 0 \
  --device cpu >"$WORK/scorer.log" 2>&1 &
SCORER_PID=$!
# The scorer logs its bound gRPC port, then "serving models" once the model is loaded.
deadline=$((SECONDS + 120))
until grep -q "serving models" "$WORK/scorer.log"; do
  kill -0 "$SCORER_PID" 2>/dev/null || fail "the scorer exited: $(cat "$WORK/scorer.log")"
  ((SECONDS < deadline)) || fail "the scorer did not load its model in 120 s: $(cat "$WORK/scorer.log")"
  sleep 0.2
done
PORT=$(sed -n 's/.*scorer listening: gRPC [0-9.]*:\([0-9]*\),.*/\1/p' "$WORK/scorer.log")
[[ -n $PORT ]] || fail "no gRPC port in the scorer's log: $(cat "$WORK/scorer.log")"

echo '[{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": "Mix, knead, bake."}]' \
  >"$WORK/conversation.jsonl"
"$BIN/synpref" score --address "127.0.0.1:$PORT" --timeout 60 items "$WORK/conversation.jsonl" -o "$WORK/scored.jsonl"
"$BIN/python" - "$WORK/scored.jsonl" <<'EOF'
import json
import math
import sys

rows = [json.loads(line) for line in open(sys.argv[1])]
assert len(rows) == 1 and math.isfinite(rows[0]["reward"]), rows
print(f"wheel smoke: ok (reward {rows[0]['reward']:.4f} from the installed wheel)")
EOF
