"""Session 43's review of `synpref score`: `-o` naming the input destroyed the input, `score info --model` answered
for every model but the one asked, and `score pairs` output lines could not be joined back to their input rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from synpref.client import RewardClient, cli
from synpref.v1 import reward_pb2


class FakeStub:
    """RewardService's unary calls: every pair scores (1, 0), by v1 before the prompt "q3" and v2 from it; Info names
    the models asked for."""

    def __init__(self) -> None:
        self.info_requests: list[reward_pb2.InfoRequest] = []
        self.score_models: list[str] = []

    def ScorePairs(self, request: reward_pb2.ScorePairsRequest, timeout: float, wait_for_ready: bool) -> Any:
        scores = [reward_pb2.PairScore(reward_chosen=1.0, reward_rejected=0.0, p=0.73) for _ in request.pairs]
        # A reload (or a rolling update's new pods) from the prompt "q3" on: version v2.
        version = "v2" if int(request.pairs[0].conversation[0].content[1:] or 0) >= 3 else "v1"
        return reward_pb2.ScorePairsResponse(scores=scores, metadata=reward_pb2.Metadata(version=version))

    def Score(self, request: reward_pb2.ScoreRequest, timeout: float, wait_for_ready: bool) -> Any:
        self.score_models.append(request.model)
        return reward_pb2.ScoreResponse(rewards=[0.5] * len(request.items))

    def Info(self, request: reward_pb2.InfoRequest, timeout: float, wait_for_ready: bool) -> Any:
        self.info_requests.append(request)
        names = [request.model] if request.model else ["default", "gold"]
        return reward_pb2.InfoResponse(models=[reward_pb2.ModelInfo(name=n) for n in names], default_model="default")


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> FakeStub:
    fake = FakeStub()

    class Client(RewardClient):
        def __init__(self, address: str, **kwargs: Any) -> None:
            super().__init__(address, **kwargs)
            self.stub = fake  # type: ignore[assignment]

    monkeypatch.setattr(cli, "RewardClient", Client)
    return fake


def _pair(i: int) -> dict[str, Any]:
    return {"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}


def _write_lines(path: Path, rows: list[Any]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("what", ["pairs", "items"])
def test_output_naming_the_input_is_refused_before_either_is_touched(
    tmp_path: Path, stub: FakeStub, capsys: pytest.CaptureFixture[str], what: str
) -> None:
    # Before: the output was opened for writing (truncated) after the first batch was read, so `-o` naming the input
    # replaced the user's input with the scores of whatever had been buffered, and the run ended 0.
    src = tmp_path / "in.jsonl"
    rows: list[Any] = [_pair(i) for i in range(50)] if what == "pairs" else [{"text": f"t{i}"} for i in range(50)]
    _write_lines(src, rows)
    before = src.read_bytes()
    link = tmp_path / "link.jsonl"
    link.symlink_to(src)
    for out in (src, link, Path(tmp_path / "." / "in.jsonl")):
        assert cli.main(["--address", "127.0.0.1:1", "--chunk-size", "4", what, str(src), "-o", str(out)]) == 2
        assert "is the input" in capsys.readouterr().err
        assert src.read_bytes() == before


def test_output_that_is_a_file_of_the_input_folder_is_refused(
    tmp_path: Path, stub: FakeStub, capsys: pytest.CaptureFixture[str]
) -> None:
    # A rerun with `-o` inside the input folder: the earlier output is one of the files read.
    folder = tmp_path / "data"
    folder.mkdir()
    _write_lines(folder / "a.jsonl", [_pair(i) for i in range(3)])
    _write_lines(folder / "scored.jsonl", [{"reward_chosen": 1.0}])
    before = (folder / "scored.jsonl").read_bytes()
    assert cli.main(["--address", "127.0.0.1:1", "pairs", str(folder), "-o", str(folder / "scored.jsonl")]) == 2
    assert "is the input" in capsys.readouterr().err
    assert (folder / "scored.jsonl").read_bytes() == before
    # A new output file elsewhere is fine.
    assert cli.main(["--address", "127.0.0.1:1", "pairs", str(folder / "a.jsonl"), "-o", str(tmp_path / "o")]) == 0


def test_score_info_asks_for_the_named_model(stub: FakeStub, capsys: pytest.CaptureFixture[str]) -> None:
    # Before: --model was dropped, so `score --model gold info` listed every served model and a typo was not caught;
    # `score info --model gold` (options after the subcommand, as the docs write `items x.jsonl --model gold`) was
    # refused by argparse: "unrecognized arguments".
    assert cli.main(["--address", "127.0.0.1:1", "--model", "gold", "info"]) == 0
    assert cli.main(["--address", "127.0.0.1:1", "info", "--model", "gold"]) == 0
    assert [r.model for r in stub.info_requests] == ["gold", "gold"]
    assert [json.loads(line)["name"] for line in capsys.readouterr().out.splitlines()] == ["gold", "gold"]
    assert cli.main(["--address", "127.0.0.1:1", "info"]) == 0
    assert stub.info_requests[-1].model == ""
    assert [json.loads(line)["name"] for line in capsys.readouterr().out.splitlines()] == ["default", "gold"]


def test_options_after_the_subcommand_keep_the_ones_before(tmp_path: Path, stub: FakeStub) -> None:
    src = tmp_path / "items.jsonl"
    _write_lines(src, [{"text": "a"}])
    args = cli.parse_args(["--model", "m", "--timeout", "3", "items", str(src), "--chunk-size", "7"])
    assert (args.model, args.timeout, args.chunk_size, args.concurrency, args.address) == ("m", 3.0, 7, 4, None)
    assert cli.parse_args(["--model", "m", "info", "--model", "gold"]).model == "gold"
    out = tmp_path / "out.jsonl"
    assert cli.main(["--address", "127.0.0.1:1", "items", str(src), "--model", "gold", "-o", str(out)]) == 0
    assert out.read_text() == '{"reward": 0.5, "line": 1}\n' and stub.score_models == ["gold"]


def test_score_pairs_lines_name_the_input_row_and_pair(
    tmp_path: Path, stub: FakeStub, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: a line held source, rewards and p only: after a skipped row (or a record of several pairs) the n-th
    # output line was no longer the n-th input row, and nothing said which it was.
    src = tmp_path / "in.jsonl"
    rm_bench = {"id": "x", "prompt": "q", "chosen": ["c0", "c1", "c2"], "rejected": ["r0", "r1", "r2"]}
    _write_lines(src, [_pair(0), {"prompt": "no chosen"}, _pair(2)])
    out = tmp_path / "out.jsonl"
    assert cli.main(["--address", "127.0.0.1:1", "--chunk-size", "2", "pairs", str(src), "-o", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    where = src.as_posix()
    assert [line["locator"] for line in lines] == [f"{where}#0", f"{where}#2"]
    assert all(line["reward_chosen"] == 1.0 and line["p"] == pytest.approx(0.73) for line in lines)
    assert f"not a pair: {where}#1:" in capsys.readouterr().err

    bench = tmp_path / "rm-bench.jsonl"
    _write_lines(bench, [rm_bench, rm_bench])
    assert cli.main(["--address", "127.0.0.1:1", "--chunk-size", "4", "pairs", str(bench), "-o", str(out)]) == 0
    locators = [json.loads(line)["locator"] for line in out.read_text().splitlines()]
    subs = [f"c{i}-r{j}" for i in range(3) for j in range(3)]
    assert locators == [f"{bench.as_posix()}#{row}/{sub}" for row in (0, 1) for sub in subs]


def test_score_pairs_lines_name_the_model_version_that_scored_them(
    tmp_path: Path, stub: FakeStub, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: a reload or a rolling update of the scorer during a long run mixed two models' scores in one file, and
    # in its "p > 0.5" figure, with nothing to tell which line came from which.
    src = tmp_path / "in.jsonl"
    _write_lines(src, [_pair(i) for i in range(6)])
    out = tmp_path / "out.jsonl"
    assert cli.main(["--address", "127.0.0.1:1", "--chunk-size", "2", "pairs", str(src), "-o", str(out)]) == 0
    assert [json.loads(line)["version"] for line in out.read_text().splitlines()] == ["v1"] * 3 + ["v2"] * 3
    assert "warning: scored by several model versions ['v1', 'v2']" in capsys.readouterr().err
