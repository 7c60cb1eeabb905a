"""How the whole curation loop scales: the real Controller over 100k and 1M synthetic pairs, on this machine.

Pairs: N synthetic pairs mixed from the real texts of ../shared/data (hh-rlhf harmless-base,
PandaLM, LLMBar, RM-Bench). The conversations, chosen responses and rejected responses of the
real pairs are deduplicated into three lists, and pair i takes one of each by a mixed-radix
split of i, so every synthetic pair is a distinct (conversation, chosen, rejected) with a
unique id (syn-<i>). Conversations that share a 13-gram with the RM-Bench prompts are left out
of the conversation list, so the loop's default decontamination (on here, as in production)
drops none and the loop gets exactly N pairs. The source is written as gzipped JSON lines
(format "pairs"), streamed: N pairs are never held by this script.

Loop: the real Controller (services/controller/loop.py) with its in-process executor, every
step from ingest to report, `iterations` Stage-1 iterations (patience = iterations, so Stage 1
runs all of them unless the pool runs dry), then Stage 2 and the final steps. The parts that
are not the loop are cheap and named (testing/hashed.py):
  embedder      **HashedEmbedder**: hashed word unigrams + bigrams, 384-d (a stand-in for MiniLM)
  reward model  **HashedModels**: a Bradley–Terry linear model over 2^18 hashed features of
                (conversation + response), Adam on batches of 4,096 pairs, 2 epochs
  judges        the study's simulated judges (three, accuracy 0.8 / 0.75 / 0.7, 3 samples each)
  humans        the study's oracle (the source labels; study only), seed_pairs and
                human_budget at the controller's defaults (500 and 32 an iteration)
  label noise   10% of the pool's labels flipped (seeded), so curation has something to do

Per step (the Controller's on_step callback fires after each step commits) it records the
wall time and this process's CPU time (user + system, all threads) since the previous step ended
(so work done between steps counts in the next step; on a shared machine the CPU time is the
figure other jobs do not distort) and the peak RSS during it: the
kernel's high-water mark (VmHWM, reset after each step through /proc/self/clear_refs where
that is allowed) and, beside it, a sampler thread reading VmRSS every 50 ms. Each size runs
in its own process, so one size's memory does not count against the next.

    .venv/bin/python benchmarks/loop_scale.py --pairs 100000,1000000 --iterations 8 \\
        --workdir artifacts/loop_scale --out artifacts/loop_scale/results.json

Writes the results JSON and prints a table per size, the time ratio of the largest to the
smallest size per step and overall, and whether peak RSS stayed under --max-rss-gb (reported,
not asserted).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # for testing.hashed when run as a script

SOURCES = [
    DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz",
    DATA / "PandaLM" / "testset-v1.json",
    DATA / "LLMBar",
    DATA / "RM-Bench",
]
JUDGES: list[dict[str, Any]] = [
    {"name": "sim-judge-a", "accuracy": 0.8, "samples": 3, "sample_noise": 0.1},
    {"name": "sim-judge-b", "accuracy": 0.75, "samples": 3, "sample_noise": 0.1},
    {"name": "sim-judge-c", "accuracy": 0.7, "samples": 3, "sample_noise": 0.1},
]
LABEL_NOISE = 0.1
MB = 1024 * 1024


# ---------------------------------------------------------------- the synthetic source


def real_texts() -> tuple[list[str], list[str], list[str]]:
    """Distinct conversations, chosen responses and rejected responses of the real pairs, each as a JSON
    message list, in source order. Conversations that the default decontamination would drop are left out."""
    from synpref.services.ingest.preprocess import Decontaminator
    from synpref.shared.sources import iter_pairs

    deco = Decontaminator.from_sources(["rmbench"])
    parts: dict[str, dict[str, None]] = {"conversation": {}, "chosen": {}, "rejected": {}}
    for source in SOURCES:
        for pair in iter_pairs(source):
            if any(not m["content"].strip() for part in parts for m in pair[part]) or not pair["conversation"]:
                continue
            for part, seen in parts.items():
                text = json.dumps(pair[part], ensure_ascii=False)
                if part == "conversation":
                    user = "\n".join(m["content"] for m in pair[part] if m["role"] == "user")
                    if deco.overlap(user) is not None:
                        continue
                seen.setdefault(text, None)
    return list(parts["conversation"]), list(parts["chosen"]), list(parts["rejected"])


def write_source(path: Path, n: int, texts: tuple[list[str], list[str], list[str]]) -> int:
    """Write n distinct synthetic pairs to `path` (gzipped JSON lines), streamed; returns how many were written.

    Pair i is (conversation c, chosen a, rejected b) with c = i mod C, q = i div C, a = (c + q) mod A and
    b = (c + q div A) mod B: for a fixed c, q -> (a, b) is one-to-one while q < A * B, so no two pairs
    repeat while n < C * A * B. A draw whose chosen and rejected texts are equal is skipped.
    """
    convs, chosen, rejected = texts
    n_c, n_a, n_b = len(convs), len(chosen), len(rejected)
    if n > n_c * n_a * n_b:
        raise ValueError(f"{n} pairs asked; the real texts make at most {n_c * n_a * n_b} distinct ones")
    path.parent.mkdir(parents=True, exist_ok=True)
    written, i = 0, 0
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as fh:
        while written < n:
            c, q = i % n_c, i // n_c
            a, b = (c + q) % n_a, (c + q // n_a) % n_b
            i += 1
            if chosen[a] == rejected[b]:
                continue
            fh.write(
                f'{{"id": "syn-{written:08d}", "conversation": {convs[c]}, '
                f'"chosen": {chosen[a]}, "rejected": {rejected[b]}}}\n'
            )
            written += 1
    return written


# ---------------------------------------------------------------- memory


def status_kb(field: str) -> int:
    """A kB field of /proc/self/status (VmRSS, VmHWM); 0 where it cannot be read."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process; False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """A daemon thread reading VmRSS and RssAnon every `interval_s`; `take()` returns their peaks since the last take.

    RssAnon leaves out file pages mapped into the process (the vector file, SQLite's and FAISS's maps), which
    VmRSS counts although the kernel can drop them under pressure.
    """

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self._peak = 0
        self._peak_anon = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            rss, anon = status_kb("VmRSS"), status_kb("RssAnon")
            with self._lock:
                self._peak, self._peak_anon = max(self._peak, rss), max(self._peak_anon, anon)

    def take(self) -> tuple[int, int]:
        """Peak VmRSS and peak RssAnon (kB) since the previous take (the current ones if it has not sampled)."""
        with self._lock:
            peak, self._peak = max(self._peak, status_kb("VmRSS")), 0
            anon, self._peak_anon = max(self._peak_anon, status_kb("RssAnon")), 0
        return peak, anon

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class StepRecorder:
    """The Controller's on_step: wall time and peak RSS of each step, since the previous one ended."""

    def __init__(self, say: Callable[[str], None], partial: Path | None = None) -> None:
        self.say = say
        self.partial = partial
        """Where the steps so far are written after each step, so a run cut short still leaves its figures."""
        self.steps: list[dict[str, Any]] = []
        self.sampler = RssSampler().start()
        self.hwm_resets = reset_peak()
        self.max_rss_kb = 0
        self.last = time.perf_counter()
        self.last_cpu = time.process_time()

    def on_step(self, name: str) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        sampled, sampled_anon = self.sampler.take()
        hwm = status_kb("VmHWM") if self.hwm_resets else 0
        # ru_maxrss is the same high-water mark: read before the reset, or it is lost with it.
        self.max_rss_kb = max(self.max_rss_kb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, hwm, sampled)
        entry = {
            "step": name,
            "seconds": round(now - self.last, 3),
            "cpu_s": round(cpu - self.last_cpu, 3),
            "peak_rss_mb": round(max(hwm, sampled) / 1024, 1),
            "sampled_peak_rss_mb": round(sampled / 1024, 1),
            "sampled_peak_anon_mb": round(sampled_anon / 1024, 1),
            "rss_after_mb": round(status_kb("VmRSS") / 1024, 1),
        }
        self.steps.append(entry)
        self.say(f"step {name}: {entry['seconds']:.1f}s, peak RSS {entry['peak_rss_mb']:.0f} MB")
        if self.partial is not None:
            self.partial.write_text(json.dumps({"steps": self.steps, "max_rss_mb": round(self.max_rss_kb / 1024, 1)}))
        if self.hwm_resets:
            self.hwm_resets = reset_peak()
        self.last, self.last_cpu = time.perf_counter(), time.process_time()

    def close(self) -> None:
        self.sampler.stop()


# ---------------------------------------------------------------- one size


def loop_settings(workdir: Path, source: Path, iterations: int, seed: int):
    from synpref.shared.config import load_settings

    return load_settings(
        controller={
            "workdir": str(workdir / "run"),
            "sources": [str(source)],
            "source_format": "pairs",
            "seed": seed,
            "iterations": iterations,
            "patience": iterations,
            "study": {"human": "oracle", "label_noise": LABEL_NOISE, "judges": JUDGES},
        }
    )


class StopAfter(Exception):
    """Raised from on_step after the step --stop-after names (that step is committed and measured)."""


def run_size(
    n: int, workdir: Path, iterations: int, seed: int, say: Callable[[str], None], stop_after: str = ""
) -> dict[str, Any]:
    """Build n pairs under workdir, run the loop on them (to the end, or to `stop_after`) and return the
    per-step figures."""
    from synpref.services.controller.loop import Controller
    from synpref.services.controller.providers import OracleHumans
    from synpref.services.controller.simulated import SimulatedJudge
    from synpref.shared.config import SimulatedJudgeSettings
    from testing.hashed import HashedEmbedder, HashedModels

    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    started = time.perf_counter()
    texts = real_texts()
    source = workdir / f"pairs-{n}.jsonl.gz"
    written = write_source(source, n, texts)
    build_s = time.perf_counter() - started
    say(
        f"{n} pairs: wrote {source} ({source.stat().st_size / MB:.0f} MB) in {build_s:.1f}s from "
        f"{len(texts[0])} conversations, {len(texts[1])} chosen and {len(texts[2])} rejected responses"
    )
    del texts
    settings = loop_settings(workdir, source, iterations, seed)
    judges = [SimulatedJudge(SimulatedJudgeSettings(**j), seed) for j in JUDGES]
    recorder = StepRecorder(say, workdir.parent / f"partial-{n}.json")

    def on_step(name: str) -> None:
        recorder.on_step(name)
        if name == stop_after:
            raise StopAfter(name)

    loop_started = time.perf_counter()
    try:
        controller = Controller(
            settings,
            HashedModels(seed=seed),
            OracleHumans(),
            judges,  # type: ignore[arg-type]
            embed=HashedEmbedder().embed,
            on_step=on_step,
            progress=lambda message: say("  " + message),
        )
        try:
            state = controller.run()
        except StopAfter:
            state = controller.state
    finally:
        recorder.close()
    total_s = time.perf_counter() - loop_started
    return {
        "pairs": n,
        "pairs_written": written,
        "source_mb": round(source.stat().st_size / MB, 1),
        "build_source_s": round(build_s, 2),
        "total_s": round(total_s, 2),
        "max_rss_mb": round(recorder.max_rss_kb / 1024, 1),
        "rss_method": "VmHWM reset per step + 50 ms VmRSS sampler" if recorder.hwm_resets else "50 ms VmRSS sampler",
        "steps": recorder.steps,
        "done": list(state.done),
        "pools": pool_sizes(controller),
        "stage1_stopped": state.stage1_stopped,
        "holdout_accuracy": state.results.get("holdout_accuracy", {}),
        "workdir_mb": round(sum(p.stat().st_size for p in workdir.rglob("*") if p.is_file()) / MB, 1),
        "parts": {
            "embedder": "HashedEmbedder (testing/hashed.py: hashed word unigrams + bigrams, 384-d)",
            "reward_model": "HashedModels (testing/hashed.py: Bradley-Terry linear, 2^18 hashed features)",
            "judges": "simulated (study): " + ", ".join(f"{j['name']} acc {j['accuracy']}" for j in JUDGES),
            "humans": "oracle (study only)",
            "label_noise": LABEL_NOISE,
        },
    }


def pool_sizes(controller: Any) -> dict[str, int]:
    """Pool name -> pairs in it at the end of the run, as the controller counts them."""
    return {k: int(v) for k, v in sorted(controller.pool_sizes().items())}


# ---------------------------------------------------------------- report


def step_group(name: str) -> str:
    """s1.3.train -> s1.*.train: Stage-1 iterations summed per kind for the ratio table."""
    parts = name.split(".")
    return f"s1.*.{parts[2]}" if len(parts) == 3 and parts[0] == "s1" else name


def grouped(run: dict[str, Any], field: str = "seconds") -> dict[str, float]:
    out: dict[str, float] = {}
    for step in run["steps"]:
        key = step_group(step["step"])
        out[key] = out.get(key, 0.0) + step.get(field, 0.0)
    return out


def ratios(small: dict[str, Any], big: dict[str, Any]) -> dict[str, Any]:
    """Wall and CPU time of the big run over the small one, per step group and in total, beside the pair ratio."""
    out: dict[str, Any] = {
        "sizes": [small["pairs"], big["pairs"]],
        "pair_ratio": round(big["pairs"] / small["pairs"], 2),
    }
    for field, name in (("seconds", "wall"), ("cpu_s", "cpu")):
        a, b = grouped(small, field), grouped(big, field)
        total_a, total_b = sum(a.values()), sum(b.values())
        out[name] = {
            "total": round(total_b / total_a, 2) if total_a else None,
            "per_step": {k: round(b[k] / a[k], 2) if a.get(k) else None for k in b},
        }
    return out


def table(run: dict[str, Any]) -> str:
    if "error" in run:
        head = f"{run['pairs']:,} pairs: cut short ({run['error']}), max RSS so far {run['max_rss_mb']:.0f} MB"
    else:
        head = (
            f"{run['pairs']:,} pairs: {run['total_s']:.1f}s, max RSS {run['max_rss_mb']:.0f} MB ({run['rss_method']})"
        )
    lines = [head]
    lines.append(f"  {'step':<16} {'wall s':>9} {'CPU s':>9} {'peak RSS MB':>12} {'anon MB':>8} {'RSS after MB':>13}")
    for s in run["steps"]:
        cpu, anon = s.get("cpu_s", float("nan")), s.get("sampled_peak_anon_mb", float("nan"))
        lines.append(
            f"  {s['step']:<16} {s['seconds']:>9.1f} {cpu:>9.1f} {s['peak_rss_mb']:>12.0f} {anon:>8.0f}"
            f" {s['rss_after_mb']:>13.0f}"
        )
    if "pools" in run:
        lines.append(f"  pools: {run['pools']}; stage 1 stopped: {run['stage1_stopped']}")
    return "\n".join(lines)


def summary(runs: list[dict[str, Any]], max_rss_gb: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "max_rss_gb": max_rss_gb,
        "rss_check": {
            str(r["pairs"]): ("under" if r["max_rss_mb"] < max_rss_gb * 1024 else "OVER")
            + (" (run cut short)" if "error" in r else "")
            for r in runs
            if "steps" in r
        },
    }
    done = sorted((r for r in runs if "error" not in r), key=lambda r: r["pairs"])
    if len(done) > 1:
        out["time_ratio"] = ratios(done[0], done[-1])
    return out


# ---------------------------------------------------------------- main


def sizes(values: list[str]) -> list[int]:
    return [int(v.replace("_", "")) for value in values for v in value.split(",") if v.strip()]


def run_isolated(n: int, args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    """run_size in a child process of its own (its peak RSS is its own); an error entry if it fails."""
    out = args.workdir / f"result-{n}.json"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--pairs",
        str(n),
        "--iterations",
        str(args.iterations),
        "--seed",
        str(args.seed),
        "--workdir",
        str(args.workdir),
        "--out",
        str(out),
        "--max-rss-gb",
        str(args.max_rss_gb),
        "--in-process",
    ]
    if args.keep:
        command.append("--keep")
    if args.stop_after:
        command += ["--stop-after", args.stop_after]
    done = subprocess.run(command, check=False)
    if done.returncode != 0 or not out.exists():
        say(f"{n} pairs: the child process failed (exit {done.returncode})")
        partial = args.workdir / f"partial-{n}.json"
        return {
            "pairs": n,
            "error": f"exit {done.returncode}",
            **(json.loads(partial.read_text()) if partial.exists() else {}),
        }
    return json.loads(out.read_text())["runs"][0]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pairs", action="append", default=[], help="pair counts, repeated or comma-separated")
    p.add_argument("--iterations", type=int, default=8, help="Stage-1 iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=REPO / "artifacts" / "loop_scale")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: <workdir>/results.json)")
    p.add_argument("--max-rss-gb", type=float, default=4.0, help="report whether peak RSS stayed under this")
    p.add_argument("--keep", action="store_true", help="keep each size's workdir (default: removed after)")
    p.add_argument("--in-process", action="store_true", help="run every size in this process (no child process)")
    p.add_argument("--stop-after", default="", help="end each run after this step (e.g. prepare: time the early steps)")
    args = p.parse_args(argv)
    counts = sizes(args.pairs) or [100_000, 1_000_000]
    out = args.out or args.workdir / "results.json"
    missing = [s for s in SOURCES if not s.exists()]
    if missing:
        print(f"no data at {missing}", file=sys.stderr)
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:8.1f}s] {message}", flush=True)

    runs: list[dict[str, Any]] = []
    for n in counts:
        if args.in_process or len(counts) == 1:
            run = run_size(n, args.workdir / f"pairs-{n}", args.iterations, args.seed, say, args.stop_after)
            if not args.keep:
                shutil.rmtree(args.workdir / f"pairs-{n}", ignore_errors=True)
        else:
            run = run_isolated(n, args, say)
        runs.append(run)
        if "steps" in run:
            print(table(run), flush=True)
        result = {"runs": runs, "cpus": os.cpu_count(), **summary(runs, args.max_rss_gb)}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    final = summary(runs, args.max_rss_gb)
    for n, verdict in final["rss_check"].items():
        print(f"{int(n):,} pairs: peak RSS {verdict} {args.max_rss_gb:g} GB")
    if "time_ratio" in final:
        r = final["time_ratio"]
        for kind in ("wall", "cpu"):
            if kind not in r:
                continue
            print(
                f"{kind} time ratio {r['sizes'][1]:,} / {r['sizes'][0]:,} pairs: {r[kind]['total']} overall "
                f"(pairs x{r['pair_ratio']})"
            )
            for step, ratio in r[kind]["per_step"].items():
                print(f"  {step:<16} {ratio}")
    print(f"wrote {out}")
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
