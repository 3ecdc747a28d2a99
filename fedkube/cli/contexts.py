"""Where the model owner's commands find the director and their credentials: flags, then
environment variables, then a context of the client config file (kubectl-like).

    # ~/.config/fedkube/config.yaml ($XDG_CONFIG_HOME/fedkube/config.yaml)
    current-context: lab
    contexts:
      lab: {director: "fl.example:50051", ca: certs/ca.crt, cert: certs/alice.crt,
            key: certs/alice.key}
      local: {director: "localhost:50051", insecure: true, client-id: alice}

Relative paths in the file are relative to the file's directory. For each setting the
first source that gives it wins: `--director` over FEDKUBE_DIRECTOR over the context.
Transport security is taken whole from the first source that says anything about it
(`--insecure`, or `--ca/--cert/--key`; FEDKUBE_INSECURE=1, or FEDKUBE_CA/_CERT/_KEY; the
context's), so a flag never mixes with a half-set environment. Nothing given at all is
refused: a command does not fall back to plaintext by itself.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedkube.api.errors import ConfigError

if TYPE_CHECKING:
    from fedkube.transport.tls import TLSFiles

ENV_DIRECTOR = "FEDKUBE_DIRECTOR"
ENV_CONTEXT = "FEDKUBE_CONTEXT"
ENV_CLIENT_ID = "FEDKUBE_CLIENT_ID"
ENV_INSECURE = "FEDKUBE_INSECURE"
ENV_FILES = {"ca": "FEDKUBE_CA", "cert": "FEDKUBE_CERT", "key": "FEDKUBE_KEY"}
DEFAULT_CLIENT_ID = "owner"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


class Context(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    director: str | None = Field(default=None, description="HOST:PORT")
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    insecure: bool | None = None
    client_id: str | None = Field(default=None, alias="client-id")


class ClientConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    current_context: str | None = Field(default=None, alias="current-context")
    contexts: dict[str, Context] = Field(default_factory=dict)


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "fedkube" / "config.yaml"


@dataclass(frozen=True)
class TLSChoice:
    """One source's transport settings, and the names it calls them by (for messages)."""

    source: str
    insecure: bool
    files: dict[str, Path]  # ca/cert/key -> path, those this source gives
    names: dict[str, str]  # insecure/ca/cert/key -> "--ca", "FEDKUBE_CA", ...

    @property
    def says_anything(self) -> bool:
        return self.insecure or bool(self.files)


@dataclass(frozen=True)
class ClientSettings:
    director: str
    client_id: str
    insecure: bool
    files: dict[str, Path]  # ca, cert, key under mTLS
    names: dict[str, str]  # what the user called each (for messages)


def _load_context(name: str | None) -> tuple[Context | None, str]:
    """The chosen context of the config file (None without a file and a choice)."""
    import yaml

    path = config_path()
    if not path.is_file():
        if name:
            raise ConfigError(f"no context {name!r}: {path} does not exist; create it "
                              f"(see `fedkube --help`) or drop --context")
        return None, ""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        config = ClientConfig.model_validate(raw)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {' '.join(str(exc).split())}; fix or "
                          f"remove it") from None
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise ConfigError(f"{path}: {where}: {error['msg']}; fix the file") from None
    chosen = name or config.current_context
    if not chosen:
        return None, ""
    context = config.contexts.get(chosen)
    if context is None:
        known = ", ".join(sorted(config.contexts)) or "none"
        raise ConfigError(f"no context {chosen!r} in {path}; its contexts: {known}")
    base = path.parent
    resolved = context.model_copy(update={
        f: (base / getattr(context, f).expanduser()) for f in ("ca", "cert", "key")
        if getattr(context, f) is not None})
    return resolved, f"context {chosen!r} of {path}"


def _env_insecure() -> bool:
    value = os.environ.get(ENV_INSECURE, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{ENV_INSECURE}={value!r}: not a yes or no; set it to 1 or unset it")


def resolve(args: argparse.Namespace) -> ClientSettings:
    """The director, the caller's name and transport security of a client command."""
    loaded: list[tuple[Context | None, str]] = []

    def context() -> tuple[Context | None, str]:  # read only when a setting is missing
        if not loaded:
            loaded.append(_load_context(args.context or os.environ.get(ENV_CONTEXT)))
        return loaded[0]

    def first(flag: Any, env: str, field: str) -> Any:
        if flag is not None:
            return flag
        if os.environ.get(env):
            return os.environ[env]
        ctx = context()[0]
        return getattr(ctx, field) if ctx is not None else None

    flags = TLSChoice("flags", bool(args.insecure),
                      {k: getattr(args, k) for k in ENV_FILES if getattr(args, k) is not None},
                      {"insecure": "--insecure", "ca": "--ca", "cert": "--cert", "key": "--key"})
    choice = flags
    if not flags.says_anything:
        choice = TLSChoice("environment", _env_insecure(),
                           {k: Path(os.environ[v]).expanduser() for k, v in ENV_FILES.items()
                            if os.environ.get(v)},
                           {"insecure": f"{ENV_INSECURE}=1", **ENV_FILES})
    if not choice.says_anything:
        ctx, where = context()
        if ctx is not None:
            choice = TLSChoice(where, bool(ctx.insecure),
                               {k: getattr(ctx, k) for k in ENV_FILES
                                if getattr(ctx, k) is not None},
                               {k: f"{k} ({where})" for k in ("insecure", *ENV_FILES)})
    _check_choice(choice)
    director = first(args.director, ENV_DIRECTOR, "director")
    if not director:
        raise ConfigError(f"no director given; pass --director HOST:PORT (or set "
                          f"{ENV_DIRECTOR}, or a context in {config_path()})")
    _check_target(str(director))
    client_id = first(args.client_id, ENV_CLIENT_ID, "client_id") or DEFAULT_CLIENT_ID
    return ClientSettings(director=str(director), client_id=str(client_id),
                          insecure=choice.insecure, files=choice.files, names=choice.names)


def _check_choice(choice: TLSChoice) -> None:
    if not choice.says_anything:
        raise ConfigError("no transport security given; pass --ca/--cert/--key for mTLS, "
                          "or --insecure for plaintext (or set FEDKUBE_CA/FEDKUBE_CERT/"
                          "FEDKUBE_KEY or FEDKUBE_INSECURE=1, or a context)")
    names = choice.names
    if choice.insecure and choice.files:
        given = "/".join(names[k] for k in choice.files)
        raise ConfigError(f"{names['insecure']} together with {given}; pass either "
                          f"--insecure or --ca/--cert/--key")
    missing = [k for k in ENV_FILES if k not in choice.files]
    if not choice.insecure and missing:
        given = "/".join(names[k] for k in choice.files)
        lacking = "/".join(names[k] for k in missing)
        raise ConfigError(f"{given} without {lacking}; mTLS needs all three of "
                          f"--ca/--cert/--key, or pass --insecure")


def _check_target(target: str) -> None:
    if "://" in target or target.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"director {target!r} is not HOST:PORT; pass e.g. "
                          f"--director localhost:50051")


def load_tls(settings: ClientSettings) -> TLSFiles | None:
    """The PEM files of settings, read and checked here, so that a missing file or a key
    of another certificate is one line now rather than a handshake failing later."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from fedkube.transport.tls import TLSFiles

    if settings.insecure:
        return None
    data: dict[str, bytes] = {}
    for kind, path in settings.files.items():
        name = settings.names[kind]
        try:
            data[kind] = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"{name} {path}: no such file; check the path (`fedkube certs "
                              f"--out DIR` writes DIR/ca.crt, DIR/NAME.crt and DIR/NAME.key)"
                              ) from None
        except OSError as exc:
            raise ConfigError(f"{name} {path}: {exc.strerror or exc}; check the path"
                              ) from None
    names, files = settings.names, settings.files
    try:
        x509.load_pem_x509_certificates(data["ca"])
    except ValueError:
        raise ConfigError(f"{names['ca']} {files['ca']} is not a PEM certificate; pass the "
                          f"federation's CA certificate (ca.crt)") from None
    try:
        cert = x509.load_pem_x509_certificate(data["cert"])
    except ValueError:
        raise ConfigError(f"{names['cert']} {files['cert']} is not a PEM certificate; pass "
                          f"your certificate (NAME.crt)") from None
    try:
        key = serialization.load_pem_private_key(data["key"], password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{names['key']} {files['key']} is not an unencrypted PEM private "
                          f"key; pass your key (NAME.key)") from None
    if key.public_key() != cert.public_key():
        raise ConfigError(f"{names['key']} {files['key']} does not match {names['cert']} "
                          f"{files['cert']}; pass the key written with that certificate "
                          f"(NAME.key beside NAME.crt)")
    return TLSFiles(ca=data["ca"], cert=data["cert"], key=data["key"])
