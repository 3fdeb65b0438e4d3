"""Settings, logs and the clients both tiers build: Redis, its circuit breaker, the quota file watch.

May import contract.
"""
