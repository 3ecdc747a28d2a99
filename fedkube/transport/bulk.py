"""Model-sized payloads over a plain socket: one copy at each end.

gRPC's Python API hands a received message over as `bytes` built in three copies (slices,
a bytearray, bytes), and a model receiver copies once more into its buffer; a raw socket
receives straight into that buffer (`recv_into`) and sends straight from the model's
memory (`sendall` of a memoryview). The director serves this beside its gRPC port and says
where (`TensorStream.BulkEndpoint`); a collaborator that cannot reach it uses the gRPC
streams. The payloads are the same wire bytes as on gRPC: a GetAggregatedTensor reply
and a TaskResults message.

Under mTLS the socket is TLS with the same certificates, and the caller's certificate is
checked as on the gRPC port: its chain by fedkube.transport.peer (the handshake's OpenSSL
already holds it to the CA's path length, which the gRPC port's BoringSSL does not), then
the role table and identity by the handler.

A connection gets a worker thread only once it has said what it wants: its TLS handshake
and request header are read without blocking on one thread, within HEADER_TIMEOUT_S in
all, so peers that connect and stall (a slow-loris, or a client without a certificate
that never finishes its handshake) cannot take the workers from real transfers.

Wire format (integers big-endian):
    request   MAGIC, op (1 byte), header length (u32), header
    download  server: status; if OK, body length (u64) and body
    upload    client: body length (u64); server: status (go ahead or refuse);
              client: body; server: status; if OK, reply length (u32) and reply
    status    code (u8, a grpc.StatusCode value; 0 is OK); if not OK, length (u32) and
              UTF-8 message
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import grpc

from fedkube.transport.identity import certificate_auth
from fedkube.transport.peer import CHAIN_KEY, chain_problem
from fedkube.transport.tls import TLSFiles, ssl_context

log = logging.getLogger(__name__)

MAGIC = b"FKB1"
DOWNLOAD, UPLOAD = b"D", b"U"
MAX_HEADER_BYTES = 1 << 16
IO_TIMEOUT_S = 120.0  # a peer silent this long mid-transfer is dropped
HEADER_TIMEOUT_S = 10.0  # for the TLS handshake and the request header, in all
WORKERS = 32  # transfers served at once; more wait for a thread
MAX_ARRIVALS = 256  # connections still saying what they want; past it the oldest goes
PREFIX = struct.Struct(">4scI")  # MAGIC, op, header length
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class BulkError(grpc.RpcError):
    """A refusal from the bulk server, shaped as a gRPC error so callers treat both alike."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self._code, self._message = code, message

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message


class PeerContext:
    """What a handler needs of a gRPC context to know the caller: its certificate's CN and
    PEM under TLS (read by fedkube.transport.identity and roles), nothing otherwise.

    A resumed TLS session skips the certificate check of a full handshake, and its
    ticket may outlive the certificate it was made with: an expired one is refused here.
    With `ca`, the chain (the leaf, and the intermediates the peer presented, DER) is
    verified against it as on the gRPC port, or refused (UNAUTHENTICATED)."""

    def __init__(self, peer_cert_der: bytes | None, chain_der: Sequence[bytes] = (), *,
                 ca: bytes | None = None) -> None:
        self._auth: dict[str, list[bytes]] = {}
        if peer_cert_der:
            from cryptography import x509
            from cryptography.x509.oid import NameOID

            cert = x509.load_der_x509_certificate(peer_cert_der)
            now = datetime.datetime.now(datetime.UTC)
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                raise BulkError(grpc.StatusCode.UNAUTHENTICATED,
                                f"the client certificate is valid from "
                                f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} to "
                                f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC, not now")
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            pem = ssl.DER_cert_to_PEM_cert(peer_cert_der).encode()
            intermediates = "".join(ssl.DER_cert_to_PEM_cert(der) for der in chain_der
                                    if der != peer_cert_der).encode()
            if ca is not None and (problem := chain_problem(pem, intermediates, ca)):
                raise BulkError(grpc.StatusCode.UNAUTHENTICATED, problem)
            self._auth = certificate_auth(str(names[0].value).encode() if names else None,
                                          pem)
            if intermediates:
                self._auth[CHAIN_KEY] = [intermediates]

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def invocation_metadata(self) -> tuple[()]:
        return ()


Segments = Sequence[bytes | memoryview]


class BulkHandler(Protocol):
    """The director's side: called on the server's threads, each returning when done."""

    def download(self, context: PeerContext, header: bytes) -> Segments:
        """The reply's wire bytes as segments (views of the model's memory)."""

    def upload_limit(self, context: PeerContext, header: bytes) -> int:
        """The most bytes this caller may upload now (raises BulkError to refuse)."""

    def upload(self, context: PeerContext, header: bytes, body: memoryview) -> bytes:
        """Takes a TaskResults message; returns the reply's wire bytes."""


# -- framing --------------------------------------------------------------------------------

def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError(f"peer closed after {got} of {len(view)} bytes")
        got += n


def _recv(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    _recv_exactly(sock, memoryview(buffer))
    return bytes(buffer)


def _send_status(sock: socket.socket, code: grpc.StatusCode, message: str = "") -> None:
    if code is grpc.StatusCode.OK:
        sock.sendall(b"\x00")
        return
    text = message.encode()[:MAX_HEADER_BYTES]
    sock.sendall(struct.pack(">BI", code.value[0], len(text)) + text)


def _read_status(sock: socket.socket) -> None:
    code = _recv(sock, 1)[0]
    if code:
        (length,) = struct.unpack(">I", _recv(sock, 4))
        raise BulkError(_CODES.get(code, grpc.StatusCode.UNKNOWN),
                        _recv(sock, min(length, MAX_HEADER_BYTES)).decode(errors="replace"))


# -- server ---------------------------------------------------------------------------------

def _presented_chain(conn: socket.socket) -> list[bytes]:
    """The certificates the peer sent (DER, its leaf first); none on a resumed session.
    Public in Python 3.13 (get_unverified_chain), on the private _sslobj before."""
    method: Any = getattr(conn, "get_unverified_chain", None)
    if method is None:
        method = getattr(getattr(conn, "_sslobj", None), "get_unverified_chain", None)
    if method is None:
        return []
    # 3.13 gives DER; _ssl.Certificate.public_bytes() gives PEM.
    return [cert if isinstance(cert, bytes) else ssl.PEM_cert_to_DER_cert(cert.public_bytes())
            for cert in method() or ()]


class _Arrival:
    """A connection whose handshake and request header are still coming in."""

    def __init__(self, conn: socket.socket, deadline: float) -> None:
        self.conn, self.deadline = conn, deadline
        self.handshaken = not isinstance(conn, ssl.SSLSocket)
        self.received = bytearray()

    def wanted(self) -> int:
        """Header bytes still to read (0: complete, or a prefix that is not ours)."""
        if len(self.received) < PREFIX.size:
            return PREFIX.size - len(self.received)
        if not self.well_formed():
            return 0
        length: int = PREFIX.unpack_from(self.received)[2]
        return PREFIX.size + length - len(self.received)

    def well_formed(self) -> bool:
        magic, op, length = PREFIX.unpack_from(self.received)
        return magic == MAGIC and op in (DOWNLOAD, UPLOAD) and length <= MAX_HEADER_BYTES


def _close_half_made(exc: BaseException) -> None:
    """A reset between _arrive's getpeername check and wrap_socket makes ssl raise from inside
    the SSLSocket it had made, which then holds the descriptor (taken from the raw socket):
    closes it now, from the frames of the error, rather than leave it to the garbage
    collector (a ResourceWarning, and a descriptor held until then)."""
    frame = exc.__traceback__
    while frame is not None:
        made = frame.tb_frame.f_locals.get("self")
        if isinstance(made, ssl.SSLSocket):
            with contextlib.suppress(OSError):
                made.close()
        frame = frame.tb_next


class BulkServer:
    """Serves downloads and uploads on threads (the socket calls release the GIL), once
    one gate thread has read each connection's handshake and header without blocking."""

    def __init__(self, host: str, port: int, *, tls: TLSFiles | None,
                 handler: BulkHandler) -> None:
        self.handler = handler
        self._context = ssl_context(tls, server=True) if tls else None
        self._ca = tls.ca if tls else None
        self._listener = socket.create_server((host, port), reuse_port=False)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="bulk")
        self._gate = threading.Thread(target=self._admit, name="bulk-gate", daemon=True)
        self._stopping = threading.Event()
        # Written by stop(): the gate's select returns at once, not at its next timeout.
        self._wake, self._waker = socket.socketpair()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        self._gate.start()

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._waker.send(b"\0")
        self._gate.join(timeout=5)
        self._waker.close()
        with self._lock:
            for conn in self._open:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- the gate: handshakes and headers, on one thread --------------------------------

    def _admit(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        selector.register(self._wake, selectors.EVENT_READ, self._wake)
        arrivals: dict[socket.socket, _Arrival] = {}  # oldest first

        def drop(arrival: _Arrival) -> None:
            selector.unregister(arrival.conn)
            del arrivals[arrival.conn]
            arrival.conn.close()

        try:
            while not self._stopping.is_set():
                for key, _ in selector.select(timeout=0.25):
                    if key.data is self._wake:  # stopping
                        break
                    if key.data is None:  # the listener
                        self._arrive(selector, arrivals, drop)
                    elif key.data.conn in arrivals:  # not dropped in this round
                        try:
                            self._progress(selector, key.data, drop, arrivals)
                        except Exception:  # a bug: that connection goes, the port stays
                            log.exception("bulk connection failed at the gate")
                            if key.data.conn in arrivals:
                                drop(key.data)
                now = time.monotonic()
                for arrival in [a for a in arrivals.values() if a.deadline <= now]:
                    log.debug("bulk connection said nothing within %g s", HEADER_TIMEOUT_S)
                    drop(arrival)
        finally:
            for arrival in list(arrivals.values()):
                drop(arrival)
            selector.close()
            self._listener.close()
            self._wake.close()

    def _arrive(self, selector: selectors.BaseSelector, arrivals: dict[socket.socket, _Arrival],
                drop: Callable[[_Arrival], None]) -> None:
        while True:
            try:
                raw, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: the next select tries again
                log.warning("bulk port could not accept: %s", exc)
                return
            try:
                # Reset already? Checked before wrapping: ssl's wrap_socket, failing on
                # one, leaves a half-made socket to the garbage collector.
                raw.getpeername()
                raw.setblocking(False)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn = (self._context.wrap_socket(raw, server_side=True,
                                                  do_handshake_on_connect=False)
                        if self._context else raw)
            except OSError as exc:  # gone already
                log.debug("bulk connection failed on arrival: %s", exc)
                _close_half_made(exc)
                raw.close()
                continue
            if len(arrivals) >= MAX_ARRIVALS:
                drop(next(iter(arrivals.values())))
            arrival = _Arrival(conn, time.monotonic() + HEADER_TIMEOUT_S)
            arrivals[conn] = arrival
            selector.register(conn, selectors.EVENT_READ, arrival)

    def _progress(self, selector: selectors.BaseSelector, arrival: _Arrival,
                  drop: Callable[[_Arrival], None],
                  arrivals: dict[socket.socket, _Arrival]) -> None:
        """Reads what has come of the handshake and header; hands a complete request to
        a worker."""
        conn = arrival.conn
        try:
            if not arrival.handshaken:
                conn.do_handshake()  # type: ignore[attr-defined]
                arrival.handshaken = True
            # Exactly what the header still needs: the body behind it is the worker's.
            while (wanted := arrival.wanted()) > 0:
                chunk = conn.recv(wanted)
                if not chunk:
                    drop(arrival)
                    return
                arrival.received += chunk
        except ssl.SSLWantWriteError:
            selector.modify(conn, selectors.EVENT_WRITE, arrival)
            return
        except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
            selector.modify(conn, selectors.EVENT_READ, arrival)
            return
        except ssl.SSLCertVerificationError as exc:  # worth an operator's eye, unlike resets
            log.warning("bulk connection refused: %s", exc.verify_message or exc)
            drop(arrival)
            return
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.debug("bulk connection failed before its request: %s", exc)
            drop(arrival)
            return
        selector.unregister(conn)
        del arrivals[conn]
        conn.setblocking(True)
        conn.settimeout(IO_TIMEOUT_S)  # from here on a model-sized transfer
        request = bytes(arrival.received) if arrival.well_formed() else None
        self._pool.submit(self._serve, conn, request)

    # -- workers ------------------------------------------------------------------------

    def _serve(self, conn: socket.socket, request: bytes | None) -> None:
        with self._lock:
            self._open.add(conn)
        try:
            if request is None:
                _send_status(conn, grpc.StatusCode.INVALID_ARGUMENT,
                             "not a fedkube bulk request")
            else:
                self._exchange(conn, request[4:5], request[PREFIX.size:])
        except (OSError, ValueError) as exc:
            log.debug("bulk transfer ended early: %s", exc)
        finally:
            with self._lock:
                self._open.discard(conn)
            conn.close()

    def _exchange(self, conn: socket.socket, op: bytes, header: bytes) -> None:
        der = conn.getpeercert(binary_form=True) if isinstance(conn, ssl.SSLSocket) else None
        chain = _presented_chain(conn) if der else []
        ca = self._ca
        context = self._answer(conn, lambda: PeerContext(der, chain, ca=ca))
        if context is None:
            return
        if op == DOWNLOAD:
            segments = self._answer(conn, lambda: self.handler.download(context, header))
            if segments is None:
                return
            _send_status(conn, grpc.StatusCode.OK)
            conn.sendall(struct.pack(">Q", sum(memoryview(s).nbytes for s in segments)))
            for segment in segments:
                conn.sendall(segment)
            return
        (size,) = struct.unpack(">Q", _recv(conn, 8))
        limit = self._answer(conn, lambda: self.handler.upload_limit(context, header))
        if limit is None:
            return
        if size > limit:
            _send_status(conn, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"{size} bytes exceed the {limit} this upload may have")
            return
        _send_status(conn, grpc.StatusCode.OK)
        body = bytearray(size)
        _recv_exactly(conn, memoryview(body))
        reply = self._answer(conn, lambda: self.handler.upload(context, header,
                                                               memoryview(body)))
        if reply is None:
            return
        _send_status(conn, grpc.StatusCode.OK)
        conn.sendall(struct.pack(">I", len(reply)) + reply)

    @staticmethod
    def _answer(conn: socket.socket, work: Callable[[], Any]) -> Any:
        """work()'s result, or None once a refusal has been sent in its place."""
        try:
            return work()
        except BulkError as exc:
            _send_status(conn, exc.code(), exc.details())
        except Exception as exc:  # a bug: the caller gets a status, the server goes on
            log.exception("bulk transfer failed")
            _send_status(conn, grpc.StatusCode.INTERNAL, f"bulk transfer failed: {exc}")
        return None


# -- client ---------------------------------------------------------------------------------

def target_host(target: str) -> str:
    """The host of a host:port gRPC target, where the bulk port is too."""
    host = target.rsplit(":", 1)[0] if ":" in target else target
    return host.removeprefix("dns:///").strip("[]")


class BulkClient:
    """Downloads into a buffer kept per key from call to call, and uploads from memory."""

    def __init__(self, host: str, port: int, *, tls: TLSFiles | None) -> None:
        self.host, self.port = host, port
        self._context = ssl_context(tls, server=False) if tls else None
        self._session: ssl.SSLSession | None = None
        self.resumed = 0  # TLS sessions resumed: transfers that skipped the certificates
        self._buffers: dict[str, bytearray] = {}

    @contextlib.contextmanager
    def _connect(self) -> Iterator[socket.socket]:
        raw = socket.create_connection((self.host, self.port), timeout=IO_TIMEOUT_S)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._context is None:
            with raw:
                yield raw
            return
        with self._context.wrap_socket(raw, server_hostname=self.host,
                                       session=self._session) as conn:
            self.resumed += bool(conn.session_reused)
            try:
                yield conn
            finally:  # a refusal ends a transfer cleanly too
                # A transfer per tensor: resuming the last session skips the certificates
                # (1.4-1.7x the small transfers per second: benchmarks/bulk_handshakes.py).
                self._session = conn.session

    @staticmethod
    def _request(conn: socket.socket, op: bytes, header: bytes) -> None:
        conn.sendall(MAGIC + op + struct.pack(">I", len(header)) + header)

    def download(self, key: str, header: bytes) -> memoryview:
        """The reply's bytes, a view of the key's buffer: valid until its next download."""
        with self._connect() as conn:
            self._request(conn, DOWNLOAD, header)
            _read_status(conn)
            (size,) = struct.unpack(">Q", _recv(conn, 8))
            buffer = self._buffers.get(key)
            if buffer is None or len(buffer) < size:
                # A new buffer rather than a resize: views of the old one may be in use.
                buffer = self._buffers[key] = bytearray(size)
            view = memoryview(buffer)[:size]
            _recv_exactly(conn, view)
            return view

    def upload(self, header: bytes, segments: Segments) -> bytes:
        """Sends a message given as segments; returns the reply's bytes."""
        with self._connect() as conn:
            self._request(conn, UPLOAD, header)
            conn.sendall(struct.pack(">Q", sum(memoryview(s).nbytes for s in segments)))
            _read_status(conn)
            for segment in segments:
                conn.sendall(segment)
            _read_status(conn)
            (size,) = struct.unpack(">I", _recv(conn, 4))
            return _recv(conn, size)
