"""A model owner's client of the director (blocking; fit for scripts and notebooks).

    from fedkube.client import DirectorClient
    with DirectorClient("localhost:50051", insecure=True, client_id="alice") as client:
        print(client.envoys())
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from fedkube.proto import director_pb2, director_pb2_grpc
from fedkube.transport.identity import CLIENT_ID_HEADER
from fedkube.transport.limits import GRPC_OPTIONS
from fedkube.transport.tls import TLSFiles, channel_credentials


@dataclass(frozen=True)
class EnvoyView:
    """One row of the director's registry, as `fedkube shards` shows it."""

    name: str
    online: bool
    experiment_running: bool
    experiment: str
    description: str
    n_samples: int
    sample_shape: list[str]
    target_shape: list[str]
    cuda_devices: list[dict[str, Any]]
    last_health_check: float

    @classmethod
    def from_proto(cls, info: director_pb2.EnvoyInfo) -> EnvoyView:
        shard = info.shard_info
        return cls(
            name=shard.node_info.name, online=info.is_online,
            experiment_running=info.is_experiment_running, experiment=info.experiment_name,
            description=shard.shard_description, n_samples=shard.n_samples,
            sample_shape=list(shard.sample_shape), target_shape=list(shard.target_shape),
            cuda_devices=[
                {"index": d.index, "name": d.name, "memory_total": d.memory_total,
                 "memory_utilized": d.memory_utilized, "utilization": d.device_utilization,
                 "driver": d.cuda_driver_version, "cuda": d.cuda_version}
                for d in shard.node_info.cuda_devices],
            last_health_check=info.last_updated.ToNanoseconds() / 1e9,
        )


class DirectorClient:
    def __init__(self, target: str, *, tls: TLSFiles | None = None, client_id: str = "owner",
                 timeout: float = 30.0) -> None:
        options = GRPC_OPTIONS
        if tls is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, channel_credentials(tls), options=options)
        self._stub = director_pb2_grpc.DirectorStub(self._channel)  # type: ignore[no-untyped-call]
        self._metadata = ((CLIENT_ID_HEADER, client_id),)
        self.timeout = timeout

    @classmethod
    def from_files(cls, target: str, *, ca: Path | None, cert: Path | None, key: Path | None,
                   client_id: str = "owner") -> DirectorClient:
        tls = None
        if ca and cert and key:
            tls = TLSFiles(ca=ca.read_bytes(), cert=cert.read_bytes(), key=key.read_bytes())
        return cls(target, tls=tls, client_id=client_id)

    def __enter__(self) -> DirectorClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def envoys(self) -> list[EnvoyView]:
        response = self._stub.GetEnvoys(director_pb2.GetEnvoysRequest(),
                                        metadata=self._metadata, timeout=self.timeout)
        return [EnvoyView.from_proto(info) for info in response.envoy_infos]

    def dataset_info(self) -> tuple[list[str], list[str]]:
        response = self._stub.GetDatasetInfo(director_pb2.GetDatasetInfoRequest(),
                                             metadata=self._metadata, timeout=self.timeout)
        return list(response.shard_info.sample_shape), list(response.shard_info.target_shape)
