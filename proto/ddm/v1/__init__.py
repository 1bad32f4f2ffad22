"""Stubs generated from ddm.proto by proto/generate.py; do not edit ddm_pb2*.py by hand."""
