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
                    metavars: dict[str, str] | None = None) -> None:
    """`--field-name` for each named field of model, typed and documented by the field.
    Unset flags stay None, so a --config file or the model's default applies."""
    for name in names:
        field = model.model_fields[name]
        kind = (types or {}).get(name) or _scalar(field.annotation)
        text = field.description or ""
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

def add_client_flags(parser: argparse.ArgumentParser, *, director_required: bool = True) -> None:
    parser.add_argument("--director", required=director_required, help="host:port")
    parser.add_argument("--client-id", default="owner",
                        help="the caller's name with --insecure (mTLS: the certificate's)")
    add_tls_flags(parser)


def director_client(args: argparse.Namespace) -> DirectorClient:
    from fedkube.client import DirectorClient

    return DirectorClient.from_files(args.director, ca=args.ca, cert=args.cert, key=args.key,
                                     client_id=args.client_id)
