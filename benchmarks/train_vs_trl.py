"""SynPref's RewardTrainer against TRL's RewardTrainer, side by side on this machine's CPU.

Same ~5M-parameter Qwen3-shaped decoder (random weights, one saved copy both start from),
same real pairs (hh-rlhf harmless-base test; the conversation is the shared prefix up to the
last "\\n\\nAssistant:"), same fixed-seed 80/20 split, same max length (pairs longer than
it are left out for both, since TRL would filter them), same global batch, optimizer,
schedule, seed and number of steps. Both run in fp32 (TRL's bf16 default is ~17x slower
on CPUs without bf16 units) without gradient checkpointing (pointless for a 5M model).
Both final models are scored on the held-out pairs by the same code.

SynPref runs with its defaults (automatic token budget, packing auto) unless a SynPref-only
flag below is given, so the comparison is what a user who sets nothing gets.
Prints pairs/s and non-pad tokens/s of each training loop, their ratio, and eval accuracy.
Rates are given per CPU second of the process (with one torch thread, the work done, which
other jobs on a shared machine do not inflate) and per wall second.

    .venv/bin/python benchmarks/train_vs_trl.py --steps 20 --order synpref,trl,trl,synpref
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

# testing/ (tiny models: test support, not installed) lives at the repo root.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

HH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(HH))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--global-batch", type=int, default=16)
    # SynPref-only knobs: unset, the trainer's defaults apply (what a user who sets nothing gets).
    p.add_argument("--micro-batch", type=int, help="SynPref: most pairs per forward (default: the trainer's)")
    p.add_argument("--micro-tokens", type=int, help="SynPref: token budget per forward (default: auto)")
    p.add_argument("--packing", choices=["auto", "on", "off"], help="SynPref: packing (default: auto)")
    p.add_argument("--group-by-length", action="store_true", help="SynPref: length-grouped steps")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 makes CPU seconds a clean measure)")
    p.add_argument("--order", default="synpref,trl", help="run order, e.g. synpref,trl,trl,synpref (ABBA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--trl-sampling",
        default="random",
        choices=["random", "group_by_length"],
        help="TRL's train_sampling_strategy (its default is random)",
    )
    p.add_argument("--only", choices=["synpref", "trl"], help="run one side only")
    p.add_argument("--json", help="also write the figures here")
    return p.parse_args()


def build_model(root: Path, pairs: list[dict], seed: int) -> Path:
    from testing.tiny import build_tiny_reward_model

    texts = [m["content"] for p in pairs for k in ("conversation", "chosen", "rejected") for m in p[k]]
    # hidden 256, 4 layers, GQA 4/2 heads, MLP 768, vocab 8k: about 5M parameters.
    return build_tiny_reward_model(
        root / "model",
        arch="qwen3",
        layers=4,
        hidden=256,
        heads=4,
        kv_heads=2,
        intermediate=768,
        vocab_size=8192,
        texts=texts,
        max_positions=4096,
        seed=seed,
    )


def fitting(pairs: list[dict], tokenizer, max_length: int) -> list[dict]:
    from synpref.shared.modeling import encode_pair

    out = []
    for pair in pairs:
        c, r = encode_pair(tokenizer, pair, max_length, truncation="none")
        if c.fits and r.fits:
            out.append(pair)
    return out


def run_synpref(model: Path, train: list[dict], args: argparse.Namespace, out: Path) -> dict:
    from synpref.training.reward_config import RewardConfig
    from synpref.training.reward_trainer import RewardTrainer

    own = {
        "micro_batch_size": args.micro_batch,
        "max_tokens_per_micro_batch": args.micro_tokens,
        "packing": args.packing,
        "group_by_length": args.group_by_length or None,
    }
    cfg = RewardConfig(
        **{k: v for k, v in own.items() if v is not None},
        model_name_or_path=str(model),
        output_dir=str(out),
        global_batch_size=args.global_batch,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler="linear",
        max_length=args.max_length,
        truncation="none",
        seed=args.seed,
        max_grad_norm=1.0,
        logging_steps=10,
        progress=False,
        precision="fp32",
        resume=False,
    )
    start = time.perf_counter()
    trainer = RewardTrainer(cfg, train, [])
    print(
        f"synpref plan: packed={trainer.capture is not None}, <= {trainer.micro_pairs} pairs and "
        f"<= {trainer.micro_tokens or 'unlimited'} tokens per forward, group_by_length={cfg.group_by_length}",
        flush=True,
    )
    result = trainer.train()
    total = time.perf_counter() - start
    m = result.metrics
    return {
        "train_seconds": m["train_seconds"],
        "cpu_seconds": m["train_cpu_seconds"],
        "pairs": args.steps * args.global_batch,
        "tokens": m["tokens_per_s"] * m["train_seconds"],
        "wall_seconds_incl_setup": total,
        "checkpoint": str(result.checkpoint_dir),
    }


def run_trl(model: Path, train: list[dict], args: argparse.Namespace, out: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    rows = [{"prompt": p["conversation"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in train]
    cfg = RewardConfig(
        output_dir=str(out),
        per_device_train_batch_size=args.global_batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_length=args.max_length,
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        max_grad_norm=1.0,
        seed=args.seed,
        data_seed=args.seed,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        logging_steps=10,
        disable_tqdm=True,
        dataloader_num_workers=0,
        train_sampling_strategy=args.trl_sampling,
    )
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model)
    net = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1, dtype=torch.float32)
    trainer = RewardTrainer(model=net, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    cpu0 = time.process_time()
    output = trainer.train()
    cpu = time.process_time() - cpu0
    final = out / "final"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(str(final))
    total = time.perf_counter() - start
    return {
        "train_seconds": output.metrics["train_runtime"],
        "cpu_seconds": cpu,
        "pairs": args.steps * args.global_batch,
        "tokens": float(trainer._total_train_tokens),
        "wall_seconds_incl_setup": total,
        "checkpoint": str(final),
    }


def accuracy(checkpoint: str, pairs: list[dict], max_length: int) -> float:
    from synpref.shared.modeling import load_reward_model, score_pairs

    model, tok = load_reward_model(checkpoint)
    rewards = score_pairs(model, tok, pairs, max_length=max_length, batch_size=32, truncation="none")
    return sum(c > r for c, r in rewards) / len(rewards)


def main() -> int:
    args = parse()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from synpref.training.data import load_hh_rlhf, split_pairs

    read = load_hh_rlhf(args.data)
    train_all, eval_all = split_pairs(read.pairs, 0.2, seed=args.seed)
    root = Path(tempfile.mkdtemp(prefix="bench-trl-"))
    model = build_model(root, train_all, args.seed)
    tok = AutoTokenizer.from_pretrained(model)
    train, evals = fitting(train_all, tok, args.max_length), fitting(eval_all, tok, args.max_length)
    n_params = sum(
        p.numel()
        for p in __import__("transformers").AutoModelForSequenceClassification.from_pretrained(model).parameters()
    )
    print(
        f"data: {len(read.pairs)} hh-rlhf pairs ({len(read.problems)} unusable rows), split 80/20 by conversation;"
        f" {len(train)} train / {len(evals)} eval fit max_length={args.max_length}"
    )
    print(
        f"model: Qwen3-shaped, {n_params / 1e6:.2f}M parameters, fp32, {args.threads} threads; "
        f"{args.steps} steps x {args.global_batch} pairs, lr {args.lr} linear, seed {args.seed}"
    )
    runs: dict[str, list[dict]] = {"synpref": [], "trl": []}
    runners = {"synpref": run_synpref, "trl": run_trl}
    for k, name in enumerate(args.order.split(",")):
        if args.only and args.only != name:
            continue
        r = runners[name](model, train, args, root / f"{name}{k}")
        for clock in ("train_seconds", "cpu_seconds"):
            r[f"pairs_per_{clock}"] = r["pairs"] / r[clock]
            r[f"tokens_per_{clock}"] = r["tokens"] / r[clock]
        r["eval_accuracy"] = accuracy(r["checkpoint"], evals, args.max_length)
        runs[name].append(r)
        print(
            f"{name:8s} wall {r['train_seconds']:7.1f} s  cpu {r['cpu_seconds']:7.1f} s | per CPU second: "
            f"{r['pairs_per_cpu_seconds']:5.2f} pairs, {r['tokens_per_cpu_seconds']:6.0f} non-pad tokens | per wall "
            f"second: {r['pairs_per_train_seconds']:5.2f} pairs, {r['tokens_per_train_seconds']:6.0f} tokens | "
            f"eval acc {r['eval_accuracy']:.3f} ({len(evals)} pairs)",
            flush=True,
        )
    results = {}
    for name, rs in runs.items():
        if rs:
            results[name] = {key: sum(r[key] for r in rs) / len(rs) for key in rs[0] if key != "checkpoint"}
    if len(results) == 2:
        s, t = results["synpref"], results["trl"]
        for clock in ("cpu_seconds", "train_seconds"):
            pairs = s[f"pairs_per_{clock}"] / t[f"pairs_per_{clock}"]
            tokens = s[f"tokens_per_{clock}"] / t[f"tokens_per_{clock}"]
            print(
                f"ratio synpref/trl (per {clock}, mean of runs): pairs/s {pairs:.2f}x, non-pad tokens/s {tokens:.2f}x"
            )
        print(f"eval accuracy synpref {s['eval_accuracy']:.3f} vs trl {t['eval_accuracy']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "mean": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
