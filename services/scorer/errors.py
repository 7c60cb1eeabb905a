"""Errors the scorer maps to gRPC status codes and HTTP statuses, in one place."""

from __future__ import annotations

import grpc


class ScorerError(Exception):
    """Base class: carries the gRPC code and HTTP status a client should see."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500


class InvalidInput(ScorerError):
    """Malformed, empty, too many or too long items: the caller must change the request."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class UnknownModel(ScorerError):
    code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class Overloaded(ScorerError):
    """The bounded queue is full: the caller should back off and retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429


class DeadlineExceeded(ScorerError):
    """The request's deadline passed before its items were computed; they were dropped."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


class NotReady(ScorerError):
    """Models are still loading, or the server is draining for shutdown."""

    code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class PayloadTooLarge(ScorerError):
    """A request body over scorer.max_body_bytes, refused before it is read."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 413


class TooManyModels(ScorerError):
    """A new served name beyond scorer.max_models: unload one first."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 409


class Unauthorized(ScorerError):
    """An admin call without the right bearer token."""

    code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
