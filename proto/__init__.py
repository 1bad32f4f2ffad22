"""ddm.proto: the gRPC API (ddm/v1/ddm.proto), its generated stubs and the helpers every server and
client shares: tensor <-> message conversion with validation (``tensors``) and channels, TLS, token
auth, message limits, health and reflection (``rpc``).

Import the stubs as ``from ddm.proto.ddm.v1 import ddm_pb2 as pb, ddm_pb2_grpc as pb_grpc``.
"""
