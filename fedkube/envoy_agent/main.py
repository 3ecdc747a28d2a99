"""An envoy process from start to stop: its shard loaded, its certificate requested where
it asks the operator for one, its collaborator runtime chosen, and SIGTERM handled."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fedkube.api.config import EnvoyConfig, SandboxSettings
from fedkube.api.errors import ConfigError
from fedkube.envoy_agent.runtime import Runtime

if TYPE_CHECKING:
    from fedkube.api.policy import ShardPolicy


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


def with_sandbox_flags(policy: ShardPolicy, flags: SandboxSettings) -> ShardPolicy:
    """The policy with what the envoy's own sandbox flags allow added: `--allow-requirements`
    is the data owner's `requirements: true`, said on the command line (one rule, so the
    review and the runtime never disagree)."""
    return policy.model_copy(update={
        "requirements": policy.requirements or flags.allow_requirements,
        "require_hashes": policy.require_hashes or flags.require_hashes,
        "pass_env": list(dict.fromkeys([*policy.pass_env, *flags.pass_env]))})


def sandbox_settings(config: EnvoyConfig, policy: ShardPolicy) -> SandboxSettings:
    """The sandbox of the envoy's config, with what the shard policy allows on top: its
    environment names passed, requirements (and hashes) where either allows (or asks)."""
    settings = config.sandbox
    return SandboxSettings(
        pass_env=list(dict.fromkeys([*settings.pass_env, *policy.pass_env])),
        allow_requirements=settings.allow_requirements or policy.requirements,
        require_hashes=settings.require_hashes or policy.require_hashes, user=settings.user)


def run_envoy(config: EnvoyConfig) -> None:
    """Runs until SIGTERM or Ctrl-C; raises ShardRefused when the director refuses the
    shard, ConfigError when the shard cannot be loaded or the sandbox user cannot be had."""
    from fedkube.envoy_agent.agent import EnvoyAgent
    from fedkube.envoy_agent.openfl_shard import OpenFLShard
    from fedkube.openfl.environment import DESCRIPTOR_PREFIX, OpenFLEnvironmentError
    from fedkube.tasks.shard import ShardDescriptor, ShardLoaderError, load_shard

    if config.runtime == "process":  # a sandbox user that cannot be had: say so first
        from fedkube.envoy_agent.process_runtime import envoy_key
        from fedkube.envoy_agent.sandbox import sandbox_identity

        sandbox_identity(config.sandbox, envoy_key(config))
    shard: ShardDescriptor
    try:
        if config.shard.loader.startswith(DESCRIPTOR_PREFIX):
            shard = OpenFLShard(config.shard.loader, dict(config.shard.options),
                                config.openfl_python)
        else:
            shard = load_shard(config.shard.loader, dict(config.shard.options))
    except (ShardLoaderError, OpenFLEnvironmentError) as exc:
        raise ConfigError(str(exc)) from exc
    from fedkube.api.policy import ShardPolicy, load_policy

    # A bad policy stops the envoy before it registers: a shard never runs on a policy
    # that its data owner did not mean.
    given = load_policy(config.policy) if isinstance(config.policy, Path) else config.policy
    policy = with_sandbox_flags(given or ShardPolicy(), config.sandbox)
    config = config.model_copy(update={"sandbox": sandbox_settings(config, policy)})
    renew = certificate_renewal(config)
    if renew is not None:
        renew()

    async def main() -> None:
        agent = EnvoyAgent(config, shard, runtime=make_runtime(config), renew_certificate=renew,
                           policy=policy)
        # SIGTERM (a Pod deleted, a test's stop) unwinds like Ctrl-C: the running
        # collaborator is stopped with its envoy instead of left behind.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await agent.run()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
