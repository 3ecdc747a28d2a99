"""Small transfers over the bulk port under mTLS, where the handshake is most of the
cost: a model of many tensors is fetched one transfer per tensor. fedkube's client
resumes its last TLS session (no certificates sent, signed or checked again) against a
full handshake every time, as it did before, in the same run, to a real BulkServer with
a 4 KiB reply. Transfers per second, best of three, at 1 and 8 client threads.

    python -m benchmarks.bulk_handshakes [--transfers 400] [--json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.report import report
from fedkube.transport import certs
from fedkube.transport.bulk import BulkClient, BulkServer, PeerContext, Segments
from fedkube.transport.tls import TLSFiles


class SmallReplies:
    def download(self, context: PeerContext, header: bytes) -> Segments:
        return [b"x" * 4096]

    def upload_limit(self, context: PeerContext, header: bytes) -> int:
        return 0

    def upload(self, context: PeerContext, header: bytes, body: memoryview) -> bytes:
        return b""


class FullHandshakes(BulkClient):
    """The client as it was: every transfer a full handshake."""

    @contextmanager
    def _connect(self) -> Iterator[Any]:
        self._session = None
        with super()._connect() as conn:
            yield conn


def rate(client_type: type[BulkClient], port: int, tls: TLSFiles, transfers: int,
         threads: int) -> float:
    def run(count: int) -> None:
        client = client_type("localhost", port, tls=tls)
        for i in range(count):
            client.download(f"t{i % 8}", b"")

    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, [transfers // threads] * threads))
        best = max(best, transfers / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transfers", type=int, default=400)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedkube-handshakes-") as tmp:
        ca = certs.create_ca()
        paths = Path(tmp)
        for name, pair in (("director", certs.issue(ca, "localhost", hosts=["localhost"],
                                                    role="director")),
                           ("env1", certs.issue(ca, "env1", role="envoy"))):
            (paths / f"{name}.crt").write_bytes(pair.cert_pem)
            (paths / f"{name}.key").write_bytes(pair.key_pem)
        (paths / "ca.crt").write_bytes(ca.cert_pem)
        server = BulkServer("127.0.0.1", 0, tls=TLSFiles.from_dir(paths, "director"),
                            handler=SmallReplies())
        server.start()
        try:
            tls = TLSFiles.from_dir(paths, "env1")
            rows = [{"threads": threads,
                     "full_handshake_per_s": rate(FullHandshakes, server.port, tls,
                                                  args.transfers, threads),
                     "resumed_per_s": rate(BulkClient, server.port, tls, args.transfers,
                                           threads)}
                    for threads in (1, 8)]
        finally:
            server.stop()
    report("bulk_handshakes",
           "Small mTLS transfers over the bulk port (per second, best of three)",
           ("client threads", "full handshake each", "fedkube (resumed)", "speed-up"),
           [(str(row["threads"]), f"{row['full_handshake_per_s']:.0f}",
             f"{row['resumed_per_s']:.0f}",
             f"{row['resumed_per_s'] / row['full_handshake_per_s']:.2f}x") for row in rows],
           rows, as_json=args.json)


if __name__ == "__main__":
    main()
