"""The exit codes of `fedkube` commands, and the one line a user sees for each error."""

from __future__ import annotations

from enum import IntEnum

import grpc

from fedkube.api.errors import ConfigError, RefusedError, ServiceError, StoreError


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # the command ran and its work failed (a call refused, an experiment failed)
    USAGE = 2  # bad flags or configuration (argparse's own code for bad flags)
    REFUSED = 3  # the federation refused this party (shard not accepted, certificate denied)


def describe(exc: BaseException) -> tuple[ExitCode, str] | None:
    """(exit code, one line) for an error a user can act on; None for a bug (traceback)."""
    if isinstance(exc, ConfigError):
        return ExitCode.USAGE, str(exc)
    if isinstance(exc, RefusedError):
        return ExitCode.REFUSED, str(exc)
    if isinstance(exc, StoreError | ServiceError):  # a refusal made here, not remotely
        return ExitCode.FAILED, str(exc)
    if isinstance(exc, TimeoutError):
        return ExitCode.FAILED, f"timed out: {exc}"
    if isinstance(exc, grpc.RpcError):  # a refusal or an unreachable director
        return ExitCode.FAILED, f"{exc.code().name}: {exc.details()}"
    return None
