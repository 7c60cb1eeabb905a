"""`synpref scorer`: serve reward models over gRPC and HTTP from Settings.

    synpref scorer --config scorer.yaml
    synpref scorer --model best=artifacts/rm/v3 --model gold=artifacts/gold/v1 --port 50060
    synpref scorer reload best v4 --url http://synpref-scorer:8081 --token-file F   (admin_cli.py)

Configuration is the `scorer` section (YAML and SYNPREF_SCORER__* variables); flags
override it. SIGTERM or SIGINT drains in-flight work (scorer.drain_s) before exiting.
No models, or configured checkpoints that do not exist yet, are not an error: the process
serves (health "" SERVING once the others are loaded) and waits for them (see server.py); a
checkpoint that exists but does not load exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from synpref.shared.config import ConfigError, ModelRef, Settings, load_settings

log = logging.getLogger("synpref.scorer")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse `synpref scorer` options."""
    p = argparse.ArgumentParser(prog="synpref scorer", description="Serve reward models over gRPC and HTTP.")
    p.add_argument("--config", help="YAML settings file (default: $SYNPREF_CONFIG)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH", help="serve a checkpoint as NAME")
    p.add_argument("--default-model", help="model used when a request names none")
    p.add_argument("--host")
    p.add_argument("--port", type=int, help="gRPC port")
    p.add_argument("--http-port", type=int)
    p.add_argument("--metrics-port", type=int, help="separate Prometheus port; 0 = only HTTP /metrics")
    p.add_argument("--backend", choices=["torch", "vllm"])
    p.add_argument("--device")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    """The config file's settings with the command-line overrides applied to the scorer section.

    Raises ConfigError for a `--model` that is not NAME=PATH.
    """
    settings = load_settings(args.config)
    overrides: dict = {}
    for flag, key in (
        ("host", "host"),
        ("port", "port"),
        ("http_port", "http_port"),
        ("metrics_port", "metrics_port"),
        ("backend", "backend"),
        ("device", "device"),
        ("default_model", "default_model"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
    if args.model:
        models = dict(settings.scorer.models)
        for spec in args.model:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"--model wants NAME=PATH, got {spec!r}")
            models[name] = ModelRef(path=path)
        overrides["models"] = models
    if not overrides:
        return settings
    scorer = settings.scorer.model_validate({**settings.scorer.model_dump(), **overrides})
    return settings.model_copy(update={"scorer": scorer})


async def serve(settings: Settings) -> int:
    """Run a scorer until SIGTERM/SIGINT, then drain; returns 1 when a checkpoint that exists fails to load, else 0."""
    from synpref.services.scorer.server import ScorerServer

    server = ScorerServer(settings.scorer)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Listeners up, "liveness" SERVING; "" (readiness) once the load pass below is over; RewardService once a
    # model is served.
    await server.start(load=False)
    loader = asyncio.ensure_future(server.load())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({loader, stopper}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if loader.done() and loader.exception() is not None:
        # A checkpoint that is there but does not load is fatal: exit so the orchestrator restarts or alerts.
        log.error("loading models failed: %s", loader.exception())
        code = 1
    else:
        await stopper
        log.info("signal received: draining for up to %.0fs", settings.scorer.drain_s)
    loader.cancel()
    stopper.cancel()
    await server.stop(0 if code else None)
    return code


def log_allocator(device: str) -> None:
    """Say which malloc serves this process, with how to get tcmalloc where a CPU model would run on glibc's."""
    from synpref.shared.malloc import HINT, current_allocator

    allocator = current_allocator()
    if allocator == "glibc" and not device.startswith("cuda"):
        log.info("memory allocator: glibc malloc; %s", HINT)
    else:
        log.info("memory allocator: %s", allocator)


def main(argv: list[str]) -> int:
    """`synpref scorer`: serve the configured models; 2 for a bad config. `reload` and `unload` call a
    running scorer's admin port instead (admin_cli.py)."""
    if argv and argv[0] in ("reload", "unload"):
        from synpref.services.scorer.admin_cli import main as admin_main

        return admin_main(argv)
    args = parse_args(argv)
    try:
        settings = settings_from(args)
    except (ConfigError, ValueError) as exc:
        print(f"synpref scorer: {exc}")
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log_allocator(settings.scorer.device)
    if not settings.scorer.models and not settings.scorer.models_file:
        from synpref.services.scorer.server import SERVICE_NAME

        log.warning(
            "no models configured (scorer.models, scorer.models_file or --model): serving without one; %s is "
            "NOT_SERVING and scoring calls fail until a model is reloaded on the admin port",
            SERVICE_NAME,
        )
    return asyncio.run(serve(settings))
