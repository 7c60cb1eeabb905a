"""A tokenizer's fingerprint, so a client that sends token ids can check it shares the server's tokenizer.

Kept apart from shared.modeling (torch) so the client package can import it cheaply.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 of what decides a conversation's token ids: the fast tokenizer's definition
    (vocabulary, merges, normalizer, pre-tokenizer, post-processor, added tokens), the chat
    template and the named special tokens (the template writes `bos_token` / `eos_token` by name and
    encoding prepends or collapses BOS by its id, so a tokenizer_config.json naming another BOS over
    the same vocabulary gives other ids). Truncation and padding settings are left out: transformers
    changes them per call; so is the pad token, which is never in a sequence's ids and which loaders
    set where a tokenizer has none."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None)
        definition.pop("padding", None)
    else:  # a slow (Python) tokenizer
        definition = {"vocab": sorted(tokenizer.get_vocab().items())}
    definition["chat_template"] = getattr(tokenizer, "chat_template", None) or ""
    named = dict(getattr(tokenizer, "special_tokens_map", None) or {})
    named.pop("pad_token", None)
    definition["special_tokens"] = {k: v if isinstance(v, str) else [str(x) for x in v] for k, v in named.items()}
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()
