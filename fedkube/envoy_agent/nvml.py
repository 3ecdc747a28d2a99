"""CUDA device information from NVML (nvidia-ml-py).

Without a GPU or a driver the monitor logs one line and reports no devices; it never raises.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

from fedkube.proto import director_pb2

log = logging.getLogger(__name__)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class NvmlMonitor:
    def __init__(self, indices: Sequence[int] = ()) -> None:
        """indices: the devices this envoy owns; empty means every device NVML sees."""
        self.indices = list(indices)
        self.available = False
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.available = True
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, driver errors
            log.info("no CUDA devices reported: NVML unavailable (%s)", exc)

    def devices(self) -> list[director_pb2.CudaDeviceInfo]:
        if self._nvml is None:
            return []
        nvml = self._nvml
        try:
            count = nvml.nvmlDeviceGetCount()
            driver = _text(nvml.nvmlSystemGetDriverVersion())
            cuda = nvml.nvmlSystemGetCudaDriverVersion()
            cuda_version = f"{cuda // 1000}.{cuda % 1000 // 10}"
            result = []
            for index in self.indices or range(count):
                if index >= count:
                    continue
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                utilization = nvml.nvmlDeviceGetUtilizationRates(handle)
                result.append(director_pb2.CudaDeviceInfo(
                    index=index, name=_text(nvml.nvmlDeviceGetName(handle)),
                    memory_total=memory.total, memory_utilized=memory.used,
                    device_utilization=f"{utilization.gpu}%",
                    cuda_driver_version=driver, cuda_version=cuda_version))
            return result
        except Exception as exc:  # a GPU that falls off the bus must not stop health checks
            log.warning("NVML query failed, reporting no devices this time: %s", exc)
            return []

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):  # shutting down: nothing to do about it
                self._nvml.nvmlShutdown()
            self._nvml = None
