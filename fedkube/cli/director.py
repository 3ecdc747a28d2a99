"""`fedkube director start`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from fedkube.api.config import DirectorConfig, build_config
from fedkube.cli.options import add_field_flags, add_tls_flags, field_values, shape, tls_overrides

FIELDS = ("host", "port", "data_dir", "sample_shape", "target_shape", "health_check_period",
          "metrics_port", "health_port", "frontends", "advertise_address",
          "max_queued_per_owner", "max_stored_bytes_per_owner", "max_model_bytes")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    director = commands.add_parser("director", help="run the director").add_subparsers(
        dest="action", required=True)
    start = director.add_parser("start", help="start a director")
    add_field_flags(start, DirectorConfig, FIELDS,
                    types={"sample_shape": shape, "target_shape": shape},
                    metavars={"sample_shape": "N,N", "target_shape": "N,N",
                              "max_queued_per_owner": "N",
                              "max_stored_bytes_per_owner": "BYTES",
                              "max_model_bytes": "BYTES"},
                    notes={"sample_shape": "comma-separated sizes, as the shards' loaders "
                                           "report them (8,8; 28,28,1)",
                           "target_shape": "comma-separated sizes (1: one label)",
                           "data_dir": "a directory, created if missing"})
    bulk = start.add_mutually_exclusive_group()
    add_field_flags(bulk, DirectorConfig, ["bulk_port"])
    bulk.add_argument("--no-bulk", action="store_true",
                      help="no bulk port: models travel in gRPC streams only")
    start.add_argument("--config", type=Path, help="director.yaml (the same fields)")
    add_tls_flags(start)
    start.set_defaults(func=start_director, moves_models=True)


def director_config(args: argparse.Namespace) -> DirectorConfig:
    config = build_config(DirectorConfig, args.config, {
        **field_values(args, (*FIELDS, "bulk_port")), "tls": tls_overrides(args)})
    return config.model_copy(update={"bulk_port": None}) if args.no_bulk else config


def start_director(args: argparse.Namespace) -> int:
    from fedkube.director.server import DirectorServer
    from fedkube.startup import server_loop_factory

    config = director_config(args)

    async def main() -> None:
        server = DirectorServer(config)
        # SIGTERM (a Pod deleted: as PID 1 the director would otherwise ignore it until
        # the kubelet's SIGKILL) unwinds like Ctrl-C: Health says NOT_SERVING, the ports
        # stop taking calls, the store is flushed and closed, and the command exits 0.
        task = asyncio.current_task()
        assert task is not None
        loop, draining = asyncio.get_running_loop(), False

        def terminate() -> None:
            nonlocal draining
            if not draining:  # once: a second SIGTERM must not cut the drain short
                draining = True
                logging.getLogger("fedkube").info("SIGTERM: stopping the director")
                task.cancel()

        loop.add_signal_handler(signal.SIGTERM, terminate)
        with contextlib.suppress(asyncio.CancelledError):
            await server.serve_forever()

    with (contextlib.suppress(KeyboardInterrupt),
          asyncio.Runner(loop_factory=server_loop_factory()) as runner):
        runner.run(main())
    return 0
