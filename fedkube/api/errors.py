"""fedkube's error catalog: one root, `FedkubeError`, and a class per kind of refusal.

Each class says what went wrong, never how it travels: the gRPC status a service error
becomes is chosen in one place (fedkube.transport.status), the exit code a command ends
with in another (fedkube.cli.exits). This module imports no gRPC, so the API models and
every role can use it.
"""

from __future__ import annotations


class FedkubeError(Exception):
    """Root of fedkube's own errors; the message is one line that a user can act on."""


class ConfigError(FedkubeError, ValueError):
    """A configuration file or flag is invalid; the message names the field."""


class StoreError(FedkubeError, RuntimeError):
    """The director's store cannot be opened or read (a damaged file); the message says
    which and what to do."""


class RefusedError(FedkubeError):
    """The federation refused this party (a shard the director does not accept, a
    certificate the operator denies): retrying the same thing will not help."""


# -- errors a service answers a request with ---------------------------------------------

class ServiceError(FedkubeError):
    """A request a service (director, aggregator) refuses, and why."""


class NotFoundError(ServiceError):
    """What the request names does not exist (or is not the caller's to see)."""


class AlreadyExistsError(ServiceError):
    """What the request would create exists already."""


class InvalidArgumentError(ServiceError):
    """The request itself is malformed or out of range."""


class PermissionDeniedError(ServiceError):
    """The caller's role or identity does not allow the request."""


class UnauthenticatedError(ServiceError):
    """The caller is not part of what it calls (an OpenFL collaborator that no running
    experiment knows): OpenFL's client stops on this code, and retries every other."""


class FailedPreconditionError(ServiceError):
    """The request is well formed but does not fit the current state."""


class ResourceExhaustedError(ServiceError):
    """The request is larger than the service can take now (memory, disk, limits)."""


class InternalError(ServiceError):
    """A fault of the service itself, reported with what it was doing."""
