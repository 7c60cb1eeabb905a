"""Chat backends: where a prompt becomes n sampled answers.

- OpenAIChat: any OpenAI-compatible /v1/chat/completions server (vLLM, SGLang, most
  providers) over aiohttp, with a concurrency limit, a per-request timeout, retries with
  exponential backoff on timeouts / connection errors / 429 / 5xx / a 200 with no choices (never
  sooner than the server's Retry-After, up to timeout_s), and JSON answers through `response_format`. A server
  that refuses `max_tokens` for `max_completion_tokens` (OpenAI's reasoning models) is sent the latter, and a
  server that answers fewer choices than `n` is asked for the missing samples one request each. The API key is
  read from the environment variable the settings name; none named: OPENAI_API_KEY for
  https://api.openai.com only, no key elsewhere (config_base.default_api_key_env).
- LocalChat (local_chat.py): a transformers causal LM in this process (sampling with `generate`).

A backend returns one entry per sample: the answer text, or None when no answer came back
(the request failed for good, or the answer was cut off at max_tokens). Callers turn None and
unparseable text into abstentions.

OpenAIChat counts its HTTP attempts and their time per model in Prometheus (JUDGE_ATTEMPTS,
JUDGE_SECONDS, JUDGE_GAVE_UP), so an operator sees which judge endpoint is slow or failing. Both backends count
their answers and those cut off (ChatStats, JUDGE_CUT_OFF), for the annotator's cut-off warning.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import aiohttp
from prometheus_client import Counter, Histogram

from synpref.shared.config_base import default_api_key_env

log = logging.getLogger(__name__)

# Defined once per process (prometheus_client refuses duplicates); backends differ by the model label.
JUDGE_ATTEMPTS = Counter(
    "synpref_judge_http_attempts",
    "HTTP requests to a chat endpoint, by model and result: ok, retryable (timeout, connection error, "
    "408/409/425/429/5xx, a 200 without JSON), bad_body (a 200 whose JSON holds no choices list: retried) or "
    "refused (another status: not retried)",
    ["model", "result"],
)
JUDGE_SECONDS = Histogram(
    "synpref_judge_http_seconds",
    "Time of one HTTP request to a chat endpoint, answer read, whatever its result",
    ["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120),
)
JUDGE_GAVE_UP = Counter(
    "synpref_judge_gave_up_calls",
    "Chat calls that got no answer after their retries: every sample of the call abstains",
    ["model"],
)
JUDGE_MISSING_CHOICES = Counter(
    "synpref_judge_missing_choices",
    "Samples a chat endpoint left out of an answer to `n` (a server that ignores n): asked again one request each, "
    "or at temperature 0 (another request would repeat the answer) left as abstentions",
    ["model"],
)
JUDGE_CUT_OFF = Counter(
    "synpref_judge_cut_off_answers",
    'Answers cut off at max_tokens (finish_reason "length"; a local judge: no end token within max_new_tokens): '
    "each abstains. A reasoning model's hidden reasoning counts against max_tokens: most of its answers cut off "
    "means annotator.max_tokens is too small for it",
    ["model"],
)

Messages = list[dict[str, str]]
# Every 5xx but the two that never change (501 Not Implemented, 505 HTTP Version Not Supported): a provider behind
# Cloudflare answers 520-524 for an origin that timed out or dropped, and some gateways 529 when overloaded.
RETRY_STATUS = {408, 409, 425, 429, *range(500, 600)} - {501, 505}
# Most seconds a server's Retry-After makes a judge wait before one retry: a provider's rate-limit window is
# seconds to a minute, and an hour-long answer (or a bogus date) must not park a Stage 2 batch.
MAX_RETRY_AFTER_S = 60.0
GAVE_UP_LOG_S = 60.0  # at most one give-up WARNING a backend per this many seconds: an outage gives up every call


def retry_after_s(value: str | None) -> float | None:
    """Seconds a Retry-After header asks to wait (delta-seconds or an HTTP-date), capped; None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        # An HTTP-date is GMT; "-0000" parses without a zone, which timestamp() would take as local time.
        seconds = when.replace(tzinfo=when.tzinfo or UTC).timestamp() - time.time()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


# (chat/completions URL, model) pairs whose server refused `max_tokens` and asked for `max_completion_tokens`: later
# requests, from any backend to that endpoint and model, send the latter directly.
_COMPLETION_TOKENS: set[tuple[str, str]] = set()
# ... and those whose server takes only its default temperature: later requests send none.
_DEFAULT_TEMPERATURE: set[tuple[str, str]] = set()


def refuses_max_tokens(status: int, text: str) -> bool:
    """Whether an error answer refuses the `max_tokens` parameter and asks for `max_completion_tokens` (OpenAI's
    o1/o3/o4-mini/gpt-5 models: "Unsupported parameter: 'max_tokens' ... Use 'max_completion_tokens' instead.").

    "supported" tells it from vLLM's "'max_tokens' or 'max_completion_tokens' is too large" (a prompt over the context).
    """
    text = text.lower()
    named = "max_tokens" in text.replace("max_completion_tokens", "")
    return status == 400 and named and "max_completion_tokens" in text and "supported" in text


def refuses_temperature(status: int, text: str) -> bool:
    """Whether an error answer refuses the request's temperature for the model's default (OpenAI's reasoning models:
    "Unsupported value: 'temperature' does not support 0.7 with this model. Only the default (1) value is
    supported.")."""
    text = text.lower()
    return status == 400 and "temperature" in text and "unsupported value" in text


def choice_texts(data: Any, n: int) -> list[str | None]:
    """The texts of the first `n` choices of a decoded answer (None for one cut off at max_tokens or of another
    shape); fewer than `n` when the answer holds fewer choices."""
    # Any other shape (choices null beside an error, a message that is not an object) is no answer.
    choices = data.get("choices") if isinstance(data, dict) else None
    texts: list[str | None] = []
    for choice in choices[:n] if isinstance(choices, list) else []:
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        # Cut off at max_tokens, an answer holds at best a draft of its verdict: no answer (an abstention), and
        # never cached, so a replay with a larger max_tokens asks again.
        if isinstance(choice, dict) and choice.get("finish_reason") == "length":
            content = None
        texts.append(content if isinstance(content, str) else None)
    return texts


def has_choices(data: Any) -> bool:
    """Whether a decoded 200 answer holds a non-empty `choices` list (its entries may still be of any shape)."""
    return isinstance(data, dict) and isinstance(data.get("choices"), list) and len(data["choices"]) > 0


class ChatBackend(Protocol):
    """A chat model the judges call: `name` identifies it in votes and logs."""

    name: str

    async def chat(
        self, messages: Messages, *, n: int, temperature: float, response_format: dict[str, Any] | None = None
    ) -> list[str | None]:
        """`n` sampled answers to `messages`; None stands for a sample that failed (an abstention)."""
        ...


@dataclass
class ChatStats:
    """Counts of HTTP requests sent, retries and calls given up on, and of the answers (choices) that came back and
    those of them cut off at max_tokens, per backend (LocalChat counts only the answers and cut-off ones)."""

    requests: int = 0
    retries: int = 0
    failures: int = 0
    answers: int = 0
    cut_off: int = 0


class OpenAIChat:
    """One model behind an OpenAI-compatible endpoint."""

    def __init__(
        self,
        model: str,
        base_url: str,
        api_key_env: str | None = None,
        *,
        semaphore: asyncio.Semaphore | None = None,
        max_concurrency: int = 8,
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_tokens: int = 512,
    ) -> None:
        self.name = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key_env = default_api_key_env(base_url) if api_key_env is None else api_key_env
        self._semaphore = semaphore
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_tokens = max_tokens
        self.stats = ChatStats()
        self._gave_up_logged: tuple[float, int] | None = None  # when the last give-up was logged, and failures then
        # A session and a semaphore belong to the event loop they were first used on, and one
        # backend is called from several loops (the controller runs an Annotator, each with its
        # own loop, per stage): one of each per loop.
        self._sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}
        self._semaphores: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    @property
    def semaphore(self) -> asyncio.Semaphore:
        """The semaphore bounding concurrent requests: the shared one if given, else one of max_concurrency
        for the running event loop."""
        if self._semaphore is not None:
            return self._semaphore
        loop = asyncio.get_running_loop()
        if loop not in self._semaphores:
            self._forget_closed_loops()
            self._semaphores[loop] = asyncio.Semaphore(self.max_concurrency)
        return self._semaphores[loop]

    async def session(self) -> aiohttp.ClientSession:
        """The running event loop's aiohttp session, opened on first use and reopened after close."""
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None or session.closed:
            self._forget_closed_loops()
            # limit=0: the semaphore bounds the requests. aiohttp's default pool of 100 connections capped a larger
            # max_concurrency, and a request queued for a connection spent its timeout_s there, then was retried.
            session = self._sessions[loop] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            )
        return session

    def _forget_closed_loops(self) -> None:
        # A closed loop can no longer run its session's close(): drop what belonged to it.
        for loop in [loop for loop in self._sessions if loop.is_closed()]:
            del self._sessions[loop]
        for loop in [loop for loop in self._semaphores if loop.is_closed()]:
            del self._semaphores[loop]

    async def close(self) -> None:
        """Close the running event loop's HTTP session, if open."""
        session = self._sessions.pop(asyncio.get_running_loop(), None)
        if session is not None:
            await session.close()

    async def chat(
        self, messages: Messages, *, n: int, temperature: float, response_format: dict[str, Any] | None = None
    ) -> list[str | None]:
        """`n` answers from one chat/completions call; None for every sample when the call fails after retries.

        Samples a server leaves out (one that ignores `n`) are asked for one request each; at temperature 0 another
        request would repeat the answer, so they are None.
        """
        tokens_key = "max_completion_tokens" if (self.url, self.name) in _COMPLETION_TOKENS else "max_tokens"
        body: dict[str, Any] = {
            "model": self.name,
            "messages": messages,
            "n": n,
            "temperature": temperature,
            tokens_key: self.max_tokens,
        }
        if (self.url, self.name) in _DEFAULT_TEMPERATURE:
            del body["temperature"]
        if response_format is not None:
            body["response_format"] = response_format
        data = await self._post(body)
        if data is None:
            return [None] * n
        texts = choice_texts(data, n)
        self._count_answers(data, n)
        missing = n - len(texts)
        if missing:
            # Padded with abstentions, the judge got one vote per candidate order whatever its `samples`, and never
            # cached the call, so every replay asked again for the same short answer.
            JUDGE_MISSING_CHOICES.labels(self.name).inc(missing)
            if temperature > 0:
                log.info("%s: %d of %d choices answered; asking for the rest one at a time", self.name, n - missing, n)
                more = await asyncio.gather(*(self._post({**body, "n": 1}) for _ in range(missing)))
                for answer in more:
                    texts += choice_texts(answer, 1) if answer is not None else [None]
                    self._count_answers(answer, 1)
        return texts + [None] * (n - len(texts))

    def _count_answers(self, data: Any, n: int) -> None:
        """Count the first `n` choices of an answer and those cut off at max_tokens (the annotator warns when most
        of a batch's are: each is an abstention, and a reasoning model may spend all of max_tokens reasoning)."""
        choices = data.get("choices") if isinstance(data, dict) else None
        choices = choices[:n] if isinstance(choices, list) else []
        cut = sum(isinstance(c, dict) and c.get("finish_reason") == "length" for c in choices)
        self.stats.answers += len(choices)
        self.stats.cut_off += cut
        if cut:
            JUDGE_CUT_OFF.labels(self.name).inc(cut)

    async def _post(self, body: dict[str, Any]) -> dict[str, Any] | None:
        session = await self.session()
        for attempt in range(self.retries + 1):
            async with self.semaphore:
                self.stats.requests += 1
                started = time.monotonic()
                data, error, retryable, wait_s = await self._attempt(session, body)
                JUDGE_SECONDS.labels(self.name).observe(time.monotonic() - started)
            result = "ok" if error is None else "retryable" if retryable else "refused"
            if error is None and not has_choices(data):
                # null, a list, or a proxy's or provider's error object sent with status 200: counted ok, every sample
                # abstained and no give-up was counted, so the endpoint looked healthy while it answered nothing.
                # Often transient (a gateway's error page): asked again like a 5xx, within the same retries.
                error, retryable, result = f"200 without choices: {str(data)[:200]}", True, "bad_body"
            JUDGE_ATTEMPTS.labels(self.name, result).inc()
            if error is None:
                return data
            if not retryable:
                self._give_up(f"{error} (not retried)")
                return None
            if attempt < self.retries:
                self.stats.retries += 1
                delay = self.backoff_s * (2**attempt) * (0.5 + random.random())
                # A rate-limited (429) or overloaded (503) server says when to come back: retrying sooner only
                # spends the retries, and the judge abstains while the provider is still refusing. No longer
                # than one request may take, so a call stays within what timeout_s and retries promise.
                delay = max(delay, min(wait_s or 0.0, self.timeout_s))
                # DEBUG: a 429 storm retries every call of a batch (counted in synpref_judge_attempts_total).
                log.debug("%s: %s; retry %d/%d in %.2fs", self.name, error, attempt + 1, self.retries, delay)
                await asyncio.sleep(delay)
        self._give_up(f"giving up after {self.retries + 1} attempts: {error}")
        return None

    def _give_up(self, why: str) -> None:
        """Count a call given up on; log it unless another was logged in the last GAVE_UP_LOG_S (then the next one
        logged says how many were not). An endpoint that is down fails every call of a batch, hundreds at once."""
        self.stats.failures += 1
        JUDGE_GAVE_UP.labels(self.name).inc()
        now, last = time.monotonic(), self._gave_up_logged
        if last is None or now - last[0] >= GAVE_UP_LOG_S:
            unlogged = self.stats.failures - last[1] - 1 if last else 0
            more = f" ({unlogged} others given up since the last one logged)" if unlogged else ""
            log.warning("%s: %s%s", self.name, why, more)
            self._gave_up_logged = (now, self.stats.failures)

    async def _attempt(
        self, session: aiohttp.ClientSession, body: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, str | None, bool, float | None]:
        """One HTTP request: (the decoded answer, None, _, _) or (None, what went wrong, whether to retry, the
        server's Retry-After in seconds or None)."""
        try:
            async with session.post(self.url, json=body, headers=self._headers()) as resp:
                if resp.status == 200:
                    try:
                        return await resp.json(content_type=None), None, False, None
                    except (ValueError, aiohttp.ContentTypeError) as exc:
                        return None, f"invalid JSON body: {exc}", True, None
                # errors="replace": a proxy's error page in another charset must not turn a 502 into an exception.
                status, text = resp.status, await resp.text(errors="replace")
                wait_s = retry_after_s(resp.headers.get("Retry-After"))
        except (TimeoutError, aiohttp.ClientError) as exc:
            return None, f"{type(exc).__name__}: {exc}", True, None
        if "max_tokens" in body and refuses_max_tokens(status, text):
            # Every call to the model was a 400 and every vote abstained. Sent again at once (the body now holds no
            # max_tokens, so once), not counted as a retry; the endpoint and model keep the choice.
            log.info("%s: the server takes max_completion_tokens, not max_tokens: sending that", self.name)
            _COMPLETION_TOKENS.add((self.url, self.name))
            body["max_completion_tokens"] = body.pop("max_tokens")
            self.stats.requests += 1
            return await self._attempt(session, body)
        if "temperature" in body and refuses_temperature(status, text):
            # The same for a model that samples only at its default temperature (1 for OpenAI's reasoning models):
            # its samples differ from one another all the same, which is what `samples` asks for.
            refused = body.pop("temperature")
            log.warning("%s: the server takes only its default temperature, not %s: sending none", self.name, refused)
            _DEFAULT_TEMPERATURE.add((self.url, self.name))
            self.stats.requests += 1
            return await self._attempt(session, body)
        return None, f"HTTP {status}: {text[:200]}", status in RETRY_STATUS, wait_s
