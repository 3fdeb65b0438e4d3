"""The way into the GPU tier: verify, validate, admit, follow; the direct route.

May import admission, stores, workload, ops' metrics, and splitspace.shared/session.
"""
