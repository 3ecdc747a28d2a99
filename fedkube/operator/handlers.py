"""kopf handlers: read the resource, call the pure builders, write back.

Besides the handlers of Federations, Shards, Experiments and shard certificate requests:
the startup and cleanup handlers, which set up kopf and make and close the operator's
state in its memo (clients, caches, threads: fedkube.operator.state); the indexes kopf
keeps of every Federation, Shard and followed Experiment; and the timers through which
each Federation polls its director for all of its Shards and Experiments.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import kopf
from pydantic import ValidationError

from fedkube.api.resources import GROUP, VERSION, ExperimentSpec, FederationSpec, ShardSpec
from fedkube.client import DirectorClient, EnvoyView
from fedkube.kube.csr import SIGNER
from fedkube.operator.conditions import is_true, set_condition
from fedkube.operator.events import post_event, quiet_kopf, rpc_error
from fedkube.operator.experiments import build_plan, build_status, director_name
from fedkube.operator.federations import (
    Verdict,
    director_availability,
    federation_conditions,
    ready_changed,
)
from fedkube.operator.manifests import (
    build_ca_bundle,
    build_envoy_config,
    build_federation_workloads,
    build_tls_secret,
    director_endpoint,
    labels,
    names,
    node_conflicts,
)
from fedkube.operator.metrics import EXPERIMENT_PHASES, observed
from fedkube.operator.shards import build_shard_status, status_changes
from fedkube.operator.signer import (
    account_namespace,
    find_requester,
    is_decided,
    review_request,
)
from fedkube.operator.state import (
    OPERATOR_IDENTITY,
    FederationIndex,
    FederationMissing,
    OperatorState,
    close_state,
    open_state,
    state_of,
)
from fedkube.transport import certs

log = logging.getLogger(__name__)
EXPERIMENT_POLL_S = 1.0
SHARD_POLL_S = 5.0
DIRECTOR_CHECK_S = 5.0
# Deleting an Experiment the director accepted waits this long for the director to forget
# it, then lets it go with a Warning (its data stays on the director).
REMOVE_GIVE_UP_S = 60.0
FINAL_PHASES = ("Succeeded", "Failed")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Our CRD schemas prune unknown status fields: keep kopf's bookkeeping in annotations.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.persistence.finalizer = f"{GROUP}/director-data"
    settings.posting.level = logging.WARNING  # kopf's own handler logs stay out of Events
    settings.watching.server_timeout = 300
    # Handlers mostly wait on the apiserver and the director: more of them at once.
    settings.execution.max_workers = 32
    quiet_kopf()  # timers' success lines to DEBUG, the waits we ask for to INFO
    open_state(memo)


@kopf.on.cleanup()
def cleanup(memo: kopf.Memo, **_: Any) -> None:
    close_state(memo)  # the state's clients and threads


# -- Federation ---------------------------------------------------------------------------

def _issue_secrets(state: OperatorState, name: str, namespace: str, owner: kopf.Body
                   ) -> None:
    """A CA and certificates for the director and the operator, issued once, and the CA
    certificate for everyone. Envoys request a certificate for their own shard
    (sign_shard_certificate below)."""
    kube, n = state.kube, names(name)
    existing = kube.read_secret(namespace, n.ca)
    if existing is None:
        ca = certs.create_ca(f"{name}-ca")
        kube.create_if_absent(build_tls_secret(n.ca, namespace, name, ca_pem=ca.cert_pem,
                                               cert_pem=ca.cert_pem, key_pem=ca.key_pem))
        existing = kube.read_secret(namespace, n.ca)
    assert existing is not None
    ca = certs.KeyPair(cert_pem=existing["tls.crt"], key_pem=existing["tls.key"])
    director_host = n.director
    wanted = {
        n.director_tls: certs.issue(ca, director_host, hosts=[
            director_host, f"{director_host}.{namespace}", f"{director_host}.{namespace}.svc",
            "localhost", "127.0.0.1"], role="director"),
        n.operator_tls: certs.issue(ca, OPERATOR_IDENTITY, role="admin"),
    }
    for secret, pair in wanted.items():
        kube.create_if_absent(build_tls_secret(secret, namespace, name, ca_pem=ca.cert_pem,
                                               cert_pem=pair.cert_pem, key_pem=pair.key_pem))
    bundle = build_ca_bundle(name, namespace, ca.cert_pem)
    kopf.adopt(bundle, owner=owner)
    kube.apply(bundle)


def _render_envoy_config(state: OperatorState, federation: str, namespace: str) -> None:
    """Renders the federation's envoy ConfigMap from its current spec and all its Shards,
    soon and off this handler's thread; a burst of Shard changes shares renders, and
    their reads (fedkube.operator.coalesce)."""
    kube = state.kube

    def render() -> None:
        owner = kube.get_custom("federations", namespace, federation)
        if owner is None:  # deleted since: its ConfigMap goes with it
            return
        shards = {}
        for item in kube.list_custom("shards", namespace):
            if item.get("spec", {}).get("federation") != federation:
                continue
            try:  # one bad Shard (from before the CRD checked it) blocks no other
                shards[item["metadata"]["name"]] = ShardSpec.model_validate(item["spec"])
            except ValidationError as exc:
                log.warning("shard %s/%s left out of the envoys' config: %s", namespace,
                            item["metadata"]["name"], exc)
        for shard_name, reason in node_conflicts(
                {n: s.node_name for n, s in shards.items()}).items():
            log.warning("shard %s/%s left out of the envoys' config: %s", namespace,
                        shard_name, reason)
        manifest = build_envoy_config(federation, namespace,
                                      FederationSpec.model_validate(owner["spec"]), shards)
        kopf.adopt(manifest, owner=kopf.Body(owner))  # type: ignore[arg-type]
        kube.apply(manifest)

    state.envoy_configs.request((namespace, federation), render)


@kopf.on.resume(GROUP, VERSION, "federations")
@kopf.on.create(GROUP, VERSION, "federations")
@kopf.on.update(GROUP, VERSION, "federations")
@observed("Federation")
def reconcile_federation(name: str, namespace: str | None, spec: kopf.Spec, body: kopf.Body,
                         status: kopf.Status, meta: kopf.Meta, patch: kopf.Patch,
                         memo: kopf.Memo, **_: Any) -> None:
    namespace, state = namespace or "default", state_of(memo)
    fed = FederationSpec.model_validate(dict(spec))
    if fed.tls == "mtls":
        _issue_secrets(state, name, namespace, body)
    for manifest in build_federation_workloads(name, namespace, fed):
        kopf.adopt(manifest, owner=body)
        state.kube.apply(manifest)
    _render_envoy_config(state, name, namespace)
    generation = int(meta.get("generation", 0))
    patch.status["directorEndpoint"] = director_endpoint(name, namespace, fed)
    patch.status["observedGeneration"] = generation
    # Applied is not Ready: the director's Deployment and its answers say that
    # (check_director, every DIRECTOR_CHECK_S).
    if not status.get("conditions"):
        patch.status["conditions"] = set_condition(
            [], "Ready", None, "Reconciling",
            "director, envoys and certificates applied; the director not checked yet",
            generation=generation)


@kopf.timer(GROUP, VERSION, "federations", interval=DIRECTOR_CHECK_S, idle=0)
@observed("Federation")
def check_director(name: str, namespace: str | None, spec: kopf.Spec, status: kopf.Status,
                   meta: kopf.Meta, body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo,
                   **kwargs: Any) -> None:
    """DirectorAvailable from the director's Deployment (and, while it is not available,
    why, from its Pods); Ready once the director answers. A Ready that changes reason gets
    an Event."""
    namespace, state = namespace or "default", state_of(memo)
    fed = FederationSpec.model_validate(dict(spec))
    deployment = state.kube.read_deployment(namespace, names(name).director)
    available = director_availability(deployment, [] if deployment is None or is_true(
        list((deployment.get("status") or {}).get("conditions") or []), "Available")
        else state.kube.list_pods(namespace, labels(name, "director")))
    endpoint = director_endpoint(name, namespace, fed)
    answer: Verdict | None = None
    # Behind the Service, a director whose Deployment is not available cannot answer.
    if fed.director_endpoint or available.status:
        try:
            envoys = _registry(state, namespace, name,
                               state.directors.get(namespace, name, kwargs[INDEX]))
            online = sum(e.online for e in envoys.values())
            answer = Verdict(True, "DirectorAnswering",
                             f"the director at {endpoint} answers: {len(envoys)} shards "
                             f"registered, {online} online")
        except FederationMissing:  # being deleted
            return
        except kopf.TemporaryError as exc:  # its certificates are not issued yet
            answer = Verdict(False, "CertificatesPending", str(exc))
        except grpc.RpcError as exc:
            answer = Verdict(False, "DirectorUnreachable", f"{endpoint}: {rpc_error(exc)}")
    before = list(status.get("conditions", []))
    after = federation_conditions(before, available, answer,
                                  generation=int(meta.get("generation", 0)))
    if after != before:
        patch.status["conditions"] = after
    changed = ready_changed(before, after)
    if changed is not None:
        ready = changed["status"] == "True"
        (log.info if ready else log.warning)(
            "federation %s/%s: Ready=%s %s: %s", namespace, name, changed["status"],
            changed["reason"], changed["message"])
        post_event(state.recent, body, type="Normal" if ready else "Warning",
                   reason=changed["reason"], message=changed["message"])


# -- talking to a federation's director ----------------------------------------------------

INDEX = "federations"  # kopf passes the index below to handlers under its function name


@kopf.index(GROUP, VERSION, "federations")
def federations(namespace: str | None, name: str, spec: kopf.Spec, **_: Any
                ) -> dict[tuple[str, str], dict[str, Any]]:
    """Every Federation's spec in memory, kept current by kopf's watch: handlers look
    them up here instead of asking the apiserver on each poll."""
    return {(namespace or "default", name): dict(spec)}


def _registry(state: OperatorState, namespace: str, federation: str,
              director: DirectorClient) -> dict[str, EnvoyView]:
    return state.registry.get((namespace, federation),
                              lambda: {envoy.name: envoy for envoy in director.envoys()})


# -- Shard --------------------------------------------------------------------------------

@kopf.on.resume(GROUP, VERSION, "shards")
@kopf.on.create(GROUP, VERSION, "shards")
@kopf.on.update(GROUP, VERSION, "shards", field="spec")
@observed("Shard")
def place_shard(spec: kopf.Spec, namespace: str | None, status: kopf.Status, patch: kopf.Patch,
                memo: kopf.Memo, **kwargs: Any) -> None:
    namespace = namespace or "default"
    shard = ShardSpec.model_validate(dict(spec))
    # From the index, not the apiserver: 1,000 Shards at once made 1,000 reads.
    if not kwargs[INDEX].get((namespace, shard.federation)):
        patch.status["conditions"] = set_condition(
            list(status.get("conditions", [])), "Ready", False, "FederationNotFound",
            f"Federation {shard.federation!r} does not exist in {namespace!r}")
        return
    _render_envoy_config(state_of(memo), shard.federation, namespace)


# -- shard certificates -------------------------------------------------------------------

def _for_our_signer(spec: kopf.Spec, **_: Any) -> bool:
    return spec.get("signerName") == SIGNER


@kopf.on.event("certificates.k8s.io", "v1", "certificatesigningrequests", when=_for_our_signer)
@observed("CertificateSigningRequest")
def sign_shard_certificate(name: str, spec: kopf.Spec, status: kopf.Status, memo: kopf.Memo,
                           **kwargs: Any) -> None:
    """Signs an envoy's or collaborator's request for its shard's certificate after
    checking, from its Pod's token, that it runs on the shard's node (fedkube.operator.
    signer); denies it with the reason otherwise. Requests from namespaces this operator
    does not serve are left to the operator that does."""
    if is_decided(dict(status)):
        return
    index: FederationIndex = kwargs[INDEX]
    username = str(spec.get("username", ""))
    requester = find_requester(username, list(index))
    if requester is None and account_namespace(username) not in {ns for ns, _ in index}:
        return
    kube = state_of(memo).kube
    shards = ({} if requester is None else
              {s["metadata"]["name"]: ShardSpec.model_validate(s["spec"])
               for s in kube.list_custom("shards", requester.namespace)})
    review = review_request(dict(spec), requester, shards)
    if not review.approved or requester is None or review.request is None:
        log.warning("certificate request %s denied: %s", name, review.message)
        kube.decide_certificate_request(name, approved=False, reason=review.reason,
                                        message=review.message)
        return
    secret = kube.read_secret(requester.namespace, names(requester.federation).ca)
    if secret is None:  # the requester gives up at its timeout and asks again
        log.warning("certificate request %s: no CA yet for federation %r", name,
                    requester.federation)
        return
    ca = certs.KeyPair(cert_pem=secret["tls.crt"], key_pem=secret["tls.key"])
    kube.decide_certificate_request(
        name, approved=True, reason=review.reason, message=review.message,
        certificate_pem=certs.sign_request(ca, review.request, validity=review.validity))
    log.info("certificate request %s signed: %s", name, review.message)


# -- Experiment ---------------------------------------------------------------------------

def _refuse(state: OperatorState, patch: kopf.Patch, status: kopf.Status, body: kopf.Body,
            reason: str, message: str, generation: int) -> None:
    """Accepted=False and Ready=False with the reason; one Event per reason and message
    (a retry every few seconds for the same reason posts no new one)."""
    conditions = set_condition(list(status.get("conditions", [])), "Accepted", False, reason,
                               message, generation=generation)
    patch.status["conditions"] = set_condition(conditions, "Ready", False, reason, message,
                                               generation=generation)
    patch.status["phase"] = "Pending"
    post_event(state.recent, body, type="Warning", reason=reason, message=message,
               by_reason=True)


@kopf.on.create(GROUP, VERSION, "experiments")
@observed("Experiment")
def submit_experiment(name: str, namespace: str | None, spec: kopf.Spec, status: kopf.Status,
                      meta: kopf.Meta, body: kopf.Body, patch: kopf.Patch,
                      retry: int, memo: kopf.Memo, **kwargs: Any) -> None:
    namespace, state = namespace or "default", state_of(memo)
    experiment = ExperimentSpec.model_validate(dict(spec))
    generation = int(meta.get("generation", 0))
    try:
        director = state.directors.get(namespace, experiment.federation, kwargs[INDEX])
    except FederationMissing as exc:
        _refuse(state, patch, status, body, "FederationNotFound", str(exc), generation)
        raise kopf.TemporaryError(str(exc), delay=min(30, 2 + 2 * retry)) from exc
    plan = build_plan(experiment)
    from fedkube.client import experiment_archive

    archive, model = experiment_archive(plan)
    try:
        registered = {shard: envoy.online for shard, envoy in
                      _registry(state, namespace, experiment.federation, director).items()}
        collaborators = experiment.shards or sorted(n for n, on in registered.items() if on)
        if not collaborators:
            _refuse(state, patch, status, body, "NoShardsOnline",
                    "no shard of the federation is online", generation)
            raise kopf.TemporaryError("no shard online", delay=5)
        # A listed shard whose envoy has not registered yet is worth waiting for (the
        # director would refuse it outright).
        unregistered = sorted(set(collaborators) - set(registered))
        if unregistered:
            message = f"waiting for shards to register with the director: {unregistered}"
            _refuse(state, patch, status, body, "ShardsNotRegistered", message, generation)
            raise kopf.TemporaryError(message, delay=min(30, 2 + 2 * retry))
        director.submit(director_name(namespace, name), archive,
                        collaborators=collaborators, initial_model=model)
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            _refuse(state, patch, status, body, "DirectorUnreachable", rpc_error(exc),
                    generation)
            raise kopf.TemporaryError(rpc_error(exc), delay=5) from exc
        # Submitted before an operator restart (or a lost status patch): it is the
        # director's, and followed as any other.
        if code != grpc.StatusCode.ALREADY_EXISTS:
            _refuse(state, patch, status, body, "Refused", str(details), generation)
            raise kopf.PermanentError(str(details)) from exc
    message = (f"submitted to the director with {len(collaborators)} collaborators")
    conditions = set_condition(list(status.get("conditions", [])), "Accepted", True,
                               "Submitted", message, generation=generation)
    # Not Ready yet, and no longer for the reason of an earlier refusal.
    patch.status["conditions"] = set_condition(conditions, "Ready", False, "Submitted",
                                               message, generation=generation)
    patch.status["collaborators"] = collaborators
    patch.status["totalRounds"] = experiment.rounds
    patch.status["progress"] = f"0/{experiment.rounds}"
    patch.status["phase"] = "Accepted"
    post_event(state.recent, body, type="Normal", reason="Submitted",
               message=f"submitted to the director of {experiment.federation}")


@kopf.on.delete(GROUP, VERSION, "experiments")
@observed("Experiment")
def remove_experiment(name: str, namespace: str | None, spec: kopf.Spec, status: kopf.Status,
                      body: kopf.Body, memo: kopf.Memo, runtime: dt.timedelta,
                      **kwargs: Any) -> None:
    """The finalizer's work: the director forgets the experiment and its models. One no
    director accepted goes at once; otherwise the director is asked for up to
    REMOVE_GIVE_UP_S, and then the Experiment goes with a Warning, its data left on the
    director (`fedkube experiment remove`)."""
    namespace, state = namespace or "default", state_of(memo)
    state.recent.forget(("event", body.get("metadata", {}).get("uid")))
    if not is_true(list(status.get("conditions", [])), "Accepted"):
        return  # never submitted: nothing at the director to remove
    at_director = director_name(namespace, name)
    try:
        director = state.directors.get(namespace, str(spec.get("federation", "")),
                                       kwargs[INDEX])
        director.remove(at_director)
        return
    except FederationMissing:
        return
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return
        reason = rpc_error(exc)
    except kopf.TemporaryError as exc:  # the federation's certificates are not there
        reason = str(exc)
    if runtime.total_seconds() + 5 < REMOVE_GIVE_UP_S:
        raise kopf.TemporaryError(f"removing {at_director} from the director: {reason}",
                                  delay=5)
    message = (f"the director did not remove {at_director} within {REMOVE_GIVE_UP_S:.0f}s "
               f"({reason}): its data stays on the director; remove it there with "
               f"`fedkube experiment remove {at_director}`")
    log.warning("experiment %s/%s: %s", namespace, name, message)
    kopf.event(body, type="Warning", reason="DirectorDataKept", message=message)


# -- following the director: one poll per federation --------------------------------------
#
# A timer per Shard and per Experiment would cost kopf a handler call per object per
# period (1,200 a second for 1,000 of each); instead each Federation polls its director
# once per period and patches the few objects whose status moved. Indexes keep every
# Shard's and followed Experiment's current status in memory, fed by kopf's watches.

@kopf.index(GROUP, VERSION, "shards")
def shard_states(name: str, namespace: str | None, spec: kopf.Spec, status: kopf.Status,
                 meta: kopf.Meta, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    return {(namespace or "default", str(spec.get("federation", ""))): {
        "name": name, "node": spec.get("nodeName"), "status": dict(status),
        "generation": int(meta.get("generation", 0))}}


def _following(status: kopf.Status, **_: Any) -> bool:
    return (is_true(list(status.get("conditions", [])), "Accepted")
            and status.get("phase") not in FINAL_PHASES)


@kopf.index(GROUP, VERSION, "experiments", when=_following)
def followed_experiments(name: str, namespace: str | None, spec: kopf.Spec,
                         status: kopf.Status, meta: kopf.Meta, **_: Any
                         ) -> dict[tuple[str, str], dict[str, Any]]:
    namespace = namespace or "default"
    return {(namespace, str(spec.get("federation", ""))): {
        "name": name, "status": dict(status), "generation": int(meta.get("generation", 0)),
        "ref": {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Experiment",
                "metadata": {"name": name, "namespace": namespace, "uid": meta.get("uid")}}}}


def _for_each(workers: ThreadPoolExecutor, fn: Callable[[dict[str, Any]], None],
              objects: list[dict[str, Any]]) -> None:
    """fn on each object, on the state's poll threads (one at a time, 1,000 status patches
    to a busy apiserver took minutes). Each carries the handler's context (kopf's event
    posting lives there)."""
    futures = [workers.submit(contextvars.copy_context().run, fn, obj)
               for obj in objects]
    for future in futures:
        future.result()


@kopf.timer(GROUP, VERSION, "federations", interval=SHARD_POLL_S, idle=0)
@observed("Federation")
def mirror_shards(name: str, namespace: str | None, memo: kopf.Memo, **kwargs: Any) -> None:
    """Each Shard's status from the director's registry: one listing for all of them."""
    namespace, state = namespace or "default", state_of(memo)
    kube = state.kube
    shards = list(kwargs["shard_states"].get((namespace, name), []))
    if not shards:
        return
    try:
        registry = _registry(state, namespace, name,
                             state.directors.get(namespace, name, kwargs[INDEX]))
    except FederationMissing:  # being deleted
        return
    except grpc.RpcError as exc:
        detail = str(exc.details() if hasattr(exc, "details") else exc)
        for shard in shards:
            conditions = set_condition(list(shard["status"].get("conditions", [])), "Ready",
                                       False, "DirectorUnreachable", detail)
            if conditions != shard["status"].get("conditions"):
                kube.patch_status("shards", namespace, shard["name"],
                                  {"conditions": conditions})
        return

    # Of two Shards on one node, the first by name holds it (build_envoy_config).
    taken = node_conflicts({s["name"]: s["node"] for s in shards})

    def mirror(shard: dict[str, Any]) -> None:
        changes = status_changes(shard["status"], build_shard_status(
            shard["status"], registry.get(shard["name"]), node=shard["node"],
            generation=shard["generation"], node_taken=taken.get(shard["name"])))
        if changes:
            kube.patch_status("shards", namespace, shard["name"], changes)

    _for_each(state.poll_workers, mirror, shards)


DETAIL_REFRESH_S = 10.0


@kopf.timer(GROUP, VERSION, "federations", interval=EXPERIMENT_POLL_S, idle=0)
@observed("Federation")
def follow_experiments(name: str, namespace: str | None, memo: kopf.Memo, **kwargs: Any
                       ) -> None:
    """The director's progress of each accepted Experiment into its status and Events.
    The director's experiment list (one call) says which moved; only those are asked for
    details and patched (and the others every DETAIL_REFRESH_S, for what the list does
    not show, such as the queue position)."""
    namespace, state = namespace or "default", state_of(memo)
    followed = list(kwargs["followed_experiments"].get((namespace, name), []))
    following = {e["name"] for e in followed}
    detailed = state.detailed
    for key in [k for k in detailed if k[:2] == (namespace, name) and k[2] not in following]:
        detailed.pop(key, None)
    if not followed:
        return
    try:
        director = state.directors.get(namespace, name, kwargs[INDEX])
        listed = {entry: (phase, progress) for entry, phase, progress in director.experiments()}
    except FederationMissing:  # being deleted
        return
    except grpc.RpcError as exc:
        # Once per change: this poll runs every second (Ready says it too, check_director).
        if state.recent.fresh(("poll", namespace, name), rpc_error(exc)):
            log.warning("federation %s/%s: listing experiments: %s", namespace, name,
                        rpc_error(exc))
        return
    state.recent.forget(("poll", namespace, name))
    _for_each(state.poll_workers,
              lambda experiment: _follow(state, namespace, name, experiment, director, listed),
              followed)


def _follow(state: OperatorState, namespace: str, federation: str, experiment: dict[str, Any],
            director: DirectorClient, listed: dict[str, tuple[str, float]]) -> None:
    key = (namespace, federation, experiment["name"])
    seen = listed.get(director_name(namespace, experiment["name"]))
    last = state.detailed.get(key)
    if (seen is not None and last is not None and last[0] == seen
            and time.monotonic() - last[1] < DETAIL_REFRESH_S):
        return
    try:
        report = director.status(director_name(namespace, experiment["name"]))
    except grpc.RpcError as exc:
        if state.recent.fresh(("poll", namespace, experiment["name"]), rpc_error(exc)):
            log.warning("experiment %s/%s: %s", namespace, experiment["name"],
                        rpc_error(exc))
        return
    if seen is not None:
        state.detailed[key] = (seen, time.monotonic())
    status = experiment["status"]
    transition = build_status(status, report, experiment["generation"])
    # Only what changed: a queued experiment patches nothing.
    changes = {k: v for k, v in transition.status.items() if status.get(k) != v}
    if changes:
        state.kube.patch_status("experiments", namespace, experiment["name"], changes)
    if transition.status["phase"] != status.get("phase"):
        EXPERIMENT_PHASES.labels(transition.status["phase"]).inc()
    for kind, reason, message in transition.events:
        post_event(state.recent, experiment["ref"], type=kind, reason=reason,
                   message=message)
