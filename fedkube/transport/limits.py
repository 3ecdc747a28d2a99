"""Message size limits shared by servers and clients."""

MiB = 1 << 20
# A single unary message (a tensor request, a health check) never needs more than this;
# models and archives travel as streams of chunks.
MAX_MESSAGE_BYTES = 64 * MiB
CHUNK_BYTES = 2 * MiB
# Largest experiment archive a director accepts.
MAX_ARCHIVE_BYTES = 512 * MiB

GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]
SERVER_OPTIONS: list[tuple[str, int]] = [
    *GRPC_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.max_concurrent_streams", 10_000),
]
