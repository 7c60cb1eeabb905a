"""Session 40's small defects: the admin client on a 200 that is not the scorer's JSON, the token cache's
forkserver left up for the whole training run, oversized pairs decontaminated before being refused, and the
controller's intake taking pairs too large for the Kafka topics."""

from __future__ import annotations

import http.server
import json
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from synpref.services.controller.intake import ingest_sources
from synpref.services.ingest.preprocess import Decontaminator, Preprocessor
from synpref.shared.config import load_settings
from synpref.shared.kafka.message_limit import MessageLimit
from synpref.shared.pairstore import PairStore
from synpref.shared.scorer_admin import ScorerAdminError, admin_post
from synpref.shared.sources import SourceRow
from synpref.training import parallel_encoding
from synpref.training.parallel_encoding import PairEncoding
from testing.tiny import build_tiny_tokenizer
from tests.unit.test_train_token_store import make_pairs

# --- 1. admin_post on a 200 that is not a JSON object ---------------------------------------------------------


class FixedAnswer(http.server.BaseHTTPRequestHandler):
    """Answers every POST 200 with the server's `body` and `content_type` (a proxy's page, a misrouted Service)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body: bytes = self.server.body  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", self.server.content_type)  # type: ignore[attr-defined]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def answering() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), FixedAnswer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def url_of(server: http.server.HTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host!s}:{port}"


HTML_PAGE = b"<html><head><title>502 Bad Gateway</title></head><body>" + b"x" * 1000 + b"</body></html>"


@pytest.mark.parametrize(
    ("body", "content_type", "shown"),
    [
        (HTML_PAGE, "text/html", "<html><head><title>502 Bad Gateway"),
        (b'["best", "v4"]', "application/json", '["best", "v4"]'),
        (b'"reloaded"', "application/json", '"reloaded"'),
        (b"\xff\xfe not text", "application/octet-stream", "not text"),
    ],
)
def test_a_200_that_is_not_a_json_object_is_an_admin_error_naming_the_url_and_the_answer(
    answering: http.server.HTTPServer, body: bytes, content_type: str, shown: str
) -> None:
    answering.body, answering.content_type = body, content_type  # type: ignore[attr-defined]
    with pytest.raises(ScorerAdminError) as caught:
        admin_post(url_of(answering), "/admin/reload", {"model": "best"}, "token", timeout_s=10)
    message = str(caught.value)
    assert caught.value.status == 0
    assert url_of(answering) + "/admin/reload" in message and shown in message
    assert len(message) < 400  # the first 200 characters of the page, not all of it


def test_a_200_with_a_json_object_or_nothing_is_the_answer(answering: http.server.HTTPServer) -> None:
    answering.body, answering.content_type = b'{"model": "best", "version": "v4"}', "application/json"  # type: ignore[attr-defined]
    assert admin_post(url_of(answering), "/admin/reload", {}, "t", timeout_s=10) == {"model": "best", "version": "v4"}
    answering.body = b""  # type: ignore[attr-defined]
    assert admin_post(url_of(answering), "/admin/unload", {}, "t", timeout_s=10) == {}


# --- 2. the token cache's forkserver ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):  # type: ignore[no-untyped-def]
    texts = [m["content"] for p in make_pairs(40) for part in ("conversation", "chosen", "rejected") for m in p[part]]
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), texts, vocab_size=300)


def forkserver_pid() -> int | None:
    return multiprocessing.forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]


def children() -> set[int]:
    return {child.pid for child in psutil.Process(os.getpid()).children(recursive=True)}


@pytest.fixture
def no_forkserver() -> Iterator[None]:
    # Another test in this process may have left one up (a pool of its own): start from none, end with none.
    multiprocessing.forkserver._forkserver._stop()  # type: ignore[attr-defined]
    yield
    multiprocessing.forkserver._forkserver._stop()  # type: ignore[attr-defined]


@pytest.mark.parametrize("fails", [False, True])
def test_the_forkserver_the_encoding_started_is_gone_when_it_ends(
    tokenizer, monkeypatch: pytest.MonkeyPatch, no_forkserver: None, fails: bool
) -> None:
    monkeypatch.setattr(parallel_encoding, "INLINE_PAIRS", 2)
    monkeypatch.setattr(parallel_encoding, "CHUNK_PAIRS", 3)
    rows = make_pairs(30)
    if fails:
        del rows[20]["chosen"]  # fails in a worker: the build stops with the error
    before = children()
    with PairEncoding(tokenizer, 64, "left_turns", workers=2) as encoding:
        try:
            assert len(list(encoding.map(rows))) == 30
        except KeyError:
            assert fails
        server = forkserver_pid()
        assert server is not None and server in children()  # the workers came from it
    assert forkserver_pid() is None
    # multiprocessing's resource tracker (started with the forkserver, a few MB, none of the preloaded modules)
    # serves any later pool or shared memory of the process and is not the encoding's to stop.
    tracker = multiprocessing.resource_tracker._resource_tracker._pid  # type: ignore[attr-defined]
    left = {pid: psutil.Process(pid).cmdline() for pid in children() - before - {tracker}}
    assert left == {}


def test_a_forkserver_that_was_up_before_stays_up(
    tokenizer, monkeypatch: pytest.MonkeyPatch, no_forkserver: None
) -> None:
    monkeypatch.setattr(parallel_encoding, "INLINE_PAIRS", 2)
    multiprocessing.forkserver.ensure_running()
    server = forkserver_pid()
    with PairEncoding(tokenizer, 64, "left_turns", workers=2) as encoding:
        assert len(list(encoding.map(make_pairs(30)))) == 30
        assert encoding.pool is not None
    assert forkserver_pid() == server and server in children()


# --- 3. ingest refuses a pair over the limit before decontaminating it -----------------------------------------

BENCHMARK_PROMPT = "please list every prime number between one hundred and two hundred in increasing order thanks"


def source_row(i: int, prompt: str, chosen: str = "good") -> SourceRow:
    pair = {
        "conversation": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": "bad"}],
        "source": "test",
        "meta": {"i": str(i)},
    }
    return SourceRow("t.jsonl", i, pair=pair)


def test_a_pair_whose_text_is_over_the_limit_is_refused_before_the_ngram_check(monkeypatch: pytest.MonkeyPatch) -> None:
    decontaminator = Decontaminator([BENCHMARK_PROMPT])
    checked: list[int] = []
    overlap = decontaminator.overlap
    monkeypatch.setattr(decontaminator, "overlap", lambda text: checked.append(len(text)) or overlap(text))
    pre = Preprocessor(decontaminator, too_large=MessageLimit(4096, "topic raw"))
    rows = [
        source_row(0, "hello"),
        source_row(1, BENCHMARK_PROMPT + " word" * 1000),  # contaminated, its text alone over: oversized wins
        source_row(2, BENCHMARK_PROMPT + " word" * 100),  # contaminated, well within the limit
        source_row(3, "fine", chosen="y" * 4000),  # its text within, its record (ids, framing) over the limit
        source_row(4, "x" * 4097),  # one character over
    ]
    assert [r.pair.meta["i"] for r in pre.run(rows)] == ["0"]
    buckets = [(r.locator, r.bucket) for r in pre.rejections]
    assert buckets == [
        ("t.jsonl#1", "oversized"),
        ("t.jsonl#2", "contaminated"),
        ("t.jsonl#3", "oversized"),
        ("t.jsonl#4", "oversized"),
    ]
    chars = len(BENCHMARK_PROMPT) + 5000 + len("good") + len("bad")
    assert (
        pre.rejections[0].reason
        == f"its text alone is {chars} characters, over the 4096-byte message limit of topic raw"
    )
    assert pre.rejections[2].reason.startswith("record of ")
    assert pre.counts.reconciles() and (pre.counts.oversized, pre.counts.contaminated) == (3, 1)
    # Rows 1 and 4 were never cut into words: only the rows within the bound were checked.
    assert len(checked) == 3 and max(checked) < 4096


# --- 4. the controller's intake applies the topics' message limit ----------------------------------------------


def write_pairs(path: Path, chosen_texts: list[str]) -> None:
    lines = [{"prompt": f"question {i}", "chosen": text, "rejected": f"no {i}"} for i, text in enumerate(chosen_texts)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.mark.parametrize(
    ("limit", "big"),
    [
        (None, 9 * 1024 * 1024),  # the default kafka.max_message_bytes (8 MiB): a 9 MiB answer is over it
        (4096, 3900),  # a smaller limit; this pair's text is within it, its record is not
    ],
)
def test_the_controllers_intake_counts_a_pair_too_large_for_the_topics_as_oversized(
    tmp_path: Path, limit: int | None, big: int
) -> None:
    source = tmp_path / "pairs.jsonl"
    write_pairs(source, [f"yes {i}" for i in range(30)] + ["z" * big])
    settings = load_settings(
        controller={"workdir": str(tmp_path / "run"), "sources": [str(source)], "decontaminate": []}
    )
    store = PairStore(tmp_path / "run" / "pairs.sqlite")
    kwargs = {} if limit is None else {"max_message_bytes": limit}
    results = ingest_sources(store, settings.controller, lambda _m: None, **kwargs)
    counts = results["ingest"]["counts"]
    assert (counts["read"], counts["published"], counts["oversized"]) == (31, 30, 1)
    assert store.size() == 30
