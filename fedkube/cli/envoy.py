"""`fedkube envoy start`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from fedkube.api.config import EnvoyConfig, SandboxSettings, build_config
from fedkube.cli.exits import ExitCode
from fedkube.cli.options import (
    add_field_flags,
    add_tls_flags,
    field_values,
    int_list,
    key_values,
    tls_overrides,
)

log = logging.getLogger("fedkube")
FIELDS = ("name", "director", "cuda_devices", "work_dir", "openfl_python", "policy")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    envoy = commands.add_parser("envoy", help="run an envoy").add_subparsers(
        dest="action", required=True)
    start = envoy.add_parser("start", help="start an envoy")
    add_field_flags(start, EnvoyConfig, FIELDS, types={"cuda_devices": int_list, "policy": Path},
                    metavars={"director": "HOST:PORT", "cuda_devices": "I,J"})
    start.add_argument("--shard", help="shard loader: 'digits', package.module:Class, or "
                       "openfl:module.Class (an OpenFL ShardDescriptor, for OpenFL "
                       "experiments; imported from the working directory)")
    start.add_argument("--shard-option", action="append", default=[], metavar="KEY=VALUE")
    start.add_argument("--config", type=Path, help="envoy.yaml (the same fields)")
    add_tls_flags(start)
    sandbox = start.add_argument_group(
        "sandbox", "how collaborators (the experiment owner's code) are confined on the "
        "process runtime (envoy.yaml: sandbox:)")
    fields = SandboxSettings.model_fields
    sandbox.add_argument("--allow-requirements", action="store_true", default=None,
                         help=fields["allow_requirements"].description)
    sandbox.add_argument("--require-hashes", action="store_true", default=None,
                         help=fields["require_hashes"].description)
    sandbox.add_argument("--pass-env", action="append", metavar="NAME",
                         help=f"repeatable: {fields['pass_env'].description}")
    sandbox.add_argument("--sandbox-user", metavar="USER", help=fields["user"].description)
    start.set_defaults(func=start_envoy)
    probe = envoy.add_parser("probe", help="exit 0 if the envoy of --work-dir is live "
                             "(--ready: and its shard online); for kubelet exec probes")
    probe.add_argument("--work-dir", type=Path, required=True)
    probe.add_argument("--ready", action="store_true")
    probe.set_defaults(func=probe_envoy)


def envoy_config(args: argparse.Namespace) -> EnvoyConfig:
    shard: dict[str, Any] | None = None
    if args.shard is not None or args.shard_option:
        shard = {"loader": args.shard or "digits",
                 "options": key_values(args.shard_option, flag="--shard-option")}
    sandbox = {key: value for key, value in (
        ("allow_requirements", args.allow_requirements), ("require_hashes", args.require_hashes),
        ("pass_env", args.pass_env), ("user", args.sandbox_user)) if value is not None}
    return build_config(EnvoyConfig, args.config, {
        **field_values(args, FIELDS), "shard": shard, "tls": tls_overrides(args),
        "sandbox": sandbox or None})


def start_envoy(args: argparse.Namespace) -> int:
    from fedkube.envoy_agent.agent import ShardRefused
    from fedkube.envoy_agent.main import run_envoy

    try:
        run_envoy(envoy_config(args))
    except ShardRefused as exc:
        log.error("shard not accepted: %s", exc)
        return ExitCode.REFUSED
    return ExitCode.OK


def probe_envoy(args: argparse.Namespace) -> int:
    from fedkube.envoy_agent.health import probe

    reason = probe(args.work_dir, ready=args.ready)
    if reason is not None:
        print(reason)
        return ExitCode.FAILED
    return ExitCode.OK
