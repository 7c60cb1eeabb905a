"""The one definition of each shared operation: atomic writes, sigmoid and the p_best rule, the split."""

from __future__ import annotations

import math
import os
import threading
from decimal import Decimal
from pathlib import Path

import pytest

from synpref.shared import files
from synpref.shared.files import write_atomic, write_text_atomic
from testing.numerics import FP64_EPS


def test_write_atomic_replaces_the_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "state.json"
    write_text_atomic(path, "one")
    write_text_atomic(path, "two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]


def test_write_atomic_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync folder" if Path(f"/proc/self/fd/{fd}").is_dir() else "fsync file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    write_text_atomic(tmp_path / "a.txt", "x")
    assert events == ["fsync file", "rename", "fsync folder"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temp(tmp_path):
    path = tmp_path / "a.txt"
    write_text_atomic(path, "old")

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_concurrent_writers_of_one_path_never_leave_a_mixed_file(tmp_path):
    path = tmp_path / "cache.json"
    texts = [str(i) * 50_000 for i in range(8)]
    threads = [threading.Thread(target=write_text_atomic, args=(path, t)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert path.read_text() in texts
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]


def test_sigmoid_is_exact_and_does_not_overflow():
    from synpref.shared.pairs import preference_probability, sigmoid

    assert sigmoid(0.0) == 0.5
    assert sigmoid(2.0) == 1 / (1 + math.exp(-2.0))  # x >= 0 is this very formula
    # x < 0 is e/(1+e), e = exp(x): libm's exp is within 1 ulp, the add and the divide round
    # once each: under 2.2 * FP64_EPS relative, plus half an ulp rounding the 28-digit Decimal.
    assert sigmoid(-2.0) == pytest.approx(float(1 / (1 + Decimal(2).exp())), rel=3 * FP64_EPS)
    assert sigmoid(1000.0) == 1.0 and sigmoid(-1000.0) == 0.0
    assert preference_probability(3.0, 1.0) == sigmoid(2.0)


def test_the_p_best_rule_sends_wrong_and_unsure_pairs_to_annotation():
    from synpref.shared.pairs import needs_annotation

    assert needs_annotation(0.2, band=0.05) and needs_annotation(0.5, band=0.05)
    assert needs_annotation(0.55, band=0.05), "the band's edge is still unsure"
    assert not needs_annotation(0.56, band=0.05)
    assert not needs_annotation(0.51, band=0.0)


@pytest.mark.parametrize(
    ("conversations", "fraction", "held"),
    [(10, 0.0, 0), (10, 0.2, 2), (10, 0.25, 3), (10, 0.35, 4), (3, 0.1, 1), (1, 0.5, 1), (0, 0.5, 0), (4, 0.99, 4)],
)
def test_held_out_count_rounds_half_up_and_holds_at_least_one(conversations, fraction, held):
    from synpref.shared.pairs import held_out_count

    assert held_out_count(conversations, fraction) == held


def _pairs(n: int) -> list[dict]:
    out = []
    for i in range(n):
        conversation = [{"role": "user", "content": f"question {i % (n // 2)}"}]
        chosen = [{"role": "assistant", "content": f"good {i}"}]
        rejected = [{"role": "assistant", "content": f"bad {i}"}]
        out.append({"conversation": conversation, "chosen": chosen, "rejected": rejected})
    return out


def test_split_keeps_conversations_whole_and_is_seeded():
    from synpref.shared.pairs import conversation_key, split_by_conversation

    pairs = _pairs(40)  # 20 conversations, two pairs each

    def conversation(p: dict) -> list[dict[str, str]]:
        return p["conversation"]

    kept, held = split_by_conversation(pairs, conversation, 0.25, seed=3)
    assert len(held) == 2 * 5 and len(kept) == 30
    assert not {conversation_key(p["conversation"]) for p in kept} & {conversation_key(p["conversation"]) for p in held}
    assert [p for p in pairs if p in held] == held, "input order is kept"
    assert split_by_conversation(pairs, conversation, 0.25, seed=3) == (kept, held)
    assert split_by_conversation(pairs, conversation, 0.25, seed=4) != (kept, held)


def test_the_controllers_streaming_split_keeps_conversations_whole_and_is_seeded():
    """The controller decides each pair's side as it streams in: by a seeded coin per conversation."""
    from synpref.shared.pairs import is_held_out

    pairs = _pairs(4000)  # 2000 conversations, two pairs each
    held = [is_held_out(p["conversation"], 0.2, seed=7) for p in pairs]
    assert held[:2000] == held[2000:], "both pairs of a conversation land on the same side"
    assert abs(sum(held[:2000]) - 400) < 4 * (2000 * 0.16) ** 0.5
    assert [is_held_out(p["conversation"], 0.2, seed=7) for p in pairs[::-1]] == held[::-1], "order-free"
    assert [is_held_out(p["conversation"], 0.2, seed=8) for p in pairs] != held
    assert not any(is_held_out(p["conversation"], 0.0, seed=7) for p in pairs)


def test_fsync_tree_syncs_every_file_and_folder_before_a_checkpoint_is_renamed_into_place(tmp_path, fsynced):
    # Found in review: a checkpoint folder was renamed into place with none of its files fsynced; after a
    # power loss the rename can survive while the files come back empty, and resume fails on every try.
    from synpref.shared.files import fsync_tree

    (tmp_path / "ckpt" / "sub").mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "sub/tokenizer.json"):
        (tmp_path / "ckpt" / name).write_text(name)
    fsync_tree(tmp_path / "ckpt")
    root = str(tmp_path / "ckpt")
    assert sorted(p.removeprefix(root) for p in fsynced) == sorted(
        ["", "/sub", "/model.safetensors", "/config.json", "/sub/tokenizer.json"]
    )


def test_a_split_keeps_every_continuation_of_a_prompt_on_one_side():
    # Found in review: the key hashed the whole conversation, so hh-rlhf pairs opening with the same
    # prompt and going on differently were split apart: 37 of 424 held-out pairs had their prompt in training.
    import hashlib
    import json

    from synpref.shared.pairs import conversation_key, is_held_out, split_by_conversation

    def conv(prompt: str, turns: int) -> list[dict[str, str]]:
        out = [{"role": "system", "content": "be kind"}, {"role": "user", "content": prompt}]
        for t in range(turns):
            out += [{"role": "assistant", "content": f"a{t}"}, {"role": "user", "content": f"{prompt} more {t}"}]
        return out

    items = [conv(f"prompt {p}", t) for p in range(40) for t in range(4)]
    kept, held = split_by_conversation(items, lambda c: c, 0.25, seed=3)
    first = {c[1]["content"] for c in held}
    assert held and kept and not first & {c[1]["content"] for c in kept}
    assert all(is_held_out(c, 0.3, 7) == is_held_out(conv(c[1]["content"], 0), 0.3, 7) for c in items)
    single = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}][:1]
    whole = json.dumps(single, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    assert conversation_key(single) == hashlib.sha256(whole.encode()).hexdigest()  # single-turn draws unchanged
