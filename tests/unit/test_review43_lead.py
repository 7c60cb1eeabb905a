"""Review 43 (lead): the Job wait reads k8s_api's one request timeout; a section's field written with one
underscore is refused; a study without a learning curve draws no curve; a list role is one bad row."""

from __future__ import annotations

import logging
import os

import pytest

from synpref.shared.config import Settings, load_settings
from synpref.shared.config_base import ConfigError


@pytest.fixture
def no_synpref_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.upper().startswith("SYNPREF_")]:
        monkeypatch.delenv(name)


def test_the_job_wait_reads_the_one_request_timeout_that_bounded_calls_use(monkeypatch):
    # k8s_job imported REQUEST_TIMEOUT_S by name: a second binding that patching (or a later setting of) k8s_api's
    # constant did not reach, so wait's reads kept 30 s while every other call used the new bound.
    from unittest import mock

    from kubernetes import client

    from synpref.training import k8s_api
    from synpref.training.k8s_job import JobBackend

    monkeypatch.setattr(k8s_api, "REQUEST_TIMEOUT_S", 0.7)
    backend = JobBackend(client.ApiClient())
    done = client.V1Job(status=client.V1JobStatus(conditions=[client.V1JobCondition(type="Complete", status="True")]))
    with mock.patch.object(backend.batch, "read_namespaced_job", return_value=done) as read:
        assert backend.wait("ns", "job", timeout_s=60) == "Complete"
    assert read.call_args.kwargs["_request_timeout"] == 0.7


@pytest.mark.usefixtures("no_synpref_env")
def test_a_section_field_written_with_one_underscore_is_refused_with_the_nested_name(monkeypatch):
    # SYNPREF_SCORER_PORT=50061 (for SYNPREF_SCORER__PORT) looked like a Kubernetes Service link and was skipped
    # without a word: the scorer listened on 50051. SYNPREF_SCORER_DEFAULT_MODEL was only logged as ignored.
    monkeypatch.setenv("SYNPREF_SCORER_PORT", "50061")
    with pytest.raises(ConfigError, match=r"SYNPREF_SCORER_PORT \(did you mean SYNPREF_SCORER__PORT\?\)"):
        load_settings()
    monkeypatch.delenv("SYNPREF_SCORER_PORT")
    monkeypatch.setenv("SYNPREF_SCORER_DEFAULT_MODEL", "best")
    with pytest.raises(ConfigError, match=r"did you mean SYNPREF_SCORER__DEFAULT_MODEL\?"):
        load_settings()


@pytest.mark.usefixtures("no_synpref_env")
def test_the_service_links_of_helm_install_synpref_are_still_left_alone(monkeypatch, caplog):
    links = {
        "SYNPREF_SCORER_PORT": "tcp://10.96.0.7:50060",  # spells scorer.port, but its value is a link's
        "SYNPREF_SCORER_SERVICE_HOST": "10.96.0.7",
        "SYNPREF_SCORER_SERVICE_PORT": "50060",
        "SYNPREF_SCORER_PORT_50060_TCP_PORT": "50060",
        "SYNPREF_SERVICE_HOST": "10.96.0.9",  # a Service named synpref: spells service.host
        "SYNPREF_DESK_PORT": "tcp://10.96.0.8:8080",
    }
    for name, value in links.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.WARNING, logger="synpref.shared.config_env"):
        assert load_settings().scorer.port == Settings().scorer.port
    assert caplog.records == []


def test_a_study_without_a_learning_curve_draws_no_empty_curve_figure(tmp_path):
    # --no-curve (no --resume): write_outputs drew learning_curve.png from a made-up point at 0 pairs, accuracy 0
    # (on a log axis: an empty figure), listed it under the report's figures, and the curve's table was empty.
    import argparse
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("curation_quality_r43", root / "benchmarks" / "curation_quality.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(out=tmp_path, heads=bench.HEADS, max_length=256, max_pairs=0, pool_size=100)
    args.noise, args.error_modes, args.budgets, args.seeds = [0.3], ["length_correlated"], [], [0]
    text = bench.write_outputs(args, [], [])
    assert not (tmp_path / "learning_curve.png").exists()
    assert "learning_curve.png" not in text and "not run (--no-curve)" in text


def test_a_message_whose_role_is_a_list_is_one_bad_row_not_a_failed_file(tmp_path):
    # `role not in ROLES` raised TypeError (unhashable) for a list or dict role: the reader counted the whole file
    # as failed, and every later row of it was lost on every rerun.
    import json

    from synpref.shared.sources import iter_source

    message = {"role": "user", "content": "q"}
    rows = [
        {"chosen": [message, {"role": "assistant", "content": f"good {i}"}],
         "rejected": [message, {"role": ["assistant"] if i == 1 else "assistant", "content": f"bad {i}"}]}
        for i in range(3)
    ]  # fmt: skip
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    read = list(iter_source(path))
    assert [r.pair is not None for r in read] == [True, False, True]
    assert "unknown role ['assistant']" in (read[1].error or "")


def test_a_scorer_pod_that_stops_mid_answer_is_asked_again(monkeypatch):
    # A scorer pod stopped (a rolling update) while answering a reload: the cut-off answer raised
    # http.client.IncompleteRead, which is no OSError, so it escaped admin_post as a bare traceback and the
    # controller's publish step died instead of asking the next pod again.
    import json
    import socket
    import threading
    import time
    from types import SimpleNamespace

    from synpref.services.controller import publish

    answer = json.dumps({"model": "best", "version": "v1", "model_id": "/m"}).encode()
    server = socket.create_server(("127.0.0.1", 0))
    calls: list[int] = []

    def serve() -> None:
        for i in range(2):
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                calls.append(i)
                head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(answer)}\r\n\r\n"
                conn.sendall(head.encode() + (answer[:5] if i == 0 else answer))  # the first cut off, then closed

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    monkeypatch.setattr(publish, "time", SimpleNamespace(monotonic=time.monotonic, sleep=lambda s: None))
    try:
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        publish.reload_scorer(url, {"best": {"path": "/m", "version": "v1"}}, timeout_s=5, wait_s=30)
    finally:
        thread.join(10)
        server.close()
    assert calls == [0, 1]
