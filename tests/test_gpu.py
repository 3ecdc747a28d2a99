"""GPUs: which ones an envoy's collaborator sees and, on a machine with an NVIDIA GPU, the
torch example trained on CUDA through the whole local path (director, envoys and
collaborators as processes, the example's requirements installed per experiment) with
NVML's view of the device in the director's shard registry.

The CUDA test needs torch and a GPU, so it is skipped where there are none (CI has
none). `tools/gpu_check.sh` runs it where a GPU must be found."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedkube.client import DirectorClient
from fedkube.dev.processes import Process, director_process, envoy_process, free_port
from fedkube.envoy_agent.process_runtime import collaborator_environment
from fedkube.tasks import digits
from tests.helpers import EXAMPLES, load_example

REQUIRE_GPU_ENV = "FEDKUBE_REQUIRE_GPU"


def test_collaborator_sees_only_the_gpus_its_envoy_owns() -> None:
    parent = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert collaborator_environment(parent, (2, 3))["CUDA_VISIBLE_DEVICES"] == "2,3"
    # An envoy that names no devices owns what its own environment shows, as its NVML
    # monitor reports every device: hiding them would train on the CPU beside a GPU.
    assert collaborator_environment(parent, ())["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    assert "CUDA_VISIBLE_DEVICES" not in collaborator_environment({"PATH": "/bin"}, ())
    assert parent["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"


def _nvml_devices() -> list[tuple[str, int]]:
    """(name, total memory) of every device, read from NVML directly."""
    import pynvml

    pynvml.nvmlInit()
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            found.append((name.decode() if isinstance(name, bytes) else name,
                          int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)))
        return found
    finally:
        pynvml.nvmlShutdown()


@pytest.mark.slow
def test_torch_example_trains_on_cuda_and_the_registry_shows_the_gpu(
        tmp_path: Path, processes: list[Process]) -> None:
    if os.environ.get(REQUIRE_GPU_ENV):  # tools/gpu_check.sh: a GPU check must not skip
        import torch

        assert torch.cuda.is_available(), "torch sees no CUDA device"
    else:
        torch = pytest.importorskip("torch", reason="the CUDA path needs fedkube[torch]")
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device on this machine")
    devices = _nvml_devices()
    port = free_port()
    processes.append(director_process(tmp_path, port, period=1.0).start())
    # env0 names GPU 0; env1 names none and so owns every GPU its environment shows.
    processes.append(envoy_process(tmp_path, "env0", port, index=0, count=2,
                                   extra=["--cuda-devices", "0"]).start())
    processes.append(envoy_process(tmp_path, "env1", port, index=1, count=2).start())
    address = f"localhost:{port}"
    with DirectorClient(address, client_id="alice") as client:
        registry = {e.name: e.cuda_devices for e in client.wait_online(2, timeout=60)}
        print("shard registry:", registry)
        (gpu0,) = registry["env0"]
        assert (gpu0["index"], gpu0["name"], gpu0["memory_total"]) == (0, *devices[0])
        assert gpu0["driver"] and gpu0["cuda"] and gpu0["utilization"].endswith("%")
        assert [(d["name"], d["memory_total"]) for d in registry["env1"]] == devices

        started = time.monotonic()
        cli = [sys.executable, "-m", "fedkube.cli", "experiment"]
        submit = subprocess.run(
            [*cli, "submit", "--director", address, "--insecure", "--client-id", "alice",
             "--name", "cnn", "--archive", "examples/torch_cnn/task.py", "--requirements",
             "examples/torch_cnn/requirements.txt", "--rounds", "5"],
            capture_output=True, text=True, timeout=120, cwd=EXAMPLES.parent)
        assert submit.returncode == 0, submit.stderr[-3000:]
        status = client.wait("cnn", timeout=600)
        seconds = time.monotonic() - started
        assert status.status == "finished", status.error

        on_cuda = {(m.origin, m.round): m.value for m in client.metrics("cnn")
                   if m.task == "train" and m.name == "cuda"}
        print(f"5 rounds in {seconds:.1f} s; train metric 'cuda' by (envoy, round):", on_cuda)
        assert {origin for origin, _ in on_cuda} == {"env0", "env1"}
        assert len(on_cuda) == 10 and set(on_cuda.values()) == {1.0}
        best = client.model("cnn")
    task = load_example(EXAMPLES / "torch_cnn" / "task.py")
    accuracy = task.validate(best, digits.test_set(), {})["accuracy"]
    print(f"best model's accuracy on held-out digits: {accuracy:.4f}")
    assert accuracy > 0.8
