"""The director's side of its frontend processes (fedkube.director.frontend_process): starting and
stopping them, and the private server they relay calls and report health checks to."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import grpc

from fedkube.api.config import DirectorConfig
from fedkube.api.errors import NotFoundError
from fedkube.director import metrics
from fedkube.director.core import Director
from fedkube.director.frontend_process import READY
from fedkube.proto import frontend_pb2, frontend_pb2_grpc
from fedkube.transport.forwarding import (
    PRIVATE_OPTIONS,
    SECRET_HEADER,
    Context,
    forget_frontend_secret,
    is_frontend_secret,
    new_frontend_secret,
)
from fedkube.transport.limits import SERVER_OPTIONS

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
RESTART_BACKOFF_S = 5.0


async def _require_frontend(context: Context) -> None:
    """Only a frontend the director started, which holds its secret, reports here: the
    socket alone would let any process of this user register any shard."""
    secret = next((value for key, value in context.invocation_metadata() or ()
                   if key == SECRET_HEADER), None)
    if not is_frontend_secret(secret):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "only the director's own frontends report here (no valid "
                            "frontend secret)")


class FrontendReports(frontend_pb2_grpc.FrontendServicer):
    """Takes what frontends hand over: the health checks they answered, recorded as if
    they had come here, and their envoys' registrations, in batches."""

    def __init__(self, director: Director) -> None:
        self.director = director

    async def ReportHealth(self, report: frontend_pb2.HealthReport,
                           context: Context) -> frontend_pb2.HealthReportReply:
        await _require_frontend(context)
        unknown, answered = [], 0
        for check in report.checks:
            request = check.request
            try:
                self.director.update_envoy_status(
                    request.name, is_experiment_running=request.is_experiment_running,
                    cuda_devices=request.cuda_devices, age_s=max(check.age_s, 0.0))
            except NotFoundError:
                unknown.append(request.name)
            else:
                answered += max(check.count, 1)
        metrics.HEALTH_CHECKS.inc(answered)
        metrics.FRONTEND_HEALTH_CHECKS.inc(answered)
        return frontend_pb2.HealthReportReply(
            unknown=unknown, health_check_period_s=self.director.health_check_period)

    async def RegisterShards(self, registrations: frontend_pb2.ShardRegistrations,
                             context: Context) -> frontend_pb2.ShardAcknowledgements:
        await _require_frontend(context)
        acknowledgements = []
        for request in registrations.requests:
            ack = self.director.acknowledge_shard(request.shard_info)
            acknowledgements.append(frontend_pb2.ShardAcknowledgement(
                accepted=ack.accepted, reason=ack.reason or ""))
        metrics.FRONTEND_REGISTRATIONS.inc(len(acknowledgements))
        metrics.FRONTEND_REGISTRATION_BATCHES.inc()
        return frontend_pb2.ShardAcknowledgements(acknowledgements=acknowledgements)


def private_server_options() -> list[tuple[str, int]]:
    """The public server's queueing, and no message limit the public port does not set."""
    sizes = {key for key, _ in PRIVATE_OPTIONS}
    return [*(o for o in SERVER_OPTIONS if o[0] not in sizes), *PRIVATE_OPTIONS]


class Frontends:
    """`count` frontend processes on the director's public port, and the private server on
    a Unix socket in a directory only this user can enter."""

    def __init__(self, count: int, config: DirectorConfig) -> None:
        self.count = count
        self.config = config
        self.server = grpc.aio.server(options=private_server_options())
        self._dir = Path(tempfile.mkdtemp(prefix="fedkube-director-"))  # mode 0700
        self.socket = str(self._dir / "private.sock")
        if self.server.add_insecure_port(f"unix:{self.socket}") == 0:
            raise OSError(f"cannot listen on {self.socket}")
        self.processes: list[asyncio.subprocess.Process] = []
        self._keepers: list[asyncio.Task[None]] = []
        # What the frontends prove their calls with: handed to each on its stdin.
        self.secret = new_frontend_secret()

    async def start(self, port: int) -> None:
        """Starts the private server, then the frontends on `port`; returns once each of
        them serves it. A frontend that dies is started again."""
        await self.server.start()
        self.processes = list(await asyncio.gather(*(self.spawn(port)
                                                     for _ in range(self.count))))
        self._keepers = [asyncio.create_task(self._keep(slot, port))
                         for slot in range(self.count)]
        log.info("%d frontends share port %d", self.count, port)

    async def _keep(self, slot: int, port: int) -> None:
        """Starts another frontend when this slot's dies (its envoys reconnect to the
        other processes on the port meanwhile, so nothing is lost)."""
        while True:
            process = self.processes[slot]
            code = await process.wait()
            log.warning("director frontend %d (pid %d) exited with %s; starting another",
                        slot, process.pid, code)
            metrics.FRONTEND_RESTARTS.inc()
            while True:
                try:
                    self.processes[slot] = await self.spawn(port)
                    break
                except RuntimeError:
                    log.exception("could not start director frontend %d; trying again in "
                                  "%g s", slot, RESTART_BACKOFF_S)
                    await asyncio.sleep(RESTART_BACKOFF_S)  # back off, not a wait on state

    async def spawn(self, port: int) -> asyncio.subprocess.Process:
        """One frontend on `port`, once it serves it. (Tests also give one a port of its
        own, to reach the director only through it.)"""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fedkube.director.frontend_process",
            "--config-json", self.config.model_dump_json(), "--port", str(port),
            "--socket", self.socket,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert process.stdin is not None and process.stdout is not None
        try:
            process.stdin.write(f"{self.secret}\n".encode())
            await asyncio.wait_for(process.stdin.drain(), START_TIMEOUT_S)
            line = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT_S)
        except (TimeoutError, ConnectionError):  # it died before reading its secret
            line = b""
        if line.decode().strip() != READY:
            await stop_frontend(process)
            raise RuntimeError(f"a director frontend did not start on port {port} (exit "
                               f"code {process.returncode}); its log is above")
        return process

    async def stop(self) -> None:
        for keeper in self._keepers:
            keeper.cancel()
        await asyncio.gather(*self._keepers, return_exceptions=True)
        await asyncio.gather(*(stop_frontend(process) for process in self.processes))
        self.processes.clear()
        await self.server.stop(1.0)
        forget_frontend_secret(self.secret)
        shutil.rmtree(self._dir, ignore_errors=True)


async def stop_frontend(process: asyncio.subprocess.Process) -> None:
    if process.stdin is not None:
        process.stdin.close()  # a frontend exits when its stdin ends
    try:
        await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
