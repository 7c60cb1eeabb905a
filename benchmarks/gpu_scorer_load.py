"""GPU variant of scorer_load.py: a Qwen3-0.6B-shaped reward model (random weights, bf16,
SDPA) on one H100/H200, the same 64 single-item clients against (a) the naive server and
(b) the offline batched ceiling. Reports items/s, tokens/s, p50/p99 latency and model
FLOPs utilisation (useful FLOPs only: padding is not counted).

Goal (issue 15, Part B): the scorer >= 5x (a)'s throughput and >= 0.95x (b)'s.

    .venv/bin/python benchmarks/gpu_scorer_load.py            # on a GPU machine
    .venv/bin/python benchmarks/gpu_scorer_load.py --dry-run  # CPU, shrunk model: checks the code path only

Shape: hidden 1024, 28 layers, 16 query / 8 key-value heads of 128, MLP 3072 (Qwen3-0.6B);
the vocabulary is the locally trained tokenizer's (no hub here), so the embedding is
smaller than Qwen3's 151,936 rows; the embedding is a lookup and costs no matmul FLOPs.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scorer_load

QWEN3_0_6B = {"layers": 28, "hidden": 1024, "heads": 16, "kv_heads": 8, "head_dim": 128, "intermediate": 3072}
DRY_RUN = {"layers": 2, "hidden": 128, "heads": 4, "kv_heads": 2, "head_dim": 32, "intermediate": 256}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def build_qwen3(out: Path, convs: list[list[dict[str, str]]], shape: dict[str, int]) -> Path:
    """A random Qwen3-shaped RM with a tokenizer trained on the benchmark's own texts."""
    from testing.tiny import build_tiny_reward_model

    texts = [m["content"] for c in convs for m in c]
    return build_tiny_reward_model(
        out,
        arch="qwen3",
        layers=shape["layers"],
        hidden=shape["hidden"],
        heads=shape["heads"],
        kv_heads=shape["kv_heads"],
        head_dim=shape["head_dim"],
        intermediate=shape["intermediate"],
        vocab_size=8000,
        texts=texts,
        max_positions=8192,
    )


def flops_per_token(shape: dict[str, int], non_embedding_params: int, mean_len: float) -> float:
    """Forward FLOPs per token: 2 x matmul params, plus causal attention (QK^T and AV over on
    average half the sequence)."""
    attn = 2 * 2 * shape["layers"] * shape["heads"] * shape["head_dim"] * (mean_len / 2)
    return 2.0 * non_embedding_params + attn


def peak_flops(device_name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None


def main() -> int:
    p = scorer_load.parser()
    p.description = __doc__
    p.add_argument("--dry-run", action="store_true", help="CPU, fp32, shrunk model, few items: checks the path only")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, if the GPU is not recognised")
    p.set_defaults(
        device="cuda",
        dtype="bfloat16",
        items=2304,
        repeats=3,
        threads=0,
        max_length=2048,
        budgets=[16384, 32768, 65536],
        scorer_budget="ceiling",  # wide forwards pay on a GPU: the scorer takes the ceiling's budget
        # On a GPU the event loop, not the model, bounds the request rate: show the transports,
        # and token-id input (no tokenizing on the loop).
        transport=["grpc", "grpc-stream", "grpc-stream-ids"],
        # The 64 clients in 8 processes: one process of them cannot send what a GPU scorer takes.
        client_processes=8,
    )
    args = p.parse_args()
    shape = QWEN3_0_6B
    if args.dry_run:
        shape = DRY_RUN
        args.device, args.dtype, args.items, args.repeats, args.budgets = "cpu", "float32", 64, 1, [2048]
        args.client_processes = 2  # the split clients' path, on few cores
        if args.ceiling == "auto":
            args.ceiling = "beside"  # what a GPU run does (scorer_load.py --ceiling auto)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"device: {device_name}; torch {torch.__version__}", flush=True)

    label = "dry-run" if args.dry_run else "qwen3-0.6b-shaped"
    rows = scorer_load.run(args, lambda out, convs: build_qwen3(out, convs, shape), label)
    _, non_embed = scorer_load.param_count(Path(args.workdir) / label)
    fpt = flops_per_token(shape, non_embed, rows[0]["mean_len"])
    peak = peak_flops(device_name, args.peak_tflops)
    print(
        f"\nforward FLOPs per token ~ {fpt / 1e9:.2f} GFLOP; peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s"
    )
    scorer_load.report(rows, fpt, peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
