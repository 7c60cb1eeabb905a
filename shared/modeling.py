"""Reward-model loading, chat-template encoding and scoring: the one implementation.

The trainer, the evaluator, the scorer service and the curation loop all encode through
`encode_conversation` / `encode_text` and score through `batched_rewards.reward_of`, so a
checkpoint gives the same reward wherever it runs. A reward is `logits[0][0]` of an
AutoModelForSequenceClassification(num_labels=1), as Skywork-Reward-V2 reads it.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, overload

import torch

from synpref.shared.batched_rewards import score_sequences

log = logging.getLogger(__name__)

Truncation = Literal["left_turns", "left_tokens", "right", "none"]
TRUNCATIONS: tuple[str, ...] = ("left_turns", "left_tokens", "right", "none")
Messages = Sequence[Mapping[str, str]]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Encoded:
    """One encoded sequence.

    input_ids: token ids, at most max_length long unless truncation="none".
    truncated: something was cut (old turns or tokens).
    fits: the policy was honoured. False means the final response (or, for
        truncation="none", the whole text) does not fit in max_length; input_ids then
        holds a left-token-truncated fallback that callers may score, but a trainer
        must count and report the pair rather than train on it silently.
    dropped_turns: how many old conversation messages left_turns cut.
    """

    input_ids: list[int]
    truncated: bool
    fits: bool
    dropped_turns: int = 0


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """ "auto" means bf16 on a GPU that has it, fp32 elsewhere (CPUs here lack bf16 units)."""
    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_device(device: str) -> str:
    """ "auto" becomes "cuda" when a GPU is visible, else "cpu"; any other value is returned as is."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def ensure_pad_token(model: Any, tokenizer: Any) -> int:
    """Give the tokenizer a pad token and write its id into the model config.

    Decoder heads read the reward at the last non-pad token, found through
    config.pad_token_id, so the two must agree.
    """
    if tokenizer.pad_token_id is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError("tokenizer has neither a pad, an eos nor an unk token to pad with")
        tokenizer.pad_token = fallback
    pad_id = int(tokenizer.pad_token_id)
    if model is not None:
        model.config.pad_token_id = pad_id
    return pad_id


def load_reward_model(path: str, device: str = "cpu", dtype: str = "float32", **kwargs: Any) -> tuple[Any, Any]:
    """Load a num_labels=1 sequence-classification RM and its tokenizer, in eval mode.

    A local folder loads with local_files_only: nothing it names (a remote-code hook, a tokenizer
    elsewhere) sends transformers to a hub. A hub id loads as transformers does.

    Raises ValueError for a checkpoint that lacks weights of the model, such as a base LM or encoder
    with no trained score head: transformers would fill them in at random, with only a log warning, and
    every reward read from it would be noise. Training a head on a base model goes through the trainer.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    device = resolve_device(device)
    kwargs.setdefault("local_files_only", Path(path).is_dir())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=kwargs["local_files_only"])
    model, info = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=resolve_dtype(dtype, device), output_loading_info=True, **kwargs
    )
    # Mismatched keys are reinitialised too (with ignore_mismatched_sizes); transformers 4 lists them as tuples.
    fresh = [*info["missing_keys"], *info["mismatched_keys"]]
    fresh = sorted({str(k[0] if isinstance(k, tuple) else k) for k in fresh})
    if fresh:
        names = ", ".join(fresh[:8]) + (f" and {len(fresh) - 8} more" if len(fresh) > 8 else "")
        raise ValueError(
            f"{path} is not a trained reward model: it has no weights for {names}, which transformers would "
            "initialise at random (a base model without a trained score head?); load a checkpoint saved with "
            "its head, or train one from this base with `synpref train`"
        )
    ensure_pad_token(model, tokenizer)
    tokenizer.padding_side = "right"
    model.to(device)
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------- encoding


def _adds_bos(tokenizer: Any) -> bool:
    """Does this tokenizer put BOS in front when asked for special tokens?"""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    cached = getattr(tokenizer, "_synpref_adds_bos", None)
    if cached is None:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
        cached = bool(ids) and ids[0] == bos
        # Some tokenizer wrappers forbid new attributes; those recompute each time.
        with contextlib.suppress(AttributeError):
            tokenizer._synpref_adds_bos = cached
    return bool(cached)


def _single_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    bos = tokenizer.bos_token_id
    if bos is None:
        return ids
    while len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids


def tokenize_rendered(tokenizer: Any, text: str, from_template: bool) -> list[int]:
    """Token ids of already-rendered text, with exactly the special tokens the model expects.

    Chat-template output already carries its special tokens (Llama's template even writes
    BOS), so it is tokenized without adding any, and BOS is prepended only when the template
    left it out but the tokenizer normally adds one. Plain text gets the tokenizer's own
    specials ([CLS] x [SEP] for encoders). Either way a doubled BOS is collapsed to one.
    """
    if from_template:
        ids = token_ids(tokenizer, text, add_special_tokens=False)
        if _adds_bos(tokenizer) and (not ids or ids[0] != tokenizer.bos_token_id):
            ids = [int(tokenizer.bos_token_id), *ids]
    else:
        ids = token_ids(tokenizer, text, add_special_tokens=True)
    return _single_bos(tokenizer, ids)


def token_ids(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """`tokenizer(text)["input_ids"]`, straight from a fast tokenizer's Rust backend when no
    truncation or padding is set on it: the same ids without transformers' per-call Python
    (about a fifth of a short text's tokenizing time). Slow tokenizers go through the call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets: a fifth less time.
        fast = getattr(backend, "encode_batch_fast", None)
        if fast is not None:
            return list(fast([text], add_special_tokens=add_special_tokens)[0].ids)
        return list(backend.encode(text, add_special_tokens=add_special_tokens).ids)
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def render_messages(tokenizer: Any, messages: Messages) -> tuple[str, bool]:
    """Render messages with the chat template; encoders without one get "role: content" lines."""
    msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)), True
    return "\n".join(f"{m['role']}: {m['content']}" for m in msgs), False


def _special_prefix(tokenizer: Any, ids: list[int]) -> int:
    """How many leading ids (BOS or CLS) a token-level cut must keep."""
    keep = {tokenizer.bos_token_id, getattr(tokenizer, "cls_token_id", None)} - {None}
    return 1 if ids and ids[0] in keep else 0


def _left_tokens(tokenizer: Any, ids: list[int], max_length: int) -> list[int]:
    head = _special_prefix(tokenizer, ids)
    return ids[:head] + ids[len(ids) - (max_length - head) :]


def encode_text(
    tokenizer: Any, text: str, max_length: int, truncation: Truncation = "left_tokens", from_template: bool = False
) -> Encoded:
    """Encode already-rendered text. left_turns has no turns to cut here and acts as left_tokens."""
    return fit_ids(tokenizer, tokenize_rendered(tokenizer, text, from_template), max_length, truncation)


def fit_ids(tokenizer: Any, ids: list[int], max_length: int, truncation: Truncation = "left_tokens") -> Encoded:
    """Token ids of a rendered text within max_length: cut from the left (a leading BOS kept), or
    from the right with truncation="right"; with "none", `fits` is False when they are too long."""
    if len(ids) <= max_length:
        return Encoded(ids, truncated=False, fits=True)
    if truncation == "none":
        return Encoded(_left_tokens(tokenizer, ids, max_length), truncated=True, fits=False)
    if truncation == "right":
        return Encoded(ids[:max_length], truncated=True, fits=True)
    return Encoded(_left_tokens(tokenizer, ids, max_length), truncated=True, fits=True)


def _turn_cuts(messages: Messages, keep_last: int) -> tuple[list[Mapping[str, str]], list[list[Mapping[str, str]]]]:
    """Leading system messages, and the conversation bodies to try, longest first.

    Each candidate starts at a user turn so whole exchanges are cut, and the last user turn
    before the response is never cut (chat templates expect one).
    """
    msgs = list(messages)
    split = max(len(msgs) - keep_last, 0)
    head, tail = msgs[:split], msgs[split:]
    n_sys = 0
    while n_sys < len(head) and head[n_sys]["role"] == "system":
        n_sys += 1
    system, body = head[:n_sys], head[n_sys:]
    starts = [0] + [i for i in range(1, len(body)) if body[i]["role"] == "user"]
    return system, [body[s:] + tail for s in starts]


MAX_CHARS_PER_TOKEN = 32
"""Most characters one token covers (real vocabularies' longest tokens are shorter): a text longer than
max_length times this is over max_length tokens whatever the tokenizer."""


def cut_text(text: str, budget: int, keep_end: bool, prefix: str | None = None) -> str:
    """At most `budget` characters of text, from its end or its start. A leading `prefix`
    (the BOS string a rendered template starts with) survives a cut from the left, as
    token-level left truncation keeps BOS."""
    if len(text) <= budget:
        return text
    if not keep_end:
        return text[:budget]
    head = prefix if prefix and text.startswith(prefix) else ""
    return head + text[len(text) - budget :]


def encode_conversation(
    tokenizer: Any,
    messages: Messages,
    max_length: int,
    truncation: Truncation = "left_turns",
    keep_last: int = 1,
    max_chars_per_token: int = MAX_CHARS_PER_TOKEN,
    min_dropped_turns: int = 0,
) -> Encoded:
    """Encode a conversation whose last `keep_last` messages are the response being scored.

    left_turns (default): cut old turns from the left, keep system prompts and the response
    whole; fits=False when even the last exchange is too long. left_tokens: cut tokens from
    the left (keeping BOS/CLS). right: cut the end. none: never cut, fits=False if too long.
    `min_dropped_turns` (left_turns): drop at least this many turns, as the other side of a pair
    needed (encode_pair).
    """
    if truncation not in TRUNCATIONS:
        raise ValueError(f"unknown truncation {truncation!r}; expected one of {TRUNCATIONS}")
    if truncation != "none":
        # Each message is cut to the budget alone before tokenizing: one over it holds more than
        # max_length tokens, so left_turns drops it (or falls back to its end) as it would uncut,
        # and a megabyte message costs a budget's worth of tokenizer time, not a megabyte's.
        budget = max_length * max_chars_per_token
        keep_end = truncation != "right"
        messages = [{"role": m["role"], "content": cut_text(m["content"], budget, keep_end)} for m in messages]
    text, from_template = render_messages(tokenizer, messages)
    ids = tokenize_rendered(tokenizer, text, from_template)
    if len(ids) <= max_length and not (min_dropped_turns and truncation == "left_turns"):
        return Encoded(ids, truncated=False, fits=True)
    if truncation != "left_turns":
        return encode_text(tokenizer, text, max_length, truncation, from_template)
    system, candidates = _turn_cuts(messages, keep_last)
    full = len(messages) - len(system)
    for body in candidates[1:]:
        if full - len(body) < min_dropped_turns:
            continue
        text, from_template = render_messages(tokenizer, [*system, *body])
        cut = tokenize_rendered(tokenizer, text, from_template)
        if len(cut) <= max_length:
            return Encoded(cut, truncated=True, fits=True, dropped_turns=full - len(body))
    return Encoded(_left_tokens(tokenizer, ids, max_length), truncated=True, fits=False)


def encode_pair(
    tokenizer: Any,
    pair: Mapping[str, Any],
    max_length: int,
    truncation: Truncation = "left_turns",
    max_chars_per_token: int = MAX_CHARS_PER_TOKEN,
) -> tuple[Encoded, Encoded]:
    """Encode conversation+chosen and conversation+rejected of a pair dict. With left_turns both sides keep
    the same turns: where one response is long enough to need old turns dropped, the other drops them too,
    or the two rewards would be compared under different contexts (and context length would track
    response length, a shortcut a model can learn)."""
    conv = list(pair.get("conversation") or [])
    sides = (list(pair["chosen"]), list(pair["rejected"]))

    def encode(response: list, drop: int = 0) -> Encoded:
        keep = max(len(response), 1)
        return encode_conversation(
            tokenizer, conv + response, max_length, truncation, keep, max_chars_per_token, min_dropped_turns=drop
        )

    chosen, rejected = encode(sides[0]), encode(sides[1])
    drop = max(chosen.dropped_turns, rejected.dropped_turns)
    if truncation != "left_turns" or not (chosen.fits and rejected.fits):
        return chosen, rejected
    if chosen.dropped_turns < drop and (again := encode(sides[0], drop)).fits:
        chosen = again
    elif rejected.dropped_turns < drop and (again := encode(sides[1], drop)).fits:
        rejected = again
    return chosen, rejected


def compared_sides(
    tokenizer: Any, pair: Mapping[str, Any], sides: tuple[Encoded, Encoded], max_length: int, keep_unfit: bool
) -> tuple[Encoded, Encoded] | None:
    """A pair's encoded sides, or None when chosen and rejected are the same: a Bradley-Terry loss of log 2
    whatever the model and a held-out pair no model gets right (ingest drops them; files read here may hold
    them). Sides that only truncation made equal (`right` cuts both responses off a conversation over
    max_length) do not fit, and their fallback (built when keep_unfit) is the left-token-truncated ends."""
    chosen, rejected = sides
    if chosen.input_ids != rejected.input_ids:
        return sides
    if pair["chosen"] == pair["rejected"] or not (chosen.truncated or rejected.truncated):
        return None
    if keep_unfit:
        chosen, rejected = encode_pair(tokenizer, pair, max_length, "left_tokens")
    return replace(chosen, fits=False), replace(rejected, fits=False)


# ---------------------------------------------------------------- scoring


@overload
def score_pairs(
    model: Any,
    tokenizer: Any,
    pairs: Iterable[Mapping[str, Any]],
    max_length: int = ...,
    batch_size: int = ...,
    truncation: Truncation = ...,
    progress: bool = ...,
    counts: Counter[str] | None = ...,
    leave_out_identical: Literal[False] = ...,
) -> list[tuple[float, float]]: ...
@overload
def score_pairs(
    model: Any,
    tokenizer: Any,
    pairs: Iterable[Mapping[str, Any]],
    max_length: int = ...,
    batch_size: int = ...,
    truncation: Truncation = ...,
    progress: bool = ...,
    counts: Counter[str] | None = ...,
    *,
    leave_out_identical: Literal[True],
) -> list[tuple[float, float] | None]: ...
def score_pairs(
    model: Any,
    tokenizer: Any,
    pairs: Iterable[Mapping[str, Any]],
    max_length: int = 4096,
    batch_size: int = 32,
    truncation: Truncation = "left_turns",
    progress: bool = False,
    counts: Counter[str] | None = None,
    leave_out_identical: bool = False,
) -> list[tuple[float, float]] | list[tuple[float, float] | None]:
    """(r_chosen, r_rejected) for each pair dict {"conversation", "chosen", "rejected"}.

    A side that does not fit under the policy is scored on its left-token-truncated fallback (the response end
    is kept) and counted: in `counts` ("unfit_pairs", "unfit_sequences") where given (the caller reports them
    once for a run scored in chunks), else in a warning. Sides that only `right` made the same tokens (both
    responses cut off a conversation over max_length) do not fit. A pair whose sides are the same tokens
    (whitespace a chat template trims) is a tie as given; with `leave_out_identical` (the trainer's evaluation:
    a tie that accuracy would count wrong) it is None, and counted as "identical_after_tokenizing".
    """
    pad_id = ensure_pad_token(None, tokenizer) if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)
    seqs: list[list[int]] = []
    kept: list[bool] = []
    tally: Counter[str] = Counter(unfit_pairs=0, unfit_sequences=0)
    for pair in pairs:
        sides = encode_pair(tokenizer, pair, max_length, truncation)
        compared = compared_sides(tokenizer, pair, sides, max_length, keep_unfit=True)
        kept.append(compared is not None or not leave_out_identical)
        if not kept[-1]:
            tally["identical_after_tokenizing"] += 1
            continue
        tally["unfit_pairs"] += not all(side.fits for side in compared or sides)
        for side in compared or sides:
            tally["unfit_sequences"] += not side.fits
            seqs.append(side.input_ids)
    if counts is not None:
        counts.update(tally)
    elif tally["unfit_sequences"]:
        log.warning(
            "%d sequences exceed max_length=%d under %s; scored their left-truncated ends",
            tally["unfit_sequences"],
            max_length,
            truncation,
        )
    rewards = iter(score_sequences(model, seqs, pad_id, batch_size, progress=progress))
    return [(next(rewards), next(rewards)) if k else None for k in kept]
