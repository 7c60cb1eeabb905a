"""`synpref annotator`: attributes and judge votes, from the scored to the annotated topics (each stage's own).

Stage-2 pairs the best RM already gets right are passed on without judges when
annotator.skip_confident is set (the chart sets it, as the in-process loop does).
"""

from __future__ import annotations

import argparse

from synpref.services.annotator.annotate import Annotator
from synpref.services.annotator.chat import OpenAIChat
from synpref.services.annotator.judges import AnswerCache, AttributeLabeller, Judge, LLMJudge
from synpref.services.annotator.prompts import PROMPT_VERSION
from synpref.shared.config import AnnotatorSettings, JudgeSettings, Settings
from synpref.shared.service import ServiceSpec, serve, service_parser
from synpref.v1 import pipeline_pb2_grpc

POLL_SHARE = 0.95
"""Most of kafka.max_poll_interval_ms a batch's judging may take (annotator.batch_deadline_s): 570 s by default."""


def prompt_version(settings: AnnotatorSettings) -> str:
    """The configured version and the code's prompt version: a change of either misses the cache."""
    return f"{settings.prompt_version}.{PROMPT_VERSION}"


def chat_backend(judge: JudgeSettings, settings: AnnotatorSettings) -> OpenAIChat:
    """An OpenAIChat for one configured judge, with the annotator's concurrency, timeout and retry settings."""
    return OpenAIChat(
        judge.name,
        judge.base_url,
        judge.api_key_env,
        max_concurrency=settings.max_concurrency,
        timeout_s=settings.timeout_s,
        retries=settings.retries,
        backoff_s=settings.backoff_s,
        max_tokens=settings.max_tokens,
    )


def build_annotator(settings: Settings, examples=None) -> Annotator:
    """The annotator the settings describe (OpenAI-compatible judges; examples from the index folder)."""
    cfg = settings.annotator
    cache = AnswerCache(cfg.cache_dir or None, cfg.cache_ttl_days)
    version = prompt_version(cfg)
    judges: list[Judge] = [
        LLMJudge(
            chat_backend(j, cfg), j.samples, j.temperature, cache, version, cfg.json_mode, cfg.seed, j.max_prompt_chars
        )
        for j in cfg.judges
    ]
    labeller = None
    if cfg.attribute_model is not None:
        labeller = AttributeLabeller(
            chat_backend(cfg.attribute_model, cfg),
            cache,
            version,
            cfg.json_mode,
            seed=cfg.seed,
            max_prompt_chars=cfg.attribute_model.max_prompt_chars,
        )
    if examples is None and cfg.examples_index:
        from synpref.shared.examples import ReloadingExamples
        from synpref.shared.retrieval import Embedder

        # Re-read on every call: the controller rewrites the index before it publishes the batches that need it.
        examples = ReloadingExamples(cfg.examples_index, Embedder(cfg.embedding_model))
    return Annotator(
        judges, labeller, examples, cfg.max_examples, cfg.skip_confident, settings.filter.band, cfg.batch_deadline_s
    )


def make_spec(settings: Settings, args: argparse.Namespace) -> ServiceSpec:
    """The annotator service: the annotator stage, reading `--input-route` and writing each record's stage's
    annotated topic."""
    interval_s = settings.kafka.max_poll_interval_ms / 1000
    if settings.annotator.batch_deadline_s > POLL_SHARE * interval_s:
        # A batch judged longer than the group waits is taken from this member, read again and judged again.
        raise SystemExit(
            f"annotator: annotator.batch_deadline_s ({settings.annotator.batch_deadline_s:g}) must be at most "
            f"{POLL_SHARE:.0%} of kafka.max_poll_interval_ms ({interval_s:g} s), which leaves time to send and commit"
        )
    annotator = build_annotator(settings)
    return ServiceSpec(
        name="annotator",
        stage=annotator.stage(),
        input_route=args.input_route,
        output_routes=["annotated"],
        grpc_service="synpref.v1.AnnotatorService",
        add_servicer=pipeline_pb2_grpc.add_AnnotatorServiceServicer_to_server,
        close=annotator.close,  # the judges' HTTP sessions: unclosed, aiohttp reports them at exit
    )


def main(argv: list[str]) -> int:
    """`synpref annotator`: run the annotator service until SIGTERM."""
    return serve(make_spec, service_parser("annotator", __doc__, input_route="scored").parse_args(argv))
