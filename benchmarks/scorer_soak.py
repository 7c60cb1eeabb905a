"""Scorer soak (issue 12): a real `synpref scorer` process at 2x its measured capacity.

1. Build a tiny Qwen3-shaped reward model (testing.tiny) on real hh-rlhf texts and start
   `python -m synpref.shared.cli scorer` as its own process (HTTP on loopback).
2. Capacity: closed-loop /get_reward clients (one item per request) for --capacity-s.
3. Soak: open-loop load at --overload x capacity for --seconds; a fixed schedule of request
   start times, so a slow server does not slow the offered rate. --bad-share of requests are
   oversized (over max_body_bytes) or malformed (bad JSON, wrong types, lone surrogates).
   The scorer's RSS is read from /proc/<pid>/status every second.
4. Drain: SIGTERM, the same load keeps coming until the process exits.

Every response is classified (200, 400, 413, 429, 503, 504, other 5xx, connection error) by
phase (soak / drain) and by kind of request. Goals: RSS flat within 10% of its value after
warm-up, and no 5xx other than 503 (draining) at all.
Run: .venv/bin/python benchmarks/scorer_soak.py [--seconds 600] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # testing/ (tiny models) lives at the repo root
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
MB = 1024 * 1024

# Scorer settings for the soak: small bounds so shedding, not memory, absorbs the overload.
SCORER_ENV = {
    "SYNPREF_SCORER__METRICS_PORT": "0",
    "SYNPREF_SCORER__TORCH_THREADS": "1",
    "SYNPREF_SCORER__DEVICE": "cpu",
    "SYNPREF_SCORER__MAX_LENGTH": "512",
    "SYNPREF_SCORER__MAX_BODY_BYTES": str(1 * MB),
    "SYNPREF_SCORER__MAX_QUEUE": "256",
    "SYNPREF_SCORER__MAX_ENCODE_QUEUE": "64",
    "SYNPREF_SCORER__HTTP_TIMEOUT_S": "10",
    "SYNPREF_SCORER__DRAIN_S": "10",
}


# ------------------------------------------------------------------ requests


def load_texts(path: Path, n: int) -> list[str]:
    """Real hh-rlhf conversations (conversation + chosen reply) as message lists."""
    from synpref.shared.sources import iter_pairs

    out: list[Any] = []
    for pair in iter_pairs(path):
        conv = list(pair["conversation"]) + list(pair["chosen"])
        if conv and conv[-1]["role"] == "assistant" and any(m["content"].strip() for m in conv):
            out.append(conv)
        if len(out) >= n:
            break
    return out


def bad_bodies(max_body_bytes: int) -> dict[str, bytes]:
    """One body per hostile kind; each should get a 4xx, never a 5xx."""
    return {
        "oversized": b'{"query": ["' + b"a" * (max_body_bytes + 1024) + b'"]}',
        "bad_json": b'{"query": ["an unfinished',
        "wrong_type": b'{"query": [1, 2, 3]}',
        "not_object": b'["query"]',
        "lone_surrogate": b'{"query": ["\\ud800 lone surrogate"]}',
    }


def classify(status: int | str) -> str:
    if isinstance(status, str):
        return status
    if status in (200, 400, 413, 429, 503, 504):
        return str(status)
    return "other_5xx" if status >= 500 else f"other_{status}"


@dataclass
class Tally:
    """Outcomes by (phase, kind, class) and latencies of well-formed 200s in the soak phase."""

    outcomes: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    ok_latencies: list[float] = field(default_factory=list)
    # well-formed outcomes by 10 s bucket of their scheduled start: shows when errors cluster
    timeline: Counter[tuple[int, str]] = field(default_factory=Counter)
    skipped: int = 0  # not sent: the client's in-flight bound was reached

    def by(self, phase: str | None = None, kind_good: bool | None = None) -> Counter[str]:
        out: Counter[str] = Counter()
        for (p, kind, cls), n in self.outcomes.items():
            if phase is not None and p != phase:
                continue
            if kind_good is not None and (kind == "good") != kind_good:
                continue
            out[cls] += n
        return out


async def post(session: Any, url: str, body: bytes, timeout_s: float) -> int | str:
    """The HTTP status, or which connection error: refused (no listener), timeout, or reset."""
    import aiohttp

    try:
        async with session.post(
            url, data=body, headers={"Content-Type": "application/json"}, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            await resp.read()
            return resp.status
    except TimeoutError:
        return "conn_timeout"
    except aiohttp.ClientConnectorError:
        return "conn_refused"
    except (aiohttp.ClientError, OSError):
        return "conn_reset"


# ------------------------------------------------------------------ phases


async def measure_capacity(url: str, bodies: list[bytes], seconds: float, concurrency: int) -> float:
    """Items/s that closed-loop clients get through in `seconds` (200s only)."""
    import aiohttp

    done = 0
    stop_at = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def client(k: int) -> None:
            nonlocal done
            i = k
            while time.monotonic() < stop_at:
                if await post(session, url, bodies[i % len(bodies)], 60) == 200:
                    done += 1
                i += concurrency

        t0 = time.monotonic()
        await asyncio.gather(*(client(k) for k in range(concurrency)))
        wall = time.monotonic() - t0
    return done / wall


async def open_loop(
    url: str,
    good: list[bytes],
    bad: dict[str, bytes],
    rate: float,
    seconds: float,
    bad_share: float,
    max_in_flight: int,
    proc: subprocess.Popen[bytes],
    tally: Tally,
    drain_limit_s: float,
) -> dict[str, float]:
    """Offer `rate` requests/s for `seconds`, then SIGTERM the scorer and keep offering
    until it exits (at most drain_limit_s). Latency counts from each request's scheduled start."""
    import aiohttp

    rng = random.Random(0)
    bad_kinds = sorted(bad)
    in_flight = 0
    tasks: set[asyncio.Task[None]] = set()
    times: dict[str, float] = {}

    async def one(kind: str, body: bytes, scheduled: float, phase: str) -> None:
        nonlocal in_flight
        try:
            status = await post(session, url, body, 30)
            tally.outcomes[(phase, kind, classify(status))] += 1
            if kind == "good":
                tally.timeline[(int((scheduled - t0) // 10), classify(status))] += 1
            if phase == "soak" and kind == "good" and status == 200:
                tally.ok_latencies.append(time.monotonic() - scheduled)
        finally:
            in_flight -= 1

    # limit=0: no client-side connection pool queue; the in-flight bound above keeps it finite.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.monotonic()
        term_at = t0 + seconds
        stop_at = term_at + drain_limit_s
        i = 0
        while True:
            scheduled = t0 + i / rate
            now = time.monotonic()
            if scheduled > now:
                await asyncio.sleep(scheduled - now)
            if scheduled >= term_at and "sigterm" not in times:
                proc.send_signal(signal.SIGTERM)
                times["sigterm"] = time.monotonic() - t0
            if "sigterm" in times and (proc.poll() is not None or scheduled >= stop_at):
                times["exit"] = time.monotonic() - t0
                break
            phase = "drain" if "sigterm" in times else "soak"
            i += 1
            if in_flight >= max_in_flight:
                tally.skipped += 1
                continue
            if rng.random() < bad_share:
                kind = bad_kinds[rng.randrange(len(bad_kinds))]
                body = bad[kind]
            else:
                kind, body = "good", good[i % len(good)]
            in_flight += 1
            task = asyncio.ensure_future(one(kind, body, scheduled, phase))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        # Requests sent after the process exited fail fast; wait for the stragglers.
        await asyncio.gather(*list(tasks))
        times["offered"] = i
    return times


# ------------------------------------------------------------------ process and RSS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RssSampler(threading.Thread):
    """(seconds since start, RSS MB) every second until stopped or the process is gone."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop.is_set():
            value = rss_mb(self.pid)
            if value is None:
                return
            self.samples.append((time.monotonic() - self.t0, value))
            self.stop.wait(1.0)


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the scorer exited with {proc.returncode} before serving")
        try:
            if urllib.request.urlopen(url + "/health", timeout=1).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the scorer did not become healthy")


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))] if s else float("nan")


# ------------------------------------------------------------------ main


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from testing.tiny import build_tiny_reward_model

    work = Path(tempfile.mkdtemp(prefix="scorer-soak-"))
    convs = load_texts(Path(args.data), args.items)
    ckpt = build_tiny_reward_model(work / "qwen", arch="qwen3", texts=[m["content"] for c in convs for m in c])
    tok = AutoTokenizer.from_pretrained(ckpt)
    good = [json.dumps({"query": [tok.apply_chat_template(c, tokenize=False)]}).encode() for c in convs]
    bad = bad_bodies(int(SCORER_ENV["SYNPREF_SCORER__MAX_BODY_BYTES"]))

    http_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNPREF_")} | SCORER_ENV
    cmd = [sys.executable, "-m", "synpref.shared.cli", "scorer", "--model", f"best={ckpt}"]
    cmd += ["--port", str(free_port()), "--http-port", str(http_port)]
    log_path = work / "scorer.log"
    url = f"http://127.0.0.1:{http_port}"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(url, proc, 180)
            sampler = RssSampler(proc.pid)
            sampler.start()
            capacity = asyncio.run(measure_capacity(url + "/get_reward", good, args.capacity_s, args.concurrency))
            rate = args.overload * capacity
            print(f"capacity {capacity:.1f} items/s (closed loop, {args.concurrency} clients); offering {rate:.1f}/s")
            soak_t0 = time.monotonic() - sampler.t0
            tally = Tally()
            times = asyncio.run(
                open_loop(
                    url + "/get_reward",
                    good,
                    bad,
                    rate,
                    args.seconds,
                    args.bad_share,
                    args.max_in_flight,
                    proc,
                    tally,
                    args.drain_limit_s,
                )
            )
            exit_code = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    sampler.stop.set()
    sampler.join(5)

    soak_end = soak_t0 + times["sigterm"]
    in_soak = [(t, v) for t, v in sampler.samples if soak_t0 <= t <= soak_end]
    warm_at = soak_t0 + min(args.warmup_s, args.seconds / 2)
    after_warm = [v for t, v in in_soak if t >= warm_at]
    baseline = after_warm[0] if after_warm else float("nan")
    peak = max(after_warm, default=float("nan"))
    final = in_soak[-1][1] if in_soak else float("nan")
    soak_all = tally.by("soak")
    sent = sum(soak_all.values())
    shed = soak_all["429"] + soak_all["503"]
    bad_5xx = {cls: n for cls, n in tally.by().items() if cls in ("504", "other_5xx")}
    rss_ok = peak <= 1.10 * baseline and final <= 1.10 * baseline
    no_5xx_ok = not bad_5xx and tally.by("soak")["503"] == 0
    result = {
        "scorer_settings": {k.removeprefix("SYNPREF_SCORER__").lower(): v for k, v in SCORER_ENV.items()},
        "capacity_items_per_s": capacity,
        "offered_per_s": rate,
        "soak_s": args.seconds,
        "requests_offered": int(times["offered"]),
        "skipped_client_bound": tally.skipped,
        "rss_mb": {
            "before_soak": in_soak[0][1] if in_soak else None,
            "baseline_after_warmup": baseline,
            "warmup_s": warm_at - soak_t0,
            "peak_after_warmup": peak,
            "peak_whole_soak": max((v for _, v in in_soak), default=None),
            "final_before_sigterm": final,
            "samples": [(round(t - soak_t0, 1), round(v, 1)) for t, v in sampler.samples],
        },
        "shed_rate": shed / sent if sent else float("nan"),
        "ok_200_per_s": tally.by("soak", kind_good=True)["200"] / args.seconds,
        "latency_ms_good_200": {
            "p50": percentile(tally.ok_latencies, 0.50) * 1000,
            "p99": percentile(tally.ok_latencies, 0.99) * 1000,
            "n": len(tally.ok_latencies),
        },
        "outcomes": {
            phase: {
                "well_formed": dict(sorted(tally.by(phase, True).items())),
                "hostile": {
                    kind: dict(
                        sorted(
                            Counter(
                                {c: n for (p, k, c), n in tally.outcomes.items() if (p, k) == (phase, kind)}
                            ).items()
                        )
                    )
                    for kind in sorted(bad)
                },
            }
            for phase in ("soak", "drain")
        },
        "timeline_10s_well_formed": [
            {"t_s": b * 10, **{c: n for (bb, c), n in sorted(tally.timeline.items()) if bb == b}}
            for b in sorted({b for b, _ in tally.timeline})
        ],
        "drain": {
            "sigterm_at_s": times["sigterm"],
            "exited_after_s": times["exit"] - times["sigterm"],
            "exit_code": exit_code,
        },
        "verdict": {"rss_flat_10pct": rss_ok, "no_5xx_but_503_in_drain": no_5xx_ok},
        "log": str(log_path),
    }
    return result


def report(r: dict[str, Any]) -> None:
    rss, lat, v = r["rss_mb"], r["latency_ms_good_200"], r["verdict"]
    print(f"scorer settings: {r['scorer_settings']}")
    print(
        f"capacity {r['capacity_items_per_s']:.1f} items/s; "
        f"offered {r['offered_per_s']:.1f} req/s for {r['soak_s']:.0f} s "
        f"({r['requests_offered']} requests, {r['skipped_client_bound']} skipped at the client's in-flight bound)"
    )
    print(
        f"RSS MB: before soak {rss['before_soak']:.1f}, "
        f"after {rss['warmup_s']:.0f} s warm-up {rss['baseline_after_warmup']:.1f}, "
        f"peak after warm-up {rss['peak_after_warmup']:.1f} (whole soak {rss['peak_whole_soak']:.1f}), "
        f"final {rss['final_before_sigterm']:.1f}"
    )
    print(
        f"shed rate (429+503 of soak requests) {r['shed_rate'] * 100:.1f}%; well-formed 200s {r['ok_200_per_s']:.1f}/s"
    )
    print(
        f"well-formed 200 latency (from scheduled start): "
        f"p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms (n={lat['n']})"
    )
    for phase, rows in r["outcomes"].items():
        print(f"{phase}: well-formed {rows['well_formed']}")
        for kind, counts in rows["hostile"].items():
            print(f"{phase}:   {kind:15s} {counts}")
    for row in r["timeline_10s_well_formed"]:
        if any(c in row for c in ("504", "other_5xx", "conn_timeout", "conn_reset")):
            print(f"  well-formed outcomes at t={row['t_s']} s: {row}")
    d = r["drain"]
    print(f"drain: scorer exited {d['exited_after_s']:.1f} s after SIGTERM with code {d['exit_code']}")
    print(f"RSS flat within 10% of the post-warm-up value: {'PASS' if v['rss_flat_10pct'] else 'FAIL'}")
    print(f"no 5xx other than 503 during drain: {'PASS' if v['no_5xx_but_503_in_drain'] else 'FAIL'}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--items", type=int, default=512, help="distinct well-formed requests, sent round-robin")
    p.add_argument("--seconds", type=float, default=600.0, help="open-loop soak length")
    p.add_argument("--capacity-s", type=float, default=20.0)
    p.add_argument("--concurrency", type=int, default=64, help="closed-loop clients for the capacity phase")
    p.add_argument("--overload", type=float, default=2.0, help="offered rate as a multiple of capacity")
    p.add_argument("--bad-share", type=float, default=0.01, help="share of oversized or malformed requests")
    p.add_argument("--max-in-flight", type=int, default=1024, help="client bound on open requests")
    p.add_argument("--warmup-s", type=float, default=60.0, help="RSS baseline is taken this far into the soak")
    p.add_argument("--drain-limit-s", type=float, default=60.0, help="longest the load continues after SIGTERM")
    p.add_argument("--json", help="write the figures here")
    return p


def main() -> None:
    args = parser().parse_args()
    result = run(args)
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
