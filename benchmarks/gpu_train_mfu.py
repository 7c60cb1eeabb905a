"""Training tokens/s and model-FLOPs utilisation of the RewardTrainer on one GPU.

Model: Qwen3-0.6B-shaped (hidden 1024, 28 layers, 16 query / 8 KV heads of 128, MLP 3072,
vocab 151,936) with random weights and a one-label score head, trained by
`synpref.training.RewardTrainer` (fp32 master weights, bf16 autocast, fused AdamW) on
synthetic pairs of fixed length, so every token is real and the FLOP count is exact.

FLOPs per trained token (PaLM appendix B): 6 N + 12 L d_attn T, with N the non-embedding
parameters (embedding lookups cost no matmuls; a score head has no vocab projection),
L layers, d_attn = heads x head_dim, T the sequence length. That counts the full attention
matrix; the causal half actually needed is reported beside it. Peak: dense bf16 (H100/H200
SXM 989 TFLOP/s). Goal (issue 15, Part B): MFU >= 45%.

    python benchmarks/gpu_train_mfu.py                # on a GPU
    python benchmarks/gpu_train_mfu.py --dry-run      # anywhere: shapes, FLOP arithmetic, H200 token budget
    python benchmarks/gpu_train_mfu.py --packing off  # padded micro-batches, to compare with packing
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

# testing/ (tiny models: test support, not installed) lives at the repo root.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

MFU_GOAL = 0.45
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "A100": 312.0}
SMOKE = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 16, "intermediate": 128, "vocab": 2000}
QWEN3_06B = {
    "layers": 28,
    "hidden": 1024,
    "heads": 16,
    "kv_heads": 8,
    "head_dim": 128,
    "intermediate": 3072,
    "vocab": 151936,
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (chosen and rejected alike)")
    p.add_argument("--micro-batch", type=int, default=4, help="pairs per forward (2x sequences)")
    p.add_argument("--global-batch", type=int, default=32, help="pairs per optimizer step")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, kernels, compile)")
    p.add_argument(
        "--micro-tokens", type=int, default=-1, help="token budget per forward (-1: the trainer's auto budget)"
    )
    p.add_argument(
        "--packing",
        choices=["auto", "on", "off"],
        default="auto",
        help="auto packs with flash-attention 2 when flash_attn is installed, else pads",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, help="override the dense bf16 peak of the GPU")
    p.add_argument("--dry-run", action="store_true", help="print shapes and FLOP arithmetic, train nothing")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="run the whole measurement on a 2-layer model on any device (checks the code, not the GPU)",
    )
    p.add_argument("--json", help="also write the figures here")
    return p.parse_args()


def qwen3_config(s: dict[str, int]):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        head_dim=s["head_dim"],
        intermediate_size=s["intermediate"],
        max_position_embeddings=40960,
        num_labels=1,
        tie_word_embeddings=True,
        pad_token_id=0,
    )


def count_params(config) -> tuple[int, int]:
    """(all, non-embedding) parameters, counted on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    return total, total - embed


def flops_per_token(s: dict[str, int], non_embedding: int, seq_len: int) -> tuple[float, float]:
    """(full-attention, causal) training FLOPs per token."""
    attn = 12 * s["layers"] * s["heads"] * s["head_dim"] * seq_len
    return 6 * non_embedding + attn, 6 * non_embedding + attn / 2


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if all(part in name for part in key.split()):
            return value
    return None


def synthetic_pairs(n: int, seq_len: int, words: list[str], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    # Roughly one token per word; the trainer reports the exact counts it trained on.
    half = max(1, seq_len // 2 - 8)
    return [
        {
            "conversation": [{"role": "user", "content": text(half)}],
            "chosen": [{"role": "assistant", "content": text(half)}],
            "rejected": [{"role": "assistant", "content": text(half)}],
            "source": "synthetic",
        }
        for _ in range(n)
    ]


def main() -> int:
    args = parse()
    import torch

    s = SMOKE if args.smoke else QWEN3_06B
    if args.smoke:
        args.seq_len, args.micro_batch, args.global_batch, args.steps, args.warmup = 128, 2, 4, 2, 1
    config = qwen3_config(s)
    total, non_embedding = count_params(config)
    full, causal = flops_per_token(s, non_embedding, args.seq_len)
    label = "smoke 2-layer" if args.smoke else "Qwen3-0.6B-shaped"
    print(f"model: {label}, {total / 1e6:.1f}M parameters ({non_embedding / 1e6:.1f}M non-embedding)")
    print(
        f"FLOPs per trained token at T={args.seq_len}: {full / 1e9:.3f} GFLOP (full attention), "
        f"{causal / 1e9:.3f} GFLOP (causal half)"
    )
    for name in ("H100 SXM", "H200"):
        need = MFU_GOAL * PEAK_BF16_TFLOPS[name] * 1e12 / full
        print(f"{MFU_GOAL:.0%} MFU on {name} ({PEAK_BF16_TFLOPS[name]:.0f} TFLOP/s bf16) needs {need:,.0f} tokens/s")
    from synpref.training.batching import auto_token_budget, memory_token_cap

    h200 = memory_token_cap(139 * 2**30, total, s["layers"], s["hidden"], args.gradient_checkpointing)
    budget = auto_token_budget(args.seq_len, args.micro_batch, "cuda", h200)
    print(
        f"auto token budget on an H200 (139 GiB free): {budget:,} tokens per forward "
        f"(memory holds ~{h200:,}; envelope {2 * args.seq_len * args.micro_batch:,})"
    )
    if args.dry_run or not (torch.cuda.is_available() or args.smoke):
        if not args.dry_run:
            print("no CUDA device here: dry run only (shapes and FLOP arithmetic); nothing was measured")
        return 0

    from synpref.training.reward_config import RewardConfig
    from synpref.training.reward_trainer import RewardTrainer
    from testing.tiny import build_tiny_reward_model

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = args.peak_tflops or (peak_tflops(device) if cuda and not args.smoke else None)
    root = Path(tempfile.mkdtemp(prefix="mfu-"))
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5)) for _ in range(400)]
    model = build_tiny_reward_model(
        root / "model",
        arch="qwen3",
        layers=s["layers"],
        hidden=s["hidden"],
        heads=s["heads"],
        kv_heads=s["kv_heads"],
        head_dim=s["head_dim"],
        intermediate=s["intermediate"],
        vocab_size=2000,
        texts=[" ".join(words)] * 20,
        model_vocab_size=s["vocab"],
        max_positions=40960,
    )
    steps = args.warmup + args.steps
    pairs = synthetic_pairs(args.global_batch * steps, args.seq_len, words)
    cfg = RewardConfig(
        model_name_or_path=str(model),
        output_dir=str(root / "out"),
        global_batch_size=args.global_batch,
        micro_batch_size=args.micro_batch,
        max_tokens_per_micro_batch=args.micro_tokens,
        packing=args.packing,
        max_steps=steps,
        learning_rate=1e-5,
        max_length=args.seq_len,
        truncation="left_tokens",
        precision="bf16" if cuda else "fp32",
        device="cuda" if cuda else "cpu",
        compile=args.compile,
        gradient_checkpointing=args.gradient_checkpointing,
        progress=False,
        resume=False,
    )
    trainer = RewardTrainer(cfg, pairs, [])
    attention = getattr(trainer.model.config, "_attn_implementation", "?")
    print(
        f"plan: attention {attention}, packed={trainer.capture is not None}, <= {trainer.micro_pairs} pairs and "
        f"<= {trainer.micro_tokens or 'unlimited'} tokens per forward",
        flush=True,
    )
    batches = list(trainer._global_batches())
    for _, batch in batches[: args.warmup]:
        trainer.train_step(batch)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    start, tokens = time.perf_counter(), 0.0
    for _, batch in batches[args.warmup :]:
        tokens += trainer.train_step(batch)["tokens"]
    sync()
    elapsed = time.perf_counter() - start
    tps = tokens / elapsed
    mean_len = tokens / (2 * args.global_batch * args.steps)
    full, causal = flops_per_token(s, non_embedding, round(mean_len))
    result = {
        "device": device,
        "seq_len_mean": mean_len,
        "tokens_per_s": tps,
        "pairs_per_s": args.global_batch * args.steps / elapsed,
        "tflops": tps * full / 1e12,
        "tflops_causal": tps * causal / 1e12,
        "peak_tflops": peak,
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "attention": attention,
        "packed": trainer.capture is not None,
        "token_budget": trainer.micro_tokens,
        "args": vars(args),
    }
    if peak:
        result["mfu"] = result["tflops"] / peak
        result["mfu_causal"] = result["tflops_causal"] / peak
    print(
        f"{device}: {tps:,.0f} training tokens/s ({result['pairs_per_s']:.1f} pairs/s, mean length "
        f"{mean_len:.0f}), {result['tflops']:.1f} TFLOP/s"
        + (f", MFU {result['mfu']:.1%} (causal-attention count {result['mfu_causal']:.1%})" if peak else "")
        + f", peak memory {result['max_memory_gib']:.1f} GiB"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
