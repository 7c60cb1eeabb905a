"""Client helpers without a server: proto conversion, chunking, the retry budget, CLI input."""

from __future__ import annotations

import io
import time

import pytest

from synpref.client.cli import read_numbered_items
from synpref.client.client import _pair_requests, _Policy, check_tokenizer
from synpref.client.messages import TokenIds, to_item, to_pair
from synpref.client.messages import chunks as _chunks
from synpref.v1 import reward_pb2


def test_items_and_pairs_become_protos() -> None:
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    item = to_item(conv)
    assert item.WhichOneof("input") == "conversation"
    assert [(m.role, m.content) for m in item.conversation.messages] == [("user", "q"), ("assistant", "a")]
    assert to_item("<|im_start|>user\nq<|im_end|>").text.startswith("<|im_start|>")
    pair = to_pair({"conversation": conv[:1], "chosen": "yes", "rejected": [{"role": "assistant", "content": "no"}]})
    assert pair.chosen[0].role == "assistant" and pair.chosen[0].content == "yes"
    assert pair.rejected[0].content == "no" and pair.conversation[0].content == "q"


def test_token_ids_items_and_the_tokenizer_check() -> None:
    item = to_item(TokenIds([3, 1, 4]))
    assert item.WhichOneof("input") == "token_ids" and list(item.token_ids.ids) == [3, 1, 4]

    class Slow:  # no fast backend: the fingerprint covers the vocabulary and chat template
        chat_template = "{{ messages }}"

        def get_vocab(self) -> dict[str, int]:
            return {"a": 0, "b": 1}

    from synpref.shared.tokenizer_hash import tokenizer_sha256

    other = Slow()
    other.chat_template = "{{ messages | length }}"
    info = reward_pb2.InfoResponse(  # no name asked: every model, the default named
        default_model="best",
        models=[
            reward_pb2.ModelInfo(name="gold", version="v1", tokenizer_sha256=tokenizer_sha256(other)),
            reward_pb2.ModelInfo(name="best", version="v3", tokenizer_sha256=tokenizer_sha256(Slow())),
            reward_pb2.ModelInfo(name="old", version="v0"),
        ],
    )
    check_tokenizer(info, Slow())
    check_tokenizer(info, other, "gold")
    with pytest.raises(ValueError, match="model 'best' \\(version v3\\) encodes with tokenizer"):
        check_tokenizer(info, other)
    with pytest.raises(ValueError, match="names no model 'nope'"):
        check_tokenizer(info, other, "nope")
    with pytest.raises(ValueError, match="'old' reports no tokenizer_sha256"):
        check_tokenizer(info, other, "old")


def test_chunks_cover_everything_in_order_within_count_and_bytes() -> None:
    texts = [reward_pb2.ScoreItem(text=str(i) * n) for i, n in enumerate([1, 1, 1, 1, 1, 1, 1, 1, 1, 1])]
    assert [[int(m.text) for m in run] for run in _chunks(texts, 4, 10**6)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    sizes = [100, 100, 5000, 100, 100, 100]  # one item over the byte bound goes alone
    items = [reward_pb2.ScoreItem(text="x" * n) for n in sizes]
    runs = list(_chunks(items, 64, 400))
    assert [[len(m.text) for m in run] for run in runs] == [[100, 100], [5000], [100, 100, 100]]
    assert all(sum(m.ByteSize() for m in run) <= 400 for run in runs if len(run) > 1)
    assert list(_chunks([], 4, 10)) == []


def test_requests_are_cut_by_bytes_so_long_pairs_stay_under_the_servers_body_limit() -> None:
    long = "y" * 100_000
    pairs = [
        {"conversation": [{"role": "user", "content": f"q{i}"}], "chosen": [{"role": "assistant", "content": long}],
         "rejected": [{"role": "assistant", "content": "n"}]}
        for i in range(10)
    ]  # fmt: skip
    policy = _Policy(timeout=10, retries=0, backoff_s=0.1, max_backoff_s=1, chunk_size=256, max_request_bytes=250_000)
    requests = list(_pair_requests(pairs, "gold", policy))
    assert [len(r.pairs) for r in requests] == [2, 2, 2, 2, 2]
    assert all(r.ByteSize() <= 250_000 for r in requests)
    assert [p.conversation[0].content for r in requests for p in r.pairs] == [f"q{i}" for i in range(10)]


def test_retry_budget_is_bounded_by_count_and_deadline() -> None:
    policy = _Policy(timeout=10, retries=3, backoff_s=0.1, max_backoff_s=0.25, chunk_size=8)
    far = time.monotonic() + 100
    delays = [policy.pause(a, far) for a in (1, 2, 3)]
    assert all(d is not None for d in delays)
    assert 0.05 <= delays[0] <= 0.1 and 0.1 <= delays[1] <= 0.2 and delays[2] <= 0.25  # capped
    assert policy.pause(4, far) is None  # out of retries
    assert policy.pause(1, time.monotonic() + 0.01) is None  # would pass the deadline
    with pytest.raises(ValueError):
        _Policy(timeout=0, retries=1, backoff_s=0.1, max_backoff_s=1, chunk_size=1)


def test_cli_reads_the_four_item_shapes() -> None:
    lines = io.StringIO(
        '[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]\n'
        "\n"
        '{"messages": [{"role": "assistant", "content": "b"}]}\n'
        '{"text": "rendered"}\n'
        '{"token_ids": [1, 5, 9]}\n'
    )
    numbered = list(read_numbered_items(lines))
    # Line numbers of the input (the blank line 2 is skipped): `score items` writes them beside each reward.
    assert [n for n, _ in numbered] == [1, 3, 4, 5]
    items = [item for _, item in numbered]
    assert items[0][1]["content"] == "a" and items[1][0]["content"] == "b" and items[2] == "rendered"
    assert items[3] == TokenIds([1, 5, 9])
    for bad in ('{"foo": 1}', '{"token_ids": [1, "2"]}', '{"token_ids": [true]}'):
        with pytest.raises(ValueError, match="line 1: expected"):
            list(read_numbered_items(io.StringIO(bad + "\n")))
