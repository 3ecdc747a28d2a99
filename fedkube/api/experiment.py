"""Experiment statuses as the director reports them (the strings OpenFL 1.6 uses on the wire)."""

from __future__ import annotations

from enum import StrEnum


class ExperimentStatus(StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    FINISHED = "finished"
    FAILED = "failed"
    REJECTED = "rejected"

    @property
    def is_final(self) -> bool:
        return self in (ExperimentStatus.FINISHED, ExperimentStatus.FAILED,
                        ExperimentStatus.REJECTED)
