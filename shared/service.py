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
A stage that raises StageBroken (its device broke: only a new process can do the stage) stops the service the
same way, but at once and without committing its batch, and the process exits 1 so that Kubernetes restarts it.
Port 0 picks a free port; the line "<name> ready: grpc=... metrics=..." names the real ones.

Who may call (GrpcGuard): with service.grpc_token_file every RPC but grpc.health.v1 must carry
`authorization: Bearer <token>` (UNAUTHENTICATED otherwise). Health stays open because the
kubelet's gRPC probe sends no metadata; it tells only SERVING or not. While the service consumes
Kafka, ProcessBatch answers UNIMPLEMENTED unless service.grpc_process_batch: records enter through
the topics, not past them. Both ports bind service.host, loopback unless configured.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from kafka.errors import KafkaError
from prometheus_client import start_http_server

from synpref.shared.config import ConfigError, ServiceSettings, Settings, load_settings
from synpref.shared.kafka.runner import ROUTES, RunnerStats, Sink, StageRunner
from synpref.shared.stage import Stage, StageBroken
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
    group_id: str | None = None
    """Consumer group when service.group_id is not set; default synpref-<name>."""
    close: Callable[[], None] | None = None
    """Releases what the stage holds (the annotator's HTTP sessions and event loop) once nothing calls it."""

    def __post_init__(self) -> None:
        unknown = [r for r in (self.input_route, *self.output_routes) if r not in ROUTES]
        if unknown:
            raise ValueError(f"{self.name}: unknown routes {unknown}; routes are {sorted(ROUTES)}")


HEALTH_METHODS = f"/{health.SERVICE_NAME}/"
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def read_grpc_token(path: str) -> str:
    """The bearer token in `path` (surrounding whitespace dropped: Secrets made from files keep the newline)."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"service.grpc_token_file {path}: {exc.strerror or exc}") from exc
    if len(token) < 16:
        raise ConfigError(f"service.grpc_token_file {path}: the token must be at least 16 characters")
    return token


def grpc_auth_metadata(cfg: ServiceSettings) -> list[tuple[str, str]]:
    """Metadata a caller of a pipeline service sends (metadata=... on each call); none without a token file."""
    return [("authorization", f"Bearer {read_grpc_token(cfg.grpc_token_file)}")] if cfg.grpc_token_file else []


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts with `code`."""

    def abort(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, details)

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(
        abort, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


class GrpcGuard(grpc.ServerInterceptor):
    """The bearer-token check (all but health) and the ProcessBatch switch, in front of every servicer."""

    def __init__(self, token: str | None, process_batch: bool) -> None:
        self._expected = f"Bearer {token}".encode() if token else None
        self._process_batch = process_batch

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        """The call's handler, or one that only aborts: UNAUTHENTICATED when a token is set and the
        call does not carry exactly one matching authorization header (health calls are exempt), and
        UNIMPLEMENTED for ProcessBatch while it is switched off.
        """
        handler = continuation(details)
        if handler is None or details.method.startswith(HEALTH_METHODS):
            return handler
        if self._expected is not None:
            given = [v for k, v in details.invocation_metadata or () if k == "authorization"]
            # One header, compared in constant time: the reply's timing says nothing about a guess.
            presented = given[0].encode() if len(given) == 1 and isinstance(given[0], str) else b""
            if not hmac.compare_digest(presented, self._expected):
                return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        if not self._process_batch and details.method.endswith("/ProcessBatch"):
            return _refusal(
                handler,
                grpc.StatusCode.UNIMPLEMENTED,
                "ProcessBatch is off while the service consumes Kafka (service.grpc_process_batch)",
            )
        return handler


class StageServicer:
    """ProcessBatch and Status for any service whose ProcessBatch returns ProcessBatchResponse."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.spec = service.spec

    def ProcessBatch(self, request: ProcessBatchRequest, context: grpc.ServicerContext) -> ProcessBatchResponse:
        """Run the stage on the request's records; answers the routed records and the ids that failed.

        A stage that raises aborts the call with INTERNAL; StageBroken with UNAVAILABLE, and stops the service.
        """
        try:
            result = self.spec.stage(list(request.records))
        except StageBroken as exc:
            self.service.broke(exc)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.spec.name} is restarting: {exc}")
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
        self.broken: StageBroken | None = None
        """Set when a ProcessBatch call found the stage broken: run() stops and raises it."""

    def broke(self, exc: StageBroken) -> None:
        """The stage cannot run in this process any more (a ProcessBatch call found it): stop, and exit non-zero."""
        log.error("%s: %s; stopping, so that the service is restarted", self.spec.name, exc)
        self.broken = exc
        self.stop.set()  # not on a signal handler's thread: set() cannot deadlock here

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
            input_topic=",".join(topics.topics_of(self.spec.input_route)),
            output_topics=[t for r in self.spec.output_routes for t in topics.topics_of(r)],
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
        token = read_grpc_token(cfg.grpc_token_file) if cfg.grpc_token_file else None
        if token is None and cfg.host not in LOOPBACK_HOSTS:
            log.warning("%s: gRPC on %s without service.grpc_token_file: anyone who reaches it may call it",
                        self.spec.name, cfg.host)  # fmt: skip
        guard = GrpcGuard(token, process_batch=cfg.grpc_process_batch or not self.kafka)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"{self.spec.name}-grpc"),
            interceptors=[guard],
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
        """Serve until stop is set (SIGTERM in serve()); returns the process exit code. StageBroken (the stage
        cannot run in this process any more) is raised once the service has stopped: serve() exits 1 on it."""
        runner: StageRunner | None = None
        try:
            self.start()
            if self.kafka:
                runner = StageRunner(
                    self.settings, self.spec.stage, service=self.spec.name,
                    input_route=self.spec.input_route, stop=self.stop, stats=self.stats,
                    sink=self.spec.sink, instance_id=self.spec.instance_id,
                    group_id=self.settings.service.group_id or self.spec.group_id,
                )  # fmt: skip
                runner.open()
            self._set_serving(True)
            where = f"input={','.join(runner.input_topics)} group={runner.group_id}" if runner else "gRPC only"
            host = self.settings.service.host
            print(
                f"{self.spec.name} ready: grpc={host}:{self.grpc_port} metrics={host}:{self.metrics_port} {where}",
                flush=True,
            )
            if runner:
                runner.run()  # raises the stage's StageBroken of a batch it read
            else:
                wait_for_stop(self.stop)
            if self.broken is not None:
                raise self.broken
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
        if self.spec.close is not None:
            try:
                self.spec.close()
            except Exception:  # the process is exiting anyway: say so, and let the exit code stand
                log.exception("%s: closing the stage failed", self.spec.name)
        log.info("%s: stopped", self.spec.name)


def wait_for_stop(stop: threading.Event) -> None:
    """Block until `stop` is set, waking twice a second: a SIGTERM that the kernel hands to another
    thread only runs its Python handler when the main thread runs bytecode, and an untimed wait
    never does (a service then ignored SIGTERM until killed, 1 run in 10 here)."""
    while not stop.wait(0.5):
        pass


def install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM and SIGINT ask for a graceful stop; a second one is not needed (and not special)."""

    def handler(signum: int, _frame: object) -> None:
        log.info("received %s: finishing the current batch, then stopping", signal.Signals(signum).name)
        # Not stop.set() here: the handler runs on the main thread, which may be inside
        # stop.wait() holding the Event's (non-reentrant) lock, and set() would deadlock on it.
        threading.Thread(target=stop.set, name="stop-signal", daemon=True).start()

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
    except ConfigError as exc:  # an unreadable or too short service.grpc_token_file
        print(f"synpref {spec.name}: {exc}", file=sys.stderr)
        return 2
    except StageBroken as exc:
        # A restart is what mends it (a fresh CUDA context): exit non-zero, and Kubernetes restarts the container;
        # the batch it failed on was not committed, so the next consumer of its partitions reads it again.
        print(f"synpref {spec.name}: exiting to be restarted: {exc}", file=sys.stderr)
        return 1
    except KafkaError as exc:
        # Unreachable cluster, bad credentials, unacknowledged outputs: say so in one line and exit non-zero,
        # so the orchestrator restarts the service and the uncommitted batch is read again.
        print(
            f"synpref {spec.name}: Kafka at {settings.kafka.bootstrap_servers}: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return 1
