"""Forward-pass backends behind one interface, chosen by `scorer.backend`.

- `torch`: transformers AutoModelForSequenceClassification through shared.modeling (the
  loader the trainer uses): fp32 on CPU; on CUDA bf16 weights (dtype auto) and SDPA
  attention. Reward = logits[:, 0] at each sequence's last real token.
- `vllm`: vLLM's pooling runner (`LLM.classify`) with the activation turned off, so a
  one-label head returns its raw logit and not sigmoid(logit). vLLM is an optional extra
  (`pip install synpref[vllm]`), imported only when chosen; it cannot be installed on the
  development machines, so this backend has not been run here (see docs/scorer.md).

Both take token ids, never text: the server tokenizes once (encoding.py) and owns the
chat template and BOS handling whatever the backend.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Backend(Protocol):
    """A loaded reward model: raw rewards for token-id lists.

    Attributes:
        kind: "torch" or "vllm".
        dtype: the weights' dtype name, as /info reports it.
        tokenizer: the model's tokenizer, used by the encoder.
        max_positions: optional; the most tokens the model can embed (position_limit), when it has a limit:
            the server's max_length is capped to it.
    """

    kind: str
    dtype: str
    tokenizer: Any

    def forward(self, batch: list[list[int]]) -> list[float]:
        """One raw reward per id list; runs on the batcher's thread."""
        ...

    def close(self) -> None:
        """Free the model (and its GPU memory)."""
        ...


def resolve_device(device: str) -> str:
    """ "auto" becomes "cuda" when a GPU is visible, else "cpu"; any other value is returned as is."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class TorchBackend:
    """A transformers sequence-classification reward model run in-process with torch.

    Batches of a causal model skip the attention mask when a probe shows right padding does
    not change its rewards (see `_right_padding_is_invisible`). With `compile`, forwards run
    through torch.compile (see `_compile`); `compiled` says whether they do.
    """

    kind = "torch"

    def __init__(self, path: str, device: str = "auto", dtype: str = "auto", compile: bool = False) -> None:
        import torch

        from synpref.shared.modeling import load_reward_model

        self.device = resolve_device(device)
        self.model, self.tokenizer = load_reward_model(path, self.device, dtype)
        self.model.eval()
        self.dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        self._torch = torch
        self._run: Any = self.model
        self.causal = self._right_padding_is_invisible()
        self.compiled = compile and self._compile()
        self.max_positions = position_limit(self.model)

    def _right_padding_is_invisible(self) -> bool:
        """Can batches skip the attention mask?

        In a causal decoder, right padding comes after every real token, so no real token
        attends to it and the head reads the last real token (found through pad_token_id,
        not the mask). Dropping the mask then changes nothing but the attention kernel:
        SDPA may take its is_causal kernels (flash attention on GPU) instead of a masked
        one. Only models whose attention layers all declare themselves causal qualify
        (bidirectional encoders such as BERT do see the padding), and a probe batch must
        then score the same with and without the mask.
        """
        from synpref.shared.batched_rewards import reward_of

        flags = [m.is_causal for m in self.model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
        if not flags or not all(flags):
            return False
        probe = [[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7]]
        masked = reward_of(self.model, probe, self.pad_id)
        return self._same_rewards(masked, self._forward_unmasked(probe))

    def _same_rewards(self, want: list[float], got: list[float]) -> bool:
        """Equal up to this dtype's forward-to-forward rounding (1e-4 relative in fp32, 5e-2 in bf16/fp16)."""
        tol = 1e-4 if self.dtype == "float32" else 5e-2
        return all(abs(a - b) <= tol * max(1.0, abs(a)) for a, b in zip(want, got, strict=True))

    def _compile(self) -> bool:
        """Swap in torch.compile'd forwards (dynamic shapes), compiled now on probe batches so that
        requests never wait for a compilation, and kept only where they score the probes as the
        eager model does; False (eager kept, with a warning) when compiling fails or differs.

        Compiling fuses the small operators around the matrix products (norms, rotary, activations)
        and drops per-module Python dispatch: measured on CPU in docs/scorer.md. It costs tens of
        seconds per load and needs a C++ compiler on CPU (Triton on CUDA).
        """
        # A batch of 1 and a length of 1 are specialised by the compiler: each mix is its own graph.
        probes = [[[5]], [[5, 6, 7, 8, 9]], [[5], [6], [7]], [[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7]]]
        eager = [self.forward(probe) for probe in probes]
        try:
            # Instances of one architecture share graphs; each other shape of model (gold and best,
            # a reload of another size) adds its own ~4, past torch's default limit of 8 per code
            # object, beyond which forwards quietly run eager (cache_size_limit before torch 2.6).
            dynamo_config = self._torch._dynamo.config
            limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
            setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), 64))
            self._run = self._torch.compile(self.model, dynamic=True)
            for probe, want in zip(probes, eager, strict=True):
                got = self.forward(probe)
                if not self._same_rewards(want, got):
                    raise RuntimeError(f"compiled rewards {got} differ from eager {want} on probe {probe}")
        except Exception as exc:  # any compiler failure leaves a working eager model
            log.warning("scorer.compile: serving the eager model (%s: %s)", type(exc).__name__, exc)
            self._run = self.model
            return False
        return True

    def _forward_unmasked(self, batch: list[list[int]]) -> list[float]:
        from synpref.shared.batched_rewards import model_device, pad_batch

        ids, _ = pad_batch(batch, self.pad_id, model_device(self.model))
        with self._torch.inference_mode():
            logits = self._run(input_ids=ids).logits
        return [float(x) for x in logits[:, 0].float().cpu()]

    def forward(self, batch: list[list[int]]) -> list[float]:
        """One raw reward per id list (unmasked right-padded batches when the model is causal)."""
        from synpref.shared.batched_rewards import reward_of

        if self.causal:
            return self._forward_unmasked(batch)
        return reward_of(self._run, batch, self.pad_id)

    def close(self) -> None:
        """Drop the model and, on CUDA, empty the allocator cache."""
        # `_run` is the model itself (or its compiled wrapper): while it holds the weights, emptying
        # the cache frees nothing and the replaced version's memory stays reserved after a reload.
        del self.model
        self._run = None
        if self.device.startswith("cuda"):
            import gc

            gc.collect()  # a compiled model sits in reference cycles: free it before emptying the cache
            self._torch.cuda.empty_cache()


class VllmBackend:
    """vLLM pooling runner with the classifier activation off (raw logits).

    NOT RUN in this repository's tests: vLLM needs a CUDA build that these machines lack.
    """

    kind = "vllm"

    def __init__(self, path: str, device: str = "auto", dtype: str = "auto", max_length: int = 4096) -> None:
        # vLLM takes no device: it places the model on the first visible GPU. Another device named here
        # (cuda:1, cpu) would be silently ignored and the model served on a GPU the operator did not pick.
        if device not in ("auto", "cuda", "cuda:0"):
            raise ValueError(
                f"scorer.backend=vllm cannot place the model on device {device!r}: it uses the first visible GPU; "
                "set scorer.device to auto and pick the GPU with CUDA_VISIBLE_DEVICES"
            )
        try:
            import vllm  # noqa: F401  (optional extra)
            from vllm import LLM
        except ImportError as exc:  # pragma: no cover - depends on the optional extra
            raise RuntimeError("scorer.backend=vllm needs vLLM: pip install 'synpref[vllm]' on a CUDA machine") from exc
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.dtype = "bfloat16" if dtype == "auto" else dtype
        kwargs: dict[str, Any] = {"model": path, "dtype": self.dtype, "max_model_len": max_length}
        # The task/runner argument was renamed across vLLM releases (task="classify" up to
        # 0.10, runner="pooling" after); try the new name first.
        try:
            self.llm = LLM(runner="pooling", **kwargs)
        except TypeError:
            self.llm = LLM(task="classify", **kwargs)
        self._params = _pooling_params_without_activation()

    def forward(self, batch: list[list[int]]) -> list[float]:
        """One raw logit per id list from vLLM's classify with the activation off."""
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in batch]
        outputs = self.llm.classify(prompts, pooling_params=self._params, use_tqdm=False)
        return [float(o.outputs.probs[0]) for o in outputs]

    def close(self) -> None:
        """Shut the vLLM engine down and free its GPU memory. Its engine core (a process of its own by default)
        holds the weights and the KV cache until shut down: dropping the LLM alone left them reserved, and the
        reload that replaced this model could run out of memory. `LLM.shutdown` where this vLLM has it, else the
        engine core's own (vLLM >= 0.10's V1 engine)."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        shutdown = getattr(llm, "shutdown", None) or getattr(engine_core, "shutdown", None)
        if shutdown is None:
            log.warning("this vLLM has no engine shutdown: its GPU memory is freed only when it is collected")
        else:
            try:
                shutdown()
            except Exception:  # a failed teardown must not stop the reload or the shutdown that called it
                log.exception("shutting the vLLM engine down failed; its GPU memory may stay reserved")
        del llm, engine_core, shutdown
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _pooling_params_without_activation() -> Any:
    from vllm import PoolingParams

    # `activation` became `use_activation` in vLLM 0.11.2.
    for name in ("use_activation", "activation"):
        try:
            return PoolingParams(**{name: False})
        except TypeError:
            continue
    raise RuntimeError("this vLLM has neither PoolingParams(use_activation=) nor (activation=)")


POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")
"""Module names of learned absolute position tables in transformers' models (BERT/RoBERTa, GPT-2, OPT)."""


def position_limit(model: Any) -> int | None:
    """The most tokens a model with learned absolute positions (BERT, RoBERTa, GPT-2, OPT) can embed: its
    position table, less the offset RoBERTa (past its padding index) and OPT add to every position. Longer
    items fail the forward, and with it every other caller's item in the batch. None for position schemes
    without a table (RoPE, ALiBi, relative), where length is the model's affair."""
    import torch

    limits = [
        m.num_embeddings - (m.padding_idx + 1 if m.padding_idx is not None else 0) - int(getattr(m, "offset", 0))
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES
    ]
    return min(limits) if limits else None


def make_backend(kind: str, path: str, device: str, dtype: str, max_length: int, compile: bool = False) -> Backend:
    """A "torch" or "vllm" backend for the checkpoint at `path`; ValueError for another kind.
    `compile` is the torch backend's (vLLM compiles its own graphs)."""
    if kind == "torch":
        return TorchBackend(path, device, dtype, compile)
    if kind == "vllm":
        return VllmBackend(path, device, dtype, max_length)
    raise ValueError(f"unknown scorer backend {kind!r}")
