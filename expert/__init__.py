"""ddm.expert"""
