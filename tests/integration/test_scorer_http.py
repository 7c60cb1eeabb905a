"""The HTTP shims on a real server: the exact shapes OpenRLHF's remote_rm_fn and verl's
reward loop parse, errors, health, metrics and the reload endpoint."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from synpref.client import RewardClient
from synpref.services.scorer.server import BackgroundScorer
from synpref.shared.config import ModelRef, ScorerSettings
from synpref.shared.pairs import sigmoid
from synpref.shared.tokenizer_hash import tokenizer_sha256
from testing.numerics import approx_fp32_forward
from testing.tiny import build_tiny_reward_model

pytestmark = pytest.mark.integration
torch.set_num_threads(1)


def post(
    url: str, body: Any, raw: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any, dict[str, str]]:
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scorer-http")
    return {
        "llama": build_tiny_reward_model(root / "llama", arch="llama", seed=5),
        "qwen": build_tiny_reward_model(root / "qwen", arch="qwen3", seed=6),
    }


def make_settings(ckpts: dict[str, Path], **kw: object) -> ScorerSettings:
    base: dict[str, object] = {
        "port": 0,
        "http_port": 0,
        "metrics_port": 0,
        "default_model": "best",
        "models": {"best": ModelRef(path=str(ckpts["llama"])), "gold": ModelRef(path=str(ckpts["qwen"]))},
        "max_request_items": 16,
    }
    base.update(kw)
    return ScorerSettings(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def scorer(ckpts: dict[str, Path]):
    bg = BackgroundScorer(make_settings(ckpts)).start()
    yield bg
    bg.stop()


def convs(n: int) -> list[list[dict[str, str]]]:
    return [
        [
            {"role": "user", "content": f"How do I do task {i}?"},
            {"role": "assistant", "content": f"Step one of task {i}, then step two." + " More." * i},
        ]
        for i in range(n)
    ]


def test_openrlhf_get_reward(scorer: BackgroundScorer, ckpts: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(ckpts["llama"])
    conversations = convs(5)
    # OpenRLHF sends decoded sequences (template applied, BOS kept, left padding possible).
    queries = [tok.apply_chat_template(c, tokenize=False) for c in conversations]
    queries[0] = tok.pad_token * 3 + queries[0]
    status, body, _ = post(
        scorer.http_url + "/get_reward",
        {"query": queries, "prompts": ["p"] * 5, "labels": ["l"] * 5},
    )
    assert status == 200
    assert set(body) == {"rewards", "scores", "extra_logs"}
    # What remote_rm_fn / the experience maker do with it:
    rewards = torch.tensor(body["rewards"])
    assert rewards.shape == (5,) and rewards.dtype == torch.float32
    assert body["scores"] == body["rewards"] and isinstance(body["extra_logs"], dict)
    with RewardClient(scorer.address) as c:
        # The same five token sequences in one request each, nothing else in flight: the same
        # forward, so the same doubles (JSON carries their repr, which round-trips).
        assert body["rewards"] == c.score(conversations, model="best")


def test_verl_classify(scorer: BackgroundScorer, ckpts: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(ckpts["llama"])
    conversation = convs(3)[2]
    prompt = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
    prompt = prompt[len(tok.bos_token) :]  # verl strips BOS before posting to vLLM
    payload = {"model": str(ckpts["llama"]), "input": prompt, "activation": False}
    status, body, _ = post(scorer.http_url + "/classify", payload)
    assert status == 200
    assert set(body) == {"id", "object", "created", "model", "data", "usage"}
    assert body["object"] == "list" and body["id"].startswith("classify-") and isinstance(body["created"], int)
    assert body["model"] == str(ckpts["llama"])
    assert set(body["data"][0]) == {"index", "label", "probs", "num_classes"}
    assert body["data"][0]["num_classes"] == 1 and body["data"][0]["index"] == 0
    assert set(body["usage"]) == {"prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details"}
    rm_score = body["data"][-1]["probs"][-1]  # exactly what verl reads
    with RewardClient(scorer.address) as c:
        expected = c.score([conversation], model="best")[0]
    assert rm_score == expected  # a raw logit, not a sigmoid; the same tokens alone: the same forward
    assert body["usage"]["prompt_tokens"] == len(tok.apply_chat_template(conversation, tokenize=True)["input_ids"])

    # vLLM >= 0.11.2 spelling, a list input, the /v1 path, and the activation on request.
    _, raw, _ = post(
        scorer.http_url + "/v1/classify", {"model": "best", "input": [prompt, prompt], "use_activation": False}
    )
    # Two rows in one batch vs one alone: fp32 in another order.
    assert [d["probs"][0] for d in raw["data"]] == approx_fp32_forward([expected, expected])
    assert [d["index"] for d in raw["data"]] == [0, 1]
    _, sig, _ = post(scorer.http_url + "/classify", {"model": "best", "input": prompt, "activation": True})
    assert sig["data"][0]["probs"][0] == sigmoid(expected)
    _, chat, _ = post(scorer.http_url + "/classify", {"model": "best", "messages": conversation})
    assert chat["data"][0]["probs"][0] == expected

    # Token ids, as vLLM takes them: one prompt ([int]) or several ([[int]]), from the model's tokenizer.
    ids = tok.apply_chat_template(conversation, tokenize=True)["input_ids"]
    _, info = get(scorer.http_url + "/info")
    fingerprint = {m["name"]: m["tokenizer_sha256"] for m in json.loads(info)["models"]}
    assert fingerprint["best"] == tokenizer_sha256(tok) != fingerprint["gold"]
    status, one, _ = post(scorer.http_url + "/classify", {"model": "best", "input": ids})
    assert status == 200 and one["data"][0]["probs"][0] == expected
    assert one["usage"]["prompt_tokens"] == len(ids)
    _, two, _ = post(scorer.http_url + "/classify", {"model": "best", "input": [ids, ids]})
    assert [d["probs"][0] for d in two["data"]] == approx_fp32_forward([expected, expected])


@pytest.mark.parametrize(
    "path,body,raw,status,fragment",
    [
        ("/get_reward", None, b"{not json", 400, "not valid JSON"),
        ("/get_reward", {"prompts": ["x"]}, None, 400, '"query" must be'),
        ("/get_reward", {"query": ["a"] * 17}, None, 400, "max_request_items=16"),
        ("/get_reward", {"query": ["  "]}, None, 400, "empty"),
        ("/classify", {"model": "missing", "input": "x"}, None, 404, "no model named 'missing'"),
        ("/classify", {"model": "best", "input": 3}, None, 400, '"input" must be a string, a list of strings, or'),
        ("/classify", {"model": "best", "input": [5, "x"]}, None, 400, "mixes texts and token ids"),
        ("/classify", {"model": "best", "input": [[5, 6], []]}, None, 400, "non-empty lists of integers"),
        ("/classify", {"model": "best", "input": [[5, 6.5]]}, None, 400, "non-empty lists of integers"),
        ("/classify", {"model": "best", "input": [[5] * 3] * 17}, None, 400, "max_request_items=16"),
        ("/classify", {"model": "best", "input": [5, 10**6]}, None, 400, "outside the model's vocabulary"),
        ("/classify", {"model": "best", "messages": [{"role": "user", "content": "q"}]}, None, 400, "must end with"),
    ],
)
def test_bad_requests(
    scorer: BackgroundScorer, path: str, body: Any, raw: bytes | None, status: int, fragment: str
) -> None:
    got, answer, _ = post(scorer.http_url + path, body, raw)
    assert got == status
    assert answer["code"] == status and fragment in answer["error"]


def test_health_info_and_metrics(scorer: BackgroundScorer) -> None:
    post(scorer.http_url + "/get_reward", {"query": ["count me"]})
    status, body = get(scorer.http_url + "/health")
    assert status == 200 and json.loads(body)["models"] == ["best", "gold"]
    status, body = get(scorer.http_url + "/info")
    assert {m["name"] for m in json.loads(body)["models"]} == {"best", "gold"}
    status, body = get(scorer.http_url + "/metrics")
    text = body.decode()
    for name in (
        "synpref_scorer_requests_total",
        "synpref_scorer_request_seconds_bucket",
        "synpref_scorer_batch_items_bucket",
        "synpref_scorer_queue_depth",
        "synpref_scorer_tokens_total",
        "synpref_scorer_tokens_per_second",
    ):
        assert name in text
    assert 'synpref_scorer_requests_total{code="200",method="get_reward",model="best"}' in text


def test_overload_is_429(ckpts: dict[str, Path]) -> None:
    with BackgroundScorer(make_settings(ckpts, max_wait_ms=1500.0, max_queue=4)) as bg:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda i: post(bg.http_url + "/get_reward", {"query": [f"q{i}"] * 3}), range(4)))
        statuses = sorted(a[0] for a in answers)
        assert statuses == [200, 429, 429, 429]
        refused = next(a for a in answers if a[0] == 429)
        assert refused[2].get("Retry-After") == "1" and "max_queue=4" in refused[1]["error"]


def test_http_deadlines_are_504(ckpts: dict[str, Path]) -> None:
    # The batcher holds a lone item for max_wait_ms, longer than either deadline below.
    with BackgroundScorer(make_settings(ckpts, max_wait_ms=1500.0, http_timeout_s=0.3)) as bg:
        status, body, _ = post(bg.http_url + "/get_reward", {"query": ["q"]})
        assert status == 504 and "deadline" in body["error"]
        status, body, _ = post(
            bg.http_url + "/classify", {"model": "best", "input": ["q"]}, headers={"X-Request-Timeout": "0.1"}
        )
        assert status == 504
        status, body, _ = post(bg.http_url + "/get_reward", {"query": ["q"]}, headers={"X-Request-Timeout": "soon"})
        assert status == 400 and "X-Request-Timeout" in body["error"]
    with BackgroundScorer(make_settings(ckpts, max_wait_ms=200.0, http_timeout_s=30.0)) as bg:
        status, body, _ = post(bg.http_url + "/get_reward", {"query": ["q"]}, headers={"X-Request-Timeout": "20"})
        assert status == 200 and len(body["rewards"]) == 1


def test_admin_reload(ckpts: dict[str, Path], tmp_path: Path) -> None:
    build_tiny_reward_model(tmp_path / "v7", arch="qwen3", seed=7)
    (tmp_path / "token").write_text("t0ken")
    admin = {
        "admin_enabled": True,
        "admin_port": 0,
        "admin_token_file": str(tmp_path / "token"),
        "model_root": str(tmp_path),
    }
    with BackgroundScorer(make_settings(ckpts, **admin)) as bg:
        auth = {"Authorization": "Bearer t0ken"}
        text = "swap me please"
        _, before, _ = post(bg.http_url + "/get_reward", {"query": [text], "model": "gold"})
        status, body, _ = post(
            bg.admin_url + "/admin/reload", {"model": "gold", "path": "v7", "version": "v7"}, None, auth
        )
        assert status == 200 and body["version"] == "v7"
        _, after, _ = post(bg.http_url + "/get_reward", {"query": [text], "model": "gold"})
        # One text alone before and after: the same model would give the same double.
        assert after["rewards"] != before["rewards"]
        (tmp_path / "broken").mkdir()
        (tmp_path / "broken" / "config.json").write_text("{}")
        status, body, _ = post(bg.admin_url + "/admin/reload", {"model": "gold", "path": "broken"}, None, auth)
        assert status == 400 and "does not load" in body["error"]
        status, body, _ = post(bg.admin_url + "/admin/reload", {"model": "best"}, None, auth)
        assert status == 400 and "reload needs" in body["error"]
        _, still, _ = post(bg.http_url + "/get_reward", {"query": [text], "model": "gold"})
        assert still["rewards"] == after["rewards"]  # a failed reload keeps the old version serving
