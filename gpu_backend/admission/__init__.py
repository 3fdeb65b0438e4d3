"""Who runs next: the pure fair scheduler and the runner that feeds it and the GPU.

May import stores and workload, and splitspace.shared; never serving or ops.
"""
