"""An envoy process from start to stop: its shard loaded, its certificate requested where
it asks the operator for one, its collaborator runtime chosen, and SIGTERM handled."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
from collections.abc import Callable

from fedkube.api.config import EnvoyConfig
from fedkube.api.errors import ConfigError
from fedkube.envoy_agent.runtime import Runtime


def make_runtime(config: EnvoyConfig) -> Runtime:
    """The collaborator runtime the config names: a Pod (Kubernetes) or a subprocess."""
    if config.runtime == "pod":
        from fedkube.envoy_agent.pod_runtime import PodRuntime

        return PodRuntime(config)
    from fedkube.envoy_agent.process_runtime import ProcessRuntime

    return ProcessRuntime(config)


def certificate_renewal(config: EnvoyConfig) -> Callable[[], None] | None:
    """Where the envoy requests its own certificate (on Kubernetes): a call that obtains a
    new one into its cert and key files (blocking)."""
    if not config.tls.request_certificate:
        return None
    from fedkube.kube.csr import request_certificate

    assert config.tls.cert and config.tls.key  # checked by TLSSettings
    return functools.partial(request_certificate, config.name, "envoy",
                             cert_path=config.tls.cert, key_path=config.tls.key,
                             lifetime_s=config.tls.certificate_lifetime_s)


def run_envoy(config: EnvoyConfig) -> None:
    """Runs until SIGTERM or Ctrl-C; raises ShardRefused when the director refuses the
    shard, ConfigError when the shard cannot be loaded."""
    from fedkube.envoy_agent.agent import EnvoyAgent
    from fedkube.envoy_agent.openfl_shard import OpenFLShard
    from fedkube.openfl.environment import DESCRIPTOR_PREFIX, OpenFLEnvironmentError
    from fedkube.tasks.shard import ShardDescriptor, ShardLoaderError, load_shard

    shard: ShardDescriptor
    try:
        if config.shard.loader.startswith(DESCRIPTOR_PREFIX):
            shard = OpenFLShard(config.shard.loader, dict(config.shard.options),
                                config.openfl_python)
        else:
            shard = load_shard(config.shard.loader, dict(config.shard.options))
    except (ShardLoaderError, OpenFLEnvironmentError) as exc:
        raise ConfigError(str(exc)) from exc
    renew = certificate_renewal(config)
    if renew is not None:
        renew()

    async def main() -> None:
        agent = EnvoyAgent(config, shard, runtime=make_runtime(config), renew_certificate=renew)
        # SIGTERM (a Pod deleted, a test's stop) unwinds like Ctrl-C: the running
        # collaborator is stopped with its envoy instead of left behind.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await agent.run()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
