"""Annotator tokens: `annotator:token` entries from the settings and/or a file.

Tokens are compared by their SHA-256 digest in a dict, so the lookup time does not
depend on how much of a guessed token is right. A configured token must be at least
32 characters of the URL-safe alphabet with some variety (`secrets.token_urlsafe(24)`,
`openssl rand -hex 16`): short or patterned tokens are refused at startup, naming the
annotator, never the token. FailedAuthThrottle slows down guessing per client address.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Callable
from pathlib import Path

from synpref.shared.config import ConfigError, DeskSettings

ANNOTATOR_ID = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_TOKEN = 32
TOKEN = re.compile(r"^[A-Za-z0-9_~.-]+$")
"""RFC 3986 unreserved characters: a token survives URLs, headers and shell quoting unchanged."""
MIN_DISTINCT = 8
"""Distinct characters a token needs: "aaaa..." or "abababab..." is long but guessable."""


def token_problem(token: str) -> str | None:
    """Why `token` is too weak to guard a desk, or None. The reason never quotes the token."""
    if len(token) < MIN_TOKEN:
        return f"must be at least {MIN_TOKEN} characters (it has {len(token)})"
    if not TOKEN.match(token):
        return "may hold only the URL-safe characters A-Z a-z 0-9 - _ . ~"
    if len(set(token)) < MIN_DISTINCT:
        return f"repeats too few characters: use at least {MIN_DISTINCT} different ones (a random token)"
    return None


def _named(annotator: str) -> str:
    """How an error names an entry's annotator field: never quoting one long enough to be a token.

    An entry written the wrong way round (`token:annotator`) puts the secret in the annotator field,
    and startup errors go to the pod's log.
    """
    if len(annotator) >= MIN_TOKEN:
        return f"annotator of {len(annotator)} characters (not shown: as long as a token; is it token:annotator?)"
    return f"annotator {annotator!r}"


def check_overlap(overlap: int, annotators: int) -> None:
    """ConfigError when a pair needs more annotators than hold tokens: no pair could ever be decided."""
    if overlap > annotators:
        raise ConfigError(
            f"desk.overlap is {overlap} but only {annotators} annotator(s) have tokens: no pair could be decided"
        )


def parse_tokens(text: str, where: str = "tokens") -> dict[str, str]:
    """annotator -> token from comma- or newline-separated `annotator:token` entries."""
    out: dict[str, str] = {}
    for number, raw in enumerate(re.split(r"[,\n]", text), start=1):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        annotator, sep, token = (part.strip() for part in entry.partition(":"))
        if not sep:
            # Without a colon the entry may be a bare token: say where it is, not what it is.
            raise ConfigError(f"{where}: entry {number} is not annotator:token")
        if not ANNOTATOR_ID.match(annotator):
            raise ConfigError(
                f"{where}: entry {number}: want annotator:token, annotator of [A-Za-z0-9_.@-], got {_named(annotator)}"
            )
        problem = token_problem(token)
        if problem:
            raise ConfigError(f"{where}: entry {number}: the token of {_named(annotator)} {problem}")
        if annotator in out:
            raise ConfigError(f"{where}: entry {number}: {_named(annotator)} appears twice")
        out[annotator] = token
    return out


def load_tokens(settings: DeskSettings) -> dict[str, str]:
    """annotator -> token from desk.tokens and desk.tokens_file together.

    Raises ConfigError for an unreadable file, an annotator named in both, or two annotators sharing a token.
    """
    tokens = parse_tokens(settings.tokens.get_secret_value(), "desk.tokens")
    if settings.tokens_file:
        try:
            text = Path(settings.tokens_file).read_text()
        except OSError as exc:
            raise ConfigError(f"desk.tokens_file: cannot read {settings.tokens_file}: {exc}") from exc
        for annotator, token in parse_tokens(text, settings.tokens_file).items():
            if annotator in tokens:
                raise ConfigError(f"{_named(annotator)} is in both desk.tokens and {settings.tokens_file}")
            tokens[annotator] = token
    if len(set(tokens.values())) != len(tokens):
        raise ConfigError("two annotators share one token")
    return tokens


def digest(token: str) -> bytes:
    """SHA-256 of the token: the table compares digests, never the tokens themselves."""
    return hashlib.sha256(token.encode()).digest()


class TokenTable:
    """Finds the annotator a bearer token belongs to; holds only the tokens' digests."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self._by_digest = {digest(t): a for a, t in tokens.items()}

    def __len__(self) -> int:
        return len(self._by_digest)

    def annotator(self, token: str) -> str | None:
        """The annotator whose token this is, or None (also for an empty or non-ASCII token)."""
        # A header that is not ASCII (aiohttp keeps undecodable bytes as surrogates) is no token.
        if not token or not token.isascii():
            return None
        return self._by_digest.get(digest(token))


class FailedAuthThrottle:
    """A token bucket of failed authentications per client address.

    A client may fail `burst` times at once, then once per 1/rate_per_s seconds; while its
    bucket is empty it is refused before its token is even looked at, so a guess cannot be
    confirmed by a throttled client. At most `max_clients` buckets are kept: full (rested)
    ones are dropped first, then the oldest.
    """

    def __init__(
        self,
        burst: int = 10,
        rate_per_s: float = 0.5,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or rate_per_s <= 0 or max_clients < 1:
            raise ValueError("burst and max_clients must be >= 1 and rate_per_s > 0")
        self.burst = burst
        self.rate_per_s = rate_per_s
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        """client -> (tokens left, when counted)."""

    def _tokens(self, client: str, now: float) -> float:
        left, then = self._buckets.get(client, (float(self.burst), now))
        return min(float(self.burst), left + (now - then) * self.rate_per_s)

    def retry_after(self, client: str) -> int:
        """Whole seconds until `client` may try again; 0 = now."""
        tokens = self._tokens(client, self._clock())
        return 0 if tokens >= 1 else math.ceil((1 - tokens) / self.rate_per_s)

    def failed(self, client: str) -> None:
        """Take one token from `client`'s bucket after a failed login, pruning buckets beyond max_clients."""
        now = self._clock()
        tokens = self._tokens(client, now)
        self._buckets.pop(client, None)
        if len(self._buckets) >= self.max_clients:
            self._prune(now)
        self._buckets[client] = (max(0.0, tokens - 1), now)

    def _prune(self, now: float) -> None:
        rested = [c for c in self._buckets if self._tokens(c, now) >= self.burst]
        for client in rested:
            del self._buckets[client]
        while len(self._buckets) >= self.max_clients:
            del self._buckets[next(iter(self._buckets))]
