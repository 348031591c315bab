"""Generated protobuf/gRPC stubs for the socialrec.v1 wire contract."""
