"""The exit codes of `fedkube` commands, and the one line a user sees for each error:
`fedkube: <what went wrong>; <what to do>` (docs/quickstart.md, "Exit codes")."""

from __future__ import annotations

import re
from enum import IntEnum
from typing import TYPE_CHECKING

from fedkube.api.errors import ConfigError, RefusedError, ServiceError, StoreError

if TYPE_CHECKING:
    import grpc

    from fedkube.cli.contexts import ClientSettings


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # the command ran and its work failed (the director refused the request,
    # the experiment failed)
    USAGE = 2  # bad flags, configuration or local files (argparse's own code for bad flags)
    REFUSED = 3  # the federation refused this party (shard not accepted, certificate denied,
    # a role that may not do this)
    UNAVAILABLE = 4  # the director could not be reached, or did not answer (or what was
    # awaited did not happen) in time: retrying later may help
    INTERNAL = 5  # a bug in fedkube: the line says how to get the traceback
    INTERRUPTED = 130  # Ctrl-C


def describe(exc: BaseException, client: ClientSettings | None = None
             ) -> tuple[ExitCode, str] | None:
    """(exit code, one line) for an error a user can act on; None for a bug (traceback).
    client: the settings of a client command, to say which director and credentials."""
    import grpc

    if isinstance(exc, ConfigError):
        return ExitCode.USAGE, str(exc)
    if isinstance(exc, RefusedError):
        return ExitCode.REFUSED, str(exc)
    if isinstance(exc, StoreError | ServiceError):  # a refusal made here, not remotely
        return ExitCode.FAILED, str(exc)
    if isinstance(exc, grpc.RpcError):  # a refusal or an unreachable director
        return remote(exc, client)
    if isinstance(exc, TimeoutError):
        if isinstance(exc.__cause__, grpc.RpcError):  # unreachable all along
            return remote(exc.__cause__, client)
        return ExitCode.UNAVAILABLE, f"timed out: {exc}; retry with a longer --timeout"
    if client is not None and isinstance(exc, OSError) and exc.filename is not None:
        return ExitCode.USAGE, f"{exc.filename}: {exc.strerror or exc}; check the path"
    return None


# -- the director's answers, in the user's terms ------------------------------------------

# What each RPC a client command makes lets its caller do.
ACTIONS = {
    "SetNewExperiment": "submit experiments",
    "GetExperimentsList": "list experiments",
    "GetExperimentDescription": "read an experiment's status",
    "GetExperimentStatus": "read an experiment's status",
    "GetTrainedModel": "download models",
    "GetMetricStream": "read an experiment's metrics",
    "RemoveExperimentData": "remove experiments",
    "GetEnvoys": "list the shards",
    "GetDatasetInfo": "read the federation's data set shapes",
}
_ROLE_REFUSAL = re.compile(r"role '(\w+)' may not call (\w+) \(allowed: ([\w, ]+)\)")
_HINTS = {
    "NOT_FOUND": "check the name (fedkube experiment list)",
    "ALREADY_EXISTS": "pick another --name, or remove the old one (fedkube experiment remove)",
    "INVALID_ARGUMENT": "fix the request and submit again",
    "FAILED_PRECONDITION": "check the experiment's state (fedkube experiment status)",
    "RESOURCE_EXHAUSTED": "send less, or ask the director's operator for more",
    "UNAUTHENTICATED": "use a certificate issued by the federation's CA",
}


def _a(role: str) -> str:
    return f"{'an' if role[:1] in 'aeiou' else 'a'} {role}"


def permission(details: str) -> str:
    """A role refusal of fedkube.transport.roles.refusal, as what the caller may not do:
    "role 'envoy' may not call SetNewExperiment" -> "an envoy certificate cannot submit
    experiments; use an owner or admin certificate"."""
    match = _ROLE_REFUSAL.search(details)
    if match is None:
        return details if ";" in details else f"{details}; use a certificate allowed to"
    role, method, allowed = match.groups()
    action = ACTIONS.get(method, f"call {method}")
    roles = [r.strip() for r in allowed.split(",")]
    preferred = [r for r in ("owner", "admin") if r in roles] or roles
    issue = {"owner": "fedkube certs --user NAME", "admin": "fedkube certs --admin NAME",
             "envoy": "fedkube certs --envoy NAME"}.get(preferred[0], "fedkube certs")
    return (f"{_a(role)} certificate cannot {action}; use {_a(preferred[0])}"
            f"{''.join(f' or {r}' for r in preferred[1:])} certificate (`{issue}`)")


def _unreachable(details: str, client: ClientSettings | None) -> tuple[ExitCode, str]:
    """UNAVAILABLE: refused (3) where the director closed an mTLS handshake on us, else
    unreachable (4), with what the details tell of why."""
    line = _why_unreachable(details, client)
    return (ExitCode.REFUSED if "does not accept your certificate" in line
            else ExitCode.UNAVAILABLE), line


def _why_unreachable(details: str, client: ClientSettings | None) -> str:
    where = f"the director at {client.director}" if client else "the director"
    lowered = details.lower()
    if "connection refused" in lowered:
        return (f"cannot reach {where} (connection refused); check --director and that "
                f"the director is running")
    if "dns" in lowered or "name resolution" in lowered or "not resolve" in lowered:
        return f"cannot resolve the host of {where}; check --director"
    if client is not None and client.insecure and ("socket closed" in lowered
                                                   or "connection reset" in lowered):
        return (f"{where} closed a plaintext connection: it probably requires mTLS; pass "
                f"--ca/--cert/--key instead of --insecure")
    if client is not None and not client.insecure and ("ssl" in lowered or "tls" in lowered
                                                       or "handshake" in lowered):
        if "wrong_version_number" in lowered or "packet_length_too_long" in lowered:
            return (f"the TLS handshake with {where} failed: it probably serves plaintext; "
                    f"pass --insecure")
        return (f"the TLS handshake with {where} failed; check that "
                f"{client.names['ca']} is the CA of the director's certificate, that your "
                f"certificate comes from the same CA, and that --director names a host "
                f"the director's certificate lists")
    if client is not None and not client.insecure and "socket closed" in lowered:
        return (f"{where} closed the connection during the TLS handshake: it does not "
                f"accept your certificate; use one issued by the federation's CA")
    return f"{where} is unavailable ({details}); check --director and that it is running"


def remote(exc: grpc.RpcError, client: ClientSettings | None) -> tuple[ExitCode, str]:
    """A failed call to the director as an exit code and one line."""
    import grpc

    code: grpc.StatusCode = exc.code()
    details = " ".join(str(exc.details() or "").split())
    if code is grpc.StatusCode.UNAVAILABLE:
        return _unreachable(details, client)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        where = f"the director at {client.director}" if client else "the director"
        return ExitCode.UNAVAILABLE, (f"{where} did not answer in time; check that it is "
                                      f"running and not overloaded, then retry")
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return ExitCode.REFUSED, permission(details)
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return ExitCode.REFUSED, f"{details}; {_HINTS['UNAUTHENTICATED']}"
    if code is grpc.StatusCode.CANCELLED:
        return ExitCode.INTERRUPTED, "the call was cancelled"
    hint = _HINTS.get(code.name)
    if hint is None:  # INTERNAL, UNKNOWN, ...: the director's own fault
        return ExitCode.FAILED, (f"the director failed: {code.name}: {details}; see the "
                                 f"director's log")
    return ExitCode.FAILED, details if ";" in details else f"{details}; {hint}"
