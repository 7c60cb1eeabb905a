"""A real OpenAI-compatible judge server for tests: `transformers serve` over tiny chat LMs.

Not the in-repo fake (testing/fake_judges.py): Hugging Face's own server, a subprocess on a
loopback port, serving causal LMs with random weights built here from a config and saved
with a chat-template tokenizer (testing/tiny.py). The server loads whichever local folder a
request names in its "model" field, so one server serves several judges. Their answers are
random text, never the JSON a judge prompt asks for: what a badly behaved endpoint sends.

The server's log is kept in a file; `requests_per_model` and `answered` count the chat
requests it received and the ones it answered with 200, read from that log.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

from testing.tiny import build_tiny_tokenizer

# transformers' serving handler logs one such line per chat request (logger.warning, so any --log-level shows it).
REQUEST_LINE = re.compile(r"\[Request received\] Model: (\S+),")
# uvicorn's access log (at --log-level info).
ANSWERED_LINE = re.compile(r'"POST /v1/chat/completions HTTP/1\.1" 200')


def build_tiny_chat_lm(out_dir: str | Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """Save a randomly initialised Qwen3-style causal LM and its chat-template tokenizer in `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    out = Path(out_dir)
    tokenizer = build_tiny_tokenizer(out, style="qwen")
    heads = 4
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        head_dim=hidden // heads,
        intermediate_size=hidden * 2,
        # Judge prompts of real pairs run to a few thousand byte-level tokens.
        max_position_embeddings=16384,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(out))
    return out


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def offline_env(**extra: str) -> dict[str, str]:
    """This environment with the Hugging Face hub switched off (no network here) and one thread per process."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


class TransformersServe:
    """`transformers serve` on 127.0.0.1 and a free port, CPU, until stopped.

    `with TransformersServe(log_path) as server:` returns once GET /health answers; `base_url`
    is the OpenAI base URL (.../v1) judges are configured with.
    """

    def __init__(self, log_path: str | Path, ready_timeout_s: float = 120.0) -> None:
        self.log_path = Path(log_path)
        self.ready_timeout_s = ready_timeout_s
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> TransformersServe:
        """Start the server and wait, polling /health, until it answers; RuntimeError with its log if it
        exits or is not ready within ready_timeout_s."""
        cli = Path(sys.executable).with_name("transformers")
        cmd = [str(cli), "serve", "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu"]
        cmd += ["--log-level", "info", "--model-timeout", "3600"]
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=offline_env())
        deadline = time.monotonic() + self.ready_timeout_s
        while not self._healthy():
            if self._proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {self._proc.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                waited = f"{self.ready_timeout_s:g}s"
                raise RuntimeError(f"transformers serve not ready after {waited}:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log(self) -> str:
        """The server's output so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def requests_per_model(self) -> Counter[str]:
        """Chat requests received so far, per requested model."""
        return Counter(REQUEST_LINE.findall(self.log()))

    def answered(self) -> int:
        """Chat requests answered with 200 so far."""
        return len(ANSWERED_LINE.findall(self.log()))

    def stop(self) -> None:
        """SIGTERM the server, SIGKILL it if it has not exited within 20 s."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def __enter__(self) -> TransformersServe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
