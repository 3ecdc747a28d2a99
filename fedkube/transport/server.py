"""Building a grpc.aio server bound to one address, with or without mTLS."""

from __future__ import annotations

import grpc

from fedkube.transport.limits import SERVER_OPTIONS
from fedkube.transport.tls import TLSFiles, server_credentials


def create_server(host: str, port: int, *, tls: TLSFiles | None) -> tuple[grpc.aio.Server, int]:
    """Returns the server and the port it bound (port 0 picks a free one)."""
    # Services are registered through fedkube.transport.guard, which checks every call.
    server = grpc.aio.server(options=SERVER_OPTIONS)
    address = f"{host}:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, server_credentials(tls))
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    return server, bound
