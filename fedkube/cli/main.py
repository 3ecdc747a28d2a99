"""`fedkube`: the parser of every command, and the one place errors become exit codes.

Every error a user can act on ends as one line on stderr, `fedkube: <what went wrong>;
<what to do>`, and an exit code of fedkube.cli.exits; `--debug` shows the traceback
instead. A bug in a client command is one line too (exit 5, pointing at --debug); the
long-running server commands keep their tracebacks, for their logs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from fedkube.cli import (
    certs,
    collaborator,
    dev,
    director,
    envoy,
    experiment,
    operator,
    shard,
    shards,
)
from fedkube.cli.exits import ExitCode, describe

DESCRIPTION = ("Federated learning on Kubernetes: the director, envoys and collaborators, "
               "the operator, and the model owner's commands.")
EPILOG = """\
The model owner's commands (shards, experiment) find the director and credentials in
flags, else FEDKUBE_DIRECTOR, FEDKUBE_CA, FEDKUBE_CERT, FEDKUBE_KEY, FEDKUBE_INSECURE=1,
FEDKUBE_CLIENT_ID, else a context of ~/.config/fedkube/config.yaml:

  current-context: lab
  contexts:
    lab: {director: "fl.example:50051", ca: ca.crt, cert: alice.crt, key: alice.key}
    local: {director: "localhost:50051", insecure: true, client-id: alice}

Exit codes: 0 done; 1 the work failed (a request refused, an experiment failed); 2 bad
flags, configuration or files; 3 refused by the federation (certificate or role);
4 the director unreachable or too slow (retry); 5 a bug in fedkube (rerun with --debug);
130 interrupted.
"""
COMMAND_GROUPS = (director, envoy, shards, shard, collaborator, experiment, dev, operator,
                  certs)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default unless its help does already, or it has none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, True, [], argparse.SUPPRESS)
                or not action.option_strings or action.const is not None):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class Parser(argparse.ArgumentParser):
    """argparse with the defaults in the help, and its errors as one line (exit 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("fedkube").strip()
        where = f"{command}: " if command else ""
        self.exit(ExitCode.USAGE, f"fedkube: {where}{message}; see `{self.prog} --help`\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedkube")
    except PackageNotFoundError:
        from fedkube import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fedkube", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"fedkube {_version()}")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks, and gRPC's own logs, instead of one-line errors")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="the least severe log records shown")
    parser.add_argument("--log-format", default="auto", choices=["auto", "rich", "plain", "json"],
                        help="auto: rich on a terminal, plain otherwise; json: one object a line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(commands)
    completion = commands.add_parser(
        "completion", help="print the shell code that completes fedkube's commands and flags",
        description='Add `eval "$(fedkube completion bash)"` to ~/.bashrc (zsh: '
                    '`eval "$(fedkube completion zsh)"` in ~/.zshrc).')
    completion.add_argument("shell", choices=["bash", "zsh", "fish", "tcsh"])
    completion.set_defaults(func=print_completion)
    return parser


def print_completion(args: argparse.Namespace) -> int:
    from argcomplete.shell_integration import shellcode

    print(shellcode(["fedkube"], shell=args.shell))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from fedkube.startup import reexec_with_huge_pages, setup_logging

    parser = build_parser()
    # Completes and exits when the shell asks (_ARGCOMPLETE set); otherwise does nothing.
    import argcomplete

    argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    if getattr(args, "moves_models", False):
        reexec_with_huge_pages(sys.argv[1:] if argv is None else list(argv))
    setup_logging("debug" if args.debug and args.log_level == "info" else args.log_level,
                  args.log_format)
    func: Callable[[argparse.Namespace], int] = args.func
    client = getattr(args, "client_command", False)
    try:
        return int(func(args))
    except KeyboardInterrupt:
        if args.debug or not client:
            raise
        print("fedkube: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except Exception as exc:
        if args.debug:
            raise
        known = describe(exc, getattr(args, "client_settings", None) if client else None)
        if known is None:
            if not client:
                raise
            known = (ExitCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}; "
                                        f"rerun with --debug for the traceback, and report it")
        code, line = known
        print(f"fedkube: {' '.join(line.split())}", file=sys.stderr)
        return int(code)
