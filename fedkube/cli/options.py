"""Flags shared by several commands, and flags generated from the pydantic config models
(fedkube.api.config), so that each option's help is written once, on its field."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from types import NoneType, UnionType
from typing import TYPE_CHECKING, Any, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from fedkube.api.config import parse_shape
from fedkube.api.errors import ConfigError

if TYPE_CHECKING:
    from fedkube.client import DirectorClient

ArgumentContainer = argparse.ArgumentParser | argparse._ArgumentGroup


def _scalar(annotation: Any) -> Callable[[str], Any]:
    """The argparse type of a field: its annotation without None."""
    if get_origin(annotation) in (Union, UnionType):
        annotation = next(a for a in get_args(annotation) if a is not NoneType)
    if annotation in (int, float, str, Path):
        return annotation  # type: ignore[no-any-return]
    raise TypeError(f"no flag type for {annotation!r}: pass one in types=")


def add_field_flags(parser: ArgumentContainer, model: type[BaseModel], names: Sequence[str], *,
                    types: dict[str, Callable[[str], Any]] | None = None,
                    metavars: dict[str, str] | None = None,
                    notes: dict[str, str] | None = None) -> None:
    """`--field-name` for each named field of model, typed and documented by the field
    (notes: more to say on the command line, such as a flag's format). Unset flags stay
    None, so a --config file or the model's default applies."""
    for name in names:
        field = model.model_fields[name]
        kind = (types or {}).get(name) or _scalar(field.annotation)
        text = "; ".join(t for t in (field.description, (notes or {}).get(name)) if t)
        default = (field.default_factory() if field.default_factory is not None  # type: ignore[call-arg]
                   else field.default)
        if default not in (PydanticUndefined, None, 0, []):
            shown = ",".join(default) if isinstance(default, list) else default
            text = f"{text} (default: {shown})" if text else f"default: {shown}"
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind,
                            help=text or None, metavar=(metavars or {}).get(name))


def field_values(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names}


def shape(value: str) -> list[str]:
    try:
        return parse_shape(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def int_list(value: str) -> list[int]:
    try:
        return [int(item) for item in value.split(",") if item]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of integers, got {value!r}")\
            from None


def key_values(pairs: Sequence[str], *, flag: str) -> dict[str, str]:
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} wants key=value, got {pair!r}")
        result[key] = value
    return result


# -- transport security -------------------------------------------------------------------

def add_tls_flags(parser: argparse.ArgumentParser) -> None:
    """--insecure, or --ca/--cert/--key for mTLS."""
    group = parser.add_argument_group("transport security (mTLS unless --insecure)")
    group.add_argument("--insecure", action="store_true", default=None,
                       help="plaintext gRPC; identities are not checked")
    group.add_argument("--ca", type=Path, help="CA certificate (PEM)")
    group.add_argument("--cert", type=Path, help="this party's certificate (PEM)")
    group.add_argument("--key", type=Path, help="this party's private key (PEM)")


def tls_overrides(args: argparse.Namespace) -> dict[str, Any] | None:
    values = {"insecure": args.insecure, "ca": args.ca, "cert": args.cert, "key": args.key}
    chosen = {k: v for k, v in values.items() if v is not None}
    return chosen or None


# -- the director's clients ---------------------------------------------------------------

def add_client_flags(parser: argparse.ArgumentParser) -> None:
    """Where the director is and who the caller is, for the model owner's commands. Each
    flag overrides its FEDKUBE_* variable, which overrides the client config file's
    context (fedkube.cli.contexts); with none of --insecure/--ca/--cert/--key anywhere,
    the command refuses to run."""
    from fedkube.cli.contexts import ENV_CLIENT_ID, ENV_CONTEXT, ENV_DIRECTOR, ENV_INSECURE

    group = parser.add_argument_group(
        "the director and your credentials",
        "Each flag overrides its FEDKUBE_* variable, which overrides the context of "
        "~/.config/fedkube/config.yaml; with no --insecure or --ca/--cert/--key anywhere, "
        "the command refuses to run.")
    group.add_argument("--director", metavar="HOST:PORT",
                       help=f"the director's gRPC address (env {ENV_DIRECTOR})")
    group.add_argument("--context", metavar="NAME",
                       help=f"a context of the client config file (env {ENV_CONTEXT}; "
                            f"default: its current-context)")
    group.add_argument("--client-id", metavar="NAME",
                       help=f"your name with --insecure; under mTLS, your certificate's "
                            f"name counts instead (env {ENV_CLIENT_ID}; default: owner)")
    group.add_argument("--insecure", action="store_true", default=None,
                       help=f"plaintext gRPC, for local development: the director believes "
                            f"--client-id (env {ENV_INSECURE}=1)")
    group.add_argument("--ca", type=Path, metavar="FILE",
                       help="the federation's CA certificate, PEM (env FEDKUBE_CA)")
    group.add_argument("--cert", type=Path, metavar="FILE",
                       help="your certificate, PEM, role owner or admin (env FEDKUBE_CERT)")
    group.add_argument("--key", type=Path, metavar="FILE",
                       help="your certificate's private key, PEM (env FEDKUBE_KEY)")
    parser.set_defaults(client_command=True)


def director_client(args: argparse.Namespace) -> DirectorClient:
    """A client of the director the flags, environment and config file name; refuses
    (ConfigError) missing or partial credentials before connecting."""
    from fedkube.cli.contexts import load_tls, resolve
    from fedkube.client import DirectorClient

    settings = resolve(args)
    args.client_settings = settings  # for the error line (fedkube.cli.exits.describe)
    return DirectorClient(settings.director, tls=load_tls(settings),
                          client_id=settings.client_id)
