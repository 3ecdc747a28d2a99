"""gRPC plumbing shared by every role: servers, channels, TLS, caller identity, chunking."""
