"""What every Kubernetes API call of a training Job shares: its error, which errors are worth asking again, a bound
on how long one request may take, the JSON form of an object. training/k8s_job.py re-exports these names."""

from __future__ import annotations

from typing import Any

from kubernetes import client

REQUEST_TIMEOUT_S = 30.0
"""Longest one request may take; shared/kube.py's client tries each request once (callers ask again)."""
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})


class JobError(RuntimeError):
    """A Kubernetes API call about a training Job failed; the message names namespace/name.

    `status` is the HTTP status (None where no answer came); `transient` says asking again may succeed (a 5xx,
    a 429, an API server unreachable or silent for a while, as during a control-plane upgrade)."""

    def __init__(self, message: str, status: int | None = None, transient: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.transient = transient


def bounded(api_client: client.ApiClient) -> client.ApiClient:
    """`api_client`, with REQUEST_TIMEOUT_S on each request that names no timeout of its own.

    The client's default is none: a connection the API server accepted and never answers (an upgrade, a
    half-open connection through a load balancer) blocked the controller for ever, past every bound of its own.
    """
    rest = api_client.rest_client
    request = rest.request

    def request_bounded(*args: Any, **kwargs: Any) -> Any:
        kwargs["_request_timeout"] = kwargs.get("_request_timeout") or REQUEST_TIMEOUT_S
        return request(*args, **kwargs)

    rest.request = request_bounded  # type: ignore[method-assign]
    return api_client


def to_manifest(obj: Any) -> dict[str, Any]:
    """The JSON form the API server receives (camelCase keys, no nulls)."""
    return client.ApiClient().sanitize_for_serialization(obj)
