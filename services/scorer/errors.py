"""Errors the scorer maps to gRPC status codes and HTTP statuses, in one place."""

from __future__ import annotations

import grpc


class ScorerError(Exception):
    """Base class: carries the gRPC code and HTTP status a client should see.

    A subclass names both in its class line: `class X(ScorerError, code=..., http_status=...)`.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500

    def __init_subclass__(cls, *, code: grpc.StatusCode, http_status: int, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.code = code
        cls.http_status = http_status


class InvalidInput(ScorerError, code=grpc.StatusCode.INVALID_ARGUMENT, http_status=400):
    """Malformed, empty, too many or too long items: the caller must change the request."""


class UnknownModel(ScorerError, code=grpc.StatusCode.NOT_FOUND, http_status=404):
    """No model is served under the requested name."""


class Overloaded(ScorerError, code=grpc.StatusCode.RESOURCE_EXHAUSTED, http_status=429):
    """The bounded queue is full: the caller should back off and retry."""


class DeadlineExceeded(ScorerError, code=grpc.StatusCode.DEADLINE_EXCEEDED, http_status=504):
    """The request's deadline passed before its items were computed; they were dropped."""


class NotReady(ScorerError, code=grpc.StatusCode.UNAVAILABLE, http_status=503):
    """Models are still loading, or the server is draining for shutdown: retrying soon helps."""


class NoModel(ScorerError, code=grpc.StatusCode.FAILED_PRECONDITION, http_status=503):
    """No model is loaded and none is loading: retrying soon does not help until one arrives
    (an admin reload, or a checkpoint copied to a configured path)."""


class PayloadTooLarge(ScorerError, code=grpc.StatusCode.RESOURCE_EXHAUSTED, http_status=413):
    """A request body over scorer.max_body_bytes, refused before it is read."""


class TooManyModels(ScorerError, code=grpc.StatusCode.RESOURCE_EXHAUSTED, http_status=409):
    """A new served name beyond scorer.max_models: unload one first."""


class Unauthorized(ScorerError, code=grpc.StatusCode.UNAUTHENTICATED, http_status=401):
    """An admin call without the right bearer token."""
