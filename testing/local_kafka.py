"""A real single-node Apache Kafka broker (KRaft) on loopback, for tests and benchmarks.

The jars come from Maven Central via tools/kafka/fetch.sh (`make kafka`) into
.cache/kafka/libs; this module formats a fresh storage folder with
kafka.tools.StorageTool and runs kafka.Kafka with the machine's Java 17, as the
distribution's bin/kafka-storage.sh and bin/kafka-server-start.sh would. The
broker acts as its own controller (process.roles=broker,controller) with a
controller listener beside the client listener, both on free loopback ports.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]  # testing/ lives in the source checkout, never in the wheel
DEFAULT_HOME = REPO_ROOT / ".cache" / "kafka"


class BrokerError(RuntimeError):
    """The local broker could not be set up, started, or reached."""


def kafka_home() -> Path:
    """Folder holding libs/ (SYNPREF_KAFKA_HOME overrides .cache/kafka in the repo)."""
    return Path(os.environ.get("SYNPREF_KAFKA_HOME", DEFAULT_HOME))


def kafka_version(home: Path | None = None) -> str:
    """Version of the kafka_2.13 jar in home/libs, e.g. "4.4.0"."""
    libs = (home or kafka_home()) / "libs"
    jars = sorted(libs.glob("kafka_2.13-*.jar"))
    if not jars:
        raise BrokerError(f"no kafka_2.13 jar in {libs}: run `make kafka` (bash tools/kafka/fetch.sh)")
    return jars[-1].name.removeprefix("kafka_2.13-").removesuffix(".jar")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def new_cluster_id() -> str:
    """A Kafka cluster id: a UUID in unpadded URL-safe base64 (what `kafka-storage random-uuid` prints).

    Like Kafka's own Uuid.randomUuid, never one that starts with "-": StorageTool would read it
    as an option and the broker would not start (about 1 start in 64 failed that way).
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def server_properties(data_dir: Path, port: int, controller_port: int, host: str = "127.0.0.1") -> str:
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": f"{host}:{controller_port}",
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(data_dir),
        # One node: every internal topic has a single replica.
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "3",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # Tests join and leave groups constantly; don't wait 3 s for more members.
        "group.initial.rebalance.delay.ms": "0",
        "num.partitions": "1",
        "auto.create.topics.enable": "true",
        "num.network.threads": "2",
        "num.io.threads": "4",
    }
    return "".join(f"{key}={value}\n" for key, value in props.items())


def log4j2_properties(log_file: Path) -> str:
    return (
        "status = warn\n"
        "appender.file.type = File\n"
        "appender.file.name = file\n"
        f"appender.file.fileName = {log_file}\n"
        "appender.file.layout.type = PatternLayout\n"
        "appender.file.layout.pattern = [%d] %p %m (%c)%n\n"
        "rootLogger.level = INFO\n"
        "rootLogger.appenderRef.file.ref = file\n"
    )


class LocalKafka:
    """Context manager: a fresh single-node KRaft broker in a temp folder.

    >>> with LocalKafka() as kafka:
    ...     kafka.bootstrap_servers  # "127.0.0.1:40123"
    """

    def __init__(
        self,
        home: Path | None = None,
        java: str | None = None,
        heap: str = "512m",
        start_timeout_s: float = 60.0,
        keep_dir: bool = False,
    ) -> None:
        self.home = home or kafka_home()
        self.java = java or shutil.which("java") or "java"
        self.heap = heap
        self.start_timeout_s = start_timeout_s
        self.keep_dir = keep_dir
        self.version = kafka_version(self.home)
        self.host = "127.0.0.1"
        self.port = 0
        self.controller_port = 0
        self.dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_file(self) -> Path:
        if self.dir is None:
            raise BrokerError("broker not started")
        return self.dir / "server.log"

    def describe(self) -> str:
        return f"Apache Kafka {self.version} at {self.bootstrap_servers}"

    def _java(self, main_class: str, *args: str) -> list[str]:
        assert self.dir is not None
        classpath = os.pathsep.join(str(p) for p in sorted((self.home / "libs").glob("*.jar")))
        return [
            self.java,
            "-Xms128m",
            f"-Xmx{self.heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.dir}",
            "-cp",
            classpath,
            main_class,
            *args,
        ]

    def start(self) -> LocalKafka:
        if shutil.which(self.java) is None and not Path(self.java).exists():
            raise BrokerError(f"java not found ({self.java}); Kafka needs a Java 17 runtime")
        self.dir = Path(tempfile.mkdtemp(prefix="synpref-kafka-"))
        self.port, self.controller_port = free_port(), free_port()
        while self.controller_port == self.port:
            self.controller_port = free_port()
        config = self.dir / "server.properties"
        config.write_text(server_properties(self.dir / "data", self.port, self.controller_port, self.host))
        (self.dir / "log4j2.properties").write_text(log4j2_properties(self.dir / "server.log"))

        fmt = subprocess.run(
            self._java("kafka.tools.StorageTool", "format", "-t", new_cluster_id(), "-c", str(config), "--standalone"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if fmt.returncode != 0:
            raise BrokerError(f"kafka-storage format failed ({fmt.returncode}):\n{fmt.stdout}\n{fmt.stderr}")

        stdout = (self.dir / "stdout.log").open("wb")
        # Own process group, so a Ctrl-C meant for pytest doesn't kill the broker mid-test.
        self.process = subprocess.Popen(
            self._java("kafka.Kafka", str(config)),
            stdout=stdout,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        stdout.close()
        # A broker in its own session outlives an interpreter that dies without running __exit__.
        atexit.register(self.stop)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("started %s (logs in %s)", self.describe(), self.dir)
        return self

    def _wait_ready(self) -> None:
        # Imported here so that the module loads (e.g. for kafka_version) without kafka-python.
        from kafka import KafkaAdminClient

        deadline = time.monotonic() + self.start_timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise BrokerError(f"broker exited with {self.process.returncode}; see {self.dir}:\n{self._tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    pass
                admin = KafkaAdminClient(
                    bootstrap_servers=self.bootstrap_servers, request_timeout_ms=5000, client_id="local-kafka-probe"
                )
                try:
                    cluster = admin.describe_cluster()
                    if cluster.get("brokers"):
                        return
                finally:
                    admin.close()
            except Exception as exc:  # not up yet: connection refused, no controller, ...
                last_error = exc
            time.sleep(0.25)
        raise BrokerError(
            f"broker did not answer within {self.start_timeout_s:.0f}s ({last_error!r}); "
            f"see {self.dir}:\n{self._tail()}"
        )

    def _tail(self, lines: int = 30) -> str:
        if self.dir is None:
            return ""
        out = []
        for name in ("stdout.log", "server.log"):
            path = self.dir / name
            if path.exists():
                out += [f"--- {name}", *path.read_text(errors="replace").splitlines()[-lines:]]
        return "\n".join(out)

    def stop(self, timeout_s: float = 20.0) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("broker did not stop within %.0fs of SIGTERM; killing it", timeout_s)
                process.kill()
                process.wait(timeout=10)
        if self.dir is not None and not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        atexit.unregister(self.stop)

    def __enter__(self) -> LocalKafka:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main() -> None:
    """`python -m testing.local_kafka` (from the repo root): a broker for manual runs, until Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    with LocalKafka() as kafka:
        print(f"{kafka.describe()}; logs in {kafka.dir}. Ctrl-C stops it.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
