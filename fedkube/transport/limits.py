"""Message size limits shared by servers and clients."""

MiB = 1 << 20
# A single unary message (a tensor request, a health check) never needs more than this;
# models and archives travel as streams of chunks.
MAX_MESSAGE_BYTES = 64 * MiB
# What a server may send and a client receive in one message: a whole tensor
# (GetAggregatedTensor) or model (GetTrainedModel) is one message in OpenFL's protocol,
# and protobuf caps a message at 2 GiB. Servers still refuse requests over 64 MiB.
MAX_REPLY_BYTES = (1 << 31) - 1
CHUNK_BYTES = 2 * MiB
# Largest initial model a director accepts with an experiment (sent in pieces).
MAX_MODEL_BYTES = 16 << 30
# Largest experiment archive a director accepts.
MAX_ARCHIVE_BYTES = 512 * MiB

_KEEPALIVE: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]
GRPC_OPTIONS: list[tuple[str, int]] = [  # clients
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_REPLY_BYTES),
    *_KEEPALIVE,
]
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_REPLY_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    *_KEEPALIVE,
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.max_concurrent_streams", 10_000),
    # Calls that arrived before the server asked for them. gRPC's default of 1,000 made it
    # cancel some of the registrations of a few thousand envoys arriving at once (a
    # director restart); queued, they are answered within their deadline instead.
    ("grpc.server.max_pending_requests", 10_000),
    ("grpc.server.max_pending_requests_hard_limit", 20_000),
]
