"""Generated protobuf and gRPC code (tools/gen_protos.py from protos/); never edited by hand."""
