"""A director frontend: a process that shares the director's public port and answers its
envoys' health checks on a core of its own.

One grpc.aio process tops out near 9,000-10,000 calls/s (benchmarks/health_checks.py,
`grpc-floor`), so a federation of many thousands of envoys checking in every few seconds
needs more than one. The kernel spreads the port's connections over the director and its
frontends (SO_REUSEPORT). A frontend answers `UpdateEnvoyStatus` for the shards it has
seen the director accept, and hands those checks to the director in batches
(`ReportHealth`); every other call it relays, as bytes, to the director over its private
Unix socket (fedkube.transport.forwarding). The director stays the only holder of state.

Run by the director (fedkube.director.frontend_pool), never by hand: the first line of its
stdin is the secret it proves its calls to the director with (fedkube.transport.forwarding);
it exits when its stdin closes, that is when the director stops or dies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import threading
import time

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2

from fedkube.api.config import DirectorConfig
from fedkube.proto import (
    aggregator_pb2,
    director_pb2,
    director_pb2_grpc,
    frontend_pb2,
    frontend_pb2_grpc,
    review_pb2,
    streaming_pb2,
)
from fedkube.transport.forwarding import (
    PRIVATE_OPTIONS,
    Context,
    Metadata,
    Relay,
    UnaryRelay,
    frontend_metadata,
)
from fedkube.transport.guard import Handlers, generated_handlers, guarded_handlers
from fedkube.transport.identity import REASON_HEADER, acting_for_another, caller_identity
from fedkube.transport.server import create_server
from fedkube.transport.tls import TLSFiles
from fedkube.transport.trailers import text_trailers

log = logging.getLogger(__name__)

READY = "ready"  # the line a frontend prints once it serves the public port
# The services of the public port, with the methods their descriptors declare.
SERVICES: tuple[ServiceDescriptor, ...] = (
    director_pb2.DESCRIPTOR.services_by_name["Director"],
    aggregator_pb2.DESCRIPTOR.services_by_name["Aggregator"],
    streaming_pb2.DESCRIPTOR.services_by_name["TensorStream"],
    review_pb2.DESCRIPTOR.services_by_name["Review"],
    # Relayed too: a health check that the kernel hands this process gets the director's
    # own answer (NOT_SERVING while it starts or stops), as on the director's connections.
    health_pb2.DESCRIPTOR.services_by_name["Health"],
)
HEALTH_METHOD = "UpdateEnvoyStatus"
ANSWERED_HERE = (HEALTH_METHOD, "UpdateShardInfo")  # the rest is relayed
MAX_BATCH = 1024  # registrations per call to the director


def report_interval(health_check_period: float) -> float:
    """How often answered checks reach the director: well inside the 2 periods after
    which it counts an envoy offline."""
    return min(0.5, health_check_period / 4)


class RegistrationBatches:
    """Hands registrations to the director many per call: those that arrive while one
    batch is on its way go in the next."""

    def __init__(self, reports: frontend_pb2_grpc.FrontendAsyncStub, *,
                 metadata: Metadata) -> None:
        self._reports = reports
        self._metadata = metadata
        self._waiting: list[tuple[director_pb2.UpdateShardInfoRequest,
                                  asyncio.Future[frontend_pb2.ShardAcknowledgement]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def register(self, request: director_pb2.UpdateShardInfoRequest
                       ) -> frontend_pb2.ShardAcknowledgement:
        """The director's answer (raises the director's error, if the call failed)."""
        answer: asyncio.Future[frontend_pb2.ShardAcknowledgement] = (
            asyncio.get_running_loop().create_future())
        self._waiting.append((request, answer))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send())
        return await answer

    async def _send(self) -> None:
        await asyncio.sleep(0)  # the registrations that arrive in the same turn join
        while self._waiting:
            batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
            try:
                reply = await self._reports.RegisterShards(frontend_pb2.ShardRegistrations(
                    requests=[request for request, _ in batch]), timeout=60,
                    metadata=self._metadata)
            except grpc.aio.AioRpcError as error:
                for _, answer in batch:
                    if not answer.done():
                        answer.set_exception(error)
                continue
            for (_, answer), ack in zip(batch, reply.acknowledgements, strict=True):
                if not answer.done():  # its caller may have gone
                    answer.set_result(ack)


class EnvoyAnswers(director_pb2_grpc.DirectorServicer):
    """Answers the health checks of shards the director has accepted on this frontend's
    connections when they repeat the last status it was sent; the first check of each
    shard, one that changes its status, and any after the director said it no longer
    knows the shard go to the director, which answers NOT_FOUND where due. Registrations
    go to the director in batches."""

    def __init__(self, relay: UnaryRelay, reports: frontend_pb2_grpc.FrontendAsyncStub,
                 *, period: float, tls: bool, metadata: Metadata) -> None:
        self._relay = relay
        self._reports = reports
        self._metadata = metadata  # proves these calls come from a frontend
        self._registrations = RegistrationBatches(reports, metadata=metadata)
        self._tls = tls
        self.period = period
        # Per shard the director has accepted: the last status (UpdateEnvoyStatusRequest
        # bytes) it was sent. A check that says the same is a heartbeat, answered here
        # and reported later; one that changes something (GPUs, a running experiment)
        # goes to the director at once, so its registry never lags a change.
        self.known: dict[str, bytes] = {}
        # Per shard: when its latest check came, the check, and how many came.
        self._answered: dict[str, tuple[float, director_pb2.UpdateEnvoyStatusRequest,
                                        int]] = {}

    async def _require_self(self, context: Context, name: str) -> None:
        """Under mTLS an envoy acts only for the shard in its certificate, as the
        director's own servicer requires."""
        if self._tls and (caller := caller_identity(context, tls=True)) != name:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                acting_for_another(caller, name))

    async def UpdateShardInfo(self, request: director_pb2.UpdateShardInfoRequest,
                              context: Context) -> director_pb2.UpdateShardInfoResponse:
        name = request.shard_info.node_info.name
        await self._require_self(context, name)
        try:
            ack = await self._registrations.register(request)
        except grpc.aio.AioRpcError as error:
            await context.abort(error.code(), error.details() or "")
        if ack.reason:
            context.set_trailing_metadata(text_trailers([(REASON_HEADER, ack.reason)]))
        if ack.accepted:
            self.known[name] = b""  # no status yet: its first check goes to the director
        return director_pb2.UpdateShardInfoResponse(accepted=ack.accepted)

    async def UpdateEnvoyStatus(self, request: director_pb2.UpdateEnvoyStatusRequest,
                                context: Context) -> director_pb2.UpdateEnvoyStatusResponse:
        name = request.name
        await self._require_self(context, name)
        status = request.SerializeToString()
        if self.known.get(name) != status:
            reply = await self._relay(status, context)
            self.known[name] = status  # reached only when the director answered OK
            return director_pb2.UpdateEnvoyStatusResponse.FromString(reply)
        previous = self._answered.get(name)
        self._answered[name] = (time.monotonic(), request, previous[2] + 1 if previous else 1)
        response = director_pb2.UpdateEnvoyStatusResponse()
        response.health_check_period.FromNanoseconds(int(self.period * 1e9))
        return response

    async def report(self) -> None:
        """Hands the checks answered since the last report to the director."""
        if not self._answered:
            return
        answered, self._answered = self._answered, {}
        now = time.monotonic()
        reply = await self._reports.ReportHealth(frontend_pb2.HealthReport(checks=[
            frontend_pb2.HealthCheck(request=request, age_s=now - at, count=count)
            for at, request, count in answered.values()]), timeout=30,
            metadata=self._metadata)
        for name in reply.unknown:
            self.known.pop(name, None)
        self.period = reply.health_check_period_s


def public_handlers(relay: Relay, health: EnvoyAnswers, *, tls: bool) -> dict[str, Handlers]:
    """Per service: every method relayed, but health checks answered here and
    registrations batched from here."""
    services: dict[str, Handlers] = {}
    for descriptor in SERVICES:
        service = descriptor.full_name
        services[service] = {
            method.name: relay.handler(f"/{service}/{method.name}",
                                       request_streaming=method.client_streaming,
                                       response_streaming=method.server_streaming)
            for method in descriptor.methods}
    director = "openfl.director.Director"
    generated = generated_handlers(director_pb2_grpc.add_DirectorServicer_to_server, health)
    answered = {name: generated[name] for name in ANSWERED_HERE}
    # Under mTLS the role table runs here for what is answered here; the director runs it
    # for what is relayed.
    services[director].update(guarded_handlers(director, answered, check_roles=tls))
    return services


async def serve(config: DirectorConfig, port: int, socket: str, secret: str) -> None:
    tls = TLSFiles.load(config.tls)
    channel = grpc.aio.insecure_channel(f"unix:{socket}", options=PRIVATE_OPTIONS)
    relay = Relay(channel, secret)
    # The generated base answers UNIMPLEMENTED for the methods EnvoyAnswers leaves out (its
    # stub calls them abstract); public_handlers relays those instead.
    health = EnvoyAnswers(  # type: ignore[abstract]
        relay.unary(f"/openfl.director.Director/{HEALTH_METHOD}"),
        frontend_pb2_grpc.FrontendStub(channel),
        period=config.health_check_period, tls=tls is not None,
        metadata=frontend_metadata(secret))
    server, _ = create_server(config.host, port, tls=tls)
    for service, handlers in public_handlers(relay, health, tls=tls is not None).items():
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service,
                                                                              handlers)])
        server.add_registered_method_handlers(service, handlers)  # type: ignore[attr-defined]
    await server.start()
    print(READY, flush=True)
    closed = _stdin_closed()
    interval = report_interval(config.health_check_period)
    try:
        while not closed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closed.wait(), timeout=interval)
            try:
                await health.report()
            except grpc.aio.AioRpcError as error:  # the director is stopping, or busy
                log.warning("could not report health checks to the director: %s",
                            error.details())
    finally:
        await server.stop(1.0)
        await channel.close(None)


def _stdin_closed() -> asyncio.Event:
    """Set when stdin reaches its end: the director closed it, or died."""
    loop, closed = asyncio.get_running_loop(), asyncio.Event()

    def watch() -> None:
        sys.stdin.buffer.read()
        with contextlib.suppress(RuntimeError):  # the loop already ended
            loop.call_soon_threadsafe(closed.set)

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()
    return closed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config-json", required=True, help="the director's configuration")
    parser.add_argument("--port", type=int, required=True, help="the port the director bound")
    parser.add_argument("--socket", required=True, help="the director's private socket")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s frontend %(levelname)s %(name)s: %(message)s")
    config = DirectorConfig.model_validate_json(args.config_json)
    # Not in argv, which every user can read (/proc/PID/cmdline).
    secret = sys.stdin.buffer.readline().decode().strip()
    if not secret:
        parser.error("no secret on stdin: frontends are started by the director")
    asyncio.run(serve(config, args.port, args.socket, secret))


if __name__ == "__main__":
    main()
