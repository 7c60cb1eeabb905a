"""Request validation and the text/conversation encoding the scorer applies (tiny local tokenizers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from synpref.services.scorer.encoding import Encoder, validate_messages
from synpref.services.scorer.errors import InvalidInput
from testing.tiny import build_tiny_tokenizer

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "How do I bake bread at home?"},
    {"role": "assistant", "content": "Mix flour, water, salt and yeast, then bake it."},
]


@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory: pytest.TempPathFactory):
    return build_tiny_tokenizer(Path(tmp_path_factory.mktemp("tok")) / "llama", style="llama", vocab_size=400)


@pytest.fixture(scope="module")
def qwen_tok(tmp_path_factory: pytest.TempPathFactory):
    return build_tiny_tokenizer(Path(tmp_path_factory.mktemp("tok")) / "qwen", style="qwen", vocab_size=400)


@pytest.mark.parametrize(
    "messages,fragment",
    [
        ([], "is empty"),
        ([{"role": "user", "content": "q"}], "must end with the assistant response"),
        ([{"role": "robot", "content": "q"}], "role 'robot'"),
        ([{"role": "assistant", "content": 3}], "content must be a string"),
        (["hello"], "not an object"),
        ([{"role": "user", "content": " "}, {"role": "assistant", "content": ""}], "only empty messages"),
    ],
)
def test_invalid_conversations_are_named(messages: list, fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        validate_messages(messages, "item 7")


def test_valid_conversation_passes_through() -> None:
    assert validate_messages(CONV) == CONV


def test_rendered_text_gets_exactly_one_bos(llama_tok) -> None:
    enc = Encoder(llama_tok, max_length=512)
    from_conv = enc.conversation(CONV)
    rendered = llama_tok.apply_chat_template(CONV, tokenize=False)
    bos = llama_tok.bos_token
    assert rendered.startswith(bos) and from_conv[0] == llama_tok.bos_token_id and from_conv[1] != from_conv[0]
    assert enc.text(rendered) == from_conv  # OpenRLHF: BOS kept
    assert enc.text(rendered[len(bos) :]) == from_conv  # verl: BOS stripped
    assert enc.text(bos + rendered) == from_conv  # a plain tokenizer call: BOS doubled


def test_no_bos_family_adds_none(qwen_tok) -> None:
    enc = Encoder(qwen_tok, max_length=512)
    rendered = qwen_tok.apply_chat_template(CONV, tokenize=False)
    assert enc.text(rendered) == enc.conversation(CONV)
    assert qwen_tok.bos_token_id is None


def test_too_long_truncates_or_rejects(qwen_tok) -> None:
    long_conv = [
        {"role": "user", "content": "old question " * 40},
        {"role": "assistant", "content": "old answer " * 40},
        {"role": "user", "content": "new question"},
        {"role": "assistant", "content": "new answer"},
    ]
    full = Encoder(qwen_tok, max_length=10_000).conversation(long_conv)
    limit = len(full) // 2
    cut = Encoder(qwen_tok, max_length=limit).conversation(long_conv)
    assert len(cut) <= limit and cut[-5:] == full[-5:]  # left_turns keeps the scored response
    with pytest.raises(InvalidInput, match=f"max_length={limit}"):
        Encoder(qwen_tok, max_length=limit, on_too_long="reject").conversation(long_conv)
    with pytest.raises(InvalidInput, match="max_length=16"):
        Encoder(qwen_tok, max_length=16, on_too_long="reject").text("word " * 50)
    assert len(Encoder(qwen_tok, max_length=16).text("word " * 50)) == 16


def test_empty_text_and_padding(qwen_tok) -> None:
    enc = Encoder(qwen_tok, max_length=64)
    with pytest.raises(InvalidInput, match="empty"):
        enc.text("  \n")
    pad = qwen_tok.pad_token
    assert enc.strip_padding(pad * 3 + "hello" + pad) == "hello"


@pytest.mark.parametrize("truncation", ["left_tokens", "left_turns", "right"])
def test_cutting_characters_first_keeps_the_ids(llama_tok, qwen_tok, truncation: str) -> None:
    """Texts over max_length x max_chars_per_token characters are cut before tokenizing, on
    the side truncation keeps; the ids are those of the uncut text."""
    words = " ".join(f"word{i % 97} and more" for i in range(400))
    for tok in (llama_tok, qwen_tok):
        cut = Encoder(tok, 32, truncation=truncation, max_chars_per_token=8)  # type: ignore[arg-type]
        uncut = Encoder(tok, 32, truncation=truncation, max_chars_per_token=10**6)  # type: ignore[arg-type]
        assert len(words) > cut.char_budget
        assert cut.text(words) == uncut.text(words)
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": words}], tokenize=False
        )
        assert cut.text(rendered) == uncut.text(rendered)
        conv = [*CONV[:2], {"role": "assistant", "content": words}]
        assert cut.conversation(conv) == uncut.conversation(conv)
        short = CONV[2]["content"]
        assert len(short) < cut.char_budget and cut.text(short) == uncut.text(short)


def test_strip_padding_is_linear_in_the_padding(llama_tok) -> None:
    enc = Encoder(llama_tok, 64)
    pad = llama_tok.pad_token
    assert enc.strip_padding(pad * 200_000 + "hello" + pad * 200_000) == "hello"
    assert enc.strip_padding(pad * 3) == ""


def test_token_ids_are_checked_and_fitted_not_tokenized_again(llama_tok) -> None:
    enc = Encoder(llama_tok, max_length=512)
    ids = enc.conversation(CONV)
    assert enc.token_ids(ids) == ids and enc.token_ids(tuple(ids), "item 3 token_ids") == ids
    with pytest.raises(InvalidInput, match="item 3 token_ids is empty"):
        enc.token_ids([], "item 3 token_ids")
    for bad in (-1, len(llama_tok)):
        with pytest.raises(InvalidInput, match=f"holds id {bad}, outside the model's vocabulary"):
            enc.token_ids([*ids, bad])
    # Over max_length, cut as a rendered text of those ids would be: the end kept behind the BOS,
    # the start with truncation="right", refused with on_too_long="reject".
    short = 8
    assert Encoder(llama_tok, max_length=short).token_ids(ids) == ids[:1] + ids[-(short - 1) :]
    assert Encoder(llama_tok, max_length=short, truncation="right").token_ids(ids) == ids[:short]
    with pytest.raises(InvalidInput, match="longer than max_length=8"):
        Encoder(llama_tok, max_length=short, on_too_long="reject").token_ids(ids)


def test_tokenizer_fingerprint_names_the_ids_a_tokenizer_makes(llama_tok, qwen_tok, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from synpref.shared.tokenizer_hash import tokenizer_sha256

    llama_tok.save_pretrained(tmp_path / "copy")
    again = AutoTokenizer.from_pretrained(tmp_path / "copy")
    assert tokenizer_sha256(again) == tokenizer_sha256(llama_tok) == Encoder(llama_tok, 64).tokenizer_sha256
    again(["a b", "c"], padding=True, truncation=True, max_length=4)  # sets the backend's padding and truncation
    again.pad_token = again.eos_token
    assert tokenizer_sha256(again) == tokenizer_sha256(llama_tok)
    assert tokenizer_sha256(qwen_tok) != tokenizer_sha256(llama_tok)
    again.chat_template = (again.chat_template or "") + " "
    assert tokenizer_sha256(again) != tokenizer_sha256(llama_tok)


def test_a_conversation_the_chat_template_refuses_is_invalid_input(qwen_tok) -> None:
    # Mistral's and Gemma's templates raise_exception on a system message; that is the caller's
    # input to fix (INVALID_ARGUMENT / 400), not a server error (UNKNOWN / 500).
    import copy

    strict = copy.copy(qwen_tok)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}\n{% endfor %}"
    )
    enc = Encoder(strict, max_length=64)
    with pytest.raises(InvalidInput, match="chat template refuses it: System role not supported"):
        enc.conversation(CONV, "item 0 conversation")
    assert enc.conversation(CONV[1:])  # without the system message it renders


def test_a_pair_is_encoded_as_the_trainer_encodes_it(qwen_tok) -> None:
    # ScorePairs scores the gold and best RMs' p for the pipeline: its two sides must keep the same
    # turns, exactly as shared.modeling.encode_pair cuts them for training.
    from synpref.shared.modeling import encode_pair

    conv = [{"role": "user", "content": f"question {i} " + "word " * 15} for i in range(3)]
    conv = [m for i, q in enumerate(conv) for m in (q, {"role": "assistant", "content": f"answer {i}"})][:-1]
    short, long = [{"role": "assistant", "content": "ok"}], [{"role": "assistant", "content": "longer answer " * 10}]
    enc = Encoder(qwen_tok, max_length=200)
    got = enc.pair(conv, short, long, "pair 0")
    want = encode_pair(qwen_tok, {"conversation": conv, "chosen": short, "rejected": long}, 200)
    assert got == [w.input_ids for w in want] and want[0].dropped_turns == want[1].dropped_turns > 0
