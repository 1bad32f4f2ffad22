"""ddm.coordinator"""
