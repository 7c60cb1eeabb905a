"""Backend selection, the vLLM extra's absence, and the torch backend's mask probe."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from synpref.services.scorer.backends import TorchBackend, make_backend
from synpref.shared.modeling import reward_of
from testing.numerics import approx_fp32_forward
from testing.tiny import build_tiny_reward_model

torch.set_num_threads(1)


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown scorer backend"):
        make_backend("onnx", "x", "cpu", "float32", 128)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_backend_says_how_to_install_it() -> None:
    with pytest.raises(RuntimeError, match=r"synpref\[vllm\]"):
        make_backend("vllm", "x", "cuda", "bfloat16", 128)


@pytest.mark.parametrize("arch,causal", [("qwen3", True), ("llama", True), ("bert", False)])
def test_mask_is_dropped_only_where_padding_is_invisible(tmp_path: Path, arch: str, causal: bool) -> None:
    path = build_tiny_reward_model(tmp_path / arch, arch=arch, layers=1, hidden=32, heads=2, kv_heads=1)
    backend = TorchBackend(str(path), "cpu", "float32")
    assert backend.causal is causal
    batch = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [5, 9], [7, 8, 9, 10]]
    singles = [reward_of(backend.model, [ids], backend.pad_id)[0] for ids in batch]
    # Padded batch (mask dropped where causal) vs one at a time: fp32 summed in another order.
    assert backend.forward(batch) == approx_fp32_forward(singles)
