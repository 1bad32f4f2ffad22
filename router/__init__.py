"""ddm.router"""
