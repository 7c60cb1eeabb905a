"""A scorer backend for tests that need the registry or the server, not a model."""

from __future__ import annotations

from typing import Any


class LengthBackend:
    """A loaded "model" whose reward for an item is its token count."""

    kind = "torch"
    dtype = "float32"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def forward(self, batch: list[list[int]]) -> list[float]:
        return [float(len(ids)) for ids in batch]

    def close(self) -> None:
        pass


class CharEncoder:
    """The little of an Encoder the HTTP /get_reward path uses: each text's ids are its characters' codes."""

    def strip_padding(self, text: str) -> str:
        return text

    def text(self, text: str, what: str) -> list[int]:
        return [ord(c) for c in text]
