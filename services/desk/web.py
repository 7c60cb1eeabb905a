"""The desk's web shell: an aiohttp app over DeskCore, a source and a sink.

API (every /api route needs `Authorization: Bearer <token>`; 401 otherwise, and 429 with
Retry-After once a client address has failed too often, see FailedAuthThrottle and client_address):
  GET  /api/session   who am I, the general guideline, the overlap
  GET  /api/next      my current pair (or a new one) and my progress; 503 + Retry-After while the queue is away
  POST /api/verdict   {"pair_id": str, "assignment": str, "choice": 1 | 2 | 0, "note": str}
  GET  /api/progress  done / waiting per annotator, outcomes, agreement
The page (/, /static/*) holds no data, so it is served without a token; it renders
every pair field with textContent under a Content-Security-Policy that allows only
this origin's own script and style. Every response the app makes, errors included, carries
the same security headers; an error body is JSON {"error": str} and never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import IPvAnyNetwork

from synpref.services.desk.core import MAX_NOTE, Decided, DeskCore, DeskError, parse_verdict
from synpref.services.desk.queues import ReviewSource, VerdictSink
from synpref.services.desk.tokens import FailedAuthThrottle, TokenTable, check_overlap, load_tokens
from synpref.shared.config import ConfigError, DeskSettings
from synpref.v1.pair_pb2 import PairRecord

log = logging.getLogger("synpref.desk")

STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"desk.js": "text/javascript", "desk.css": "text/css"}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
TICK_S = 0.5
MAX_BODY = 16 * 1024
QUEUE_RETRY_S = 5
"""Retry-After of /api/next's 503 while the review queue cannot be read."""


class QueueUnreachable(Exception):
    """The review source cannot be read (a Kafka broker away, a fetch error): no fault of the desk, so /api/next
    answers 503 with Retry-After, not 500."""


class ReviewDesk:
    """Pairs in from `source`, decisions out to `sink`; the Python API of the embedded loop.

    `refill` pulls new pairs (up to settings.max_pending held at once); `submit` records a
    verdict and, once a pair is decided, writes it and only then acknowledges the source.
    A decision the sink could not write stays in an outbox retried on every tick. A pair that
    arrives again after its decision (a redelivery, or a later iteration) is not shown again:
    its earlier decision is written once more.
    """

    def __init__(
        self,
        source: ReviewSource,
        sink: VerdictSink,
        settings: DeskSettings | None = None,
        tokens: dict[str, str] | None = None,
        examples: Iterable[PairRecord] = (),
        core: DeskCore | None = None,
    ) -> None:
        self.settings = settings or DeskSettings()
        self.source, self.sink = source, sink
        self.core = core or DeskCore(overlap=self.settings.overlap, lease_s=self.settings.lease_s)
        self.tokens = TokenTable(tokens if tokens is not None else load_tokens(self.settings))
        if not len(self.tokens):
            # A desk nobody can log in to would leave its pairs waiting forever.
            raise ConfigError("the desk has no annotator tokens: set SYNPREF_DESK__TOKENS or desk.tokens_file")
        check_overlap(self.core.overlap, len(self.tokens))
        for record in examples:
            self.core.add_example(record)
        self._outbox: list[Decided] = []
        self._acks: list[Any] = []
        """Source handles settled without a write (duplicates), or whose ack failed: acked on the next flush."""
        self._io = asyncio.Lock()
        self._tick_error = ""
        self._queue_down = False  # the source could not be read last time: an outage is logged once, at its start

    async def refill(self) -> int:
        """Pull new pairs up to the pending limit; returns how many were added."""
        async with self._io:
            # Measured under the lock: a refill from /api/next and one from the tick must not both fill the room.
            room = max(0, self.settings.max_pending - self.core.pending)
            try:
                # A full desk still calls fetch(0): a Kafka source must keep polling to stay in its group.
                items = await self.source.fetch(room)
                if not items and getattr(self.source, "reconnecting", lambda: False)():
                    raise ConnectionError("the Kafka clients are closed until the reconnect back-off runs out")
            except Exception as exc:
                # Once per outage, not per request: every open page asks every few seconds, the tick twice a second.
                if not self._queue_down:
                    log.error("review queue cannot be read (%r); /api/next answers 503 until it can", exc, exc_info=exc)
                self._queue_down = True
                raise QueueUnreachable("the review queue is unreachable; try again shortly") from exc
            if self._queue_down:
                log.info("review queue can be read again")
                self._queue_down = False
            fresh, settled = 0, False
            for record, handle in items:
                replay = self.core.replay(record.pair.id, handle)
                if replay is not None:
                    self._outbox.append(replay)
                    settled = True
                    continue
                try:
                    added = self.core.add(record, handle)
                except DeskError as exc:
                    # A record without an id a verdict can name cannot be decided; the filter never emits one.
                    log.warning("dropping review record: %s", exc.message)
                    added = False
                if added:
                    fresh += 1
                elif not self.core.holds(record.pair.id, handle):
                    # Its own message again (a rebalance re-reads from the commit) must stay open until the
                    # pair is decided: acking it would commit past an undecided pair, lost on a crash.
                    self._acks.append(handle)
                    settled = True
        if settled:
            try:
                await self.flush()
            except Exception:
                # Kept in the outbox and the ack list; the tick retries. The new pairs can be shown meanwhile.
                log.exception("could not settle repeated review records; will retry")
        return fresh

    async def flush(self) -> int:
        """Write decided pairs, then acknowledge their source handles (and any ack that failed before);
        returns how many pairs were written."""
        async with self._io:
            batch, self._outbox = self._outbox, []
            if batch:
                try:
                    await self.sink.write([(d.route, d.record) for d in batch])
                except Exception:
                    self._outbox = batch + self._outbox
                    raise
            handles, self._acks = self._acks + [d.handle for d in batch], []
            if handles:
                try:
                    await self.source.ack(handles)
                except Exception:
                    # Written but not acknowledged: acked again later, or the source never lets these offsets go.
                    self._acks = handles + self._acks
                    raise
            return len(batch)

    async def submit(self, annotator: str, pair_id: str, choice: int, note: str, assignment: str | None = None) -> bool:
        """Record a verdict; True when it decided the pair (and the decision was written)."""
        decided = self.core.submit(annotator, pair_id, choice, note, assignment)
        if decided is None:
            return False
        self._outbox.append(decided)
        try:
            await self.flush()
        except Exception:
            # The verdict is kept; the tick retries the write. The annotator need not redo it.
            log.exception("could not write decision for %s; will retry", pair_id)
        return True

    async def tick(self) -> None:
        """Flush decided pairs, then refill; an error is logged (once while it repeats) and left for the next tick."""
        try:
            await self.flush()
            await self.refill()
            self._tick_error = ""
        except QueueUnreachable:
            pass  # refill logged it, once per outage
        except Exception as exc:
            # Every half second while Kafka is down: one traceback per distinct error, not 120 a minute.
            repeated, self._tick_error = repr(exc) == self._tick_error, repr(exc)
            log.log(logging.DEBUG if repeated else logging.ERROR, "desk tick failed; retrying", exc_info=True)

    async def run_ticks(self, stop: asyncio.Event) -> None:
        """Tick every TICK_S seconds until `stop` is set."""
        while not stop.is_set():
            await self.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK_S)

    async def close(self) -> None:
        """Flush what is decided (a failure is logged, not raised), then close the source and the sink."""
        try:
            await self.flush()
        except Exception:
            # Their source handles stay unacknowledged, so the pairs come back after a restart, but the
            # annotators' verdicts on them are gone: say so, or the operator never learns why.
            log.exception("closing with %d decided pairs unwritten: their verdicts are lost", len(self._outbox))
        await self.source.close()
        await self.sink.close()


# -- HTTP ------------------------------------------------------------------------------

DESK = web.AppKey("desk", ReviewDesk)
THROTTLE = web.AppKey("auth_throttle", FailedAuthThrottle)
ANNOTATOR = web.RequestKey("annotator", str)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address `text` holds (an IPv4-mapped IPv6 one as IPv4); None if it holds none."""
    try:
        ip = ipaddress.ip_address(text.strip().removeprefix("[").removesuffix("]"))
    except ValueError:
        return None
    return (ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else ip


def client_address(peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[IPvAnyNetwork]) -> str:
    """The login throttle's key: the TCP peer, or if that is a trusted proxy the right-most X-Forwarded-For entry that
    is not one (nginx's real_ip_recursive; never the left-most, which the client writes); a non-address there: peer."""
    peer_ip = _ip(peer or "")
    if peer_ip is None or not any(peer_ip in net for net in trusted):
        return peer or "unknown"
    hops = [_ip(hop) for header in forwarded_for for hop in header.split(",")]
    for ip in reversed(hops):
        if ip is None or not any(ip in net for net in trusted):
            return str(ip or peer_ip)
    return str(hops[0] or peer_ip) if hops else str(peer_ip)  # all trusted: the furthest proxy we can believe


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Add SECURITY_HEADERS to every response, aiohttp's own error pages included."""
    # on_response_prepare: also reaches the 500 aiohttp itself makes if a handler escapes the middleware.
    response.headers.update(SECURITY_HEADERS)


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn HTTP exceptions and unexpected errors into JSON error responses (unexpected ones logged, as 500)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        return _error(exc.status, exc.reason)
    except QueueUnreachable as exc:
        response = _error(503, str(exc))
        response.headers["Retry-After"] = str(QUEUE_RETRY_S)
        return response
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return _error(500, "internal error; the desk logged it")


@web.middleware
async def require_token(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Guard /api/*: a valid annotator bearer token is required, and repeated failures from one address get 429.

    The annotator's name is stored in request[ANNOTATOR]; DeskError from a handler becomes its JSON error.
    """
    if not request.path.startswith("/api/"):
        return await handler(request)
    throttle = request.app[THROTTLE]
    proxies = request.app[DESK].settings.trusted_proxies
    client = client_address(request.remote, request.headers.getall("X-Forwarded-For", []), proxies)
    wait_s = throttle.retry_after(client)
    if wait_s:
        response = _error(429, "too many failed token attempts from this address; retry later")
        response.headers["Retry-After"] = str(wait_s)
        return response
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    annotator = request.app[DESK].tokens.annotator(token.strip()) if scheme.lower() == "bearer" else None
    if annotator is None:
        throttle.failed(client)
        response = _error(401, "a valid annotator token is required (Authorization: Bearer <token>)")
        response.headers["WWW-Authenticate"] = 'Bearer realm="synpref-desk"'
        return response
    request[ANNOTATOR] = annotator
    try:
        return await handler(request)
    except DeskError as exc:
        return _error(exc.status, exc.message)


async def index(request: web.Request) -> web.StreamResponse:
    """GET /: the desk's single page."""
    return web.FileResponse(STATIC / "index.html", headers={"Content-Type": "text/html; charset=utf-8"})


async def static(request: web.Request) -> web.StreamResponse:
    """GET /static/{name}: one of STATIC_FILES, else 404."""
    name = request.match_info["name"]
    if name not in STATIC_FILES:
        return _error(404, "not found")
    return web.FileResponse(STATIC / name, headers={"Content-Type": f"{STATIC_FILES[name]}; charset=utf-8"})


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz (liveness): {"status": "ok"} while the event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz (readiness): 503 and the reason the source's `problem()` gives (KafkaReviewSource), else 200."""
    reason = getattr(request.app[DESK].source, "problem", lambda: None)()
    body = {"status": "ready"} if reason is None else {"status": "unready", "reason": reason}
    return web.json_response(body, status=200 if reason is None else 503)


async def session(request: web.Request) -> web.Response:
    """GET /api/session: the annotator's name, the guideline, the overlap and the note length limit."""
    desk = request.app[DESK]
    who, overlap = request[ANNOTATOR], desk.core.overlap
    return web.json_response(
        {"annotator": who, "guideline": desk.settings.guideline, "overlap": overlap, "max_note": MAX_NOTE}
    )


async def next_pair(request: web.Request) -> web.Response:
    """GET /api/next: the next pair for this annotator (refilling once if none is pending) and their progress."""
    desk, who = request.app[DESK], request[ANNOTATOR]
    entry = desk.core.next_for(who)
    if entry is None and await desk.refill():
        entry = desk.core.next_for(who)
    pair = desk.core.view(entry, who) if entry is not None else None
    return web.json_response({"pair": pair, "progress": desk.core.progress(who)})


async def progress(request: web.Request) -> web.Response:
    """GET /api/progress: this annotator's progress."""
    desk = request.app[DESK]
    return web.json_response(desk.core.progress(request[ANNOTATOR]))


async def verdict(request: web.Request) -> web.Response:
    """POST /api/verdict: record a JSON verdict {pair_id, choice, note}; answers whether the pair is now decided."""
    desk = request.app[DESK]
    if request.content_type != "application/json":
        raise DeskError(400, "send the verdict as application/json")
    try:
        # JSON is UTF-8 (RFC 8259): a charset parameter is ignored, so an unknown one is no 500.
        body = json.loads((await request.read()).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DeskError(400, "body is not valid JSON") from None
    except RecursionError:
        raise DeskError(400, "body nests too deeply") from None
    pair_id, choice, note, assignment = parse_verdict(body)
    who = request[ANNOTATOR]
    decided = await desk.submit(who, pair_id, choice, note, assignment)
    return web.json_response({"recorded": True, "decided": decided, "progress": desk.core.progress(who)})


def make_app(
    desk: ReviewDesk, background: bool = True, auth_throttle: FailedAuthThrottle | None = None
) -> web.Application:
    """The aiohttp app; with `background`, a tick task keeps pulling pairs and retrying writes."""
    app = web.Application(middlewares=[json_errors, require_token], client_max_size=MAX_BODY)
    app[DESK] = desk
    app[THROTTLE] = auth_throttle or FailedAuthThrottle()
    app.on_response_prepare.append(add_security_headers)
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/api/session", session)
    app.router.add_get("/api/next", next_pair)
    app.router.add_get("/api/progress", progress)
    app.router.add_post("/api/verdict", verdict)

    async def ticks(app: web.Application) -> AsyncIterator[None]:
        stop = asyncio.Event()
        task = asyncio.create_task(desk.run_ticks(stop)) if background else None
        yield
        stop.set()
        if task is not None:
            await task
        await desk.close()

    app.cleanup_ctx.append(ticks)
    return app


class DeskServer:
    """Runs a ReviewDesk's web app on its own event loop thread, for sync callers and tests.

    `with DeskServer(desk, port=0) as server: server.url` — port 0 picks a free port.
    """

    def __init__(self, desk: ReviewDesk, host: str = "127.0.0.1", port: int = 0) -> None:
        self.desk, self.host, self.port, self.url = desk, host, port, ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="synpref-desk", daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self) -> DeskServer:
        """Start the loop thread and the web app on it; returns self once listening (`url` is set)."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(make_app(self.desk), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = int(self._runner.addresses[0][1])
        self.url = f"http://{self.host}:{self.port}"

    def call(self, coro: Awaitable[Any], timeout_s: float = 30.0) -> Any:
        """Run a coroutine on the desk's loop (e.g. desk.refill()) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=timeout_s)  # type: ignore[arg-type]

    def stop(self) -> None:
        """Clean up the web app (closing the desk), stop the loop and join its thread."""
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> DeskServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def serve_in_thread(desk: ReviewDesk, host: str = "127.0.0.1", port: int = 0) -> Iterator[DeskServer]:
    """A started DeskServer for `desk`, stopped on exit."""
    with DeskServer(desk, host, port) as server:
        yield server
