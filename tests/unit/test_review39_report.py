"""Review 39, area N: the controller's human providers, run report, state and `synpref run`; each test
reproduces a bug found there."""

from __future__ import annotations

import io
import json
import sqlite3
import sys

import pytest

from synpref.services.controller.providers import HumanInputEnded, TerminalHumans
from synpref.services.controller.state import VERDICTS_FILE, StepVerdicts, VerdictLog
from synpref.shared.pairs import new_pair, new_record


def record(i: int):
    return new_record(
        new_pair(
            [{"role": "user", "content": f"question {i}"}],
            [{"role": "assistant", "content": f"good answer {i}"}],
            [{"role": "assistant", "content": f"bad answer {i}"}],
            "test",
        )
    )


def test_terminal_end_of_input_stops_instead_of_discarding_the_rest(tmp_path):
    # stdin closed (nohup, a pod): every pair left was abstained on, so decided "discarded" for good with no
    # human involved. Now the answers given are journaled and the rest stay undecided.
    log = VerdictLog(tmp_path / VERDICTS_FILE)
    records = [record(i) for i in range(4)]
    journal = StepVerdicts(log, "seed", records)
    humans = TerminalHumans(stdin=io.StringIO("1\n2\n"), stdout=io.StringIO())
    with pytest.raises(HumanInputEnded, match="input ended at pair 3 of 4"):
        humans.review(records, journal=journal)
    assert len(log.recorded("seed", records)) == 2
    with pytest.raises(HumanInputEnded):
        TerminalHumans(stdin=io.StringIO(""), stdout=io.StringIO()).review([record(9)])
    log.close()


def test_run_on_a_closed_terminal_discards_nothing_and_resumes(tmp_path, light_run, monkeypatch, capsys):
    from synpref.services.controller import embedded

    judges = [{"name": "sim-a", "accuracy": 0.85}, {"name": "sim-b", "accuracy": 0.75}]
    workdir = tmp_path / "workdir"
    config = light_run(tmp_path, workdir, 40, human="terminal", study={"human": "real", "judges": judges})
    monkeypatch.setattr(sys, "stdin", io.StringIO("1\n"))  # one answer, then the input ends
    assert embedded.main(["--config", str(config), "--quiet"]) == 1
    assert "input ended" in capsys.readouterr().err
    with sqlite3.connect(workdir / "pairs.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM pairs WHERE pool = 'discarded'").fetchone() == (0,)
    with sqlite3.connect(workdir / VERDICTS_FILE) as db:
        assert db.execute("SELECT COUNT(*) FROM verdicts").fetchone() == (1,)

    monkeypatch.setattr(sys, "stdin", io.StringIO("1\n" * 100))
    assert embedded.main(["--config", str(config), "--quiet"]) == 0
    seed = json.loads((workdir / "state.json").read_text())["results"]["seed_human"]
    assert seed["discarded"] == 0 and seed["verified"] >= 2


def test_run_fresh_never_empties_a_folder_holding_the_sources_or_no_run(tmp_path, light_run, capsys):
    # `workdir: /data` beside the pairs, or `--workdir .`: --fresh emptied the folder, the sources (or a home
    # folder's files) with it.
    from synpref.services.controller import embedded

    data = tmp_path / "data"
    config = light_run(data, data, 40)
    assert (data / "pairs-40.jsonl").exists()
    assert embedded.main(["--config", str(config), "--quiet", "--fresh"]) == 2
    assert "would delete the sources" in capsys.readouterr().err
    assert (data / "pairs-40.jsonl").exists()

    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("years of work")
    config = light_run(tmp_path, tmp_path / "run", 40)
    assert embedded.main(["--config", str(config), "--quiet", "--workdir", str(tmp_path / "home"), "--fresh"]) == 2
    assert "holds no run" in capsys.readouterr().err
    assert (tmp_path / "home" / "thesis.tex").read_text() == "years of work"

    # A run's own workdir is still emptied and started over.
    assert embedded.main(["--config", str(config), "--quiet"]) == 0
    assert embedded.main(["--config", str(config), "--quiet", "--fresh"]) == 0
    assert "resuming" not in capsys.readouterr().out


def test_file_humans_find_a_pair_flipped_by_label_noise_under_its_ingest_id(tmp_path):
    # A labels file written from the source lists ingest ids; the study's noise flipped some pairs under new ids,
    # so the file's verdict was missed, the pair abstained on and discarded: the pairs curation should repair.
    from synpref.services.controller.providers import FileHumans
    from synpref.shared.pairs import flipped
    from synpref.v1.pair_pb2 import DECISION_FLIP, DECISION_KEEP

    clean, noisy = record(1), flipped(record(2))
    path = tmp_path / "labels.jsonl"
    path.write_text(
        json.dumps({"id": clean.pair.id, "preferred": "chosen"})
        + "\n"
        + json.dumps({"id": noisy.lineage.original_id, "preferred": "chosen"})  # the source's own label
        + "\n"
    )
    (route_a, a), (route_b, b) = FileHumans(path).review([clean, noisy])
    assert (route_a, a.decision.decision) == ("verified", DECISION_KEEP)
    assert (route_b, b.decision.decision) == ("verified", DECISION_FLIP)
    assert b.pair.chosen[0].content == "good answer 2"  # the humans' (the source's) preferred side


def test_run_fresh_still_empties_a_workdir_holding_only_the_run_store_dir(tmp_path, light_run):
    from synpref.services.controller import embedded

    workdir = tmp_path / "run"
    (workdir / "state").mkdir(parents=True)  # store_dir inside workdir, the run stopped before writing elsewhere
    config = light_run(tmp_path, workdir, 40, store_dir=str(workdir / "state"))
    assert embedded.main(["--config", str(config), "--quiet", "--fresh"]) == 0


def test_synpref_controller_says_in_one_line_that_the_terminal_input_ended(tmp_path, capsys, monkeypatch):
    # HumanInputEnded reached `synpref controller` as a traceback (a pod's stdin is closed).
    import io

    import yaml

    from synpref.services.controller import main as controller_main
    from testing import controller_fakes as fakes

    source = fakes.write_synthetic(tmp_path / "pairs.jsonl", 60, seed=3)
    controller = {
        "sources": [str(source)],
        "workdir": str(tmp_path / "w"),
        "human": "terminal",
        "study": {"human": "real", "judges": [{"name": "sim-a"}]},  # simulated judges, the terminal's humans
    }
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"controller": controller, "service": {"grpc_port": 0, "metrics_port": 0}}))
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert controller_main.main(["--config", str(cfg), "--exit-when-done"]) == 1
    err = capsys.readouterr().err
    assert "synpref controller: stopped, terminal: input ended" in err and "Traceback" not in err
