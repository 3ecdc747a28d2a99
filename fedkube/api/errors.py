"""The error taxonomy of the services; servicers map each class to one gRPC status code."""

from __future__ import annotations

import grpc


class DirectorError(Exception):
    """Base class: a request the service refuses, with the status code that says why."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class NotFoundError(DirectorError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(DirectorError):
    code = grpc.StatusCode.ALREADY_EXISTS


class InvalidArgumentError(DirectorError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class PermissionDeniedError(DirectorError):
    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPreconditionError(DirectorError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(DirectorError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
