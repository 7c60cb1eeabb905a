"""Where the scorer's CPU goes under load: py-spy on the serving process while
benchmarks/scorer_load.py's 64 single-item gRPC clients run against (s) the scorer.

Same model, texts and settings as scorer_load.py (its options apply). py-spy samples every
thread of this process (the event loop, the encoding threads, the forward thread) while
the clients run in their own process; idle stacks (threads waiting) are left out, so
each sample is CPU the serving process spent. Prints the top functions by self time and
the split between the model forward, tokenizing and the rest (serving).
Needs py-spy (the dev extra). Run: .venv/bin/python benchmarks/scorer_profile.py
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scorer_load

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
PARTS = {"model forward": ("TorchBackend.forward (",), "tokenizing": ("encode_items (",)}


def short(frame: str) -> str:
    """`func (path:line)` as `func (last two path parts)`."""
    m = FRAME.match(frame)
    if not m:
        return frame
    path = "/".join(m["file"].split("/")[-2:])
    return f"{m['func']} ({path})"


def summarize(raw: Path, top: int = 10) -> dict[str, Any]:
    """Self time per function and the share of each part, from py-spy's collapsed stacks."""
    self_time: collections.Counter[str] = collections.Counter()
    parts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        self_time[short(frames[-1])] += n
        part = next((p for p, keys in PARTS.items() if any(k in stack for k in keys)), "serving (rest)")
        parts[part] += n
    return {"total": total, "top": self_time.most_common(top), "parts": parts}


def main() -> int:
    args = scorer_load.parser().parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out = Path(tempfile.mkdtemp(prefix="scorer-profile-")) / "stacks.txt"
    original = scorer_load.serve_and_drive
    threads: dict[str, float] = {}

    @contextlib.contextmanager
    def py_spy() -> Iterator[None]:
        cmd = [
            spy,
            "record",
            "--pid",
            str(os.getpid()),
            "--format",
            "raw",
            "--rate",
            "200",
            "--nonblocking",
            "-o",
            str(out),
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # py-spy attaches while the client process starts
        cpu0 = scorer_load.thread_cpu()
        try:
            yield
        finally:
            threads.update(scorer_load.cpu_by_thread(cpu0, scorer_load.thread_cpu()))
            proc.send_signal(signal.SIGINT)  # py-spy writes its file and exits
            proc.wait(60)

    def profiled(settings: Any, *a: Any, **kw: Any) -> dict[str, Any]:
        return original(settings, *a, **{**kw, "around": py_spy})

    scorer_load.serve_and_drive = profiled
    args.repeats, args.skip_naive = 1, True
    args.ceiling = "beside"  # py-spy samples the server in this process (--ceiling interleaved runs it in another)
    rows = scorer_load.run(args, lambda o, convs: scorer_load.build_model(o, convs, scorer_load.TINY_QWEN3), "profile")
    s = summarize(out)
    print("forwards: " + ", ".join(f"{r['name']} {r['forwards']} ({r['mean_batch']:.1f} items each)" for r in rows))
    print(f"\npy-spy, serving process, {s['total']} non-idle samples; top functions by self time:")
    for name, n in s["top"]:
        print(f"  {n / s['total'] * 100:5.1f}%  {name}")
    print("by part: " + ", ".join(f"{p} {n / s['total'] * 100:.1f}%" for p, n in s["parts"].most_common()))
    total = sum(threads.values())
    print(f"CPU seconds by thread while the clients ran ({total:.1f} s in all):")
    for name, sec in sorted(threads.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {sec:6.2f} s  {sec / total * 100:5.1f}%  {name}")
    print(f"stacks: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
