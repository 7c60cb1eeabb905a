"""Annotator tokens: `annotator:token` entries from the settings and/or a file.

Tokens are compared by their SHA-256 digest in a dict, so the lookup time does not
depend on how much of a guessed token is right.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from synpref.shared.config import ConfigError, DeskSettings

ANNOTATOR_ID = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_TOKEN = 16


def parse_tokens(text: str, where: str = "tokens") -> dict[str, str]:
    """annotator -> token from comma- or newline-separated `annotator:token` entries."""
    out: dict[str, str] = {}
    for raw in re.split(r"[,\n]", text):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        annotator, sep, token = (part.strip() for part in entry.partition(":"))
        if not sep or not ANNOTATOR_ID.match(annotator):
            raise ConfigError(f"{where}: want annotator:token, annotator of [A-Za-z0-9_.@-], got {annotator!r}")
        if len(token) < MIN_TOKEN or any(c.isspace() for c in token):
            raise ConfigError(f"{where}: token of {annotator!r} must be at least {MIN_TOKEN} characters, no spaces")
        if annotator in out:
            raise ConfigError(f"{where}: annotator {annotator!r} appears twice")
        out[annotator] = token
    return out


def load_tokens(settings: DeskSettings) -> dict[str, str]:
    tokens = parse_tokens(settings.tokens.get_secret_value(), "desk.tokens")
    if settings.tokens_file:
        try:
            text = Path(settings.tokens_file).read_text()
        except OSError as exc:
            raise ConfigError(f"desk.tokens_file: cannot read {settings.tokens_file}: {exc}") from exc
        for annotator, token in parse_tokens(text, settings.tokens_file).items():
            if annotator in tokens:
                raise ConfigError(f"annotator {annotator!r} is in both desk.tokens and {settings.tokens_file}")
            tokens[annotator] = token
    if len(set(tokens.values())) != len(tokens):
        raise ConfigError("two annotators share one token")
    return tokens


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenTable:
    def __init__(self, tokens: dict[str, str]) -> None:
        self._by_digest = {digest(t): a for a, t in tokens.items()}

    def __len__(self) -> int:
        return len(self._by_digest)

    def annotator(self, token: str) -> str | None:
        return self._by_digest.get(digest(token)) if token else None
