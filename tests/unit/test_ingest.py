"""Ingest preprocessing: every row lands in exactly one bucket and the counts reconcile."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka.errors import KafkaTimeoutError, NotEnoughReplicasError

from synpref.services.ingest.preprocess import (
    Decontaminator,
    Preprocessor,
    benchmark_prompts,
    builtin_sets,
    ingest_paths,
    words,
)
from synpref.shared.pairs import pair_id
from synpref.shared.sources import SourceRow
from testing import REPO_ROOT
from testing.group_consumer import RecordingProducer

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
BENCH = "Write a short poem about the sea and the moon in the style of an old English sailor song please now"


def row(i: int, prompt: str, chosen: str = "good", rejected: str = "bad") -> SourceRow:
    pair = {
        "conversation": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "source": "test",
        "meta": {"i": str(i)},
    }
    return SourceRow("t.jsonl", i, pair=pair)


def test_buckets_and_reconciliation():
    pre = Preprocessor(Decontaminator([BENCH]))
    rows = [
        row(0, "hello"),
        row(1, "hello"),  # duplicate of 0
        row(2, "hello", chosen="better"),  # same history, other chosen: not a duplicate
        row(3, "  ", chosen="x"),  # empty prompt
        row(4, "hi", rejected=""),  # empty rejected
        row(5, "Please: " + BENCH.upper() + "!"),  # 13-gram overlap, case and punctuation ignored
        SourceRow("t.jsonl", 6, error="invalid JSON line"),
    ]
    published = list(pre.run(rows))
    counts = pre.counts
    assert [r.pair.meta["i"] for r in published] == ["0", "2"]
    assert (counts.read, counts.published, counts.duplicate, counts.empty, counts.contaminated, counts.unreadable) == (
        7, 2, 1, 2, 1, 1,
    )  # fmt: skip
    assert counts.reconciles()
    assert {r.bucket for r in pre.rejections} == {"duplicate", "empty", "contaminated", "unreadable"}
    assert all(r.reason for r in pre.rejections)
    assert published[0].pair.id == pair_id(
        [{"role": "user", "content": "hello"}],
        [{"role": "assistant", "content": "good"}],
        [{"role": "assistant", "content": "bad"}],
    )
    assert list(published[0].lineage.steps) == ["ingest"]


def test_decontaminator_needs_thirteen_words_and_matches_short_prompts_whole():
    deco = Decontaminator([BENCH, "What is 2 + 2?"])
    twelve = " ".join(BENCH.split()[:12])
    assert deco.overlap(twelve) is None
    assert deco.overlap(" ".join(BENCH.split()[3:16])) is not None
    assert deco.overlap("so, what is 2 + 2? tell me") == ("what", "is", "2", "2")
    assert deco.overlap("what is 3 + 2") is None


def test_benchmark_prompts_from_text_and_pair_files(tmp_path):
    (tmp_path / "b.txt").write_text("first prompt\n\nsecond prompt\n")
    assert benchmark_prompts(tmp_path / "b.txt") == ["first prompt", "second prompt"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"prompt": "p1", "chosen": "a", "rejected": "b"}) + "\n")
    assert benchmark_prompts(tmp_path / "b.jsonl") == ["p1"]


def test_real_pandalm_and_hh_counts_reconcile():
    records, pre = ingest_paths(
        [DATA / "PandaLM", DATA / "hh-rlhf"], decontaminate=[DATA / "RM-Bench" / "chat_filtered.json"]
    )
    c = pre.counts
    assert c.reconciles()
    assert c.read == 999 + 2312
    assert c.unreadable == 105 + 5  # PandaLM ties, hh-rlhf unpairable transcripts
    assert c.empty >= 4  # hh-rlhf has 4 empty completions
    assert len(records) == c.published == len({r.pair.id for r in records})


def test_cli_dry_run_reports_and_reconciles(tmp_path, capsys):
    from synpref.services.ingest.main import main

    src = tmp_path / "pairs.jsonl"
    lines = [{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "a", "chosen": "x", "rejected": "y"},
             {"prompt": "b", "chosen": "", "rejected": "y"}, {"prompt": "c"}]  # fmt: skip
    src.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    report = tmp_path / "dropped.jsonl"
    assert main([str(src), "--dry-run", "--report", str(report)]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (counts["read"], counts["published"], counts["duplicate"], counts["empty"], counts["unreadable"]) == (
        4, 1, 1, 1, 1,
    )  # fmt: skip
    assert counts["reconciles"] and counts["topic"] is None
    dropped = [json.loads(line) for line in report.read_text().splitlines()]
    assert [d["bucket"] for d in dropped] == ["duplicate", "empty", "unreadable"]
    assert dropped[2]["locator"].endswith("pairs.jsonl#3") and "missing field" in dropped[2]["reason"]


def test_oversized_and_lone_surrogate_rows_are_counted_not_published():
    too_large = lambda record: "too big" if record.ByteSize() > 300 else None  # noqa: E731
    pre = Preprocessor(too_large=too_large)
    rows = [row(0, "small"), row(1, "big", chosen="x" * 1000), row(2, "caf\ud800"), row(3, "small again")]
    published = list(pre.run(rows))
    assert [r.pair.meta["i"] for r in published] == ["0", "3"]
    assert (pre.counts.oversized, pre.counts.unreadable, pre.counts.read) == (1, 1, 4) and pre.counts.reconciles()
    assert [(r.locator, r.bucket) for r in pre.rejections] == [("t.jsonl#1", "oversized"), ("t.jsonl#2", "unreadable")]
    # An oversized pair is not remembered as seen: a later, smaller run may still publish it.
    assert len(pre.seen) == 2


RM_BENCH = DATA / "RM-Bench"
needs_rm_bench = pytest.mark.skipif(
    not RM_BENCH.is_dir(), reason=f"RM-Bench prompts ({RM_BENCH}) are not here to test the built-in set against"
)


@needs_rm_bench
def test_builtin_rmbench_set_removes_a_pair_sharing_a_13gram_and_keeps_the_rest():
    prompt = next(p for p in benchmark_prompts(RM_BENCH / "chat_filtered.json") if len(words(p)) >= 20)
    gram = words(prompt)[3:16]
    pre = Preprocessor(Decontaminator.from_sources(["rmbench"]))
    rows = [
        # The 13 words inside other text, upper case and with other punctuation: still the same 13-gram.
        row(0, "Here is my question. " + ", ".join(gram).upper() + "? Thanks!"),
        row(1, "Here is my question. " + " ".join(gram[:12]) + " and nothing more"),  # 12 words: no 13-gram
        row(2, "Write a limerick about a cat who learns to play the trombone in a marching band"),
    ]
    published = list(pre.run(rows))
    assert [r.pair.meta["i"] for r in published] == ["1", "2"]
    assert pre.counts.contaminated == 1 and pre.rejections[0].reason.endswith(" ".join(gram))
    assert pre.decontaminator.prompts == len(set(benchmark_prompts(RM_BENCH)))


@needs_rm_bench
def test_builtin_rmbench_set_is_current_and_flags_what_the_prompt_files_flag(tmp_path):
    from tools.decontam.build_ngrams import main as build

    shipped = builtin_sets()["rmbench"]
    assert build(["rmbench", *map(str, sorted(RM_BENCH.glob("*.json"))), "--out-dir", str(tmp_path)]) == 0
    print(f"\n{shipped.name}: {shipped.stat().st_size} bytes", file=sys.stderr)
    assert (tmp_path / shipped.name).read_bytes() == shipped.read_bytes(), (
        "rebuild it with tools/decontam/build_ngrams.py"
    )
    assert shipped.stat().st_size < 256 * 1024, "package data stays small"
    from_files = Decontaminator.from_sources(sorted(RM_BENCH.glob("*.json")))
    builtin = Decontaminator.from_sources(["rmbench"])
    assert (builtin.grams, builtin.short_lengths, builtin.short_starts) == (
        from_files.grams, from_files.short_lengths, from_files.short_starts,
    )  # fmt: skip
    # Real sources that overlap RM-Bench (PandaLM and LLMBar share AlpacaEval-style instructions with it).
    sources = [DATA / "PandaLM", DATA / "LLMBar"]
    with_builtin = ingest_paths(sources, decontaminate=["rmbench"])[1]
    with_files = ingest_paths(sources, decontaminate=sorted(RM_BENCH.glob("*.json")))[1]
    flagged = [(r.locator, r.reason) for r in with_builtin.rejections if r.bucket == "contaminated"]
    assert flagged and flagged == [(r.locator, r.reason) for r in with_files.rejections if r.bucket == "contaminated"]


def test_builtin_set_needs_its_own_n_and_unknown_names_are_files():
    with pytest.raises(ValueError, match="holds 13-grams"):
        Decontaminator.from_sources(["rmbench"], n=10)
    with pytest.raises(ValueError, match=r"nor a built-in set .*rmbench"):
        Decontaminator.from_sources(["no-such-set"])


def test_saved_set_round_trips_and_a_truncated_one_is_refused(tmp_path):
    deco = Decontaminator([BENCH, "What is 2 + 2?"])
    size = deco.save(tmp_path / "b.ngrams")
    loaded = Decontaminator()
    loaded.add_set(tmp_path / "b.ngrams")
    assert loaded.overlap("so, what is 2 + 2? tell me") == ("what", "is", "2", "2")
    assert loaded.overlap(BENCH.upper()) is not None and loaded.overlap("what is 3 + 2") is None
    assert loaded.prompts == 2
    (tmp_path / "b.ngrams").write_bytes((tmp_path / "b.ngrams").read_bytes()[: size - 3])
    with pytest.raises(ValueError, match="bytes of digests"):
        Decontaminator().add_set(tmp_path / "b.ngrams")


@needs_rm_bench
def test_cli_decontaminates_with_the_builtin_set(tmp_path, capsys):
    from synpref.services.ingest.main import main

    prompt = next(p for p in benchmark_prompts(RM_BENCH / "code_filtered.json") if len(words(p)) >= 13)
    src = tmp_path / "pairs.jsonl"
    lines = [
        {"prompt": prompt, "chosen": "x", "rejected": "y"},
        {"prompt": "a fresh question", "chosen": "x", "rejected": "y"},
    ]
    src.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert main([str(src), "--dry-run", "--decontaminate", "rmbench"]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (counts["read"], counts["published"], counts["contaminated"]) == (2, 1, 1)
    assert main([str(src), "--dry-run", "--decontaminate", "rmbench", "--ngram", "10"]) == 2
    assert "holds 13-grams" in capsys.readouterr().err


class Producer(RecordingProducer):
    """Sends acknowledged at once, or (at_flush) only when flushed, as a real producer's lingering batches; never, if
    `hang` (a broker that stopped answering: a flush times out). Sends whose key is in `fail` are refused. Send number
    `stop_at` sets `stop` (as a SIGTERM would)."""

    def __init__(
        self, fail: set[str] = frozenset(), at_flush: bool = False, hang: bool = False, stop_at: int = 0
    ) -> None:
        refused = NotEnoughReplicasError("the broker refused the record")
        super().__init__(fail=lambda topic, key: refused if key.decode() in fail else None, at_flush=at_flush or hang)
        self.hang, self.stop_at, self.stop = hang, stop_at, ""

    def send(self, topic, value=None, key=None, headers=None, partition=None, timestamp_ms=None):
        if len(self.sent) + 1 == self.stop_at:
            self.stop = "SIGTERM received"
        return super().send(topic, value, key, headers, partition, timestamp_ms)

    def flush(self, timeout=None):
        if not self.hang:
            return super().flush(timeout)
        self.flushes += 1
        time.sleep(timeout)
        raise KafkaTimeoutError("Timeout waiting for future")


def pairs(n: int, dropped_at: dict[int, float], snapshot):
    """n distinct rows; before row i (up to n) in `dropped_at`, a pause of that many seconds and a duplicate
    of row 0 (dropped, so nothing is sent); at the end `snapshot()`, while publish() is still in its loop."""
    for i in range(n + 1):
        if i in dropped_at:
            time.sleep(dropped_at[i])
            yield row(10**6 + i, "prompt 0")
        if i < n:
            yield row(i, f"prompt {i}")
    snapshot()


def test_publish_hands_over_acknowledged_ids_in_groups_as_they_complete(monkeypatch):
    # Nothing per pair is held to the end: acknowledged ids go out in groups while sending goes on.
    import synpref.services.ingest.main as ingest

    monkeypatch.setattr(ingest, "HAND_OVER_IDS", 3, raising=False)
    monkeypatch.setattr(ingest, "HAND_OVER_S", 3600, raising=False)
    rows = [row(i, f"prompt {i}") for i in range(8)]
    records = list(Preprocessor().run(rows))
    producer = Producer(fail={records[4].pair.id})
    handed: list[list[str]] = []
    unacked, stopped = ingest.publish(Preprocessor(), iter(rows), producer, "t", handed.append)
    assert (unacked, stopped, len(producer.sent)) == (1, "", 8)
    assert [len(h) for h in handed] == [3, 3, 1], handed  # every 3 acknowledged, then the rest at the end
    assert [i for h in handed for i in h] == [r.pair.id for r in records if r.pair.id != records[4].pair.id]


def test_publish_hands_over_within_the_interval_before_the_loop_ends(monkeypatch):
    # A killed run keeps what was acknowledged up to HAND_OVER_S before it: the groups go out while rows are
    # still read, by count and by time, the latter also while only dropped rows come (no send to tick on).
    import synpref.services.ingest.main as ingest

    monkeypatch.setattr(ingest, "HAND_OVER_IDS", 200, raising=False)
    monkeypatch.setattr(ingest, "HAND_OVER_S", 0.2, raising=False)
    handed: list[str] = []
    during: list[int] = []
    rows = pairs(500, dropped_at={460: 0.3, 500: 0.3}, snapshot=lambda: during.append(len(handed)))
    unacked, stopped = ingest.publish(Preprocessor(), rows, Producer(), "t", handed.extend)
    assert (unacked, stopped, len(handed)) == (0, "", 500)
    # In the loop, before its end: 400 by count, the next 60 and the last 40 by time, each on a dropped row.
    assert during == [500], during


def test_publish_stops_on_request_and_waits_a_bounded_time(monkeypatch):
    import synpref.services.ingest.main as ingest

    # Acknowledged only when flushed: the stop flushes, and every acknowledged id is handed over.
    pre, handed, producer = Preprocessor(), [], Producer(at_flush=True, stop_at=300)
    rows = (row(i, f"prompt {i}") for i in range(1000))
    unacked, stopped = ingest.publish(pre, rows, producer, "t", handed.extend, lambda: producer.stop)
    sent = len(producer.sent)
    assert (unacked, stopped, sent, len(handed), pre.counts.read) == (0, "SIGTERM received", 300, 300, 300)
    assert producer.flushes == 1 and pre.counts.reconciles()
    # A broker that no longer answers: the stop still ends within STOP_TIMEOUT_S (and STOP_CLOSE_S).
    monkeypatch.setattr(ingest, "STOP_TIMEOUT_S", 0.5)
    producer, started = Producer(hang=True, stop_at=300), time.monotonic()
    rows = (row(i, f"prompt {i}") for i in range(1000))
    unacked, stopped = ingest.publish(Preprocessor(), rows, producer, "t", handed.extend, lambda: producer.stop)
    assert (unacked, stopped, len(producer.sent), producer.flushes) == (300, "SIGTERM received", 300, 1)
    assert time.monotonic() - started < 5


def test_stop_on_signals_turns_sigterm_and_sigint_into_a_request(monkeypatch):
    from synpref.services.ingest.main import stop_on_signals

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with stop_on_signals() as stop:
        assert stop() == ""
        signal.raise_signal(signal.SIGTERM)
        assert stop() == "SIGTERM received"
        signal.raise_signal(signal.SIGINT)  # not a KeyboardInterrupt, and the first reason stands
        assert stop() == "SIGTERM received"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def fake_kafka(monkeypatch, producer) -> None:
    import synpref.services.ingest.main as ingest
    import synpref.shared.kafka.clients as clients

    monkeypatch.setattr(clients, "make_producer", lambda *a, **k: producer)
    monkeypatch.setattr(ingest, "topic_message_limit", lambda *a: None)


def test_cli_seen_file_cut_short_by_a_kill_is_appended_to_on_a_line_of_its_own(tmp_path, monkeypatch, capsys):
    from synpref.services.ingest.main import main

    fake_kafka(monkeypatch, Producer())
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps({"prompt": p, "chosen": "x", "rejected": "y"}) + "\n" for p in "abc"))
    ids = [r.pair.id for r in Preprocessor().run(row(i, p, "x", "y") for i, p in enumerate("abc"))]
    seen = tmp_path / "seen.txt"
    seen.write_text(ids[0] + "\n" + ids[1][:7])  # the last write of a killed run, cut short
    assert main([str(src), "--no-decontaminate", "--seen", str(seen)]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (counts["published"], counts["duplicate"], counts["unacknowledged"]) == (2, 1, 0), counts
    assert seen.read_text().splitlines() == [ids[0], ids[1][:7], ids[1], ids[2]]
    assert main([str(src), "--no-decontaminate", "--seen", str(seen)]) == 0  # and a rerun sends nothing
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["published"] == 0


# `synpref ingest --seen` in a process of its own, on a fake Kafka: acknowledged at once and SIGKILLed
# after FAKE_AT sends and a pause, or acknowledged when flushed and slow after FAKE_AT sends (for a SIGTERM).
CHILD = """
import os, signal, sys, time
import synpref.services.ingest.main as ingest
import synpref.shared.kafka.clients as clients
from testing.group_consumer import RecordingProducer

MODE, AT = os.environ["FAKE_MODE"], int(os.environ["FAKE_AT"])

class Producer(RecordingProducer):
    def __init__(self):
        super().__init__(at_flush=MODE == "term")
    def send(self, topic, value=None, key=None, headers=None, partition=None, timestamp_ms=None):
        n = len(self.sent) + 1
        if MODE == "kill":
            if n == AT + 1:
                os.kill(os.getpid(), signal.SIGKILL)
            if n == AT:
                time.sleep(ingest.HAND_OVER_S + 0.3 if hasattr(ingest, "HAND_OVER_S") else 1.3)
        else:
            if n == AT:
                print("READY", flush=True)
            if n > AT:
                time.sleep(0.02)
        return super().send(topic, value, key, headers, partition, timestamp_ms)

clients.make_producer = lambda *a, **k: Producer()
ingest.topic_message_limit = lambda *a: None
sys.exit(ingest.main(sys.argv[1:]))
"""


def ingest_child(tmp_path: Path, mode: str, at: int, n: int) -> tuple[subprocess.Popen, Path]:
    src, seen = tmp_path / "pairs.jsonl", tmp_path / "seen.txt"
    src.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "x", "rejected": "y"}) + "\n" for i in range(n)))
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))  # for testing/
    env = {**os.environ, "FAKE_MODE": mode, "FAKE_AT": str(at), "PYTHONPATH": path}
    env.pop("SYNPREF_CONFIG", None)
    argv = [sys.executable, "-c", CHILD, str(src), "--no-decontaminate", "--seen", str(seen)]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), seen


def finish(child: subprocess.Popen, timeout: float = 25) -> tuple[str, str]:
    try:
        return child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise


def test_cli_killed_run_has_recorded_what_was_acknowledged_a_second_before(tmp_path):
    # SIGKILL (an OOM kill, a node going away) runs no finally: 500 sends acknowledged, a second and more
    # passed, then the kill. Every one of them is in --seen (before the fix: none, until 10,000 were in flight).
    child, seen = ingest_child(tmp_path, "kill", at=500, n=2000)
    _, err = finish(child)
    assert child.returncode == -signal.SIGKILL, err[-2000:]
    ids = seen.read_text().splitlines()
    assert len(ids) == len(set(ids)) == 500


def test_cli_sigterm_stops_publishing_records_every_acknowledged_id_and_fails(tmp_path):
    # A Kubernetes Job deleted or evicted: SIGTERM, then SIGKILL 30 s later. Sending stops, the sends in
    # flight are flushed (acknowledged), their ids recorded, and the exit status says the run is unfinished.
    child, seen = ingest_child(tmp_path, "term", at=300, n=3000)
    assert child.stdout is not None and child.stdout.readline().strip() == "READY"
    child.send_signal(signal.SIGTERM)
    out, err = finish(child)
    assert child.returncode == 1, err[-2000:]
    assert "publishing stopped: SIGTERM received" in err
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts["reconciles"] and counts["unacknowledged"] == 0 and 300 <= counts["published"] < 3000, counts
    ids = seen.read_text().splitlines()
    assert len(ids) == len(set(ids)) == counts["published"]


def test_cli_seen_ids_come_from_disk_and_skip_earlier_pairs(tmp_path, capsys):
    from synpref.services.ingest.main import main

    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps({"prompt": p, "chosen": "x", "rejected": "y"}) + "\n" for p in "abc"))
    first = Preprocessor()
    ids = [r.pair.id for r in first.run(row(i, p, "x", "y") for i, p in enumerate("abc"))]
    seen = tmp_path / "seen.txt"
    seen.write_text(ids[0] + "\n" + ids[2] + "\n")
    assert main([str(src), "--dry-run", "--seen", str(seen)]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (counts["published"], counts["duplicate"]) == (1, 2), counts


def test_disk_id_set_answers_membership_before_and_after_a_flush(tmp_path):
    from synpref.shared.idset import DiskIdSet

    with DiskIdSet(flush_every=2) as ids:
        ids.add("a")
        assert "a" in ids and "b" not in ids and 7 not in ids
        ids.update(["b", "c", "a"])
        assert {"a", "b", "c"} <= {i for i in "abcd" if i in ids} and "d" not in ids
        assert len(ids) == 3
        folder = ids.path.parent
    assert not folder.exists()  # a temporary set leaves nothing behind
    kept = tmp_path / "ids.sqlite"
    with DiskIdSet(kept) as ids:
        ids.add("x")
    with DiskIdSet(kept) as ids:
        assert "x" in ids and len(ids) == 1
