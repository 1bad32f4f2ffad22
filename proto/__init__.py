"""ddm.proto"""
