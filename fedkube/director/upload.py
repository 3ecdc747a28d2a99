"""Receiving a new experiment (SetNewExperiment): the streamed archive and initial model.

The first message names the experiment and its collaborators, which the core checks
before a byte is written; every message then carries a chunk of the archive and a piece
of the initial model. The archive is written to `archive.zip.part` in the experiment's
directory and renamed once whole, the initial model saved beside it, and the archive
checked by the runner before the core registers the experiment. An upload that fails at
any point leaves nothing behind (unless an experiment of that name exists already).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from fedkube.api.errors import InternalError, InvalidArgumentError, ResourceExhaustedError
from fedkube.director.core import Director
from fedkube.director.store import ExperimentRecord
from fedkube.proto import director_pb2
from fedkube.transport import metrics as transfer_metrics
from fedkube.transport.limits import MAX_ARCHIVE_BYTES, MAX_MODEL_BYTES
from fedkube.transport.tensors import ModelAssembler, TensorError

ARCHIVE = "archive.zip"
INITIAL_MODEL = "initial_model.pb"


class ExperimentUploads:
    """The uploads under way; each holds its experiment's key in the core until it ends."""

    def __init__(self, director: Director) -> None:
        self.director = director

    async def receive(self, owner: str,
                      messages: AsyncIterator[director_pb2.ExperimentInfo]) -> ExperimentRecord:
        """Takes one SetNewExperiment stream to its end; returns the registered experiment
        (raising ServiceError, with nothing left on disk, if it is refused)."""
        first: director_pb2.ExperimentInfo | None = None
        key: str | None = None  # the experiment's key, once this stream holds it
        tmp: Path | None = None
        sink: BinaryIO | None = None
        model = ModelAssembler(MAX_MODEL_BYTES)
        budget: int | None = None  # what the owner may still store, if owners are limited
        received = 0
        try:
            async for message in messages:
                if first is None:
                    first = message
                    key = self.director.claim_name(owner, message.name,
                                                   list(message.collaborator_names))
                    budget = self.director.upload_budget(owner)
                    tmp = _fresh_directory(self.director.experiment_dir(key))
                    sink = tmp.open("wb")
                elif message.name != first.name:
                    raise InvalidArgumentError("experiment name changed within the stream")
                received += message.ByteSize()
                if budget is not None and received > budget:
                    raise ResourceExhaustedError(
                        f"this experiment would take your experiments past "
                        f"{self.director.limits.max_stored_bytes} bytes on the director "
                        "(--max-stored-bytes-per-owner); remove some (fedkube experiment "
                        "remove)")
                assert sink is not None
                _take_chunk(message, sink, model)
            if first is None or key is None:
                raise InvalidArgumentError("empty SetNewExperiment stream")
            assert sink is not None and tmp is not None
            sink.close()
            archive = tmp.with_name(ARCHIVE)
            os.replace(tmp, archive)
            _save_initial_model(model, archive.parent)
            rounds = (self.director.runner.inspect(archive, key) if self.director.runner
                      else 0)
            return self.director.set_new_experiment(
                name=first.name, owner=owner, collaborators=list(first.collaborator_names),
                archive_path=archive, total_rounds=rounds, key=key)
        except BaseException as exc:
            if sink is not None:
                sink.close()
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


def _fresh_directory(directory: Path) -> Path:
    """An empty directory for a new experiment; returns where its archive goes. The key is
    free, so whatever is there is a removed experiment's leftover (a crash mid-removal):
    a new experiment starts from an empty directory of its own."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory / f"{ARCHIVE}.part"


def _take_chunk(message: director_pb2.ExperimentInfo, sink: BinaryIO,
                model: ModelAssembler) -> None:
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
    except OverflowError as exc:
        raise ResourceExhaustedError(str(exc)) from exc


def _save_initial_model(model: ModelAssembler, directory: Path) -> None:
    try:
        initial = model.model()
    except TensorError as exc:
        raise InvalidArgumentError(f"invalid initial model: {exc}") from exc
    if initial.tensors:
        (directory / INITIAL_MODEL).write_bytes(initial.SerializeToString())
