"""`synpref controller`: the curation loop in a cluster.

Same loop and state as `synpref run`, other executors: stages run in the Kafka services
(annotator, gold-scorer, consistency filter; controller.executor = kafka), humans label at
the desk service (human = desk: review topic out, verified/discarded back), RMs train as
Kubernetes Jobs (controller.training = k8s) on a volume shared with the controller
(controller.workdir must be on it), and each new gold/best RM is hot-swapped into the
scorer (controller.scorer_reload_url). Restarting the pod resumes from the PairStore on its
volume, after the last committed step or batch.

    synpref controller --config /etc/synpref/config.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Gauge, start_http_server

from synpref.services.controller.providers import HumanInputEnded
from synpref.shared.config import ConfigError, Settings, load_settings
from synpref.shared.service import install_signal_handlers, wait_for_stop
from synpref.shared.sources import SourceError

CONTROLLER_HEALTH_NAME = "synpref.controller"


def build(settings: Settings) -> Any:
    """The cluster's Controller: with controller.executor = kafka the stages run in the Kafka
    services and human = desk goes to the desk service; otherwise stages and judges run in process.
    """
    from synpref.services.controller.embedded import build_judges, labels_file
    from synpref.services.controller.executors import KafkaExecutor
    from synpref.services.controller.loop import Controller
    from synpref.services.controller.models import make_models
    from synpref.services.controller.providers import KafkaDeskHumans, make_provider

    c = settings.controller
    models = make_models(c, Path(c.workdir), progress=False)
    if c.executor == "kafka":
        executor: Any = KafkaExecutor(settings, c.stage_timeout_s)
        judges: list[Any] = []  # the annotator service holds the judges
        # The attribute labeller runs here, as embedded: it labels D_un before retrieval embeds it.
        labeller: Any = None
        if settings.annotator.attribute_model is not None and not (c.study is not None and c.study.judges):
            from synpref.services.annotator.main import build_annotator

            labeller = build_annotator(settings).labeller
        human = c.human_provider
        humans: Any = KafkaDeskHumans(settings) if human == "desk" else make_provider(human, labels_file(c))
    else:
        judges, labeller = build_judges(settings, c.seed)
        humans = make_provider(c.human_provider, labels_file(c), settings.desk, c.seed)
        executor = None
    # executor None: the Controller runs the stage functions in process
    return Controller(settings, models, humans, judges, executor, labeller=labeller)


def check_kafka_models(settings: Settings) -> None:
    """ConfigError when stages run in the Kafka services but the controller has no way to give the scorers the
    RMs it trains: the gold scorer would then score every stage with whatever the scorers were started with
    (or wait for a model forever), and the loop's decisions would not come from its own gold and best RMs."""
    c = settings.controller
    if c.executor == "kafka" and not (c.scorer_reload_url or c.scorer_models_file):
        raise ConfigError(
            "controller.executor is kafka, but neither controller.scorer_models_file nor controller.scorer_reload_url "
            "is set: the stages' scores would not come from the RMs this loop trains (the chart sets both)"
        )


def main(argv: list[str]) -> int:
    """`synpref controller`: serve health and metrics, run (or resume) the curation loop, then stay up
    until SIGTERM (or exit with --exit-when-done); 0 when done, 2 for a bad config.
    """
    p = argparse.ArgumentParser(
        prog="synpref controller", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--config", help="YAML settings file (default: $SYNPREF_CONFIG)")
    p.add_argument(
        "--exit-when-done", action="store_true", help="exit once the loop finishes (default: stay up until SIGTERM)"
    )
    args = p.parse_args(argv)
    try:
        settings = load_settings(args.config)
        from synpref.services.controller.embedded import check_runnable

        check_kafka_models(settings)
        check_runnable(settings)
    except ConfigError as exc:
        print(f"synpref controller: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger(__name__)
    stop = threading.Event()
    server, metrics_server = serve_health(settings)
    try:
        controller = build(settings)
        # A SIGTERM during the loop ends the process at once: every step's state is written
        # atomically, so the next pod resumes where this one stopped.
        state = controller.run()
        FINISHED.set(1)
        log.info("curation finished: %s", state.results.get("registry", {}))
        controller.close()  # a finished loop stays up: its stores' WAL files are checkpointed and closed now
        if args.exit_when_done:
            return 0
        # Stay up, healthy, so a Deployment does not restart a finished loop over and over.
        install_signal_handlers(stop)
        wait_for_stop(stop)
        return 0
    except SourceError as exc:
        # Unreadable, empty, or still being copied onto the volume: one line, and the pod's restart tries again
        # (the failed step recorded nothing).
        print(f"synpref controller: cannot read the sources: {exc}", file=sys.stderr)
        return 1
    except HumanInputEnded as exc:  # controller.human: terminal whose input closed; the answers given are kept
        print(f"synpref controller: stopped, {exc}", file=sys.stderr)
        return 1
    finally:
        server.stop(settings.service.shutdown_grace_s).wait()
        metrics_server.shutdown()


FINISHED = Gauge("synpref_controller_finished", "1 once the curation loop has finished")


def serve_health(settings: Settings) -> tuple[grpc.Server, Any]:
    """grpc.health.v1 (SERVING while the process is up) and Prometheus metrics, for probes."""
    health_servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="controller-grpc"))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    cfg = settings.service
    port = server.add_insecure_port(f"{cfg.host}:{cfg.grpc_port}")
    server.start()
    for name in ("", CONTROLLER_HEALTH_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    metrics_server, _ = start_http_server(cfg.metrics_port, addr=cfg.host)
    print(f"controller ready: grpc={cfg.host}:{port} metrics={cfg.host}:{metrics_server.server_port}", flush=True)
    return server, metrics_server
