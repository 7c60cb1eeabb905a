"""`synpref run` on the production path: no `study:` section, real clients on both sides.

The judges and the attribute labeller are tiny random causal LMs behind Hugging Face's
`transformers serve` (a real OpenAI-compatible server, not the in-repo fake); the humans are
the web desk, which this test drives over HTTP with an annotator token, answering every pair
it is shown until the run ends. The pairs are a slice of PandaLM's test set (../shared/data),
read where they lie. A random LM never answers the JSON the prompts ask for, so every vote
must be an abstention and every attribute request must come back unusable: the run still
has to finish, with the datasets written.
"""

from __future__ import annotations

import json
import queue
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from testing.judge_server import TransformersServe, build_tiny_chat_lm, offline_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
PANDALM = DATA / "PandaLM" / "testset-v1.json"
SYNPREF = Path(sys.executable).with_name("synpref")
RUN_TIMEOUT_S = 480.0
DESK_LINE = re.compile(r"^desk: (\d+) pairs wait for review at (http://\S+)$")


def choice_for(n: int) -> int:
    """The answer to the n-th pair shown: candidates 1 and 2 in turn, and "cannot decide" for every fourth."""
    return 0 if n % 4 == 3 else 1 + n % 2


class Output:
    """A child's stdout, read line by line on a thread so the test can act while it runs."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        assert proc.stdout is not None
        self._thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self._new.put(line.rstrip("\n"))

    def drain(self) -> list[str]:
        """Lines that arrived since the last call."""
        got = []
        while True:
            try:
                got.append(self._new.get_nowait())
            except queue.Empty:
                break
        self.lines.extend(got)
        return got

    def finish(self) -> str:
        """All output, once the child has closed its stdout."""
        self._thread.join(timeout=30)
        self.drain()
        return "\n".join(self.lines)


class DeskAnnotator:
    """One annotator at the desk's HTTP API, with a bearer token."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}"}

    def _call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = self.headers if body is None else {**self.headers, "Content-Type": "application/json"}
        request = urllib.request.Request(self.url + path, data=data, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert resp.status == 200
            return json.loads(resp.read())

    def next_pair(self) -> dict[str, Any] | None:
        """The pair the desk shows this annotator now, or None when none waits."""
        return self._call("/api/next")["pair"]

    def answer(self, pair_id: str, choice: int) -> dict[str, Any]:
        """Submit a verdict; the desk's reply (recorded, decided, progress)."""
        return self._call("/api/verdict", {"pair_id": pair_id, "choice": choice, "note": "e2e test"})


def write_config(tmp_path: Path, base_url: str, judges: list[Path], labeller: Path) -> Path:
    values = {
        "controller": {
            "workdir": str(tmp_path / "run"),
            "sources": [str(PANDALM)],
            "max_pairs": 40,
            "holdout_fraction": 0.2,
            "seed_pairs": 6,
            "iterations": 1,
            "patience": 1,
            "human": "desk",
            "human_budget": 3,
            "k_max": 2,
            "max_length": 64,
            "head_steps": 1,
            "head_eval_every": 1,
        },
        "annotator": {
            # The server returns one choice per request, whatever `n` asks: one sample per judge.
            "judges": [{"name": str(j), "base_url": base_url, "samples": 1, "temperature": 0.7} for j in judges],
            "attribute_model": {"name": str(labeller), "base_url": base_url, "samples": 1},
            "max_tokens": 16,
            "cache_dir": "",  # every annotation is a request the server sees
            "max_examples": 2,
        },
        "desk": {"host": "127.0.0.1", "port": 0},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def run_answering_the_desk(cfg: Path, cwd: Path, token: str) -> tuple[int, str, list[dict[str, Any]]]:
    """`synpref run --config cfg`, answering every pair the desk shows until the run exits.

    Returns the exit status, the output and the desk's replies to the verdicts sent.
    """
    env = offline_env(SYNPREF_DESK__TOKENS=f"e2e-annotator:{token}")
    proc = subprocess.Popen(
        [str(SYNPREF), "run", "--config", str(cfg)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = Output(proc)
    desk: DeskAnnotator | None = None
    replies: list[dict[str, Any]] = []
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while proc.poll() is None:
            assert time.monotonic() < deadline, "synpref run took too long:\n" + "\n".join(out.lines[-40:])
            for line in out.drain():
                match = DESK_LINE.match(line)
                if match and desk is None:
                    desk = DeskAnnotator(match.group(2), token)
            try:
                pair = desk.next_pair() if desk is not None else None
            except urllib.error.URLError:
                # The run closes the desk on its way out: it must then exit (else the desk died under it).
                proc.wait(timeout=60)
                break
            if pair is None:
                time.sleep(0.2)  # poll again: the next review round, or the run's end
                continue
            choice = choice_for(len(replies))
            replies.append({"pair_id": pair["pair_id"], "choice": choice, **desk.answer(pair["pair_id"], choice)})
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    return proc.returncode, out.finish(), replies


def read_datasets(state: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    rows = {}
    for version, written in state["results"]["datasets"].items():
        folder = Path(written["dir"])
        manifest = json.loads((folder / "manifest.json").read_text())
        tables = [pq.read_table(folder / shard["file"]) for shard in manifest["shards"]]
        assert tables, f"{version}: no Parquet shard"
        for table in tables:
            assert "split" in table.column_names, f"{version}: no split column"
        rows[version] = [r for t in tables for r in t.to_pylist()]
    return rows


@pytest.mark.skipif(not PANDALM.exists(), reason="../shared/data is not present")
def test_a_real_run_with_served_llm_judges_and_the_web_desk(tmp_path: Path) -> None:
    from synpref.services.controller.state import read_pools, read_records
    from synpref.v1.pair_pb2 import PREFERENCE_ABSTAIN

    judge_a = build_tiny_chat_lm(tmp_path / "judge-a", seed=0)
    judge_b = tmp_path / "judge-b"
    labeller = tmp_path / "labeller"
    # Same weights, other names: the server serves (and logs) each folder as its own model.
    shutil.copytree(judge_a, judge_b)
    shutil.copytree(judge_a, labeller)
    token = secrets.token_urlsafe(24)

    with TransformersServe(tmp_path / "serve.log") as server:
        cfg = write_config(tmp_path, server.base_url, [judge_a, judge_b], labeller)
        rc, out, replies = run_answering_the_desk(cfg, tmp_path, token)
        received = server.requests_per_model()
        answered = server.answered()
        server_log = server.log()

    assert rc == 0, out[-4000:]
    assert "synpref scorer --config" in out
    # The judges' HTTP sessions are closed with the run (one annotator per stage, closed at the end).
    assert "Unclosed client session" not in out, out[-4000:]
    workdir = tmp_path / "run"
    state = json.loads((workdir / "state.json").read_text())
    pools = read_pools(workdir)
    assert state["results"]["ingest"]["study"] is False

    # The desk: every pair it showed was answered over HTTP and decided by that one verdict.
    shown = sum(int(m.group(1)) for m in map(DESK_LINE.match, out.splitlines()) if m)
    assert shown == len(replies) >= 6  # the seed at least
    assert all(r["recorded"] and r["decided"] for r in replies)
    verified = [r for r in replies if r["choice"] != 0]
    outcomes = replies[-1]["progress"]["outcomes"]
    assert outcomes.get("verified", 0) + outcomes.get("flipped", 0) == len(verified)
    assert outcomes.get("discarded", 0) == len(replies) - len(verified)
    assert len(pools["gold"]) == len(verified)

    # The judge server: every annotated pair was a request to each judge, and every request was answered.
    stage1 = state["results"]["stage1"]
    stage2 = state["results"]["stage2"]
    assert all(e.get("failed", 0) == 0 for e in stage1) and stage2["failed"] == 0
    annotated_s1 = sum(e.get("annotated", 0) for e in stage1)
    assert set(received) == {str(judge_a), str(judge_b), str(labeller)}, server_log[-3000:]
    # The labeller is asked about every pair to curate in the attributes step, then again by the annotator
    # about every pair it sees (its answers never parse, so nothing is labelled or cached)...
    attributes = state["results"]["attributes"]
    assert attributes["labelled"] == 0 and attributes["unusable"] > 0
    assert received[str(labeller)] == attributes["unusable"] + annotated_s1 + stage2["pairs"]
    # ...the judges about the same pairs, less the Stage-2 pairs the best RM is already sure of.
    assert received[str(judge_a)] == received[str(judge_b)]
    assert annotated_s1 <= received[str(judge_a)] <= annotated_s1 + stage2["pairs"]
    # Both stages reached the judges (each runs its own Annotator, and so its own event loop, over the same judges).
    assert 0 < annotated_s1 < received[str(judge_a)]
    assert answered == sum(received.values())

    # Unparseable answers are abstentions, never a crash: no vote, no silver label, no attributes.
    records = read_records(workdir)
    votes = [v for r in records.values() for v in r.votes]
    assert votes and {v.judge for v in votes} == {str(judge_a), str(judge_b)}
    assert all(v.preference == PREFERENCE_ABSTAIN for v in votes)
    assert not pools["silver"]
    assert not any(r.attributes.task_category for r in records.values())

    # The datasets: Parquet versions with the pools' rows and a split column.
    rows = read_datasets(state)
    curated = pools["gold"] + pools.get("silver", []) + pools.get("stage2", [])
    expected = {
        "human-verified": (len(pools["gold"]), "train"),
        "curated": (len(curated), "train"),
        "heldout": (len(pools["holdout"]), "heldout"),
    }
    assert set(rows) == {"human-verified", "kept", "curated", "heldout"}
    for version, (count, split) in expected.items():
        assert len(rows[version]) == count > 0, version
        assert {r["split"] for r in rows[version]} == {split}, version
    kept = {r["id"] for r in rows["curated"] if r["decision"]["decision"] == "keep"}
    assert {r["id"] for r in rows["kept"]} == kept
    assert all(Path(written["dir"]).is_relative_to(workdir) for written in state["results"]["datasets"].values())


def test_a_real_run_without_judges_refuses_to_start(tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"controller": {"workdir": str(tmp_path / "run"), "sources": [str(PANDALM)]}}))
    result = subprocess.run(
        [str(SYNPREF), "run", "--config", str(cfg)],
        cwd=tmp_path,
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "no LLM judges configured" in result.stderr and "annotator.judges" in result.stderr
    assert not (tmp_path / "run").exists()
