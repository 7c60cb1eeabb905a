"""A deterministic OpenAI-compatible chat server on loopback, for tests and benchmarks.

It speaks POST /v1/chat/completions like vLLM's server and answers the annotator's two
prompts: attribute requests get a 5-tuple, judge requests prefer the longer candidate
(a fixed, checkable rule). The model name picks a behaviour, so one server covers the
failure modes a real endpoint has:

  <any>            deterministic JSON answers
  *malformed*      prose that is not JSON (parsers must abstain)
  *slow*           sleeps `slow_s` before answering (clients must time out and retry)
  *flaky*          the first `fail_first` requests per prompt answer 503, then succeed
  *down*           always 503
  *cost*           sleeps `cost_s` per request (fixed-cost model calls for benchmarks)

GET /stats returns request counts per model; `FakeOpenAI.requests` is the same in process.
Run standalone from the repo root: python -m testing.fake_judges --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from synpref.services.annotator.prompts import ATTRIBUTE_SYSTEM

CATEGORIES = ("advice", "coding", "creative writing", "math", "safety", "summarization")
_CANDIDATE = re.compile(r"## Candidate 1\n(.*?)\n\n## Candidate 2\n(.*?)\n\nWhich candidate is better\?", re.DOTALL)


def attribute_answer(prompt: str) -> dict[str, Any]:
    digest = int(hashlib.sha256(prompt.encode()).hexdigest(), 16)
    return {
        "task_category": CATEGORIES[digest % len(CATEGORIES)],
        "objectivity": "objective" if digest % 2 else "subjective",
        "controversiality": ("low", "medium", "high")[digest % 3],
        "desired_attributes": ["helpful", "correct"],
        "annotation_guideline": "Prefer the answer that is correct and addresses the request fully.",
    }


def judge_answer(prompt: str) -> dict[str, Any]:
    match = _CANDIDATE.search(prompt)
    if not match:
        return {"rationale": "no candidates found", "better": 0}
    first, second = match.group(1), match.group(2)
    if len(first) == len(second):
        return {"rationale": "equal length", "better": 0}
    return {"rationale": "more complete", "better": 1 if len(first) > len(second) else 2}


class FakeOpenAI:
    def __init__(self, slow_s: float = 2.0, fail_first: int = 2, cost_s: float = 0.0) -> None:
        self.slow_s = slow_s
        self.fail_first = fail_first
        self.cost_s = cost_s
        self.requests: Counter[str] = Counter()
        self.auth: Counter[str] = Counter()
        self._attempts: Counter[str] = Counter()
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_get("/stats", self.stats)
        return app

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": dict(self.requests)})

    async def completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        model = str(body.get("model", ""))
        self.requests[model] += 1
        self.auth[request.headers.get("Authorization", "")] += 1
        messages = body.get("messages", [])
        prompt = messages[-1]["content"] if messages else ""
        n = int(body.get("n", 1))
        if "down" in model:
            return web.json_response({"error": {"message": "unavailable"}}, status=503)
        if "forbidden" in model:  # a status the client must not retry
            return web.json_response({"error": {"message": "no access to this model"}}, status=403)
        if "flaky" in model:
            key = model + hashlib.sha256(prompt.encode()).hexdigest()
            self._attempts[key] += 1
            if self._attempts[key] <= self.fail_first:
                return web.json_response({"error": {"message": "overloaded"}}, status=503)
        if "slow" in model:
            await asyncio.sleep(self.slow_s)
        if "cost" in model or self.cost_s:
            await asyncio.sleep(self.cost_s)
        if "malformed" in model:
            contents = ["I think the first one is better, probably."] * n
        elif messages and messages[0].get("content") == ATTRIBUTE_SYSTEM:
            contents = [json.dumps(attribute_answer(prompt))] * n
        else:
            contents = [json.dumps(judge_answer(prompt))] * n
        return web.json_response(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "model": model,
                "choices": [
                    {"index": i, "message": {"role": "assistant", "content": c}, "finish_reason": "stop"}
                    for i, c in enumerate(contents)
                ],
                "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": 10 * n},
            }
        )

    async def _start(self, port: int) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def start(self, port: int = 0) -> FakeOpenAI:
        """Serve from a background thread; returns once the port is bound."""
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def serve() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start(port))
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="fake-openai", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake OpenAI server did not start")
        return self

    def stop(self) -> None:
        if self._loop is None or self._runner is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--cost-s", type=float, default=0.0, help="fixed seconds per request")
    args = parser.parse_args(argv)
    server = FakeOpenAI(cost_s=args.cost_s)
    web.run_app(server.app(), host="127.0.0.1", port=args.port, access_log=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


TIDES_ATTRIBUTES = (
    '{"task_category": "science", "objectivity": "objective", "controversiality": "low", '
    '"desired_attributes": ["correct"], "annotation_guideline": "Prefer correct physics."}'
)
"""A labeller's answer holding every attribute, for tests of the judges' HTTP path."""


def tides_request() -> Any:
    """A one-turn JudgeRequest (pair "p1": tides, the moon against wind), for tests of the judges' HTTP path."""
    from synpref.services.annotator.judges import JudgeRequest

    return JudgeRequest(
        "p1",
        [{"role": "user", "content": "Explain tides."}],
        [{"role": "assistant", "content": "The moon's gravity."}],
        [{"role": "assistant", "content": "Wind."}],
    )


async def chat_once_against(handler: Any, n: int = 1, **chat_kwargs: Any) -> tuple[list[str | None], int]:
    """One OpenAIChat call against an aiohttp `handler(attempt)` on a loopback port, where `attempt` counts the
    requests from 1; (the answers, how many requests the handler saw). For tests of a judge endpoint's odd
    replies (error pages, rate limits) that the named behaviours above do not cover."""
    from synpref.services.annotator.chat import OpenAIChat

    seen: list[int] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        seen.append(1)
        return handler(len(seen))

    async with completions_served(completions) as base_url:
        chat = OpenAIChat("m", base_url, **chat_kwargs)
        try:
            return await chat.chat([{"role": "user", "content": "x"}], n=n, temperature=0.0), len(seen)
        finally:
            await chat.close()


@asynccontextmanager
async def completions_served(
    completions: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """`completions` served as POST /v1/chat/completions on a loopback port; yields the base URL (…/v1)."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()
