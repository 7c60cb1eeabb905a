"""Backend selection, the vLLM extra's absence, and the torch backend's mask probe."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from synpref.services.scorer.backends import TorchBackend, make_backend
from synpref.shared.batched_rewards import reward_of
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


@pytest.mark.slow
def test_compiled_forwards_score_as_the_eager_model(tmp_path: Path) -> None:
    path = build_tiny_reward_model(tmp_path / "qwen3", arch="qwen3", layers=1, hidden=32, heads=2, kv_heads=1)
    eager = TorchBackend(str(path), "cpu", "float32")
    compiled = TorchBackend(str(path), "cpu", "float32", compile=True)
    assert compiled.compiled and not eager.compiled
    # Shapes the load-time probes did not compile: a wider batch, longer rows, a single long row.
    for batch in ([[5 + i % 50 for i in range(n)] for n in (3, 17, 40, 9, 1)], [[7] * 64], [[5, 9], [11, 12]]):
        # Fused kernels sum in another order than eager ones: the fp32 forward bound.
        assert compiled.forward(batch) == approx_fp32_forward(eager.forward(batch))


def test_a_model_that_fails_to_compile_serves_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = build_tiny_reward_model(tmp_path / "qwen3", arch="qwen3", layers=1, hidden=32, heads=2, kv_heads=1)
    eager = TorchBackend(str(path), "cpu", "float32")

    def broken(model: object, **_: object) -> object:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    backend = make_backend("torch", str(path), "cpu", "float32", 128, compile=True)
    assert isinstance(backend, TorchBackend) and not backend.compiled
    batch = [[5, 6, 7], [8, 9]]
    assert backend.forward(batch) == eager.forward(batch)


def test_position_limit_is_the_learned_position_table_less_its_offset() -> None:
    import transformers as tf

    from synpref.services.scorer.backends import position_limit

    small = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 100}
    bert = tf.BertForSequenceClassification(tf.BertConfig(max_position_embeddings=64, intermediate_size=32, **small))
    roberta = tf.RobertaForSequenceClassification(
        tf.RobertaConfig(max_position_embeddings=66, pad_token_id=1, intermediate_size=32, **small)
    )  # positions start past the padding index: 64 usable
    gpt2 = tf.GPT2ForSequenceClassification(
        tf.GPT2Config(n_positions=64, n_embd=16, n_layer=1, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0)
    )
    opt = tf.OPTForSequenceClassification(
        tf.OPTConfig(max_position_embeddings=64, ffn_dim=32, word_embed_proj_dim=16, **small)
    )  # its table has 2 more rows, for the offset it adds
    qwen = tf.Qwen3ForSequenceClassification(
        tf.Qwen3Config(max_position_embeddings=64, head_dim=8, num_key_value_heads=1, intermediate_size=32, **small)
    )
    assert [position_limit(m) for m in (bert, roberta, gpt2, opt)] == [64, 64, 64, 64]
    assert position_limit(qwen) is None  # RoPE: no table
    ids = torch.ones(1, 65, dtype=torch.long)
    for m in (bert, gpt2):  # one more than the limit fails the forward: why the server caps max_length to it
        with pytest.raises((RuntimeError, IndexError)):
            m(input_ids=ids)
