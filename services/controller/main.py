"""`synpref controller`: the curation loop in a cluster.

Same loop and state as `synpref run`, other executors: stages run in the Kafka services
(annotator, gold-scorer, consistency filter; controller.executor = kafka), humans label at
the desk service (human = desk: review topic out, verified/discarded back), RMs train as
Kubernetes Jobs (controller.training = k8s) on a volume shared with the controller
(controller.workdir must be on it), and each new gold/best RM is hot-swapped into the
scorer (controller.scorer_reload_url). Restarting the pod resumes from state.json.

    synpref controller --config /etc/synpref/config.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from synpref.shared.config import ConfigError, Settings, load_settings


def build(settings: Settings) -> Any:
    from synpref.services.controller.embedded import build_judges
    from synpref.services.controller.executors import KafkaExecutor
    from synpref.services.controller.loop import Controller
    from synpref.services.controller.models import make_models
    from synpref.services.controller.providers import KafkaDeskHumans, make_provider

    c = settings.controller
    models = make_models(c, Path(c.workdir), progress=False)
    if c.executor == "kafka":
        executor: Any = KafkaExecutor(settings, c.stage_timeout_s)
        judges, labeller = [], None  # the annotator service holds the judges
        humans: Any = KafkaDeskHumans(settings) if c.human == "desk" else make_provider(c.human, c.human_labels_file)
    else:
        judges, labeller = build_judges(settings, c.seed)
        humans = make_provider(c.human, c.human_labels_file, settings.desk, c.seed)
        executor = None
    # executor None: the Controller runs the stage functions in process
    return Controller(settings, models, humans, judges, executor, labeller=labeller)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="synpref controller", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--config", help="YAML settings file (default: $SYNPREF_CONFIG)")
    args = p.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"synpref controller: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    controller = build(settings)
    state = controller.run()
    logging.getLogger(__name__).info("curation finished: %s", state.results.get("registry", {}))
    return 0
