"""LocalChat: a transformers causal LM in this process as a judge backend (sampling with `generate`).

An answer that reaches max_new_tokens without an end-of-sequence token is cut off, as OpenAIChat's
finish_reason "length": no answer (an abstention, never cached), counted in `stats` and JUDGE_CUT_OFF so the
annotator's cut-off warning covers local judges too.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from synpref.services.annotator.chat import JUDGE_CUT_OFF, ChatStats, Messages


class LocalChat:
    """A transformers causal LM as a chat backend (sampling happens in a worker thread)."""

    def __init__(self, model: Any, tokenizer: Any, name: str = "local", max_new_tokens: int = 64, seed: int = 0):
        self.name = name
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.stats = ChatStats()  # answers and those cut off; no HTTP, so no requests, retries or failures
        # A thread lock taken in the worker thread: an asyncio.Lock binds to the first event loop that waits on it,
        # and one backend serves several (an annotator per stage), possibly from several threads at once.
        self._lock = threading.Lock()

    @property
    def max_tokens(self) -> int:
        """max_new_tokens, under the name the annotator's cut-off warning reports."""
        return self.max_new_tokens

    @classmethod
    def from_pretrained(cls, path: str, name: str | None = None, **kwargs: Any) -> LocalChat:
        """A LocalChat over the causal LM and tokenizer at `path`; `name` defaults to the path."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return cls(
            AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), name or path, **kwargs
        )

    def _generate(self, messages: Messages, n: int, temperature: float) -> list[str | None]:
        import torch

        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = self.tokenizer(rendered, return_tensors="pt", add_special_tokens=False)
        torch.manual_seed(self.seed)
        sample = temperature > 0
        with torch.no_grad():
            out = self.model.generate(
                **enc,
                do_sample=sample,
                temperature=temperature if sample else None,
                top_p=None,
                top_k=None,
                num_return_sequences=n if sample else 1,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )
        prompt_len = enc["input_ids"].shape[1]
        stops = self._stop_ids()
        texts: list[str | None] = []
        for seq in out[:, prompt_len:].tolist():
            # Without an end-of-sequence token in max_new_tokens the answer was cut off: no answer, as OpenAIChat's
            # finish_reason "length", so the judge does not cache a draft and a larger max_new_tokens asks again.
            ended = len(seq) < self.max_new_tokens or any(t in stops for t in seq)
            texts.append(self.tokenizer.decode(seq, skip_special_tokens=True) if ended else None)
        texts = (texts * n)[:n] if not sample else texts
        self._count_answers(texts)
        return texts

    def _count_answers(self, texts: list[str | None]) -> None:
        """Count the answers and those cut off (the only None here), per sample as OpenAIChat counts choices."""
        cut = texts.count(None)
        self.stats.answers += len(texts)
        self.stats.cut_off += cut
        if cut:
            JUDGE_CUT_OFF.labels(self.name).inc(cut)

    def _stop_ids(self) -> set[int]:
        """The token ids that end a generation: the generation config's (one or a list) and the tokenizer's."""
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids = configured if isinstance(configured, list) else [configured]
        return {int(i) for i in [*ids, self.tokenizer.eos_token_id] if i is not None}

    async def chat(
        self, messages: Messages, *, n: int, temperature: float, response_format: dict[str, Any] | None = None
    ) -> list[str | None]:
        """`n` sampled answers generated in a worker thread, one generation at a time; response_format is ignored."""
        # response_format is not enforced locally: the parser decides, and junk abstains.
        return await asyncio.to_thread(self._generate_one_at_a_time, messages, n, temperature)

    def _generate_one_at_a_time(self, messages: Messages, n: int, temperature: float) -> list[str | None]:
        # Under the lock: the counts are updated from several worker threads.
        with self._lock:
            return self._generate(messages, n, temperature)

    async def close(self) -> None:
        """Nothing to release."""
        return None
