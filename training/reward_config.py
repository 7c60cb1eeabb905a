"""RewardConfig: every knob of Bradley–Terry reward-model training, in one dataclass.

Each field carries its help text, so the YAML file, the `--set key=value` overrides and
`synpref train --help-config` all describe the same thing. Two presets reproduce the
Skywork-Reward-V2 recipes: `dev` (lr 4e-6, global batch 256, linear decay, 1 epoch) and
`final` (lr 3e-6 constant, global batch 10,240).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PRESETS: dict[str, dict[str, Any]] = {
    # Paper: dev runs, 1e-6 for 8B backbones and 4e-6 for the smaller ones.
    "dev": {
        "learning_rate": 4e-6,
        "global_batch_size": 256,
        "lr_scheduler": "linear",
        "num_epochs": 1.0,
        "max_length": 16384,
    },
    "final": {
        "learning_rate": 3e-6,
        "global_batch_size": 10240,
        "lr_scheduler": "constant",
        "num_epochs": 1.0,
        "max_length": 16384,
    },
}


def _f(default: Any, help_: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help_}, **kw)


@dataclass
class RewardConfig:
    """Every knob of Bradley-Terry reward-model training; each field's help is in its metadata.

    Fields, grouped:
        model: model_name_or_path, output_dir.
        data: train_files, eval_files, eval_fraction, split_seed, max_length, truncation,
            margin_column, encode_workers.
        optimisation: learning_rate, lr_scheduler, warmup_ratio, weight_decay, adam_beta1,
            adam_beta2, adam_epsilon, max_grad_norm, num_epochs, max_steps, global_batch_size,
            micro_batch_size, max_tokens_per_micro_batch, packing, center_rewards_coefficient,
            disable_dropout, seed.
        speed: group_by_length, group_window, precision, device, gradient_checkpointing,
            compile, distributed, fsdp_min_params.
        checkpoints, eval, logging: save_steps, save_total_limit, resume, eval_steps,
            eval_batch_size, logging_steps, progress.

    Construction validates: Literal-typed fields hold one of their choices, batch sizes, max_length
    and group_window are >= 1, max_tokens_per_micro_batch >= -1, eval_fraction and warmup_ratio are
    in [0, 1), num_epochs is finite and > 0 unless max_steps > 0; a single string for train_files or
    eval_files becomes a one-item list. Raises ValueError.
    """

    # --- model
    model_name_or_path: str = _f(
        "",
        "Checkpoint folder or hub id; loaded as AutoModelForSequenceClassification "
        "(num_labels=1). Decoders score the last non-pad token, encoders the [CLS].",
    )
    output_dir: str = _f("artifacts/rm", "Where checkpoint-N/, final/ and metrics.jsonl go.")
    # --- data
    train_files: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Training pairs: Parquet files or folders (the dataset writer's output), or "
            "JSONL(.gz) in the same shape: conversation/chosen/rejected message lists."
        },
    )
    eval_files: list[str] = field(
        default_factory=list,
        metadata={"help": "Explicit eval pairs. When empty, eval_fraction of train_files is held out."},
    )
    eval_fraction: float = _f(0.0, "Share of conversations held out for eval when eval_files is empty.")
    split_seed: int = _f(0, "Seed of the train/eval split (split by conversation, so no prompt is in both).")
    max_length: int = _f(4096, "Token limit of one sequence (conversation + response).")
    truncation: Literal["left_turns", "left_tokens", "right", "none"] = _f(
        "left_turns",
        "left_turns (cut old turns, keep the response whole), left_tokens, right "
        "or none. Pairs that still do not fit are skipped and counted.",
    )
    margin_column: str = _f("", "Optional column with a per-pair margin m: loss -log sigmoid(r_c - r_r - m).")
    encode_workers: int = _f(
        0,
        "Processes that tokenize the pairs into the token cache: 0 = one per usable CPU (at most 16), "
        "1 = in the trainer's process. The cache's ids do not depend on it.",
    )
    # --- optimisation
    learning_rate: float = _f(4e-6, "Peak AdamW learning rate.")
    lr_scheduler: Literal["constant", "linear"] = _f(
        "linear", "constant or linear (decay to 0 at the last step), both after warmup."
    )
    warmup_ratio: float = _f(0.0, "Share of steps spent warming the learning rate up linearly from 0.")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this; 0 disables clipping.")
    num_epochs: float = _f(1.0, "Passes over the training pairs (fractions allowed).")
    max_steps: int = _f(-1, "Optimizer steps; overrides num_epochs when > 0.")
    global_batch_size: int = _f(256, "Pairs per optimizer step, over all processes and accumulation steps.")
    micro_batch_size: int = _f(
        8,
        "Most pairs in one forward pass (chosen and rejected together: 2x rows). With the auto "
        "token budget on a GPU it sets the envelope instead: short pairs fill it with more pairs.",
    )
    max_tokens_per_micro_batch: int = _f(
        -1,
        "Cap on the tokens of one forward (both sides; padded, or real when packed). -1 = auto: "
        "2 x max_length (at least 1024) on CPU, 2 x max_length x micro_batch_size capped by "
        "free memory on GPU; 0 = no cap (a whole micro_batch_size padded to its longest).",
    )
    packing: Literal["auto", "on", "off"] = _f(
        "auto",
        "Padding-free packing of decoder RMs (many sequences in one row, position_ids restarting). "
        "auto = on with flash-attention (CUDA + flash_attn installed), else off: without a "
        "varlen kernel the block-diagonal mask costs more than the padding it removes.",
    )
    center_rewards_coefficient: float = _f(0.0, "Weight of the reward-centering term mean((r_c + r_r)^2); 0 = off.")
    disable_dropout: bool = _f(True, "Set every dropout probability to 0 (as TRL does for reward models).")
    seed: int = _f(42, "Seed of initialisation, data order and dropout.")
    # --- speed
    group_by_length: bool = _f(
        False,
        "Also group pairs of similar length into the same step (within windows of "
        "group_window steps), as HF Trainer does. Off by default: it changes which pairs share "
        "a step (so the training trajectory), while the token budget removes padding without that.",
    )
    group_window: int = _f(32, "Steps per length-grouping window.")
    precision: Literal["auto", "bf16", "fp32", "fp64"] = _f(
        "auto",
        "auto (bf16 autocast on CUDA, fp32 on CPU), bf16 (autocast), fp32, or fp64 (weights and "
        "arithmetic in float64: slow, for numerical checks such as distributed-vs-single equality).",
    )
    device: str = _f("auto", "auto, cpu or cuda.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    compile: bool = _f(False, "torch.compile the model (dynamic shapes).")
    distributed: Literal["auto", "ddp", "fsdp"] = _f(
        "auto", "Under torchrun: auto (FSDP at >= fsdp_min_params, else DDP), ddp or fsdp."
    )
    fsdp_min_params: int = _f(1_000_000_000, "Parameter count from which auto picks FSDP.")
    # --- checkpoints, eval, logging
    save_steps: int = _f(0, "Save a resumable checkpoint every N steps; 0 = only the final model.")
    save_total_limit: int = _f(2, "Keep this many periodic checkpoints (oldest removed first).")
    resume: bool = _f(
        True,
        "Continue from the newest complete checkpoint in output_dir, if any (refused when it was trained on other "
        "data or in another order). A run that does not resume removes output_dir's earlier checkpoint-N folders.",
    )
    keep_token_cache: bool = _f(
        False, "Keep output_dir/token_cache once training ends (reruns on the same data skip encoding)."
    )
    eval_steps: int = _f(0, "Evaluate every N steps; 0 = only at the end.")
    eval_batch_size: int = _f(32, "Sequences per eval forward.")
    logging_steps: int = _f(10, "Write a metrics line every N steps.")
    progress: bool = _f(True, "Show a tqdm progress bar (rank 0).")

    def __post_init__(self) -> None:
        for name, allowed in literal_choices(type(self)).items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.max_tokens_per_micro_batch < -1:
            raise ValueError("max_tokens_per_micro_batch must be -1 (auto), 0 (no cap) or a token count")
        if self.encode_workers < 0:
            raise ValueError("encode_workers must be 0 (one per usable CPU) or a process count")
        if self.global_batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("global_batch_size and micro_batch_size must be >= 1")
        if not 0.0 <= self.eval_fraction < 1.0 or not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError("eval_fraction and warmup_ratio must be in [0, 1)")
        if self.max_length < 1:
            # "right" cut ids[:max_length]: a negative one silently dropped the end of every response.
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        if self.group_window < 1:
            # A negative window left the epoch's order uninitialised (garbage pair indices), 0 failed at the first
            # step, both only after the whole data set was encoded.
            raise ValueError(f"group_window must be >= 1, got {self.group_window}")
        if self.max_steps <= 0 and not (math.isfinite(self.num_epochs) and self.num_epochs > 0):
            # 0 or a negative count trained one step and saved it as the final model; NaN or inf failed only after
            # the data was encoded.
            raise ValueError(f"num_epochs must be a finite number > 0 (or set max_steps > 0), got {self.num_epochs}")
        if isinstance(self.train_files, str):
            self.train_files = [self.train_files]
        if isinstance(self.eval_files, str):
            self.eval_files = [self.eval_files]

    # ------------------------------------------------------------ loading

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Field name -> its help text."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RewardConfig:
        """A config from `values`: an optional "preset" key's values first, then the rest on top.

        Values are coerced to the field types (strings to int/float/bool, a string to a one-item
        list); unknown keys or presets, and a value that is no such type (a boolean other than
        true/false, yes/no, on/off, 1/0; a fractional count), raise ValueError.
        """
        values = dict(values)
        preset = values.pop("preset", None)
        if preset and preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
        merged: dict[str, Any] = dict(PRESETS[preset]) if preset else {}
        merged.update(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ValueError(f"unknown RewardConfig keys: {unknown}")
        hints = typing.get_type_hints(cls)
        for key, value in merged.items():
            merged[key] = _coerce(hints[key], value, key)
        return cls(**merged)

    @classmethod
    def load(
        cls, path: str | Path | None = None, overrides: list[str] | None = None, preset: str | None = None
    ) -> RewardConfig:
        """YAML file, then a preset (when given here), then `key=value` overrides (values parsed as YAML)."""
        values: dict[str, Any] = {}
        if path:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: expected a mapping at the top level")
            values.update(loaded)
        if preset:
            values["preset"] = preset
        for item in overrides or []:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ValueError(f"override {item!r} is not key=value")
            values[key.strip()] = yaml.safe_load(raw)
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        """Every field as a plain dict (dataclasses.asdict)."""
        return dataclasses.asdict(self)


def literal_choices(cls: type) -> dict[str, tuple[Any, ...]]:
    """Field name -> allowed values, for every field annotated with a Literal type.

    The annotations are the one list of choices: the check in __post_init__ reads them.
    """
    hints = typing.get_type_hints(cls)
    return {name: typing.get_args(hint) for name, hint in hints.items() if typing.get_origin(hint) is Literal}


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if typing.get_origin(hint) is list:
        if isinstance(value, str):
            return [value]
        return [str(v) for v in value]
    try:
        if hint is bool:
            return _boolean(value)
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("not a whole number")  # int() would truncate: save_steps 2.5 is no 2
        if hint in (int, float, str):
            return hint(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{key}: cannot read {value!r} as {hint.__name__}") from exc
    return value


def _boolean(value: Any) -> bool:
    # Strictly: a typo ("ture") read as False would silently turn an option off.
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true/false, yes/no, on/off or 1/0")
