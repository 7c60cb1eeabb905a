"""A tokenizer's fingerprint, so a client that sends token ids can check it shares the server's tokenizer.

Kept apart from shared.modeling (torch) so the client package can import it cheaply.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 of what decides a conversation's token ids: the fast tokenizer's definition
    (vocabulary, merges, normalizer, pre-tokenizer, post-processor, added tokens) and the chat
    template. Truncation and padding settings are left out: transformers changes them per call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None)
        definition.pop("padding", None)
    else:  # a slow (Python) tokenizer
        definition = {"vocab": sorted(tokenizer.get_vocab().items())}
    definition["chat_template"] = getattr(tokenizer, "chat_template", None) or ""
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()
