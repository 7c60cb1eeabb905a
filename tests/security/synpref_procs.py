"""Real `synpref` service processes for the security tests: start, wait for ready, kill, stop."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from testing.wait import wait_until


def write_config(path: Path, bootstrap: str, topics: Any, **sections: Any) -> Path:
    """A YAML config on the test broker and topics; `sections` add or override whole sections."""
    config: dict[str, Any] = {
        "kafka": {"bootstrap_servers": bootstrap, "consumer_poll_ms": 200, "partitions": 1},
        "topics": topics.model_dump(),
        "service": {"host": "127.0.0.1", "grpc_port": 0, "metrics_port": 0, "shutdown_grace_s": 1},
        "log_level": "INFO",
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path.write_text(yaml.safe_dump(config))
    return path


class Proc:
    """One `synpref <command>` process; its stdout and stderr go to <logdir>/<name>.log."""

    def __init__(self, name: str, args: list[str], config: Path, logdir: Path) -> None:
        self.name = name
        self.cmd = [sys.executable, "-m", "synpref.shared.cli", *args, "--config", str(config)]
        self.log = logdir / f"{name}.log"
        self.runs = 0
        self.p: subprocess.Popen | None = None

    def start(self) -> Proc:
        self.runs += 1
        with self.log.open("a") as fh:
            fh.write(f"--- start {self.runs}\n")
            fh.flush()
            self.p = subprocess.Popen(self.cmd, stdout=fh, stderr=subprocess.STDOUT)
        return self

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def alive(self) -> bool:
        return self.p is not None and self.p.poll() is None

    def wait_ready(self, timeout_s: float = 120) -> None:
        def ready() -> bool:
            if not self.alive():
                raise AssertionError(f"{self.name} exited {self.p and self.p.returncode}:\n{self.text()[-3000:]}")
            return self.text().count(" ready: ") >= self.runs

        wait_until(ready, timeout_s, f"{self.name} to be ready")

    def kill(self) -> None:
        assert self.p is not None
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(30)

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM and the exit code (-9 if it had to be killed)."""
        if self.p is None or self.p.poll() is not None:
            return self.p.returncode if self.p else 0
        self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(10)
            return -9


def watch_alive(proc: Proc, predicate: Any, timeout_s: float, what: str) -> None:
    """wait_until(predicate), failing at once (with the log) if the process exits meanwhile."""

    def check() -> bool:
        if not proc.alive():
            raise AssertionError(f"{proc.name} exited {proc.p and proc.p.returncode} before {what}:\n"
                                 f"{proc.text()[-4000:]}")  # fmt: skip
        return bool(predicate())

    wait_until(check, timeout_s, what)
