"""Faults as real processes: a director killed mid-experiment, lost envoys, stragglers.

Every fault here is a signal sent to a real `fedkube` process; the assertions are what a
user would check afterwards (status, metrics, models, logs).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from fedkube.api.plan import Plan
from fedkube.dev.demo import PARAMS, centralized_accuracy
from fedkube.dev.processes import Process, director_process, wait_for
from fedkube.tasks import digits
from fedkube.tasks.models import BUILTIN_TASKS
from tests.helpers import SLOW_TASK, current_round, start_federation, submit, submit_plan

pytestmark = pytest.mark.slow  # every test starts fedkube processes


def kill_envoy_and_collaborator(envoy: Process) -> None:
    """SIGKILL to the envoy's process group: the envoy and the collaborator it runs."""
    assert envoy.popen is not None
    os.killpg(envoy.popen.pid, signal.SIGKILL)
    envoy.popen.wait(timeout=30)


def test_director_sigkill_mid_experiment_resumes_from_the_last_closed_round(
        tmp_path: Path, processes: list[Process]) -> None:
    port, client, _ = start_federation(tmp_path, processes, 3)
    rounds = 20
    plan = Plan(task="digits-logreg", rounds=rounds, params=PARAMS, round_timeout_s=120)
    submit_plan(client, "resilient", plan, ["env0", "env1", "env2"])
    wait_for(lambda: current_round(client, "resilient") >= 3, timeout=120,
             message="round 3 reached")
    director = processes[0]
    director.kill(signal.SIGKILL)
    killed_at = current_round_from_store(tmp_path)
    assert 3 <= killed_at < rounds
    best_before = (tmp_path / "director/experiments/resilient/best.pb").read_bytes()
    assert best_before  # the best model so far survived the kill on disk

    restarted = director_process(tmp_path, port, period=1.0, name="director-restarted")
    processes.append(restarted.start())
    final = client.wait("resilient", timeout=300)
    assert final.status == "finished", (final, restarted.output()[-3000:])
    assert final.round == rounds
    log = restarted.output()
    assert f"experiment resilient resumes at round {killed_at}" in log or \
        f"experiment resilient resumes at round {killed_at + 1}" in log, log[-3000:]

    # One aggregated score per round: the resumed run did not start again from round 0,
    # and the half-done round's metrics were not counted twice.
    aggregated = [m.round for m in client.metrics("resilient")
                  if m.origin == "aggregator" and m.task == "aggregated_validate"]
    assert aggregated == list(range(rounds + 1))
    # Collaborators rode out the outage (they were not restarted: no second dispatch).
    for i in range(3):
        assert processes[1 + i].running
        assert processes[1 + i].output().count("experiment resilient dispatched") == 1
    # The same final accuracy band as an undisturbed run: the last model within 2 points
    # of the centralized baseline on held-out digits.
    last = client.model("resilient", best=False)
    accuracy = BUILTIN_TASKS["digits-logreg"].validate(last, digits.test_set(), {})["accuracy"]
    assert abs(accuracy - centralized_accuracy(rounds, 3, False)) <= 0.02


def current_round_from_store(tmp_path: Path) -> int:
    """The round the dead director had recorded, read from its SQLite store."""
    from fedkube.director.store import SqliteStore

    store = SqliteStore(tmp_path / "director" / "director.sqlite3")
    try:
        return next(e.current_round for e in store.experiments() if e.name == "resilient")
    finally:
        store.close()


def test_lost_envoy_round_closes_on_quorum_and_the_experiment_goes_on(
        tmp_path: Path, processes: list[Process]) -> None:
    _, client, envoys = start_federation(tmp_path, processes, 3, delays={2: 0.5})
    plan = Plan(task="archive:slow", rounds=6, params=PARAMS, round_timeout_s=3,
                min_collaborators=2)
    submit_plan(client, "lossy", plan, ["env0", "env1", "env2"], {"slow.py": SLOW_TASK})
    wait_for(lambda: current_round(client, "lossy") >= 1, timeout=60, message="round 1")
    kill_envoy_and_collaborator(envoys[2])

    final = client.wait("lossy", timeout=120)
    assert final.status == "finished", final
    assert final.round == 6
    assert final.dropped == ["env2"]
    counts = {m.round: m.value for m in client.metrics("lossy")
              if m.origin == "aggregator" and m.name == "collaborators"}
    assert counts[0] == 3
    assert counts[5] == 2  # the rounds after the loss closed on the quorum
    assert not {e.name: e for e in client.envoys()}["env2"].online
    # The model still learned from the two that remained.
    assert final.best_metrics["accuracy"] > 0.85


def test_below_quorum_the_experiment_fails_with_a_reason(
        tmp_path: Path, processes: list[Process]) -> None:
    _, client, envoys = start_federation(tmp_path, processes, 3, delays={1: 0.5, 2: 0.5})
    plan = Plan(task="archive:slow", rounds=20, params=PARAMS, round_timeout_s=3,
                min_collaborators=2)
    submit_plan(client, "fragile", plan, ["env0", "env1", "env2"], {"slow.py": SLOW_TASK})
    wait_for(lambda: current_round(client, "fragile") >= 1, timeout=60, message="round 1")
    kill_envoy_and_collaborator(envoys[1])
    kill_envoy_and_collaborator(envoys[2])
    final = client.wait("fragile", timeout=60)
    assert final.status == "failed"
    assert "timed out" in final.error and "quorum is 2" in final.error, final.error
    # The director lives on and takes the next experiment on the shard that remains.
    submit(client, "after", ["env0"], rounds=2)
    assert client.wait("after", timeout=60).status == "finished"


def test_a_straggler_does_not_hold_up_rounds_and_its_late_results_are_refused(
        tmp_path: Path, processes: list[Process]) -> None:
    delay = 4.0
    _, client, envoys = start_federation(tmp_path, processes, 3, delays={2: delay})
    plan = Plan(task="archive:slow", rounds=4, params=PARAMS, round_timeout_s=1.5,
                min_collaborators=2)
    submit_plan(client, "uneven", plan, ["env0", "env1", "env2"], {"slow.py": SLOW_TASK})
    final = client.wait("uneven", timeout=120)
    assert final.status == "finished", final
    assert final.round == 4
    assert "env2" in final.dropped
    metrics = client.metrics("uneven")
    counts = [m.value for m in metrics if m.origin == "aggregator" and m.name == "collaborators"]
    assert counts == [2.0] * 4  # every round closed without the straggler
    # Its training never reached the model: the director refused each late result.
    assert not [m for m in metrics if m.origin == "env2" and m.task == "train"]
    log_path = tmp_path / "env2" / "uneven.collaborator.log"  # written when it exits
    wait_for(log_path.exists, timeout=30, message="the straggler's collaborator to exit")
    collaborator_log = log_path.read_text()
    assert "closed without this collaborator" in collaborator_log
    assert envoys[2].running
    assert np.isfinite(final.best_metrics["accuracy"])


def collaborator_pids(work: Path) -> list[int]:
    """Collaborator processes whose command line names a directory under work."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"collaborator" in argv and any(str(work).encode() in a for a in argv):
            pids.append(int(entry.name))
    return pids


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_no_collaborator_outlives_its_envoy(tmp_path: Path, processes: list[Process],
                                            sig: signal.Signals) -> None:
    _, client, envoys = start_federation(tmp_path, processes, 2, delays={0: 0.5, 1: 0.5})
    plan = Plan(task="archive:slow", rounds=100, params=PARAMS, round_timeout_s=600)
    submit_plan(client, "orphans", plan, ["env0", "env1"], {"slow.py": SLOW_TASK})
    # Both running: the check below on env0's must not race its start.
    wait_for(lambda: all(len(collaborator_pids(tmp_path / env)) == 1
                         for env in ("env0", "env1")),
             timeout=60, message="both collaborators running")
    envoys[1].kill(sig)  # SIGTERM: a deleted Pod; SIGKILL: the envoy dies outright
    wait_for(lambda: not collaborator_pids(tmp_path / "env1"), timeout=30,
             message="env1's collaborator gone with its envoy")
    assert collaborator_pids(tmp_path / "env0")  # the other envoy's is untouched
