"""Why a training Job's pod does not run: read from its pods while ClusterJobs.wait waits on the Job.

A Job whose pod cannot run (no node with a free GPU, an image that does not pull, a Secret or volume that is
missing) is neither Complete nor Failed: without this the controller waited silently for days."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

CHECK_S = 120.0
"""How often ClusterJobs.wait looks at the pods of the Job it waits on."""
REPEAT_S = 900.0
"""Least time between two warnings of the same reason for the same pod."""
SLOW_S = 600.0
"""How long a pod may be created or initialised without a warning: pulling a CUDA image takes minutes."""
SLOW = frozenset({"ContainerCreating", "PodInitializing", "Pending"})
"""Reasons that are routine for a while; seen for SLOW_S, they are mostly a volume that does not mount."""
SAME = {"ErrImagePull": "ImagePullBackOff"}
"""Reasons a pod alternates between: one reason, not a change to warn about on every check."""


def problem(pod: Any) -> tuple[str, str] | None:
    """(reason, message) of why `pod` does not run; None when it runs or has ended."""
    status = pod.status
    phase = status.phase if status else None
    if status is None or phase in ("Succeeded", "Failed"):
        return None
    for cond in status.conditions or []:
        if cond.type == "PodScheduled" and cond.status == "False":
            return cond.reason or "Unschedulable", cond.message or ""
    for container in [*(status.init_container_statuses or []), *(status.container_statuses or [])]:
        waiting = container.state and container.state.waiting
        if waiting and waiting.reason:
            return waiting.reason, waiting.message or ""
    if phase == "Running":
        return None
    return phase or "Pending", ""


def failure(pod: Any) -> str | None:
    """Why `pod` failed ("OOMKilled (exit code 137)", "Evicted: ..."); None unless it failed."""
    status = pod.status
    if status is None or status.phase != "Failed":
        return None
    said = [f"{status.reason}: {status.message}" if status.message else status.reason] if status.reason else []
    for container in [*(status.init_container_statuses or []), *(status.container_statuses or [])]:
        ended = container.state and container.state.terminated
        if ended and ended.exit_code:
            said.append(f"{container.name} {ended.reason or 'Error'} (exit code {ended.exit_code})")
    return "; ".join(said) or "Failed"


def duration(seconds: float) -> str:
    """`seconds` as 3d4h, 2h13m or 7m."""
    minutes = int(seconds // 60)
    days, hours = divmod(minutes // 60, 24)
    if days:
        return f"{days}d{hours}h"
    return f"{hours}h{minutes % 60}m" if hours else f"{minutes}m"


class JobPods:
    """Warns why the pods of Job `namespace/name` do not run: once per new reason, then every REPEAT_S."""

    def __init__(self, core: Any, namespace: str, name: str) -> None:
        self.core = core
        self.namespace = namespace
        self.name = name
        self.key: tuple[str, str] | None = None
        """(pod, reason) last seen, since `since` (on the caller's clock), last warned about at `warned`."""
        self.since = 0.0
        self.warned: float | None = None
        self.list_failed = False

    def pods(self) -> list[Any] | None:
        """The Job's pods, None when they cannot be listed (logged once: the wait goes on without them)."""
        from synpref.training import k8s_api
        from synpref.training.k8s_job import JOB_NAME_LABEL

        try:
            return self.core.list_namespaced_pod(
                self.namespace,
                label_selector=f"{JOB_NAME_LABEL}={self.name}",
                _request_timeout=k8s_api.REQUEST_TIMEOUT_S,
            ).items
        except Exception as exc:  # only a diagnosis: no failure here may end the wait on the Job
            status = getattr(exc, "status", None)
            why = f"HTTP {status} {getattr(exc, 'reason', '')}".strip() if status else f"{type(exc).__name__}: {exc}"
            # A 403 is a Role from an older chart (no `list` on pods).
            level = logging.DEBUG if self.list_failed else logging.INFO
            log.log(
                level, "cannot list the pods of Job %s/%s (%s): waiting without them", self.namespace, self.name, why
            )
            self.list_failed = True
            return None

    def failures(self) -> list[str]:
        """Lines "pod <name>: <why>", one for each failed pod of the Job (none when they cannot be listed)."""
        return sorted(f"pod {pod.metadata.name}: {why}" for pod in self.pods() or [] if (why := failure(pod)))

    def check(self, now: float, waited_s: float) -> str | None:
        """List the pods and warn why one does not run; the line warned, if any. `now`: the caller's clock."""
        pods = self.pods()
        if pods is None:
            return None
        found = sorted(((pod.metadata.name, *why) for pod in pods if (why := problem(pod))), key=lambda p: p[0])
        return self.note(found, len(pods), now, waited_s)

    def note(self, found: list[tuple[str, str, str]], total: int, now: float, waited_s: float) -> str | None:
        """Warn about the first of `found` ((pod, reason, message) of the pods not running, of `total`)."""
        if not found:
            self.key, self.warned = None, None
            return None
        pod, reason, message = found[0]
        key = (pod, SAME.get(reason, reason))
        if key != self.key:
            self.key, self.since, self.warned = key, now, None
        if reason in SLOW and now - self.since < SLOW_S:
            return None
        if self.warned is not None and now - self.warned < REPEAT_S:
            return None
        self.warned = now
        more = f" ({len(found)} of {total} pods not running)" if len(found) > 1 else ""
        what = f"{reason}: {message}" if message else reason
        if reason in SLOW:
            what += f" for {duration(now - self.since)} (a volume that does not mount, or a slow image pull)"
        line = (
            f"training Job {self.namespace}/{self.name} not running after {duration(waited_s)}: pod {pod}: {what}"
            f"{more}; see kubectl describe pod -n {self.namespace} {pod}"
        )
        log.warning("%s", line)
        return line
