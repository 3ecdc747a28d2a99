"""The envoy agent: shard registration, health checks, experiment dispatch.

Every call to the director is retried with exponential backoff and jitter while the
director is away (capped at the health-check period, so an envoy is back online within
two periods of the director's return); the health loop never dies of an outage.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter

from fedkube.api.config import EnvoyConfig
from fedkube.api.errors import FedkubeError, RefusedError
from fedkube.api.policy import ShardPolicy
from fedkube.envoy_agent import approvals
from fedkube.envoy_agent.health import BEAT_S, Beat, write_beat
from fedkube.envoy_agent.nvml import NvmlMonitor
from fedkube.envoy_agent.runtime import CollaboratorFailed, CollaboratorJob, Runtime
from fedkube.kube.shard_answers import read_answer
from fedkube.openfl.workspace import is_openfl_archive, prefers_cuda
from fedkube.proto import director_pb2, director_pb2_grpc, review_pb2, review_pb2_grpc
from fedkube.review.plan_review import Verdict, describe, review
from fedkube.tasks.archive import read_plan
from fedkube.tasks.shard import ShardDescriptor
from fedkube.transport.certs import renewal_delay
from fedkube.transport.channel import open_channel
from fedkube.transport.identity import REASON_HEADER
from fedkube.transport.status import is_transient
from fedkube.transport.tls import TLSFiles
from fedkube.transport.trailers import unescape

log = logging.getLogger(__name__)
T = TypeVar("T")

CALL_TIMEOUT_S = 15.0
# Between certificate renewals at least this long, whatever renew_before_s says.
MIN_RENEWAL_INTERVAL_S = 1.0
RENEWAL_RETRY_S = 30.0


# How often a shard waiting for its data owner looks at its Shard object (Kubernetes) and
# checks that the experiment still runs.
ANSWER_CHECK_S = 2.0
_DECISIONS = {"accepted": review_pb2.ACCEPTED, "refused": review_pb2.REFUSED,
              "awaiting": review_pb2.AWAITING}


class ShardRefused(RefusedError):
    """The director does not accept this shard (wrong shapes); retrying will not help."""


class EnvoyAgent:
    def __init__(self, config: EnvoyConfig, shard: ShardDescriptor, *,
                 runtime: Runtime | None = None, monitor: NvmlMonitor | None = None,
                 renew_certificate: Callable[[], None] | None = None,
                 policy: ShardPolicy | None = None) -> None:
        """renew_certificate, where the envoy requests its own certificate: obtains a new
        one into config.tls's cert and key files (blocking; run on a thread)."""
        self.config = config
        self.policy = policy or ShardPolicy()
        self.shard = shard
        self.runtime = runtime
        self.monitor = monitor or NvmlMonitor(config.cuda_devices)
        self.name = config.name
        self.period = 1.0  # until the director says otherwise
        self.running_experiment: str | None = None
        self._director_down = False
        self._renew_certificate = renew_certificate
        self._closing: set[asyncio.Task[None]] = set()
        self._channel, self._stub = self._connect()
        self.registered = asyncio.Event()
        self.last_check: float | None = None  # when the director last answered a check

    def _connect(self) -> tuple[grpc.aio.Channel, director_pb2_grpc.DirectorAsyncStub]:
        """A channel with the certificate now in the configured files, and its stub."""
        # Our own backoff decides when to retry; gRPC's reconnect backoff (up to 120 s by
        # default) must not hold a returning director at bay for longer.
        channel = open_channel(
            self.config.director, tls=TLSFiles.load(self.config.tls),
            client_id=self.config.name,
            options=[("grpc.initial_reconnect_backoff_ms", 100),
                     ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000)])
        return channel, director_pb2_grpc.DirectorStub(channel)

    # -- retries ------------------------------------------------------------------------

    def _log_retry(self, state: RetryCallState) -> None:
        if not self._director_down:
            self._director_down = True
            exc = state.outcome.exception() if state.outcome else None
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else exc
            log.warning("director %s unreachable (%s); retrying with backoff",
                        self.config.director, detail)

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Calls fn until it succeeds or fails with a non-transient error."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(is_transient),
            wait=wait_exponential_jitter(multiplier=0.2, max=min(self.config.max_backoff,
                                                              self.period)),
            before_sleep=self._log_retry, reraise=True,
        ):
            with attempt:
                result = await fn()
        if self._director_down:
            self._director_down = False
            log.info("director %s is reachable again", self.config.director)
        return result

    # -- registration and health --------------------------------------------------------

    def shard_info(self) -> director_pb2.ShardInfo:
        return director_pb2.ShardInfo(
            node_info=director_pb2.NodeInfo(name=self.name, cuda_devices=self.monitor.devices()),
            shard_description=self.shard.dataset_description, n_samples=len(self.shard),
            sample_shape=self.shard.sample_shape, target_shape=self.shard.target_shape)

    async def register(self) -> None:
        request = director_pb2.UpdateShardInfoRequest(shard_info=self.shard_info())

        async def call() -> tuple[director_pb2.UpdateShardInfoResponse, str]:
            invocation = self._stub.UpdateShardInfo(request, timeout=CALL_TIMEOUT_S)
            response = await invocation
            trailers = await invocation.trailing_metadata()
            reason = unescape(dict(trailers or ()).get(REASON_HEADER, ""))
            return response, str(reason)

        response, reason = await self._call(call)
        if not response.accepted:
            raise ShardRefused(reason or "the director did not accept the shard "
                               "(its sample/target shapes differ from the federation's)")
        log.info("shard %s registered with director %s", self.name, self.config.director)
        self.registered.set()

    async def _register_again(self) -> None:
        """The director answered NOT_FOUND for this shard: it lost the registration (a
        crash before writing it, a new store), so this envoy registers again."""
        log.warning("director forgot shard %s; registering again", self.name)
        await self.register()

    async def health_check(self) -> None:
        request = director_pb2.UpdateEnvoyStatusRequest(
            name=self.name, is_experiment_running=self.running_experiment is not None,
            cuda_devices=self.monitor.devices())
        try:
            response = await self._call(
                lambda: self._stub.UpdateEnvoyStatus(request, timeout=CALL_TIMEOUT_S))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            await self._register_again()
            return
        period = response.health_check_period.ToTimedelta().total_seconds()
        if period > 0:
            self.period = period
        self.last_check = time.time()

    async def health_loop(self) -> None:
        while True:
            await self.health_check()
            await asyncio.sleep(self.period)

    # -- experiments --------------------------------------------------------------------

    async def _download(self, experiment: str, target: Path) -> None:
        async def call() -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            request = director_pb2.GetExperimentDataRequest(experiment_name=experiment,
                                                            collaborator_name=self.name)
            with target.open("wb") as sink:
                async for chunk in self._stub.GetExperimentData(request):
                    sink.write(chunk.npbytes)

        await self._call(call)

    async def run_experiment(self, experiment: str) -> None:
        work_dir = self.config.work_dir / experiment
        archive = work_dir / "archive.zip"
        await self._download(experiment, archive)
        log.info("experiment %s: archive received (%d bytes)", experiment,
                 archive.stat().st_size)
        verdict = await self.review_experiment(experiment, archive)
        if verdict.decision != "accepted":
            log.warning("experiment %s: not run on this shard: %s", experiment, verdict.reason,
                        extra={"experiment": experiment})
            return
        if self.runtime is None:
            raise CollaboratorFailed("this envoy has no collaborator runtime")
        devices = tuple(self.config.cuda_devices)
        if is_openfl_archive(archive):
            # OpenFL's envoy hands its collaborator all its CUDA devices, used if the plan
            # prefers CUDA.
            gpus = len(devices) if prefers_cuda(archive) else 0
            resources = None
        else:
            plan = read_plan(archive)
            gpus, resources = plan.gpus_per_collaborator, plan.collaborator_resources
        job = CollaboratorJob(experiment=experiment, collaborator=self.name, archive=archive,
                              work_dir=work_dir, cuda_devices=devices, gpus=gpus,
                              resources=resources)
        limit = self.policy.max_wall_time_seconds
        try:
            # Cancelling the run stops the collaborator (and all it started) before
            # this returns, as at the envoy's own stop.
            async with asyncio.timeout(limit):
                await self.runtime.run(job)
        except TimeoutError:
            raise CollaboratorFailed(
                f"shard policy: the collaborator ran past the {limit} s its data owner "
                f"allows (maxWallTimeSeconds); stopped") from None

    # -- the data owner's review ----------------------------------------------------------

    async def review_experiment(self, experiment: str, archive: Path) -> Verdict:
        """The shard policy's verdict on an experiment dispatched here, the data owner's
        answer when the policy leaves it to them; told to the director either way (which
        the model owner sees), and binding here whatever the director does with it."""
        described = await self._describe(experiment)
        owner = described.owner if described is not None else ""
        try:
            submission = await asyncio.to_thread(describe, archive, experiment, owner)
            verdict = await asyncio.to_thread(review, self.policy, submission)
        except FedkubeError as exc:
            verdict = Verdict("refused", f"the shard cannot review this experiment: {exc}")
            submission = None
        if verdict.decision == "awaiting" and submission is not None:
            approvals.post(self.config.work_dir, experiment, {
                "owner": owner, "task": submission.task, "rounds": submission.rounds,
                "gpus": submission.gpus, "digest": submission.digest,
                "user_code": submission.user_code, "requirements": submission.requirements})
            log.warning("experiment %s from %s waits for the data owner: fedkube shard "
                        "approve|refuse %s --work-dir %s", experiment, owner or "?",
                        experiment, self.config.work_dir, extra={"experiment": experiment})
            await self._decide(experiment, verdict)
            verdict = await self._owners_answer(experiment)
        await self._decide(experiment, verdict)
        return verdict

    async def _owners_answer(self, experiment: str) -> Verdict:
        """The data owner's answer (`fedkube shard approve|refuse` on this machine, or on
        Kubernetes the Shard's annotations), or a refusal once the experiment has ended
        meanwhile."""
        waiting = asyncio.get_running_loop().create_task(
            approvals.wait_for_answer(self.config.work_dir, experiment))
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=ANSWER_CHECK_S)
                answer = waiting.result() if done else await self._shard_answer(experiment)
                if answer is not None:
                    approvals.withdraw(self.config.work_dir, experiment)
                    text = answer.reason or ("approved" if answer.decision == "accepted"
                                             else "refused") + " by the data owner"
                    return Verdict("accepted" if answer.decision == "accepted" else "refused",
                                   text)
                described = await self._describe(experiment)
                if described is not None and described.status != "in_progress":
                    approvals.withdraw(self.config.work_dir, experiment)
                    return Verdict("refused", f"the experiment is {described.status}")
        finally:
            waiting.cancel()

    async def _shard_answer(self, experiment: str) -> approvals.Answer | None:
        """The answer in this shard's Shard object, where it has one (Kubernetes)."""
        namespace = self.config.shard_namespace
        if namespace is None:
            return None
        try:
            found = await asyncio.to_thread(read_answer, namespace, self.name, experiment)
        except Exception as exc:  # the API away or the Shard gone: files still answer
            log.warning("cannot read Shard %s/%s for an answer: %s", namespace, self.name,
                        exc)
            return None
        return approvals.Answer(*found) if found is not None else None

    async def _describe(self, experiment: str) -> review_pb2.DescribeResponse | None:
        """Who submitted the experiment, and its status; None from a director that has no
        review service (OpenFL's)."""
        stub = review_pb2_grpc.ReviewStub(self._channel)
        try:
            return await self._call(lambda: stub.Describe(
                review_pb2.DescribeRequest(experiment_name=experiment, shard_name=self.name),
                timeout=CALL_TIMEOUT_S))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            return None

    async def _decide(self, experiment: str, verdict: Verdict) -> None:
        stub = review_pb2_grpc.ReviewStub(self._channel)
        request = review_pb2.DecideRequest(
            experiment_name=experiment, shard_name=self.name,
            decision=_DECISIONS[verdict.decision], reason=verdict.reason[:2000])
        try:
            await self._call(lambda: stub.Decide(request, timeout=CALL_TIMEOUT_S))
        except grpc.aio.AioRpcError as exc:  # an OpenFL director; an experiment ended
            log.info("experiment %s: the director took no decision: %s", experiment,
                     exc.details())

    async def experiment_loop(self) -> None:
        await self.registered.wait()
        while True:
            try:
                response = await self._call(lambda: self._stub.WaitExperiment(
                    director_pb2.WaitExperimentRequest(collaborator_name=self.name)))
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                await self._register_again()
                continue
            experiment = response.experiment_name
            log.info("experiment %s dispatched to %s", experiment, self.name)
            self.running_experiment = experiment
            try:
                await self.run_experiment(experiment)
                log.info("experiment %s: collaborator finished", experiment)
            except CollaboratorFailed as exc:
                log.error("experiment %s: collaborator failed: %s", experiment, exc)
                await self._report_failure(experiment, exc.code, str(exc))
            except grpc.aio.AioRpcError as exc:
                log.error("experiment %s: %s", experiment, exc.details())
                await self._report_failure(experiment, 2, f"envoy error: {exc.details()}")
            except Exception as exc:  # the envoy outlives any one experiment
                log.exception("experiment %s: envoy error", experiment)
                await self._report_failure(experiment, 2, f"envoy error: {exc}")
            finally:
                self.running_experiment = None
                shutil.rmtree(self.config.work_dir / experiment, ignore_errors=True)

    async def _report_failure(self, experiment: str, code: int, description: str) -> None:
        request = director_pb2.SetExperimentFailedRequest(
            experiment_name=experiment, collaborator_name=self.name, error_code=code,
            error_description=description[:4000])
        try:
            await self._call(lambda: self._stub.SetExperimentFailed(request,
                                                                    timeout=CALL_TIMEOUT_S))
        except grpc.aio.AioRpcError as exc:
            log.error("could not report the failure of %s: %s", experiment, exc.details())

    # -- certificate --------------------------------------------------------------------

    async def certificate_loop(self) -> None:
        """Renews this envoy's certificate before it expires and reconnects with the new
        one. A failed renewal keeps the current certificate and is tried again."""
        assert self._renew_certificate is not None and self.config.tls.cert is not None
        while True:
            delay = renewal_delay(self.config.tls.cert.read_bytes(),
                                  renew_before_s=self.config.tls.renew_before_s)
            await asyncio.sleep(max(delay, MIN_RENEWAL_INTERVAL_S))
            try:
                await asyncio.to_thread(self._renew_certificate)
            except Exception as exc:  # the operator away, a denial, the API server down
                log.error("could not renew the certificate of shard %s (%s); trying again "
                          "in %.0f s", self.name, exc, RENEWAL_RETRY_S)
                await asyncio.sleep(RENEWAL_RETRY_S)
                continue
            self._reconnect()
            log.info("certificate of shard %s renewed; reconnected with it", self.name)

    def _reconnect(self) -> None:
        old = self._channel
        self._channel, self._stub = self._connect()
        # Calls in flight on the old channel finish within the grace period, or are
        # cancelled and retried on the new one (CANCELLED is transient).
        closing = asyncio.get_running_loop().create_task(old.close(CALL_TIMEOUT_S))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    # -- lifetime -----------------------------------------------------------------------

    async def heartbeat_loop(self) -> None:
        """The file the envoy's probes read (fedkube.envoy_agent.health)."""
        while True:
            try:
                write_beat(self.config.work_dir, Beat(
                    at=time.time(), registered=self.registered.is_set(),
                    last_check=self.last_check, period=self.period))
            except OSError as exc:  # a full disk: the liveness probe will say so
                log.warning("cannot write the envoy's health file: %s", exc)
            await asyncio.sleep(BEAT_S)

    async def run(self) -> None:
        """Registers, then checks in and serves experiments until cancelled."""
        heartbeat = asyncio.get_running_loop().create_task(self.heartbeat_loop())
        try:
            await self.register()
            async with asyncio.TaskGroup() as group:
                group.create_task(self.health_loop())
                group.create_task(self.experiment_loop())
                if self._renew_certificate is not None:
                    group.create_task(self.certificate_loop())
        finally:
            heartbeat.cancel()
            await self.close()

    async def close(self) -> None:
        await self._channel.close(None)
        for closing in list(self._closing):
            closing.cancel()
        self.monitor.close()
