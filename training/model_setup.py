"""Model side of the Bradley–Terry trainer's setup: process group, loading, packing choice,
DDP / FSDP / compile wrapping, and the micro-batch plan (pairs and tokens per forward).

Packing per device (docs/training.md): `packing: auto` loads decoders with flash-attention 2
when CUDA and the flash_attn package are there, and packs them (varlen kernels: no padding,
no square mask). Anywhere else auto keeps padded, length-sorted micro-batches under a token
budget: SDPA has no varlen kernel, and its block-diagonal mask over a packed row costs more
than the padding it removes. `packing: on` packs through SDPA's mask anyway (exact).
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from synpref.shared.modeling import ensure_pad_token
from synpref.training.batching import auto_token_budget, memory_token_cap
from synpref.training.packing import VARLEN_ATTENTION, ScoreCapture, flash_attention_installed, packing_problem
from synpref.training.reward_config import RewardConfig

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model loaded and wrapped for training, with what the trainer needs beside it.

    Attributes:
        model: the plain module: saving and eval go through it.
        wrapped: what the training forward calls (DDP / FSDP / compiled, or the model itself).
        tokenizer: the model's tokenizer.
        pad_id: the token id batches are padded with.
        strategy: "single", "ddp" or "fsdp".
        n_params: parameters of the whole (unsharded) model.
        forward_kwargs: extra arguments of every forward ({"use_cache": False} where the model takes it).
        capture: the packed rewards' score capture, or None for padded micro-batches.
    """

    model: Any
    """The plain module: saving and eval go through it."""
    wrapped: Any
    """What the training forward calls (DDP / FSDP / compiled, or the model itself)."""
    tokenizer: Any
    pad_id: int
    strategy: str
    n_params: int
    forward_kwargs: dict[str, Any]
    capture: ScoreCapture | None
    """Set when sequences are packed: reads the score head's per-token output."""


def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); joins the process group (NCCL on CUDA, else gloo) when
    WORLD_SIZE > 1, and (0, 1, 0) for a single process.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether the forward runs in bf16: precision "bf16", or "auto" on a CUDA device."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def _from_pretrained(source: str, dtype: torch.dtype, flash: bool) -> Any:
    from transformers import AutoModelForSequenceClassification

    if flash:
        try:
            return AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=1, dtype=dtype, attn_implementation="flash_attention_2"
            )
        except (ImportError, ValueError) as exc:  # an architecture without flash-attention support
            log.info("flash-attention 2 not used: %s", exc)
    return AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=dtype)


def _choose_packing(cfg: RewardConfig, model: Any) -> bool:
    if cfg.packing == "off":
        return False
    if cfg.packing == "on":
        if problem := packing_problem(model):
            raise ValueError(f"packing: on, but {problem}")
        return True
    return getattr(model.config, "_attn_implementation", "") in VARLEN_ATTENTION and not packing_problem(model)


def load_for_training(cfg: RewardConfig, source: str, device: torch.device, world: int) -> LoadedModel:
    """Load `source` (a hub id or folder, or the checkpoint to resume) and its tokenizer as a
    one-label sequence classifier on `device`, in fp64 for precision "fp64" else fp32, seeded with `cfg.seed`.

    Dropout is disabled and gradient checkpointing enabled as `cfg` asks, packing is chosen (with
    flash-attention 2 when `cfg.packing` allows it on CUDA in bf16 and flash_attn is installed), and with
    `world` > 1 the model is wrapped in DDP, or sharded with FSDP (`cfg.distributed`, or "auto"
    from `cfg.fsdp_min_params`); `cfg.compile` compiles the result.
    """
    from transformers import AutoTokenizer

    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(source)
    dtype = torch.float64 if cfg.precision == "fp64" else torch.float32
    # Flash-attention kernels take bf16/fp16 only: an fp32 or fp64 run loaded with them failed in its first forward.
    flash = cfg.packing != "off" and device.type == "cuda" and uses_bf16(cfg.precision, device)
    flash = flash and flash_attention_installed()
    model = _from_pretrained(source, dtype, flash)
    pad_id = ensure_pad_token(model, tokenizer)
    if cfg.disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    if cfg.gradient_checkpointing:
        # transformers 5 renamed it; older releases (>= 4.51, as pyproject allows) only have the old name.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.to(device)
    model.train()
    # The hook goes on before any wrapping, so DDP, FSDP and compile all see it.
    capture = ScoreCapture(model.score, model.config.pad_token_id) if _choose_packing(cfg, model) else None
    # Decoders would otherwise build a KV cache in every training forward.
    forward_kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    n_params = sum(p.numel() for p in model.parameters())
    strategy, wrapped = "single", model
    if world > 1:
        use_fsdp = cfg.distributed == "fsdp" or (cfg.distributed == "auto" and n_params >= cfg.fsdp_min_params)
        strategy = "fsdp" if use_fsdp else "ddp"
        if use_fsdp:
            shard_fsdp(model, uses_bf16(cfg.precision, device))
        else:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            wrapped = DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        wrapped = torch.compile(wrapped, dynamic=True)
    return LoadedModel(model, wrapped, tokenizer, pad_id, strategy, n_params, forward_kwargs, capture)


def shard_fsdp(model: Any, bf16: bool) -> None:
    """Shard `model` with FSDP2: each of its `_no_split_modules` blocks, then the root; `bf16` computes in
    bf16 and reduces gradients in fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    policy = policy or MixedPrecisionPolicy()  # the default casts nothing
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def micro_batch_plan(cfg: RewardConfig, loaded: LoadedModel, device: torch.device, world: int) -> tuple[int, int]:
    """(most pairs, most tokens) of one training forward; tokens 0 = no cap.

    An explicit max_tokens_per_micro_batch (>= 0) is used as given, with micro_batch_size as
    the pair cap. Auto (-1) derives the budget (batching.auto_token_budget); on a GPU the
    budget alone bounds a forward, so short pairs run more to a forward.
    """
    if cfg.max_tokens_per_micro_batch >= 0:
        return cfg.micro_batch_size, cfg.max_tokens_per_micro_batch
    memory = 0
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        config = loaded.model.config
        params = loaded.n_params // world if loaded.strategy == "fsdp" else loaded.n_params
        memory = memory_token_cap(
            free, params, config.num_hidden_layers, config.hidden_size, cfg.gradient_checkpointing
        )
    budget = auto_token_budget(cfg.max_length, cfg.micro_batch_size, device.type, memory)
    pairs = cfg.micro_batch_size if device.type == "cpu" else max(1, budget // 2)
    return pairs, budget
