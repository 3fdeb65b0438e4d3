"""Who runs next: the pure fair scheduler, each client's limits and overrides, and the
runner that feeds them and the GPU.

May import stores and workload, and splitspace.shared; never serving or ops.
"""
