"""Review findings: a judge's API key and unique judge names, RewardConfig booleans, `synpref eval --limit`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from synpref.services.annotator.chat import OpenAIChat
from synpref.shared.config import AnnotatorSettings, ConfigError, JudgeSettings, load_settings

# --- (1) the OpenAI key goes only to OpenAI's own API, unless a judge names the variable --------


@pytest.mark.parametrize(
    "base_url",
    ["http://127.0.0.1:8000/v1", "http://vllm:8000/v1", "https://llm.example.com/v1", "http://api.openai.com/v1"],
)
def test_a_judge_elsewhere_gets_no_openai_key_by_default(base_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    judge = JudgeSettings(name="m", base_url=base_url)
    assert judge.api_key_env == ""
    headers = OpenAIChat(judge.name, judge.base_url, judge.api_key_env)._headers()
    assert "Authorization" not in headers
    # The backend alone (tests, scripts) follows the same rule.
    assert "Authorization" not in OpenAIChat("m", base_url)._headers()


def test_openai_and_an_explicit_key_variable_still_get_their_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    monkeypatch.setenv("VLLM_KEY", "vllm-secret")
    config = tmp_path / "c.yaml"
    config.write_text(
        "annotator:\n  judges:\n"
        "    - {name: gpt-4o, base_url: 'https://api.openai.com/v1'}\n"
        "    - {name: q, base_url: 'http://vllm:8000/v1', api_key_env: VLLM_KEY}\n"
        "    - {name: r, base_url: 'http://vllm:8000/v1', api_key_env: OPENAI_API_KEY}\n"
        "    - {name: s, base_url: 'https://api.openai.com/v1', api_key_env: ''}\n"
    )
    judges = load_settings(config).annotator.judges
    assert [j.api_key_env for j in judges] == ["OPENAI_API_KEY", "VLLM_KEY", "OPENAI_API_KEY", ""]
    auth = [OpenAIChat(j.name, j.base_url, j.api_key_env)._headers().get("Authorization") for j in judges]
    assert auth == ["Bearer sk-secret", "Bearer vllm-secret", "Bearer sk-secret", None]
    assert OpenAIChat("m", "https://API.openai.com/v1/")._headers()["Authorization"] == "Bearer sk-secret"


# --- (2) judge names are unique: they key the answer cache, the candidate order and the vote -------


def test_two_judges_with_one_name_are_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "annotator:\n  judges:\n"
        "    - {name: judge-a, base_url: 'http://a:8000/v1'}\n"
        "    - {name: judge-b, base_url: 'http://b:8000/v1'}\n"
        "    - {name: judge-a, base_url: 'http://c:8000/v1', temperature: 0.0}\n"
    )
    with pytest.raises(ConfigError, match="judge-a"):
        load_settings(config)
    with pytest.raises(ValueError, match="judge-a"):
        AnnotatorSettings(judges=[JudgeSettings(name="judge-a"), JudgeSettings(name="judge-a")])
    # The attribute labeller keeps its own cache entries: it may be one of the judges' models.
    one = JudgeSettings(name="judge-a")
    assert AnnotatorSettings(judges=[one], attribute_model=one).attribute_model == one


# --- (3) RewardConfig: a mistyped boolean is an error, not False -----------------------------


@pytest.mark.parametrize("raw", ["ture", "flase", "2", "enabled"])
def test_reward_config_refuses_a_mistyped_boolean(raw: str) -> None:
    from synpref.training.reward_config import RewardConfig

    with pytest.raises(ValueError, match=rf"resume.*{raw}"):
        RewardConfig.load(overrides=[f"resume={raw}"])
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        RewardConfig.from_dict({"gradient_checkpointing": raw})


def test_reward_config_reads_the_usual_booleans() -> None:
    from synpref.training.reward_config import RewardConfig

    for raw, want in (("true", True), ("False", False), ("yes", True), ("off", False), ("1", True), ("0", False)):
        assert RewardConfig.from_dict({"resume": raw}).resume is want
    assert RewardConfig.from_dict({"resume": 0, "compile": True}).resume is False
    assert RewardConfig.load(overrides=["compile=true", "progress=no"]).compile is True


def test_reward_config_refuses_a_fractional_step_count() -> None:
    from synpref.training.reward_config import RewardConfig

    with pytest.raises(ValueError, match="save_steps"):
        RewardConfig.from_dict({"save_steps": 2.5})
    assert RewardConfig.from_dict({"save_steps": 2.0, "max_steps": "10"}).save_steps == 2


# --- (4) synpref eval --limit bounds what is read --------------------------------------------------


def _pair(i: int) -> dict[str, Any]:
    return {
        "conversation": [{"role": "user", "content": f"q{i}"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }


def test_eval_limit_stops_reading_after_n_pairs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import synpref.shared.modeling as modeling
    import synpref.shared.sources as sources
    import synpref.training.data as data
    from synpref.training import eval_cli

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    data.write_jsonl([_pair(i) for i in range(50)], a)
    data.write_jsonl([_pair(i) for i in range(40)], b)
    events: list[str] = []
    real = sources.iter_source

    def counting(path: Any, *args: Any, **kwargs: Any) -> Any:
        for row in real(path, *args, **kwargs):
            events.append(f"read {Path(path).name}")
            yield row

    monkeypatch.setattr(data, "iter_source", counting)
    monkeypatch.setattr(modeling, "load_reward_model", lambda *a, **k: (None, None))

    def score(model: Any, tok: Any, pairs: Any, *args: Any) -> list[tuple[float, float]]:
        pairs = list(pairs)
        events.append(f"score {len(pairs)}")
        return [(1.0, 0.0)] * len(pairs)

    monkeypatch.setattr(modeling, "score_pairs", score)
    argv = ["--model", "m", "--pairs", str(a), "--pairs", str(b), "--limit", "3", "--no-progress"]
    assert eval_cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["a.jsonl"]["pairs"] == 3 and result["b.jsonl"]["pairs"] == 3
    # At most one row past the limit is read, and the first input is scored before the second is read.
    assert events.count("read a.jsonl") <= 4 and events.count("read b.jsonl") <= 4
    assert events.index("score 3") < events.index("read b.jsonl")


def test_eval_limit_counts_unreadable_rows_it_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import synpref.shared.modeling as modeling
    from synpref.training import eval_cli

    path = tmp_path / "p.jsonl"
    rows = [json.dumps(_pair(0)), "{not json", json.dumps(_pair(1)), "{not json"]
    path.write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(modeling, "load_reward_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(modeling, "score_pairs", lambda model, tok, pairs, *a: [(1.0, 0.0)] * len(list(pairs)))
    assert eval_cli.main(["--model", "m", "--pairs", str(path), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["p.jsonl"]["unreadable_rows"] == 2
    assert eval_cli.main(["--model", "m", "--pairs", str(path), "--limit", "2", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)["p.jsonl"]
    assert result["pairs"] == 2 and result["unreadable_rows"] == 1
