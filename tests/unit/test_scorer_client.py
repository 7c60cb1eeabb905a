"""Client helpers without a server: proto conversion, chunking, the retry budget, CLI input."""

from __future__ import annotations

import io
import time

import pytest

from synpref.client.cli import read_items
from synpref.client.client import _chunks, _Policy, to_item, to_pair


def test_items_and_pairs_become_protos() -> None:
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    item = to_item(conv)
    assert item.WhichOneof("input") == "conversation"
    assert [(m.role, m.content) for m in item.conversation.messages] == [("user", "q"), ("assistant", "a")]
    assert to_item("<|im_start|>user\nq<|im_end|>").text.startswith("<|im_start|>")
    pair = to_pair({"conversation": conv[:1], "chosen": "yes", "rejected": [{"role": "assistant", "content": "no"}]})
    assert pair.chosen[0].role == "assistant" and pair.chosen[0].content == "yes"
    assert pair.rejected[0].content == "no" and pair.conversation[0].content == "q"


def test_chunks_cover_everything_in_order() -> None:
    items = list(range(10))
    chunks = _chunks(items, 4)
    assert [list(c) for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


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


def test_cli_reads_the_three_item_shapes() -> None:
    lines = io.StringIO(
        '[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]\n'
        "\n"
        '{"messages": [{"role": "assistant", "content": "b"}]}\n'
        '{"text": "rendered"}\n'
    )
    items = list(read_items(lines))
    assert items[0][1]["content"] == "a" and items[1][0]["content"] == "b" and items[2] == "rendered"
    with pytest.raises(ValueError, match="line 1"):
        list(read_items(io.StringIO('{"foo": 1}\n')))
