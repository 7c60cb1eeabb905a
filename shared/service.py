"""The thin shell every pipeline service runs in.

A service is a pure stage plus a ServiceSpec naming its topics and its gRPC service.
`serve(spec, argv)` then does the rest, the same way for every service:
  - a gRPC server with the service's servicer (ProcessBatch runs the stage
    synchronously, Status reports the counters), grpc.health.v1 health that stays
    NOT_SERVING until the Kafka clients are up, and server reflection;
  - the Prometheus metrics endpoint (service.metrics_port);
  - the Kafka StageRunner loop on the input topic, until SIGTERM or SIGINT;
  - then: health NOT_SERVING, the runner finishes its batch and commits, gRPC drains
    for service.shutdown_grace_s, the process exits 0.
Port 0 picks a free port; the line "<name> ready: grpc=... metrics=..." names the real ones.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from kafka.errors import KafkaError
from prometheus_client import start_http_server

from synpref.shared.config import ConfigError, Settings, load_settings
from synpref.shared.kafka.runner import ROUTES, RunnerStats, Sink, StageRunner
from synpref.shared.stage import Stage
from synpref.v1.pipeline_pb2 import ProcessBatchRequest, ProcessBatchResponse, StatusRequest, StatusResponse

log = logging.getLogger(__name__)


def package_version() -> str:
    """The installed synpref version, or "0+unknown" when the package is not installed."""
    try:
        return version("synpref")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass
class ServiceSpec:
    """What makes one service different from another."""

    name: str
    """Short name: log prefix, metrics label, and default consumer group synpref-<name>."""
    stage: Stage
    input_route: str
    """TopicSettings field of the topic the service consumes."""
    output_routes: Sequence[str]
    """TopicSettings fields the stage may emit to (reported by Status)."""
    grpc_service: str
    """Full name of the gRPC service, e.g. "synpref.v1.AnnotatorService" (health and reflection)."""
    add_servicer: Callable[[Any, grpc.Server], None]
    """The generated add_<X>Servicer_to_server function."""
    make_servicer: Callable[[Service], Any] | None = None
    """Builds a custom servicer; default StageServicer (fits every ProcessBatch -> ProcessBatchResponse service)."""
    counters: Callable[[], dict[str, int]] = field(default=dict)
    """Stage-specific counters for Status, e.g. decisions per kind."""
    sink: Sink | None = None
    """Where the runner hands routed records instead of producing them (the dataset writer's dataset)."""
    instance_id: str | None = None
    """Static group membership (group.instance.id) for a service that runs as one process per id."""

    def __post_init__(self) -> None:
        unknown = [r for r in (self.input_route, *self.output_routes) if r not in ROUTES]
        if unknown:
            raise ValueError(f"{self.name}: unknown routes {unknown}; routes are {sorted(ROUTES)}")


class StageServicer:
    """ProcessBatch and Status for any service whose ProcessBatch returns ProcessBatchResponse."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.spec = service.spec

    def ProcessBatch(self, request: ProcessBatchRequest, context: grpc.ServicerContext) -> ProcessBatchResponse:
        """Run the stage on the request's records; answers the routed records and the ids that failed.

        A stage that raises aborts the call with INTERNAL.
        """
        try:
            result = self.spec.stage(list(request.records))
        except Exception as exc:
            log.exception("%s: ProcessBatch failed", self.spec.name)
            context.abort(grpc.StatusCode.INTERNAL, f"stage raised {type(exc).__name__}: {exc}")
        self.service.count_grpc(len(request.records), len(result.failed))
        return ProcessBatchResponse(
            records=[record for _, record in result.routed],
            failed_ids=[record.pair.id for record, _ in result.failed],
        )

    def Status(self, request: StatusRequest, context: grpc.ServicerContext) -> StatusResponse:
        """The service's status and counters (see Service.status)."""
        return self.service.status()


class Service:
    """One running service: gRPC server, metrics endpoint and (unless kafka=False) the Kafka runner."""

    def __init__(
        self, spec: ServiceSpec, settings: Settings, *, kafka: bool = True, stop: threading.Event | None = None
    ) -> None:
        self.spec = spec
        self.settings = settings
        self.kafka = kafka
        self.stop = stop or threading.Event()
        self.stats = RunnerStats()
        self.health = health.HealthServicer()
        self.server: grpc.Server | None = None
        self.metrics_server: Any = None
        self.grpc_port = 0
        self.metrics_port = 0
        self.serving = False
        self._grpc_lock = threading.Lock()
        self._grpc_counts = {"grpc.processed": 0, "grpc.failed": 0}

    def count_grpc(self, processed: int, failed: int) -> None:
        """Add `processed` and `failed` to the gRPC counters (thread-safe)."""
        with self._grpc_lock:
            self._grpc_counts["grpc.processed"] += processed
            self._grpc_counts["grpc.failed"] += failed

    def status(self) -> StatusResponse:
        """A StatusResponse snapshot: serving flag, stage counters, gRPC counters and the topics it reads and writes."""
        snap = self.stats.snapshot()
        with self._grpc_lock:
            counters = {**snap["counters"], **self._grpc_counts, **self.spec.counters()}
        topics = self.settings.topics
        return StatusResponse(
            service=self.spec.name,
            version=package_version(),
            serving=self.serving,
            processed=snap["processed"],
            failed=snap["failed"],
            dead_lettered=snap["dead_lettered"],
            input_topic=getattr(topics, self.spec.input_route),
            output_topics=[getattr(topics, r) for r in self.spec.output_routes],
            counters=counters,
        )

    def _set_serving(self, serving: bool) -> None:
        self.serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", self.spec.grpc_service):
            self.health.set(name, status)

    def start(self) -> None:
        """Open the gRPC server and the metrics endpoint, both reporting not ready yet."""
        cfg = self.settings.service
        self._set_serving(False)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"{self.spec.name}-grpc")
        )
        servicer = self.spec.make_servicer(self) if self.spec.make_servicer else StageServicer(self)
        self.spec.add_servicer(servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (self.spec.grpc_service, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.grpc_port = self.server.add_insecure_port(f"{cfg.host}:{cfg.grpc_port}")
        if self.grpc_port == 0:
            raise OSError(f"cannot bind gRPC to {cfg.host}:{cfg.grpc_port}")
        self.server.start()
        self.metrics_server, _ = start_http_server(cfg.metrics_port, addr=cfg.host)
        self.metrics_port = self.metrics_server.server_port

    def run(self) -> int:
        """Serve until stop is set (SIGTERM in serve()); returns the process exit code."""
        runner: StageRunner | None = None
        try:
            self.start()
            if self.kafka:
                runner = StageRunner(
                    self.settings, self.spec.stage, service=self.spec.name,
                    input_route=self.spec.input_route, stop=self.stop, stats=self.stats,
                    sink=self.spec.sink, instance_id=self.spec.instance_id,
                )  # fmt: skip
                runner.open()
            self._set_serving(True)
            where = f"input={runner.input_topic} group={runner.group_id}" if runner else "gRPC only"
            host = self.settings.service.host
            print(
                f"{self.spec.name} ready: grpc={host}:{self.grpc_port} metrics={host}:{self.metrics_port} {where}",
                flush=True,
            )
            if runner:
                runner.run()
            else:
                self.stop.wait()
            return 0
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Stop serving: mark health as shutting down, stop gRPC within the grace period, close the metrics server."""
        self.serving = False
        self.health.enter_graceful_shutdown()
        if self.server is not None:
            self.server.stop(self.settings.service.shutdown_grace_s).wait()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        log.info("%s: stopped", self.spec.name)


def install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM and SIGINT ask for a graceful stop; a second one is not needed (and not special)."""

    def handler(signum: int, _frame: object) -> None:
        log.info("received %s: finishing the current batch, then stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def configure_logging(level: str) -> None:
    """Log to stderr at `level`; below DEBUG, kafka-python's own logging is quieted to WARNING."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if level != "DEBUG":
        # kafka-python logs every connection at INFO.
        logging.getLogger("kafka").setLevel(logging.WARNING)


def service_parser(
    spec_name: str, description: str | None = None, *, input_route: str | None = None
) -> argparse.ArgumentParser:
    """The options every service takes; add your own before calling serve().

    `input_route`: the default of --input-route, for a service whose input topic is chosen at start.
    """
    parser = argparse.ArgumentParser(prog=f"synpref {spec_name}", description=description)
    parser.add_argument("--config", help="YAML config file (default: $SYNPREF_CONFIG)")
    parser.add_argument("--grpc-only", action="store_true", help="serve ProcessBatch over gRPC without Kafka")
    if input_route is not None:
        parser.add_argument(
            "--input-route", default=input_route, help=f"topics field to consume (default {input_route})"
        )
    return parser


def serve(make_spec: Callable[[Settings, argparse.Namespace], ServiceSpec], args: argparse.Namespace) -> int:
    """Load settings, build the spec, and run the service until SIGTERM; the body of each service's main()."""
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    spec = make_spec(settings, args)
    stop = threading.Event()
    install_signal_handlers(stop)
    try:
        return Service(spec, settings, kafka=not args.grpc_only, stop=stop).run()
    except KafkaError as exc:
        # Unreachable cluster, bad credentials, unacknowledged outputs: say so in one line and exit non-zero,
        # so the orchestrator restarts the service and the uncommitted batch is read again.
        print(
            f"synpref {spec.name}: Kafka at {settings.kafka.bootstrap_servers}: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return 1
