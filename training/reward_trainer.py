"""Bradley–Terry reward-model trainer: one process, DDP or FSDP under torchrun.

A step takes `global_batch_size` pairs. They are sorted by length and dealt to the ranks,
and each rank cuts its share into micro-batches under a token budget (auto by default:
training/batching.py), padded to similar lengths or packed padding-free into one row
(training/packing.py). Chosen and rejected rows of a micro-batch go through one forward; the
loss of each pair, -log sigmoid(r_c - r_r - margin) (+ centering), is divided by the
global batch size, so accumulation and data parallelism give the gradient of the mean
over the global batch whatever the micro-batch or world size.

Resumability: the data order is a function of (seed, epoch), so a checkpoint needs only the
step number besides weights, optimizer, scheduler and RNG states. Checkpoints are written
to a temporary folder and renamed, so a SIGKILL never leaves a half-written one behind.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from synpref.shared.batched_rewards import pad_batch
from synpref.shared.modeling import resolve_device
from synpref.training.batching import (
    EncodedPair,
    bt_loss,
    check_finite,
    lr_lambda,
    micro_batches,
    packed_micro_batches,
    rank_share,
    step_order,
)
from synpref.training.checkpointing import (
    check_source,
    data_order,
    full_state_dict,
    latest_checkpoint,
    optimizer_state,
    prune_checkpoints,
    remove_checkpoints,
    remove_partial_saves,
    restore_state,
    rng_state,
    write_checkpoint,
)
from synpref.training.data_cache import prepare_data
from synpref.training.evaluation import reward_metrics
from synpref.training.model_setup import init_distributed, load_for_training, micro_batch_plan, uses_bf16
from synpref.training.packing import packed_rewards
from synpref.training.reward_config import RewardConfig
from synpref.training.token_store import pair_tokens, pair_widths

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What `RewardTrainer.train` returns.

    Attributes:
        checkpoint_dir: the final HF checkpoint (model, tokenizer, chat template), output_dir/final.
        metrics: the final eval metrics plus a train summary (steps, pairs/s, tokens/s, unfit pairs).
    """

    checkpoint_dir: Path
    """Final HF checkpoint (model, tokenizer, chat template)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Final eval metrics plus a train summary (steps, pairs/s, tokens/s, unfit pairs)."""


class RewardTrainer:
    """Train a num_labels=1 sequence classifier with the Bradley–Terry loss.

    Pass pairs directly (train_pairs / eval_pairs) or let the config's files be read.
    """

    def __init__(
        self, config: RewardConfig, train_pairs: list[dict] | None = None, eval_pairs: list[dict] | None = None
    ) -> None:
        self.config = config
        self.rank, self.world, self.local_rank = init_distributed()
        self.device = torch.device(self._device_name())
        self.is_main = self.rank == 0
        self.out = Path(config.output_dir)
        self.metrics_path = self.out / "metrics.jsonl"
        if train_pairs is None and not config.train_files:
            raise ValueError("no train_files given")
        self._load_model()
        data = prepare_data(config, self.tokenizer, self.out, train_pairs, eval_pairs)
        # Compact arrays, memory-mapped from output_dir/token_cache when read from files.
        self.train_data, self.eval_enc, self.data_report = data.train.pairs, data.eval, data.report
        self.token_cache = data.folder
        if config.global_batch_size < self.world:
            raise ValueError(f"global_batch_size {config.global_batch_size} < {self.world} processes")
        if len(self.train_data) < config.global_batch_size:
            raise ValueError(
                f"{len(self.train_data)} usable training pairs < global_batch_size {config.global_batch_size}"
            )
        self.widths = pair_widths(self.train_data)
        self.data_order = data_order(self.train_data, config)
        self.steps_per_epoch = len(self.train_data) // config.global_batch_size
        self.total_steps = (
            config.max_steps if config.max_steps > 0 else max(1, math.floor(config.num_epochs * self.steps_per_epoch))
        )
        self._build_optimizer()
        self.step = 0

    # ------------------------------------------------------------ setup

    def _device_name(self) -> str:
        device = resolve_device(self.config.device)
        if device == "cuda":
            torch.cuda.set_device(self.local_rank)
            return f"cuda:{self.local_rank}"
        return device

    def _load_model(self) -> None:
        cfg = self.config
        if self.is_main:  # a save a kill interrupted is finished before any rank lists the checkpoints
            remove_partial_saves(self.out)
        if self.world > 1:
            dist.barrier()
        self.resume_from = latest_checkpoint(self.out) if cfg.resume else None
        if self.resume_from is None:
            check_source(cfg.model_name_or_path, self.out)
        source = str(self.resume_from) if self.resume_from else cfg.model_name_or_path
        loaded = load_for_training(cfg, source, self.device, self.world)
        self.model, self.wrapped, self.tokenizer = loaded.model, loaded.wrapped, loaded.tokenizer
        self.pad_id, self.strategy, self.n_params = loaded.pad_id, loaded.strategy, loaded.n_params
        self.forward_kwargs, self.capture = loaded.forward_kwargs, loaded.capture
        self.micro_pairs, self.micro_tokens = micro_batch_plan(cfg, loaded, self.device, self.world)

    def _autocast(self):
        # FSDP casts through its mixed-precision policy.
        if uses_bf16(self.config.precision, self.device) and self.strategy != "fsdp":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _build_optimizer(self) -> None:
        cfg = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            params,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
            weight_decay=cfg.weight_decay,
            fused=fused,
        )
        warmup = round(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.lr_scheduler, warmup, self.total_steps)
        )

    # ------------------------------------------------------------ the loop

    def _global_batches(self) -> Iterator[tuple[int, list[int]]]:
        cfg = self.config
        lengths = self.widths if cfg.group_by_length else None
        epoch, cached = -1, None
        for step in range(self.step, self.total_steps):
            if cached is None or step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                cached = step_order(
                    len(self.train_data), cfg.seed, epoch, cfg.global_batch_size, lengths, cfg.group_window
                )
            yield step, cached[step % self.steps_per_epoch]

    def _forward(self, module: Any, pairs: Sequence[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        with self._autocast():
            if self.capture is not None:
                rewards = packed_rewards(module, self.capture, seqs, self.device, self.forward_kwargs)
            else:
                ids, mask = pad_batch(seqs, self.pad_id, self.device)
                rewards = module(input_ids=ids, attention_mask=mask, **self.forward_kwargs).logits[:, 0]
        # bf16 logits are scored in fp32; fp64 runs keep their precision end to end.
        rewards = rewards if rewards.dtype == torch.float64 else rewards.float()
        return rewards[: len(pairs)], rewards[len(pairs) :]

    def _micro_batches(self, share: list[int], encoded: Sequence[EncodedPair], pairs: int) -> list[list[int]]:
        """Indices into `encoded`: packed rows under the token budget, or padded length-sorted groups."""
        if self.capture is not None:
            return packed_micro_batches(share, pair_tokens(encoded), self.micro_tokens, pairs)
        return micro_batches(share, pair_widths(encoded), pairs, self.micro_tokens)

    def _max_over_fsdp_ranks(self, n: int) -> int:
        """Max of n over ranks under FSDP, whose collectives need every rank in every forward/backward."""
        if self.world == 1 or self.strategy != "fsdp":
            return n
        t = torch.tensor([n], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def train_step(self, batch: list[int]) -> dict[str, float]:
        """One optimizer step on a global batch (indices into the training data).

        This rank's share runs as micro-batches with gradients accumulated; returns the batch's mean
        loss and accuracy, its tokens, the gradient norm before clipping (0.0 when max_grad_norm <= 0)
        and the learning rate used.
        """
        cfg = self.config
        share = rank_share(batch, self.widths, self.rank, self.world)
        micros = self._micro_batches(share, self.train_data, self.micro_pairs)
        # DDP averages gradients over ranks (FSDP's reduce-scatter too); per-pair losses are divided by the
        # global batch, so scale back up by the world size to get the mean over the global batch.
        scale = self.world / len(batch)
        # loss sum, correct, non-pad tokens; kept on the device so the GPU never waits on the host
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        # FSDP needs every rank in every pass: a rank short of micro-batches reruns its shortest pair, loss x 0.
        real = len(micros)
        micros += [share[-1:]] * (self._max_over_fsdp_ranks(real) - real)
        for k, micro in enumerate(micros):
            pairs = [self.train_data[i] for i in micro]
            sync = nullcontext() if k == len(micros) - 1 or self.strategy != "ddp" else self.wrapped.no_sync()
            with sync:
                r_c, r_r = self._forward(self.wrapped, pairs)
                margin = (
                    torch.tensor([p.margin for p in pairs], device=self.device, dtype=r_c.dtype)
                    if cfg.margin_column
                    else None
                )
                per_pair = bt_loss(r_c, r_r, margin, cfg.center_rewards_coefficient)
                (per_pair.sum() * (scale if k < real else 0.0)).backward()
            if k < real:
                totals[0] += per_pair.detach().sum()
                totals[1] += (r_c > r_r).sum()
                totals[2] += sum(p.tokens for p in pairs)
        if self.world > 1:
            dist.all_reduce(totals)
        grad_norm = 0.0
        if cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm))
        check_finite(self.step + 1, totals[0], grad_norm)  # before the update; all-reduced: every rank raises
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        n = len(batch)
        loss_sum, correct, tokens = totals.tolist()
        return {
            "loss": loss_sum / n,
            "accuracy": correct / n,
            "tokens": tokens,
            "grad_norm": grad_norm,
            "lr": lr,
        }

    def train(self) -> TrainResult:
        """Run the steps left up to `total_steps` (after loading the checkpoint `config.resume` found).

        Every logging_steps the main rank appends to output_dir/metrics.jsonl; every eval_steps the
        eval pairs (if any) are evaluated and every save_steps a checkpoint is saved. At the end the
        eval pairs are evaluated once more and the model is saved to output_dir/final.
        """
        cfg = self.config
        if self.resume_from is not None:
            mmap = self.strategy == "fsdp" or self.device.type != "cpu"
            run = (self.model, self.optimizer, self.scheduler, self.strategy, self.rank)
            self.step = restore_state(self.resume_from, *run, mmap=mmap, order=self.data_order)
        elif self.is_main:
            remove_checkpoints(self.out)  # this run's must be the newest a resume finds
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._log(
                {
                    "event": "start",
                    "step": self.step,
                    "total_steps": self.total_steps,
                    "world": self.world,
                    "strategy": self.strategy,
                    "params": self.n_params,
                    "packed": self.capture is not None,
                    "micro_batch_pairs": self.micro_pairs,
                    "micro_batch_tokens": self.micro_tokens,
                    "resumed_from": str(self.resume_from or ""),
                    **self.data_report,
                }
            )
        bar = None
        if cfg.progress and self.is_main:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step")
        t0, cpu0, pairs_done, tokens_done, window = time.perf_counter(), time.process_time(), 0, 0.0, []
        for step, batch in self._global_batches():
            stats = self.train_step(batch)
            self.step = step + 1
            pairs_done += len(batch)
            tokens_done += stats["tokens"]
            if self.is_main:  # only rank 0 logs and empties the window (else ~400 B a step, held for the run)
                window.append(stats)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", acc=f"{stats['accuracy']:.2f}")
            if self.is_main and (self.step % max(1, cfg.logging_steps) == 0 or self.step == self.total_steps):
                elapsed = time.perf_counter() - t0
                self._log(
                    {
                        "event": "train",
                        "step": self.step,
                        "epoch": self.step / self.steps_per_epoch,
                        "lr": window[-1]["lr"],
                        "loss": sum(s["loss"] for s in window) / len(window),
                        "accuracy": sum(s["accuracy"] for s in window) / len(window),
                        "grad_norm": window[-1]["grad_norm"],
                        "pairs_per_s": pairs_done / elapsed,
                        "tokens_per_s": tokens_done / elapsed,
                    }
                )
                window = []
            if (
                cfg.eval_steps
                and self.step % cfg.eval_steps == 0
                and self.step < self.total_steps
                and self.eval_enc.pairs
            ):
                self.evaluate()
            if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t0
        summary = {
            "steps": self.step,
            "train_seconds": elapsed,
            "train_cpu_seconds": time.process_time() - cpu0,
            "pairs_per_s": pairs_done / max(elapsed, 1e-9),
            "tokens_per_s": tokens_done / max(elapsed, 1e-9),
            **self.data_report,
        }
        metrics = self.evaluate() if self.eval_enc.pairs else {}
        final = self.save_model(self.out / "final")
        result = TrainResult(checkpoint_dir=final, metrics={**summary, **metrics})
        if self.is_main:
            self._log({"event": "done", **result.metrics, "checkpoint_dir": str(final)})
            if self.token_cache is not None and not cfg.keep_token_cache:
                # ~4 bytes a token for resumes; each loop iteration's run would otherwise leave one behind.
                shutil.rmtree(self.token_cache, ignore_errors=True)
        return result

    # ------------------------------------------------------------ eval

    def rewards(self, encoded: Sequence[EncodedPair]) -> list[tuple[float, float]]:
        """(r_c, r_r) for encoded pairs; every rank computes a share, all get the whole list."""
        chosen, rejected = self.reward_arrays(encoded)
        return list(zip(chosen.tolist(), rejected.tolist(), strict=True))

    def reward_arrays(self, encoded: Sequence[EncodedPair]) -> tuple[np.ndarray, np.ndarray]:
        """float64 r_c and r_r of encoded pairs. Rank k scores pairs k, k + world, ...; every rank gets the
        whole arrays by one tensor gather (16 bytes a pair), not Python objects pickled through the group."""
        cfg = self.config
        self.model.eval()
        # This rank's pairs, widest first (stable: sorted() by -width did the same, with a key object per pair).
        order = np.argsort(-np.asarray(pair_widths(encoded))[self.rank :: self.world], kind="stable")
        groups = self._micro_batches(
            (order * self.world + self.rank).tolist(), encoded, max(1, cfg.eval_batch_size // 2)
        )
        share = torch.zeros(2, -(-len(encoded) // self.world), dtype=torch.float64)
        module = self.wrapped if self.strategy == "fsdp" else self.model
        n_batches = self._max_over_fsdp_ranks(len(groups))  # ranks short of batches run encoded[0]
        with torch.inference_mode():
            for b in range(n_batches):
                idx = groups[b] if b < len(groups) else []
                pairs = [encoded[i] for i in idx] or [encoded[0]]
                r_c, r_r = self._forward(module, pairs)
                if idx:
                    slots = torch.tensor(idx, dtype=torch.int64) // self.world
                    share[:, slots] = torch.stack((r_c, r_r)).cpu().double()
        self.model.train()
        if self.world == 1:
            out = share.numpy()
            return out[0], out[1]
        on = self.device if dist.get_backend() == "nccl" else torch.device("cpu")  # gloo gathers host tensors
        parts = [torch.empty_like(share, device=on) for _ in range(self.world)]
        dist.all_gather(parts, share.to(on))
        out = np.empty((2, len(encoded)), dtype=np.float64)
        for rank, part in enumerate(parts):
            out[:, rank :: self.world] = part[:, : len(range(rank, len(encoded), self.world))].cpu().numpy()
        return out[0], out[1]

    def evaluate(self) -> dict[str, Any]:
        """Pairwise metrics of the eval pairs, keys prefixed "eval_", with their truncated and unfit counts;
        logged to metrics.jsonl by the main rank.
        """
        store = self.eval_enc.pairs
        found = reward_metrics(*self.reward_arrays(store), np.asarray(store.sources), store.source_names)
        metrics = {f"eval_{k}": v for k, v in found.items()}
        metrics["eval_truncated_pairs"] = self.eval_enc.truncated
        metrics["eval_unfit_pairs"] = self.eval_enc.unfit
        if self.is_main:
            self._log({"event": "eval", "step": self.step, **metrics})
        return metrics

    # ------------------------------------------------------------ checkpoints

    def save_model(self, path: Path, extra: dict[str, Any] | None = None) -> Path:
        """Write an HF checkpoint atomically (tmp folder, then rename); returns its path."""
        state = full_state_dict(self.model, self.strategy)
        optim = optimizer_state(self.model, self.optimizer, self.strategy) if extra is not None else None
        rng: list[Any] = [None] * self.world
        if extra is not None and self.world > 1:
            dist.all_gather_object(rng, rng_state())
        elif extra is not None:
            rng = [rng_state()]
        if self.is_main:
            resume = None
            if extra is not None:
                resume = {**extra, "optimizer": optim, "scheduler": self.scheduler.state_dict(), "rng": rng}
            write_checkpoint(path, self.model, self.tokenizer, state, resume)
        if self.world > 1:
            dist.barrier()
        return path

    def save_checkpoint(self) -> Path:
        """Save output_dir/checkpoint-{step} with the state to resume from (optimizer, scheduler, step, config,
        data order, every rank's RNG), keep only the newest save_total_limit (when > 0); returns its path."""
        path = self.save_model(
            self.out / f"checkpoint-{self.step}",
            extra={"step": self.step, "world": self.world, "config": self.config.to_dict(), "order": self.data_order},
        )
        if self.is_main and self.config.save_total_limit > 0:
            prune_checkpoints(self.out, self.config.save_total_limit)
        return path

    def _log(self, record: dict[str, Any]) -> None:
        record = {"time": time.time(), **record}
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        log.info("%s", json.dumps(record))


def train_reward_model(
    config: RewardConfig, train_pairs: list[dict] | None = None, eval_pairs: list[dict] | None = None
) -> TrainResult:
    """Train (or resume) per `config`; the curation controller's entry point."""
    return RewardTrainer(config, train_pairs, eval_pairs).train()
