"""Settings sections of the serving processes: the reward scorer and the human desk."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, IPvAnyNetwork, SecretStr, field_validator

from synpref.shared.config_base import ModelRef, Section
from synpref.shared.cpus import validate_mode
from synpref.shared.roles import BEST


class ScorerSettings(Section):
    """The reward scorer service (`synpref scorer`, services/scorer, docs/scorer.md)."""

    host: str = "127.0.0.1"
    """Interface the gRPC and HTTP servers bind; 0.0.0.0 in a container."""
    port: int = Field(default=50060, ge=0, le=65535)
    """gRPC RewardService port (health and reflection on the same port); 0 = any free port."""
    http_port: int = Field(default=8080, ge=0, le=65535)
    """HTTP port for RL clients: /get_reward (OpenRLHF), /classify (vLLM shape), /metrics, /health."""
    metrics_port: int = Field(default=9090, ge=0, le=65535)
    """Separate Prometheus port; 0 = none (the same metrics stay on http_port /metrics)."""
    models: dict[str, ModelRef] = Field(default_factory=dict)
    """Served models by name, e.g. {gold: {path: ...}, best: {path: ...}}."""
    default_model: str = BEST
    """Model used when a request names none."""
    backend: Literal["torch", "vllm"] = "torch"
    """torch: transformers (CPU fp32; CUDA bf16 + SDPA). vllm: optional extra, raw-logit classify."""
    device: str = "auto"
    """auto = cuda when available, else cpu."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto = bf16 on a bf16-capable GPU, fp32 elsewhere."""
    compile: bool = False
    """torch backend: run forwards through torch.compile (dynamic shapes), compiled at load before the
    model serves and checked against the eager model; on failure the eager model serves (a warning).
    Tens of seconds more per load; needs a C++ compiler on CPU (docs/scorer.md, "Compiled forwards")."""
    max_length: int = Field(default=4096, ge=8)
    """Longest item in tokens; longer ones are truncated or rejected (on_too_long)."""
    max_batch_items: int = Field(default=64, ge=1)
    """Most items in one forward."""
    max_batch_tokens: int = Field(default=16384, ge=8)
    """Token budget of one forward, counted padded: items x longest item."""
    max_wait_ms: float = Field(default=5.0, ge=0.0)
    """Longest an item waits for others to share its forward."""
    forward_overhead_tokens: int = Field(default=0, ge=0)
    """Fixed cost of one forward in token-equivalents, for cutting batches (more padding is
    worth it when forwards are costly); 0 = auto: 32 on CPU, 2048 on CUDA."""
    max_queue: int = Field(default=4096, ge=1)
    """Items waiting per model; beyond it requests get RESOURCE_EXHAUSTED / HTTP 429 (one is admitted whatever
    its size when nothing is queued)."""
    max_request_items: int = Field(default=1024, ge=1)
    """Most items (pair sides count two) in one request; more is INVALID_ARGUMENT / HTTP 400."""
    on_too_long: Literal["truncate", "reject"] = "truncate"
    """What to do with an item over max_length."""
    truncation: Literal["left_turns", "left_tokens", "right"] = "left_turns"
    """How `truncate` cuts (shared.modeling): old turns first, keeping the scored response."""
    shutdown_delay_s: float = Field(default=0.0, ge=0.0)
    """On SIGTERM, before the drain: health turns NOT_SERVING at once but the listeners keep accepting and
    serving for this long, so requests routed here while the pod leaves the Service's endpoints (seconds on
    Kubernetes) are answered, not refused. Skipped by a server never ready; 0 = none. The chart sets 5."""
    max_connection_age_s: float = Field(default=300.0, ge=0.0)
    """Each gRPC connection gets GOAWAY after about this long (+-10% jitter) and its client reconnects, so clients
    spread over replicas an HPA adds (kube-proxy balances connections, not calls); 0 = never: a client stays on
    the pod it first reached (services/scorer/grpc_options.py, docs/scorer.md "Several replicas"). An HTTP
    keep-alive connection is closed after its first response past this age, for the same reason (http.py)."""
    max_connection_age_grace_s: float = Field(default=30.0, ge=0.0)
    """After that GOAWAY, how long calls in flight on the old connection get to finish; past it they, and a
    ScoreStream still open, end with UNAVAILABLE (the synpref client retries them on the new connection)."""
    drain_s: float = Field(default=30.0, ge=0.0)
    """On SIGTERM (after shutdown_delay_s): how long in-flight requests get to finish before the servers stop."""
    http_timeout_s: float = Field(default=60.0, ge=0.0)
    """Deadline of an HTTP shim request (gRPC callers set their own); 0 = none. A client may
    ask for a shorter one with the header X-Request-Timeout (seconds). Past it: HTTP 504."""
    torch_threads: int = Field(default=0, ge=0)
    """CPU threads for torch forwards; 0 = one per forward CPU when cpu_binding is set, else torch's default."""
    cpu_binding: str = "off"
    """On CPU: a CPU list ("1-7") binds each model's forward thread (and torch's threads it starts) to those
    CPUs and the serving threads (gRPC, HTTP, tokenizing) to the other allowed ones (shared/cpus.py); off:
    the scheduler decides. Ignored on a GPU."""
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    """Largest HTTP body and gRPC message; a larger HTTP body is refused unread with 413."""
    max_encode_queue: int = Field(default=64, ge=1)
    """Requests being read or tokenized at once; beyond it HTTP 429 / RESOURCE_EXHAUSTED."""
    max_chars_per_token: int = Field(default=32, ge=1)
    """Bound on the characters one token covers: a text over max_length x this is cut (on the
    side truncation keeps) before tokenizing; shorter texts are untouched (docs/scorer.md)."""
    max_models: int = Field(default=8, ge=1)
    """Most served model names; an admin reload of a new name beyond it is refused (409)."""
    model_root: str = ""
    """Admin reloads load only checkpoint folders under this folder (required with admin)."""
    admin_port: int = Field(default=8081, ge=0, le=65535)
    """Admin port (POST /admin/reload, /admin/unload), apart from the RL-facing http_port."""
    admin_token_file: str = ""
    """File holding the admin bearer token (a mounted Secret); required with admin."""
    admin_enabled: bool = False
    """Serve the admin port; needs admin_token_file and model_root."""
    models_file: str = ""
    """JSON or YAML file of served models, {name: {path, version}} (the shape of an admin reload), relative
    to model_root or absolute; empty = none. Loaded at start and re-read every models_file_poll_s: a name
    whose entry changed is reloaded as an admin reload would (the old version serves meanwhile; a load that
    fails is logged and tried again). The controller writes it (controller.scorer_models_file) so that every
    replica, including ones started later, serves what the one reached by an admin reload serves."""
    models_file_poll_s: float = Field(default=5.0, gt=0.0)
    """How often models_file is re-read."""
    load_timeout_s: float = Field(default=1200.0, gt=0.0)
    """Longest one checkpoint load may take (weights read, device start, compile). Past it the load is abandoned:
    its reload fails (504 on the admin port, an error in the log), the old version (if any) keeps serving and the
    reloads queued behind it go on; the thread cannot be stopped, and what it loads, should it end, is freed. Raise
    it for a large model on slow storage (a 70B checkpoint from a network volume); the controller asks for up to
    30 minutes (publish.RELOAD_WAIT_S), so a bound above that outlasts the controller's asking."""

    def models_file_path(self) -> Path | None:
        """models_file as a path (relative ones under model_root), or None when it is not set."""
        if not self.models_file:
            return None
        return Path(self.model_root or ".") / self.models_file  # an absolute models_file stays itself

    @field_validator("cpu_binding")
    @classmethod
    def _cpu_binding_mode(cls, mode: str) -> str:
        return validate_mode(mode)

    @field_validator("admin_enabled")
    @classmethod
    def _admin_needs_token_and_root(cls, enabled: bool, info: Any) -> bool:
        if enabled:
            for key in ("admin_token_file", "model_root"):
                if not info.data.get(key):
                    raise ValueError(f"admin_enabled needs scorer.{key}: admin without it is refused")
        return enabled


DEFAULT_DESK_GUIDELINE = (
    "Read the conversation, then both candidates. Pick the candidate that better serves the user in its last "
    "turn: correct, helpful, honest and safe, following the pair's own annotation guideline where it has one. "
    "Judge the content, not its length or style.\n\n"
    'Choose "cannot decide" when both are equally good or bad, or when you lack the knowledge to judge: such '
    "pairs are dropped, never guessed. Use the note for anything a reviewer should know."
)


class DeskSettings(Section):
    """The human verification desk (`synpref desk`): a web page for Stage-1 annotators."""

    host: str = "127.0.0.1"
    """Address to listen on; 0.0.0.0 inside a container."""
    port: int = Field(default=8000, ge=0, le=65535)
    tokens: SecretStr = SecretStr("")
    """Comma-separated annotator:token pairs; prefer SYNPREF_DESK__TOKENS (from a Secret) over YAML."""
    tokens_file: str = ""
    """File with one annotator:token per line (# starts a comment); merged with `tokens`."""
    overlap: int = Field(default=1, ge=1, le=9)
    """How many annotators label each pair; above 1, agreement is recorded and the plurality decides."""
    guideline: str = DEFAULT_DESK_GUIDELINE
    """General guideline shown in the desk's guideline panel, above each pair's own guideline."""
    lease_s: float = Field(default=1800.0, gt=0)
    """An assigned pair not answered within this time goes back to the pool."""
    max_pending: int = Field(default=256, ge=1)
    """Most undecided pairs the desk holds; it stops reading the review topic beyond that."""
    group_id: str = "synpref-desk"
    """Consumer group on the review topic; run one desk replica per group."""
    trusted_proxies: list[IPvAnyNetwork] = Field(default_factory=list)
    """CIDRs of the proxies in front of the desk (an Ingress controller's pods) whose X-Forwarded-For the login
    throttle believes; empty = key on the TCP peer (docs/desk.md)."""
    unready_after_s: float = Field(default=60.0, gt=0)
    """/readyz answers 503 once a Kafka read, write or commit has failed for this long without a success."""
