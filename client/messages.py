"""What the client sends: request items and pairs as protobuf messages, requests cut to size, and the check that
TokenIds items were made with the served model's tokenizer."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf.message import Message

from synpref.shared.tokenizer_hash import tokenizer_sha256
from synpref.v1 import pair_pb2, reward_pb2

M = TypeVar("M", bound=Message)
T = TypeVar("T")

Conversation = Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class TokenIds:
    """An item as token ids: the conversation rendered with the served model's chat template and
    tokenized with its tokenizer, special tokens included (what
    `synpref.shared.modeling.encode_conversation` gives). The server checks them against its
    vocabulary and max_length and scores them as they are."""

    ids: Sequence[int]


Item = Conversation | str | TokenIds
PairDict = Mapping[str, Any]


def _messages(value: Conversation | str, role: str = "assistant") -> list[pair_pb2.Message]:
    if isinstance(value, str):
        return [pair_pb2.Message(role=role, content=value)]
    if isinstance(value, Mapping):  # iterated, it gave its keys: "message 0 is a str"
        raise ValueError(f"expected a message list or a text, got a {type(value).__name__}")
    return [_message(i, m) for i, m in enumerate(value)]


def _message(i: int, m: object) -> pair_pb2.Message:
    """ValueError unless `m` has string role and content: str() of a None content (an assistant turn with only tool
    calls) or of a list of content parts would be scored as the text "None" or as the list's repr."""
    if not isinstance(m, Mapping):
        raise ValueError(f"message {i} is a {type(m).__name__}, not an object with role and content")
    for field in ("role", "content"):
        if not isinstance(m.get(field), str):
            raise ValueError(f"message {i} {field} must be a string, got {type(m.get(field)).__name__}")
    return pair_pb2.Message(role=m["role"], content=m["content"])


def to_item(item: Item) -> reward_pb2.ScoreItem:
    """A ScoreItem: `token_ids` for TokenIds, `text` for a string (already rendered), else the conversation's
    messages."""
    if isinstance(item, TokenIds):
        return reward_pb2.ScoreItem(token_ids=reward_pb2.TokenIds(ids=item.ids))
    if isinstance(item, str):
        return reward_pb2.ScoreItem(text=item)
    return reward_pb2.ScoreItem(conversation=reward_pb2.Conversation(messages=_messages(item)))


def to_pair(pair: PairDict) -> reward_pb2.PairItem:
    """{"conversation": messages | str, "chosen": messages | str, "rejected": messages | str}: a text conversation
    is the user's turn (it was sent as the assistant's, so the prompt was scored as a response), a text side the
    assistant's."""
    if not isinstance(pair, Mapping) or "chosen" not in pair or "rejected" not in pair:
        raise ValueError(f"a pair is a mapping with chosen and rejected (and a conversation), got {_shape(pair)}")
    return reward_pb2.PairItem(
        conversation=_messages(pair.get("conversation") or [], role="user"),
        chosen=_messages(pair["chosen"]),
        rejected=_messages(pair["rejected"]),
    )


def _shape(value: object) -> str:
    return f"one with keys {sorted(map(str, value))}" if isinstance(value, Mapping) else f"a {type(value).__name__}"


def check_batch(values: object, what: str) -> None:
    """ValueError when `values`, the `what` ("items" or "pairs") of a call, is one item or pair, not a list of them:
    a text was scored letter by letter (a reward per character, no error), and one conversation failed on its first
    message as "message 0 is a str"."""
    if isinstance(values, str | bytes | TokenIds | Mapping):
        raise ValueError(f"{what} must be a list of {what}, got a {type(values).__name__}: wrap one in a list")
    first = values[0] if isinstance(values, Sequence) and values else None
    if what == "items" and isinstance(first, Mapping) and "role" in first:
        raise ValueError("items is one conversation (a list of messages), not a list of items: pass [conversation]")


def converted(convert: Callable[[T], M], values: Iterable[T], what: str) -> Iterator[M]:
    """convert(value) of each value, in order; a bad one raises ValueError naming its index in the call: the errors
    of to_item and to_pair (and protobuf's) name at most a message within it, and the call may hold thousands."""
    for i, value in enumerate(values):
        try:
            yield convert(value)
        except (ValueError, TypeError) as exc:  # protobuf: TypeError for a float id, ValueError past int32
            raise ValueError(f"{what} {i}: {exc}") from exc


MAX_REQUEST_BYTES = 16 * 1024 * 1024
"""Default bound on one request's size: half the scorer's default max_body_bytes, for headroom."""
FIELD_OVERHEAD_BYTES = 16
"""A repeated field's tag and length prefix per element, rounded up."""


def chunks(messages: Iterable[M], count: int, max_bytes: int) -> Iterator[list[M]]:
    """Consecutive runs of at most `count` messages and `max_bytes` serialized bytes, in order; a message
    larger than `max_bytes` goes alone (the server then answers for it)."""
    run: list[M] = []
    size = 0
    for message in messages:
        n = message.ByteSize() + FIELD_OVERHEAD_BYTES
        if run and (len(run) == count or size + n > max_bytes):
            yield run
            run, size = [], 0
        run.append(message)
        size += n
    if run:
        yield run


def check_tokenizer(info: reward_pb2.InfoResponse, tokenizer: Any, model: str = "") -> None:
    """ValueError unless `tokenizer` (a transformers tokenizer) is the one `model` (empty: the
    server's default) encodes with, per an Info answer: TokenIds made by another would score as
    other text."""
    name = model or info.default_model
    served = next((m for m in info.models if m.name == name), None)
    if served is None:
        raise ValueError(f"the server's Info names no model {name!r}: {[m.name for m in info.models]}")
    if not served.tokenizer_sha256:
        raise ValueError(f"model {name!r} reports no tokenizer_sha256 (a scorer older than token-id input)")
    mine = tokenizer_sha256(tokenizer)
    if served.tokenizer_sha256 != mine:
        raise ValueError(
            f"model {name!r} (version {served.version}) encodes with tokenizer {served.tokenizer_sha256[:12]}, "
            f"this one is {mine[:12]}: send conversations or texts, or load the model's own tokenizer"
        )
