"""The `fedkube` command line, one module per command group; `main` is the entry point."""

import os
import sys

# The model owner's commands keep gRPC's C-core logs off the terminal (a failed handshake
# is a dozen lines of them): their errors are one line each (fedkube.cli.main). Set before
# grpc is imported, which reads them once; `--debug` keeps them, and the servers always do.
CLIENT_COMMANDS = frozenset({"shards", "experiment"})


def _command(argv: list[str]) -> str | None:
    """The command word of a `fedkube` command line (after its global flags)."""
    words = iter(argv)
    for word in words:
        if word in ("--log-level", "--log-format"):
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def _quiet_grpc(argv: list[str]) -> None:
    if "--debug" in argv or _command(argv) not in CLIENT_COMMANDS:
        return
    os.environ["GRPC_VERBOSITY"] = "NONE"
    os.environ.pop("GRPC_TRACE", None)


# Only where this process is the command itself (`python -m fedkube.cli`, or the `fedkube`
# script), not where a program imports fedkube.cli.
if sys.argv and (sys.argv[0] == "-m" or os.path.basename(sys.argv[0]) == "fedkube"):
    _quiet_grpc(sys.argv[1:])

from fedkube.cli.main import build_parser, main  # noqa: E402

__all__ = ["build_parser", "main"]
