"""Experiment statuses as the director reports them (the strings OpenFL 1.6 uses on the
wire), and the moves between them that the director makes (`TRANSITIONS`)."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType

from fedkube.api.errors import FailedPreconditionError


class ExperimentState(StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    FINISHED = "finished"
    FAILED = "failed"
    REJECTED = "rejected"

    @property
    def is_final(self) -> bool:
        return self in (ExperimentState.FINISHED, ExperimentState.FAILED,
                        ExperimentState.REJECTED)


# Every status change the director makes (fedkube.director.core.Director.move), from
# what it did before the table: an experiment is created pending; the scheduler starts it
# when its shards are free; its aggregator ends it finished or failed; a collaborator's
# SetExperimentFailed fails it, queued or running; its owner's RemoveExperimentData fails
# it while it runs. A director restart changes no status: in_progress experiments resume.
# No path leads to rejected today; like every final status, it has no way out.
TRANSITIONS: Mapping[ExperimentState, frozenset[ExperimentState]] = MappingProxyType({
    ExperimentState.PENDING: frozenset({ExperimentState.IN_PROGRESS, ExperimentState.FAILED}),
    ExperimentState.IN_PROGRESS: frozenset({ExperimentState.FINISHED,
                                            ExperimentState.FAILED}),
    ExperimentState.FINISHED: frozenset(),
    ExperimentState.FAILED: frozenset(),
    ExperimentState.REJECTED: frozenset(),
})


def can_move(current: ExperimentState, target: ExperimentState) -> bool:
    """Whether an experiment that is `current` may become `target`."""
    return target in TRANSITIONS[current]


def check_transition(current: ExperimentState, target: ExperimentState,
                     what: str = "the experiment") -> None:
    """Raises FailedPreconditionError unless `current` may become `target`."""
    if not can_move(current, target):
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "nothing: it is final"
        raise FailedPreconditionError(
            f"{what} is {current.value} and cannot become {target.value} "
            f"(from {current.value}: {allowed})")
