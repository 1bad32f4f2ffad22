"""Generated gRPC stubs live under ddm.proto.ddm.v1 (the .proto package ddm.v1)."""
