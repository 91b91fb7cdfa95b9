"""Generated protobuf and gRPC stubs (proto/generate.sh); do not edit."""
