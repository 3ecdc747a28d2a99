"""The examples run as a user would run them, against a director and envoys started here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedkube.client import DirectorClient
from fedkube.dev.processes import Process
from fedkube.tasks import digits
from tests.helpers import EXAMPLES, load_example, start_federation


@pytest.fixture
def federation(tmp_path: Path, processes: list[Process]) -> str:
    port, client, _ = start_federation(tmp_path, processes, 2)
    client.close()
    return f"localhost:{port}"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=300, cwd=EXAMPLES.parent)


@pytest.mark.slow
def test_notebook_example_trains_and_scores(federation: str) -> None:
    result = run("examples/digits_notebook.py", "--director", federation, "--insecure",
                 "--rounds", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "digits-notebook: finished" in result.stdout
    accuracy = float(result.stdout.rsplit("best model:", 1)[1])
    assert accuracy > 0.9


@pytest.mark.slow
def test_user_archive_task_trains_through_the_cli(federation: str) -> None:
    cli = ("-m", "fedkube.cli", "experiment")
    submit = run(*cli, "submit", "--director", federation, "--insecure", "--client-id",
                 "bob", "--name", "mine", "--archive", "examples/user_task/task.py",
                 "--rounds", "5", "--param", "learning_rate=0.5")
    assert submit.returncode == 0, submit.stderr[-3000:]
    wait = run(*cli, "wait", "mine", "--director", federation, "--insecure", "--client-id",
               "bob")
    assert wait.returncode == 0, wait.stderr[-3000:]
    with DirectorClient(federation, client_id="bob") as client:
        best = client.model("mine")
        assert set(best) == {"w", "b"}
    task = load_example(EXAMPLES / "user_task" / "task.py")
    assert task.validate(best, digits.test_set(), {})["accuracy"] > 0.9


def test_torch_cnn_example_init_model_needs_no_torch() -> None:
    task = load_example(EXAMPLES / "torch_cnn" / "task.py")
    model = task.init_model({})
    assert list(model) == list(task.SHAPES)
    assert all(v.dtype == np.float32 and v.shape == task.SHAPES[k] for k, v in model.items())
    assert (EXAMPLES / "torch_cnn" / "requirements.txt").read_text().startswith("torch")


def test_torch_cnn_example_learns_where_torch_is_installed() -> None:
    """torch is an optional extra (`fedkube[torch]`): this runs where it is installed,
    and on CUDA where there is a GPU."""
    pytest.importorskip("torch", reason="the torch example runs where torch is installed")
    task = load_example(EXAMPLES / "torch_cnn" / "task.py")
    shard = digits.DigitsShard(0, 1)
    model = task.init_model({})
    for r in range(3):
        model, _ = task.train(model, shard.get_dataset("train"), {"seed": r})
    assert task.validate(model, digits.test_set(), {})["accuracy"] > 0.8
