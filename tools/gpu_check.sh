#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU and a python3 that has torch, shows what
# NVML and torch see and runs tests/test_gpu.py, which here fails instead of skipping.
# Run from the repository root with fedkube and its dependencies importable.
set -euo pipefail
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda,
                             "device 0:", torch.cuda.get_device_name(0))'
# -W default: the machine's own package set may warn where ours does not; show, don't fail.
FEDKUBE_REQUIRE_GPU=1 "$PY" -m pytest -s -v -p no:cacheprovider -W default tests/test_gpu.py
