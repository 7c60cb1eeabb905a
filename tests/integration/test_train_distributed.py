"""Real processes: 2-rank DDP and FSDP (gloo, CPU) against 1 rank, FSDP with ranks that get
different numbers of micro-batches, and resume after SIGKILL.

All compare final weights read back from the HF checkpoints the runs wrote.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from synpref.training.data import write_jsonl
from testing.tiny import build_tiny_reward_model

pytestmark = pytest.mark.integration

# The distributed runs train in float64 (precision=fp64). They sum the same terms as one
# process in another order (gradients all-reduced over ranks, rows padded to other widths),
# which Adam amplifies where its second moment is tiny: in fp32 that reached 3.4e-5 on one
# CPU and 6.4e-6 on another, against an update of ~1e-2. In fp64 the same reordering costs
# ~1e-13, so a bound of 1e-7 of the largest weight update is both safe on any CPU and far
# below any real defect (a wrong loss scale alone moves weights by ~1e-8 through Adam's eps).
UPDATE_RTOL = 1e-7

WORDS = ["apple", "river", "stone", "cloud", "music", "paper", "light", "green", "quiet", "table"]


def pairs(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        k = int(torch.randint(2, 14, (1,), generator=g))
        words = " ".join(WORDS[int(j)] for j in torch.randint(len(WORDS), (k,), generator=g))
        out.append(
            {
                "conversation": [{"role": "user", "content": f"tell me about {words}"}],
                "chosen": [{"role": "assistant", "content": f"gladly, {words[: 5 + i % 30]}"}],
                "rejected": [{"role": "assistant", "content": f"no. {words[: 3 + i % 20]}"}],
                "source": "synthetic",
            }
        )
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = pairs(96)
    train = write_jsonl(data[:80], root / "train.jsonl")
    evals = write_jsonl(data[80:], root / "eval.jsonl")
    texts = [m["content"] for p in data for m in p["conversation"] + p["chosen"] + p["rejected"]]
    model = build_tiny_reward_model(root / "model", arch="qwen3", texts=texts, vocab_size=300, seed=11)
    return root, model, train, evals


def overrides(model: Path, out: Path, train: Path, evals: Path, **extra) -> list[str]:
    values = {
        "model_name_or_path": model,
        "output_dir": out,
        "train_files": f"[{train}]",
        "eval_files": f"[{evals}]",
        "global_batch_size": 8,
        "micro_batch_size": 2,
        "learning_rate": 3e-3,
        "lr_scheduler": "linear",
        "warmup_ratio": 0.1,
        "max_length": 128,
        "progress": "false",
        "seed": 3,
        **extra,
    }
    args = []
    for key, value in values.items():
        args += ["--set", f"{key}={value}"]
    return args


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def torchrun(port: str) -> list[str]:
    """The command that starts synpref.training.cli on 2 local ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port]


def run_bounded(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run cmd; past `timeout` seconds fail the test instead of waiting on a hung run. SIGTERM lets
    torchrun stop the ranks it started (each in a session of its own), SIGKILL if it does not."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"{cmd[2]} still running after {timeout} s (hung?):\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def train_records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "train"]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def largest_update(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    return max(float((after[k].double() - before[k].double()).abs().max()) for k in before)


def assert_close_to_update(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], update: float) -> float:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    bound = UPDATE_RTOL * update
    assert worst <= bound, f"max |diff| {worst:.3g} > {bound:.3g} (1e-7 of the largest update {update:.3g})"
    return worst


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    # One process, same binary, same data order: resuming repeats the very same operations.
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    worst = max((float((a[k] - b[k]).abs().max()) for k in differ), default=0.0)
    assert not differ, f"resumed weights differ in {differ[:5]} (max |diff| {worst:.3g})"


@pytest.fixture(scope="module")
def single_run(setup):
    root, model, train, evals = setup
    args = overrides(model, root / "one", train, evals, max_steps=6, precision="fp64")
    run = subprocess.run(
        [sys.executable, "-m", "synpref.training.cli", *args],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return weights(root / "one" / "final")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process(setup, single_run, strategy):
    root, model, train, evals = setup
    out = root / strategy
    cli = [*torchrun("29531" if strategy == "ddp" else "29532"), "-m", "synpref.training.cli"]
    args = overrides(model, out, train, evals, max_steps=6, distributed=strategy, save_steps=3, precision="fp64")
    run = subprocess.run([*cli, *args], env=env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f'"strategy": "{strategy}"' in (out / "metrics.jsonl").read_text()
    assert run.stdout.count('"checkpoint_dir"') == 1  # rank 0 reports, rank 1 does not
    before = weights(model)
    assert all(not torch.equal(before[k], single_run[k]) for k in before)
    assert all(v.dtype == torch.float64 for v in single_run.values())
    update = largest_update(before, single_run)
    first = weights(out / "final")
    worst = assert_close_to_update(single_run, first, update)
    print(f"{strategy} 2 ranks vs 1 rank (fp64), max |weight diff| after 6 steps: {worst:.3g} (update {update:.3g})")
    if strategy == "fsdp":
        # Run again: it resumes from the sharded run's checkpoint-3 (full optimizer state
        # gathered and re-sharded) and must retrace steps 4-6 exactly.
        again = subprocess.run([*cli, *args], env=env(), capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert str(out / "checkpoint-3") in (out / "metrics.jsonl").read_text()
        assert_close_to_update(first, weights(out / "final"), update)


def test_fsdp_with_uneven_micro_batch_counts_matches_one_process(setup):
    """5 pairs a step, one to a micro-batch: rank 0 runs 3 micro-batches a step, rank 1 runs 2. FSDP
    collectives need both ranks in every forward and backward, so rank 1 must run a third pass that
    adds nothing; without it the run hangs. Losses and weights must match one process's."""
    root, model, train, evals = setup
    extra = {
        "global_batch_size": 5,
        "micro_batch_size": 1,
        "max_tokens_per_micro_batch": 0,
        "max_steps": 2,
        "logging_steps": 1,
        "precision": "fp64",
    }
    one = run_bounded(
        [sys.executable, "-m", "synpref.training.cli", *overrides(model, root / "odd-one", train, evals, **extra)],
        timeout=120,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    args = overrides(model, root / "odd-fsdp", train, evals, distributed="fsdp", **extra)
    run = run_bounded([*torchrun("29533"), "-m", "synpref.training.cli", *args], timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    expected, got = train_records(root / "odd-one"), train_records(root / "odd-fsdp")
    assert [r["step"] for r in got] == [1, 2]
    for want, have in zip(expected, got, strict=True):
        # step 2's loss comes from the weights step 1's gradient made, so it checks that gradient too
        for key in ("loss", "accuracy", "grad_norm"):
            assert have[key] == pytest.approx(want[key], rel=1e-12, abs=1e-15), (want["step"], key)
    before, single = weights(model), weights(root / "odd-one" / "final")
    assert_close_to_update(single, weights(root / "odd-fsdp" / "final"), largest_update(before, single))


def test_sigkilled_run_resumes_to_the_same_weights(setup):
    root, model, train, evals = setup
    cmd = [sys.executable, "-m", "synpref.training.cli"]
    steps = 20
    ref = subprocess.run(
        [*cmd, *overrides(model, root / "ref", train, evals, max_steps=steps)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = root / "killed"
    args = overrides(model, out, train, evals, max_steps=steps, save_steps=3, save_total_limit=2)
    proc = subprocess.Popen([*cmd, *args], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while not (out / "checkpoint-6").exists():
            assert proc.poll() is None, "run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint-6 in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "final").exists()
    resumed = subprocess.run([*cmd, *args], env=env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert '"resumed_from": "' + str(out / "checkpoint-") in (out / "metrics.jsonl").read_text()
    assert_identical(weights(root / "ref" / "final"), weights(out / "final"))
