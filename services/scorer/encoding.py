"""Request items to token ids: validation, chat template, BOS, length policy.

The server owns the chat template, so every client gets the same reward for the same
conversation. Three kinds of item arrive:
- a conversation (message list ending in the assistant response to score): rendered and
  tokenized by shared.modeling.encode_conversation, the one implementation the trainer
  uses too, so served rewards match trained ones;
- text already rendered with the chat template (OpenRLHF, verl and vLLM clients send
  this): shared.modeling.encode_text tokenizes it without adding special tokens and gives
  it exactly one leading BOS when the tokenizer uses one. Clients differ here (verl strips
  the BOS, OpenRLHF keeps it, a plain tokenizer call doubles it); all three give the ids
  of the rendered template, hence the same reward as the conversation itself;
- token ids of that rendered text, from the model's own tokenizer (an RL worker whose policy
  shares it has them from generation; ModelInfo.tokenizer_sha256 lets it check): checked
  against the vocabulary and max_length, not tokenized again. Tokenizing is most of what
  serving a request costs the scorer on CPU (docs/scorer.md).

Too long items are truncated to max_length or rejected, per `on_too_long`.

Before tokenizing, a text (or message) longer than `max_length * max_chars_per_token`
characters is cut to that many, on the side the truncation keeps (the end for the left
policies and for `reject`, whose fallback keeps the end; the start for `right`). A token
covers at most `max_chars_per_token` characters (32 by default: real vocabularies' longest
pieces are runs of spaces or punctuation), so a cut text still holds at least max_length
tokens and truncates to the same ids; texts under the budget are not touched. This bounds the
tokenizer's time and memory whatever a client sends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

from jinja2 import TemplateError

from synpref.services.scorer.errors import InvalidInput
from synpref.shared.modeling import (
    Encoded,
    Truncation,
    cut_text,
    encode_conversation,
    encode_pair,
    encode_text,
    fit_ids,
)
from synpref.shared.pairs import ROLES
from synpref.shared.tokenizer_hash import tokenizer_sha256

Messages = Sequence[Mapping[str, Any]]


def check_utf8(text: str, what: str) -> None:
    """JSON may carry lone surrogates (\\ud800) that no tokenizer can encode: a client error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{what} is not valid UTF-8 text (it holds a lone surrogate)") from None


def validate_messages(messages: Messages, what: str = "conversation") -> list[dict[str, str]]:
    """Plain role/content dicts, or InvalidInput naming what is wrong and where."""
    if not messages:
        raise InvalidInput(f"{what} is empty: send at least the assistant response to score")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidInput(f"{what} message {i} is a {type(m).__name__}, not an object with role and content")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in ROLES:  # a list or dict role: unhashable, a TypeError (500)
            raise InvalidInput(f"{what} message {i} has role {role!r}; expected one of {sorted(ROLES)}")
        if not isinstance(content, str):
            raise InvalidInput(f"{what} message {i} content must be a string, got {type(content).__name__}")
        check_utf8(content, f"{what} message {i} content")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise InvalidInput(f"{what} must end with the assistant response to score; it ends with {out[-1]['role']!r}")
    if not any(m["content"].strip() for m in out):
        raise InvalidInput(f"{what} has only empty messages")
    return out


@dataclass
class Encoder:
    """Turns request inputs into token ids for one model, within max_length.

    Attributes:
        tokenizer: the model's tokenizer (its chat template renders conversations).
        max_length: most tokens per item.
        on_too_long: "truncate" cuts an item over max_length; "reject" answers InvalidInput.
    """

    tokenizer: Any
    max_length: int
    on_too_long: Literal["truncate", "reject"] = "truncate"
    truncation: Truncation = "left_turns"
    """How `truncate` cuts (shared.modeling): left_turns drops whole old turns and keeps the
    response; left_tokens cuts tokens from the left; right cuts the end."""
    max_chars_per_token: int = 32
    """Characters one token covers at most: texts are cut to max_length times this first."""

    def __post_init__(self) -> None:
        self.from_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.pad_token: str | None = self.tokenizer.pad_token
        self._policy: Truncation = "none" if self.on_too_long == "reject" else self.truncation
        self.char_budget = self.max_length * self.max_chars_per_token
        self._keep_end = self._policy != "right"
        self._bos: str | None = getattr(self.tokenizer, "bos_token", None)
        self.vocab_size = len(self.tokenizer)

    @cached_property
    def tokenizer_sha256(self) -> str:
        """The tokenizer's fingerprint (shared.tokenizer_hash), for Info."""
        return tokenizer_sha256(self.tokenizer)

    def cut(self, text: str) -> str:
        """`text` cut to the character budget (max_length x max_chars_per_token): its end is kept (its start with
        truncation="right"), and a leading BOS survives."""
        return cut_text(text, self.char_budget, self._keep_end, self._bos)

    def conversation(self, messages: Messages, what: str = "conversation") -> list[int]:
        """Token ids of a validated message list rendered with the chat template, each message pre-cut."""
        msgs = self._cut_messages(validate_messages(messages, what))
        try:
            encoded = encode_conversation(
                self.tokenizer, msgs, self.max_length, self._policy, max_chars_per_token=self.max_chars_per_token
            )
        except TemplateError as exc:  # the template's raise_exception: no system role, roles not alternating, ...
            raise InvalidInput(f"{what}: the model's chat template refuses it: {exc}") from exc
        return self._check(encoded, what)

    def pair(self, conversation: Messages, chosen: Messages, rejected: Messages, what: str) -> list[list[int]]:
        """Token ids of conversation + chosen and conversation + rejected, both cut to the same turns
        (shared.modeling.encode_pair, as the trainer encodes pairs)."""
        n = len(conversation)
        with_chosen = self._cut_messages(validate_messages([*conversation, *chosen], f"{what} chosen"))
        with_rejected = self._cut_messages(validate_messages([*conversation, *rejected], f"{what} rejected"))
        pair = {"conversation": with_chosen[:n], "chosen": with_chosen[n:], "rejected": with_rejected[n:]}
        try:
            sides = encode_pair(self.tokenizer, pair, self.max_length, self._policy, self.max_chars_per_token)
        except TemplateError as exc:
            raise InvalidInput(f"{what}: the model's chat template refuses it: {exc}") from exc
        return [self._check(enc, f"{what} {side}") for enc, side in zip(sides, ("chosen", "rejected"), strict=True)]

    def _cut_messages(self, msgs: list[dict[str, str]]) -> list[dict[str, str]]:
        """Messages cut to the character budget (their ends kept) under on_too_long="reject": shared.modeling
        cuts only when it truncates, so a megabyte message was tokenized whole just to be rejected. A message
        over the budget holds over max_length tokens cut or not (it is rejected either way); others are kept."""
        if self._policy != "none":
            return msgs  # encode_conversation cuts them itself
        return [{"role": m["role"], "content": cut_text(m["content"], self.char_budget, True)} for m in msgs]

    def text(self, text: str, what: str = "text") -> list[int]:
        """Token ids of an already rendered text; InvalidInput when it is empty or not a string."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidInput(f"{what} is empty or not a string")
        text = self.cut(text)
        check_utf8(text, what)
        enc = encode_text(self.tokenizer, text, self.max_length, self._policy, from_template=self.from_template)
        return self._check(enc, what)

    def token_ids(self, ids: Sequence[int], what: str = "token_ids") -> list[int]:
        """A client's ids of a rendered conversation, as they are when within the vocabulary and
        max_length (cut by the truncation policy, or InvalidInput with on_too_long="reject")."""
        ids = list(ids)
        if not ids:
            raise InvalidInput(f"{what} is empty")
        low, high = min(ids), max(ids)
        if low < 0 or high >= self.vocab_size:
            raise InvalidInput(
                f"{what} holds id {low if low < 0 else high}, outside the model's vocabulary [0, {self.vocab_size}): "
                "were they made by another tokenizer? (Info's tokenizer_sha256 names this model's)"
            )
        return self._check(fit_ids(self.tokenizer, ids, self.max_length, self._policy), what)

    def _check(self, enc: Encoded, what: str) -> list[int]:
        if not enc.fits and self.on_too_long == "reject":
            raise InvalidInput(f"{what} is longer than max_length={self.max_length} tokens (on_too_long=reject)")
        # With truncate, an item whose response alone overflows is scored on its
        # left-truncated end (the response end and the reward token are kept).
        return list(enc.input_ids)

    def strip_padding(self, text: str) -> str:
        """OpenRLHF sends decoded, left-padded sequences: drop pad tokens at either end.
        Indices move, the text is copied once: slicing per pad was quadratic in the padding."""
        pad = self.pad_token
        if not pad:
            return text
        start, end = 0, len(text)
        while text.startswith(pad, start, end):
            start += len(pad)
        while end - start >= len(pad) and text.endswith(pad, start, end):
            end -= len(pad)
        return text[start:end]
