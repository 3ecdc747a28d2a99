"""Configuration files of the director and the envoy, validated with pydantic.

The CLI flags map onto these models one to one; a YAML file given with ``--config`` fills
the same fields, and flags given on the command line win over the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedkube.api.errors import ConfigError
from fedkube.api.policy import ShardPolicy

DEFAULT_PORT = 50051
DEFAULT_HEALTH_CHECK_PERIOD = 60.0

Port = Annotated[int, Field(ge=0, le=65535, description="0 picks a free port")]
NAME_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$"
Name = Annotated[str, Field(min_length=1, max_length=253, pattern=NAME_PATTERN)]


def parse_shape(value: str | list[Any] | tuple[Any, ...]) -> list[str]:
    """'8,8' or [8, 8] -> ['8', '8'] (OpenFL carries shapes as lists of strings)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    shape = [str(item).strip() for item in items]
    if not shape or any(not dim.isdigit() or int(dim) <= 0 for dim in shape):
        raise ValueError(f"a shape is a comma-separated list of positive integers, got {value!r}")
    return shape


def state_dir() -> Path:
    """fedkube's state directory: $XDG_STATE_HOME/fedkube (~/.local/state/fedkube)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fedkube"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSSettings(_Strict):
    """``insecure`` (plaintext; identity from the ``client_id`` header) or mutual TLS."""

    insecure: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    request_certificate: bool = Field(default=False, description=(
        "on Kubernetes: request a certificate for this shard from the fedkube operator at "
        "start and write it to cert/key (which need not exist yet); it is renewed before "
        "it expires"))
    certificate_lifetime_s: int | None = Field(default=None, ge=600, description=(
        "with request_certificate: the lifetime to ask for (the operator's default, a "
        "year, when unset)"))
    renew_before_s: float | None = Field(default=None, gt=0, description=(
        "with request_certificate: renew this long before the certificate expires "
        "(default: a third of its lifetime)"))

    @model_validator(mode="after")
    def _complete(self) -> TLSSettings:
        files = (self.ca, self.cert, self.key)
        if self.insecure and (any(files) or self.request_certificate):
            raise ValueError("insecure mode takes no ca/cert/key")
        if not self.request_certificate and (self.certificate_lifetime_s is not None
                                             or self.renew_before_s is not None):
            raise ValueError("certificate_lifetime_s and renew_before_s go with "
                             "request_certificate")
        if not self.insecure and not all(files):
            raise ValueError("mTLS needs ca, cert and key (or set insecure: true)")
        for path in (self.ca,) if self.request_certificate else files:
            if path is not None and not path.is_file():
                raise ValueError(f"no such file: {path}")
        return self


class DirectorConfig(_Strict):
    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: Port = Field(default=DEFAULT_PORT, description="gRPC port (0: any free port)")
    data_dir: Path = Field(default_factory=lambda: state_dir() / "director", description=(
        "where the store, the experiments' archives and their models live (default: "
        "$XDG_STATE_HOME/fedkube/director, i.e. ~/.local/state/fedkube/director)"))
    sample_shape: list[str] = Field(default_factory=lambda: ["8", "8"], description=(
        "the shape of one sample that every shard must have"))
    target_shape: list[str] = Field(default_factory=lambda: ["1"], description=(
        "the shape of one target that every shard must have"))
    health_check_period: float = Field(default=DEFAULT_HEALTH_CHECK_PERIOD, gt=0, le=3600,
                                       description="seconds between an envoy's health checks")
    tls: TLSSettings
    metrics_port: int | None = Field(default=None, ge=0, le=65535,
                                     description="serve Prometheus /metrics (0: any port)")
    bulk_port: int | None = Field(default=0, ge=0, le=65535, description=(
        "port for model-sized transfers over a plain (or TLS) socket, faster than gRPC "
        "streams; 0: any free port (collaborators ask where); null: none"))
    health_port: int | None = Field(default=None, ge=0, le=65535, description=(
        "also serve grpc.health.v1.Health alone, in plaintext, on this port of host "
        "(0: any free one): for a kubelet's grpc probe, which cannot do mTLS"))
    frontends: int = Field(default=0, ge=0, le=64, description=(
        "processes beside the director that share its port and answer health checks, "
        "each on a core of its own: for federations past a few thousand envoys"))
    advertise_address: str | None = Field(default=None, max_length=253, description=(
        "the host name collaborators reach this director by, written into OpenFL "
        "experiments' plans (default: the one their frontend used)"))
    max_queued_per_owner: int = Field(default=100, ge=0, description=(
        "experiments one owner may have waiting for shards (0: no limit)"))
    max_stored_bytes_per_owner: int = Field(default=100 << 30, ge=0, description=(
        "bytes one owner's experiments may hold on the director's disk: archives, models "
        "and metrics (0: no limit)"))
    max_running_per_owner: int = Field(default=0, ge=0, description=(
        "experiments of one owner running at once; the others wait their turn (0: no "
        "limit)"))
    policy: Path | None = Field(default=None, description=(
        "the federation's policy on new experiments (YAML, a shard policy's fields): "
        "which owners, tasks, code, requirements, rounds and GPUs it takes"))
    max_model_bytes: int | None = Field(default=None, ge=1, description=(
        "the largest initial model an experiment may bring; larger ones are refused "
        "(RESOURCE_EXHAUSTED) before they are taken in (default: a quarter of this "
        "machine's or container's memory, at most 16 GiB: the aggregator holds the model, "
        "its average and a result arriving)"))

    _shapes = field_validator("sample_shape", "target_shape", mode="before")(parse_shape)


class ShardSettings(_Strict):
    """Which shard loader serves this envoy's data, and its options."""

    loader: str = Field(default="digits", min_length=1)
    options: dict[str, str | int | float | bool] = Field(default_factory=dict)


class PodSettings(_Strict):
    """Where the pod runtime puts collaborator Pods; unset fields come from the envoy pod's
    downward-API environment (NODE_NAME, POD_NAMESPACE, POD_NAME, POD_UID)."""

    namespace: str | None = None
    node_name: str | None = None
    image: str | None = Field(default=None, description="default: the envoy pod's own image")
    owner_pod: str | None = None
    owner_uid: str | None = None
    tls_secret: str | None = Field(default=None, description="Secret with ca.crt, tls.crt, "
                                                             "tls.key for the collaborator")
    ca_config_map: str | None = Field(default=None, description=(
        "ConfigMap with the federation's ca.crt: the collaborator Pod then requests its "
        "own certificate as certificate_account (instead of tls_secret)"))
    certificate_account: str | None = Field(default=None, description=(
        "service account of collaborator Pods that request their certificate"))
    unschedulable_after_s: float = Field(default=60.0, gt=0, description="how long a Pod may "
                                         "stay unschedulable before the experiment fails")


# How the envoy tells its (process runtime's) collaborator whether requirements may be
# installed: "refuse", "binary" (wheels only) or "hashes" (wheels, each pinned by hash).
# Read by fedkube.collaborator.environment; unset (a collaborator Pod, a run by hand): binary.
REQUIREMENTS_POLICY_ENV = "FEDKUBE_REQUIREMENTS_POLICY"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"


class SandboxSettings(_Strict):
    """How the process runtime confines an experiment's collaborator, whose task is the
    experiment owner's code (docs/concepts.md#sandbox). The shard's policy fills these."""

    pass_env: list[Annotated[str, Field(pattern=ENV_NAME_PATTERN)]] = Field(
        default_factory=list, description=(
            "names of the envoy's environment variables its collaborators get; nothing else "
            "of its environment reaches them but PATH, LANG, LC_ALL, LC_CTYPE, TZ and "
            "CUDA_VISIBLE_DEVICES"))
    allow_requirements: bool = Field(default=False, description=(
        "let experiments install their requirements.txt (install_requirements): binary "
        "wheels only, no pip options; refused by default"))
    require_hashes: bool = Field(default=False, description=(
        "with allow_requirements: every requirement must be pinned with --hash"))
    user: str | int | None = Field(default=None, description=(
        "when the envoy runs as root: the user (name or uid) its collaborators run as; "
        "default a uid of this envoy's own, 2000000000 plus a hash of its name and work "
        "directory; 'root' runs them as root, unconfined by file permissions"))

    @model_validator(mode="after")
    def _hashes_need_requirements(self) -> SandboxSettings:
        if self.require_hashes and not self.allow_requirements:
            raise ValueError("require_hashes goes with allow_requirements")
        return self


class EnvoyConfig(_Strict):
    name: Name = Field(description="the shard's name (under mTLS, its certificate's CN)")
    director: str = Field(pattern=r"^[^:\s]+:\d{1,5}$", description="host:port of the director")
    shard: ShardSettings = Field(default_factory=ShardSettings)
    cuda_devices: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, description=(
        "GPU indices this envoy owns (default: every GPU its environment shows)"))
    runtime: Literal["process", "pod"] = "process"
    pod: PodSettings = Field(default_factory=PodSettings)
    work_dir: Path = Field(description=(
        "where the envoy keeps experiments' archives and collaborator logs (default: "
        "$XDG_STATE_HOME/fedkube/envoy-NAME, i.e. ~/.local/state/fedkube/envoy-NAME)"))
    tls: TLSSettings
    max_backoff: float = Field(default=30.0, gt=0, description="cap of the reconnect delay, s")
    openfl_python: Path | None = Field(default=None, description=(
        "the Python of an OpenFL 1.6 environment, for OpenFL experiments and shard "
        "descriptors (default: $FEDKUBE_OPENFL_PYTHON, else one built once under "
        "~/.cache/fedkube)"))
    sandbox: SandboxSettings = Field(default_factory=SandboxSettings, description=(
        "how the process runtime confines collaborators"))
    shard_namespace: str | None = Field(default=None, max_length=63, description=(
        "on Kubernetes, the namespace of this shard's Shard object: its data owner answers "
        "experiments awaiting approval with its fedkube.io/approve and fedkube.io/refuse "
        "annotations"))
    policy: ShardPolicy | Path | None = Field(default=None, description=(
        "the shard policy (a YAML file, or its fields inline in a config file): who may "
        "use this shard, with what, and whether its data owner approves each experiment "
        "by hand (default: built-in tasks only, no requirements, approved automatically)"))

    @model_validator(mode="before")
    @classmethod
    def _default_work_dir(cls, data: Any) -> Any:
        """Absolute and one per shard by default: never a folder of wherever it started."""
        if isinstance(data, dict) and data.get("work_dir") is None and data.get("name"):
            data = {**data, "work_dir": state_dir() / f"envoy-{data['name']}"}
        return data


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def _format_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {where}: {item['msg']}")
    return "\n".join(lines)


def build_config(model: type[ConfigT], file: Path | None, overrides: dict[str, Any]) -> ConfigT:
    """Merges a YAML file (optional) with flag overrides and validates the result.

    Raises ConfigError with one line per bad field.
    """
    data: dict[str, Any] = {}
    source = "command-line flags"
    if file is not None:
        source = str(file)
        try:
            loaded = yaml.safe_load(file.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read {file}: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"invalid configuration in {file}: the top level must be a mapping")
        data.update(loaded)
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("tls", "sandbox") and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from exc
