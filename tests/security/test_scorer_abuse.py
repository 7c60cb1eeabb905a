"""Issue 12, item 3 and the scorer's lesser items: hostile request shapes answered with 4xx /
INVALID_ARGUMENT / RESOURCE_EXHAUSTED instead of 500 / UNKNOWN, stalls or unbounded memory.
Real servers on loopback; the load case runs `synpref scorer` as its own process to read its RSS."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from synpref.services.scorer.server import BackgroundScorer
from synpref.shared.config import ModelRef, ScorerSettings
from synpref.v1 import reward_pb2
from testing.tiny import build_tiny_reward_model
from testing.wait import wait_until

pytestmark = pytest.mark.integration
torch.set_num_threads(1)
MB = 1024 * 1024


def post(url: str, raw: bytes, headers: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, Any]:
    req = urllib.request.Request(
        url, data=raw, headers={"Content-Type": "application/json", **(headers or {})}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_reward_model(tmp_path_factory.mktemp("scorer-abuse") / "qwen", arch="qwen3", seed=4)


@pytest.fixture(scope="module")
def scorer(ckpt: Path):
    s = ScorerSettings(port=0, http_port=0, metrics_port=0, models={"best": ModelRef(path=str(ckpt))})
    with BackgroundScorer(s) as bg:
        yield bg


@pytest.mark.parametrize(
    "path,raw,headers,status,fragment",
    [
        ("/get_reward", b'{"query": ["\\ud800 lone surrogate"]}', {}, 400, "UTF-8"),
        ("/classify", b'{"input": "ok", "messages": [{"role": "assistant", "content": "\\udfff"}]}', {}, 400, "UTF-8"),
        ("/get_reward", b"[" * 100_000 + b"]" * 100_000, {}, 400, "nested"),
        ("/classify", b'{"input": "a text", "activation": "yes"}', {}, 400, "activation"),
        ("/classify", b'{"input": "a text", "use_activation": 1}', {}, 400, "activation"),
        ("/get_reward", b'{"query": ["q"]}', {"X-Request-Timeout": "nan"}, 400, "X-Request-Timeout"),
        ("/get_reward", b'{"query": ["q"]}', {"X-Request-Timeout": "inf"}, 400, "X-Request-Timeout"),
        ("/get_reward", b'{"query": ["q"]}', {"X-Request-Timeout": "-1"}, 400, "X-Request-Timeout"),
    ],
)
def test_bad_http_input_is_400(
    scorer: BackgroundScorer, path: str, raw: bytes, headers: dict[str, str], status: int, fragment: str
) -> None:
    got, body = post(scorer.http_url + path, raw, headers)
    assert (got, body["code"]) == (status, status), body
    assert fragment in body["error"]


def test_a_70mb_body_is_413(scorer: BackgroundScorer) -> None:
    raw = b'{"query": ["' + b"a" * (70 * MB) + b'"]}'
    got, body = post(scorer.http_url + "/get_reward", raw)
    assert got == 413 and "max_body_bytes" in body["error"]


@pytest.mark.parametrize(
    "method,payload",
    [
        ("Score", b"\xff\xff\xff\xff"),  # not a protobuf message
        ("Score", reward_pb2.ScoreRequest(model="best").SerializeToString() + b"\x0a\x05\x12\x03\xc3\x28\x41"),
        ("ScorePairs", b"\x0a\x80"),  # a truncated length
        ("Info", b"\x0a\x02\xc3\x28"),  # bad UTF-8 in the model name
    ],
)
def test_corrupt_protobuf_is_invalid_argument(scorer: BackgroundScorer, method: str, payload: bytes) -> None:
    with grpc.insecure_channel(scorer.address) as ch:
        call = ch.unary_unary(f"/synpref.v1.RewardService/{method}")
        with pytest.raises(grpc.RpcError) as err:
            call(payload, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()


def test_a_full_encode_queue_is_429_and_resource_exhausted(ckpt: Path) -> None:
    s = ScorerSettings(
        port=0, http_port=0, metrics_port=0, models={"best": ModelRef(path=str(ckpt))}, max_encode_queue=1
    )
    with BackgroundScorer(s) as bg, socket.create_connection(("127.0.0.1", bg.server.http_port)) as slow:
        # A client that announces a body and sends it slowly holds the one slot.
        slow.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        slow.sendall(b'Content-Length: 1000\r\n\r\n{"query": ["')
        wait_until(lambda: bg.server.registry.encode_queue.pending == 1, 10, "the slow request to hold its slot")
        got, body = post(bg.http_url + "/get_reward", b'{"query": ["q"]}')
        assert got == 429 and "max_encode_queue" in body["error"]
        with grpc.insecure_channel(bg.address) as ch:
            request = reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(text="q")])
            with pytest.raises(grpc.RpcError) as err:
                ch.unary_unary("/synpref.v1.RewardService/Score")(request.SerializeToString(), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_in(pid: int, window_s: float) -> float:
    """CPU seconds the process spends over the next window_s of wall time."""
    before = _cpu_s(pid)
    time.sleep(window_s)
    return _cpu_s(pid) - before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_large_requests_neither_bloat_nor_stall_the_scorer(ckpt: Path, tmp_path: Path) -> None:
    port, http_port = _free_port(), _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SYNPREF_")},
        "SYNPREF_SCORER__METRICS_PORT": "0",
        "SYNPREF_SCORER__TORCH_THREADS": "1",
        "SYNPREF_SCORER__MAX_LENGTH": "512",
    }
    cmd = [sys.executable, "-m", "synpref.shared.cli", "scorer", "--model", f"best={ckpt}"]
    cmd += ["--port", str(port), "--http-port", str(http_port)]
    log = (tmp_path / "scorer.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    try:

        def healthy() -> bool:
            try:
                return urllib.request.urlopen(url + "/health", timeout=1).status == 200
            except OSError:
                return False

        wait_until(healthy, 120, "the scorer process to serve")
        assert post(url + "/get_reward", b'{"query": ["warm up"]}')[0] == 200
        base_mb = _rss_peak_mb(proc.pid)
        big = json.dumps({"query": ["word " * (2 * MB)]}).encode()  # 10 MB of text in one item
        with ThreadPoolExecutor(4) as pool:
            bigs = [pool.submit(post, url + "/get_reward", big, {}, 300) for _ in range(3)]
            time.sleep(0.5)  # let the large bodies arrive first: the small one must not queue behind them
            t0 = time.monotonic()
            small_status, _ = post(url + "/get_reward", b'{"query": ["small"]}', {"X-Request-Timeout": "5"}, 60)
            small_s = time.monotonic() - t0
            big_statuses = [f.result()[0] for f in bigs]
        grown_mb = _rss_peak_mb(proc.pid) - base_mb
        print(f"small request: {small_status} in {small_s:.2f} s; large: {big_statuses}; peak RSS +{grown_mb:.0f} MB")
        assert small_s < 7.0 and small_status in (200, 429, 504), (small_s, small_status)
        assert set(big_statuses) <= {200, 429, 413}, big_statuses
        assert grown_mb < 600, f"peak RSS grew by {grown_mb:.0f} MB"

        # A gRPC call past its deadline stops being tokenized.
        items = [reward_pb2.ScoreItem(text=f"item {i} " + "x y " * 7000) for i in range(1000)]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            score = ch.unary_unary("/synpref.v1.RewardService/Score")
            with pytest.raises(grpc.RpcError) as err:
                score(reward_pb2.ScoreRequest(items=items).SerializeToString(), timeout=1.0)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: _cpu_in(proc.pid, 1.0) < 0.3, 8, "the scorer to stop working on the expired call")
    finally:
        log.close()
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
