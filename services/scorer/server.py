"""One scorer process: the gRPC server (RewardService, health, reflection), the HTTP shims,
the metrics page and, when scorer.admin_enabled, the token-guarded admin port around one
ModelRegistry.

Health (grpc.health.v1) has three services. "liveness" is SERVING as soon as the listeners are
up: the process is alive and answers (the chart's startup and liveness probes; loading a model,
minutes at 8B, never fails them). The overall service "" is readiness (the readiness probe): SERVING
once the start-up load pass is over, i.e. every configured model whose checkpoint exists, and every
entry of scorer.models_file at start, was tried. So a pod added by the HPA, or a rolling update's
new pod, gets traffic only once the models it starts with are in; one whose configured checkpoints
do not exist yet is Ready at once (`helm install --wait` finishes before any model is trained).
`synpref.v1.RewardService` is SERVING only while at least one model is served: it follows every
load, reload and unload. A configured model whose checkpoint is not there yet is a warning, not an
exit: the server starts without it and loads it once the folder appears (checked every
`missing_poll_s`), unless a reload on the admin port served the name first. A checkpoint that is
there but does not load stays fatal: the process exits without ever turning "" SERVING.

An admin reload reaches one process (one pod behind a Service). With scorer.models_file, every
replica converges instead: each loads the models that file lists at start and re-reads it every
models_file_poll_s (ModelsFile), reloading a name whose entry changed through the same
ModelRegistry.reload an admin reload takes. The controller writes the file (controller.scorer_models_file).

Stop order (SIGTERM): "" and RewardService NOT_SERVING; if the server was ever ready, go on accepting and
serving for scorer.shutdown_delay_s (the pod leaves the endpoints meanwhile); then stop accepting, let
in-flight requests finish within the grace period (their batchers keep running), then drain and free the models.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from functools import partial
from pathlib import Path

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from synpref.services.scorer.admin import AdminApi, checkpoint_under, read_token
from synpref.services.scorer.backends import make_backend, resolve_device
from synpref.services.scorer.grpc_options import server_options
from synpref.services.scorer.http import HttpShims
from synpref.services.scorer.metrics import ScorerMetrics
from synpref.services.scorer.registry import NO_MODEL, BackendFactory, ModelRegistry, version_of
from synpref.services.scorer.servicer import RewardServicer, add_to_server
from synpref.shared import cpus
from synpref.shared.config import ModelRef, ScorerSettings
from synpref.v1 import reward_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
OVERALL = ""
"""The health service name of the server as a whole, which the chart's readinessProbe checks: SERVING once
the start-up load pass is over (ScorerServer.load), NOT_SERVING before it and from the start of `stop`."""
LIVENESS = "liveness"
"""The health service name the chart's startupProbe and livenessProbe name: SERVING once the listeners are
up, whatever is loading."""
MISSING_POLL_S = 10.0
MODELS_FILE_MAX_RETRY_S = 300.0
"""Longest wait before a models_file entry that failed to load is tried again (the wait doubles from the poll)."""


class ModelsFile:
    """scorer.models_file, {name: {path, version}}: what every replica should serve.

    Each `sync` reads the file; when its content changed, the entries that differ from what is
    served become wanted, and each wanted one is loaded through `registry.reload` (the old version
    serves until the new one is in). A load that fails (a folder not yet there or still being
    copied, a path outside model_root) is logged and tried again later; a file that is missing or
    does not parse is logged and changes nothing. A name the file no longer lists keeps serving.
    """

    def __init__(self, path: Path, settings: ScorerSettings, registry: ModelRegistry) -> None:
        self.path = path
        self.root = Path(settings.model_root).resolve() if settings.model_root else None
        self.poll_s = settings.models_file_poll_s
        self.registry = registry
        self.wanted: dict[str, ModelRef] = {}
        self._digest: bytes | None = None
        self._failures: dict[str, int] = {}
        self._retry_at: dict[str, float] = {}

    async def watch(self) -> None:
        """Sync every poll_s until cancelled."""
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.sync()
            except Exception:  # never let one bad poll end the watch
                log.exception("scorer.models_file %s: sync failed; trying again", self.path)

    async def sync(self) -> None:
        """Re-read the file and load what it wants that is not served yet (or is due for a retry)."""
        try:
            raw = await asyncio.to_thread(self.path.read_bytes)
        except OSError as exc:
            if self._digest != b"":  # once per disappearance, not every poll
                log.info("scorer.models_file %s cannot be read yet (%s): waiting for it", self.path, exc)
            self._digest = b""
        else:
            digest = hashlib.sha256(raw).digest()
            if digest != self._digest:
                self._digest = digest
                self._read(raw)
        await self._load_wanted()

    def _read(self, raw: bytes) -> None:
        import yaml  # YAML is a superset of JSON: both shapes parse

        try:
            data = yaml.safe_load(raw) or {}
            if not isinstance(data, dict):
                raise ValueError("not a mapping of model names")
            wanted = {str(name): ModelRef.model_validate(ref) for name, ref in data.items()}
            if empty := sorted(name for name, ref in wanted.items() if not ref.path):
                raise ValueError(f"no path for {empty}")
        except Exception as exc:
            log.error("scorer.models_file %s is not {name: {path, version}}: %s; ignored", self.path, exc)
            return
        self.wanted = wanted
        self._failures.clear()
        self._retry_at.clear()
        log.info("scorer.models_file %s lists %s", self.path, sorted(wanted))

    def overridden(self, name: str) -> None:
        """An admin reload or unload of `name` succeeded: the operator's choice stands until the file changes."""
        if self._failures.pop(name, None):  # its entry waits for a retry: dropped, so no retry loads over that choice
            self.wanted.pop(name, None)
            log.info("scorer.models_file: %r was set on the admin port; its failed entry waits for a new file", name)

    def _resolve(self, ref: ModelRef) -> ModelRef:
        """The entry with its checkpoint folder resolved as an admin reload resolves it (under model_root)."""
        if self.root is None:
            return ref
        return ModelRef(path=str(checkpoint_under(self.root, ref.path)), version=ref.version)

    async def _load_wanted(self) -> None:
        for name, entry in list(self.wanted.items()):
            if name in self.registry.loading or time.monotonic() < self._retry_at.get(name, 0.0):
                continue
            try:
                ref = self._resolve(entry)
                served = self.registry.models.get(name)
                if served is None or (served.model_id, served.version) != (ref.path, version_of(ref)):
                    await self.registry.reload(name, ref)
            except Exception as exc:
                if self.wanted.get(name) is not entry:  # a newer file names another checkpoint: try that one
                    continue
                failures = self._failures[name] = self._failures.get(name, 0) + 1
                delay = min(MODELS_FILE_MAX_RETRY_S, self.poll_s * 2**failures)
                self._retry_at[name] = time.monotonic() + delay
                log.warning(
                    "scorer.models_file: model %r from %s does not load (%s: %s); trying again in %g s",
                    name,
                    entry.path,
                    type(exc).__name__,
                    str(exc)[:300],
                    delay,
                    exc_info=failures == 1,
                )
                continue
            if self.wanted.get(name) is entry:  # not replaced by a newer file meanwhile
                del self.wanted[name]
                self._failures.pop(name, None)


class ScorerServer:
    """One scorer process around a ModelRegistry: gRPC, the HTTP shims, and optional admin and metrics ports.

    Args:
        settings: the scorer section; ports 0 pick free ones (read back from grpc_port, http_port, admin_port).
        backend_factory: builds a Backend per model (make_backend; tests pass a fake).
    """

    def __init__(self, settings: ScorerSettings, backend_factory: BackendFactory = make_backend) -> None:
        self.settings = settings
        self.metrics = ScorerMetrics()
        self.registry = ModelRegistry(settings, self.metrics, backend_factory, on_change=self._model_health)
        self.health = health.aio.HealthServicer()
        self.missing: dict[str, ModelRef] = {}
        """Configured models whose checkpoint was not there at load: loaded once it appears."""
        self.missing_poll_s = MISSING_POLL_S
        self._watcher: asyncio.Task[None] | None = None
        path = settings.models_file_path()
        self.models_file = ModelsFile(path, settings, self.registry) if path is not None else None
        self._file_watcher: asyncio.Task[None] | None = None
        self._startup_marks: set[str] = set()
        """Configured names counted as loading from `start` until `load` has tried each (registry.loading)."""
        self._shims: HttpShims | None = None
        self._ready = False
        """"" turned SERVING once: only then can the pod be in a Service's endpoints (see `stop`)."""
        self._stopping = False
        """`stop` began: no load or reload turns health SERVING again (the lame duck is not draining yet)."""
        self.grpc_port = 0
        self.http_port = 0
        self.admin_port = 0
        self._admin_http: web.AppRunner | None = None
        self._grpc: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self._metrics_http: web.AppRunner | None = None

    async def start(self, load: bool = True) -> None:
        """Open the listeners, turn "liveness" SERVING, then (if `load`) load the configured models, after
        which "" (readiness) turns SERVING. Without `load`, "" waits for a call of `load`.

        With admin_enabled, a missing or empty token file fails here before any port opens.
        """
        s = self.settings
        # Read before any listener opens: a missing or empty token file stops the process.
        admin_token = read_token(s.admin_token_file) if s.admin_enabled else ""
        # Until load() has tried them, the configured models count as loading: UNAVAILABLE, not "no model".
        for name in s.models:
            self.registry.begin_loading(name)
        self._startup_marks.update(s.models)
        if s.torch_threads:
            import torch

            torch.set_num_threads(s.torch_threads)
        self._bind_cpus()
        server = grpc.aio.server(options=server_options(s))
        add_to_server(RewardServicer(self.registry, self.metrics, s.max_request_items), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
        )
        self.grpc_port = server.add_insecure_port(f"{s.host}:{s.port}")
        for name in (OVERALL, LIVENESS, SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._grpc = server

        self._shims = shims = HttpShims(
            self.registry, self.metrics, s.max_request_items, s.http_timeout_s, s.max_body_bytes
        )
        self._http, self.http_port = await _serve_http(shims.app(), s.host, s.http_port, drain_s=s.drain_s)
        if s.admin_enabled:
            admin = AdminApi(self.registry, admin_token, s.model_root, self.models_file)
            # A reload goes on when its caller leaves (the controller gives up after 120 s; a large model loads
            # longer): cancelled, the loaded model was thrown away and the next try loaded it all again.
            self._admin_http, self.admin_port = await _serve_http(
                admin.app(), s.host, s.admin_port, cancel=False, drain_s=s.drain_s
            )
            log.info("scorer admin listening on %s:%d", s.host, self.admin_port)
        if s.metrics_port:
            metrics_app = web.Application()
            metrics_app.router.add_get("/metrics", shims.metrics_page)
            self._metrics_http, _ = await _serve_http(metrics_app, s.host, s.metrics_port, drain_s=s.drain_s)
        log.info("scorer listening: gRPC %s:%d, HTTP %s:%d", s.host, self.grpc_port, s.host, self.http_port)
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        if load:
            await self.load()

    def _bind_cpus(self) -> None:
        """Apply scorer.cpu_binding (shared/cpus.py): this thread (the event loop's) and the gRPC, HTTP and
        tokenizing threads it starts serve on the serving CPUs; each model's forward thread computes on
        the forward CPUs, with one torch thread per CPU unless torch_threads says otherwise."""
        s = self.settings
        if s.cpu_binding == "off":
            return
        device = resolve_device(s.device) if s.backend == "torch" else s.backend
        binding = cpus.plan(s.cpu_binding, device, cpus.allowed_cpus())
        if binding is None:
            return
        cpus.bind_this_thread(binding.serving)
        threads = binding.torch_threads(s.torch_threads)
        self.registry.forward_thread_init = partial(cpus.bind_compute_thread, binding.forward, threads)
        log.info(
            "CPU binding: forwards on CPUs %s (%d torch threads each), serving on CPUs %s",
            cpus.format_cpulist(binding.forward),
            threads,
            cpus.format_cpulist(binding.serving),
        )

    async def load(self) -> None:
        """The start-up load pass: load every configured model, one after another, then what
        scorer.models_file lists, then turn "" (readiness) SERVING. A checkpoint that is not there is
        logged and watched for (see `missing`) and does not hold readiness back; one that is there but
        fails to load raises, and "" stays NOT_SERVING (the process exits)."""
        for name, ref in self.settings.models.items():
            try:
                await self.registry.reload(name, ref)
            except Exception as exc:
                if Path(ref.path).exists():
                    raise
                self.missing[name] = ref
                log.warning(
                    "model %r: checkpoint %s does not exist (%s: %s); serving without it. It is loaded when "
                    "the folder appears (checked every %g s), or reload one on the admin port "
                    "(POST /admin/reload; the controller does after training)",
                    name,
                    ref.path,
                    type(exc).__name__,
                    str(exc)[:200],
                    self.missing_poll_s,
                )
            finally:
                self._end_startup_mark(name)
        if self.models_file is not None:
            await self.models_file.sync()  # never raises for the file's sake: its failures are retried
            if self._file_watcher is None:
                self._file_watcher = asyncio.ensure_future(self.models_file.watch())
        if not self._stopping:
            await self.health.set(OVERALL, health_pb2.HealthCheckResponse.SERVING)
            self._ready = True
        if self.registry.models:
            log.info("serving models %s", sorted(self.registry.models))
        else:
            log.warning("no model is served: %s", NO_MODEL)
        if self.missing and self._watcher is None:
            self._watcher = asyncio.ensure_future(self._watch_missing())

    def _end_startup_mark(self, name: str) -> None:
        """`load` has tried configured model `name`: it counts as loading no longer for start-up's sake."""
        if name in self._startup_marks:
            self._startup_marks.discard(name)
            self.registry.end_loading(name)

    async def _watch_missing(self) -> None:
        """Load each missing configured model once its folder appears; a name served meanwhile
        (an admin reload) is dropped. A folder still being copied fails to load: tried again."""
        failed: set[str] = set()
        while self.missing:
            await asyncio.sleep(self.missing_poll_s)
            for name, ref in list(self.missing.items()):
                if name in self.registry.models:
                    del self.missing[name]
                    continue
                if name in self.registry.loading or not Path(ref.path).exists():
                    continue
                try:
                    await self.registry.reload(name, ref)
                except Exception:
                    if name not in failed:  # once, not every poll, for a folder that never loads
                        log.exception("model %r: %s appeared but does not load yet; trying again", name, ref.path)
                    failed.add(name)
                    continue
                del self.missing[name]
                log.info("model %r loaded from %s, which appeared after start-up", name, ref.path)

    async def _model_health(self) -> None:
        """RewardService is SERVING while a model is served (and `stop` has not begun); "" and "liveness" are left as
        they are."""
        serving = bool(self.registry.models) and not self._stopping
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(SERVICE_NAME, status)

    async def stop(self, grace: float | None = None, delay: float | None = None) -> None:
        """Turn not ready, go on serving for `delay` seconds (scorer.shutdown_delay_s) if "" was ever SERVING,
        then drain: refuse new work, finish what is in flight within `grace` seconds (scorer.drain_s), stop."""
        grace = self.settings.drain_s if grace is None else grace
        delay = self.settings.shutdown_delay_s if delay is None else delay
        self._stopping = True
        if self._shims is not None:
            self._shims.stopping = True  # HTTP /health 503 too: a load balancer probing it stops routing here
        for watcher in (self._watcher, self._file_watcher):
            if watcher is not None:
                watcher.cancel()
        # "liveness" stays SERVING: the process is alive while it drains (the listener stops answering next).
        for name in (OVERALL, SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if delay > 0 and self._ready:
            # Kubernetes removes the pod from the endpoints while it sends SIGTERM, and kube-proxy, ingresses and
            # clients learn it seconds later: until then new connections still come here, and a closed listener
            # refuses them. Streams keep going too: ended now, a client would reopen its stream on this same pod.
            log.info("not ready; still serving for %g s while the pod leaves the endpoints, then draining", delay)
            await asyncio.sleep(delay)
        self.registry.start_draining()
        waits = []
        if self._grpc is not None:
            waits.append(self._grpc.stop(grace))
        for runner in (self._http, self._metrics_http, self._admin_http):
            if runner is not None:
                waits.append(runner.cleanup())
        await asyncio.gather(*waits)
        await self.registry.close(drain=True)
        log.info("scorer stopped")

    async def wait(self) -> None:
        """Block until the gRPC server terminates."""
        if self._grpc is not None:
            await self._grpc.wait_for_termination()


async def _serve_http(
    app: web.Application, host: str, port: int, cancel: bool = True, drain_s: float = 30.0
) -> tuple[web.AppRunner, int]:
    # handler_cancellation: a request whose client left is cancelled, so its items leave the queue (max_queue)
    # instead of being computed for nobody while the client (OpenRLHF after its timeout) posts the batch again.
    # shutdown_timeout: in-flight HTTP requests get scorer.drain_s, as gRPC's do (it was a fixed 30 s; aiohttp
    # reads 0 as no limit).
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=max(drain_s, 0.001), handler_cancellation=cancel)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, int(runner.addresses[0][1])


class BackgroundScorer:
    """A ScorerServer on its own event loop in a daemon thread: for tests, benchmarks and
    processes (like the embedded controller) that want a scorer beside blocking code."""

    def __init__(self, settings: ScorerSettings, backend_factory: BackendFactory = make_backend) -> None:
        import threading

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="scorer-loop", daemon=True)
        self._thread.start()
        self.server = ScorerServer(settings, backend_factory)

    def run(self, coro: object, timeout: float | None = 120.0) -> object:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def start(self, load: bool = True) -> BackgroundScorer:
        """Start the server on the background loop (and load its models if `load`); returns self."""
        self.run(self.server.start(load=load))
        return self

    @property
    def address(self) -> str:
        """`host:port` of the gRPC listener."""
        return f"{self.server.settings.host}:{self.server.grpc_port}"

    @property
    def http_url(self) -> str:
        """Base URL of the HTTP shims."""
        return f"http://{self.server.settings.host}:{self.server.http_port}"

    @property
    def admin_url(self) -> str:
        """Base URL of the admin API (meaningful only with admin_enabled)."""
        return f"http://{self.server.settings.host}:{self.server.admin_port}"

    def stop(self, grace: float = 5.0) -> None:
        """Stop the server with `grace` seconds to drain, then stop the loop and join its thread."""
        try:
            self.run(self.server.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    def __enter__(self) -> BackgroundScorer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
