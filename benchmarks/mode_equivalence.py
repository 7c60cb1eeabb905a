"""Same seeded run, two modes: `synpref run` in process vs `synpref controller` over a real broker.

    .venv/bin/python benchmarks/mode_equivalence.py --pairs 2000 --out artifacts/mode-equivalence

Both modes read the same N real pairs (hh-rlhf harmless-base and PandaLM from ../shared/data,
a seeded sample), use the same judges (testing/fake_judges.py: a deterministic
OpenAI-compatible server on loopback, in this process's thread), the same humans and the same
head-trained MiniLM RMs. Humans give one deterministic verdict list (by pair id: mostly the
source's label, some the other side, some abstain), either at the web desk (--humans desk,
the default: the desk embedded in `synpref run`, the desk service over Kafka, both answered
over HTTP) or as a verdict file (--humans file: study.human = file, read by either controller).
In Kafka mode every part is its own process: the controller (executor = kafka), gold-scorer
(scoring through the scorer service, which the controller reloads over its admin port),
annotator, consistency filter, scorer and desk.

Three runs: in process; Kafka clean; Kafka with SIGKILLs, each process restarted (Kills: the
controller and then the gold-scorer mid-Stage-1, the annotator and then the filter mid-Stage-2;
the controller runs with batch_pairs 64, so a restart goes on after its last committed batch;
the dataset writer takes no part, final.dataset writes the Parquet itself). Each Kafka run is
compared with the in-process one: pool of every pair, Stage-2 decision and rule, the pair's
label (flipped or not), judge votes, RM p per role (tolerance 1e-4) and every dataset
version's rows (ids, labels, split). The report (report.json, report.md) lists each difference with what it is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SOURCES = [DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz", DATA / "PandaLM" / "testset-v1.json"]
P_TOLERANCE = 1e-4
"""Largest |p_kafka - p_in_process| counted as equal: the scorer service runs the exported checkpoint on
padded batches, the loop the head over cached [CLS] features (float32 either way)."""

KNOWN_CAUSES: dict[str, str] = {}
"""Differences understood but not fixed yet, by what their kind contains (e.g. "score version" matches
"score version[best]" and "dataset kept: scores version"). None today: the last one, score versions in
the cluster naming the scorer's start-up model, was fixed by reading each response's served version."""


def cause_of(kind: str) -> str:
    """The known cause of a difference kind, or "unexplained"."""
    normal = kind.replace("scores version", "score version")
    return next((cause for known, cause in KNOWN_CAUSES.items() if known in normal), "unexplained")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.1)


class Proc:
    """One process; stdout and stderr appended to <logdir>/<name>.log; restartable."""

    def __init__(self, name: str, cmd: list[str], logdir: Path, env: dict[str, str]) -> None:
        self.name, self.cmd, self.env = name, cmd, env
        self.log = logdir / f"{name}.log"
        self.runs = 0
        self.p: subprocess.Popen | None = None

    def start(self) -> Proc:
        self.runs += 1
        with self.log.open("a") as fh:
            fh.write(f"--- start {self.runs}\n")
            fh.flush()
            self.p = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=fh, stderr=subprocess.STDOUT)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def since_start(self) -> str:
        return self.text().rsplit(f"--- start {self.runs}\n", 1)[-1]

    def alive(self) -> bool:
        return self.p is not None and self.p.poll() is None

    def wait_for(self, text: str, timeout_s: float) -> None:
        def seen() -> bool:
            if text in self.since_start():
                return True
            if not self.alive():
                raise RuntimeError(f"{self.name} exited {self.p and self.p.returncode}:\n{self.text()[-4000:]}")
            return False

        wait_until(seen, timeout_s, f"{self.name}: {text!r}")

    def kill(self) -> None:
        assert self.p is not None
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(30)

    def stop(self, timeout_s: float = 30) -> None:
        if not self.alive():
            return
        assert self.p is not None
        self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(10)


def synpref(*args: str) -> list[str]:
    return [sys.executable, "-m", "synpref.shared.cli", *args]


def proc_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------- inputs


Answers = dict[str, tuple[str, list[dict[str, str]]]]
"""Pair id -> (the verdict: chosen, rejected or abstain; the pair's chosen messages, to find it at the desk)."""


def write_human_labels(path: Path) -> tuple[dict[str, int], Answers]:
    """Deterministic verdicts for every pair the sources hold, by its content id: mostly the source's label,
    about 15% the other side (flips) and 5% abstain (discards). Returns how many of each, and each answer."""
    from synpref.services.ingest.preprocess import ingest_paths
    from synpref.shared.pairs import message_dicts

    records, _ = ingest_paths([str(s) for s in SOURCES], None, None, ["rmbench"])
    counts: Counter[str] = Counter()
    lines = []
    answers: Answers = {}
    for record in records:
        digest = int(hashlib.sha256(record.pair.id.encode()).hexdigest(), 16) % 20
        preferred = "abstain" if digest == 0 else "rejected" if digest <= 3 else "chosen"
        counts[preferred] += 1
        lines.append(json.dumps({"id": record.pair.id, "preferred": preferred}))
        answers[record.pair.id] = (preferred, message_dicts(record.pair.chosen))
    path.write_text("\n".join(lines) + "\n")
    return dict(counts), answers


class DeskAnswerer:
    """One annotator answering, over HTTP, every pair a web desk shows, by the verdict file's answers.

    `url_of` gives the desk's URL once it is up ("" before); the desk shows the two candidates in an
    order of its own, so the answer is found by comparing them with the pair's chosen messages.
    """

    def __init__(self, answers: Answers, token: str, url_of: Any) -> None:
        self.answers, self.url_of = answers, url_of
        self.headers = {"Authorization": f"Bearer {token}"}
        self.answered = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="desk-answerer", daemon=True)

    def start(self) -> DeskAnswerer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(30)

    def _call(self, url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = self.headers if body is None else {**self.headers, "Content-Type": "application/json"}
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=30) as resp:
            return json.loads(resp.read())

    def choice(self, pair: dict[str, Any]) -> int:
        preferred, chosen = self.answers.get(pair["pair_id"], ("abstain", []))
        if preferred == "abstain":
            return 0
        chosen_first = pair["candidates"][0] == chosen
        return 1 if chosen_first == (preferred == "chosen") else 2

    def _run(self) -> None:
        while not self.stopped.is_set():
            url = self.url_of()
            pair = None
            if url:
                try:
                    pair = self._call(url + "/api/next")["pair"]
                    if pair is not None:
                        body = {"pair_id": pair["pair_id"], "choice": self.choice(pair)}
                        self._call(url + "/api/verdict", body)
                        self.answered += 1
                except OSError:  # the desk is not up yet, restarting, or closed at the end of a run
                    pair = None
            if pair is None:
                self.stopped.wait(0.2)  # poll the desk again: the next review round, or the run's end


def base_config(root: Path, n: int, judge_url: str, labels: Path, humans: str, token: str) -> dict[str, Any]:
    """The run's settings, shared by both modes (each mode sets its workdir, executor and services).

    humans = file: the study's verdict file, read by the controller; desk: the web desk (embedded in process,
    the desk service over Kafka), answered by a DeskAnswerer with the same verdicts.
    """
    who: dict[str, Any] = {"study": {"human": "file", "human_labels_file": str(labels)}}
    if humans == "desk":
        who = {"human": "desk"}
    config = {
        "service": {"host": "127.0.0.1", "grpc_port": 0, "metrics_port": 0, "shutdown_grace_s": 1},
        "log_level": "INFO",
        "annotator": {
            "judges": [
                {"name": "judge-a", "base_url": judge_url, "samples": 2},
                {"name": "judge-b", "base_url": judge_url, "samples": 1},
            ],
            "max_concurrency": 16,
            "backoff_s": 0.05,
            "skip_confident": True,
        },
        "controller": {
            "sources": [str(s) for s in SOURCES],
            "max_pairs": n,
            "seed": 7,
            "seed_pairs": max(20, n // 20),
            "iterations": 2,
            "patience": 2,
            "human_budget": max(8, n // 50),
            "max_length": 128,
            "head_steps": 100,
            "head_eval_every": 25,
            # Small batches: the killed run's SIGKILLs land between committed batches, so a restart goes
            # on after the last committed one (the default, 10000, is one batch at these sizes).
            "batch_pairs": 64,
            **who,
        },
        "desk": {"host": "127.0.0.1", "port": 0, "tokens": f"modeq:{token}"},
    }
    return config


def merged(base: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for name, values in sections.items():
        out[name] = {**out.get(name, {}), **values}
    return out


def write_yaml(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=True))
    return path


# ---------------------------------------------------------------- runs


def run_in_process(root: Path, base: dict[str, Any], timeout_s: float) -> float:
    """`synpref run` on the config; returns its wall seconds."""
    work = root / "in-process"
    # The judges' example index: the loop writes it, the annotator reads it (in this process here).
    annotator = {"cache_dir": str(root / "cache-in-process"), "examples_index": str(root / "examples-in-process")}
    config = merged(base, controller={"workdir": str(work)}, annotator=annotator)
    cfg = write_yaml(root / "in-process.yaml", config)
    started = time.perf_counter()
    with (root / "in-process.log").open("w") as log:
        done = subprocess.run(
            synpref("run", "--config", str(cfg), "--quiet"), cwd=REPO, env=proc_env(), stdout=log,
            stderr=subprocess.STDOUT, timeout=timeout_s, check=False,
        )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"synpref run exited {done.returncode}:\n{(root / 'in-process.log').read_text()[-4000:]}")
    return time.perf_counter() - started


def kafka_topics(bootstrap: str, label: str) -> dict[str, str]:
    """A fresh name for every route, created with two partitions (so stages really run in parallel)."""
    from synpref.shared.config import KafkaSettings, TopicSettings
    from synpref.shared.kafka.admin import ensure_topics

    base = f"modeq-{label}-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    topics = TopicSettings(**{route: f"{base}.{route}" for route in TopicSettings.model_fields})
    ensure_topics(KafkaSettings(bootstrap_servers=bootstrap), topics.all(), partitions=2, replication_factor=1)
    return topics.model_dump()


def run_kafka(
    root: Path,
    name: str,
    base: dict[str, Any],
    bootstrap: str,
    judges: Any,
    kill: bool,
    timeout_s: float,
    answerer: DeskAnswerer | None = None,
) -> dict:
    """The controller, scorer, stage services (and desk, with `answerer`) as separate processes on the broker.

    With `kill`: SIGKILL the controller and the gold-scorer mid-Stage-1, the annotator and the filter
    mid-Stage-2, restarting each (Kills). Returns wall seconds and what was killed when (and whether the
    step had already committed: then it says so).
    """
    work = root / name
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    token = root / f"{name}-admin-token"
    token.write_text(hashlib.sha256(name.encode()).hexdigest())
    token.chmod(0o600)
    scorer_port, admin_port, desk_port = free_port(), free_port(), free_port()
    config = merged(
        base,
        # Stages poll 8 records at a time, an eighth of the controller's batch (base_config: batch_pairs), so a
        # Stage 2 of two dozen pairs still reaches the filter in several polls and its kill lands mid-step.
        # A 15 s session (default 45 s): a restarted stage waits out its killed predecessor's session
        # before its group hands it the partitions.
        kafka={"bootstrap_servers": bootstrap, "consumer_poll_ms": 200, "max_batch": 8, "session_timeout_ms": 15_000},
        topics=kafka_topics(bootstrap, name),
        controller={
            "workdir": str(work),
            "executor": "kafka",
            "stage_timeout_s": timeout_s,
            "scorer_reload_url": f"http://127.0.0.1:{admin_port}",
            "scorer_admin_token_file": str(token),
        },
        # The controller writes the judges' example index here and the annotator processes read it.
        annotator={"cache_dir": str(root / f"cache-{name}"), "examples_index": str(root / f"examples-{name}")},
        scoring={"mode": "grpc", "scorer_address": f"127.0.0.1:{scorer_port}"},
        desk={"port": desk_port, "group_id": f"modeq-desk-{name}-{os.getpid()}"},
        scorer={
            "port": scorer_port,
            "http_port": free_port(),
            "metrics_port": 0,
            "admin_enabled": True,
            "admin_port": admin_port,
            "admin_token_file": str(token),
            "model_root": str(models),
            "max_length": base["controller"]["max_length"],
            "device": "cpu",
            "torch_threads": 1,
        },
    )
    cfg = write_yaml(root / f"{name}.yaml", config)
    logs = root / f"{name}-logs"
    logs.mkdir(exist_ok=True)
    env = proc_env()
    scorer = Proc("scorer", synpref("scorer", "--config", str(cfg)), logs, env).start()
    wait_until(lambda: port_open(admin_port) or not scorer.alive(), 120, "the scorer's admin port")
    services = {
        service: Proc(service, synpref(service, "--config", str(cfg)), logs, env)
        for service in ("gold-scorer", "annotator", "filter")
    }
    if answerer is not None:
        services["desk"] = Proc("desk", synpref("desk", "--config", str(cfg)), logs, env)
        answerer.url_of = lambda: f"http://127.0.0.1:{desk_port}"
    for proc in services.values():
        proc.start()
    if "desk" in services:
        wait_until(lambda: port_open(desk_port) or not services["desk"].alive(), 120, "the desk's port")
    for proc in services.values():
        if proc.name != "desk":
            proc.wait_for(" ready: ", 180)
    controller = Proc("controller", synpref("controller", "--config", str(cfg), "--exit-when-done"), logs, env)
    events: list[str] = []
    started = time.perf_counter()
    try:
        controller.start()
        if kill:
            kills = Kills(controller, services, config, bootstrap, work, started, timeout_s)
            kills.stage1()
            kills.stage2(judges)
            events = kills.events
        wait_until(lambda: not controller.alive(), timeout_s, "the controller to finish")
        assert controller.p is not None
        if controller.p.returncode != 0:
            raise RuntimeError(f"controller exited {controller.p.returncode}:\n{controller.text()[-4000:]}")
        return {"seconds": time.perf_counter() - started, "events": events}
    finally:
        for proc in [controller, *services.values(), scorer]:
            proc.stop()


class Kills:
    """The SIGKILLs of the killed run, each restarted, each recorded in `events` with where it landed.

    Stage 1: the controller in the first Stage-1 step with more than one pair, once its second batch (with
    fewer than three, its first) is partly decided; then, once the restarted controller has sent a batch
    again, the gold-scorer after its first scored records of it. Stage 2: the annotator once the judges
    answered a Stage-2 request; then the filter after its first decided records once the annotator is
    back. A stage polls kafka.max_batch (8) records at a
    time and the controller sends batch_pairs (64), so a stage killed after its first output of a batch
    still holds the rest of it. Every wait is on the controller's log, the topics' end offsets or the
    judges' request count, with a deadline. (The dataset writer takes no part in the loop: the
    controller's final.dataset step writes the Parquet versions itself.)
    """

    def __init__(
        self,
        controller: Proc,
        services: dict[str, Proc],
        config: dict[str, Any],
        bootstrap: str,
        work: Path,
        started: float,
        timeout_s: float,
    ) -> None:
        self.controller, self.services = controller, services
        self.topics: dict[str, str] = config["topics"]
        self.batch_pairs: int = config["controller"]["batch_pairs"]
        self.bootstrap, self.work, self.started, self.timeout_s = bootstrap, work, started, timeout_s
        self.events: list[str] = []

    def count(self, route: str) -> int:
        return messages_in(self.bootstrap, self.topics[route])

    def logged(self, line: str) -> bool:
        """Whether the controller logged `line` in any of its runs (a step is done once)."""
        return line in self.controller.text()

    def running(self) -> bool:
        """True while the controller runs; RuntimeError once it has exited (it is waited on only while alive)."""
        if not self.controller.alive():
            raise RuntimeError(f"controller exited:\n{self.controller.text()[-4000:]}")
        return True

    def wait_for_more(self, route: str, than: int, give_up: str) -> None:
        """Wait until the topic of `route` holds more than `than` messages (or the controller logs `give_up`)."""
        wait_until(
            lambda: self.running() and (self.count(route) > than or self.logged(give_up)),
            self.timeout_s,
            f"a record on {route}",
        )

    def step(self) -> str:
        """Where the controller is: in its last started step, or just after it."""
        started = re.findall(r"^\[(\S+)\] \.\.\.$", self.controller.text(), re.MULTILINE)
        name = started[-1] if started else "start-up"
        return f"after {name} had committed" if self.logged(f"[{name}] done") else f"in {name}"

    def kill_and_restart(self, proc: Proc, where: str) -> None:
        proc.kill()
        self.events.append(f"{proc.name} SIGKILLed at {time.perf_counter() - self.started:.1f}s, {where}")
        proc.start()
        proc.wait_for(" ready: ", 180)

    def kill_at_output(self, name: str, route: str, base: int, give_up: str, doing: str) -> None:
        """SIGKILL service `name` once its output topic `route` holds more than `base` messages: the where
        says the step the controller is in and how many records the service had put out since `base`."""
        self.wait_for_more(route, base, give_up)
        proc = self.services[name]
        proc.kill()  # at once: the where is read after the kill, from what the topics and log hold then
        where = f"{self.step()}, {self.count(route) - base} records {doing} since the batch was sent"
        self.events.append(f"{name} SIGKILLed at {time.perf_counter() - self.started:.1f}s, {where}")
        proc.start()
        proc.wait_for(" ready: ", 180)

    def stage1(self) -> None:
        controller = self.controller

        def big_batch() -> re.Match | None:
            self.running()
            return re.search(r"stage 1 iteration (\d+): .* retrieved ([2-9]|\d\d+) ", controller.since_start())

        wait_until(big_batch, self.timeout_s, "a Stage-1 batch of more than one pair")
        found = big_batch()
        assert found is not None
        step, retrieved = f"s1.{found.group(1)}.curate", int(found.group(2))
        done = f"[{step}] done"
        # With three batches or more, once the second is partly decided: the first is committed, and the
        # restarted controller goes on after it. Else once the first is partly decided.
        batch = self.batch_pairs
        self.wait_for_more("s1_decided", self.count("s1_decided") + (batch if retrieved > 2 * batch else 0), done)
        controller.kill()
        if self.logged(done):
            where = f"after {step} had committed"
        else:
            committed = json.loads(committed_progress(self.work, step) or '{"next": 0}')["next"]
            where = f"in {step}, its batch in flight ({committed} of {retrieved} pairs in committed batches)"
        self.events.append(f"controller SIGKILLed at {time.perf_counter() - self.started:.1f}s, {where}")
        # The restarted controller sends its uncommitted batch again (or, had the step committed, the next
        # step's first batch): the gold-scorer is killed once it has scored some of it.
        sent_before = self.count("s1_raw")
        controller.start()
        self.wait_for_more("s1_raw", sent_before, "[s2.curate] ...")
        self.kill_at_output("gold-scorer", "s1_scored", self.count("s1_scored"), "[s2.curate] ...", "scored")

    def stage2(self, judges: Any) -> None:
        done = "[s2.curate] done"
        self.controller.wait_for("[s2.curate] ...", self.timeout_s)
        before = sum(judges.requests.values())

        def judged() -> bool:
            return self.running() and (sum(judges.requests.values()) > before or self.logged(done))

        wait_until(judged, self.timeout_s, "Stage-2 judging")
        self.kill_and_restart(self.services["annotator"], self.stage2_where("judging"))
        # The restarted annotator finishes the batch; the filter is killed once it has decided some of it.
        self.kill_at_output("filter", "s2_decided", self.count("s2_decided"), done, "decided")

    def stage2_where(self, doing: str) -> str:
        if self.logged("[s2.curate] done"):
            return "after s2.curate had committed"
        progress = json.loads(committed_progress(self.work, "s2.curate") or '{"pairs": 0}')
        return f"in s2.curate, {doing} ({progress['pairs']} pairs in committed batches)"


def committed_progress(work: Path, step: str) -> str:
    """The controller's last committed progress of `step` (JSON, "" if none), read from its store read-only
    (a WAL reader: the controller, alive or not, is never blocked)."""
    import sqlite3

    from synpref.services.controller.state import STORE_FILE

    db = sqlite3.connect(f"file:{work / STORE_FILE}?mode=ro", uri=True, timeout=30)
    try:
        row = db.execute("SELECT value FROM meta WHERE name = ?", (f"progress:{step}",)).fetchone()
        return str(row[0]) if row else ""
    finally:
        db.close()


def messages_in(bootstrap: str, topic: str, timeout_s: float = 120) -> int:
    """How many messages the topic's partitions hold (end offsets summed). Asks again for up to timeout_s
    while the broker answers with an error: on a loaded machine a local broker is briefly fenced at times."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            consumer = KafkaConsumer(bootstrap_servers=bootstrap)
            try:
                parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
                return sum(consumer.end_offsets(parts).values())
            finally:
                consumer.close()
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)  # the broker is not answering now: ask again, within the deadline


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# ---------------------------------------------------------------- comparison


def run_view(work: Path) -> dict[str, Any]:
    """What a run decided, per record key: pool, decision, label, votes, p per role; and its datasets' rows."""
    import pyarrow.parquet as pq

    from synpref.services.controller.state import StateStore, key_of, read_pools, read_records
    from synpref.v1.pair_pb2 import Decision

    store = StateStore(work)
    state = store.load()
    store.close()
    records = read_records(work)
    pool_of = {k: pool for pool, keys in read_pools(work).items() for k in keys}
    pairs = {}
    for key, r in records.items():
        pairs[key] = {
            "pool": pool_of.get(key, ""),
            "decision": Decision.Name(r.decision.decision),
            "rule": r.decision.rule,
            "label": r.pair.id,
            "flipped": r.pair.id != key_of(r) and bool(r.lineage.original_id),
            "votes": sorted((v.judge, int(v.preference)) for v in r.votes),
            "p": {s.model: s.p for s in r.scores},
            "versions": {s.model: s.version for s in r.scores},
        }
    datasets = {}
    for version, info in state.results.get("datasets", {}).items():
        rows = {}
        for shard in sorted(Path(info["dir"]).glob("*.parquet")):
            for row in pq.read_table(shard).to_pylist():
                rows[row["id"]] = row
        datasets[version] = rows
    return {"pairs": pairs, "datasets": datasets, "history": state.history, "stopped": state.stage1_stopped}


def compare(reference: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Every difference of `other` from `reference`, grouped by what differs (a few examples each)."""
    diffs: dict[str, list[Any]] = {}

    def note(kind: str, example: Any) -> None:
        diffs.setdefault(kind, []).append(example)

    a, b = reference["pairs"], other["pairs"]
    for key in sorted(set(a) ^ set(b)):
        note("record only in one run", key)
    max_p = 0.0
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        for field in ("pool", "decision", "rule", "label", "flipped", "votes"):
            if x[field] != y[field]:
                note(field, {"key": key, "in_process": x[field], "kafka": y[field]})
        if set(x["p"]) != set(y["p"]):
            note("scored roles", {"key": key, "in_process": sorted(x["p"]), "kafka": sorted(y["p"])})
        for role in set(x["p"]) & set(y["p"]):
            gap = abs(x["p"][role] - y["p"][role])
            max_p = max(max_p, gap)
            if gap > P_TOLERANCE:
                note(f"p[{role}]", {"key": key, "in_process": x["p"][role], "kafka": y["p"][role]})
            if x["versions"][role] != y["versions"][role]:
                note(f"score version[{role}]", {"key": key, "in_process": x["versions"][role],
                                                "kafka": y["versions"][role]})  # fmt: skip
    for version in sorted(set(reference["datasets"]) | set(other["datasets"])):
        ra, rb = reference["datasets"].get(version, {}), other["datasets"].get(version, {})
        for rid in sorted(set(ra) ^ set(rb)):
            note(f"dataset {version}: row only in one run", rid)
        for rid in sorted(set(ra) & set(rb)):
            for column in sorted(set(ra[rid]) | set(rb[rid])):
                x, y = ra[rid].get(column), rb[rid].get(column)
                if column == "lineage":  # ingested_at is the wall clock of each run's ingest step
                    x, y = without(x, "ingested_at"), without(y, "ingested_at")
                if column == "scores":
                    for kind in score_differences(x or [], y or []):
                        note(f"dataset {version}: scores {kind}", {"id": rid})
                elif x != y:
                    note(f"dataset {version}: column {column}", {"id": rid, "in_process": x, "kafka": y})
    if reference["stopped"] != other["stopped"]:
        note("stage 1 stop", {"in_process": reference["stopped"], "kafka": other["stopped"]})
    for i, (x, y) in enumerate(zip(reference["history"], other["history"], strict=False)):
        for field in ("gold", "silver", "unverified", "train_pairs", "best_iteration"):
            if x.get(field) != y.get(field):
                note(f"stage 1 history[{field}]", {"iteration": i, "in_process": x.get(field), "kafka": y.get(field)})
    return {
        "max_p_gap": max_p,
        "differences": {
            kind: {"count": len(found), "cause": cause_of(kind), "examples": found[:3]}
            for kind, found in sorted(diffs.items())
        },
    }


def without(value: Any, field: str) -> Any:
    return {k: v for k, v in value.items() if k != field} if isinstance(value, dict) else value


def score_differences(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[str]:
    """What differs between two rows' score lists: roles, versions, or values beyond P_TOLERANCE."""
    if [s["model"] for s in a] != [s["model"] for s in b]:
        return ["roles"]
    out = []
    if [s["version"] for s in a] != [s["version"] for s in b]:
        out.append("version")
    if any(abs(x["p"] - y["p"]) > P_TOLERANCE for x, y in zip(a, b, strict=True)):
        out.append("p")
    return out


def summarize(view: dict[str, Any]) -> dict[str, Any]:
    pairs = view["pairs"].values()
    return {
        "pools": dict(Counter(p["pool"] for p in pairs)),
        "decisions": dict(Counter(p["decision"] for p in pairs)),
        "flipped": sum(p["flipped"] for p in pairs),
        "datasets": {v: len(rows) for v, rows in view["datasets"].items()},
    }


# ---------------------------------------------------------------- the whole comparison


def run_equivalence(
    n: int,
    root: Path,
    bootstrap: str,
    kill: bool = True,
    timeout_s: float = 1800,
    modes: tuple[str, ...] = (),
    humans: str = "file",
) -> dict[str, Any]:
    """Run in process and over Kafka (clean, and with kills when `kill`), compare, and return the report."""
    from testing.fake_judges import FakeOpenAI

    root.mkdir(parents=True, exist_ok=True)
    labels = root / "human-labels.jsonl"
    verdicts, answers = write_human_labels(labels)
    token = hashlib.sha256(f"desk:{root}".encode()).hexdigest()
    judges = FakeOpenAI().start()
    answerer = None
    try:
        base = base_config(root, n, judges.base_url, labels, humans, token)
        report: dict[str, Any] = {
            "pairs": n,
            "sources": [str(s) for s in SOURCES],
            "humans": humans,
            "human_verdicts": verdicts,
        }
        if humans == "desk":
            answerer = DeskAnswerer(answers, token, lambda: desk_url(root / "in-process.log")).start()
        seconds = {"in_process": run_in_process(root, base, timeout_s)}
        reference = run_view(root / "in-process")
        report["in_process"] = summarize(reference)
        runs = modes or (("kafka", "kafka-killed") if kill else ("kafka",))
        for name in runs:
            outcome = run_kafka(
                root, name, base, bootstrap, judges, name.endswith("killed"), timeout_s, answerer=answerer
            )
            seconds[name] = outcome["seconds"]
            view = run_view(root / name)
            report[name] = {**summarize(view), "events": outcome["events"], **compare(reference, view)}
        report["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
        report["judge_requests"] = dict(judges.requests)
        if answerer is not None:
            report["desk_verdicts_sent"] = answerer.answered
        return report
    finally:
        if answerer is not None:
            answerer.stop()
        judges.stop()


def desk_url(log: Path) -> str:
    """The embedded desk's URL, from the last line `synpref run` printed about it ("" before the first)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    found = re.findall(r"^desk: \d+ pairs wait for review at (http://\S+)$", text, re.MULTILINE)
    return found[-1] if found else ""


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# In process vs Kafka: {report['pairs']} pairs", "", f"Sources: {', '.join(report['sources'])}", ""]
    lines.append(f"Humans: {report['humans']} (verdicts {report['human_verdicts']})")
    lines.append(f"Wall seconds: {report['seconds']}")
    lines.append(f"In process: {report['in_process']}")
    for name in ("kafka", "kafka-killed"):
        if name not in report:
            continue
        r = report[name]
        lines += ["", f"## {name}", "", f"events: {r['events'] or 'none'}", f"pools/decisions: {summarize_line(r)}",
                  f"max |p gap|: {r['max_p_gap']:.2e}", ""]  # fmt: skip
        if not r["differences"]:
            lines.append("No differences.")
        for kind, found in r["differences"].items():
            cause = next((k for k, v in KNOWN_CAUSES.items() if v == found["cause"]), "unexplained")
            lines.append(f"- {kind}: {found['count']} (cause: {cause}); e.g. {json.dumps(found['examples'])[:300]}")
    lines += ["", "Known causes:", *(f"- {k}: {v}" for k, v in KNOWN_CAUSES.items())]
    return "\n".join(lines) + "\n"


def summarize_line(r: dict[str, Any]) -> str:
    return json.dumps({k: r[k] for k in ("pools", "decisions", "flipped", "datasets")})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pairs", type=int, default=2000)
    p.add_argument("--out", default="artifacts/mode-equivalence")
    p.add_argument("--no-kill", action="store_true", help="skip the run with SIGKILLs")
    p.add_argument(
        "--humans", choices=["desk", "file"], default="desk", help="the web desk answered over HTTP, or a verdict file"
    )
    p.add_argument("--bootstrap", default="", help="an existing broker; default: start a local one")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    out = Path(args.out).resolve()
    broker = None
    bootstrap = args.bootstrap
    if not bootstrap:
        from testing.local_kafka import LocalKafka

        broker = LocalKafka().start()
        bootstrap = broker.bootstrap_servers
    try:
        report = run_equivalence(args.pairs, out, bootstrap, kill=not args.no_kill, humans=args.humans)
    finally:
        if broker is not None:
            broker.stop()
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    # Exit 1 for any difference no known cause explains.
    runs = [report[m] for m in ("kafka", "kafka-killed") if m in report]
    unexplained = [k for r in runs for k, v in r["differences"].items() if v["cause"] == "unexplained"]
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
