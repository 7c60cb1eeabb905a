"""The desk in a real headless Chromium (Debian's package, driven by Playwright) on loopback.

Each test logs in, labels three pairs by keyboard only, checks that a pair holding a
<script> tag shows it as text, that requests without a token are refused, and keeps a
screenshot under artifacts/desk/ (its path is printed). One test runs on the embedded
in-memory backend, one on a real Kafka broker.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from synpref.services.desk import DeskServer, MemoryReviewQueue, MemoryVerdictSink, ReviewDesk
from synpref.shared.config import DeskSettings
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import Attributes, PairRecord, Preference

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "desk"
TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789ab"}
SCRIPT_TEXT = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"><b>bold?</b>'
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def review_records(tag: str) -> list[PairRecord]:
    """Three pairs: the second holds HTML and script; the first carries attributes and an example."""
    out = []
    for i, question in enumerate([f"What is 2+2? ({tag})", SCRIPT_TEXT, f"Name a prime above 20. ({tag})"]):
        rec = new_record(
            new_pair(
                [{"role": "user", "content": question}],
                [{"role": "assistant", "content": f"GOOD answer {i} {tag}"}],
                [{"role": "assistant", "content": f"BAD answer {i} {tag} </div><script>window.__pwned = 3</script>"}],
                source="browser-test",
            )
        )
        if i == 0:
            rec.attributes.CopyFrom(
                Attributes(
                    task_category="math",
                    objectivity=1,
                    controversiality=1,
                    desired_attributes=["correct", "concise"],
                    annotation_guideline="Prefer the arithmetically correct answer.",
                )
            )
            rec.retrieved_example_ids.append("example-not-on-this-desk")
        out.append(rec)
    return out


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail("Debian chromium is missing: run `bash tools/chromium/install.sh` (make setup does)")
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="synpref-desk-chromium-")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def label_three_by_keyboard(context: Any, url: str, shot: Path) -> dict[str, str]:
    """Log in and label three pairs with keys only; returns pair_id -> the word of the picked answer."""
    from playwright.sync_api import expect

    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.fill("#token", TOKENS["alice"])
    page.keyboard.press("Enter")
    page.wait_for_selector("#annotator:has-text('alice')")
    picked: dict[str, str] = {}
    for i in range(3):
        expect(page.locator("#progress-line")).to_have_text(re.compile(rf"^done {i} "))
        page.wait_for_selector("#cand-1-body .content")
        first = page.inner_text("#cand-1-body .content")
        conversation = page.inner_text("#conversation .content")
        pair_meta = page.inner_text("#pair-meta")
        if i == 0:
            expect(page.locator("#attributes")).to_contain_text("Prefer the arithmetically correct answer.")
            page.screenshot(path=str(shot), full_page=True)
            print(f"desk screenshot: {shot}")
        if conversation == SCRIPT_TEXT:
            # The script tag is on screen as text and none of the page's HTML was injected.
            assert page.locator("script").count() == 1
            assert page.locator("#conversation img, #conversation b").count() == 0
            assert page.evaluate("() => window.__pwned === undefined")
            script_shot = shot.with_name(shot.stem + "-script.png")
            page.screenshot(path=str(script_shot), full_page=True)
            print(f"desk screenshot: {script_shot}")
        # Pair 0: pick GOOD; pair 1: pick BAD (must come out flipped); pair 2: GOOD with a note.
        want = "BAD" if i == 1 else "GOOD"
        page.keyboard.press("1" if first.startswith(want) else "2")
        if i == 2:
            page.keyboard.press("n")
            page.keyboard.type("checked by keyboard <b>not bold</b>")
            page.keyboard.press("Escape")
        assert page.get_attribute("#submit", "disabled") is None
        page.keyboard.press("Enter")
        picked[pair_meta.split(" ")[0]] = want
    expect(page.locator("#progress-line")).to_have_text(re.compile(r"^done 3 "))
    page.wait_for_selector("#empty:not([hidden])")
    # With nothing left, no stale pair stays on screen.
    expect(page.locator(".candidates")).to_be_hidden()
    expect(page.locator("#examples-card")).to_be_hidden()
    assert page.evaluate("() => window.__pwned === undefined")
    assert errors == []
    # The same origin without a token gets nothing.
    for path in ("/api/next", "/api/progress", "/api/session"):
        assert page.request.get(url + path).status == 401
    assert page.request.post(url + "/api/verdict", data={"pair_id": "x", "choice": 1}).status == 401
    page.close()
    return picked


def check_verified(routed: list[tuple[str, PairRecord]], picked: dict[str, str]) -> None:
    assert [route for route, _ in routed] == ["verified"] * 3
    for _, rec in routed:
        original = rec.lineage.original_id or rec.pair.id
        want = next(word for prefix, word in picked.items() if original.startswith(prefix))
        # D_gold holds what the annotator preferred as `chosen`.
        assert rec.pair.chosen[0].content.startswith(f"{want} answer")
        [verdict] = rec.human_verdicts
        assert verdict.annotator == "alice" and verdict.preference == Preference.PREFERENCE_CHOSEN
        assert verdict.at.seconds > time.time() - 600
    notes = [rec.human_verdicts[0].note for _, rec in routed]
    assert "checked by keyboard <b>not bold</b>" in notes


def test_browser_labels_three_pairs_on_the_embedded_backend(browser: Any) -> None:
    queue, sink = MemoryReviewQueue(), MemoryVerdictSink()
    desk = ReviewDesk(queue, sink, DeskSettings(), tokens=TOKENS)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with DeskServer(desk) as server:
        queue.push(review_records("embedded"))
        started = time.perf_counter()
        picked = label_three_by_keyboard(browser, server.url, ARTIFACTS / "desk-embedded.png")
        print(f"embedded: logged in and labelled 3 pairs in {time.perf_counter() - started:.2f} s")
        result = sink.drain(min_records=3, timeout_s=10)
    check_verified(result.routed, picked)
    assert queue.acked == 3


def test_browser_labels_three_pairs_on_kafka(browser: Any, kafka_settings: Any, unique_topics: Any) -> None:
    from kafka_broker import produce, read_topic

    from synpref.services.desk.kafka_queue import KafkaDeskQueues
    from synpref.shared.kafka.codec import decode_record

    topics = unique_topics(partitions=1)
    settings = kafka_settings.model_copy(update={"topics": topics})
    produce(settings.kafka, topics.review, review_records("kafka"))
    queues = KafkaDeskQueues(settings.kafka, topics, group_id=f"desk-{topics.review}")
    desk = ReviewDesk(queues.source, queues.sink, DeskSettings(), tokens=TOKENS)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with DeskServer(desk) as server:
        started = time.perf_counter()
        picked = label_three_by_keyboard(browser, server.url, ARTIFACTS / "desk-kafka.png")
        labelled = time.perf_counter()
        messages = read_topic(settings.kafka, topics.verified, expect=3, timeout_s=30)
        print(
            f"kafka: logged in and labelled 3 pairs in {labelled - started:.2f} s; "
            f"verdicts on {topics.verified} {time.perf_counter() - labelled:.2f} s later"
        )
        # Offsets are committed only once each pair's decision is on the broker.
        assert server.call(queues.committed()) == {0: 3}
    check_verified([("verified", decode_record(m.value, m.headers)) for m in messages], picked)
    assert read_topic(settings.kafka, topics.discarded, expect=0, timeout_s=1) == []


def test_browser_two_annotators_on_one_pair_see_their_agreement(browser: Any) -> None:
    from playwright.sync_api import expect

    queue, sink = MemoryReviewQueue(), MemoryVerdictSink()
    desk = ReviewDesk(queue, sink, DeskSettings(overlap=2), tokens=TOKENS)
    rec = review_records("overlap")[0]
    with DeskServer(desk) as server:
        queue.push([rec])
        pages = {}
        for who in ("alice", "bob"):
            page = browser.new_page()
            page.goto(server.url)
            page.fill("#token", TOKENS[who])
            page.keyboard.press("Enter")
            page.wait_for_selector(f"#annotator:has-text('{who}')")
            page.wait_for_selector("#cand-1-body .content")
            pages[who] = page
        # Both were given the same pair (overlap 2), each in their own candidate order.
        for page in pages.values():
            first = page.inner_text("#cand-1-body .content")
            page.keyboard.press("1" if first.startswith("GOOD") else "2")
            page.keyboard.press("Enter")
            expect(page.locator("#progress-line")).to_have_text(re.compile(r"^done 1 "))
        bob = pages["bob"]
        expect(bob.locator("#agreement")).to_contain_text("mean agreement 100%")
        expect(bob.locator("#agreement-recent")).to_contain_text("verified")
        shot = ARTIFACTS / "desk-overlap.png"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        bob.screenshot(path=str(shot), full_page=True)
        print(f"desk screenshot: {shot}")
        for page in pages.values():
            page.close()
        [(route, out)] = sink.drain(min_records=1, timeout_s=10).routed
    assert route == "verified" and out.human_aggregate.agreement == 1.0
    assert sorted(v.annotator for v in out.human_verdicts) == ["alice", "bob"]
