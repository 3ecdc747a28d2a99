"""Runs a director: the core, its store, the gRPC service, and the health flusher.

It also serves the standard gRPC health protocol (grpc.health.v1.Health, from
grpcio-health-checking), for a kubelet's `grpc` probe: overall ("") and per service,
NOT_SERVING until the store is open and the experiments' aggregators run, SERVING then, and
NOT_SERVING again from the moment it starts to stop.

Under mTLS a kubelet cannot make that probe on the director's port: kubelet gRPC probes
speak plaintext (no TLS, let alone a client certificate), and that port requires a client
certificate signed by the federation's CA (fedkube.transport.tls, `require_client_auth`).
Opening the TLS handshake to certificate-less clients would weaken every other RPC to the
role table alone, and still not help a plaintext probe. So `health_port` is a second,
plaintext gRPC port that serves Health and nothing else: it tells only whether the director
is up. On the director's own port Health is served as well (to every role, under mTLS: see
fedkube.transport.roles), and its frontends relay it here, so a check that the kernel gives
a frontend gets the director's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedkube.aggregator.bulk import AggregatorBulkHandler
from fedkube.aggregator.runner import AggregatorRunner
from fedkube.aggregator.servicer import AggregatorService, add_aggregator_to_server
from fedkube.api.config import DirectorConfig
from fedkube.api.errors import ConfigError
from fedkube.api.experiment import ExperimentState
from fedkube.api.policy import ShardPolicy, load_policy
from fedkube.director.core import Director, OwnerLimits
from fedkube.director.frontend_pool import FrontendReports, Frontends
from fedkube.director.metrics import MetricsServer
from fedkube.director.servicer import DirectorService, ReviewService
from fedkube.director.store import ExperimentRecord, open_store
from fedkube.proto import director_pb2_grpc, frontend_pb2_grpc, review_pb2_grpc
from fedkube.transport.bulk import BulkServer
from fedkube.transport.guard import add_guarded_service, generated_handlers
from fedkube.transport.server import create_server
from fedkube.transport.tls import TLSFiles

log = logging.getLogger(__name__)

# Health timestamps reach the store at most this often (and at shutdown).
FLUSH_INTERVAL_S = 2.0
HEALTH_SERVICE: str = health.SERVICE_NAME  # grpc.health.v1.Health
# What the director's port serves, each reported by Health beside the overall status ("").
SERVED = ("openfl.director.Director", "openfl.aggregator.Aggregator",
          "fedkube.streaming.TensorStream", "fedkube.review.Review")


def health_handlers(servicer: Any) -> Any:
    """Health's method handlers, to register behind fedkube.transport.guard."""
    return generated_handlers(health_pb2_grpc.add_HealthServicer_to_server, servicer)


def federation_policy(path: Path) -> ShardPolicy:
    """The federation's policy: a shard policy's rules and hooks; approval is the shards'
    (a federation admin who must see each experiment reviews it with a hook)."""
    policy = load_policy(path)
    if policy.approval == "manual":
        raise ConfigError(f"{path}: approval: manual is a shard's; a federation reviews "
                          "with reviewCommand or reviewCallback")
    return policy


class DirectorServer:
    def __init__(self, config: DirectorConfig) -> None:
        """config.health_port: also serve Health alone on this plaintext port of
        config.host (0: any free one), for probes that cannot do mTLS; see the module's
        docstring."""
        self.config = config
        tls = TLSFiles.load(config.tls)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.director = Director(
            store=open_store(config.data_dir), data_dir=config.data_dir,
            sample_shape=config.sample_shape, target_shape=config.target_shape,
            health_check_period=config.health_check_period,
            limits=OwnerLimits(max_queued=config.max_queued_per_owner,
                               max_stored_bytes=config.max_stored_bytes_per_owner,
                               max_running=config.max_running_per_owner),
        )
        if config.policy is not None:
            self.director.policy = federation_policy(config.policy)
        self.server: grpc.aio.Server
        self.server, self.port = create_server(config.host, config.port, tls=tls)
        self.runner = AggregatorRunner(self.director)
        self.runner.port, self.runner.address = self.port, config.advertise_address
        self.runner.registered_samples = self.director.registered_samples
        self.director.runner = self.runner
        secure = tls is not None  # under mTLS every call also passes the role table
        service = DirectorService(self.director, tls=secure,
                                  max_model_bytes=config.max_model_bytes)
        director_handlers = generated_handlers(director_pb2_grpc.add_DirectorServicer_to_server,
                                               service)
        aggregator = AggregatorService(self.runner, tls=secure)
        add_guarded_service(self.server, "openfl.director.Director", director_handlers,
                            check_roles=secure)
        review_handlers = generated_handlers(review_pb2_grpc.add_ReviewServicer_to_server,
                                             ReviewService(self.director, tls=secure))
        add_guarded_service(self.server, "fedkube.review.Review", review_handlers,
                            check_roles=secure)
        # Collaborators reach their aggregators on the director's own port.
        add_aggregator_to_server(aggregator, self.server, check_roles=secure)
        # (grpc-stubs 1.53, which types grpc_health, predates its grpc.aio servicer.)
        self.health: Any = health.aio.HealthServicer()  # type: ignore[attr-defined]
        add_guarded_service(self.server, HEALTH_SERVICE, health_handlers(self.health),
                            check_roles=secure)
        self.health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        if config.health_port is not None:
            # Plaintext, with no role table: it serves nothing but Health.
            self.health_server, self.health_port = create_server(config.host,
                                                                 config.health_port,
                                                                 tls=None)
            add_guarded_service(self.health_server, HEALTH_SERVICE,
                                health_handlers(self.health), check_roles=False)
        self._aggregator_service = aggregator
        self._tls = tls
        self.bulk: BulkServer | None = None
        self.frontends: Frontends | None = None
        if config.frontends:
            # The same services again, for the calls the frontends relay.
            self.frontends = Frontends(config.frontends, config)
            private = self.frontends.server
            add_guarded_service(private, "openfl.director.Director", director_handlers,
                                check_roles=secure, forwarded=True)
            add_guarded_service(private, "fedkube.review.Review", review_handlers,
                                check_roles=secure, forwarded=True)
            add_aggregator_to_server(aggregator, private, check_roles=secure, forwarded=True)
            add_guarded_service(private, HEALTH_SERVICE, health_handlers(self.health),
                                check_roles=secure, forwarded=True)
            frontend_pb2_grpc.add_FrontendServicer_to_server(
                FrontendReports(self.director), private)
        self._flusher: asyncio.Task[None] | None = None
        self.metrics_port: int | None = None
        self.metrics: MetricsServer | None = None

    async def _set_health(self, status: Any) -> None:
        for service in ("", *SERVED):
            await self.health.set(service, status)

    def _resume(self, experiment: ExperimentRecord) -> None:
        """One experiment's aggregator, back after a restart. Whatever its files hold, a
        damaged one (garbage, cut short, gone) fails that experiment with the reason,
        never the director: every other experiment resumes."""
        try:
            self.runner.start(experiment)
        except Exception as exc:
            log.error("experiment %s cannot resume: %s", experiment.name, exc,
                      extra={"experiment": experiment.name})
            self.runner.stop(experiment.name)
            self.director.finish_experiment(experiment.name, ExperimentState.FAILED,
                                            f"cannot resume after a restart: {exc}")

    async def start(self) -> None:
        # Whatever answers Health before the end of start() says NOT_SERVING (the
        # servicer starts out SERVING); the health port answers from now on.
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.health_server is not None:
            await self.health_server.start()
        # Aggregators first: a collaborator calling back right after a restart must find
        # its experiment, resumed from the last closed round.
        for experiment in self.director.resumable():
            self._resume(experiment)
        for experiment in self.director.ran_and_ended():
            self.runner.remember_ended(experiment.name, experiment.collaborators)
        if self.config.bulk_port is not None:
            self.bulk = BulkServer(self.config.host, self.config.bulk_port, tls=self._tls,
                                   handler=AggregatorBulkHandler(self._aggregator_service,
                                                                 asyncio.get_running_loop()))
            self.bulk.start()
            self._aggregator_service.bulk_port = self.bulk.port
        if self.frontends is not None:
            # Before this process serves the port: envoys that connect as soon as it
            # answers must find the frontends there too, or every connection lands here
            # and stays.
            await self.frontends.start(self.port)
        await self.server.start()
        if self.config.metrics_port is not None:
            # Where the director listens, not every interface: the figures name shards
            # and their GPUs (on Kubernetes the director listens on the Pod's IP anyway).
            self.metrics = MetricsServer(self.director, self.config.host,
                                         self.config.metrics_port)
            self.metrics_port = self.metrics.port
            log.info("metrics on %s:%d/metrics", self.config.host, self.metrics_port)
        self._flusher = asyncio.create_task(self._flush_loop())
        mode = "insecure" if self.config.tls.insecure else "mTLS"
        log.info("director listening on %s:%d (%s), data in %s", self.config.host, self.port,
                 mode, self.config.data_dir)
        if self.bulk is not None:
            log.info("bulk model transfers on port %d", self.bulk.port)
        if self.health_port is not None:
            log.info("gRPC health (plaintext) on port %d", self.health_port)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def _flush_loop(self) -> None:
        interval = min(FLUSH_INTERVAL_S, self.director.health_check_period / 2)
        while True:
            await asyncio.sleep(interval)
            self.director.retry_unwritten()
            try:
                await asyncio.to_thread(self.director.flush)
            except Exception:  # never fatal; what it held comes back with the envoys
                log.exception("could not persist registrations and health checks")

    async def stop(self, grace: float | None = 1.0) -> None:
        """Safe after a start() that did not finish (a SIGTERM while starting)."""
        # NOT_SERVING for good (its later set() calls are ignored), on every port, first.
        await self.health.enter_graceful_shutdown()
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        if self.frontends is not None:  # first: they relay to this process
            await self.frontends.stop()
        if self.bulk is not None:  # its threads finish their work on this loop
            await asyncio.to_thread(self.bulk.stop)
        await self.server.stop(grace)
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)
        self.director.close()
        if self.health_server is not None:  # last: probes see NOT_SERVING while it drains
            await self.health_server.stop(None)

    async def serve_forever(self) -> None:
        """Serves until cancelled (SIGTERM, Ctrl-C: fedkube.cli.director), then stops."""
        try:
            await self.start()
            await self.server.wait_for_termination()
        finally:
            await self.stop()
