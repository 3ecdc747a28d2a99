"""Receiving a new experiment (SetNewExperiment): the streamed archive and initial model.

The first message names the experiment and its collaborators, which the core checks
before a byte is written; every message then carries a chunk of the archive and a piece
of the initial model. The archive is written to `archive.zip.part` in the experiment's
directory and renamed once whole, the initial model's pieces written beside it as they
come (fedkube.transport.model_files: the director holds one message, never the model),
and the archive checked by the runner before the core registers the experiment. An
upload that fails at any point leaves nothing behind (unless an experiment of that name
exists already).

The initial model is limited (--max-model-bytes; by default a share of the director's
memory, see fedkube.transport.limits): a model whose size fedkube's client declares in
MODEL_BYTES_HEADER is refused with RESOURCE_EXHAUSTED before any of it is read, and one
sent without (OpenFL's client) as soon as its bytes pass the limit, before they are
written.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import shutil
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import BinaryIO

from fedkube.api.errors import (
    FedkubeError,
    InternalError,
    InvalidArgumentError,
    PermissionDeniedError,
    ResourceExhaustedError,
)
from fedkube.api.policy import ShardPolicy
from fedkube.director.core import Director
from fedkube.director.store import ExperimentRecord
from fedkube.proto import director_pb2
from fedkube.review.plan_review import describe, review
from fedkube.transport import metrics as transfer_metrics
from fedkube.transport.limits import (
    MAX_ARCHIVE_BYTES,
    MODEL_BYTES_HEADER,
    default_max_model_bytes,
)
from fedkube.transport.model_files import ModelTooLarge, ModelWriter
from fedkube.transport.tensors import TensorError

log = logging.getLogger(__name__)
ARCHIVE = "archive.zip"


class ExperimentUploads:
    """The uploads under way; each holds its experiment's key in the core until it ends."""

    def __init__(self, director: Director, *, max_model_bytes: int | None = None) -> None:
        """max_model_bytes: the largest initial model taken (None: the default for this
        machine's memory, fedkube.transport.limits.default_max_model_bytes)."""
        self.director = director
        self.max_model_bytes = max_model_bytes or default_max_model_bytes()
        log.info("initial models of up to %s (--max-model-bytes)",
                 _bytes(self.max_model_bytes))

    async def receive(self, owner: str, messages: AsyncIterator[director_pb2.ExperimentInfo],
                      *, declared_model_bytes: int | None = None) -> ExperimentRecord:
        """Takes one SetNewExperiment stream to its end; returns the registered experiment
        (raising ServiceError, with nothing left on disk, if it is refused).
        declared_model_bytes: the initial model's size as its sender declared it
        (MODEL_BYTES_HEADER, read by declared_model_bytes()), refused before a message
        is read when over the limit."""
        if declared_model_bytes is not None and declared_model_bytes > self.max_model_bytes:
            raise ResourceExhaustedError(
                f"the initial model is {_bytes(declared_model_bytes)}, over this "
                f"director's limit of {_bytes(self.max_model_bytes)} (--max-model-bytes)")
        first: director_pb2.ExperimentInfo | None = None
        key: str | None = None  # the experiment's key, once this stream holds it
        tmp: Path | None = None
        sink: BinaryIO | None = None
        model: ModelWriter | None = None
        budget: int | None = None  # what the owner may still store, if owners are limited
        received = 0
        try:
            async for message in messages:
                if first is None:
                    first = message
                    claim = self.director.claim_name(owner, message.name,
                                                     list(message.collaborator_names))
                    key, budget = claim.key, claim.budget
                    tmp = _fresh_directory(self.director.experiment_dir(key))
                    sink = tmp.open("wb")
                    model = ModelWriter(tmp.parent, self.max_model_bytes)
                elif message.name != first.name:
                    raise InvalidArgumentError("experiment name changed within the stream")
                received += message.ByteSize()
                if budget is not None and received > budget:
                    raise ResourceExhaustedError(
                        f"this experiment would take your experiments past "
                        f"{self.director.limits.max_stored_bytes} bytes on the director "
                        "(--max-stored-bytes-per-owner); remove some (fedkube experiment "
                        "remove)")
                assert sink is not None and model is not None
                _take_chunk(message, sink, model)
            if first is None or key is None:
                raise InvalidArgumentError("empty SetNewExperiment stream")
            assert sink is not None and tmp is not None and model is not None
            sink.close()
            archive = tmp.with_name(ARCHIVE)
            os.replace(tmp, archive)
            _finish_model(model)
            rounds = (self.director.runner.inspect(archive, key) if self.director.runner
                      else 0)
            if self.director.policy is not None:
                await _review(self.director.policy, archive, key, owner)
            return self.director.set_new_experiment(
                name=first.name, owner=owner, collaborators=list(first.collaborator_names),
                archive_path=archive, total_rounds=rounds, key=key)
        except BaseException as exc:
            if sink is not None:
                sink.close()
            if model is not None:
                model.close()
            if tmp is not None and key is not None and key not in {
                    e.name for e in self.director.experiment_records()}:
                shutil.rmtree(tmp.parent, ignore_errors=True)
            if isinstance(exc, OSError):  # writing the archive or model: a full disk, say
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise ResourceExhaustedError(f"the director's disk is full: {exc}") from exc
                raise InternalError(f"cannot store the experiment: {exc}") from exc
            raise
        finally:
            if key is not None:
                self.director.release_name(key)


async def _review(policy: ShardPolicy, archive: Path, key: str, owner: str) -> None:
    """The federation's policy on a new experiment (the same rules as a shard's; its
    admin's hooks), off the event loop: a review command may take a while."""
    try:
        submission = await asyncio.to_thread(describe, archive, key, owner)
    except FedkubeError as exc:
        raise InvalidArgumentError(f"cannot review the experiment: {exc}") from exc
    verdict = await asyncio.to_thread(functools.partial(review, policy, submission,
                                                        scope="federation"))
    if verdict.decision != "accepted":
        raise PermissionDeniedError(verdict.reason)


def _fresh_directory(directory: Path) -> Path:
    """An empty directory for a new experiment; returns where its archive goes. The key is
    free, so whatever is there is a removed experiment's leftover (a crash mid-removal):
    a new experiment starts from an empty directory of its own."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory / f"{ARCHIVE}.part"


def declared_model_bytes(metadata: Iterable[tuple[str, str | bytes]] | None) -> int | None:
    """The initial model's size a SetNewExperiment call's metadata declares
    (MODEL_BYTES_HEADER, sent by fedkube's client), or None when it declares none."""
    for key, value in metadata or ():
        if key == MODEL_BYTES_HEADER:
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            if not text.strip().isdigit():
                raise InvalidArgumentError(
                    f"{MODEL_BYTES_HEADER} must be a number of bytes, not {text[:40]!r}")
            return int(text)
    return None


def _bytes(n: int) -> str:
    return f"{n} bytes ({n / (1 << 30):.2f} GiB)" if n >= 1 << 30 else (
        f"{n} bytes ({n / (1 << 20):.1f} MiB)" if n >= 1 << 20 else f"{n} bytes")


def _take_chunk(message: director_pb2.ExperimentInfo, sink: BinaryIO,
                model: ModelWriter) -> None:
    data = message.experiment_data
    payload = data.npbytes  # each access of a bytes field copies it: once only
    if data.size != len(payload):
        raise InvalidArgumentError(f"chunk says {data.size} bytes but carries {len(payload)}")
    if sink.tell() + len(payload) > MAX_ARCHIVE_BYTES:
        raise ResourceExhaustedError(f"experiment archive exceeds {MAX_ARCHIVE_BYTES} bytes")
    sink.write(payload)
    transfer_metrics.BYTES_RECEIVED.labels("SetNewExperiment").inc(
        len(payload) + message.model_proto.ByteSize())
    try:
        model.add(message.model_proto)
    except ModelTooLarge as exc:
        raise ResourceExhaustedError(
            f"the initial model passed this director's limit of {_bytes(exc.limit)} "
            "(--max-model-bytes); it was refused before more of it was taken") from exc
    except OverflowError as exc:  # too many tensors
        raise ResourceExhaustedError(str(exc)) from exc
    except TensorError as exc:
        raise InvalidArgumentError(f"invalid initial model: {exc}") from exc


def _finish_model(model: ModelWriter) -> None:
    try:
        model.finish()
    except TensorError as exc:
        raise InvalidArgumentError(f"invalid initial model: {exc}") from exc
